"""The one mechanism that applies a family's sequence split (a row of models/sequence_splits.py) to a model for
one call: module hooks (and, for a method, an instance attribute over it) cut the row's inputs and outputs,
mark the attention modules whose attentions the group computes, and gather the output; everything is removed
when the call ends, even a failed one. No host is imported: the host adapter calls the model and routes its
attention entry point to `attention_route.current()`.

    with applied(row, model, group, via="...") as split:
        out = split.output(model(**split.inputs(inputs)))
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager

import torch

from .attention_route import ROUTE, Route
from .sequence_splits import Attend, Cut, SequenceSplit

RETURN = "return"


def attribute(obj, path: str):
    """`obj`'s attribute at a dotted path ("config.num_attention_heads", "blocks.-1"); None where one is absent."""
    for name in path.split(".") if path else ():
        try:
            obj = obj[int(name)] if name.lstrip("-").isdigit() else getattr(obj, name, None)
        except IndexError:
            return None
        if obj is None:
            return None
    return obj


def chosen(rows: tuple[SequenceSplit, ...], model) -> SequenceSplit:
    """The first of a family's rows whose `when` holds for `model`."""
    return next(row for row in rows if not row.when or attribute(model, row.when))


def sites(model, pattern: str) -> list[tuple[str, object]]:
    """(path, object) of every module or method of `model` matching `pattern` ("*": every child), in order."""
    found = [("", model)]
    for name in pattern.split("."):
        found = [(f"{path}.{key}".lstrip("."), child) for path, obj in found
                 for key, child in (enumerate(obj) if name == "*" else [(name, attribute(obj, name))])
                 if child is not None]
    return found


def per_token(table: torch.Tensor, length: int) -> torch.Tensor:
    """A table per frame (B, F, ...) spread over the frame's tokens as Wan's `repeat_e` does; per token as it is."""
    frames = table.shape[1]
    if frames == length:
        return table
    repeats = length // frames + (length % frames > 0)
    return torch.repeat_interleave(table, repeats, dim=1)[:, :length]


