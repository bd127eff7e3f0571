"""asyncdiff's schedule: the UNet cut into stages, one per device, run asynchronously (AsyncDiff, NeurIPS 2024).

Everything here is pure (no processes, no tensors): how to cut a measured cost profile into balanced stages,
and what each stage does in each call of a stream (a stream is what is being denoised: one batch item,
branch or area chunk; its calls arrive in sampling order).

In one call of a stream, stage k runs its layers and hands its output (the hidden state plus every skip
connection not yet consumed) to stage k+1:
- warm-up (sampler step < warmup): in sequence, stage k+1 waits for stage k's output of this same call. Exact.
- after warm-up: every stage computes at once; stage k+1 works on what stage k handed over in the stream's
  previous exchange (one call stale with stride 1) and receives this call's output while it computes.
  Stage 0 always works on the call's fresh latent; the output of the last stage is the call's prediction.
- stride 2: stages exchange on every second asynchronous call only; between exchanges only the last stage
  computes, on the input it already holds (with the new timestep). That halves the traffic between devices
  (what costs on PCIe), at the price of inputs two calls stale. Note: the paper's "stride" instead spends an
  extra device to compute the next step ahead; this one needs no extra device.
- time_shift: a stage embeds the timestep of the call its input data came from, not the current one.

"Stale" counts calls of the same stream: a sampler that calls the model several times per step (heun, dpm2)
gets one call stale, which may be the same step's earlier evaluation. Warm-up counts sampler steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from ...runtime.words import counted

SLACK = 0.1  # of the whole model's weights, above an even share: what a stage may hold by default (pipefusion, and
# asyncdiff under sharded weights)


def default_cap(whole: int, stages: int) -> int:
    """The most bytes one of `stages` stages holds with no memory per device given: an even share plus SLACK."""
    return whole if stages < 2 else int(whole * (1 / stages + SLACK))


def balance(costs: list[float], stages: int, speeds: list[float] | None = None, sizes: list[int] | None = None,
            cap: float | None = None, held: list[int] | None = None) -> list[int]:
    """Cut points [c_1 < ... < c_{stages-1}] splitting `costs` (per layer, in order) into `stages` contiguous
    non-empty parts, minimising the slowest part: its cost over its stage's device speed (`speeds`, one per
    stage, relative; None: all equal); ties: the earliest cuts. Stage k runs layers [cut_{k}, cut_{k+1}) with
    cut_0 = 0 and cut_stages = len(costs).
    With `cap`: only cuts whose every stage holds at most `cap` bytes of weights, its layers' (`sizes`, bytes per
    layer) plus what it holds besides them (`held`, one per stage; None: nothing); ValueError, naming the lightest
    cut's heaviest stage, where no cut does."""
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1; got {stages}")
    speeds = [1.0] * stages if speeds is None else [float(s) for s in speeds]
    if len(speeds) != stages or min(speeds) <= 0:
        raise ValueError(f"balance needs one positive speed per stage ({stages}); got {speeds}")
    if stages > n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages; use at most {n} stages")
    time = _prefix(costs)
    if cap is None:
        return _minmax(n, stages, lambda k, j, i: (time[i] - time[j]) / speeds[k])[1]
    weight = stage_weights(sizes, held, stages)
    slowest, cuts = _minmax(n, stages, lambda k, j, i: (time[i] - time[j]) / speeds[k] if weight(k, j, i) <= cap
                            else float("inf"))
    if slowest == float("inf"):
        raise ValueError(f"no cut of {n} layers into {stages} stages keeps every stage's weights within {cap:.0f} "
                         f"bytes: the lightest holds {lightest(sizes, stages, held):.0f} on its heaviest stage")
    return cuts


