"""diffusers host: load a local Stable Diffusion / SDXL pipeline folder (offline) and generate with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
        return Generation(out.images, noise, timer.seconds, len(pipe.scheduler.timesteps))
