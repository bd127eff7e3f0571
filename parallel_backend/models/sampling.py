"""Host-side sampling: diffusers schedulers built by name, the denoising loop (the request and the schedulers' names:
request.py).

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
from .request import SCHEDULERS, GenerationRequest  # noqa: F401 (the request is named here too)

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(name: str, base_config: dict):
    """A fresh diffusers scheduler `name` (a key of SCHEDULERS) built on a model's scheduler config."""
    validation.one_of("scheduler", name, SCHEDULERS)
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)


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
