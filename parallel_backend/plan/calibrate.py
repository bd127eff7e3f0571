"""auto's plan, per call key (host side; engine/timing.py is the worker side), with the cost model `tandem plan` uses.

A key is the model's fingerprint, the call's rows, branches, latent shape and dtype and text shape, whether a
split by tokens is allowed for the call (engine: refusals), and the pool's device count (a pool restarted on
other devices chooses again). The first two calls of a key run whole on rank 0 (their outputs are the calls'),
the first as it is (a warm-up: a shape's first run pays for allocations and kernel choices), the second timed
there: the whole call, one row of it, and for a model with a sequence split its token-mixing attentions (those
whose query and key lengths are equal and the longest seen: their count, tokens, heads and width, one row's
seconds). With the call's shapes (what a device receives per row, the output per row) and the link these make the
cost model's `Inputs`; `model.candidates` predicts every mesh and `choose(..., exact_only=True)` picks (auto
promises one device's output: no stale strategy, unless the config's `allow_stale` lets them compete), never a split predicted under choose.FLOOR. Later calls of
the key run on the chosen mesh; a one-device choice runs whole on rank 0.

The devices: the pool's link, measured once per pool (plan/probe.py: two workers swap 4 bytes and 16 MiB);
on CPU workers, which share the machine's cores, their contention (a one-row call on rank 0 alone, then on
every rank at once) and the pool's overhead per call (the lone call's wall time on the host less its compute
on the worker); GPUs are taken not to slow each other (1.0) and their overhead is assumed (HOST_OVERHEAD_S).
`AutoPlans.given` replaces any of these and the measured call's seconds (a test's slow link; a test's fixed
figures, so that its choice is the same on any machine).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from .. import strategies
from ..runtime.calls import _map_tensors
from ..engine.mesh import Mesh, whole_on_rank_0
from .choose import Choice, choose
from .links import Link
from .model import Inputs, candidates, row_split_seconds
from .probe import DeviceFigures, measure_calls, measure_link
from .traffic import CallShape
from ..runtime.words import counted

# The pool's own cost per call (messages, pickling, the host's scheduler step). CPU workers: `tandem bench`'s
# "ovh ms" for cfg and batch on `small`, 2 CPU workers, 10 calls: 4.8 and 3.3 ms (2026-12-01, a run the bench
# marked disturbed: other processes kept 47 % of the cores busy). CUDA: not measured (no GPU here): assumed.
HOST_OVERHEAD_S = {"cpu": (4e-3, "measured: tandem bench's per-call overhead, small on 2 CPU workers"),
                   "cuda": (1e-3, "assumed: not measured on a GPU yet")}


def tensor_bytes(value) -> int:
    """The bytes of every tensor in `value` (nested lists, tuples, dicts)."""
    sizes = []
    _map_tensors(value, lambda t: sizes.append(t.numel() * t.element_size()) or t)
    return sum(sizes)


def device_kind(devices) -> str:
    return "cuda" if any(str(d).startswith("cuda") for d in devices) else "cpu"


@dataclass(frozen=True)
class TokenMixing:
    """The call's token-mixing attentions: how many, over how many tokens, heads x head width, bytes per element,
    and one row's seconds for one of them."""

    count: int
    tokens: int
    heads: int
    width: int
    itemsize: int
    seconds_per_row: float


def token_mixing(attentions) -> TokenMixing | None:
    """From a call's timed attentions (models.attention_timing.Attention): those whose query and key lengths are
    equal and the longest seen (cross-attention to the text and shorter self-attentions left out); None if none."""
    equal = [a for a in attentions if a.queries == a.keys]
    if not equal:
        return None
    tokens = max(a.queries for a in equal)
    mixing = [a for a in equal if a.queries == tokens]
    first = mixing[0]
    return TokenMixing(len(mixing), tokens, first.heads, first.heads * first.head_dim, first.itemsize,
                       statistics.median(a.seconds / a.rows for a in mixing))


@dataclass(frozen=True)
class Decision:
    """A key's mesh, the choice behind it, the inputs it was predicted from and what the log says (in order)."""

    mesh: Mesh
    choice: Choice
    inputs: Inputs
    notes: tuple[str, ...]


