"""What ulysses, ring and usp share as strategies: each row group of the mesh is a sequence group whose ranks all get
the group's rows, run the model's token-local layers on their shard of the token sequence and attention
through the group (the model family's sequence runner places the split and the gather), and return the same
full output; the host takes the group's first rank's. Exact up to float tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ...runtime.knobs import Knob
from ..base import BenchJob, Strategy, join_rows

# The sequence axes' degrees, shared by ulysses, ring and usp.
ULYSSES = Knob("ulysses", int, None, "ulysses and usp: devices that split a DiT's attention heads after an all-to-all; "
               "it must divide the model's heads (default: ulysses, the devices left after cfg and batch; usp, the "
               "most of them the heads allow)", low=1, unset=True,
               axis="it splits the token sequence and trades tokens for attention heads (all-to-all)")
RING = Knob("ring", int, None, "ring: devices passing keys and values around a ring; usp: ulysses subgroups around "
            "the ring (default: the devices left after cfg, batch and ulysses)", low=1, unset=True,
            axis="it splits the token sequence and passes keys and values around a ring")


@dataclass(frozen=True)
class SequenceForward:
    """Run the model on `call` (the group's whole rows) with its token sequence split over the ranks `peers`
    (global ranks, in shard order); this rank is peers[index]."""

    fingerprint: str
    call: Any  # calls.ModelCall
    kind: str  # "ulysses", "ring" or "usp"
    peers: tuple[int, ...]
    index: int
    ulysses: int = 1  # the ranks that split the heads (group.SequenceGroup)
    weights: tuple[float, ...] | None = None  # token shares per peer (ring on mixed devices); None: near-equal


class SequenceStrategy(Strategy):
    kind: str = ""
    exact = True
    adapters = ("diffusers_dit", "comfy_dit")  # the adapters whose families place a sequence split (models/*: `sequence`)
    scope = "splits the token sequence of transformers (DiTs) only"
    bench_job = BenchJob(1, False)  # the case it exists for: one image at cfg = 1
    collective = True
    splits_tokens = True

    def check_family(self, family: str) -> None:
        from ...models import adapter_name, sequence_runner

        if adapter_name(family).endswith("_unet"):
            super().check_family(family)  # a UNet: the sentence every family-bound strategy gives
        if sequence_runner(family) is None:
            host = "ComfyUI" if adapter_name(family).startswith("comfy") else "diffusers"
            raise ValueError(f"strategy {self.name!r} has no sequence split for {family.split(':', 1)[-1]} models "
                             f"in {host} yet: use cfg, batch or auto for it")

    def check_model(self, mesh, sequence) -> None:
        """The ulysses degree must divide the model's attention heads (the sentence names ring)."""
        from .ulysses import heads_per_rank

        if sequence is not None and sequence.heads is not None:
            heads_per_rank(sequence.heads, ulysses_degree(mesh))

    def plan(self, engine, call, mesh, config, fingerprint: str) -> dict[int, SequenceForward]:
        work = {}
        for group, rows in enumerate(mesh.row_shares(call.rows, call.branches)):
            if not len(rows):
                continue
            share, peers = call.select(rows), tuple(mesh.ranks(group))
            for index, rank in enumerate(peers):
                work[rank] = self.message(fingerprint, share, peers, index, mesh, config)
        return work

    def message(self, fingerprint: str, share, peers: tuple[int, ...], index: int, mesh, config):
        """What rank peers[index] of a row group is sent to run `share` (the group's rows of the call)."""
        return SequenceForward(fingerprint, share, self.kind, peers, index, ulysses_degree(mesh),
                               self.token_weights(mesh, peers))

    def token_weights(self, mesh, peers) -> tuple[float, ...] | None:
        """Token shares by device speed (mesh.speeds): only ring, where a rank's attention is its own queries
        against every key, so its work follows its tokens; ulysses and usp split the heads evenly, so their
        attention cannot follow uneven speeds: equal shares."""
        if not mesh.speeds or self.kind != "ring":
            return None
        return tuple(mesh.speeds[rank] for rank in peers)

    def gather(self, call, mesh, replies: dict[int, Any]):
        leaders = [mesh.ranks(group)[0] for group in range(mesh.groups) if mesh.ranks(group)[0] in replies]
        return join_rows([replies[rank].out for rank in leaders], call.x)

    def shard_split(self, mesh) -> tuple[int, int]:
        """(ulysses, ring): the sequence split whose rank computes what a rank of `mesh` does (plan/measure.py
        times one per split)."""
        degrees = mesh.degrees()
        return degrees.get("ulysses", 1), degrees.get("ring", 1)

    def bench_part(self, model, call, mesh):
        """Rank 0 of a sequence group of the mesh's degree, its exchanges stubbed out (stub.py)."""
        import torch

        from ...models import sequence_runner
        from .stub import StubGroup

        runner, group = sequence_runner(model.family), StubGroup(self.kind, mesh.inner, ulysses_degree(mesh))

        def run():
            with torch.inference_mode():
                runner(model.module, call, group)

        return run

    def bench_figures(self, executor, loop, row: dict) -> dict:
        """What crossed between devices per call (every rank's sends, summed), how long the ranks sat waiting
        for it (the slowest rank; the exchange not hidden behind compute) against the same bytes exchanged
        alone (probe.py), and how close the run came to the ideal (one device's whole call over a rank's own
        compute for its shard, the exchange stubbed out)."""
        import statistics

        from .probe import probe_plan

        calls = loop.calls or [{"bytes": 0, "wait": 0.0, "extra": {}, "mesh": None}]
        moved = statistics.median(c["bytes"] for c in calls)
        exposed = statistics.median(c["wait"] for c in calls)
        first = calls[-1].get("extra", {}).get(0, {})
        mesh = calls[-1]["mesh"]
        alone = 0.0
        if mesh is not None and mesh.inner > 1 and first.get("bytes"):
            replies = executor.engine.request(probe_plan(mesh, first["bytes"], first["passes"]),
                                              "timing an exchange", collective=True)
            alone = max(r["transfer_seconds"] for r in replies.values())
        hidden = max(0.0, 1.0 - exposed / alone) if alone > 0 else None
        waits = f"waited {1000 * exposed:.1f} ms"
        if hidden is not None:
            waits += (f" on an exchange that takes {1000 * alone:.1f} ms alone ("
                      + (f"{100 * hidden:.0f}% of it hidden behind compute)" if exposed < alone else
                         "the waits beyond it are ranks waiting for a slower peer)"))
        summary = (f"{self.name}: {moved / 2**20:.2f} MiB between devices per call; {waits}; "
                   f"{100 * row['speedup_vs_serial'] / row['ideal_speedup']:.0f}% of the ideal with the exchange "
                   "stubbed out")
        return {"transfer_bytes_per_call_median": moved, "exposed_wait_seconds_per_call_median": exposed,
                "transfer_seconds_alone": alone, "hidden_fraction": hidden, "summary": summary}

    def worker_handlers(self) -> dict:
        from .probe import ProbeExchange, run_probe

        return {SequenceForward: run_sequence_forward, ProbeExchange: run_probe}


def ulysses_degree(mesh) -> int:
    """The ranks of a sequence group of `mesh` that split the heads: its ulysses degree, 1 without one (ring)."""
    return mesh.degrees().get("ulysses", 1)


def run_sequence_forward(worker, message: SequenceForward):
    """Worker side: the family's sequence runner on this rank's part of the group; only the group's first rank
    sends the output back (every rank holds the same)."""
    import torch

    from ...runtime.messages import Computed
    from ...models import sequence_runner
    from ...models.stages import synchronize
    from .group import SequenceGroup
    from .traffic import Traffic

    module, family = worker.whole_model(message.fingerprint)
    group = SequenceGroup(message.kind, message.peers, message.index, worker.device, Traffic(), message.ulysses,
                          message.weights)
    started = time.perf_counter()
    with torch.inference_mode():
        out = sequence_runner(family)(module, message.call.to(worker.device), group)
    synchronize(worker.device)
    traffic = group.traffic
    return Computed(out if message.index == 0 else None, time.perf_counter() - started - traffic.waited_s,
                    traffic.waited_s, traffic.bytes_sent, extra={"passes": traffic.passes, "messages": traffic.messages,
                                                  "bytes": traffic.bytes_sent})
