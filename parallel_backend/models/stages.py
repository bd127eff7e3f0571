"""A denoiser as a sequence of layers that can be cut into stages (for asyncdiff), family-independent.

A family adapter (diffusers_unet, comfy_unet; listed in stage_families.py) describes its model as:
- `layers(model) -> list[Layer]`: the model's work in execution order, at resnet / attention-layer grain.
  Each layer reads and updates the activations: the hidden state `h` and the stack of skip connections
  (pushed on the way down, popped on the way up).
- `prepare(model, call, timestep) -> Context`: what every stage computes for itself from the call's inputs
  (the timestep embedding, the text context); cheap next to the layers.
- `shared_modules(model)`: the modules `prepare` uses (every stage holds them).

What crosses a cut between layers i-1 and i is the hidden state plus every skip pushed and not yet popped;
its shapes are recorded while the model is profiled, so a stage can post its receive before it needs it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Activations:
    """What flows through the layers: the hidden state and the stack of unconsumed skip connections."""

    h: torch.Tensor
    skips: list = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [self.h, *self.skips]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "Activations":
        return cls(tensors[0], list(tensors[1:]))


@dataclass
class Context:
    """Per-call inputs every stage computes for itself (family-specific fields live in `extra`)."""

    temb: torch.Tensor
    context: torch.Tensor | None
    x: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass
class Layer:
    name: str
    modules: tuple  # the torch modules whose weights this layer uses
    run: Callable[[Context, Activations], None]  # updates the activations in place


def run_layers(layers: list[Layer], ctx: Context, acts: Activations) -> Activations:
    for layer in layers:
        layer.run(ctx, acts)
    return acts


@dataclass
class Profile:
    """Measured per-layer cost and what crosses each possible cut, per row of the call (batch dim removed)."""

    names: list[str]
    seconds: list[float]
    crossing: list[list[tuple[tuple[int, ...], str]]]  # cut i (before layer i): [(shape[1:], dtype), ...]
    sizes: list[int] | None = None  # each layer's weights (bytes), where the cut weighs them (pipefusion)
    held: tuple[int, int, int] | None = None  # the weights besides the layers: every stage's, the first's, the last's
    movable: list[int] | None = None  # the part of each layer's weights any stage may hold (pipefusion's modulation)

    def specs(self, cut: int, rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((rows, *shape), getattr(torch, dtype)) for shape, dtype in self.crossing[cut]]

    def bytes_per_row(self, cut: int) -> int:
        return sum(int(torch.tensor([], dtype=getattr(torch, dtype)).element_size() * _prod(shape))
                   for shape, dtype in self.crossing[cut])


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (timing on CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(layers: list[Layer], ctx: Context, first: Activations, repeats: int = 3, around=None) -> Profile:
    """Times every layer (the fastest of `repeats` runs after one untimed run) and records the activations'
    shapes at every cut. `first`: the activations entering layer 0 (not modified). around(layer): a context
    each run of the layer is made in, outside its timing (its weights brought to the device)."""
    device = first.h.device
    times = [[] for _ in layers]
    crossing = []
    for attempt in range(repeats + 1):
        acts = Activations(first.h, list(first.skips))
        for i, layer in enumerate(layers):
            if attempt == 0:
                crossing.append([(tuple(t.shape[1:]), str(t.dtype).removeprefix("torch.")) for t in acts.tensors()])
            with around(layer) if around is not None else nullcontext():
                synchronize(device)
                started = time.perf_counter()
                layer.run(ctx, acts)
                synchronize(device)
                if attempt:
                    times[i].append(time.perf_counter() - started)
    return Profile([layer.name for layer in layers], [min(t) for t in times], crossing)


def weights_of(items) -> int:
    """The bytes of weights `items` (modules, single tensors or None) hold, each tensor counted once."""
    from ..runtime.recipe import tensor_bytes

    seen = {}
    for item in (i for i in items if i is not None):
        for t in (*item.parameters(), *item.buffers()) if isinstance(item, torch.nn.Module) else (item,):
            seen[id(t)] = t
    return sum(tensor_bytes(t) for t in seen.values())


def modules_of(layers: list[Layer]) -> list[torch.nn.Module]:
    seen, out = set(), []
    for layer in layers:
        for module in layer.modules:
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                out.append(module)
    return out


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # weights a stage can park (a meta placeholder stands in)


def _put(owner: torch.nn.Module, kind: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as `owner`'s weight `name` (kind: "_parameters", wrapped as a frozen Parameter, or "_buffers");
    returns what was put."""
    if kind == "_parameters":
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    getattr(owner, kind)[name] = tensor
    return tensor


