"""VAE Decode and VAE Encode (Multi-GPU): the stock nodes, their rows split in bands over the pool's devices
(parallel_backend/engine/vae.py). A VAE Tandem cannot split, a video, a single row, or a pool that cannot take
the work takes the stock path, said in one sentence."""

from __future__ import annotations

import logging
import time

import nodes as comfy_nodes  # ComfyUI's own top-level nodes.py (VAEDecode), not this pack's nodes/
from comfy_api.latest import io

from parallel_backend.engine.pool_engine import engine_for
from parallel_backend.engine.vae import decode, encode
from parallel_backend.models import vae_families, vae_grid
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
        latent = samples["samples"]
        done = _on_the_pool("VAE Decode", settings, vae, latent, _reason_to_stay_home(latent, vae.first_stage_model),
                            lambda engine: decode(engine, vae.first_stage_model, latent.to(vae.vae_dtype),
                                                  draw_on=vae.device))  # where the stock decode draws its noise
        if done is None:
            return io.NodeOutput(*comfy_nodes.VAEDecode().decode(vae, samples))
        images = vae.process_output(done.out.to(vae.output_device).float()).movedim(1, -1)
        if images.ndim == 5:  # a video's frames as a batch of images, as the stock node gives them
            images = images.reshape(-1, *images.shape[-3:])
        return io.NodeOutput(images)


class TandemVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemVAEEncode",
            display_name="VAE Encode (Multi-GPU) (Tandem)",
            category="latent/multi-gpu",
            description="VAE Encode whose image is split into bands of rows over several devices.",
            inputs=[io.Image.Input("pixels", tooltip="The image to encode."),
                    io.Vae.Input("vae", tooltip="The VAE that encodes it; its rows are split over the devices of "
                                                "the settings."),
                    settings_input()],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, pixels, vae, settings=None) -> io.NodeOutput:
        model, family = vae.first_stage_model, vae_families.family_of(vae.first_stage_model)
        image = vae.vae_encode_crop_pixels(pixels[:, :, :, :3]).movedim(-1, 1)
        if family is not None and family.video:  # frames as the batch: one video (batch, C, T, H, W), or as
            # ComfyUI encodes for a VAE of frames that is not a video's (`not_video`: HunyuanImage's refiner) a
            # batch of one-frame videos
            image = image.unsqueeze(2) if getattr(vae, "not_video", False) else image.movedim(1, 0).unsqueeze(0)
        reason = _reason_to_stay_home(image, model, scale=family.scale(model) if family else 1)
        done = _on_the_pool("VAE Encode", settings, vae, image, reason,
                            lambda engine: encode(engine, model, vae.process_input(image).to(vae.vae_dtype)))
        if done is None:
            return io.NodeOutput(*comfy_nodes.VAEEncode().encode(vae, pixels))
        return io.NodeOutput({"samples": done.out.to(vae.output_device).float()})


def _on_the_pool(node: str, settings, vae, rows_in, reason: str | None, run):
    """run(engine) on the pool of the settings (its Computed), or None where the node takes the stock path (said
    in one sentence)."""
    def what(done, pool):
        rows, columns = done.extra["grid"]
        into = f"rows into {rows} bands" if columns == 1 else f"into {vae_grid.words((rows, columns))}"
        return (f"split {'x'.join(map(str, rows_in.shape[-2:]))} {into} on "
                f"{', '.join(pool.devices[:done.extra['bands']])}")

    return on_the_pool(node, settings, reason, run, what)


def on_the_pool(node: str, settings, reason: str | None, run, what):
    """run(engine) on the pool of the settings (its Computed), or None where the node takes the stock path (said
    in one sentence); what(done, pool): what the node did there, for the log line."""
    config = settings or default_config()
    RUNTIME.check_devices(config.devices)  # devices that do not exist fail the run, before any work
    pool = None
    if reason is None:
        pool, reason = pool_or_reason(config.devices)
    if reason is None:
        started = time.perf_counter()
        try:
            done = run(engine_for(pool))
        except CannotCarry as exc:
            reason = str(exc)
        else:
            log.info("Tandem: %s (Multi-GPU) %s in %.2f s", node, what(done, pool), time.perf_counter() - started)
            return done
    log.info("Tandem: %s (Multi-GPU) takes the stock path: %s", node, reason)
    return None


def _reason_to_stay_home(latent, model, scale: int = 1) -> str | None:
    """Why this decode (or encode: `scale` image rows per latent row) stays on the host (one sentence), or None."""
    if vae_families.family_of(model) is None:
        return f"Tandem has no band split for a {type(model).__name__} VAE yet"
    family = vae_families.family_of(model)
    if latent.ndim != (5 if family.video else 4):
        return f"an input of {latent.ndim} dimensions has no band split for this {type(model).__name__} VAE"
    if getattr(latent, "is_nested", False):
        return "a nested latent has no band split"
    if latent.shape[-2] % scale or latent.shape[-1] % scale:
        return (f"an image of {latent.shape[-2]}x{latent.shape[-1]} pixels does not divide into the VAE's "
                f"{scale}-pixel latent rows and columns")
    if latent.shape[-2] < 2 * scale:
        return "a latent of one row cannot be split into bands"
    return None
