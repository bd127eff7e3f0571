"""Multi-GPU Model: MODEL -> MODEL, so any sampler node (SamplerCustomAdvanced included) runs on the pool."""

from __future__ import annotations

from comfy_api.latest import io

from .settings import settings_input
from .wrappers import install


class TandemModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemModel",
            display_name="Multi-GPU Model (Tandem)",
            category="sampling/multi-gpu",
            description="Makes any sampler split each model call over several devices.",
            inputs=[io.Model.Input("model", tooltip="The model whose calls the returned model runs on the "
                                                    "devices of the settings, for any sampler node."),
                    settings_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, settings=None) -> io.NodeOutput:
        return io.NodeOutput(install(model, settings))
