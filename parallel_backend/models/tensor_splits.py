"""Tensor splits: which layers of a transformer family are cut over a tensor-parallel group, and the cut itself.

A family's plan maps module paths ("*" runs over a ModuleList) to a style:
- "colwise": a Linear keeps its output rows of this rank (attention heads, MLP hidden units); a module above it
  with an int `heads` counts only its own heads from then on;
- "rowwise": a Linear keeps its input columns of this rank; its output is the sum over the group (one all-reduce),
  to which its bias is added once;
- PackedRowwise(blocks): rowwise over an input that concatenates parts (Flux's single blocks: attention, MLP) of
  sizes in the proportions `blocks` (or the Linear's own `_tp_packed_row_blocks`); each part is cut apart;
- "norm_across": an RMSNorm over the outputs of a colwise Linear (Wan's q/k norms span every head): its sum of
  squares is all-reduced, so each rank normalizes its heads by the whole vector's mean;
- "gathered": a Linear of a few rows (AdaLN modulation: a row per image, 6 x width wide) keeps its output rows of
  this rank and all-gathers the whole output, a few KiB: its weights, a quarter of Flux.1's, are split too.
Everything else (embeddings, per-head norms, the output head) stays whole on every rank, so every rank computes
the same activations between blocks.

Where diffusers declares a model's plan itself (`_tp_plan`: Flux, Flux.2, Qwen-Image) that declaration is read;
families it does not cover have their rows in PLANS; diffusers leaves the modulation whole, the rows of EXTRA add
it. diffusers applies its plan with torch's DTensor (`parallelize_module`), which Tandem does not use:
- its gloo path cost 36 ms more per call of a two-layer MLP (64 tokens: 39.6 against 4.0 ms sliced by hand,
  same output; 4096 tokens: 179 against 148 ms; 2 ranks, torch 2.13: docs/measurements/dtensor_vs_slices.py);
- its meshes are process groups that every worker of the pool must create in the same order, while a
  cfg x tensor call reaches each group's ranks alone;
- no style of it covers an RMSNorm that spans the heads.
Pure but for the exchanges, which the caller passes in (`group`: `sum` and `gather`), so one process can run a
whole group's ranks in threads (tests/test_tensor_parallel.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

COLWISE, ROWWISE, NORM_ACROSS, GATHERED = "colwise", "rowwise", "norm_across", "gathered"


def own(param: nn.Parameter) -> nn.Parameter:
    """Marks a parameter this rank's own share (it differs between the group's ranks): sharded weights leave it
    whole (models/weight_shards.py shards only what every rank of the group holds the same)."""
    param._tandem_own = True
    return param


@dataclass(frozen=True)
class PackedRowwise:
    blocks: tuple[int, ...] | None = None  # proportions of the input's parts; None: the Linear's own attribute


@dataclass(frozen=True)
class PackedColwise:
    blocks: tuple[int, ...]  # proportions of the output's parts (a fused q, k, v: 1, 1, 1), each cut apart


@dataclass(frozen=True)
class Divide:
    names: tuple[str, ...]  # int attributes of the module that count what the cut divides (heads, widths)


# Families without a diffusers declaration. Wan 2.x: self- and cross-attention by heads (its q/k RMSNorms span
# every head), the feed-forward by hidden units.
_WAN_ATTENTION = {f"blocks.*.{attn}.{name}": COLWISE for attn in ("attn1", "attn2")
                  for name in ("to_q", "to_k", "to_v")}
PLANS = {
    "diffusers_dit:wan": {
        **_WAN_ATTENTION,
        "blocks.*.attn2.add_k_proj": COLWISE, "blocks.*.attn2.add_v_proj": COLWISE,
        "blocks.*.attn1.to_out.0": ROWWISE, "blocks.*.attn2.to_out.0": ROWWISE,
        "blocks.*.attn1.norm_q": NORM_ACROSS, "blocks.*.attn1.norm_k": NORM_ACROSS,
        "blocks.*.attn2.norm_q": NORM_ACROSS, "blocks.*.attn2.norm_k": NORM_ACROSS,
        "blocks.*.attn2.norm_added_k": NORM_ACROSS,
        "blocks.*.ffn.net.0.proj": COLWISE, "blocks.*.ffn.net.2": ROWWISE,
    },
}

def _comfy_flux(module: nn.Module) -> dict:
    """ComfyUI's Flux.1 (comfy/ldm/flux/layers.py): q, k, v fused in one Linear; a single block fuses q, k, v and
    the MLP's first layer, and splits their output by its `hidden_size` and `mlp_hidden_dim_first`, which the cut
    divides with its heads."""
    double = module.double_blocks[0] if len(module.double_blocks) else None
    if double is not None and not (isinstance(double.img_mlp, nn.Sequential) and len(double.img_mlp) == 3):
        raise ValueError("strategy 'tensor' cuts ComfyUI's Flux.1, not this Flux variant (Flux.2) yet: use cfg, "
                         "batch, ulysses or ring for it")
    plan = {}
    for stream in ("img", "txt"):
        plan.update({f"double_blocks.*.{stream}_attn.qkv": PackedColwise((1, 1, 1)),
                     f"double_blocks.*.{stream}_attn.proj": ROWWISE,
                     f"double_blocks.*.{stream}_mlp.0": COLWISE, f"double_blocks.*.{stream}_mlp.2": ROWWISE,
                     f"double_blocks.*.{stream}_mod.lin": GATHERED})
    plan["double_blocks.*"] = Divide(("num_heads",))
    if len(module.single_blocks):
        single = module.single_blocks[0]
        width, mlp = single.hidden_size, single.mlp_hidden_dim
        if single.mlp_hidden_dim_first != mlp:
            raise ValueError("strategy 'tensor' cuts ComfyUI's Flux.1, not this Flux variant (a gated MLP) yet: use "
                             "cfg, batch, ulysses or ring for it")
        plan.update({"single_blocks.*.linear1": PackedColwise((width, width, width, mlp)),
                     "single_blocks.*.linear2": PackedRowwise((width, mlp)),
                     "single_blocks.*.modulation.lin": GATHERED,
                     "single_blocks.*": Divide(("num_heads", "hidden_size", "mlp_hidden_dim", "mlp_hidden_dim_first"))})
    plan["final_layer.adaLN_modulation.1"] = GATHERED
    return plan


def _comfy_wan(module: nn.Module) -> dict:
    """ComfyUI's Wan 2.x (comfy/ldm/wan/model.py): q, k, v, o per attention, q/k RMSNorms over every head, the
    attention's `num_heads` counting them."""
    plan = {"time_projection.1": GATHERED, "blocks.*.ffn.0": COLWISE, "blocks.*.ffn.2": ROWWISE}
    for attention in ("self_attn", "cross_attn"):
        plan.update({f"blocks.*.{attention}.{name}": COLWISE for name in ("q", "k", "v", "k_img", "v_img")})
        plan.update({f"blocks.*.{attention}.{name}": NORM_ACROSS for name in ("norm_q", "norm_k", "norm_k_img")})
        plan.update({f"blocks.*.{attention}.o": ROWWISE, f"blocks.*.{attention}": Divide(("num_heads",))})
    return plan


