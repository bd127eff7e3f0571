"""A test-only output node that says how a loader built a model, for the tests to read from the prompt's history."""

from __future__ import annotations

import collections

import torch

from . import families


def _weight_kind(weight) -> str:
    """The weight's storage: a QuantizedTensor's layout (ComfyUI's mixed precision ops), a GGMLTensor's GGML
    type (ComfyUI-GGUF), or a plain tensor's dtype."""
    if weight is None:
        return "none"
    if hasattr(weight, "tensor_type"):  # ComfyUI-GGUF's GGMLTensor
        import gguf

        return f"GGMLTensor:{gguf.GGMLQuantizationType(int(weight.tensor_type)).name}"
    layout = getattr(weight, "_layout_cls", None) or getattr(weight, "_layout_type", None)
    if layout is not None:
        return f"{type(weight).__name__}:{getattr(layout, '__name__', layout)}"
    return str(weight.dtype).replace("torch.", "")


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


class TandemTestDescribeModel:
    """The model's config class and unet_config compared with a fixture family's (families.py), and its Linear
    layers counted by op class (qualified name) and weight storage."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "family": (families.available(), {"default": "flux"})}}

    RETURN_TYPES = ()
    FUNCTION = "describe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def describe(self, model, family):
        base = model.model
        expected_class, unet_config = families.FAMILIES[family][:2]
        detected = base.model_config.unet_config
        linears = collections.Counter(
            f"{type(module).__qualname__} {_weight_kind(getattr(module, 'weight', None))}"
            for module in base.diffusion_model.modules() if isinstance(module, torch.nn.Linear)
            or type(module).__name__ == "Linear")
        description = {"model_config": type(base.model_config).__name__, "expected_config": expected_class,
                       "config_mismatch": {k: [repr(v), repr(detected.get(k))] for k, v in unet_config.items()
                                           if not _same(v, detected.get(k))},
                       "quant_config": repr(getattr(base.model_config, "quant_config", None)),
                       "linears": dict(linears)}
        return {"ui": {"description": [description]}}


NODES = {"TandemTestDescribeModel": TandemTestDescribeModel}
