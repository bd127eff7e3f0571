"""diffusers' transformer denoisers (Flux, SD3, Wan, Qwen-Image), as data: which class, which inputs are per
row and which every share gets whole, and how one call runs.

Every one of them is called with keywords: `hidden_states` (the latents: packed tokens for Flux and
Qwen-Image, a 4-D map for SD3, 5-D frames for Wan), `timestep`, `encoder_hidden_states` (the text tokens) and
the family's own inputs. A tensor input whose first dim is the call's rows is per row unless the family names
it `shared` (Flux's positional ids are (tokens, 3): a token count equal to the rows must not cut them); a
`row_lists` input is a plain list with one entry per row (Qwen-Image's per-image shapes).

A family with a row in sequence_splits.py `DIFFUSERS` can split its token sequence over a sequence-parallel
group (Ulysses, ring): see diffusers_sequence.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

ADAPTER = "diffusers_dit"


@dataclass(frozen=True)
class Family:
    name: str  # travels with the model: "diffusers_dit:<name>"
    label: str
    classes: tuple[str, ...]  # diffusers model class names
    pipelines: tuple[str, ...]  # diffusers pipeline class names that drive it
    shared: frozenset = frozenset()
    row_lists: frozenset = frozenset()

    @property
    def sequence(self):
        """`run(model, call, group)` with the token sequence split over the group (its row in
        sequence_splits.DIFFUSERS), or None."""
        from .diffusers_sequence import runner

        return runner(self.name)

    @property
    def wire(self) -> str:
        return f"{ADAPTER}:{self.name}"


FAMILIES = (
    Family("flux", "Flux.1", ("FluxTransformer2DModel",), ("FluxPipeline",),
           shared=frozenset({"img_ids", "txt_ids", "joint_attention_kwargs"})),
    Family("sd3", "SD3 / SD3.5", ("SD3Transformer2DModel",), ("StableDiffusion3Pipeline",),
           shared=frozenset({"joint_attention_kwargs", "skip_layers"})),
    Family("wan", "Wan 2.1 / 2.2", ("WanTransformer3DModel",), ("WanPipeline", "WanImageToVideoPipeline"),
           shared=frozenset({"attention_kwargs"})),
    Family("qwen_image", "Qwen-Image", ("QwenImageTransformer2DModel",), ("QwenImagePipeline",),
           shared=frozenset({"attention_kwargs"}), row_lists=frozenset({"img_shapes", "txt_seq_lens"})),
)


def recognise(module) -> Family | None:
    """The family of a diffusers transformer, by its class (or a subclass of one); None when unknown."""
    names = {cls.__name__ for cls in type(module).__mro__}
    return next((f for f in FAMILIES if names & set(f.classes)), None)


def family_named(wire: str) -> Family:
    return next(f for f in FAMILIES if f.wire == wire)


def attention_heads(model) -> int | None:
    """The heads of every attention of a diffusers transformer (its config says them), or None."""
    return getattr(getattr(model, "config", None), "num_attention_heads", None)


@contextmanager
def record_attention(call, recorder):
    """`call`, with every attention diffusers' native backend makes in it timed (models/attention_timing.py)."""
    from .attention_timing import torch_attention_recorded

    with torch_attention_recorded(recorder):
        yield call


def forward(model, call) -> torch.Tensor:
    """Runs a diffusers transformer on a ModelCall; returns its prediction."""
    return model(hidden_states=call.x, timestep=call.t, encoder_hidden_states=call.context, return_dict=False,
                 **call.extras)[0]


def run_sequence_parallel(model, call, group) -> torch.Tensor:
    """`forward(model, call)` computed by a sequence-parallel `group` (strategies/sequence/group.py), every rank
    of which makes this same call: each runs the per-token layers on its shard of the tokens, attention through
    the group, and returns the whole output (equal to `forward` within float tolerance)."""
    family = recognise(model)
    if family is None or family.sequence is None:
        name = type(model).__name__ if family is None else family.label
        raise ValueError(f"{name} has no sequence-parallel adapter (ulysses, ring); those that do: "
                         f"{', '.join(f.label for f in FAMILIES if f.sequence)}. Use cfg or batch for this model")
    return family.sequence(model, call, group)