class Placement:
    """Where a stage-cut model's weights are, used by asyncdiff's and pipefusion's stage workers. `placed`:
    "host" (as a stage cut loads it: every weight in host memory, none on the device yet), "whole" (every weight
    on the worker's device) or "stage" (a stage's modules, and the tensors named with them, on the device; every
    other weight parked in host memory, out of the module, a meta placeholder in its place: a CPU worker's parked
    weights stay views of the pool's one mapped file). From one stage to another a device never holds more than
    one stage's weights: what was parked goes back to host memory first."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        from ..runtime.worker_loop import ON_HOST

        self.module, self.device = module, device
        self.placed = "host" if module.__dict__.get(ON_HOST) else "whole"
        self.parked: dict = {}  # (module, name, "_parameters" | "_buffers") -> a weight of another stage, on the CPU
        self.placeholders: set = set()  # ids of the meta tensors standing in for them (not held, on a meta device too)

    @property
    def staged(self) -> bool:
        return self.placed == "stage"

    def place(self, keep: list, whole: bool = False, drop: list = ()) -> None:
        """Puts `keep` (modules, or single tensors such as a model's own parameter) on the device and parks every
        other weight, or, `whole`, puts every weight on the device. `drop`: modules inside kept ones whose weights
        are parked all the same (a block's modulation another stage holds)."""
        self.placed = "whole" if whole else "stage"
        if getattr(self.module, "_tandem_shared_with_host", False):
            return  # one copy shared with the host (CUDA IPC): moving would copy it
        self.unpark(to_device=whole)
        if whole:
            self.module.to(self.device)
            return
        modules = [m for m in keep if isinstance(m, torch.nn.Module)]
        kept = {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}
        kept |= {id(t) for t in keep if isinstance(t, torch.Tensor)}
        kept -= {id(t) for m in drop for t in (*m.parameters(), *m.buffers())}
        for owner in self.module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(owner, kind).items():
                    if tensor is None or id(tensor) in kept or type(tensor) not in _PLAIN:
                        continue  # a quantized layer's subclass stays where it is
                    self.parked[(owner, name, kind)] = tensor.to("cpu")
                    placeholder = torch.empty_like(tensor, device="meta")
                    self.placeholders.add(id(_put(owner, kind, name, placeholder)))
        for t in keep:
            if isinstance(t, torch.nn.Module) and drop:  # the dropped modules' placeholders stay on meta
                t._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(self.device))
            elif isinstance(t, torch.nn.Module):
                t.to(self.device)
            else:
                t.data = t.data.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def to_host(self) -> None:
        """Back to "host" from a stage: the parked weights return to the module as they are (host memory)."""
        if self.placed == "stage":
            self.unpark(to_device=False)
            self.placed = "host"

    def unpark(self, to_device: bool) -> None:
        """Puts the parked weights back into the module: on the device, or as they are (host memory)."""
        for (owner, name, kind), tensor in self.parked.items():
            getattr(owner, kind)[name] = tensor.to(self.device) if to_device else tensor
        self.parked, self.placeholders = {}, set()

    @contextmanager
    def on_device(self, modules):
        """`modules`' weights on the device for the block's duration, then the very tensors they held before back
        in place (nothing copied back): a profile brings one layer at a time to the device."""
        saved = []
        for module in modules:
            for owner in module.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(owner, kind).items():
                        if tensor is None or tensor.device == self.device or type(tensor) not in _PLAIN:
                            continue
                        saved.append((owner, kind, name, tensor))
                        _put(owner, kind, name, tensor.to(self.device))
        try:
            yield
        finally:
            for owner, kind, name, tensor in saved:
                getattr(owner, kind)[name] = tensor

    def held_bytes(self) -> int:
        """The bytes of weights the model holds on the device now (its stage's and the shared ones')."""
        from ..runtime.recipe import tensor_bytes

        return sum(tensor_bytes(t) for t in (*self.module.parameters(), *self.module.buffers())
                   if t.device == self.device and id(t) not in self.placeholders)


def describe(profile: Profile, cuts: list[int]) -> list[dict[str, Any]]:
    """Per stage: its first and last layer, its measured share of the work and what it receives."""
    bounds = [0, *cuts, len(profile.names)]
    total = sum(profile.seconds) or 1.0
    out = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out.append({"stage": k, "layers": [profile.names[a], profile.names[b - 1]], "count": b - a,
                    "share": sum(profile.seconds[a:b]) / total,
                    "receives_tensors": len(profile.crossing[a]) if k else 0,
                    "receives_bytes_per_row": profile.bytes_per_row(a) if k else 0})
    return out


class Streamed:
    """A stage's layers whose weights stay parked in host memory between calls (`Placement` parks them with the
    other stages'), brought to the device for their own run: what lets a stage hold less than its layers' weights
    (asyncdiff under sharded weights or a memory per device). In run order, the next streamed layer's copy is
    posted as one starts, so at most two streamed layers' weights are on the device at once, and each goes back
    to its placeholder when its run ends, or when the call fails. `room`: the bytes of streamed weights the device
    may hold at once (the cap less what the stage holds; None: no limit): the next copy waits for the running
    layer's weights to leave where both would not fit, so the device never holds over the cap.
    CUDA: the parked tensors are pinned once, copied on a side stream and waited for on the device (the host does
    not block; the copy runs beside the compute); each copy is marked used by the compute stream, so the allocator
    does not hand its memory on before the layer's kernels ran, and before a new copy is allocated the host waits
    for the streamed layers that ran to finish on the device: launched ahead, the host would otherwise allocate
    copies while the memory of those it dropped is still in use, over the cap. CPU workers: the device's memory is
    the host's, so the parked tensors are mounted where they are (a CPU worker's are views of the pool's mapped
    file) and nothing is copied: a CPU bench shows the held weights, not a GPU's transfer, which the plan costs."""

    def __init__(self, placement: Placement, layers: list[Layer], room: int | None = None):
        from ..runtime.recipe import tensor_bytes

        self.placement, self.device, self.room = placement, placement.device, room
        self.order = list(layers)
        self.index = {id(layer): i for i, layer in enumerate(self.order)}  # id(layer) -> its place in run order
        self.keys = {}  # id(layer) -> the parked entries (owner, name, kind) of its modules
        for layer in self.order:
            owners = {id(m) for module in layer.modules if module is not None for m in module.modules()}
            self.keys[id(layer)] = [key for key in placement.parked if id(key[0]) in owners]
        self.sizes = {layer_id: sum(tensor_bytes(placement.parked[k]) for k in keys)
                      for layer_id, keys in self.keys.items()}
        self.bytes = sum(self.sizes.values())
        self.cuda = self.device.type == "cuda" and bool(self.order)
        if self.cuda:
            for keys in self.keys.values():
                for key in keys:
                    placement.parked[key] = placement.parked[key].pin_memory()
            self.copies = torch.cuda.Stream(self.device)
        self.arriving: dict = {}  # id(layer) -> ({key: device tensor}, CUDA event or None)
        self.mounted: dict = {}  # id(layer) -> {key: the placeholder it stands over}
        self.ran: list = []  # CUDA: an event after each streamed layer run since the last copy was posted

    @contextmanager
    def call(self):
        """One call's run: the first streamed layer's copy posted; everything mounted or arriving dropped at the
        end, even when the call fails."""
        if self.order:
            self._post(0)
        try:
            yield self
        finally:
            for layer_id in list(self.mounted):
                self._unmount(layer_id)
            self.arriving, self.ran = {}, []

    def before(self, layer: Layer) -> None:
        """Before `layer` runs: where it is streamed, its weights in place (waited for) and the next one's copy
        posted."""
        if id(layer) not in self.index:
            return
        index = self.index[id(layer)]
        if id(layer) not in self.arriving:
            self._post(index)
        tensors, event = self.arriving.pop(id(layer))
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.mounted[id(layer)] = {(owner, name, kind): getattr(owner, kind)[name]
                                   for owner, name, kind in tensors}
        for (owner, name, kind), tensor in tensors.items():
            _put(owner, kind, name, tensor)
        self._post_next(index)

    def after(self, layer: Layer) -> None:
        """After `layer` ran: its streamed weights off the device, the placeholders back, and the next one's copy
        posted if it had to wait for the room."""
        if id(layer) in self.mounted:
            if self.cuda:
                self.ran.append(torch.cuda.current_stream(self.device).record_event())
            self._unmount(id(layer))
            self._post_next(self.index[id(layer)])

    def _post_next(self, index: int) -> None:
        if index + 1 >= len(self.order):
            return
        on_device = sum(self.sizes[i] for i in (*self.mounted, *self.arriving))
        if self.room is None or on_device + self.sizes[id(self.order[index + 1])] <= self.room or not on_device:
            self._post(index + 1)

    def _post(self, index: int) -> None:
        layer = self.order[index]
        if id(layer) in self.arriving or id(layer) in self.mounted:
            return
        parked = self.placement.parked
        if not self.cuda:
            self.arriving[id(layer)] = ({key: parked[key].to(self.device) for key in self.keys[id(layer)]}, None)
            return
        for ran in self.ran:  # the memory of the streamed weights dropped since is free once these passed
            ran.synchronize()
        self.ran = []
        with torch.cuda.stream(self.copies):
            tensors = {key: parked[key].to(self.device, non_blocking=True) for key in self.keys[id(layer)]}
            event = torch.cuda.Event()
            event.record(self.copies)
        compute = torch.cuda.current_stream(self.device)
        for tensor in tensors.values():
            tensor.record_stream(compute)
        self.arriving[id(layer)] = (tensors, event)

    def _unmount(self, layer_id: int) -> None:
        for (owner, name, kind), placeholder in self.mounted.pop(layer_id).items():
            getattr(owner, kind)[name] = placeholder
