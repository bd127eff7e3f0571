"""The engine: one long-lived object per worker pool that turns model calls into work for the pool's devices.

`engine_for(pool)` gives the pool's one Engine. It resolves each call's mesh (a named strategy: `mesh.resolve`;
`auto`: the plan's choice per model and shape, given as `planner`), asks the strategy for per-rank work, sends
it, and hands the replies back to the strategy to gather. What must outlive a call lives here, per pool, behind
one lock: each strategy's state (asyncdiff's measured profiles and the stage setup the workers hold), auto's
choices (kept by the plan in `state("auto")`: plan.calibrate.auto_plans), job numbers, what the log was already
told. Hosts hold a `hosts.executor.ParallelExecutor`: a config plus the host's own job tracking, bound to the
pool's engine, which hands the engine auto's planner with each call.

Jobs queue: a host thread inside `executor.job()` owns the engine until its sampling run ends (asyncdiff keeps
state between the calls of a job, and a second model's calls would swap models under it); calls made outside
a job are jobs of one call.
"""

from __future__ import annotations

import itertools
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import strategies
from ..models import sequence_refusal, sequence_whole_rows
from ..runtime.calls import ModelCall
from ..runtime.carry import CannotCarry
from ..runtime.devices import PoolUnavailable, resolve_devices
from ..runtime.messages import TimedForward
from ..runtime.pool import WorkerError
from ..strategies.base import join_rows
from . import weights
from .config import ParallelConfig
from .mesh import Mesh, SequenceHint, fit, resolve, whole_on_rank_0, whole_rows
from .sizing import sized_mesh
from ..runtime.words import agree, counted

log = logging.getLogger("tandem")
_ENGINES_LOCK = threading.Lock()


@dataclass
class CallResult:
    """One call's output and what it cost: per rank, its own compute seconds, the seconds it sat waiting on
    peers and the strategy's own counters (`Computed.extra`, e.g. a sequence group's passes); the bytes all
    ranks sent each other; the mesh it ran on; the weights each worker holds of the model (whole, cut or
    sharded)."""

    out: object
    mesh: Mesh
    compute_s: dict = field(default_factory=dict)
    wait_s: dict = field(default_factory=dict)
    bytes_sent: int = 0
    extra: dict = field(default_factory=dict)
    weights_bytes: dict = field(default_factory=dict)  # rank -> the bytes of this call's model its worker holds