def streamed(sizes: list[int], held: list[int], cuts: list[int], cap: float) -> list[int]:
    """The layers (indices) whose weights their stage streams from host memory each call instead of holding them,
    so that no stage holds over `cap` bytes, during a call included: its other layers' (`sizes`, bytes per layer),
    what it holds besides (`held`, one per stage) and the streamed layer running (the runner mounts one at a time,
    two where both fit: models/stages.py Streamed). From each stage's last layer backwards (the layers it runs
    last, whose copies have the longest to arrive) until that fits. ValueError, one sentence, where a stage cannot
    fit even streaming all its layers."""
    bounds, out = [0, *cuts, len(sizes)], []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        load, largest, i = held[k] + sum(sizes[a:b]), 0, b
        while load + largest > cap and i > a:
            i -= 1
            if sizes[i] > 0:
                out.append(i)
                load, largest = load - sizes[i], max(largest, sizes[i])
        if load + largest > cap:
            raise ValueError(f"stage {k} needs {(load + largest) / 2**20:.0f} MiB of weights on its device even "
                             f"streaming all its layers (what it holds besides them and its largest layer), over the "
                             f"{cap / 2**20:.0f} MiB per device it may hold; raise the memory per device")
    return sorted(out)


def lightest(sizes: list[int], stages: int, held: list[int] | None = None) -> float:
    """The least weights (bytes) the heaviest stage of any cut of `sizes` into `stages` parts holds (`held`: as
    in `balance`)."""
    return _minmax(len(sizes), stages, stage_weights(sizes, held, stages))[0]


def stage_weights(sizes: list[int], held: list[int] | None, stages: int):
    """(stage k, first layer j, end i) -> the bytes stage k holds when it runs layers [j, i)."""
    prefix, held = _prefix(sizes), [0] * stages if held is None else list(held)
    if len(sizes) and len(held) != stages:
        raise ValueError(f"held needs one figure per stage ({stages}); got {held}")
    return lambda k, j, i: held[k] + prefix[i] - prefix[j]


def _prefix(values) -> list[float]:
    out = [0.0]
    for value in values:
        out.append(out[-1] + max(0.0, float(value)))
    return out


def _minmax(n: int, stages: int, part) -> tuple[float, list[int]]:
    """(the least largest part(k, j, i) over cuts of n items into `stages` contiguous non-empty parts, its cuts
    without cut_0); part(k, j, i): stage k running items [j, i); ties: the earliest cuts."""
    inf = float("inf")
    # best[k][i]: the smallest possible max-part value for the first i items in k parts; choice: where part k starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], part(k - 1, j, i))
                if value < best[k][i] - 1e-12:
                    best[k][i], choice[k][i] = value, j
    if best[stages][n] == inf:
        return inf, []
    cuts, i = [], n
    for k in range(stages, 0, -1):
        i = choice[k][i]
        cuts.append(i)
    return best[stages][n], sorted(cuts)[1:]  # drop cut_0 == 0


def stage_costs(costs: list[float], cuts: list[int]) -> list[float]:
    bounds = [0, *cuts, len(costs)]
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class StageStep:
    """What one stage does in one call of a stream."""

    compute: bool
    input: str  # "fresh" (the call's latent), "upstream" (stage k-1's output of this call), "held" (received earlier)
    receive: str  # "before" (wait, then compute), "during" (arrives while computing), "none"
    send: bool  # hands its output to the next stage in this call
    sync: bool  # a warm-up call: exact


def stage_step(stage: int, stages: int, step: int, warmup: int, stride: int, async_index: int) -> StageStep:
    """What `stage` does in a call at sampler `step`; async_index: how many asynchronous calls the stream has
    had before this one (the first asynchronous call has 0)."""
    last = stage == stages - 1
    if step < warmup:
        return StageStep(True, "fresh" if stage == 0 else "upstream", "none" if stage == 0 else "before",
                         not last, True)
    exchange = async_index % stride == 0
    if not exchange:
        return StageStep(last, "fresh" if stage == 0 else "held", "none", False, False)
    return StageStep(True, "fresh" if stage == 0 else "held", "none" if stage == 0 else "during", not last, False)


# The actions a stage runs for one call, in order (`stage_actions`); the worker's runner and `simulate` both
# execute exactly this list.
TAKE_FRESH = "take the call's latent"
RECEIVE_UPSTREAM = "receive the previous stage's output of this call, wait for it"
TAKE_HELD = "take the input received earlier"
POST_RECEIVE = "post the receive of the previous stage's output (arrives while computing)"
COMPUTE = "compute"
COMPUTE_AND_SEND = "compute, sending the output to the next stage piece by piece"
WAIT = "wait for the sends and the posted receive"
KEEP_ARRIVAL = "hold what arrived as the next call's input"
COUNT_ASYNC = "count an asynchronous call of the stream"


