"""The worker side of pipefusion: one stage of a DiT's blocks, run patch by patch, with every attention's keys
and values of the whole sequence kept per stream.

A call of `patches` patches: the first stage embeds the tokens and cuts them (patches.Patches); for each patch in
order, a stage takes it (from the embedders, or from the stage before), runs its blocks on it and hands it on, so
stage s works on patch m while stage s-1 works on patch m+1. In each routed attention (the family's `Attend`
modules) the patch's queries attend to the keys and values of the whole sequence held for that attention: the
rows of this call's earlier patches were written fresh as they passed, the rest are from the call before. A call
of one patch (warm-up, or the host finding no complete cache) computes the whole sequence exactly and writes
every row.

A block whose modulation projections another stage holds (cut.py: `lent`) runs with stand-ins in their place
that return the vectors the holding stage computed at the call's start, from the call's time embedding, and
sent: one exchange per stage and call, before any patch's.

Point-to-point order: at the call's start every stage posts its modulation exchange (the sends and receives of
the lent blocks' vectors, in block order: both sides walk the same list), then the receives of all its patches,
in patch order, and its sender sends them in that order (NCCL pairs by issue order); every send and receive goes
through `primitives.exchange`; a wait never synchronizes the device (on CUDA a wait only orders the streams).
Every exchange is waited for before the call returns: nothing is in flight between calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from contextlib import ExitStack, contextmanager

import torch

from ...models import comfy_dit_stages, dit_stages
from ...models.attention_route import ROUTE, Route
from ...models.comfy_forward import one_call
from ...models.sequence_hooks import attribute, sites
from ...models.stages import Activations, Placement, modules_of, profile, synchronize, weights_of
from ...runtime import primitives
from ...runtime.messages import Computed
from .messages import WAITS, PipeCall, PlaceBlocks, ProfileBlocks
from .patches import Patches

FAMILIES = {**dit_stages.FAMILIES, **comfy_dit_stages.FAMILIES}  # every family pipefusion cuts, by wire name


@dataclass(frozen=True)
class Rows:
    """Where a routed attention's patch sits: the attention (its module path), the patch's positions in its
    joint sequence (None: the whole sequence) and how many stand-in tokens lead its own (the family's
    `placeholder`: they join no attention, their output is zeros)."""

    path: str
    positions: torch.Tensor | None
    lead: int = 0


class KeyValues:
    """One stream's keys and values (B, H, L, D) per routed attention, over the whole joint sequence. The
    sequence route's `group`: the diffusers dispatcher or ComfyUI's attention override hands it each routed
    attention (q, k, v: (B, H, l, D))."""

    def __init__(self):
        self.held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shape = None  # (rows, tokens per stream) of the whole-sequence call that wrote them

    def attention(self, q, k, v, shards, key_mask=None, scale=None):
        path, positions, lead = shards.path, shards.positions, shards.lead
        if key_mask is not None:
            raise ValueError(f"pipefusion takes no attention mask in {path}")
        if lead:
            out = self.attention(q[:, :, lead:], k[:, :, lead:], v[:, :, lead:], Rows(path, positions), scale=scale)
            return torch.cat((out.new_zeros(*out.shape[:2], lead, out.shape[3]), out), 2)
        if positions is None:  # the whole sequence: exact, and every row written
            self.held[path] = (k.contiguous(), v.contiguous())
            keys, values = k, v
        else:
            keys, values = self.held.get(path, (None, None))
            if keys is None:
                raise RuntimeError(f"pipefusion: {path} holds no keys and values for this stream (a patched call "
                                   "follows a whole-sequence one)")
            index = positions.to(keys.device)
            keys.index_copy_(2, index, k)
            values.index_copy_(2, index, v)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale)

    def check(self, shape: tuple, patches: int) -> None:
        """Before a call of `shape` (rows, tokens per stream): one patch writes every row; a patched call needs the
        rows of a whole-sequence call of that shape."""
        if patches == 1:
            self.held, self.shape = {}, shape
        elif self.shape != shape:
            raise RuntimeError(f"pipefusion: a call of {patches} patches and shape {shape} follows keys and values of "
                               f"shape {self.shape} on this stream (the host runs a whole-sequence call first)")


class Received(torch.nn.Module):
    """Stands in for a modulation projection another stage computed: returns its vectors (rows, out), shaped as
    the projection's input's rows."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.reshape(*x.shape[:-1], self.value.shape[-1])


