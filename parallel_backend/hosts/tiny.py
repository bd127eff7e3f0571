"""Text-to-image with the embedded digits model: prompt -> context -> denoising loop -> codec -> images."""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import torch

from ..runtime import validation
from ..models.sampling import Generation, GenerationRequest, Timer, denoise, initial_noise, make_scheduler
from ..tiny.model import TinyDigitsModel
from ..runtime.words import counted


def pixels_to_images(pixels: torch.Tensor, upscale: int = 8) -> list:
    """pixels: (B, 1, H, W) in [-1, 1] -> grayscale PIL images of (H*upscale, W*upscale)."""
    from PIL import Image

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    images = [Image.fromarray(a[0], mode="L") for a in array]
    if upscale > 1:
        images = [im.resize((im.width * upscale, im.height * upscale), Image.BICUBIC) for im in images]
    return images


class TinyDigitsPipeline:
    """Generates 32x32 handwritten digits from prompts like "a handwritten 7" (shown 8x upscaled)."""

    default_cfg = 4.0

    def __init__(self, model: TinyDigitsModel | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model = (model or TinyDigitsModel.load()).to(device, dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.unet = self.model.unet
        self.executor = None  # a ParallelExecutor while inside `parallel(...)`
        self._lock = threading.RLock()  # one generation at a time: threads sharing this pipeline queue

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> context (B, L, D) on the pipeline's device and dtype."""
        ids = self.model.tokenizer.encode(prompts).to(self.device)
        return self.model.text_encoder(ids)

    @contextmanager
    def parallel(self, config, pool=None):
        """Within the block, every UNet call runs on a pool (`pool`, or one started for `config.devices`)."""
        from .executor import ParallelExecutor
        from ..runtime.pool import WorkerPool

        owned = pool is None
        pool = pool or WorkerPool(config.devices, **config.pool_options())
        self.executor = ParallelExecutor(pool.start(), config)
        self.executor.engine.load(self.unet, "diffusers_unet")  # ship the weights now, not inside the first timed call
        try:
            yield self
        finally:
            self.executor = None
            if owned:
                pool.shutdown()

    def _denoiser(self, cfg: float):
        if self.executor is None:
            return lambda x, t, context: self.unet(x, t, encoder_hidden_states=context).sample
        from ..runtime.calls import ModelCall
        from ..models.diffusers_unet import FAMILY

        index = iter(range(1 << 62))
        return lambda x, t, context: self.executor(
            self.unet, FAMILY, ModelCall(x, t, context, branches=2 if cfg != 1.0 else 1, index=next(index)))

    def bytes_per_request(self, request: GenerationRequest) -> int:
        """A lower bound of the memory `request` takes: latents and UNet feature maps per row, and per image its
        float pixels and the 8x image (and its place in a grid)."""
        channels, h, w = self.model.config["latent_shape"]
        rows = request.num_images * (2 if request.cfg != 1.0 else 1)
        side = self.model.config["pixel_size"]
        image = side * side * 4 + 2 * (8 * side) ** 2
        return (validation.sampling_bytes(rows, channels * h * w, self.unet.config.block_out_channels[0] * h * w,
                                          self.dtype.itemsize) + request.num_images * image)

    def check(self, request: GenerationRequest) -> None:
        """Refuses, before any step, a request that this device's memory cannot hold."""
        validation.fits_in_memory(counted(request.num_images, "image"), self.bytes_per_request(request),
                                  str(self.device), "ask for fewer images")

    @torch.no_grad()
    def generate(self, request: GenerationRequest, progress: bool = True) -> Generation:
        self.check(request)
        with self._lock, self.executor.job() if self.executor is not None else nullcontext():
            return self._generate(request, progress)

    def _generate(self, request: GenerationRequest, progress: bool) -> Generation:
        n = request.num_images
        context = self.encode_prompts([request.prompt] * n)
        uncond = self.encode_prompts([request.negative_prompt] * n) if request.cfg != 1.0 else None
        noise = initial_noise(request.seed, (n, *self.model.config["latent_shape"]))
        scheduler = make_scheduler(request.scheduler, self.model.config["scheduler"])
        with Timer() as timer:
            latents, calls = denoise(self._denoiser(request.cfg), scheduler, noise, context, uncond, request.cfg, request.steps,
                                     request.seed, progress)
        pixels = self.model.codec.decode(latents.float())
        devices = self.executor.pool.devices if self.executor else (str(self.device),)
        return Generation(pixels_to_images(pixels), latents, timer.seconds, calls, {"pixels": pixels, "devices": devices})
