"""diffusers host: load a local Stable Diffusion / SDXL pipeline folder (offline) and generate with it."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..runtime import sources, validation
from ..models.diffusers_dit import FAMILIES as DIT_FAMILIES
from ..models.diffusers_dit import recognise
from ..models.diffusers_unet import FAMILY as UNET_FAMILY
from ..models.sampling import Generation, GenerationRequest, Timer, initial_noise, make_scheduler
from .diffusers_transformer import ParallelTransformer
from .model_folder import SUPPORTED_PIPELINES, pipeline_class_name, weight_files
from .stand_in import StandIn
from .diffusers_vae import ParallelVAE, splits
from ..runtime.words import counted

TRANSFORMERS = ("transformer", "transformer_2")  # Wan 2.2 has a second one for its low-noise steps


def _first_line(exc: BaseException) -> str:
    """The error's first line (with the next one when the first only announces it, as torch's "Error(s) in
    loading state_dict for X:" does)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


@contextmanager
def _quiet_libraries():
    """diffusers' and transformers' log lines, warnings and progress bars off for the block (restored after)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class DiffusersPipeline:
    """A diffusers SD/SDXL pipeline behind the same `generate(request)` as the embedded model's pipeline."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.default_cfg = 7.5
        self.device = pipe.device
        self._lock = threading.RLock()  # one generation at a time: threads sharing this pipeline queue

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> "DiffusersPipeline":
        """Loads offline (no hub access), quietly; fp16 on CUDA, fp32 on the CPU. A folder that does not load
        raises ValueError in one sentence naming it."""
        name = pipeline_class_name(folder)
        device = device or default_device()
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        extra = {}
        if "safety_checker" in validation.read_json_object(Path(folder) / "model_index.json"):
            extra = {"safety_checker": None, "requires_safety_checker": False}
        with _quiet_libraries():
            import diffusers

            try:
                pipe = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                                                **extra)
            except Exception as exc:  # diffusers and transformers raise many kinds for a broken folder
                raise ValueError(f"could not load the pipeline in {folder}: {_first_line(exc)}") from None
        return cls(pipe.to(device))

    def bytes_per_request(self, request: GenerationRequest) -> int:
        """A lower bound of the memory `request` takes: its latents and UNet feature maps per row, and per image
        the VAE decoder's full-size feature maps and the pixels (a float array and an 8-bit image)."""
        unet, vae = self.pipe.unet.config, self.pipe.vae.config
        size = unet.sample_size
        pixels = self.image_side() ** 2
        itemsize = self.pipe.unet.dtype.itemsize
        rows = request.num_images * (2 if request.cfg > 1.0 else 1)
        decoding = validation.FEATURE_COPIES * vae.block_out_channels[0] * pixels * itemsize + pixels * 3 * 5
        return (validation.sampling_bytes(rows, unet.in_channels * size * size, unet.block_out_channels[0] * size * size,
                                          itemsize) + request.num_images * decoding)

    def image_side(self) -> int:
        """Pixels per side of the images this pipeline makes."""
        return self.pipe.unet.config.sample_size * 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def check(self, request: GenerationRequest) -> None:
        """Refuses, before any step, a request that this device's memory cannot hold."""
        validation.fits_in_memory(f"{counted(request.num_images, 'image')} of {self.image_side()} px",
                                  self.bytes_per_request(request), str(self.device), "ask for fewer images")

    @torch.no_grad()
    def generate(self, request: GenerationRequest, progress: bool = True) -> Generation:
        self.check(request)
        with self._lock:  # the scheduler and progress settings below are the pipeline's own
            return self._generate(request, progress)

    def _generate(self, request: GenerationRequest, progress: bool) -> Generation:
        pipe = self.pipe
        pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        size = pipe.unet.config.sample_size
        shape = (request.num_images, pipe.unet.config.in_channels, size, size)
        noise = initial_noise(request.seed, shape).to(pipe.device, pipe.unet.dtype)
        with Timer() as timer:
            out = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                       num_inference_steps=request.steps, guidance_scale=request.cfg,
                       num_images_per_prompt=request.num_images, latents=noise,
                       generator=torch.Generator("cpu").manual_seed(request.seed + 1), output_type="pil")
        devices = pipe.unet._executor.pool.devices if isinstance(pipe.unet, ParallelUNet) else (str(pipe.device),)
        return Generation(out.images, noise, timer.seconds, len(pipe.scheduler.timesteps), {"devices": devices})

    @contextmanager
    def parallel(self, config, pool=None):
        """Within the block, the pipeline's UNet runs on a pool (see `parallelize`)."""
        parallelize(self.pipe, config, pool)
        wrapper = self.pipe.unet
        wrapper._executor.engine.load(wrapper.unet, UNET_FAMILY)  # ship the weights before sampling
        try:
            yield self
        finally:
            unparallelize(self.pipe)


