"""VAE Decode (Multi-GPU): the stock VAE Decode, its rows split in bands over the pool's devices
(parallel_backend/engine/vae.py). A VAE Tandem cannot split, a video latent, or a pool that cannot take the work
takes the stock path, said in one sentence."""

from __future__ import annotations

import logging
import time

import nodes as comfy_nodes  # ComfyUI's own top-level nodes.py (VAEDecode), not this pack's nodes/
from comfy_api.latest import io

from parallel_backend.engine.pool_engine import engine_for
from parallel_backend.engine.vae import decode
from parallel_backend.models import vae_families
from parallel_backend.runtime.carry import CannotCarry

from .runtime import RUNTIME
from .settings import default_config, settings_input
from .wrappers import pool_or_reason

log = logging.getLogger("tandem")


class TandemVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemVAEDecode",
            display_name="VAE Decode (Multi-GPU) (Tandem)",
            category="latent/multi-gpu",
            description="VAE Decode whose image is split into bands of rows over several devices (the same image, "
                        "sooner, in less memory per device).",
            inputs=[io.Latent.Input("samples", tooltip="The latent to decode."),
                    io.Vae.Input("vae", tooltip="The VAE that decodes it; its rows are split over the devices of "
                                                "the settings."),
                    settings_input()],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae, settings=None) -> io.NodeOutput:
        config = settings or default_config()
        RUNTIME.check_devices(config.devices)  # devices that do not exist fail the run, before any work
        latent, model = samples["samples"], vae.first_stage_model
        reason = _reason_to_stay_home(latent, model)
        pool = None
        if reason is None:
            pool, reason = pool_or_reason(config.devices)
        if reason is None:
            started = time.perf_counter()
            try:
                done = decode(engine_for(pool), model, latent.to(vae.vae_dtype))
            except CannotCarry as exc:
                reason = str(exc)
            else:
                images = vae.process_output(done.out.to(vae.output_device).float())
                log.info("Tandem: VAE Decode (Multi-GPU) decoded a %s latent in %d bands on %s in %.2f s",
                         "x".join(map(str, latent.shape[-2:])), done.extra["bands"],
                         ", ".join(pool.devices[:done.extra["bands"]]), time.perf_counter() - started)
                return io.NodeOutput(images.movedim(1, -1))
        log.info("Tandem: VAE Decode (Multi-GPU) takes the stock path: %s", reason)
        return io.NodeOutput(*comfy_nodes.VAEDecode().decode(vae, samples))


def _reason_to_stay_home(latent, model) -> str | None:
    """Why this decode stays on the host (one sentence), or None."""
    if vae_families.family_of(model) is None:
        return f"Tandem has no band split for a {type(model).__name__} VAE yet"
    if latent.ndim != 4:
        return f"a latent of {latent.ndim} dimensions (video) has no band split yet"
    if getattr(latent, "is_nested", False):
        return "a nested latent has no band split"
    if latent.shape[-2] < 2:
        return "a latent of one row cannot be split into bands"
    return None