BUILT = {"comfy_dit:flux": _comfy_flux, "comfy_dit:wan": _comfy_wan}  # plans that read the model's widths


DECLARED_BY_DIFFUSERS = ("diffusers_dit:flux",)  # families whose model class carries diffusers' `_tp_plan`
# Added to a plan: the modulation Linears (a few rows per call, so an all-gather of their output costs little).
EXTRA = {
    "diffusers_dit:flux": {"transformer_blocks.*.norm1.linear": GATHERED,
                           "transformer_blocks.*.norm1_context.linear": GATHERED,
                           "single_transformer_blocks.*.norm.linear": GATHERED, "norm_out.linear": GATHERED},
    "diffusers_dit:wan": {"condition_embedder.time_proj": GATHERED},
}


def families() -> tuple[str, ...]:
    return (*DECLARED_BY_DIFFUSERS, *PLANS, *BUILT)


def plan_for(module: nn.Module, family: str) -> dict:
    """The family's plan as {glob: style}; raises ValueError in one sentence for a family without one."""
    if family in PLANS:
        return {**PLANS[family], **EXTRA.get(family, {})}
    if family in BUILT:
        return BUILT[family](module)
    declared = getattr(type(module), "_tp_plan", None) if family in DECLARED_BY_DIFFUSERS else None
    if not declared:
        raise ValueError(f"strategy 'tensor' has no tensor split for {family.split(':', 1)[-1]} models yet: use "
                         "cfg, batch, ulysses or ring for it")  # the host's check_family said so before any work
    return {**{path: _style(style) for path, style in declared.items()}, **EXTRA.get(family, {})}


def _style(style):
    """A diffusers `_tp_plan` value as one of this module's styles."""
    if style in (COLWISE, ROWWISE):
        return style
    if type(style).__name__ == "PackedRowwiseParallel":
        return PackedRowwise(tuple(style.blocks) if style.blocks else None)
    raise ValueError(f"strategy 'tensor' cannot cut a layer declared as {type(style).__name__} yet")


