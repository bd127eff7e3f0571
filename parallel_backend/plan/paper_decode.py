"""Each paper model's own VAE decode in its run's end to end on GPUs (plan/paper.py `gpu_plan`): which VAE a
model's pipeline decodes with (MODEL_VAES, built on meta by plan/paper_models.py), its decode counted there
(`count_vae_of`, plan/vae_count.py) and predicted whole on one GPU and in tiles on the pool (plan/vae_costs.py),
and the fitted serial part cut into that decode and the rest (`run_decode`, RunDecode). Predictions from counted
figures only: nothing is timed and no weight is loaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ..models import vae_grid
from . import paper_models
from .links import Link
from .measure import HOST_OVERHEAD_S
from .model import Inputs
from .vae_costs import VaeDecode, VaePrediction, predict_decode
from .vae_count import count_decode


@functools.lru_cache(maxsize=None)
def count_vae_of(build: str, latent_shape: tuple) -> tuple[VaeDecode, int]:
    """(the counted figures of paper_models.`build`'s VAE decoding a latent of `latent_shape`, its parameters)."""
    vae = getattr(paper_models, build)()
    dtype = next(vae.parameters()).dtype
    latent = torch.empty(latent_shape, device="meta", dtype=dtype)
    return count_decode(vae, latent), sum(p.numel() for p in vae.parameters())


@dataclass(frozen=True)
class ModelVae:
    """The VAE a model's pipeline decodes with: its builder (paper_models), the latent's channels, image pixels per
    latent row and column, a clip's frames per latent frame; frames_axis: a latent with a frames axis even for an
    image (Qwen-Image's VAE, Wan's architecture, decodes an image as one frame)."""

    build: str
    channels: int
    scale: int = paper_models.VAE_SCALE
    frames_per_latent: int = paper_models.VIDEO_FRAMES_PER_LATENT
    frames_axis: bool = False

    def latent_shape(self, resolution, frames: int | None) -> tuple[int, ...]:
        clip = (1 + (frames - 1) // self.frames_per_latent,) if frames else (1,) * self.frames_axis
        return (1, self.channels, *clip, *(r // self.scale for r in resolution))


# each model's VAE, by the model's builder (paper_models.py gives each VAE's config and its source)
MODEL_VAES = {
    "sdxl_meta": ModelVae("sdxl_vae_meta", 4),
    "sd35_large_meta": ModelVae("flux_vae_meta", 16),  # SD3.5's VAE has Flux.1's config
    "flux_dev_meta": ModelVae("flux_vae_meta", 16),
    "flux2_dev_meta": ModelVae("flux2_vae_meta", 32),
    "qwen_image_meta": ModelVae("qwen_image_vae_meta", 16, frames_axis=True),
    "wan14b_meta": ModelVae("wan_vae_meta", 16),
    "hunyuan_video_meta": ModelVae("hunyuan_video_vae_meta", 16),
    "ltx_video_meta": ModelVae("ltx_video_vae_meta", 128, paper_models.LTX_SCALE, paper_models.LTX_FRAMES_PER_LATENT),
}


@dataclass(frozen=True)
class RunDecode:
    """A run's VAE decode in Tandem's end to end on GPUs. The fitted serial part (`serial_seconds`: the text encoders
    and VAE as the peers ran them, whole on one device) splits into the decode on one GPU (`whole`: vae_costs at
    plan/paper.py EFFICIENCY["vae"] of the GPU's peak) and the rest (serial - the whole decode, floored at 0);
    Tandem decodes in tiles on the pool's devices (`split`: on all `devices` of the pool, or as the engine does, on
    as many as the latent has rows and columns for). `why_not`: neither is known, and the serial part stays
    whole."""

    serial_seconds: float
    whole: VaePrediction | None = None
    split: VaePrediction | None = None
    why_not: str = ""
    devices: int = 1

    @property
    def rest_seconds(self) -> float:
        return self.serial_seconds if self.whole is None else max(0.0, self.serial_seconds - self.whole.seconds)

    def apply(self, inputs: Inputs) -> Inputs:
        """`inputs` with the serial part cut into the rest and the decode (whole on one device, split on the pool)."""
        if self.whole is None:
            return inputs
        return replace(inputs, serial_seconds=self.rest_seconds, decode_seconds=self.whole.seconds,
                       decode_split_seconds=self.split.seconds)

    def line(self) -> str:
        if self.whole is None:
            return (f"end to end: {self.serial_seconds:.2f} s text encoders and VAE, the fitted serial part whole "
                    f"(the decode not split: {self.why_not})")
        n = self.split.devices
        where = (f"in {vae_grid.words(self.split.grid)} on {n} GPUs" if n > 1 else "whole on one GPU")
        fewer = (f"; {n} of the {self.devices} GPUs decode: the latent has too few rows and columns for more tiles"
                 if n < self.devices else "")
        floored = (f"; the fitted serial part, {self.serial_seconds:.2f} s, is less than the decode: the rest "
                   "floored at 0" if self.serial_seconds < self.whole.seconds else "")
        return (f"end to end: {self.rest_seconds:.2f} s text encoders and the rest + {self.split.seconds:.2f} s decode "
                f"{where} ({self.whole.seconds:.2f} s whole; {self.split.memory_bytes / 2**30:.2f} GiB per device "
                f"while it decodes){fewer}{floored}")

    def as_json(self) -> dict:
        if self.whole is None:
            return {"serial_seconds_fitted": self.serial_seconds, "why_not": self.why_not}
        return {"serial_seconds_fitted": self.serial_seconds, "rest_seconds": self.rest_seconds,
                "decode_seconds": self.split.seconds, "decode_seconds_whole": self.whole.seconds,
                "decode_devices": self.split.devices, "decode_grid": list(self.split.grid),
                "decode_gib_per_device": self.split.memory_bytes / 2**30,
                "decode_gib_whole": self.whole.memory_bytes / 2**30}


def run_decode(build: str, resolution, frames: int | None, flops_per_s: float, link: Link, devices: int,
               serial_seconds: float) -> RunDecode:
    """The decode of paper_models.`build`'s model's VAE (MODEL_VAES) at `resolution` (and `frames`) in a run whose
    fitted serial part is `serial_seconds`: whole on one GPU that decodes `flops_per_s` (its peak x plan/paper.py
    EFFICIENCY["vae"]), in tiles on `devices` of them joined by `link` (each split paying the CUDA host overhead;
    engine/vae.py's grid: at most one tile per latent row and column); why not, where the model has no VAE here or
    its latent is empty."""
    vae = MODEL_VAES.get(build)
    if vae is None:
        return RunDecode(serial_seconds, why_not=f"no VAE is known for {build}", devices=devices)
    decode, _ = count_vae_of(vae.build, vae.latent_shape(tuple(resolution), frames))
    one = decode.flops / flops_per_s
    try:
        tiles = vae_grid.choose_grid(decode.rows, decode.columns, devices)
    except ValueError as exc:
        return RunDecode(serial_seconds, why_not=str(exc), devices=devices)
    split = predict_decode(decode, one, link, tiles[0] * tiles[1], HOST_OVERHEAD_S["cuda"][0])
    return RunDecode(serial_seconds, predict_decode(decode, one, link, 1), split, devices=devices)
