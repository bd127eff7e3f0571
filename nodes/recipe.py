"""A ComfyUI diffusion model as a recipe (parallel_backend/runtime/recipe.py): the workers build it with the host's own
classes, the way ComfyUI's BaseModel built it, and load the host's weights as they are.

What is the host's: the diffusion model's class and the model config's `unet_config` (what ComfyUI detected);
the operations namespace the layers came from (ComfyUI's own ops by reference; fp8-scaled checkpoints' mixed
precision ops, which ComfyUI makes inside `comfy.ops.mixed_precision_ops()`, made again there from the same
quantization config; a custom-node loader's own ops, such as ComfyUI-GGUF's, by reference through
host_modules.py) and the plain settings of its layer classes (ComfyUI-GGUF writes its dequantization dtypes
there); the weights as the host's layers hold them after ComfyUI patched them (LoRA merged; a GGUF layer's
quantized tensors with the patches it applies as it dequantizes); and what the host's instances carry beyond
what building gives them (`overrides`: an object patch, a setting ComfyUI's loader wrote on a layer).

This module is loaded by the workers too (by its host module name), to build: it imports ComfyUI only inside
functions.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from functools import reduce

import torch

from parallel_backend.runtime.carry import CannotCarry
from parallel_backend.runtime.recipe import MethodWatch, Recipe, identity_of, instance_overrides, layout

LAYER_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "RMSNorm", "Embedding",
               "ConvTranspose1d", "ConvTranspose2d", "BatchNorm2d")


@dataclass(frozen=True)
class MixedPrecision:
    """`comfy.ops.mixed_precision_ops(...)`'s arguments: its namespace is a class made inside that function."""

    quant_config: dict
    compute_dtype: torch.dtype
    full_precision_mm: bool
    disabled: tuple

    def make(self):
        import comfy.ops

        return comfy.ops.mixed_precision_ops(self.quant_config, self.compute_dtype, self.full_precision_mm,
                                             set(self.disabled))


@dataclass(frozen=True)
class ComfyBuild:
    """Builds a ComfyUI diffusion model as BaseModel does: `model_class(**unet_config, device, operations)`."""

    model_class: type
    unet_config: dict
    operations: object  # an ops namespace (class or instance, by reference) or a MixedPrecision
    layer_settings: tuple  # ((layer class name, ((attribute, value), ...)), ...)
    channels_last: bool = False

    def __call__(self, device=None) -> torch.nn.Module:
        import comfy.model_management

        operations = self.operations.make() if isinstance(self.operations, MixedPrecision) else self.operations
        for name, settings in self.layer_settings:
            for attribute, value in settings:
                setattr(getattr(operations, name), attribute, value)
        model = self.model_class(**self.unet_config, device=device, operations=operations)
        model.eval()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        archive = getattr(comfy.model_management, "archive_model_dtypes", None)  # v0.2x; v0.8 has none
        if archive is not None:
            archive(model)
        return model


class HostModel:
    """What Tandem knows of one of the host's diffusion models: how to build it again (ComfyBuild) and a fresh
    build of it on the meta device, against which its instances' replaced methods and settings are found.
    One per diffusion model (`of`)."""

    _known: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, base_model, diffusion_model):
        import comfy.model_management

        config = base_model.model_config
        operations = host_operations(config, diffusion_model)
        self.module = weakref.ref(diffusion_model)
        self.build = ComfyBuild(type(diffusion_model), dict(config.unet_config), _portable(operations),
                                _layer_settings(operations), bool(comfy.model_management.force_channels_last()))
        with torch.device("meta"):
            self.fresh = self.build(device=torch.device("meta"))
        self.watch = MethodWatch(diffusion_model, self.fresh)

    @classmethod
    def of(cls, base_model, diffusion_model) -> "HostModel":
        """The HostModel of `diffusion_model` (made on first use). Raises CannotCarry where it cannot be built
        again in a worker."""
        known = cls._known.get(diffusion_model)
        if known is None:
            known = cls._known[diffusion_model] = cls(base_model, diffusion_model)
        return known

    def recipe(self, compile_kwargs: dict | None = None, sources: tuple = ()) -> Recipe:
        """The model's recipe as it is now (patched), with torch.compile's settings for the workers and the
        safetensors files its weights were loaded from (Recipe.sources)."""
        module = self.module()
        overrides = instance_overrides(module, self.fresh)
        build = self.build
        identity = identity_of(f"{build.model_class.__module__}.{build.model_class.__qualname__}",
                               sorted(build.unet_config.items(), key=str), _describe(build.operations),
                               build.layer_settings, build.channels_last, repr(sorted(overrides.items())),
                               sorted((compile_kwargs or {}).items(), key=str))
        return Recipe(build, host_weights(module), layout(module), identity, overrides, compile_kwargs, sources)