def expand(module: nn.Module, plan: dict) -> list[tuple[str, object]]:
    """(module path, style) of every module the plan's globs name, in the model's order."""
    names = [name for name, _ in module.named_modules() if name]
    found = []
    for name in names:
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern.replace("*", "[0-9]*"))
                      and name.count(".") == pattern.count(".")), None)
        if style is not None:
            found.append((name, style))
    if not found:
        raise ValueError("the tensor plan names no layer of this model")
    return found


def _piece(total: int, degree: int, index: int, what: str) -> slice:
    if total % degree:
        raise ValueError(f"tensor {degree} does not divide {what} ({total}); choose a degree that does")
    size = total // degree
    return slice(index * size, (index + 1) * size)


def _packed(total: int, blocks, degree: int, index: int, what: str) -> torch.Tensor:
    """The indices of this rank's share of each part of a packed dimension (parts in proportion to `blocks`)."""
    whole = sum(blocks)
    sizes = [total * b // whole for b in blocks]
    if sum(sizes) != total:
        raise ValueError(f"{what}: its parts {list(blocks)} do not add up to {total}")
    pieces, start = [], 0
    for size in sizes:
        own = _piece(size, degree, index, what)
        pieces.append(torch.arange(start + own.start, start + own.stop))
        start += size
    return torch.cat(pieces)


def _share(layer: nn.Module, style, degree: int, index: int, name: str):
    """(dim, index) of the weight `layer` keeps under `style` (0: its output rows, 1: its input columns), or None
    for a style that keeps no share of a weight (Divide)."""
    if isinstance(style, Divide):
        return None
    if isinstance(style, PackedColwise):
        return 0, _packed(layer.out_features, style.blocks, degree, index, name)
    if style == NORM_ACROSS:
        return 0, _piece(layer.normalized_shape[0], degree, index, name)
    if style in (COLWISE, GATHERED):
        return 0, _piece(layer.out_features, degree, index, name)
    if isinstance(style, PackedRowwise):
        return 1, _packed(layer.in_features, _blocks(layer, style, name), degree, index, name)
    return 1, _piece(layer.in_features, degree, index, name)


def reads(module: nn.Module, plan: dict, degree: int, index: int) -> dict:
    """What rank `index` of a group of `degree` keeps of each weight the plan cuts, without reading a weight:
    {parameter path: tensor_parts.Slices}, and None for a weight the cut holds whole but apart from the module's
    parameters (a row-split layer's bias, added once after the sum). Raises ValueError as split_in_place does."""
    from ..runtime.tensor_parts import Slices, ranges_of

    kept = {}
    for name, style in expand(module, plan):
        layer = module.get_submodule(name)
        share = _share(layer, style, degree, index, name)
        if share is None:
            continue
        dim, part = share
        if getattr(layer, "weight", None) is not None:
            kept[f"{name}.weight"] = Slices(tuple(layer.weight.shape), dim, ranges_of(part))
        if getattr(layer, "bias", None) is not None:
            kept[f"{name}.bias"] = Slices(tuple(layer.bias.shape), 0, ranges_of(part)) if dim == 0 else None
    return kept


class SplitRMSNorm(nn.Module):
    """An RMSNorm over a vector split across the group: this rank's part of the weight, the mean of squares taken
    over the whole vector (one all-reduce of a number per token)."""

    def __init__(self, norm: nn.RMSNorm, part: slice, group):
        super().__init__()
        (self.full,) = tuple(norm.normalized_shape)
        self.eps, self.group = norm.eps, group
        self.weight = None if norm.weight is None else own(nn.Parameter(_taken(norm.weight, 0, part), False))

    def forward(self, x):
        squares = self.group.sum(x.float().pow(2).sum(-1, keepdim=True))
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = (x.float() * torch.rsqrt(squares / self.full + eps)).to(x.dtype)
        return out if self.weight is None else out * self.weight.to(out.dtype)


def _taken(tensor: torch.Tensor, dim: int, index) -> torch.Tensor:
    """`index` (a slice or indices) of `tensor`'s dimension `dim`, as storage of its own; a tensor read in part
    (runtime/tensor_parts.py) is that share already, checked against it."""
    from ..runtime.tensor_parts import PART, Slices, ranges_of

    part = getattr(tensor, PART, None)
    if part is None:
        kept = tensor.detach()[index] if dim == 0 else tensor.detach()[:, index]
        return kept.contiguous().clone()
    if not isinstance(part, Slices) or part.dim != dim or part.ranges != ranges_of(index):
        raise RuntimeError(f"a weight read as {part} is cut along dimension {dim} at {ranges_of(index)}: the host's "
                           "plan of what each rank reads and the worker's cut disagree")
    return tensor.detach()


def _keep(linear: nn.Linear, dim: int, index) -> None:
    """`linear` keeps `index` (a slice or indices) of its weight's `dim` (0: outputs, 1: inputs), as new storage:
    the whole weight is let go."""
    linear.weight = own(nn.Parameter(_taken(linear.weight, dim, index), requires_grad=False))
    linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]
    if linear.bias is not None and dim == 0:
        linear.bias = own(nn.Parameter(_taken(linear.bias, 0, index), requires_grad=False))


