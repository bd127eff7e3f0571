"""Multi-GPU KSampler and KSampler (Advanced): the stock samplers, with each model call split over devices."""

from __future__ import annotations

import comfy.samplers
import nodes as comfy_nodes
from comfy_api.latest import io

from .settings import settings_input
from .wrappers import install


def _common_inputs(seed: str = "seed") -> list:
    """The stock samplers' inputs, under the stock names (KSampler's "seed" is KSamplerAdvanced's "noise_seed"),
    so a workflow swaps a stock sampler for a Multi-GPU one by its class name alone."""
    return [
        io.Model.Input("model"),
        io.Int.Input(seed, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
        io.Int.Input("steps", default=20, min=1, max=10000),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        io.Latent.Input("latent_image"),
    ]


class TandemKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemKSampler",
            display_name="Multi-GPU KSampler (Tandem)",
            category="sampling/multi-gpu",
            description="KSampler whose every step is split over several devices (same image, sooner).",
            inputs=[*_common_inputs(),
                    io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                    settings_input()],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0, settings=None) -> io.NodeOutput:
        patched = install(model, settings)
        return io.NodeOutput(*comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler,
                                                          positive, negative, latent_image, denoise=denoise))


class TandemKSamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemKSamplerAdvanced",
            display_name="Multi-GPU KSampler (Advanced) (Tandem)",
            category="sampling/multi-gpu",
            description="KSampler (Advanced) whose every step is split over several devices.",
            inputs=[io.Combo.Input("add_noise", options=["enable", "disable"]),
                    *_common_inputs("noise_seed"),
                    io.Int.Input("start_at_step", default=0, min=0, max=10000),
                    io.Int.Input("end_at_step", default=10000, min=0, max=10000),
                    io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"]),
                    settings_input()],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, add_noise, model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, start_at_step, end_at_step, return_with_leftover_noise, settings=None) -> io.NodeOutput:
        patched = install(model, settings)
        return io.NodeOutput(*comfy_nodes.common_ksampler(
            patched, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            disable_noise=add_noise == "disable", start_step=start_at_step, last_step=end_at_step,
            force_full_denoise=return_with_leftover_noise == "disable"))