def stage_actions(step: StageStep) -> tuple[str, ...]:
    """The ordered actions of one stage in one call, from its StageStep."""
    take = {"fresh": TAKE_FRESH, "upstream": RECEIVE_UPSTREAM, "held": TAKE_HELD}[step.input]
    actions = [take]
    if step.receive == "during":
        actions.append(POST_RECEIVE)
    if step.compute:
        actions.append(COMPUTE_AND_SEND if step.send else COMPUTE)
    actions.append(WAIT)
    if step.receive == "during":
        actions.append(KEEP_ARRIVAL)
    if not step.sync:
        actions.append(COUNT_ASYNC)
    return tuple(actions)


def handover_order(skips: int) -> list[int]:
    """The order in which a stage sends its output to the next one, as indexes into [h, skip_0 .. skip_{n-1},
    origin timestep]: the skips bottom-up (each leaves as soon as its value is final, lowest first), then the
    hidden state, then the origin. The receiver posts its receives in exactly this order: NCCL pairs
    point-to-point messages by issue order and ignores tags."""
    return [*range(1, skips + 1), 0, skips + 1]


def simulate(stages: int, steps: int, warmup: int, stride: int = 1, calls_per_step: int = 1) -> list[list[str]]:
    """One stream's calls as a grid of cells (call x stage) saying what each stage computes and on which
    call's latent its input is based, e.g. 'S1<c3' = stage 1 computes on data that left stage 0 at call 3.
    The last column is the call whose latent the prediction is based on (== the call itself when exact).
    Runs each stage's `stage_actions`, as the workers do; stages run in order within a call, so a receive
    posted during a call sees the sender's output of that call."""
    held = [None] * stages  # origin call of the input each stage holds
    sent = [None] * stages  # origin of what each stage last handed on
    async_index = [0] * stages
    grid = []
    for call in range(steps * calls_per_step):
        step = call // calls_per_step
        row, out_origin = [], None
        arriving = {}
        for k in range(stages):
            plan = stage_step(k, stages, step, warmup, stride, async_index[k])
            origin, computed = None, False
            for action in stage_actions(plan):
                if action == TAKE_FRESH:
                    origin = call
                elif action == RECEIVE_UPSTREAM:
                    origin = held[k] = sent[k - 1]
                elif action == TAKE_HELD:
                    origin = held[k]
                elif action in (COMPUTE, COMPUTE_AND_SEND):
                    computed = True
                    if action == COMPUTE_AND_SEND:
                        sent[k] = origin
                elif action == POST_RECEIVE:
                    arriving[k] = True
                elif action == COUNT_ASYNC:
                    async_index[k] += 1
            row.append(f"S{k}<c{origin}" if computed else "-")
            if k == stages - 1:
                out_origin = origin
        for k in arriving:  # arrivals during the call become the held inputs of the next
            held[k] = sent[k - 1]
        row.append(f"c{out_origin}")
        grid.append(row)
    return grid


def explain(stages: int, steps: int, warmup: int, stride: int = 1, devices: list[str] | None = None,
            calls_per_step: int = 1) -> str:
    """The schedule as a call x device table (for --explain and error messages)."""
    devices = devices or [f"stage {k}" for k in range(stages)]
    grid = simulate(stages, steps, warmup, stride, calls_per_step)
    header = ["call", "step", *[f"{d} (stage {k})" if not d.startswith("stage") else d for k, d in enumerate(devices)],
              "prediction from"]
    rows = [[str(c), str(c // calls_per_step), *cells[:-1], f"latent of {cells[-1]}" + (
        " (exact)" if cells[-1] == f"c{c}" else "")] for c, cells in enumerate(grid)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    legend = ("Sk<cN: stage k computes on data that left stage 0 at call N; '-': idle. "
              f"warm-up {counted(warmup, 'step')}, stride {stride}.")
    return "\n".join([*lines, legend])
