"""Where pipefusion cuts a DiT's blocks: the fastest cut whose every stage holds at most a cap of weights (pure).

pipefusion is chosen to hold 1/N of the weights per device; a cut balanced on time alone can miss that by far
where blocks weigh unlike for like time (Flux.1's double-stream blocks hold twice a single-stream block's
weights for about the same time: the time-balanced cut of flux-small puts 66% of the weights on stage 0). So
the cut minimises the slowest stage's time among the cuts whose every stage's weights (its blocks', the
embedders' it holds and what every stage holds) stay within the cap:
- `--memory-per-device` where given (the weights alone against it: the activations come on top);
- else an even share plus `SLACK` of the whole model's weights: room for the time balance to move a cut by a
  block or so of a model of tens of blocks (Flux.1-dev: 19 + 38), while each device stays near the 1/N that
  pipefusion promises (60% on two devices, the issue's figure).
Where no cut fits the default share (a block heavier than the slack), the cap rises to the lightest cut's
heaviest stage; where none fits the memory per device given, the cut is refused in one sentence.
"""

from __future__ import annotations

from ..asyncdiff.schedule import balance, lightest, stage_costs, stage_weights

SLACK = 0.1  # of the whole model's weights, above an even share


def held_per_stage(shared: int, first: int, last: int, stages: int) -> list[int]:
    """The weights (bytes) each stage holds besides its blocks: what every stage holds (`shared`), the
    embedders (`first`: stage 0), the output layers (`last`: the last stage)."""
    return [shared + (first if k == 0 else 0) + (last if k == stages - 1 else 0) for k in range(stages)]


def default_cap(whole: int, stages: int) -> int:
    """The most bytes one of `stages` stages holds with no memory per device given: an even share plus SLACK."""
    return whole if stages < 2 else int(whole * (1 / stages + SLACK))


def weights_cut(seconds: list[float], sizes: list[int], held: list[int], whole: int, stages: int,
                speeds: list[float] | None = None, memory_bytes: int | None = None) -> tuple[list[int], int]:
    """(cuts, the cap they keep): the fastest cut of the blocks (`seconds`, `sizes`: each block's time and
    weights) into `stages` stages whose every stage holds at most the cap (`held`: each stage's weights
    besides its blocks; `whole`: the model's weights; `memory_bytes`: the memory per device given, else None)."""
    least = lightest(sizes, stages, held)  # inf where there are fewer blocks than stages: balance says so
    if memory_bytes is not None and least != float("inf") and least > memory_bytes:
        raise ValueError(f"pipefusion cannot cut this model's {len(sizes)} blocks into {stages} stages within "
                         f"{memory_bytes / 2**30:.3g} GiB of weights per device: the lightest cut holds "
                         f"{least / 2**30:.3g} GiB on its heaviest stage; raise --memory-per-device or add devices")
    cap = memory_bytes if memory_bytes is not None else max(default_cap(whole, stages), least)
    return balance(seconds, stages, speeds, sizes, cap, held), int(cap)


def stage_bytes(sizes: list[int], held: list[int], cuts: list[int]) -> list[int]:
    """Each stage's weights (bytes) under `cuts`."""
    weight, bounds = stage_weights(sizes, held, len(cuts) + 1), [0, *cuts, len(sizes)]
    return [int(weight(k, a, b)) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def cost_of_cap(seconds: list[float], sizes: list[int], held: list[int], cuts: list[int],
                speeds: list[float] | None = None) -> str:
    """What `cuts` cost against the cut balanced on time alone ("" where they are as fast), in words: "cuts the
    blocks 2 / 4 where time alone would cut 3 / 3 (91 MiB on one device), its slowest stage 25% slower"."""
    fastest = balance(seconds, len(held), speeds)
    speeds = speeds or [1.0] * len(held)
    slowest = [max(c / s for c, s in zip(stage_costs(seconds, cut), speeds)) for cut in (cuts, fastest)]
    if slowest[0] <= slowest[1] * 1.001:
        return ""
    counts = [" / ".join(str(b - a) for a, b in zip([0, *cut], [*cut, len(seconds)])) for cut in (cuts, fastest)]
    return (f"cuts the blocks {counts[0]} where time alone would cut {counts[1]} "
            f"({max(stage_bytes(sizes, held, fastest)) / 2**20:.0f} MiB on one device), its slowest stage "
            f"{100 * (slowest[0] / slowest[1] - 1):.0f}% slower")
