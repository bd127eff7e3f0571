"""tensor: each row group's devices split every transformer block by its attention heads and MLP hidden units
(models/tensor_splits.py): column-split projections in, row-split projections out, one all-reduce after each
attention and each MLP. Each device holds its share of those weights (the rest of the model whole), so the
weights per device shrink towards 1/N. Exact: every rank sums the group's partial outputs in the same order.

Each worker cuts the model as it loads it, on the CPU (a mapped file's pages; a recipe built there), before the
weights move to its device, so a GPU never holds the whole weights. The engine holds each cut under a
fingerprint of its own (`weights_layout`), so a whole-model strategy never meets it, and the workers keep both as
two models (max_models). A worker of this machine reads only its share of the cut weights from the one file the
host writes (`reads_on_load`, engine/weights.py `reads`); a worker of another machine loads its machine's
cache entry of its cut alone (remote_weights.send_to_machines). Composes with cfg and batch as the outer
axes (cfg 2 x tensor 2 on 4 devices).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

from ..runtime.knobs import Knob
from .base import BenchJob, Strategy, join_rows

TENSOR = Knob("tensor", int, None, "tensor: devices that split each transformer block's attention heads and MLP "
              "(default: the devices left after cfg and batch); it must divide the model's heads", low=1, unset=True,
              axis="it splits each block's attention heads and MLP, with an all-reduce after each")


@dataclass(frozen=True)
class TensorForward:
    """Run the model on `call` (the group's whole rows) cut over the ranks `peers` (global ranks); this rank is
    peers[index]."""

    fingerprint: str
    call: Any  # calls.ModelCall
    peers: tuple[int, ...]
    index: int


class Tensor(Strategy):
    name = "tensor"
    exact = True
    axes = ("tensor",)
    knobs = (TENSOR,)
    adapters = ("diffusers_dit",)
    scope = "splits the blocks of transformers (DiTs) only"
    summary = "each device holds and runs a share of every block's attention heads and MLP (all-reduce after each)."
    bench_job = BenchJob(1, False)
    collective = True
    # Not auto's yet: the workers cut their weights in place, so auto alternating it with a whole-model strategy
    # (cfg for guided calls, say) would ship the model at every switch. It becomes auto's choice where the whole
    # model does not fit, once memory is an input of the plan.
    auto = False
    cuts_layers = True

    def check_family(self, family: str) -> None:
        from ..models import adapter_name
        from ..models.tensor_splits import families

        if adapter_name(family).endswith("_unet"):
            super().check_family(family)  # the sentence every family-bound strategy gives a UNet
        if family not in families():
            host = "ComfyUI" if adapter_name(family).startswith("comfy") else "diffusers"
            raise ValueError(f"strategy 'tensor' has no tensor split for {family.split(':', 1)[-1]} models in {host} "
                             "yet: use cfg, batch, ulysses or ring for it")

    def check_weights(self, module, family: str) -> None:
        """Only plain floating-point weights are cut (a quantized layer's storage is not sliced by rows); each
        host module is checked once (the walk over its layers costs milliseconds)."""
        from ..models.tensor_splits import check_plain_weights

        if _CHECKED.get(module) != family:
            check_plain_weights(module, family)
            _CHECKED[module] = family

    def check_model(self, mesh, sequence) -> None:
        from ..models.tensor_splits import check_heads

        if sequence is not None:
            check_heads(sequence.heads, mesh.inner)

    def plan(self, engine, call, mesh, config, fingerprint: str) -> dict[int, TensorForward]:
        work = {}
        for group, rows in enumerate(mesh.row_shares(call.rows, call.branches)):
            if len(rows):
                peers = tuple(mesh.ranks(group))
                work.update({rank: TensorForward(fingerprint, call.select(rows), peers, index)
                             for index, rank in enumerate(peers)})
        return work

    def gather(self, call, mesh, replies: dict[int, Any]):
        leaders = [mesh.ranks(group)[0] for group in range(mesh.groups) if mesh.ranks(group)[0] in replies]
        return join_rows([replies[rank].out for rank in leaders], call.x)

    def weights_layout(self, mesh):
        layout = {}
        for group in range(mesh.groups):
            peers = tuple(mesh.ranks(group))
            layout.update({rank: ("tensor", peers, index) for index, rank in enumerate(peers)})
        return layout

    def cut_on_load(self, worker, module, family: str, cut):
        """Worker side, as the model loads (on the CPU): this rank's cut of it, its exchanges ready."""
        from ..models.tensor_splits import plan_for, split_in_place

        _, peers, index = cut
        group = _Group(tuple(peers), index, worker.device)
        split_in_place(module, plan_for(module, family), len(peers), index, group)
        module.__dict__["_tandem_tensor"] = (tuple(peers), index, group)  # not a submodule
        return module

    def reads_on_load(self, module, family: str, cut, held: dict) -> dict:
        """What cut_on_load keeps of each weight it cuts (models/tensor_splits.py `reads`), from the host's module."""
        from ..models.tensor_splits import plan_for, reads

        _, peers, index = cut
        return reads(module, plan_for(module, family), len(peers), index)

    def bench_part(self, model, call, mesh):
        """A rank's share of the model, its exchanges stubbed out (_StubGroup)."""
        import copy

        import torch

        from ..models import forward_for_family
        from ..models.tensor_splits import plan_for, split_in_place

        part = copy.deepcopy(model.module)
        split_in_place(part, plan_for(part, model.family), mesh.inner, 0, _StubGroup(mesh.inner))

        def run():
            with torch.inference_mode():
                forward_for_family(model.family)(part, call)

        return run

    def worker_handlers(self) -> dict:
        return {TensorForward: run_tensor_forward}


_CHECKED = weakref.WeakKeyDictionary()  # host modules whose weights check_weights passed -> their family


class _Group:
    """One rank's exchanges with its group, through primitives' all-to-all: `sum` sends its partial to every
    other rank and adds them all in peer order (every rank holds the same sum, bit for bit); `gather` joins
    every rank's piece along the last dimension in peer order."""

    def __init__(self, peers: tuple[int, ...], index: int, device):
        from .sequence.traffic import Traffic

        self.peers, self.index, self.device, self.traffic = peers, index, device, Traffic()

    def _everyones(self, piece):
        from ..runtime import primitives
        from .sequence.traffic import timed_wait

        piece = piece.contiguous()
        started = primitives.start_all_to_all([piece] * len(self.peers), [piece.shape] * len(self.peers),
                                              list(self.peers), self.index, self.device)
        received = timed_wait(self.traffic, primitives.finish_all_to_all, started)
        self.traffic.record([piece] * (len(self.peers) - 1))
        return received

    def sum(self, partial):
        received = self._everyones(partial)
        total = received[0]
        for piece in received[1:]:
            total = total + piece
        return total

    def gather(self, piece):
        import torch

        return torch.cat(self._everyones(piece), dim=-1)


class _StubGroup:
    """The bench's ideal: a rank's exchanges left out, with the shapes they would give."""

    def __init__(self, degree: int):
        self.degree = degree

    def sum(self, partial):
        return partial

    def gather(self, piece):
        import torch

        return torch.cat([piece] * self.degree, dim=-1)


@dataclass
class _Split:
    peers: tuple[int, ...]
    index: int
    group: _Group
    weights_bytes: int


def _cut(worker, message: TensorForward) -> _Split:
    """The tensor state of a model the worker holds: cut as it loaded (cut_on_load), or now, in place."""
    from ..runtime.recipe import weights_bytes

    module, family = worker.whole_model(message.fingerprint)
    if "_tandem_tensor" not in module.__dict__:  # loaded whole (a Load without its cut): cut it now, as a load would
        STRATEGY.cut_on_load(worker, module, family, ("tensor", message.peers, message.index))
    held = module.__dict__["_tandem_tensor"]

    def refuse():
        raise RuntimeError(f"model {message.fingerprint[:12]} is held cut by strategy 'tensor' on this worker: "
                           "only tensor calls can run it")

    worker.on_forward(message.fingerprint, refuse)
    return _Split(held[0], held[1], held[2], weights_bytes(module))


def run_tensor_forward(worker, message: TensorForward):
    """Worker side: the model, cut for this rank on its first tensor call, runs the group's rows; only the
    group's first rank sends the output back (every rank holds the same)."""
    import torch

    from ..models import forward_for_family
    from ..models.stages import synchronize
    from ..runtime.messages import Computed
    from .sequence.traffic import Traffic

    split = worker.slot(message.fingerprint, "tensor", lambda: _cut(worker, message))
    if (split.peers, split.index) != (message.peers, message.index):
        raise RuntimeError(f"model {message.fingerprint[:12]} is cut for ranks {list(split.peers)}, not "
                           f"{list(message.peers)}: each cut is held under a fingerprint of its own")
    module, family = worker.model(message.fingerprint)
    split.group.traffic = traffic = Traffic()
    started = time.perf_counter()
    with torch.inference_mode():
        out = forward_for_family(family)(module, message.call.to(worker.device))
    synchronize(worker.device)
    return Computed(out if message.index == 0 else None, time.perf_counter() - started - traffic.waited_s,
                    traffic.waited_s, traffic.bytes_sent,
                    extra={"passes": traffic.passes, "bytes": traffic.bytes_sent,
                           "weights_bytes": split.weights_bytes})


STRATEGY = Tensor()
