"""Host-side sampling: diffusers schedulers by name, a validated request, and the denoising loop.

The loop calls one function per model evaluation, `denoiser(x, t, context) -> noise prediction`. That call is
the seam Tandem parallelises: the loop, the scheduler and classifier-free guidance stay on the host.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..runtime import validation

# name -> (diffusers scheduler class, overrides of the model's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(name: str, base_config: dict):
    """A fresh diffusers scheduler `name` (a key of SCHEDULERS) built on a model's scheduler config."""
    validation.one_of("scheduler", name, SCHEDULERS)
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)


@dataclass
class GenerationRequest:
    """What to generate. Validated on creation (`validation`): a value of the wrong kind raises TypeError, one
    out of range ValueError, each naming the field. steps: 1 to 10000; cfg: 0 to 100 (1: no guidance); seed:
    0 to 2**63 - 1; num_images: 1 to 10000 (and what memory allows: the pipeline checks it)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    cfg: float = 5.0
    seed: int = 0
    scheduler: str = "euler"
    num_images: int = 1

    def __post_init__(self):
        self.prompt = validation.text("prompt", self.prompt)
        self.negative_prompt = validation.text("negative_prompt", self.negative_prompt)
        self.steps = validation.whole_number("steps", self.steps, 1, validation.MAX_STEPS)
        self.cfg = validation.finite_number("cfg", self.cfg, 0.0, validation.MAX_CFG)
        self.seed = validation.seed(self.seed)
        self.scheduler = validation.one_of("scheduler", self.scheduler, SCHEDULERS)
        self.num_images = validation.whole_number("num_images", self.num_images, 1, validation.MAX_IMAGES)


@dataclass
class Generation:
    """What came out: PIL images, the final latents (B, C, h, w), and how long the denoising loop took."""

    images: list
    latents: torch.Tensor
    seconds: float
    model_calls: int
    extras: dict = field(default_factory=dict)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded noise made on the CPU, so a seed gives the same image whatever device runs the model."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def denoise(denoiser: Denoiser, scheduler, noise: torch.Tensor, context: torch.Tensor,
            uncond_context: torch.Tensor | None, cfg: float, steps: int, seed: int = 0,
            progress: bool = True) -> tuple[torch.Tensor, int]:
    """Runs the sampler loop; returns (latents, number of denoiser calls).

    noise: (B, ...) unit noise (a UNet's (B, C, h, w), Flux's packed tokens, Wan's frames); context /
    uncond_context: (B, L, D). With cfg != 1 each call evaluates [uncond; cond] as one batch of 2B (the order
    diffusers uses) and combines them on the host. Flow-matching schedulers have no noise scale nor input
    scaling: the latents start as the noise and go in as they are.
    """
    from tqdm.auto import tqdm

    device, dtype = context.device, context.dtype
    scheduler.set_timesteps(steps, device=device)
    latents = noise.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    guided = cfg != 1.0
    if guided:
        if uncond_context is None:
            raise ValueError("cfg != 1 needs an unconditional context")
        both_contexts = torch.cat([uncond_context, context])
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # ancestral samplers draw fresh noise
        step_kwargs["generator"] = torch.Generator("cpu").manual_seed(seed + 1)
    calls = 0
    for t in tqdm(scheduler.timesteps, desc="sampling", unit="call", disable=not progress, leave=False):
        scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        x = scaled.to(dtype)
        if guided:
            eps_uncond, eps_cond = denoiser(torch.cat([x, x]), t, both_contexts).chunk(2)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
        else:
            eps = denoiser(x, t, context)
        calls += 1
        latents = scheduler.step(eps.float(), t, latents, **step_kwargs).prev_sample
    return latents, calls


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