def _sum_then_bias(group, bias):
    def hook(_module, _inputs, out):
        total = group.sum(out)
        return total if bias is None else total + bias
    return hook


def _gather(group):
    def hook(_module, _inputs, out):
        return group.gather(out)
    return hook


def split_in_place(module: nn.Module, plan: dict, degree: int, index: int, group) -> dict:
    """Cuts `module` for rank `index` of a group of `degree` (the plan's layers keep their share; whole weights
    are let go). `group.sum(tensor)`: the sum over the group, the same on every rank; `group.gather(tensor)`:
    every rank's tensor joined along the last dimension in rank order. Raises ValueError before
    changing anything when the degree does not divide a cut dimension. Returns {"layers": count}."""
    cuts = expand(module, plan)
    for name, style in cuts:  # every check first: nothing is cut when one fails
        layer = module.get_submodule(name)
        if isinstance(style, Divide):
            for attribute in style.names:
                _piece(getattr(layer, attribute), degree, index, f"{name}.{attribute}")
        else:
            _share(layer, style, degree, index, name)
    attentions = [_attention_above(module, name) for name, style in cuts if style == COLWISE]
    attentions = list({id(a): a for a in attentions if a is not None}.values())
    for attention in attentions:
        _heads(attention.heads, degree)
    for name, style in cuts:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = module.get_submodule(name)
        if isinstance(style, Divide):
            for attribute in style.names:
                setattr(layer, attribute, getattr(layer, attribute) // degree)
            continue
        dim, part = _share(layer, style, degree, index, name)
        if style == NORM_ACROSS:
            setattr(parent, leaf, SplitRMSNorm(layer, part, group))
        elif dim == 0:
            _keep(layer, 0, part)
            if style == GATHERED:
                layer.register_forward_hook(_gather(group))
        else:
            bias = None if layer.bias is None else layer.bias.detach().clone()
            layer.bias = None
            _keep(layer, 1, part)
            layer.register_forward_hook(_sum_then_bias(group, bias))
    for attention in attentions:
        attention.heads = _heads(attention.heads, degree)
    return {"layers": len(cuts)}


def _attention_above(module: nn.Module, name: str):
    """The module holding the colwise layer `name`, where it counts attention heads (an int `heads`)."""
    holder = name.rpartition(".")[0]
    owner = module.get_submodule(holder) if holder else module
    return owner if isinstance(getattr(owner, "heads", None), int) else None


def _heads(heads: int, degree: int) -> int:
    if heads % degree:
        raise ValueError(f"tensor {degree} does not divide the model's {heads} attention heads; choose a degree "
                         "that does")
    return heads // degree


def _blocks(layer, style: PackedRowwise, name: str):
    blocks = style.blocks or getattr(layer, "_tp_packed_row_blocks", None)
    if not blocks:
        raise ValueError(f"{name}: a packed layer without its parts' sizes")
    return tuple(blocks)


PLAIN = (torch.float32, torch.float16, torch.bfloat16)


def check_plain_weights(module: nn.Module, family: str) -> None:
    """Raises ValueError in one sentence when a layer the plan cuts holds quantized weights (fp8 scaled, GGUF)."""
    for name, _ in expand(module, plan_for(module, family)):
        for tensor in module.get_submodule(name).parameters(recurse=False):
            if type(tensor.data) is not torch.Tensor or tensor.dtype not in PLAIN:
                raise ValueError(f"strategy 'tensor' cannot cut quantized weights yet ({name} holds "
                                 f"{type(tensor.data).__name__} {tensor.dtype}): use cfg, batch, ulysses or ring")


def check_heads(heads: int | None, degree: int) -> None:
    """Raises, before any work, when `degree` does not divide the model's attention heads."""
    if heads is not None:
        _heads(heads, degree)
