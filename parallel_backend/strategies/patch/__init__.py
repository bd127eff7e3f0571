"""patch (DistriFusion, CVPR 2024): the latent cut into N bands of tokens, each device running its band through the
whole model. Each attention takes its own band's fresh keys and values and the other bands' from the call
before, which travelled while the devices computed (the exchange hides behind a whole call), so a step costs
about 1/N of the model plus what the exchange cannot hide. The job's first `warmup` sampler steps, and any
attention with no stale keys of its shape (the first call, a new resolution or batch), exchange synchronously
and are exact. Approximate after warm-up (the bench reports PSNR against one device; the plan marks it stale).

Host side (this module): a `PatchForward` per rank of each row group (cfg x batch compose as for ulysses);
worker side: worker.py (the stale store and the call's context), group.py (the DiTs' attention); a UNet's
convolutions and norms are models/unet_patch.py's (`run_unet_patch`), where it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...runtime.knobs import Knob
from ..sequence.parallel import SequenceStrategy
from ..stale import WARMUP

PATCH = Knob("patch", int, None, "patch: devices that split the latent into bands, each attending to the other "
             "bands' keys and values from the step before (default: the devices left after cfg and batch)", low=1,
             unset=True, axis="it splits the latent into bands that use each other's stale activations")


@dataclass(frozen=True)
class PatchForward:
    """Run the model on `call` (the group's whole rows) with its latent cut into bands over the ranks `peers`
    (global ranks, in band order); this rank is peers[index]; its first `warmup` sampler steps exact."""

    fingerprint: str
    call: Any  # calls.ModelCall
    peers: tuple[int, ...]
    index: int
    warmup: int


class Patch(SequenceStrategy):
    name = "patch"
    kind = "ring"  # the ideal (bench_part): a rank's own queries against every key, as ring computes them
    exact = False
    axes = ("patch",)
    knobs = (PATCH, WARMUP)
    adapters = None  # DiTs through their sequence split; UNets through models/unet_patch.py
    scope = "splits transformers (DiTs) by their token sequence and UNets by bands of rows"
    summary = ("the latent in bands, one per device, each attending to the other bands' keys and values from the "
               "step before, exchanged behind compute (approximate after warm-up; DiTs and SD1.x / SDXL UNets).")

    def check_family(self, family: str) -> None:
        """DiTs: those with a sequence split (SequenceStrategy's sentence otherwise); UNets: SD1.x and SDXL,
        diffusers' and ComfyUI's, in bands of rows (models/unet_patch.py)."""
        from ...models import adapter_name

        if not adapter_name(family).endswith("_unet"):
            super().check_family(family)

    def check_model(self, mesh, sequence) -> None:
        """Any number of heads: each rank attends with all of them."""

    def check_call(self, mesh, module, family: str, call) -> None:
        """A UNet's latent must cut into bands at multiples of its downsampling, one per device of the group."""
        from ...models import adapter_name, unet_patch

        if mesh.inner > 1 and adapter_name(family).endswith("_unet"):
            unet_patch.check_call(module, call, mesh.inner)

    def message(self, fingerprint: str, share, peers: tuple[int, ...], index: int, mesh, config) -> PatchForward:
        return PatchForward(fingerprint, share, peers, index, config.warmup)

    def shard_split(self, mesh) -> tuple[int, int]:
        """A rank computes what a ring rank of the same degree does (its band, its queries against every key)."""
        return 1, mesh.inner

    def bench_figures(self, executor, loop, row: dict) -> dict:
        """The sequence strategies' figures over the calls past warm-up (those a warm-up call waits on all its
        exchanges, as ring would), and how many calls were exact."""
        from dataclasses import replace

        exact = [c for c in loop.calls if any(e.get("synchronous") for e in c["extra"].values())]
        stale = [c for c in loop.calls if c not in exact]
        figures = super().bench_figures(executor, replace(loop, calls=stale or loop.calls), row)
        figures["summary"] += f"; {len(exact)} of {len(loop.calls)} calls exact (warm-up), the rest on stale bands"
        return {**figures, "exact_calls": len(exact)}

    def bench_part(self, model, call, mesh):
        """A DiT: a ring rank's part (SequenceStrategy's); a UNet: the UNet on the largest band's rows alone (no
        halos, no exchange)."""
        from ...models import adapter_name, forward_for_family, sequence_runner

        if adapter_name(model.family).endswith("_unet"):
            import dataclasses

            import torch

            from ...models.unet_patch import band_heights
            from ...models.vae_bands import row_scale

            rows = max(band_heights(call.x.shape[-2], row_scale(model.module, whole=()), mesh.inner))
            band, forward = dataclasses.replace(call, x=call.x[..., :rows, :]), forward_for_family(model.family)

            def run():
                with torch.inference_mode():
                    forward(model.module, band)

            return run
        return None if sequence_runner(model.family) is None else super().bench_part(model, call, mesh)

    def worker_handlers(self) -> dict:
        from ..sequence.probe import ProbeExchange, run_probe
        from .worker import run_patch_forward

        return {PatchForward: run_patch_forward, ProbeExchange: run_probe}


STRATEGY = Patch()
