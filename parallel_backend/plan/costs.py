"""What one call costs each strategy on a mesh: the busiest device's compute, the communication it cannot hide,
the bytes moved and the memory per device. Pure arithmetic on `model.Inputs`.

Overlap assumptions, per strategy (each as the strategy's code does it):
- cfg, batch: nothing to overlap inside a call; the host's input and output transfers are exposed (counted by
  the caller, model.predict, for every strategy alike).
- ulysses (local-first, strategies/sequence/ulysses.py): the q, k, v all-to-all hides behind the own-block
  attention (own queries to own keys: 1/N^3 of one device's attention), the output all-to-all behind the own
  queries' attention to the other ranks' keys ((N-1)/N^3); what is longer is exposed. Where the all-to-all is
  not overlapped (Inputs.overlaps_all_to_all False: a peer's plain Ulysses, as plan/published.py fits it) all of
  it is exposed, in usp too.
- ring: each of the N-1 key/value transfers hides behind the attention to the block held (1/N^2); longer is
  exposed.
- usp (r x u): the heads go in c chunks (2 when a rank's heads split evenly): the first chunk's q, k, v and the
  last chunk's output are exposed, the others hide behind a chunk's attention; inside a chunk, ring passes as
  ring does, on blocks of a subgroup's tokens and H/(u c) heads.
- every sequence split gathers the output at the end: exposed.
- patch (DistriFusion, strategies/patch/): after warm-up each attention posts its band's keys and values to every
  other rank and they are used at the next call, so the whole call's exchange hides behind the whole call's
  compute: only what outlasts the compute is exposed. Warm-up calls wait for every exchange: costed as ring on
  the same devices (its compute is the same, its exchange exposed as ring's). The output's gather: exposed.
- tensor: two all-reduces per block, exposed (strategies/tensor.py posts each and waits for it).
- asyncdiff: after warm-up each stage hands its output over while the next call computes; the hand-over is
  exposed only where it outlasts the slowest stage. Warm-up calls run the stages in turn, hand-overs exposed.
- pipefusion: its cut is the fastest that keeps each stage's weights within the memory per device given, else the
  default cap (as the strategy cuts); a patched call is a pipeline of M patches through N stages: about (M + N - 1) / M
  of the slowest stage's whole-sequence time, each extra patch relaunching the stage's layers (its share of the fixed part);
  the fill's hand-overs (N - 1 patches) are exposed, a later patch's only where it outlasts a patch's compute.
  Warm-up calls run the stages in turn, the whole sequence handed over at each cut, exposed. M: the best of
  PATCH_CHOICES (`proposed_patches`).
- sharded weights (any strategy but asyncdiff, pipefusion and tensor): each block's gather, exposed on CPU workers, hidden
  behind the compute on CUDA where the compute is longer (`sharded_cost`). asyncdiff's instead: a stage over the
  cap streams its last layers from host memory each call (`streamed_stage_cost`).
Compute: a row group's call on one device, split: sequence splits take a rank's part as measured on one device
(Inputs.shard_seconds; else the call over the group's size); asyncdiff by the layer profile's balanced cut;
row strategies run their rows' call. Sequence and tensor splits divide the call's work, never its fixed part
(Inputs.fixed_seconds) nor its launches (Inputs.launch_seconds: every rank launches every layer, a floor under its
compute); a stage launches only its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..runtime.words import counted
from ..strategies.asyncdiff.schedule import balance, default_cap, stage_costs, streamed
from ..strategies.pipefusion.cut import StageCut, spread, weights_cut
from .traffic import Traffic, group_rows, handover_peer, per_rank, sequence_peer


@dataclass(frozen=True)
class Cost:
    """One call on a mesh: busy (the slowest row group's compute + exposed exchange), its parts, the peer
    traffic, the memory per device; warm: a warm-up call's busy time (None: as busy); rows: the rows of the
    busiest device's call (what its contention is measured for); kept, gathered: the parts of `memory` that
    are the weights a device keeps (whole, its stage's, its cut or its shards) and the blocks sharded weights
    gather at once (the rest is activations)."""

    busy: float
    compute: float
    exposed: float
    transfer: float  # the peer exchanges alone, nothing overlapped (the slowest group's)
    traffic: Traffic
    memory: int
    warm: float | None = None
    rows: int = 1
    kept: int = 0
    gathered: int = 0
    note: str = ""  # what the plan chose inside the strategy (pipefusion: the patches it proposes)


def rows_cost(inp, mesh) -> Cost:
    rows = group_rows(mesh, inp.shape, inp.branches)
    compute = max(inp.seconds(r) for r in rows)
    return Cost(compute, compute, 0.0, 0.0, Traffic(), inp.weight_bytes + max(rows) * inp.activation_bytes_per_row,
                rows=max(rows), kept=inp.weight_bytes)


def sequence_cost(inp, mesh) -> Cost:
    degrees = mesh.degrees()
    return split_cost(inp, mesh, degrees.get("ulysses", 1), degrees.get("ring", 1))


def split_cost(inp, mesh, u: int, r: int) -> Cost:
    """Each row group of `mesh` a sequence group of u x r ranks."""
    rows = [g for g in group_rows(mesh, inp.shape, inp.branches) if g]
    worst = max((_sequence_group(inp, g, u, r) for g in rows), key=lambda cost: cost.busy)
    memory = inp.weight_bytes + max(rows) * inp.activation_bytes_per_row // (u * r)
    return replace(worst, traffic=Traffic(peer=sum(g * sequence_peer(inp.shape, u, r) for g in rows)), memory=memory,
                   kept=inp.weight_bytes)


def _sequence_group(inp, rows: int, u: int, r: int) -> Cost:
    """One sequence group of u x r ranks running `rows` rows (traffic and memory left to the caller)."""
    n = u * r
    piece = rows * per_rank(inp.shape.tokens, n) * inp.shape.width * inp.shape.itemsize  # a rank's q, k or v
    exposed, alone = _attention_exposure(inp, piece, inp.attention_seconds * rows, u, r)
    gather = inp.link.seconds(rows * per_rank(inp.shape.output_bytes, n) * (n - 1), n - 1)
    compute = inp.shard(rows, u, r)
    exposed = inp.shape.attentions * exposed + gather
    return Cost(compute + exposed, compute, exposed, inp.shape.attentions * alone + gather, Traffic(), 0, rows=rows)


def _attention_exposure(inp, piece: int, attention: float, u: int, r: int) -> tuple[float, float]:
    """(exposed, alone) seconds of one attention's exchanges for one rank; attention: one device's time for it."""
    link, n = inp.link, u * r
    behind = attention if inp.overlaps_all_to_all else 0.0  # what an all-to-all may hide behind
    if r == 1:  # ulysses, local-first
        send_qkv = link.seconds(3 * piece * (u - 1) / u, u - 1)
        send_out = link.seconds(piece * (u - 1) / u, u - 1)
        exposed = max(0.0, send_qkv - behind / n**3) + max(0.0, send_out - behind * (n - 1) / n**3)
        return exposed, send_qkv + send_out
    if u == 1:  # ring
        step = link.seconds(2 * piece, 2)
        return (r - 1) * max(0.0, step - attention / n**2), (r - 1) * step
    chunks = 2 if (inp.shape.heads // u) % 2 == 0 else 1
    send_qkv = link.seconds(3 * piece * (u - 1) / u / chunks, u - 1)
    send_out = link.seconds(piece * (u - 1) / u / chunks, u - 1)
    step = link.seconds(2 * piece / chunks, 2)
    ring_exposed = (r - 1) * max(0.0, step - attention / (n * r * chunks))
    chunk = (behind / (n * chunks) + ring_exposed) if inp.overlaps_all_to_all else 0.0  # a chunk through its ring
    exposed = (chunks * ring_exposed + send_qkv + send_out
               + (chunks - 1) * (max(0.0, send_qkv - chunk) + max(0.0, send_out - chunk)))
    return exposed, chunks * (send_qkv + send_out + (r - 1) * step)


def patch_cost(inp, mesh) -> Cost:
    """patch over N bands per row group: a rank's compute is a ring rank's (its band through every layer, its
    queries against every key); its keys and values go to each of the N-1 others once per attention, hidden
    behind the call up to the call's length; warm-up calls as ring's."""
    n = mesh.inner
    rows = [g for g in group_rows(mesh, inp.shape, inp.branches) if g]
    ring = split_cost(inp, mesh, 1, n)
    worst = None
    for g in rows:
        compute = inp.shard(g, 1, n)
        piece = g * per_rank(inp.shape.tokens, n) * inp.shape.width * inp.shape.itemsize  # a rank's k or v
        exchange = inp.shape.attentions * inp.link.seconds(2 * piece * (n - 1), n - 1)
        gather = inp.link.seconds(g * per_rank(inp.shape.output_bytes, n) * (n - 1), n - 1)
        exposed = max(0.0, exchange - compute) + gather
        cost = Cost(compute + exposed, compute, exposed, exchange + gather, Traffic(), 0, rows=g)
        worst = cost if worst is None or cost.busy > worst.busy else worst
    return replace(worst, traffic=ring.traffic, memory=ring.memory, kept=ring.kept, warm=ring.busy)


def staged_cost(inp, mesh) -> Cost:
    """asyncdiff: the balanced cut of the layer profile (schedule.balance), per row group; stride 1 (an exchange
    every call)."""
    rows = [g for g in group_rows(mesh, inp.shape, inp.branches) if g]
    groups = [_staged_group(inp, g, mesh.inner) for g in rows]
    worst = max((cost for cost, _ in groups), key=lambda cost: cost.busy)
    peer = sum(handover_peer(inp.shape, cuts, g) for g, (_, cuts) in zip(rows, groups))
    memory, kept = max((_stage_weights(inp, cuts) + g * inp.activation_bytes_per_row, _stage_weights(inp, cuts))
                       for g, (_, cuts) in zip(rows, groups))
    return replace(worst, traffic=Traffic(peer=peer), memory=memory, kept=kept)


def streamed_stage_cost(inp, mesh) -> Cost:
    """asyncdiff under sharded weights or a memory per device (strategies/asyncdiff `cut`): the balanced cut, each
    stage over the cap (the memory per device given, else an even share plus SLACK) streaming its last layers from
    host memory each call (schedule.streamed). On CUDA (inp.gathers_overlap) the copies run on the link beside the
    stage's compute, and only what outlasts the slowest stage is exposed; CPU workers mount them in place. Memory:
    the heaviest stage's held weights, the streamed layers on its device at once (one running, the next arriving
    where both fit the cap), activations."""
    cost = staged_cost(inp, mesh)
    if not inp.layer_weight_bytes or mesh.inner < 2:
        return cost
    sizes, stages = list(inp.layer_weight_bytes), mesh.inner
    shared = max(0, inp.weight_bytes - sum(sizes))
    cap = inp.stage_cap_bytes or default_cap(inp.weight_bytes, stages)
    rows = max(g for g in group_rows(mesh, inp.shape, inp.branches) if g)
    cuts = _staged_group(inp, rows, stages)[1]
    chosen = set(streamed(sizes, [shared] * stages, cuts, cap))
    if not chosen:
        return cost
    bounds = [0, *cuts, len(sizes)]
    parts = [[sizes[i] for i in range(a, b) if i in chosen] for a, b in zip(bounds, bounds[1:])]
    loads = []  # per stage: (what it keeps, the streamed weights on its device at once: two where both fit the cap)
    for (a, b), part in zip(zip(bounds, bounds[1:]), parts):
        kept = shared + sum(sizes[a:b]) - sum(part)
        two, one = sum(sorted(part)[-2:]), max(part, default=0)
        loads.append((kept, two if kept + two <= cap else one))
    kept, window = max(loads, key=sum)
    moved = max(sum(part) for part in parts)
    transfer = inp.link.seconds(moved, max(len(part) for part in parts)) if inp.gathers_overlap else 0.0
    exposed = max(0.0, transfer - cost.compute)
    return replace(cost, busy=cost.busy + exposed, exposed=cost.exposed + exposed, transfer=cost.transfer + transfer,
                   traffic=cost.traffic + Traffic(host_in=sum(map(sum, parts))),
                   memory=cost.memory - cost.kept + kept + window, kept=kept, gathered=window,
                   note=f"{counted(len(chosen), 'layer')} ({sum(map(sum, parts)) / 2**20:.0f} MiB) streamed from host "
                        "memory per call")


def _staged_group(inp, rows: int, stages: int) -> tuple[Cost, list[int]]:
    """One chain of `stages` stages running `rows` rows, and its cuts (ValueError: more stages than layers)."""
    whole = inp.seconds(rows)
    total = sum(inp.layer_seconds) or 1.0
    costs = [whole * s / total for s in inp.layer_seconds]  # the fixed part too: a stage launches its layers' only
    cuts = balance(costs, stages)
    slowest = max(stage_costs(costs, cuts))
    handovers = [inp.link.seconds(rows * inp.shape.handover_bytes[c]) for c in cuts]
    exposed = max(0.0, max(handovers) - slowest)
    return (Cost(slowest + exposed, slowest, exposed, max(handovers), Traffic(), 0, whole + sum(handovers), rows),
            cuts)


PATCH_CHOICES = (2, 4, 8)


def pipeline_cost(inp, mesh) -> Cost:
    """pipefusion: the cut of the blocks' profile the strategy makes (the fastest within the cap on a stage's
    weights, the blocks' modulation spread over the stages), per row group, with the patches the plan proposes for
    the busiest group."""
    rows = [g for g in group_rows(mesh, inp.shape, inp.branches) if g]
    patches = proposed_patches(inp, mesh)
    groups = [_pipeline_group(inp, g, mesh.inner, patches) for g in rows]
    worst = max((cost for cost, _ in groups), key=lambda cost: cost.busy)
    peer = sum(g * _crossing(inp, cuts) * (mesh.inner - 1) for g, (_, cuts) in zip(rows, groups))
    cut = _stage_cut(inp, [1.0] * len(inp.layer_weight_bytes), mesh.inner, groups[0][1])
    kept = max(cut.loads) if cut else inp.weight_bytes // mesh.inner
    held = f"; weights per stage {' / '.join(f'{w / 2**20:.0f}' for w in cut.loads)} MiB" if cut else ""
    lent = f", the modulation of {counted(len(cut.lent()), 'block')} on another stage" if cut and cut.lent() else ""
    return replace(worst, traffic=Traffic(peer=peer), memory=kept + max(rows) * inp.activation_bytes_per_row,
                   kept=kept, note=f"{patches} patches proposed (--patches){held}{lent}")


def proposed_patches(inp, mesh) -> int:
    """The patches (of PATCH_CHOICES) with the shortest predicted patched call for the busiest row group."""
    busiest = max(group_rows(mesh, inp.shape, inp.branches))
    return min(PATCH_CHOICES, key=lambda m: (_pipeline_group(inp, busiest, mesh.inner, m)[0].busy, m))


def _pipeline_group(inp, rows: int, stages: int, patches: int) -> tuple[Cost, list[int]]:
    """One chain of `stages` stages running `rows` rows in `patches` patches, and its cuts."""
    whole = inp.seconds(rows)
    layers = inp.layer_seconds or (1.0,) * stages
    costs = [whole * s / (sum(layers) or 1.0) for s in layers]
    cuts = _pipeline_cut(inp, costs, stages)
    slowest = max(stage_costs(costs, cuts))
    relaunch = inp.fixed_seconds + inp.launch_seconds  # a patch through a stage launches its layers again
    compute = slowest * (patches + stages - 1) / patches + (patches - 1) * relaunch / stages
    handover = inp.link.seconds(rows * _crossing(inp, cuts))  # the whole sequence across one cut
    piece = inp.link.seconds(rows * _crossing(inp, cuts) / patches)
    exposed = (stages - 1) * piece + (patches - 1) * max(0.0, piece - slowest / patches)
    return (Cost(compute + exposed, compute, exposed, (stages - 1) * handover, Traffic(), 0,
                 whole + (stages - 1) * handover, rows), cuts)


def _pipeline_cut(inp, costs: list[float], stages: int) -> list[int]:
    """pipefusion's cut (strategies/pipefusion/cut.py): the fastest within the memory per device given
    (`inp.stage_cap_bytes`), else within the default cap on a stage's weights, the rest of the model counted on
    every stage, the blocks' modulation spread. Without the blocks' weights: balanced on time."""
    cut = _stage_cut(inp, costs, stages)
    return cut.cuts if cut else balance(costs, stages)


def _stage_cut(inp, costs: list[float], stages: int, cuts: list[int] | None = None):
    """cut.StageCut of the blocks' profile (`cuts` given: those cuts, the modulation spread over them); None
    without the blocks' weights."""
    if not inp.layer_weight_bytes or len(inp.layer_weight_bytes) != len(costs):
        return None
    sizes, held = list(inp.layer_weight_bytes), [max(0, inp.weight_bytes - sum(inp.layer_weight_bytes))] * stages
    movable = list(inp.layer_movable_bytes) if len(inp.layer_movable_bytes) == len(sizes) else None
    if cuts is None:
        return weights_cut(costs, sizes, held, inp.weight_bytes, stages, memory_bytes=inp.stage_cap_bytes,
                           movable=movable)
    holders, loads = spread(sizes, movable or [0] * len(sizes), held, cuts)
    return StageCut(list(cuts), holders, loads, 0)


def _crossing(inp, cuts: list[int]) -> int:
    """Bytes per row crossing a cut: the tokens (all streams) at the widest cut, else the sequence's width."""
    if inp.shape.handover_bytes and cuts:
        return max(inp.shape.handover_bytes[c] for c in cuts)
    return inp.shape.tokens * inp.shape.width * inp.shape.itemsize


def _stage_weights(inp, cuts: list[int]) -> int:
    """The heaviest stage's weights: its layers' plus what every stage holds (the rest of the model)."""
    if not inp.layer_weight_bytes:
        return inp.weight_bytes
    shared = max(0, inp.weight_bytes - sum(inp.layer_weight_bytes))
    return shared + int(max(stage_costs(list(inp.layer_weight_bytes), cuts)))


def tensor_cost(inp, mesh) -> Cost:
    """tensor: each rank computes 1/N of a row group's call (the blocks' share; the few whole layers, embeddings
    and modulation, counted as split too: optimistic) and all-reduces the activations twice per block (after
    attention, after the MLP), every rank sending its partial to every other; nothing overlaps them."""
    n = mesh.inner
    rows = [g for g in group_rows(mesh, inp.shape, inp.branches) if g]
    busiest = max(rows)
    activation = inp.shape.tokens * inp.shape.width * inp.shape.itemsize  # one row's hidden states
    reduces = 2 * inp.shape.attentions
    exchange = reduces * inp.link.seconds(busiest * activation * (n - 1), n - 1)
    compute = inp.part(busiest, 1 / n)
    peer = sum(g * activation * reduces * (n - 1) * n for g in rows)
    memory = inp.weight_bytes // n + busiest * inp.activation_bytes_per_row
    return Cost(compute + exchange, compute, exchange, exchange, Traffic(peer=peer), memory, rows=busiest,
                kept=inp.weight_bytes // n)


def sharded_cost(cost: Cost, inp, group: int) -> Cost:
    """`cost` with sharded weights over `group` devices (models/weight_shards.py): before each block runs, every
    device receives the other devices' pieces of it (inp.unit_bytes, the blocks and large layers). Where the
    next block's gather is posted ahead (CUDA: inp.gathers_overlap) it hides behind the compute and only what
    outlasts it is exposed; on CPU workers all of it is. Memory: the weights outside the blocks, 1/group of the
    blocks, and the blocks gathered at once (two posted ahead, else one)."""
    units = inp.unit_bytes
    if not units or group < 2:
        return cost
    moved = sum(units) * (group - 1) / group
    gather = inp.link.seconds(moved, len(units) * (group - 1))
    exposed = max(0.0, gather - cost.compute) if inp.gathers_overlap else gather
    kept = inp.weight_bytes - sum(units) + sum(units) // group
    gathered = (2 if inp.gathers_overlap else 1) * max(units)
    return replace(cost, busy=cost.busy + exposed, exposed=cost.exposed + exposed, transfer=cost.transfer + gather,
                   traffic=cost.traffic + Traffic(peer=int(moved * group)),
                   memory=cost.memory - cost.kept + kept + gathered, kept=kept, gathered=gathered)


def cost_for(strategy):
    """The cost function of a registered strategy, by what it declares (it splits rows, tokens or stages), or
    None where the model has none yet."""
    if strategy.axes == ("patch",):
        return patch_cost
    if strategy.splits_tokens:
        return sequence_cost
    if strategy.axes == ("stages",):
        return staged_cost
    if strategy.axes == ("tensor",):
        return tensor_cost
    if strategy.axes == ("pipefusion",):
        return pipeline_cost
    if not strategy.axes:
        return rows_cost
    return None