class SplitCall:
    """One call's split: the streams' lengths as the cuts find them, and the cut, the key masks and the gather."""

    def __init__(self, row: SequenceSplit, model, group, via: str):
        self.row, self.model, self.group = row, model, group
        self.lengths: dict[str, int] = {}
        self.rows: dict[str, tuple[int, torch.device]] = {}  # the rows and device of a stream's first tensor
        self.pads: dict[str, int] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.joint_masks: dict[tuple, torch.Tensor | None] = {}
        self.route = Route(group, via=via)
        self.attentions = [(path, module, attend) for attend in row.attend
                           for path, module in sites(model, attend.modules)]

    def check(self) -> None:
        """Raises, before any work, on a model this row cannot split."""
        row, name = self.row, type(self.model).__name__
        if row.classes and name not in row.classes:
            raise ValueError(f"sequence parallel splits {row.label} ({', '.join(row.classes)}), not {name}; use cfg "
                             "or batch")
        for path, what in row.refuse_model:
            if attribute(self.model, path):
                raise ValueError(f"sequence parallel does not split a {row.label} with {what}; use cfg or batch")
        if not self.attentions:
            raise ValueError(f"this {row.label} model has no {', '.join(a.modules for a in row.attend)}: no attention "
                             "to split; use cfg or batch")
        self.group.check_heads(int(attribute(self.model, row.heads)))

    def shards(self, streams):
        streams = (streams,) if isinstance(streams, str) else streams
        missing = [s for s in streams if s not in self.lengths]
        if missing:
            raise RuntimeError(f"sequence parallel: {self.row.label}'s {', '.join(missing)} tokens are used before "
                               "any of them is cut (models/sequence_splits.py: a site's order)")
        return self.group.shards(*(self.lengths[s] for s in streams))

    def cut(self, value, cut: Cut, label: str):
        """`value` (a tensor, a list of them or None) as this rank holds it."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return type(value)(self.cut(v, cut, label) for v in value)
        if cut.ndim is not None and value.dim() != cut.ndim:
            return value
        if cut.per_frame:
            if value.shape[cut.dim] == 1:
                return value
            value = per_token(value, self.lengths[cut.stream])
        if isinstance(cut.stream, str):
            value = self._measure(cut.stream, value, cut.dim)
        shards = self.shards(cut.stream)
        if value.shape[cut.dim] != shards.length:
            raise ValueError(f"sequence parallel: {label} covers {value.shape[cut.dim]} tokens along dim {cut.dim}; "
                             f"the {'+'.join(cut.stream) if isinstance(cut.stream, tuple) else cut.stream} sequence "
                             f"has {shards.length}")
        return shards.cut(value, self.group.index, cut.dim)

    def _measure(self, stream: str, value: torch.Tensor, dim: int) -> torch.Tensor:
        """Takes the stream's length from its first tensor (padding a short one where the row says so)."""
        if stream in self.lengths:
            return value
        length, degree = value.shape[dim], self.group.degree
        if length < degree and self.row.short.get(stream) == "refuse":
            raise ValueError(f"{self.row.label}'s {length} {stream} tokens cannot be split over {degree} ranks (each "
                             "needs at least one): use a smaller ulysses / ring degree for this size")
        self.rows[stream] = (value.shape[0], value.device)
        if length < degree and self.row.short.get(stream) == "pad":
            self.pads[stream] = degree - length
            shape = list(value.shape)
            shape[dim] = degree - length
            value = torch.cat([value, value.new_zeros(shape)], dim)
        self.lengths[stream] = value.shape[dim]
        return value

    def inputs(self, named: dict) -> dict:
        """The call's own inputs (by name) as this rank passes them: refused ones raise, key masks are taken
        out for the group, per-token ones are cut."""
        named = dict(named)
        self.refuse(named, "")
        given = {name: named.pop(name, None) for name in self.row.key_masks}
        for name, cut in self.row.cuts.get("", {}).items():
            _write(named, name, self.cut(_read(named, name), cut, name))
        for name, stream in self.row.key_masks.items():
            self._key_mask(name, stream, given[name])
        return named

    def _key_mask(self, name: str, stream: str, mask) -> None:
        (rows, device), pads = self.rows[stream], self.pads.get(stream, 0)
        if mask is None and not pads:
            return
        if mask is None:
            mask = torch.ones(rows, self.lengths[stream] - pads, dtype=torch.bool, device=device)
        elif tuple(mask.shape) != (rows, self.lengths[stream] - pads):
            raise ValueError(f"{name} is {tuple(mask.shape)}; it must be (rows, {stream} tokens) = "
                             f"{(rows, self.lengths[stream] - pads)}")
        mask = mask.to(torch.bool)
        self.masks[stream] = torch.cat([mask, mask.new_zeros(rows, pads)], 1) if pads else mask

    def key_mask(self, streams: tuple[str, ...]):
        """The group's key mask over the joint sequence of `streams` (B, L) bool, None when every key takes part."""
        if streams not in self.joint_masks:
            like = next((self.masks[s] for s in streams if s in self.masks), None)
            mask = None if like is None else torch.cat(
                [self.masks.get(s, like.new_ones(like.shape[0], self.lengths[s])) for s in streams], 1)
            self.joint_masks[streams] = None if mask is None or bool(mask.all()) else mask
        return self.joint_masks[streams]

    def refuse(self, inputs, at: str) -> None:
        for refused in self.row.refuse:
            if refused.at == at and present(_read(inputs, refused.name)):
                where = refused.name if not refused.name.startswith(RETURN) else f"{at} {refused.name}"
                raise ValueError(f"sequence parallel does not split a {self.row.label} call with {refused.what} "
                                 f"({where}); use cfg or batch")

    def output(self, out):
        """The call's output, gathered when the row gathers it there."""
        return self.gather(out) if self.row.gather.at == "" else out

    def gather(self, out):
        return self.group.all_gather(out, self.shards(self.row.gather.stream), self.row.gather.dim)

    def arm(self, path: str, module, attend: Attend) -> None:
        cuts = [self.shards(attend.streams)]
        if attend.also and attribute(module, attend.also_if):
            cuts.append(self.shards(attend.also))
        self.route.shards = cuts[0] if len(cuts) == 1 else tuple(cuts)
        self.route.key_mask = self.key_mask(attend.streams)
        if self.route.key_mask is not None and len(cuts) > 1:
            raise ValueError(f"sequence parallel: {path} issues two attentions, and a key mask is known for one cut "
                             "only; run this call without a sequence split")
        self.route.arm(path)


@contextmanager
def applied(row: SequenceSplit, model, group, via: str):
    """While inside, `model` runs split as `row` says over `group` (strategies/sequence/group.py) for one call;
    yields the SplitCall whose `inputs` and `output` the host passes its call's through. via: the host's
    attention entry point, for messages."""
    split = SplitCall(row, model, group, via)
    split.check()
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for at in _site_patterns(row):
            for path, site in sites(model, at):
                stack.enter_context(_hooked(split, at, path, site))
        if row.gather.at and not sites(model, row.gather.at):
            raise ValueError(f"this {row.label} model has no {row.gather.at} to gather its output at")
        for path, module, attend in split.attentions:  # after the cuts: a block's cut precedes its attention
            stack.enter_context(module.register_forward_pre_hook(
                lambda m, args, path=path, attend=attend: split.arm(path, m, attend)))
            stack.enter_context(module.register_forward_hook(lambda *_: split.route.disarm()))
        token = ROUTE.set(split.route)
        stack.callback(ROUTE.reset, token)
        yield split


