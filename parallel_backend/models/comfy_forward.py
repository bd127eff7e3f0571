"""A DiT's own forward (ComfyUI's `_forward`, diffusers' `forward`), stopped where it hands its prepared inputs on
(a site) and given the output to finish with: how models/comfy_dit_stages.py runs each family's preparation
(padding to the patch, positions and rotary tables, reference latents, the rope options, text refiners,
modulation approximators) and unpatchifying with the host's own code, and models/dit_stages.py diffusers'
Qwen-Image's. Nothing here imports ComfyUI or diffusers: it works on the host's model object through its
attribute names.

Sites: a method the forward hands its inputs to (`forward_orig`: Flux, Wan; `forward_core_with_concat`: SD3;
`_process_transformer_blocks`: LTX-Video), an instance attribute standing over the method for the call's duration
as sequence_hooks.py's method sites do; the first block of a block list (Qwen-Image, Lumina 2: no such method;
Chroma and HunyuanVideo, whose forward_orig embeds the tokens itself), a forward pre-hook. `recorded` keeps a
module's output on the way (Chroma's modulation approximator); `emptied` and `input_replaced` let a stage run
the forward past layers it does not hold (Lumina 2). All are removed when the call ends, even a failed one.
A family's tokens, context, counts and finish each need what its forward prepares: `once_per_call` runs that
preparation once per call while `one_call` is open (the pipefusion runner opens it around a call), not once for
each (the forward up to the site embeds the text, runs Chroma's approximator, HunyuanVideo's text refiner,
Lumina's refiners).
SD3's MMDiT has no `_forward`: its `forward` is the same (it goes through no wrappers).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .comfy_dit import name_arguments


_PREPARED: ContextVar[dict | None] = ContextVar("tandem_prepared_inputs", default=None)


@contextmanager
def one_call():
    """While inside, a `once_per_call` preparation runs once for each (model, call, arguments), its result shared;
    the results are dropped on leaving."""
    token = _PREPARED.set({})
    try:
        yield
    finally:
        _PREPARED.reset(token)


def once_per_call(prepare):
    """`prepare(model, call, ...)`, run once per call inside `one_call` (every time outside it). Its callers
    read the result and do not change it."""

    @functools.wraps(prepare)
    def prepared(model, call, *args, **kwargs):
        memo = _PREPARED.get()
        if memo is None:
            return prepare(model, call, *args, **kwargs)
        key = (prepare, id(model), id(call), args, tuple(sorted(kwargs.items())))  # both alive while it is open
        if key not in memo:
            memo[key] = prepare(model, call, *args, **kwargs)
        return memo[key]

    return prepared


class _Reached(Exception):
    """Raised where `_forward` hands its prepared inputs on (a site): those inputs, by name."""

    def __init__(self, named: dict):
        super().__init__("site reached")
        self.named = named


@contextmanager
def method_as(model, name: str, function):
    """`model.<name>` is `function` while inside (an instance attribute over the method)."""
    setattr(model, name, function)
    try:
        yield
    finally:
        delattr(model, name)


def forward_orig_as(model, function):
    """`model.forward_orig` is `function` while inside (Flux, Wan, Chroma, HunyuanVideo: the last stage's output)."""
    return method_as(model, "forward_orig", function)


def at_method(name: str):
    """A site: `_forward` stops where it calls the model's method `name`."""

    @contextmanager
    def site(model):
        original = getattr(model, name)

        def reached(*args, **kwargs):
            raise _Reached(name_arguments(original, args, kwargs))

        with method_as(model, name, reached):
            yield name

    return site


at_forward_orig = at_method("forward_orig")  # Flux, Wan


def at_first_of(blocks: str):
    """A site: the forward stops where it calls the first block of the list `blocks`, by a forward pre-hook."""

    @contextmanager
    def site(model):
        first = getattr(model, blocks)[0]

        def reached(module, args, kwargs):
            raise _Reached(name_arguments(first.forward, args, kwargs))

        handle = first.register_forward_pre_hook(reached, with_kwargs=True)
        try:
            yield f"{blocks}.0"
        finally:
            handle.remove()

    return site


at_first_block = at_first_of("transformer_blocks")  # Qwen-Image: no forward_orig


@contextmanager
def emptied(model, names: tuple[str, ...]):
    """`model`'s module lists `names` hold no modules while inside: `_forward` runs past them (a stage that does
    not use what they compute, and does not hold their weights)."""
    saved = {name: getattr(model, name) for name in names}
    for name in names:
        setattr(model, name, torch.nn.ModuleList())
    try:
        yield
    finally:
        for name, modules in saved.items():
            setattr(model, name, modules)


@contextmanager
def input_replaced(module, value):
    """`module`'s first positional input is `value` while inside (a forward pre-hook)."""
    handle = module.register_forward_pre_hook(lambda m, args: (value, *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recorded(module):
    """While inside, `module`'s latest output is kept in the list yielded (its one item)."""
    kept = []

    def keep(_, args, output):
        kept[:] = [output]

    handle = module.register_forward_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()


def forward(model, call):
    """The model's `_forward` (its `forward` where it has none: SD3) on `call`'s inputs, as comfy_dit.forward
    calls the model (without its wrappers)."""
    extras = dict(call.extras)
    extras.setdefault("transformer_options", {})
    return getattr(model, "_forward", model.forward)(call.x, call.t, context=call.context, **extras)


def inputs(model, call, takes: frozenset, label: str, site=at_forward_orig, run=forward) -> dict:
    """What the model's forward (`run(model, call)`: ComfyUI's `_forward` unless given) hands on at `site` for
    `call`, by name (Flux: img, img_ids, txt, txt_ids, timesteps, y, ...). An input outside `takes` that is given
    (a ControlNet's residuals, a VACE context, a reference latent of Wan's, what a later ComfyUI adds) raises:
    the family's layers would compute without it."""
    with site(model) as where:
        try:
            run(model, call)
        except _Reached as stop:
            named = stop.named
            extra = [name for name, value in named.items() if name not in takes and _given(value)]
            if extra:
                raise ValueError(f"pipefusion does not run {label} with {', '.join(sorted(extra))} (given to "
                                 f"{type(model).__name__}'s {where}); use cfg, batch or ulysses") from None
            return named
    raise RuntimeError(f"{type(model).__name__}'s forward returned without reaching {where}")


def _given(value) -> bool:
    return value is not None and not (isinstance(value, (list, tuple, dict)) and not value)
