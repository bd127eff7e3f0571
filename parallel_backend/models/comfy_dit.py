"""ComfyUI's diffusion models of every family, as data: how each is recognised by its parts, and how its calls
travel to a worker. Nothing here imports ComfyUI.

The worker holds the host's own model object (unpickled with the host's ComfyUI on its import path) and calls
it exactly as ComfyUI's BaseModel does: `model(x, t, context=..., control=..., transformer_options=...,
**extra_conds)`. The host names every argument it was handed (ComfyUI passes them positionally, in the
order of the class's own signature), so each family's keywords (`guidance`, `ref_latents`, `y`, attention
masks, image embeddings, `control`, frame counts ...) reach the worker as they are.

Rows: ComfyUI repeats every tensor condition to the batch (and concatenates cond and uncond along it), so a
tensor input whose first dim is the batch is per row, and a list of such tensors (reference latents) is
cut element by element; anything else (numbers, strings, `transformer_options`) goes to every share whole.
A family's `shared` names inputs that stay whole even when their first dim happens to equal the batch.

`transformer_options` travels without ComfyUI's own dispatch machinery (wrappers, callbacks: they run on the
host, around Tandem's call); its patches (`patches`, `patches_replace`, an attention override) go with the
call, carried by value or by reference (carry.py), and run on the workers.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

ADAPTER = "comfy_dit"
UNET_ADAPTER = "comfy_unet"
# Host-side only, never read by the model's own code: ComfyUI's dispatch machinery (the wrappers and
# callbacks run on the host, around Tandem's call), Tandem's own entry, and the state that other nodes'
# wrappers keep there for themselves (EasyCache's and LazyCache's holder: read by their wrappers, which run
# on the host around the pool's call).
HOST_KEYS = frozenset({"wrappers", "callbacks", "tandem", "multigpu_thread_device", "easycache"})


@dataclass(frozen=True)
class Family:
    name: str  # travels with the model: "comfy_dit:<name>"
    label: str  # for people, in log lines and the README
    parts: tuple[str, ...]  # dotted attribute paths its diffusion model has (checked in FAMILIES order)
    shared: frozenset = frozenset()  # inputs every share gets whole
    adapter: str = ADAPTER
    hooked: bool = True  # its forward goes through ComfyUI's DIFFUSION_MODEL wrappers (SD3's MMDiT does not)

    @property
    def sequence(self):
        """`run(model, call, group)` with the token sequence split (its row in sequence_splits.COMFY), or None."""
        from .comfy_sequence import runner

        return runner(self.name)

    @property
    def wire(self) -> str:
        """The family string the workers get (models.forward_for_family)."""
        return self.adapter if self.adapter == UNET_ADAPTER else f"{self.adapter}:{self.name}"


# Most specific first: Chroma and HunyuanVideo have Flux's double and single stream blocks too.
FAMILIES = (
    Family("unet", "SD1.x / SD2.x / SDXL UNet", ("input_blocks", "middle_block", "output_blocks", "time_embed"),
           adapter=UNET_ADAPTER),
    Family("chroma", "Chroma", ("distilled_guidance_layer", "double_blocks", "single_blocks", "img_in")),
    Family("hunyuan_video", "HunyuanVideo", ("txt_in.individual_token_refiner", "double_blocks", "single_blocks",
                                             "img_in")),
    Family("flux", "Flux.1 / Flux.2", ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in")),
    Family("sd3", "SD3 / SD3.5 (MMDiT)", ("joint_blocks", "x_embedder", "context_embedder", "t_embedder"),
           hooked=False),
    Family("qwen_image", "Qwen-Image", ("transformer_blocks", "img_in", "txt_in", "txt_norm", "time_text_embed")),
    Family("wan", "Wan 2.1 / 2.2", ("patch_embedding", "text_embedding", "time_embedding", "time_projection",
                                    "blocks", "head")),
    Family("ltxv", "LTX-Video", ("adaln_single", "transformer_blocks", "patchify_proj")),
    Family("lumina", "Lumina 2 / Z-Image (NextDiT)", ("noise_refiner", "context_refiner", "cap_embedder", "layers",
                                                      "final_layer")),
)


def _has(module, path: str) -> bool:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


def recognise(module) -> Family | None:
    """The family of a ComfyUI diffusion model (its `diffusion_model`), by its parts; None when unknown."""
    return next((f for f in FAMILIES if all(_has(module, part) for part in f.parts)), None)


def family_named(wire: str) -> Family:
    return next(f for f in FAMILIES if f.wire == wire)


def attention_heads(module) -> int | None:
    """The attention heads of a ComfyUI diffusion model (what a ulysses degree must divide), None where unknown."""
    from .comfy_sequence import attention_heads as heads

    family = recognise(module)
    return None if family is None else heads(family.name, module)


def sequence_refusal(family: str, call) -> str | None:
    """Why this call of a ComfyUI family cannot have its token sequence split (one phrase), or None."""
    from .comfy_sequence import refusal

    return refusal(family.split(":", 1)[-1], call.extras)


def sequence_whole_rows(family: str, call) -> str | None:
    """Why this call runs on whole rows, even under a named sequence strategy (a model patch), or None."""
    from .comfy_sequence import patch_refusal

    return patch_refusal(call.extras)


def unsupported_reason(module) -> str | None:
    """One sentence when Tandem cannot split this model, else None."""
    if recognise(module) is None:
        known = ", ".join(f.label for f in FAMILIES)
        return (f"Tandem has no adapter for this model family ({type(module).__name__}); it splits {known}")
    return None


def name_arguments(function, args: tuple, kwargs: dict) -> dict:
    """The arguments ComfyUI handed a diffusion model's forward (`function`, positionally in its own order),
    by name; a catch-all `**kwargs` is flattened into the others."""
    bound = _signature(function).bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif bound.signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{getattr(function, '__qualname__', function)} got extra positional inputs")
        else:
            named[name] = value
    return named


_SIGNATURES: dict = {}


def _signature(function) -> inspect.Signature:
    key = getattr(function, "__func__", function)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = inspect.signature(function)
    return _SIGNATURES[key]


def portable_options(options: dict) -> dict:
    """`transformer_options` as it travels: without ComfyUI's dispatch machinery and what only the host's own
    wrappers read. Everything else goes, patches included (the engine carries what is not plain data:
    carry.py)."""
    return {key: value for key, value in options.items() if key not in HOST_KEYS}


@contextmanager
def record_attention(call, recorder):
    """`call` with an attention override that times every attention ComfyUI's attention makes in it
    (models/attention_timing.py), for auto's plan."""
    from .attention_timing import comfy_override

    options = {**(call.extras.get("transformer_options") or {}), "optimized_attention_override": comfy_override(recorder)}
    yield replace(call, extras={**call.extras, "transformer_options": options})


def forward(model, call) -> torch.Tensor:
    """Calls a ComfyUI diffusion model as BaseModel does, with every input the host handed it."""
    extras = dict(call.extras)
    extras.setdefault("transformer_options", {})
    return model(call.x, call.t, context=call.context, **extras)