def _site_patterns(row: SequenceSplit) -> list[str]:
    """Every site other than the call's own where the row cuts, sets, refuses or gathers, in the row's order."""
    patterns = [*row.cuts, *row.lengths, *(r.at for r in row.refuse), row.gather.at]
    return [p for p in dict.fromkeys(patterns) if p]


@contextmanager
def _hooked(split: SplitCall, at: str, path: str, site):
    """`site` (a module: hooks; a method: an instance attribute over it) with the row's work at `at` in place."""
    row = split.row
    cuts = row.cuts.get(at, {})
    before = {k: c for k, c in cuts.items() if not k.startswith(RETURN)}
    after = {k: c for k, c in cuts.items() if k.startswith(RETURN)}
    lengths, gathers = row.lengths.get(at, {}), row.gather.at == at

    def pre(function, args, kwargs):
        inputs = _Inputs(function, args, kwargs)
        split.refuse(inputs, at)
        for name, stream in lengths.items():
            inputs[name] = split.lengths[stream]
        for name, cut in before.items():
            _write(inputs, name, split.cut(_read(inputs, name), cut, f"{path} {name}"))
        return inputs.arguments()

    def post(out):
        split.refuse({RETURN: out}, at)
        box = {RETURN: out}
        for name, cut in after.items():
            _write(box, name, split.cut(_read(box, name), cut, f"{path} {name}"))
        return split.gather(box[RETURN]) if gathers else box[RETURN]

    if isinstance(site, torch.nn.Module):
        refused = {r.name.startswith(RETURN) for r in row.refuse if r.at == at}
        with ExitStack() as stack:
            if before or lengths or False in refused:
                stack.enter_context(site.register_forward_pre_hook(
                    lambda module, args, kwargs: pre(module.forward, args, kwargs), with_kwargs=True))
            if after or gathers or True in refused:
                stack.enter_context(site.register_forward_hook(lambda module, args, out: post(out)))
            yield
        return
    owner, name = attribute(split.model, path.rpartition(".")[0]), path.rpartition(".")[2]

    def replaced(*args, **kwargs):
        args, kwargs = pre(site, args, kwargs)
        return post(site(*args, **kwargs))

    setattr(owner, name, replaced)
    try:
        yield
    finally:
        delattr(owner, name)


class _Inputs:
    """One call's inputs by name (a catch-all **kwargs flattened in), to read and replace."""

    _signatures: dict = {}

    def __init__(self, function, args, kwargs):
        key = getattr(function, "__func__", function)
        if key not in self._signatures:
            self._signatures[key] = inspect.signature(function)
        self.bound = self._signatures[key].bind(*args, **kwargs)
        parameters = self.bound.signature.parameters
        self.catch_all = next((n for n, p in parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def get(self, name, default=None):
        if name in self.bound.signature.parameters and name != self.catch_all:
            return self.bound.arguments.get(name, default)
        return self.bound.arguments.get(self.catch_all, {}).get(name, default)

    def __setitem__(self, name, value) -> None:
        if name in self.bound.signature.parameters and name != self.catch_all:
            self.bound.arguments[name] = value
        elif self.catch_all is None:
            raise TypeError(f"sequence parallel: a split input {name!r} is not an argument of {self.bound.signature}")
        else:
            self.bound.arguments[self.catch_all] = {**self.bound.arguments.get(self.catch_all, {}), name: value}

    def arguments(self):
        return self.bound.args, self.bound.kwargs


def _read(inputs, key: str):
    """An input ("pe") or an item of one ("pe.0"); None where absent."""
    name, _, item = key.partition(".")
    value = inputs.get(name)
    if item and value is not None:
        return value[int(item)] if int(item) < len(value) else None
    return value


def _write(inputs, key: str, value) -> None:
    name, _, item = key.partition(".")
    if not item:
        if inputs.get(name) is not None:
            inputs[name] = value
        return
    whole = inputs.get(name)
    if whole is not None and int(item) < len(whole):
        inputs[name] = (*whole[:int(item)], value, *whole[int(item) + 1:])


def present(value) -> bool:
    """Whether an input a row refuses is there: None and an empty list are not."""
    return value is not None and not (isinstance(value, (list, tuple)) and not value)