class PipeRunner:
    def __init__(self, module: torch.nn.Module, family: str, device: torch.device):
        self.module, self.device = module, device
        self.family = FAMILIES[family]
        self.layers = self.family.layers(module)
        self.placement = Placement(module, device)
        self.attends = [(path, attention, attend) for attend in self.family.attends()
                        for path, attention in sites(module, attend.modules)]
        self.plan, self.lent = None, ()
        self.job, self.streams = None, {}
        self.patch = 0  # the patch being run (the routed attentions' positions)

    def place_whole(self) -> None:
        """The whole model on this device (a plain forward runs next); the stage returns on the next call."""
        if self.placement.placed != "whole":
            self.placement.place([], whole=True)

    def _place_stage(self) -> None:
        family, plan = self.family, self.plan
        keep = [*family.shared(self.module), *modules_of(self.mine), *self._modulations(holder=plan.stage)]
        keep += family.first(self.module) if plan.prev is None else []
        keep += family.last(self.module) if plan.next is None else []
        self.placement.place(keep, drop=self._modulations(owner=plan.stage))

    def _modulations(self, owner: int | None = None, holder: int | None = None) -> list[torch.nn.Module]:
        """The modulation projections of the lent blocks of stage `owner`, or that stage `holder` holds."""
        return [module for i, o, h in self.lent if owner in (None, o) and holder in (None, h)
                for _, module in self.family.modulations(self.layers[i])]

    def profile(self, message: ProfileBlocks) -> dict:
        """Times every block on this device over the whole sequence. Weights in host memory (a stage cut, as it
        loads) reach the device a block at a time, outside the timed runs, beside the embedders and the output
        layers, so the device never holds them all."""
        self.placement.to_host()
        call = message.call.to(self.device)
        self.family.refuse(call)
        family, on_device = self.family, self.placement.on_device
        around = [*family.shared(self.module), *family.first(self.module), *family.last(self.module)]
        with torch.inference_mode(), one_call(), on_device([m for m in around if isinstance(m, torch.nn.Module)]):
            ctx = family.context(self.module, call)
            measured = profile(self.layers, ctx, family.tokens(self.module, call), repeats=2,
                               around=lambda layer: on_device([m for m in layer.modules if m is not None]))
        self.plan = None
        return {"names": measured.names, "layer_seconds": measured.seconds, "crossing": measured.crossing,
                "layer_bytes": [weights_of(layer.modules) for layer in self.layers],
                "movable_bytes": [weights_of([m for _, m in family.modulations(layer)]) for layer in self.layers],
                "held_bytes": tuple(weights_of(part(self.module))
                                    for part in (family.shared, family.first, family.last))}

    def setup(self, message: PlaceBlocks) -> dict:
        plan = message.plan
        bounds = [0, *plan.cuts, len(self.layers)]
        self.mine = self.layers[bounds[plan.stage]:bounds[plan.stage + 1]]
        self.plan, self.streams, self.job, self.lent = plan, {}, None, message.lent
        self._place_stage()
        return {"layers": [layer.name for layer in self.mine]}

    # ---- one call ----------------------------------------------------------------------------------------

    def call(self, message: PipeCall) -> Computed:
        plan, family = self.plan, self.family
        if plan is None:
            raise RuntimeError("this worker has no stage assigned (the host sends a stage setup first)")
        if not self.placement.staged:
            self._place_stage()
        call = message.call.to(self.device)
        family.refuse(call)
        if call.job != self.job:
            self.job, self.streams = call.job, {}
        cache = self.streams.setdefault(call.stream, KeyValues())
        stats = {"compute": 0.0, "wait": 0.0, "bytes": 0, "waits": dict.fromkeys(WAITS, 0.0)}
        started = time.perf_counter()
        with torch.inference_mode(), one_call():  # the family's forward prepares the call once for all below
            ctx = family.context(self.module, call)
            received, pending = self._exchange_modulation(ctx, stats)
            first = family.tokens(self.module, call) if plan.prev is None else None
            patches = Patches(family.count(self.module, call), message.patches)
            cache.check((call.rows, tuple(patches.lengths.items())), patches.count)
            pieces = self._pieces(first, patches) if first is not None else self._receive(call, patches)
            done, handles = [], []
            with self._routed(cache, patches), self._stand_ins(received):
                for m in range(patches.count):
                    acts = self._arrived(pieces, m, stats)
                    if pending:  # this stage's lent blocks' vectors: needed from its first block on
                        self._waited(pending, stats, "modulation")
                        pending = []
                    mark = time.perf_counter()
                    self.patch = m
                    patch_ctx = ctx if patches.count == 1 else family.patch(
                        ctx, torch.tensor(patches.positions(m, family.joint)))
                    for layer in self.mine:
                        layer.run(patch_ctx, acts)
                    stats["compute"] += time.perf_counter() - mark
                    if plan.next is None:
                        done.append(acts.h)
                        continue
                    sent = [t for t in acts.tensors() if t.numel()]
                    handles += primitives.exchange([(plan.next, t) for t in sent], [], self.device)[1]
                    stats["bytes"] += sum(t.numel() * t.element_size() for t in sent)
            self._waited(handles, stats, "sends")
            out = family.finish(self.module, call, ctx, torch.cat(done, 1)) if plan.next is None else None
        synchronize(self.device)
        return Computed(out, stats["compute"], stats["wait"], stats["bytes"],
                        extra={"layers": len(self.mine), "weights_bytes": self.placement.held_bytes(),
                               "patches": patches.count, "waits": stats["waits"],
                               "seconds": time.perf_counter() - started,
                               "first_patch_tokens": (patches.tokens(0), sum(patches.lengths.values()))})

    def _exchange_modulation(self, ctx, stats: dict) -> tuple[dict, list]:
        """Computes the vectors of the lent blocks' modulation this stage holds and sends them to their blocks'
        stages; posts the receives of its own lent blocks'. ({(block, path): its vectors' buffer}, handles)."""
        if not self.lent:  # nothing lent: modulation_input may not even apply (Chroma's temb is no tensor)
            return {}, []
        plan, x = self.plan, self.family.modulation_input(ctx)
        stage = plan.stage
        own = plan.prev + 1 if plan.prev is not None else plan.next - 1 if plan.next is not None else 0
        sends, receives, paths = [], [], []
        mark = time.perf_counter()
        for i, owner, holder in self.lent:
            for path, module in self.family.modulations(self.layers[i]):
                shape = (*x.shape[:-1], module.out_features)
                if holder == stage:
                    out = module(x)
                    if tuple(out.shape) != shape or out.dtype != x.dtype:
                        raise RuntimeError(f"pipefusion: {self.layers[i].name}.{path} gives {tuple(out.shape)} "
                                           f"{out.dtype}, not the {shape} {x.dtype} its stage expects")
                    sends.append((own - stage + owner, out))  # a chain's ranks run in stage order
                elif owner == stage:
                    receives.append((own - stage + holder, shape, x.dtype))
                    paths.append((i, path))
        stats["compute"] += time.perf_counter() - mark
        if not sends and not receives:
            return {}, []
        buffers, handles = primitives.exchange(sends, receives, self.device)
        stats["bytes"] += sum(t.numel() * t.element_size() for _, t in sends)
        return dict(zip(paths, buffers)), handles

    @contextmanager
    def _stand_ins(self, received: dict):
        """While inside, each lent block's modulation projections are stand-ins returning the vectors received."""
        swapped = []
        try:
            for (i, path), value in received.items():
                parent, _, name = path.rpartition(".")
                owner = self.layers[i].modules[0].get_submodule(parent)
                swapped.append((owner, name, getattr(owner, name)))
                setattr(owner, name, Received(value))
            yield
        finally:
            for owner, name, module in reversed(swapped):
                setattr(owner, name, module)

    def _waited(self, handles: list, stats: dict, what: str) -> None:
        """Waits for `handles`, counting the time as waited for `what` (one of WAITS)."""
        mark = time.perf_counter()
        primitives.wait_all(handles)
        waited = time.perf_counter() - mark
        stats["wait"] += waited
        stats["waits"][what] += waited

    def _pieces(self, acts: Activations, patches: Patches) -> list:
        """The first stage's patches of the embedded whole sequence."""
        out = []
        for m in range(patches.count):
            ranges = patches.ranges(m)
            out.append(Activations.from_tensors(
                [t[:, ranges[s].start:ranges[s].stop] for s, t in zip(self.family.streams, acts.tensors())]))
        return out

    def _receive(self, call, patches: Patches) -> list:
        """Posts every patch's receives from the stage before, in patch order; [(buffers, handles)] per patch."""
        rows, (width, dtype) = call.rows, self.family.width(self.module, call)
        out = []
        for m in range(patches.count):
            ranges = patches.ranges(m)
            specs = [(self.plan.prev, (rows, len(ranges[s]), width), dtype) for s in self.family.streams]
            out.append(primitives.exchange([], specs, self.device))
        return out

    def _arrived(self, pieces: list, m: int, stats: dict) -> Activations:
        piece = pieces[m]
        if isinstance(piece, Activations):
            return piece
        buffers, handles = piece
        self._waited(handles, stats, "fill" if m == 0 else "later")
        return Activations.from_tensors(list(buffers))

    @contextmanager
    def _routed(self, cache: KeyValues, patches: Patches):
        """While inside, the routed attentions of this stage's blocks go to `cache`, at the positions of the patch
        `self.patch` names."""
        route = Route(cache, via="pipefusion")
        mine = [layer.name for layer in self.mine]  # a routed attention is a block of this stage or inside one
        attends = [(p, a, attend) for p, a, attend in self.attends
                   if any(p == name or p.startswith(name + ".") for name in mine)]
        rows = {attend: [self._rows(patches, m, attend) for m in range(patches.count)] for _, _, attend in attends}
        also = {attend: [self._rows(patches, m, replace(attend, streams=attend.also))[0] for m in range(patches.count)]
                for _, _, attend in attends if attend.also}
        with ExitStack() as stack:
            for path, attention, attend in attends:
                def arm(module, args, path=path, attend=attend):
                    positions, lead = rows[attend][self.patch]
                    route.shards = Rows(path, positions, lead)
                    if attend.also and attribute(module, attend.also_if):  # SD3.5's second, image-only attention
                        route.shards = (route.shards, Rows(f"{path}:also", also[attend][self.patch]))
                    route.arm(path)

                stack.enter_context(attention.register_forward_pre_hook(arm))
                stack.enter_context(attention.register_forward_hook(lambda *_: route.disarm()))
            token = ROUTE.set(route)
            stack.callback(ROUTE.reset, token)
            stack.enter_context(self.family.routing(attends))
            yield

    def _rows(self, patches: Patches, m: int, attend) -> tuple:
        """(positions, lead) of patch `m` in `attend`'s joint sequence: (None, 0) for the whole sequence; a lead of 1
        where the family stands in for a stream the patch holds none of (its `placeholder`)."""
        if patches.count == 1:
            return None, 0
        empty = any(not len(tokens) for tokens in patches.ranges(m).values())
        return torch.tensor(patches.positions(m, attend.streams)), int(empty and attend.modules in self.family.placeholder)
