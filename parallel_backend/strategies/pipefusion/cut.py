"""Where pipefusion cuts a DiT's blocks and who holds each block's per-call weights: the fastest cut whose every
stage holds at most a cap of weights (pure).

pipefusion is chosen to hold 1/N of the weights per device; a cut balanced on time alone can miss that by far
where blocks weigh unlike for like time (Flux.1's double-stream blocks hold 2.4 times a single-stream block's
weights for about the same time: the time-balanced cut of flux-small puts 66% of the weights on stage 0). Most
of that difference is the blocks' modulation projections (`movable`: weights applied to the call's time
embedding only, no per-token work), which any stage can hold: it computes their few vectors per row once per
call and sends them to the block's stage (runner.py). So:
- the cut is the fastest whose every stage's fixed weights (its blocks' less their movable ones, the embedders'
  it holds and what every stage holds) stay within the cap: the cut balanced on time wherever it fits;
- then the movable weights are spread (`spread`): one block's at a time from the heaviest stage to the lightest,
  while that lowers the heaviest, so the weights end as even as the blocks allow;
- where the spread still leaves a stage over the cap (movable weights too coarse), the fastest cut of whole
  blocks within the cap replaces it, spread the same way.
The cap: `--memory-per-device` where given (the weights alone against it: the activations come on top); else an
even share plus `SLACK` of the whole model's weights (60% on two devices, the issue's figure). Where no cut fits
the default share, the cap rises to the lightest cut's heaviest stage; where none fits the memory per device
given, the cut is refused in one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..asyncdiff.schedule import (SLACK, balance, default_cap, lightest, stage_costs,  # noqa: F401 (SLACK: API)
                                  stage_weights)


@dataclass(frozen=True)
class StageCut:
    """A cut of the blocks into stages (`cuts`, as schedule.balance gives them), the stage holding each block's
    movable weights (`holders`: its own stage where they stay), each stage's weights in bytes (`loads`) and the
    cap they were cut within (bytes)."""

    cuts: list[int]
    holders: list[int]
    loads: list[int]
    cap: int

    def lent(self) -> list[tuple[int, int, int]]:
        """(block, its stage, the stage holding its movable weights) for every block whose weights moved."""
        owners = owner_stages(self.cuts, len(self.holders))
        return [(i, owners[i], h) for i, h in enumerate(self.holders) if h != owners[i]]


def held_per_stage(shared: int, first: int, last: int, stages: int) -> list[int]:
    """The weights (bytes) each stage holds besides its blocks: what every stage holds (`shared`), the
    embedders (`first`: stage 0), the output layers (`last`: the last stage)."""
    return [shared + (first if k == 0 else 0) + (last if k == stages - 1 else 0) for k in range(stages)]


def owner_stages(cuts: list[int], blocks: int) -> list[int]:
    """The stage each of `blocks` blocks runs on under `cuts`."""
    bounds = [0, *cuts, blocks]
    return [k for k, (a, b) in enumerate(zip(bounds, bounds[1:])) for _ in range(a, b)]


def spread(sizes: list[int], movable: list[int], held: list[int], cuts: list[int]) -> tuple[list[int], list[int]]:
    """(holders, loads): the movable weights of blocks moved, one block's at a time, from the heaviest stage to
    the lightest while that lowers the heaviest (the block whose weights come nearest to halving the gap; ties:
    the later block, whose vectors are needed last); each stage's weights after."""
    holders = owner_stages(cuts, len(sizes))
    loads = stage_bytes(sizes, held, cuts)
    while True:
        heavy = max(range(len(loads)), key=lambda k: (loads[k], -k))
        light = min(range(len(loads)), key=lambda k: (loads[k], k))
        gap = loads[heavy] - loads[light]
        units = [i for i, h in enumerate(holders) if h == heavy and 0 < movable[i] < gap]
        if not units:
            return holders, loads
        moved = min(units, key=lambda i: (abs(gap - 2 * movable[i]), -i))
        holders[moved] = light
        loads[heavy] -= movable[moved]
        loads[light] += movable[moved]


def weights_cut(seconds: list[float], sizes: list[int], held: list[int], whole: int, stages: int,
                speeds: list[float] | None = None, memory_bytes: int | None = None,
                movable: list[int] | None = None) -> StageCut:
    """The fastest cut of the blocks (`seconds`, `sizes`: each block's time and weights; `movable`: the part of
    `sizes` any stage may hold, None: none) into `stages` stages whose every stage holds at most the cap (`held`:
    each stage's weights besides its blocks; `whole`: the model's weights; `memory_bytes`: the memory per device
    given, else None), with its movable weights spread (module docstring)."""
    movable = list(movable or [0] * len(sizes))
    fixed = [size - m for size, m in zip(sizes, movable)]
    least = lightest(fixed, stages, held)  # inf where there are fewer blocks than stages: balance says so
    if least != float("inf"):
        least = max(least, (sum(held) + sum(sizes)) / stages)  # no spread holds less than an even share
    if memory_bytes is not None and least != float("inf") and least > memory_bytes:
        raise ValueError(f"pipefusion cannot cut this model's {len(sizes)} blocks into {stages} stages within "
                         f"{memory_bytes / 2**30:.3g} GiB of weights per device: the lightest cut holds "
                         f"{least / 2**30:.3g} GiB on its heaviest stage; raise --memory-per-device or add devices")
    cap = memory_bytes if memory_bytes is not None else int(max(default_cap(whole, stages), least))
    cuts = balance(seconds, stages, speeds, fixed, cap, held)
    holders, loads = spread(sizes, movable, held, cuts)
    if max(loads) > cap:  # the movable weights came in pieces too coarse to even this cut out
        cap = memory_bytes if memory_bytes is not None else int(max(cap, lightest(sizes, stages, held)))
        cuts = balance(seconds, stages, speeds, sizes, cap, held)
        holders, loads = spread(sizes, movable, held, cuts)
    return StageCut(cuts, holders, loads, int(cap))


def stage_bytes(sizes: list[int], held: list[int], cuts: list[int]) -> list[int]:
    """Each stage's weights (bytes) under `cuts`, every block's weights on its own stage."""
    weight, bounds = stage_weights(sizes, held, len(cuts) + 1), [0, *cuts, len(sizes)]
    return [int(weight(k, a, b)) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def cost_of_cap(seconds: list[float], sizes: list[int], held: list[int], cuts: list[int],
                speeds: list[float] | None = None, movable: list[int] | None = None) -> str:
    """What `cuts` cost against the cut balanced on time alone ("" where they are as fast), in words: "cuts the
    blocks 2 / 4 where time alone would cut 3 / 3 (91 MiB on one device), its slowest stage 25% slower"."""
    fastest = balance(seconds, len(held), speeds)
    speeds = speeds or [1.0] * len(held)
    slowest = [max(c / s for c, s in zip(stage_costs(seconds, cut), speeds)) for cut in (cuts, fastest)]
    if slowest[0] <= slowest[1] * 1.001:
        return ""
    counts = [" / ".join(str(b - a) for a, b in zip([0, *cut], [*cut, len(seconds)])) for cut in (cuts, fastest)]
    heaviest = max(spread(sizes, list(movable or [0] * len(sizes)), held, fastest)[1])
    return (f"cuts the blocks {counts[0]} where time alone would cut {counts[1]} "
            f"({heaviest / 2**20:.0f} MiB on one device), its slowest stage "
            f"{100 * (slowest[0] / slowest[1] - 1):.0f}% slower")