class ParallelUNet(StandIn):
    """Stands in for a pipeline's UNet: every forward runs on the pool; attributes read through to the UNet."""

    inner = "unet"

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        from ..runtime.calls import ModelCall

        pipe = self._pipe()
        guided = bool(getattr(pipe, "do_classifier_free_guidance", False))
        extras = {k: v for k, v in kwargs.items() if v is not None}
        timestep = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        call = ModelCall(sample, timestep, encoder_hidden_states, extras, branches=2 if guided else 1,
                         index=self.calls)
        self.calls += 1
        out = self._executor(self.unet, UNET_FAMILY, call)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def parallelize(pipe, config=None, pool=None, **settings):
    """Runs `pipe`'s denoiser on a pool of devices: the UNet of a StableDiffusion / SDXL pipeline, or the
    transformer(s) of a Flux, SD3, Wan or Qwen-Image pipeline; and its VAE's decode and encode in bands of rows
    where models/vae_families.py lists its class and its layers band exactly (hosts/diffusers_vae.py). Idempotent.

    config: a ParallelConfig (default: all devices, strategy auto), or its settings by name in its place
    (`parallelize(pipe, devices="cuda:0,cuda:1", weights="auto", memory_per_device=20)`). pool: a started or
    unstarted WorkerPool to use (default: one made for `config.devices`, owned by the pipeline and shut down by
    `unparallelize`).
    Returns `pipe`, changed in place; `unparallelize(pipe)` restores it. A pipeline with no supported denoiser
    is refused (ValueError) before any process starts.
    """
    from ..engine.config import ParallelConfig
    from .executor import ParallelExecutor
    from ..runtime.pool import WorkerPool

    if _stand_ins(pipe):
        return pipe
    denoisers = _denoisers(pipe)
    if not denoisers:
        dits = ", ".join(p for family in DIT_FAMILIES for p in family.pipelines)
        raise ValueError(f"parallelize cannot run a {type(pipe).__name__}: it has neither the UNet2DConditionModel "
                         f"of {', '.join(SUPPORTED_PIPELINES)} nor the transformer of {dits}")
    if config is not None and settings:
        raise TypeError(f"parallelize takes a config or its settings ({', '.join(settings)}), not both")
    config = config or ParallelConfig(**settings)
    owned = pool is None
    pool = pool or WorkerPool(config.devices, **config.pool_options())
    executor = ParallelExecutor(pool, config)
    for i, (name, family) in enumerate(denoisers):
        model = getattr(pipe, name)
        sources.note(model, weight_files(model, name))  # its workers read its weights from its own files
        if family is None:
            wrapper = ParallelUNet(model, executor, pipe)
        else:
            wrapper = ParallelTransformer(model, executor, pipe, family)
        object.__setattr__(wrapper, "_owned_pool", pool if owned and i == 0 else None)
        setattr(pipe, name, wrapper)
    if splits(getattr(pipe, "vae", None)):  # its decode (and encode) in bands of rows on the same pool
        pipe.vae = ParallelVAE(pipe.vae, executor, pipe)
    pipe.__class__ = _one_job_per_call(type(pipe))
    return pipe


def _denoisers(pipe) -> list[tuple[str, object]]:
    """(attribute, family) of each denoiser `parallelize` can run: the family is None for a diffusers UNet."""
    unet = getattr(pipe, "unet", None)
    if any(cls.__name__ == "UNet2DConditionModel" for cls in type(unet).__mro__):
        return [("unet", None)]
    found = [(name, recognise(getattr(pipe, name, None))) for name in TRANSFORMERS]
    return [(name, family) for name, family in found if family is not None]


def _stand_ins(pipe) -> list[tuple[str, StandIn]]:
    """(attribute, stand-in) of each denoiser `parallelize` replaced."""
    found = [(name, getattr(pipe, name, None)) for name in ("unet",) + TRANSFORMERS + ("vae",)]
    return [(name, model) for name, model in found if isinstance(model, StandIn)]


def _one_job_per_call(cls):
    """`cls` whose calls each run as one job of the pool (threads sharing the pipeline queue; a new job starts
    fresh stale state); the same name, so diffusers' config and saving see the pipeline's own class."""

    def __call__(self, *args, **kwargs):
        wrappers = [wrapper for _, wrapper in _stand_ins(self)]
        with wrappers[0]._executor.job() if wrappers else nullcontext():
            for wrapper in wrappers:
                wrapper.new_job()
            return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "_tandem_base": cls})


def unparallelize(pipe):
    """Puts the original denoisers and VAE back; shuts the pool down if `parallelize` made it. Idempotent."""
    for name, wrapper in _stand_ins(pipe):
        setattr(pipe, name, wrapper.real)
        if wrapper._owned_pool is not None:
            wrapper._owned_pool.shutdown()
    pipe.__class__ = getattr(type(pipe), "_tandem_base", type(pipe))
    return pipe