class AutoPlans:
    """One engine's auto choices by key (use them under the engine's lock)."""

    def __init__(self):
        self.given: dict = {}  # figures that replace measured ones (plan_auto_with)
        self.decisions: dict[tuple, Decision] = {}
        self._warmed: set[tuple] = set()
        self._measured_on: tuple | None = None  # the pool start the figures below were measured on
        self._link: Link | None = None
        self._per_model: dict[str, tuple[float, float]] = {}  # fingerprint -> (contention, overhead seconds)

    @staticmethod
    def key(fingerprint: str, call, tokens_allowed: bool, devices: int, allow_stale: bool = False) -> tuple:
        return (fingerprint, devices, call.rows, call.branches, tuple(call.x.shape), str(call.x.dtype),
                None if call.context is None else tuple(call.context.shape), tokens_allowed, allow_stale)

    def device_figures(self, engine, fingerprint: str, call) -> DeviceFigures:
        """The pool's link (measured once per pool start), and per model its contention and overhead per call
        (CPU workers: a one-row call alone and on every worker at once, plan/probe.py; GPUs: 1.0 and the assumed
        overhead); `given` replaces any of them (a test's slow link)."""
        start = (engine.pool.stats.starts, tuple(engine.pool.devices))  # a restarted pool: measured again
        if self._measured_on != start:
            self._measured_on, self._per_model = start, {}
            self._link = self.given.get("link") or measure_link(engine)
        if fingerprint not in self._per_model:
            if {"contention", "overhead_s"} <= self.given.keys():
                figures = (self.given["contention"], self.given["overhead_s"])
            elif device_kind(engine.pool.devices) == "cpu":
                figures = measure_calls(engine, fingerprint, call.select(range(1)), repeats=1, budget_s=0.0)
            else:
                figures = (1.0, HOST_OVERHEAD_S["cuda"][0])
            self._per_model[fingerprint] = figures
        contention, overhead = self._per_model[fingerprint]
        return DeviceFigures(self._link, self.given.get("contention", contention),
                             self.given.get("overhead_s", overhead))

    def row_split_cost(self, engine, fingerprint: str, call, one_row_s: float):
        """The plan's time of a row split (model.row_split_seconds) of `call` as `cost(sizes, speeds)`: the
        fastest device's measured one-row seconds, the pool's link, contention and overhead (device_figures); None
        where the pool has no link to cost (one device)."""
        figures = self.device_figures(engine, fingerprint, call)
        if figures.link is None:
            return None
        rows = max(1, call.rows)
        shape = CallShape(rows, tensor_bytes([call.x, call.t, call.context, call.extras]) // rows,
                          tensor_bytes([call.x]) // rows)
        inputs = figures.apply(Inputs(shape, "", 1, {1: one_row_s}, figures.link))
        return lambda sizes, speeds: row_split_seconds(inputs, sizes, speeds)

    def mesh(self, key) -> Mesh | None:
        """The mesh chosen for `key`, or None before it is measured."""
        decision = self.decisions.get(key)
        return None if decision is None else decision.mesh

    def warm_up(self, key, devices: int) -> Mesh | None:
        """The mesh of `key`'s first call (whole on rank 0, untimed), or None: it had it, measure this one."""
        if key in self._warmed:
            return None
        self._warmed.add(key)
        return whole_on_rank_0(devices, "auto: this shape's first call warms one device up before it is measured")

    def decide(self, key, family: str, call, computed, hint, devices: list[str], figures: DeviceFigures,
               allow_stale: bool = False) -> Decision:
        """Chooses `key`'s mesh from its measured call, `computed` on one device (a Computed of engine/timing.py);
        hint: the model's SequenceHint where the call may be split by tokens, else None; figures: the pool's
        measured (or given) link, contention and overhead (plan/probe.py); allow_stale (config.allow_stale):
        approximate strategies compete too, else exact ones only."""
        link = figures.link  # auto plans only on pools of 2 or more devices: always a link
        measured_s, per_row = computed.compute_s, self.given.get("seconds_per_row")
        computed = given_seconds(computed, call.rows, per_row)
        mixing = token_mixing(computed.extra.get("attentions", ())) if hint is not None else None
        inputs = replace(call_inputs(family, call, computed, hint, mixing, link, figures.overhead_s),
                         contention=figures.contention)
        found = candidates(inputs, len(devices))
        if mixing is None:  # nothing measured to predict a split by tokens from (or a call it cannot take)
            found = [c for c in found if not c.mesh or not (strategies.get(c.strategy).splits_tokens
                                                            or strategies.get(c.strategy).patches_tokens)]
        choice = choose(found, exact_only=not allow_stale)
        mesh = mesh_of(choice, len(devices))
        source = "given" if "link" in self.given else "measured on this pool"
        given_s = None if per_row is None else computed.compute_s
        notes = (measured_note(measured_s, hint, mixing, link, source, figures, given_s), choice_note(mesh, choice))
        decision = self.decisions[key] = Decision(mesh, choice, inputs, notes)
        return decision


def given_seconds(computed, rows: int, per_row: float | None):
    """`computed` (a measured call of `rows` rows) with `per_row` seconds a row in place of its measured times
    (None: as measured); its attentions keep their measured share of the call."""
    if per_row is None:
        return computed
    scale = rows * per_row / computed.compute_s if computed.compute_s > 0 else 0.0
    attentions = [replace(a, seconds=a.seconds * scale) for a in computed.extra.get("attentions", ())]
    return replace(computed, compute_s=rows * per_row,
                   extra={**computed.extra, "one_row_s": per_row, "attentions": attentions})


def call_inputs(family: str, call, computed, hint, mixing: TokenMixing | None, link: Link,
                overhead_s: float) -> Inputs:
    """The cost model's inputs for `call` from its run on one device (`computed`) and its shapes."""
    one = call.select(range(1))
    fields = dict(rows=call.rows, input_bytes=tensor_bytes([one.x, one.t, one.context, one.extras]),
                  output_bytes=tensor_bytes(computed.out) // call.rows, itemsize=call.x.element_size())
    attention = 0.0
    if mixing is not None:
        heads = hint.heads or mixing.heads  # the heads the family's split checks, where it can tell
        fields.update(tokens=mixing.tokens, width=mixing.width, heads=heads, attentions=mixing.count,
                      itemsize=mixing.itemsize)
        attention = mixing.seconds_per_row
    seconds = {call.rows: computed.compute_s, 1: computed.extra.get("one_row_s", computed.compute_s / call.rows)}
    return Inputs(CallShape(**fields), family, call.branches, seconds, link, attention, host_overhead_s=overhead_s)


def mesh_of(choice: Choice, devices: int) -> Mesh:
    """The mesh of the chosen candidate (one device: the whole call on rank 0), its reason as `why`."""
    best = choice.best
    if not best.mesh:
        return whole_on_rank_0(devices, choice.reason)
    axes = strategies.get(best.strategy).axes
    return Mesh(best.strategy, best.mesh["cfg"], best.mesh["batch"], tuple(best.mesh[a] for a in axes), devices,
                choice.reason)


def measured_note(seconds: float, hint, mixing: TokenMixing | None, link: Link, source: str,
                  figures: DeviceFigures, given_s: float | None = None) -> str:
    what = f"{1000 * seconds:.1f} ms"
    if given_s is not None:
        what = f"{1000 * given_s:.1f} ms given in place of the measured {what}"
    if mixing is not None:
        what += (f"; {counted(mixing.count, 'token-mixing attention')} of {mixing.tokens} tokens x {mixing.heads} heads, "
                 f"{1000 * mixing.seconds_per_row:.2f} ms each per row")
    elif hint is not None:
        what += "; no token-mixing attention seen through the model's attention entry point: no split by tokens"
    return (f"Tandem: auto ran the first two calls of this model and shape on one device and measured the second "
            f"({what}) to choose the split; "
            f"link {link.name} ({source}: {link.bandwidth / 1e9:.2f} GB/s, {1e6 * link.latency:.0f} us); devices "
            f"{figures.contention:.2f}x slower all busy; {1000 * figures.overhead_s:.1f} ms pool overhead per call")


def choice_note(mesh: Mesh, choice: Choice) -> str:
    if mesh.size == 1:
        return f"Tandem: auto runs this call on one device: {choice.reason.removeprefix('one device: ')}"
    return f"Tandem: auto chose {mesh.describe()} for this model and shape: {choice.reason}"


def auto_plans(engine) -> AutoPlans:
    """The engine's one AutoPlans (made on first use), kept in its state: what hosts pass as Engine.run's planner."""
    state = engine.state("auto")
    if "plans" not in state:
        state["plans"] = AutoPlans()
    return state["plans"]


def plan_auto_with(engine, **given) -> None:
    """The plan takes these figures instead of the pool's measured ones (auto's choice, and which slow device
    sits out, engine.sizing.sized_mesh), from the next call of every key on: `link` (a plan.links.Link),
    `contention`, `overhead_s`, `seconds_per_row` (one device's time per row of auto's measured call; none:
    all measured). Choices made before are dropped."""
    unknown = set(given) - {"link", "contention", "overhead_s", "seconds_per_row"}
    if unknown:
        raise ValueError(f"plan_auto_with takes link, contention, overhead_s and seconds_per_row; got "
                         f"{', '.join(sorted(unknown))}")
    with engine.job():
        plans = engine.state("auto")["plans"] = AutoPlans()
        plans.given = {k: v for k, v in given.items() if v is not None}
