"""asyncdiff: the UNet cut into stages, one per device, run on one-call-stale inputs (AsyncDiff, NeurIPS 2024).

Host side (this module): the first call of a model and input shape measures every layer's cost on one worker;
the cut that balances the stages is chosen from it (`schedule.balance`) and every worker is told its stage.
Each row group of the mesh (cfg x batch) runs the call on its own chain of stages; the last stage's output is
the group's prediction. The schedule (what each stage does in each call) is pure: `schedule.py`; the worker
side runs its actions: `runner.py`.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from ...runtime.messages import Computed
from ...models.stage_families import STAGE_FAMILIES
from ...runtime.knobs import Knob
from ..base import BenchJob, Strategy
from ..stale import WARMUP
from .messages import PlaceStages, ProbeExchange, ProfileLayers, StageCall, StagePlan
from .schedule import SLACK, balance, default_cap, explain, simulate, stage_actions, stage_costs, stage_step, \
    streamed  # noqa: F401 (API)
from ...runtime.words import counted


STAGES = Knob("stages", int, None, "asyncdiff: the stages the UNet is cut into, one device each (default: the "
              "devices left after cfg and batch)", low=1, unset=True, axis="they cut the model into stages")
STRIDE = Knob("stride", int, 1, "asyncdiff: 1, or 2 to exchange activations every second call only (less traffic, "
              "staler inputs)", choices=(1, 2))
SHARDED = "sharded"  # config.weights (engine/weights.py, a floor above): stages then stream what exceeds their share
TIME_SHIFT = Knob("time_shift", bool, False, "asyncdiff: each stage embeds the timestep its input came from")


class AsyncDiff(Strategy):
    name = "asyncdiff"
    exact = False
    summary = ("the UNet cut into stages, one per device, run on one-step-stale inputs (approximate after "
               "warm-up; works at cfg 1).")
    axes = ("stages",)
    bench_job = BenchJob(1, True)
    collective = True
    adapters = STAGE_FAMILIES  # the families models/stages.py can cut into layers
    scope = "cuts UNets only"
    stage_weights = True
    min_warmup = 1  # a later stage's first input is what the stage before hands it in an exact step
    knobs = (STAGES, WARMUP, STRIDE, TIME_SHIFT)

    # ---- host side ---------------------------------------------------------------------------------------

    def plan(self, engine, call, mesh, config, fingerprint: str) -> dict:
        shares = mesh.row_shares(call.rows, call.branches)
        groups = [(g, rows) for g, rows in enumerate(shares) if len(rows)]
        self._ensure_stages(engine, fingerprint, call.select(groups[0][1]), mesh, config)
        work = {}
        for g, rows in groups:
            share = replace(call.select(rows), stream=(*call.stream, "rows", rows.start, rows.stop))
            message = self.call_message(engine, fingerprint, share, config)
            for rank in mesh.ranks(g):
                work[rank] = message
        return work

    def call_message(self, engine, fingerprint: str, share, config):
        """The message each stage of a row group gets for its share of the call (`share`: its rows, its stream)."""
        return StageCall(fingerprint, share)

    def gather(self, call, mesh, replies: dict[int, Computed]):
        import torch

        last = [mesh.ranks(g)[-1] for g in range(mesh.groups) if mesh.ranks(g)[-1] in replies]
        return torch.cat([replies[rank].out for rank in last]).to(call.x.device, call.x.dtype)

    def _ensure_stages(self, engine, fingerprint: str, sample, mesh, config) -> None:
        """Measures the model for this input shape (once per engine), picks the balanced cut, sets up every
        worker of the mesh (again only when the cut, the knobs, the model or the pool's workers changed)."""
        from ...models.stages import Profile, describe  # torch: imported where stages are cut, not with the registry

        state = engine.state(self.name)
        profiles = state.setdefault("profiles", {})
        shape_key = (fingerprint, tuple(sample.x.shape[1:]), str(sample.x.dtype),
                     None if sample.context is None else tuple(sample.context.shape[1:]))
        if shape_key not in profiles:
            reply = engine.request({0: self.profile_message(fingerprint, sample)}, "measuring the model's layers")[0]
            profiles[shape_key] = Profile(reply["names"], reply["layer_seconds"], reply["crossing"],
                                          reply.get("layer_bytes"), reply.get("held_bytes"),
                                          reply.get("movable_bytes"))
        profile = profiles[shape_key]
        speeds = stage_speeds(mesh)
        setup_key = (shape_key, mesh.groups, mesh.inner, self.setup_knobs(config), speeds, engine.pool_generation())
        if state.get("setup") == setup_key:
            return
        stages = mesh.inner
        cuts, weights = self.cut(engine, profile, stages, speeds, config)
        crossing = tuple(tuple(c) for c in profile.crossing)
        work = {}
        for g in range(mesh.groups):
            for stage, rank in enumerate(mesh.ranks(g)):
                work[rank] = self.place_message(fingerprint, config, StagePlan(
                    stage, stages, cuts, rank - 1 if stage else None, rank + 1 if stage < stages - 1 else None,
                    config.warmup, config.stride, config.time_shift, crossing), weights)
        engine.request(work, "placing the stages")
        state["setup"] = setup_key
        state.pop("warm", None)  # what a stage held for the old cut is gone
        slowest = max(c / s for c, s in zip(stage_costs(profile.seconds, list(cuts)), speeds or [1.0] * stages))
        if slowest > sum(profile.seconds):  # its stages cannot leave a device out: say so
            engine.say(f"Tandem: {self.name} on {stages} stages of speeds {', '.join(f'{s:.2f}' for s in speeds)}: even "
                       "the balanced cut leaves the slowest stage busier than the fastest device alone; use fewer "
                       f"stages (--{self.axes[0]}) or leave the slow device out of --devices")
        state["plan"] = {"cuts": list(cuts), "fingerprint": fingerprint, "crossing": [profile.crossing[c] for c in cuts],
                         "stages": describe(profile, list(cuts)), "layer_names": profile.names,
                         "layer_seconds": profile.seconds, "stage_speeds": list(speeds or [1.0] * stages), **weights}

    def cut(self, engine, profile, stages: int, speeds, config) -> tuple[tuple[int, ...], dict]:
        """(the cut points, what the plan records of its weights): asyncdiff cuts for time alone (the balanced
        cut, `schedule.balance`). A stage holds its own layers' weights; under sharded weights (at most an even share
        plus SLACK per device) or a memory per device, a stage over it streams its last layers' weights
        from host memory each call (`schedule.streamed`, runner.py), said once."""
        cuts = tuple(balance(profile.seconds, stages, speeds))
        memory = None if config.memory_per_device is None else int(config.memory_per_device * 2**30)
        if stages < 2 or profile.sizes is None or (memory is None and config.weights != SHARDED):
            return cuts, {}
        shared = profile.held[0] if profile.held else 0
        whole = sum(profile.sizes) + shared
        cap = memory if memory is not None else default_cap(whole, stages)
        held = [shared] * stages
        chosen = streamed(profile.sizes, held, list(cuts), cap)
        bounds = [0, *cuts, len(profile.sizes)]
        loads = [shared + sum(profile.sizes[i] for i in range(a, b) if i not in chosen)
                 for a, b in zip(bounds, bounds[1:])]
        moved = sum(profile.sizes[i] for i in chosen)
        if chosen:
            within = "--memory-per-device" if memory is not None else f"an even share plus {100 * SLACK:.0f}%"
            engine.say(f"Tandem: asyncdiff streams {counted(len(chosen), 'layer')} ({moved / 2**20:.0f} MiB: "
                       f"{', '.join(profile.names[i] for i in chosen)}) from host memory each call, so no device "
                       f"holds over {cap / 2**20:.0f} of the {whole / 2**20:.0f} MiB of weights ({within})")
        return cuts, {"stage_weights": loads, "weights_cap": cap, "whole_weights": whole, "streamed": chosen,
                      "streamed_bytes": moved}

    def weights_layout(self, mesh):
        """Every rank a stage: its model held in host memory as it loads (`cut_on_load`), so no device holds
        the whole weights; the stage setup later moves its own layers to the device. A stage's peers are itself
        alone: sharded weights never divide a stage."""
        return {rank: ("asyncdiff", (rank,), 0) for group in range(mesh.groups) for rank in mesh.ranks(group)}

    def cut_on_load(self, worker, module, family: str, cut):
        """Worker side, as the model loads: kept in host memory (runtime/worker_loop.py ON_HOST) until the stage
        setup places this worker's layers (runner.StageRunner)."""
        from ...runtime.worker_loop import ON_HOST

        module.__dict__[ON_HOST] = True
        return module

    def profile_message(self, fingerprint: str, sample):
        """The message that has one worker time every layer for `sample`'s shapes."""
        return ProfileLayers(fingerprint, sample)

    def place_message(self, fingerprint: str, config, plan: StagePlan, record: dict):
        """The message that gives one worker its stage of the cut (`record`: what `cut` recorded besides the cut
        points; asyncdiff's: the layers stages stream)."""
        return PlaceStages(fingerprint, plan, streamed=tuple(record.get("streamed", ())),
                           cap=record.get("weights_cap"))

    def setup_knobs(self, config) -> tuple:
        """The settings the workers' stage set-up depends on (a change sets them up again): the schedule's knobs,
        and what caps a stage's weights (the layers it streams)."""
        return config.warmup, config.stride, config.time_shift, config.weights, config.memory_per_device

    def stage_plan(self, engine) -> dict | None:
        """The cut the workers hold (layer costs, each stage's share and what it receives), or None."""
        return engine.state(self.name).get("plan")

    def probe_transfer(self, engine, rows: int, repeats: int = 5) -> float:
        """Seconds to hand the first cut's tensors (`rows` rows) from stage 0 to stage 1, nothing else running."""
        plan = self.stage_plan(engine)
        specs = (*(((rows, *shape), dtype) for shape, dtype in plan["crossing"][0]), ((rows,), "float64"))
        replies = engine.request({0: ProbeExchange(plan["fingerprint"], 1, True, specs, repeats),
                                  1: ProbeExchange(plan["fingerprint"], 0, False, specs, repeats)},
                                 "timing an exchange", collective=True)
        return replies[1]["transfer_seconds"]

    def explain(self, mesh, config, steps: int, devices: list[str]) -> str:
        text = explain(mesh.inner, steps, config.warmup, config.stride, devices[:mesh.inner])
        if mesh.groups > 1:
            text += f"\n(the same for each of {mesh.groups} row groups: cfg {mesh.cfg} x batch {mesh.batch})"
        return text

    def bench_figures(self, executor, loop, row: dict) -> dict:
        """The ideal from the measured cut (1 / the largest stage's share of the work), what crosses between
        stages per call, and how long stages sat waiting on it after their own compute (the part of the
        transfer not hidden behind compute), over the asynchronous calls."""
        engine, config = executor.engine, executor.config
        plan = self.stage_plan(engine)
        shares = [s["share"] for s in plan["stages"]]
        slowest = max(share / speed for share, speed in zip(shares, plan["stage_speeds"]))
        layers = [s["layers"] for s in plan["stages"]]
        async_calls = [c for c in loop.calls if c["step"] >= config.warmup] or loop.calls
        rows = loop.latents.shape[0] * (2 if row["job"]["cfg"] != 1.0 else 1)
        transfer = self.probe_transfer(engine, rows) if len(shares) > 1 else 0.0
        exposed = statistics.median(c["wait"] for c in async_calls)
        moved = statistics.median(c["bytes"] for c in async_calls)
        overlapped = max(0.0, 1.0 - exposed / transfer) if transfer > 0 else 1.0
        summary = (f"asyncdiff: {len(shares)} stages, work shares {' / '.join(f'{100 * s:.1f}%' for s in shares)} "
                   f"(cut after {', '.join(pair[1] for pair in layers[:-1])}); warm-up {counted(config.warmup, 'step')}, "
                   f"stride {config.stride}; {moved / 2**20:.2f} MiB between stages per call, "
                   f"{1000 * transfer:.1f} ms alone, {1000 * exposed:.1f} ms of it exposed "
                   f"({100 * overlapped:.0f}% overlapped with compute)")
        if plan.get("streamed") and (config.weights == SHARDED or config.memory_per_device is not None):
            summary += (f"; weights {' / '.join(f'{w / 2**20:.0f}' for w in plan['stage_weights'])} MiB of "
                        f"{plan['whole_weights'] / 2**20:.0f} (cap {plan['weights_cap'] / 2**20:.0f}), "
                        f"{counted(len(plan['streamed']), 'layer')} ({plan['streamed_bytes'] / 2**20:.0f} MiB) "
                        "streamed from host memory per call")
        return {"ideal_speedup": 1.0 / slowest, "stage_shares": shares, "stage_layers": layers,
                "stage_speeds": plan["stage_speeds"],
                "warmup": config.warmup, "stride": config.stride, "time_shift": config.time_shift,
                "transfer_bytes_per_call_median": moved, "transfer_seconds_alone": transfer,
                "exposed_wait_seconds_per_call_median": exposed, "overlapped_fraction": overlapped,
                "summary": summary}

    # ---- worker side -------------------------------------------------------------------------------------

    def worker_handlers(self) -> dict:
        return {ProfileLayers: _on_runner("profile"), PlaceStages: _on_runner("setup"),
                StageCall: _on_runner("call"), ProbeExchange: _on_runner("probe")}


def stage_speeds(mesh) -> tuple[float, ...] | None:
    """Each stage's device speed (the slowest of that stage's ranks over the row groups: they share one cut);
    None when the mesh's devices are all equal."""
    if not mesh.speeds:
        return None
    return tuple(min(mesh.speeds[mesh.ranks(g)[k]] for g in range(mesh.groups)) for k in range(mesh.inner))


def _on_runner(method: str):
    """A worker handler that hands the message to the worker's StageRunner for the message's model."""

    def handle(worker, message):
        from .runner import StageRunner

        module, family = worker.model(message.fingerprint)
        runner = worker.slot(message.fingerprint, "asyncdiff", lambda: StageRunner(module, family, worker.device))
        worker.on_forward(message.fingerprint, runner.place_whole)  # a plain forward needs the whole model back on the device
        return getattr(runner, method)(message)

    return handle


STRATEGY = AsyncDiff()