def host_weights(module: torch.nn.Module) -> dict:
    """What `load_state_dict` must be given to make `module` again: its state dict, or where that is a stand-in
    (ComfyUI-GGUF's layers report meta tensors, for ComfyUI's memory estimate) its parameters and buffers as
    they are (the quantized tensors, with the LoRA patches they apply)."""
    state = {name: _stored(t) for name, t in module.state_dict().items()}
    if not any(isinstance(t, torch.Tensor) and t.is_meta for t in state.values()):
        return state
    persistent = {name for name, _ in module.named_buffers() if _persistent(module, name)}
    return {**dict(module.named_parameters()), **{n: b for n, b in module.named_buffers() if n in persistent}}


def _stored(tensor):
    """A state dict entry as a checkpoint stores it: ComfyUI's QuantizedTensor (which v0.8's mixed precision
    layers put in their state dict as it is; later versions store its data) as its quantized data, what those
    layers' loading wraps again; any other entry unchanged."""
    if type(tensor).__name__ == "QuantizedTensor" and hasattr(tensor, "_qdata"):
        return tensor._qdata
    return tensor


def _persistent(module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf not in module.get_submodule(owner)._non_persistent_buffers_set


def host_operations(config, diffusion_model):
    """The operations namespace ComfyUI built `diffusion_model`'s layers from: the model config's custom one (a
    loader's, e.g. ComfyUI-GGUF's), else the namespace of its Linear layers' class."""
    if getattr(config, "custom_operations", None) is not None:
        return config.custom_operations
    linear = next((type(m) for m in diffusion_model.modules() if type(m).__name__ == "Linear"
                   and "." in type(m).__qualname__), None)
    if linear is None:
        import comfy.ops

        return comfy.ops.disable_weight_init  # no layer of the ops at all: any namespace builds it alike
    return _enclosing(linear)


def _enclosing(cls):
    """The class that `cls` is nested in (ComfyUI's ops namespaces hold their layer classes)."""
    outer = cls.__qualname__.rsplit(".", 1)[0]
    if "<locals>" not in outer:
        return reduce(getattr, outer.split("."), sys.modules[cls.__module__])
    # A namespace made inside a function (comfy.ops.mixed_precision_ops): its layers' methods refer to it.
    wanted = outer.rsplit(".", 1)[-1]
    for function in vars(cls).values():
        for cell in getattr(function, "__closure__", None) or ():
            value = cell.cell_contents
            if isinstance(value, type) and value.__name__ == wanted:
                return value
    raise CannotCarry(f"the model's layers come from {outer}, an operations class made inside a function that "
                      "Tandem cannot make again in its workers")


def _portable(operations):
    """The namespace as it travels: by reference, or (mixed precision ops) the arguments that make it again."""
    cls = operations if isinstance(operations, type) else type(operations)
    if "<locals>" not in cls.__qualname__:
        return operations
    if hasattr(cls, "_quant_config"):
        return MixedPrecision(cls._quant_config, cls._compute_dtype, bool(cls._full_precision_mm),
                              tuple(sorted(cls._disabled)))
    raise CannotCarry(f"the model's layers come from {cls.__qualname__}, an operations class made inside a "
                      "function that Tandem cannot make again in its workers")


def _layer_settings(operations) -> tuple:
    """The plain settings each layer class of the namespace holds itself (what a loader may have written)."""
    cls = operations if isinstance(operations, type) else type(operations)
    settings = []
    for name in LAYER_NAMES:
        layer = getattr(cls, name, None)
        if not isinstance(layer, type):
            continue
        own = tuple(sorted((k, v) for k, v in vars(layer).items() if not k.startswith("_")
                           and isinstance(v, (type(None), bool, int, float, str, torch.dtype))))
        if own:
            settings.append((name, own))
    return tuple(settings)


def _describe(operations) -> str:
    if isinstance(operations, MixedPrecision):
        return repr(operations)
    cls = operations if isinstance(operations, type) else type(operations)
    return f"{cls.__module__}.{cls.__qualname__}"