class Engine:
    def __init__(self, pool):
        self.pool = pool
        self._lock = threading.RLock()  # one job at a time (held by the thread whose job runs)
        self._states: dict[str, dict] = {}
        self._job_numbers = itertools.count(1)
        self._said: set[str] = set()
        self._refused: dict[str, str] = {}  # fingerprint -> why the workers could not take that model
        self._shards: dict[str, dict] = {}  # fingerprint -> rank -> its shard group (engine/weights.py)
        self.last_mesh: Mesh | None = None  # the mesh the last call ran on

    def state(self, owner: str) -> dict:
        """The mutable state kept for `owner` (a strategy's name) across calls; use it under `run`'s lock."""
        with self._lock:
            return self._states.setdefault(owner, {})

    def next_job(self) -> int:
        with self._lock:
            return next(self._job_numbers)

    def device_count(self) -> int:
        """The pool's devices, counted without starting it (they exist: resolve_devices checks)."""
        return len(self.pool.devices if self.pool.started else resolve_devices(self.pool.requested_devices))

    def pool_generation(self) -> tuple:
        """Changes whenever the workers' held state may be lost (a restart, a model loaded or dropped)."""
        return (self.pool.stats.starts, self.pool.stats.model_loads, self.pool.loaded_fingerprints)

    @contextmanager
    def job(self):
        """Holds the engine for one job: other threads' calls wait until the block ends."""
        with self._lock:
            yield self

    def load(self, module, family: str, fingerprint: str | None = None) -> str:
        """Ships a model to the workers ahead of its first call, between jobs (never under a running one)."""
        with self._lock:
            return self.pool.ensure_model(module, family, fingerprint)

    def hold(self, module, family: str, fingerprint: str | None = None, recipe=None) -> str:
        """Makes every worker hold `module` whole (shipped if they lack it), in a job's middle; returns its
        fingerprint. Raises CannotCarry where the workers refuse it (see _hold_model)."""
        with self._lock:
            self.pool.start()
            return self._hold_model(module, family, fingerprint, recipe)

    def request(self, work: dict, what: str, collective: bool = False, kind=None) -> dict:
        """Sends each rank its message; returns rank -> the reply's value (errors raise WorkerError).
        kind: the kind of call, whose measured time sets its deadline (see WorkerPool.request)."""
        extra = {}
        for message in work.values():
            groups = self._shards.get(getattr(message, "fingerprint", None))
            if groups:  # every rank of a shard group runs each call: one row for those without work
                extra = weights.fillers(work, groups)
                break
        replies = self.pool.request({**work, **extra}, what, collective=collective or bool(extra), kind=kind)
        return {rank: reply.value for rank, reply in replies.items() if rank not in extra}

    def _weights(self, config: ParallelConfig, module, family: str) -> str:
        """replicated or sharded for this model (config.weights; auto: sharded where the whole weights do not fit
        the memory per device), said once per model where auto shards. With a memory per device given, weights
        that do not fit it even sharded are refused in one sentence, before any weight moves."""
        devices = self.device_count()
        staged = config.strategy != "auto" and strategies.get(config.strategy).stage_weights
        if config.weights == weights.REPLICATED or devices < 2 or staged:  # stages hold their own layers only
            return weights.REPLICATED
        given = config.memory_per_device is not None
        if not given and config.weights == weights.SHARDED:  # no budget to check: nothing to measure per call
            return weights.SHARDED
        budget = int(config.memory_per_device * 2**30) if given else weights.default_budget_bytes(
            list(self.pool.devices if self.pool.started else resolve_devices(self.pool.requested_devices)))
        size, _ = weights.sizes(module)
        chosen = weights.resolve(config.weights, size, budget)
        name = family.split(":", 1)[-1]
        held = weights.sharded_bytes(module, devices) if chosen == weights.SHARDED and given else 0
        if held > budget:
            raise ValueError(f"this {name} model does not fit {config.memory_per_device:g} GiB per device even with "
                             f"its weights sharded over {devices} devices: each would hold {held / 2**30:.2f} GiB of "
                             "weights; raise the memory per device or add devices")
        if chosen == weights.SHARDED and config.weights == weights.AUTO:
            self._say(f"Tandem: weights 'auto' shards this {name} model over the devices: its {size / 2**30:.2f} GiB "
                      f"of weights do not fit {budget / 2**30:.2f} GiB per device with room for the activations")
        return chosen

    def run(self, module, family: str, call: ModelCall, config: ParallelConfig,
            fingerprint: str | None = None, recipe=None, needs_split: bool = False, planner=None) -> CallResult:
        """Runs one model call on the pool as `config` says. The engine alone looks after the pool on the way:
        on a job's first call it restarts a pool whose worker died or stopped since the last job and tries
        machines left out again, it starts the pool if it is down, and it ships the model if the workers lack it
        (as its recipe where the host gives one: WorkerPool.ensure_model).
        Refusals a host answers with its own path raise, each one sentence: CannotCarry for a model or a patch
        the workers cannot take, PoolUnavailable for a pool whose devices cannot be reached or, with
        `needs_split`, a pool down to one device. Any other error (a worker that fails, dies or hangs) is a fault.
        planner: auto's choices for this engine (plan.calibrate.auto_plans(engine), given by the host: the plan
        sits above the engine). auto: the first two calls of a key run whole on rank 0, the second measured, and
        choose the key's mesh for the calls after them; the planner also costs a slow device's share
        (sizing.sized_mesh). Without one, `auto` is refused and a slow device is judged by its rows alone."""
        if config.strategy == "auto" and planner is None and self.device_count() > 1:
            raise ValueError("strategy 'auto' needs auto's planner: run calls through hosts.executor.ParallelExecutor "
                             "or pass planner=plan.calibrate.auto_plans(engine)")
        with self._lock:
            self.pool.before_job(call.job)  # a job's first call: a worker lost since the last job, a machine back
            self.pool.start()  # before the mesh: a machine that cannot be reached leaves fewer devices
            if needs_split and len(self.pool.devices) < 2:
                raise PoolUnavailable(f"only one device ({self.pool.devices[0]})")
            if fingerprint in self._refused:  # the workers refused this model before: it is not shipped again
                raise CannotCarry(self._refused[fingerprint])
            call = self.pool.carry(call)  # host objects in its inputs (a host's patches): carry.CannotCarry if not
            named = strategies.get(config.strategy) if config.strategy != "auto" else None
            if named is not None:  # auto splits the sequence only of a model that has a sequence split
                named.check_family(family)  # before any weights travel
                named.check_weights(module, family)
            cuts = named is not None and named.cuts_layers  # a patch would see a share of each layer's heads
            tokens = named is not None and (named.splits_tokens or named.patches_tokens)
            hint = sequence_hint(module, family)
            refused = sequence_refusal(family, call) if hint is not None else None
            if refused and tokens:
                raise ValueError(f"strategy {config.strategy!r} cannot split this call by tokens: it has "
                                 f"{refused}; use cfg, batch or auto for it")
            whole = sequence_whole_rows(family, call) if hint is not None and (cuts or not refused) else None
            if refused or whole:
                hint = None
                if named is None:
                    self._say(f"Tandem: auto keeps this call to whole rows (cfg, batch): it has {refused or whole}, "
                              "which a split by tokens cannot take")
                elif (tokens or cuts) and whole:
                    share = "heads" if cuts else "tokens"
                    self._say(f"Tandem: strategy {config.strategy!r} runs this call on whole rows (cfg, batch): it "
                              f"has {whole}, whose effect on a share of the {share} is not known")
            planned = named is None and self.device_count() > 1
            if planned:
                mesh = None
            elif whole and (tokens or cuts):
                mesh = whole_rows(self.device_count(), call.branches, call.rows)
            else:
                mesh = self._named_mesh(config, call, hint)
            if not planned:
                strategies.get(mesh.strategy).check_call(mesh, module, family, call)
            cut = None if planned else strategies.get(mesh.strategy).weights_layout(mesh)
            placed = self._weights(config, module, family)
            if placed == weights.SHARDED or cut is not None:  # a cut model is held under a fingerprint of its own
                from ..runtime.shipping import model_fingerprint

                fingerprint = fingerprint or model_fingerprint(module, family)
            local = fingerprint[:24] if fingerprint and weights.local_cpus(self.pool.devices) else None
            layout = weights.layout(placed, cut, self.device_count(), local)
            fingerprint = self._hold_model(module, family, self._fingerprint_as(layout, module, family, fingerprint),
                                           recipe, layout, lambda cut: weights.reads(module, family, cut))
            loaded, groups = self.pool.loaded_fingerprints, weights.shard_groups(layout)
            self._shards = {f: g for f, g in self._shards.items() if f in loaded and f != fingerprint}  # held ones
            if groups:
                self._shards[fingerprint] = groups
            if planned:
                key = planner.key(fingerprint, call, hint is not None, self.device_count(), config.allow_stale)
                mesh = planner.mesh(key) or planner.warm_up(key, self.device_count())
                if mesh is None:
                    return self._measure_and_choose(planner, family, call, fingerprint, hint, key,
                                                    config.allow_stale)
            self._say_once(mesh)
            strategy = strategies.get(mesh.strategy)
            # a tensor cut splits evenly: the slowest device sets its pace; stages are sized by the devices' speeds
            if cut is None or strategy.stage_weights:
                mesh = sized_mesh(self, mesh, config, fingerprint, call, planner)
            work = strategy.plan(self, call, mesh, config, fingerprint)
            computed = self.request(work, _label(call), collective=strategy.collective,
                                    kind=_kind(fingerprint, mesh.describe(), call))
            out = strategy.gather(call, mesh, computed)
            held = {rank: c.extra["weights_bytes"] for rank, c in computed.items() if "weights_bytes" in c.extra}
            if held:  # a strategy that cut the weights says what each worker holds now
                self.pool.note_weights_bytes(fingerprint, held)
            self._say_holdings(fingerprint, module, family, mesh.strategy, placed)
            self.pool.stats.calls += 1
            self.last_mesh = mesh
        return CallResult(out, mesh, {r: c.compute_s for r, c in computed.items()},
                          {r: c.wait_s for r, c in computed.items()}, sum(c.bytes_sent for c in computed.values()),
                          {r: c.extra for r, c in computed.items()}, dict(self.pool.weights_bytes.get(fingerprint, {})))

    def _hold_model(self, module, family: str, fingerprint: str | None, recipe, cuts: dict | None = None,
                    reads=None) -> str:
        """WorkerPool.ensure_model, where a model the workers refuse while the pool stays up (its recipe does not
        build there, its weights cannot be written) raises CannotCarry, its fingerprint remembered so that its
        later calls are refused at once (`run`). A worker that died or hung fails the call instead."""
        try:
            return self.pool.ensure_model(module, family, fingerprint, recipe, cuts, reads)
        except CannotCarry as exc:
            reason = str(exc)
        except WorkerError as exc:
            if not self.pool.started:
                raise
            reason = f"the workers could not take this model ({exc})"
        if fingerprint is not None:
            self._refused[fingerprint] = reason
        raise CannotCarry(reason)

    @staticmethod
    def _fingerprint_as(layout, module, family: str, fingerprint: str | None) -> str | None:
        """The fingerprint the workers hold the model under for `layout` (Strategy.weights_layout): its own for
        whole weights; for a cut the workers make in place, one of the cut's own, so that the whole model and
        each cut are held, kept and evicted as separate models (max_models) and a whole-model call never meets a
        cut copy."""
        if layout is None:
            return fingerprint
        import hashlib

        from ..runtime.shipping import model_fingerprint

        base = fingerprint or model_fingerprint(module, family)
        return f"{base}~{hashlib.sha256(repr(sorted(layout.items())).encode()).hexdigest()[:12]}"

    def _named_mesh(self, config: ParallelConfig, call: ModelCall, hint) -> Mesh:
        """The mesh of a named strategy; on a pool running without a machine it could not reach, the one that
        fits the devices left where the configured degrees no longer do (mesh.fit), said once."""
        if not self.pool.left_out:
            return resolve(config, self.device_count(), call.branches, call.rows, hint)
        mesh = fit(config, self.device_count(), call.branches, call.rows, hint)
        if config.strategy != "auto" and mesh.strategy != config.strategy:
            self._say(f"Tandem: strategy {config.strategy!r} does not fit the {counted(self.device_count(), 'device')} left "
                      f"while {', '.join(self.pool.left_out)} is away: {mesh.describe()} instead (exact)")
        return mesh

    def _measure_and_choose(self, planner, family: str, call: ModelCall, fingerprint: str, hint, key,
                            allow_stale: bool = False) -> CallResult:
        """auto's measured call of a key: the whole call on rank 0, timed there (its output is the call's); the
        key's mesh chosen from it (among approximate strategies too where `allow_stale`) and said in the log."""
        message = TimedForward(fingerprint, call, attentions=hint is not None)
        computed = self.request({0: message}, f"{_label(call)}, measured on one device for auto",
                                kind=_kind(fingerprint, "auto's measured call", call))[0]
        devices = list(self.pool.devices)
        figures = planner.device_figures(self, fingerprint, call)
        for note in planner.decide(key, family, call, computed, hint, devices, figures, allow_stale).notes:
            self._say(note)
        self.pool.stats.calls += 1
        self.last_mesh = whole_on_rank_0(len(devices))
        return CallResult(join_rows([computed.out], call.x), self.last_mesh, {0: computed.compute_s},
                          {0: computed.wait_s}, computed.bytes_sent, {0: computed.extra},
                          dict(self.pool.weights_bytes.get(fingerprint, {})))

    def _say_once(self, mesh: Mesh) -> None:
        """Logs, once each, which devices sit out (auto's choices say why in their own line)."""
        if mesh.idle and not (mesh.why and mesh.size == 1):
            devices = self.pool.devices
            idle = ", ".join(f"{devices[r]} (worker {r})" for r in range(mesh.size, len(devices)))
            why = "auto's plan for this call" if mesh.why else "this call cannot use more devices"
            self._say(f"Tandem: {mesh.describe()}: {idle} {agree(mesh.idle, 'sits')} out: {why}")

    def _say_holdings(self, fingerprint: str, module, family: str, strategy: str, placed: str) -> None:
        """Logs, once, which device holds how much of a model whose workers hold less than the whole."""
        held = self.pool.weights_bytes.get(fingerprint, {})
        whole = weights.sizes(module)[0] if held else 0
        if not held or max(held.values()) >= whole:
            return
        named = strategies.get(strategy)
        how = ["each stage its own layers"] if named.stage_weights else []
        how += [f"{strategy}'s share of every layer"] if named.cuts_layers else []
        how += ["sharded"] if placed == weights.SHARDED else []
        parts = ", ".join(f"worker {r} ({self.pool.devices[r]}) {held[r] / 2**20:.1f} MiB" for r in sorted(held))
        self._say(f"Tandem: the {family.split(':', 1)[-1]} model's {whole / 2**20:.1f} MiB of weights "
                  f"({', '.join(how)}): {parts}")

    def say(self, note: str) -> None:
        """Logs `note` once per engine (a strategy's or the speeds' notes)."""
        self._say(note)

    def _say(self, note: str) -> None:
        if note not in self._said:
            self._said.add(note)
            log.info(note)


def _label(call: ModelCall) -> str:
    return f"call {call.index}" + ("" if call.step is None else f" (step {call.step})")


def _kind(fingerprint: str, how: str, call: ModelCall) -> tuple:
    """The kind of a call, whose measured times set its deadline (WorkerPool.request)."""
    return (fingerprint, how, tuple(call.x.shape), str(call.x.dtype),
            None if call.context is None else tuple(call.context.shape))


def sequence_hint(module, family: str) -> SequenceHint | None:
    """What the mesh needs of a model whose family can split its token sequence (its attention heads); None for
    one that cannot."""
    from ..models import attention_heads, sequence_runner

    if sequence_runner(family) is None:
        return None
    return SequenceHint(attention_heads(family, module))


def engine_for(pool) -> Engine:
    """The pool's one engine (made on first use)."""
    with _ENGINES_LOCK:
        engine = getattr(pool, "_tandem_engine", None)
        if engine is None:
            engine = pool._tandem_engine = Engine(pool)
        return engine
