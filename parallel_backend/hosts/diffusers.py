"""diffusers host: load a local Stable Diffusion / SDXL pipeline folder (offline) and generate with it."""

from __future__ import annotations

import json
import threading
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..models.diffusers_unet import FAMILY as UNET_FAMILY
from ..sampling import Generation, GenerationRequest, Timer, initial_noise, make_scheduler

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_class_name(folder: str | Path) -> str:
    """Checks that `folder` is a supported diffusers pipeline folder and returns its pipeline class name."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model not found: {folder}")
    if folder.is_file():
        raise ValueError(f"{folder} is a single file; give a diffusers pipeline folder (one with model_index.json)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"{folder} holds a {name or 'unnamed'} pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return name


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
        """Loads offline (no hub access); fp16 on CUDA, fp32 on the CPU."""
        import diffusers

        name = pipeline_class_name(folder)
        device = device or default_device()
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        extra = {}
        if "safety_checker" in json.loads((Path(folder) / "model_index.json").read_text()):
            extra = {"safety_checker": None, "requires_safety_checker": False}
        pipe = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, **extra)
        return cls(pipe.to(device))

    @torch.no_grad()
    def generate(self, request: GenerationRequest, progress: bool = True) -> Generation:
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


class ParallelUNet(torch.nn.Module):
    """Stands in for a pipeline's UNet: every forward runs on the pool; attributes read through to the UNet.

    The wrapped UNet itself is left untouched (it is what ships to the workers), so `unparallelize` puts it
    back as it was.
    """

    def __init__(self, unet, executor, pipe):
        super().__init__()
        self.unet = unet
        object.__setattr__(self, "_executor", executor)
        object.__setattr__(self, "_pipe", weakref.ref(pipe))
        self.calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        from ..calls import ModelCall

        pipe = self._pipe()
        guided = bool(getattr(pipe, "do_classifier_free_guidance", False))
        extras = {k: v for k, v in kwargs.items() if v is not None}
        timestep = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        call = ModelCall(sample, timestep, encoder_hidden_states, extras, branches=2 if guided else 1,
                         index=self.calls)
        self.calls += 1
        out = self._executor(self.unet, UNET_FAMILY, call)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def parallelize(pipe, config=None, pool=None):
    """Runs `pipe`'s UNet on a pool of devices (a diffusers StableDiffusion / SDXL pipeline). Idempotent.

    config: a ParallelConfig (default: all devices, strategy auto). pool: a started or unstarted WorkerPool to
    use (default: one made for `config.devices`, owned by the pipeline and shut down by `unparallelize`).
    Returns `pipe`, changed in place; `unparallelize(pipe)` restores it.
    """
    from ..config import ParallelConfig
    from ..engine import ParallelExecutor
    from ..pool import WorkerPool

    if isinstance(pipe.unet, ParallelUNet):
        return pipe
    config = config or ParallelConfig()
    owned = pool is None
    pool = pool or WorkerPool(config.devices, timeout_s=config.timeout_s)
    wrapper = ParallelUNet(pipe.unet, ParallelExecutor(pool, config), pipe)
    object.__setattr__(wrapper, "_owned_pool", pool if owned else None)
    pipe.unet = wrapper
    pipe.__class__ = _one_job_per_call(type(pipe))
    return pipe


def _one_job_per_call(cls):
    """`cls` whose calls each run as one job of the pool (threads sharing the pipeline queue; a new job starts
    fresh stale state); the same name, so diffusers' config and saving see the pipeline's own class."""

    def __call__(self, *args, **kwargs):
        wrapper = self.unet
        with wrapper._executor.job() if isinstance(wrapper, ParallelUNet) else nullcontext():
            return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "_tandem_base": cls})


def unparallelize(pipe):
    """Puts the original UNet back; shuts the pool down if `parallelize` made it. Idempotent."""
    wrapper = pipe.unet
    if not isinstance(wrapper, ParallelUNet):
        return pipe
    pipe.unet = wrapper.unet
    pipe.__class__ = getattr(type(pipe), "_tandem_base", type(pipe))
    if wrapper._owned_pool is not None:
        wrapper._owned_pool.shutdown()
    return pipe
