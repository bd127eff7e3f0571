"""Multi-GPU KSampler and KSampler (Advanced): the stock samplers, with each model call split over devices."""

from __future__ import annotations

import comfy.samplers
import nodes as comfy_nodes  # ComfyUI's own top-level nodes.py (common_ksampler), not this pack's nodes/
from comfy_api.latest import io

from .settings import settings_input
from .wrappers import install


def _common_inputs(seed: str = "seed") -> list:
    """The stock samplers' inputs, under the stock names (KSampler's "seed" is KSamplerAdvanced's "noise_seed"),
    so a workflow swaps a stock sampler for a Multi-GPU one by its class name alone."""
    return [
        io.Model.Input("model", tooltip="The diffusion model that removes the noise; its calls are split over the "
                                        "devices of the settings."),
        io.Int.Input(seed, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="The seed of the starting noise (made as the stock sampler makes it)."),
        io.Int.Input("steps", default=20, min=1, max=10000,
                     tooltip="How many denoising steps the sampler takes; more are slower and usually finer."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale: how strongly the result follows the positive prompt "
                               "over the negative one. Too high harms quality; 1 turns guidance off (one branch)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                       tooltip="The sampling algorithm; it changes speed, quality and style of the result."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                       tooltip="How the noise level falls from step to step."),
        io.Conditioning.Input("positive", tooltip="The conditioning of what the result should show."),
        io.Conditioning.Input("negative", tooltip="The conditioning of what the result should avoid."),
        io.Latent.Input("latent_image", tooltip="The latent to start from (an empty latent, or an image's for "
                                                "image to image)."),
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
                    io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="How much of the latent is replaced by noise and denoised: 1 for a new "
                                           "image; lower keeps more of the input latent (image to image)."),
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
            inputs=[io.Combo.Input("add_noise", options=["enable", "disable"],
                                   tooltip="enable: noise is added to the latent first; disable: the latent is "
                                           "denoised as it comes (e.g. the leftover noise of an earlier pass)."),
                    *_common_inputs("noise_seed"),
                    io.Int.Input("start_at_step", default=0, min=0, max=10000,
                                 tooltip="The step of the schedule this pass starts at (0: the first)."),
                    io.Int.Input("end_at_step", default=10000, min=0, max=10000,
                                 tooltip="The step this pass stops before; at or past steps, it runs to the end."),
                    io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"],
                                   tooltip="enable: a pass that stops before the last step returns its latent "
                                           "still noisy, for a later pass to finish; disable: its last step removes "
                                           "the noise left."),
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
