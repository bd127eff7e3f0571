"""diffusers' transformers with their token sequence split over a sequence-parallel group: the diffusers host of
models/sequence_hooks.py, which applies the family's row of sequence_splits.py (`DIFFUSERS`: Flux, Wan,
Qwen-Image, SD3 / SD3.5; the rows say where each is cut and gathered, and why that is exact).

What is the host's: the call (keywords `hidden_states`, `timestep`, `encoder_hidden_states` and the family's
own), and how an attention of a marked module reaches the group:
- Most processors call `dispatch_attention_fn` from their module's globals. During the call (always restored)
  that name is replaced by a dispatcher that sends the attention issued inside a marked module to the group
  and passes every other call, from any module or thread, to diffusers' own. A marked module that issues no
  attention or two (an IP-adapter processor, a processor that does not use the dispatcher) raises instead of
  computing a wrong result; so does an attention mask, causal attention or dropout. A mask the row knows to be
  a key mask (Qwen-Image's text padding) is kept from the model and reaches the group as a key mask.
- A processor that calls torch's attention itself (SD3's JointAttnProcessor2_0: replacing torch's function
  would reach every caller in the process) is swapped for the call for the group's own (diffusers_sequence_joint.py).
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from functools import partial

import torch

from .attention_route import current
from .sequence_hooks import applied, chosen
from .sequence_splits import DIFFUSERS

DISPATCH = "dispatch_attention_fn"


def runner(family: str):
    """`run(model, call, group)` for a diffusers family with a row in sequence_splits.DIFFUSERS, else None."""
    rows = DIFFUSERS.get(family)
    return None if rows is None else partial(run_split, rows)


def run_split(rows, model, call, group) -> torch.Tensor:
    """The family's output for `call`, computed with its tokens split over `group` as its row says; the whole
    output on every rank."""
    row = chosen(rows, model)
    inputs = {"hidden_states": call.x, "timestep": call.t, "encoder_hidden_states": call.context, **call.extras}
    with applied(row, model, group, via=f"diffusers' {DISPATCH}") as split:
        with group_attention(row, split.attentions):
            return split.output(model(**split.inputs(inputs), return_dict=False)[0])


@contextmanager
def group_attention(row, attentions):
    """While inside, the attentions of the marked modules (`attentions`: (path, module, Attend)) reach the group."""
    if row.processor:
        from .diffusers_sequence_joint import group_processors

        with group_processors(row, attentions):
            yield
        return
    with ExitStack() as stack:
        namespaces = [_namespace(module) for _, module, _ in attentions]
        for namespace in {id(n): n for n in namespaces}.values():
            _install(namespace)
            stack.callback(_uninstall, namespace)
        yield


_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(module globals) -> [globals, diffusers' dispatcher, users]


def _namespace(module) -> dict:
    """The globals in which `module`'s attention processor looks up diffusers' dispatcher."""
    processor = getattr(module, "processor", None)
    namespace = getattr(type(processor).__call__, "__globals__", {})
    if DISPATCH not in namespace:
        raise ValueError(f"sequence parallel: the attention processor {type(processor).__name__} of "
                         f"{type(module).__name__} does not call diffusers' {DISPATCH}, so its attention cannot "
                         "be split; use the model's default attention processor")
    return namespace


def _install(namespace: dict) -> None:
    with _LOCK:
        entry = _INSTALLED.setdefault(id(namespace), [namespace, namespace[DISPATCH], 0])
        if entry[2] == 0:
            namespace[DISPATCH] = _dispatcher(entry[1])
        entry[2] += 1


def _uninstall(namespace: dict) -> None:
    with _LOCK:
        entry = _INSTALLED[id(namespace)]
        entry[2] -= 1
        if entry[2] == 0:
            namespace[DISPATCH] = entry[1]
            del _INSTALLED[id(namespace)]


def _dispatcher(original):
    """diffusers' `dispatch_attention_fn` (q, k, v: (B, L, H, D)), routed to the group inside marked modules."""

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *args, **kwargs):
        route = current()
        if route is None or not route.armed:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, *args, **kwargs)
        shards = route.take()
        if attn_mask is not None or is_causal or dropout_p:
            raise ValueError("sequence parallel takes no attention mask, causal attention or dropout in "
                             f"{route.module}; run this call without a sequence split")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return route.group.attention(q, k, v, shards, key_mask=route.key_mask, scale=scale).transpose(1, 2)

    return dispatch
