"""pipefusion: a DiT's blocks cut into stages, one per device, and its tokens into patches that flow through the
stages as a pipeline, each attention using this call's fresh keys and values for the patches already computed
and the call before's for the others (PipeFusion, xDiT).

Host side (this module): the stages are set up as asyncdiff's (the first call of a model and shape measures every
block's time and weights on one worker, each worker is told its stage and holds only its blocks' weights; the
embedders sit with the first stage, the output norm and projection with the last), but the cut weighs the
weights too: the fastest cut whose every stage holds at most a cap of them (cut.py). Each row group of the
mesh (cfg x batch) runs the call on its own chain of stages; the last stage's output is the group's prediction.
A call runs as one patch (the whole sequence: exact, and it fills every attention's keys and values) during the
job's first `warmup` steps and whenever its stream has not yet had a whole-sequence call of its shape on the
current cut; else as `patches` patches. Worker side: runner.py; the patches: patches.py; families:
models/dit_stages.py (diffusers') and models/comfy_dit_stages.py (ComfyUI's, with comfy_flux_stages.py). A call
a split by tokens cannot take is refused, one with a model patch runs on whole rows (`patches_tokens`:
engine/pool_engine.py).

Text tokens of a joint-attention model (Flux) go first, with patch 0 wherever they fit in one patch's share of
the tokens, not with every patch: patch 0 passes every block before any later patch reaches it (each stage runs
its patches in order), so the text's keys and values are fresh for every patch at every block, computed once per
call instead of once per patch; the text tokens' own outputs see patch 0's image tokens fresh and the others
from the call before, as every image token does. Text longer than a share runs over into the next patches
(patches.py): a heavier patch 0 would lengthen the pipeline's fill by as much.
"""

from __future__ import annotations

import statistics
from ...runtime.knobs import Knob
from ...runtime.words import counted
from ..asyncdiff import AsyncDiff
from ..base import BenchJob
from ..stale import WARMUP
from .cut import SLACK, cost_of_cap, held_per_stage, weights_cut
from .messages import WAITS, PipeCall, PlaceBlocks, ProfileBlocks

# runner.FAMILIES: models/dit_stages.py's and models/comfy_dit_stages.py's (tests check)
FAMILIES = ("diffusers_dit:flux", "diffusers_dit:wan", "diffusers_dit:sd3", "diffusers_dit:qwen_image",
            "comfy_dit:flux", "comfy_dit:wan", "comfy_dit:qwen_image", "comfy_dit:chroma", "comfy_dit:hunyuan_video",
            "comfy_dit:sd3", "comfy_dit:ltxv", "comfy_dit:lumina")
DEFAULT_PATCHES = 8  # what tandem plan proposes for 2 stages on CPU workers (fill and drain 9/8 of a stage)

PIPEFUSION = Knob("pipefusion", int, None, "pipefusion: the stages a DiT's blocks are cut into, one device each "
                  "(default: the devices left after cfg and batch)", low=1, unset=True,
                  axis="they cut a DiT's blocks into pipelined stages")
PATCHES = Knob("patches", int, None, f"pipefusion: the patches the token sequence is cut into (default "
               f"{DEFAULT_PATCHES}; more hides more of the pipeline's fill, each costs a launch per block)",
               low=1, high=64, unset=True, unset_means=f"{DEFAULT_PATCHES}")


class PipeFusion(AsyncDiff):
    """asyncdiff's stages (exact False, collective, each stage its own weights), on a DiT's blocks, pipelined."""

    name = "pipefusion"
    summary = ("a DiT's blocks cut into stages, one per device, its tokens into patches pipelined through them, "
               "attention on the other patches' one-step-stale keys and values (approximate after warm-up).")
    axes = ("pipefusion",)
    bench_job = BenchJob(1, False)
    adapters = ("diffusers_dit", "comfy_dit")
    scope = ("cuts diffusers' Flux.1, Wan, SD3 and Qwen-Image transformers and ComfyUI's Flux.1 / Flux.2, Chroma, "
             "Wan 2.x, Qwen-Image, HunyuanVideo, SD3 / SD3.5, LTX-Video and Lumina 2 / Z-Image only")
    patches_tokens = True
    min_warmup = 0  # a call with no keys and values held runs whole
    knobs = (PIPEFUSION, PATCHES, WARMUP)

    def check_family(self, family: str) -> None:
        if family not in FAMILIES:
            raise ValueError(f"strategy 'pipefusion' {self.scope}, and this model is {family.split(':', 1)[-1]!r}: "
                             "use cfg, batch, ulysses or auto for it")

    def call_message(self, engine, fingerprint: str, share, config) -> PipeCall:
        return PipeCall(fingerprint, share, self._patches(engine, share, config))

    def _patches(self, engine, call, config) -> int:
        """This call's patches: 1 in warm-up and for a stream with no whole-sequence call of this shape since
        the cut was placed or the job began; else the knob's."""
        state = engine.state(self.name)
        if state.get("warm_job") != call.job:
            state["warm_job"], state["warm"] = call.job, set()
        warm = state.setdefault("warm", set())
        key = (call.stream, tuple(call.x.shape), None if call.context is None else tuple(call.context.shape))
        if (call.step or 0) < config.warmup or key not in warm or mesh_stages(state) < 2:
            warm.add(key)
            return 1
        return config.patches or DEFAULT_PATCHES

    def profile_message(self, fingerprint: str, sample):
        return ProfileBlocks(fingerprint, sample)

    def place_message(self, fingerprint: str, config, plan, record: dict):
        return PlaceBlocks(fingerprint, plan, tuple(record["lent"]))

    def setup_knobs(self, config) -> tuple:
        return (config.memory_per_device,)  # the cut's cap on a stage's weights

    def cut(self, engine, profile, stages: int, speeds, config) -> tuple[tuple[int, ...], dict]:
        """The fastest cut whose every stage holds at most the cap of weights, the blocks' modulation spread over
        the stages (cut.py); said once where the cap makes the slowest stage slower than the cut balanced on time
        alone would."""
        shared, first, last = profile.held
        held = held_per_stage(shared, first, last, stages)
        whole = sum(profile.sizes) + shared + first + last
        memory = None if config.memory_per_device is None else int(config.memory_per_device * 2**30)
        movable = profile.movable or [0] * len(profile.sizes)
        cut = weights_cut(profile.seconds, profile.sizes, held, whole, stages, speeds, memory, movable)
        note = cost_of_cap(profile.seconds, profile.sizes, held, cut.cuts, speeds, movable)
        if note:
            within = "--memory-per-device" if memory else f"an even share plus {100 * SLACK:.0f}%"
            engine.say(f"Tandem: pipefusion {note}: no device holds over {cut.cap / 2**20:.0f} of the "
                       f"{whole / 2**20:.0f} MiB of weights ({within}; a larger --memory-per-device allows the faster cut)")
        lent = cut.lent()
        return tuple(cut.cuts), {"stage_weights": cut.loads, "weights_cap": cut.cap, "whole_weights": whole,
                                 "lent": lent, "lent_bytes": [movable[i] for i, _, _ in lent]}

    def explain(self, mesh, config, steps: int, devices: list[str]) -> str:
        m, n = config.patches or DEFAULT_PATCHES, mesh.inner
        text = (f"pipefusion: {n} stages on {', '.join(devices[:n])}, each its share of the blocks; warm-up "
                f"{counted(config.warmup, 'step')} run the whole sequence through the stages in turn (exact), every "
                f"later step {m} patches in a pipeline: stage s runs patch p while stage s+1 runs patch p-1, about "
                f"{(m + n - 1) / m:.2f} of one stage's whole-sequence time per call; approximate.")
        if mesh.groups > 1:
            text += f"\n(the same for each of {mesh.groups} row groups: cfg {mesh.cfg} x batch {mesh.batch})"
        return text

    def bench_figures(self, executor, loop, row: dict) -> dict:
        """The ideal from the measured cut (1 / the largest stage's share), the bytes crossing between stages
        per call and the wait not hidden behind compute, over the patched calls."""
        engine, config = executor.engine, executor.config
        plan = self.stage_plan(engine)
        shares = [s["share"] for s in plan["stages"]]
        slowest = max(share / speed for share, speed in zip(shares, plan["stage_speeds"]))
        patched = [i for i, c in enumerate(loop.calls) if c["step"] >= config.warmup] or range(len(loop.calls))
        parts = wait_parts([loop.calls[i] for i in patched], [loop.per_call[i] for i in patched])
        patched = [loop.calls[i] for i in patched]
        exposed = statistics.median(c["wait"] for c in patched)
        moved = statistics.median(c["bytes"] for c in patched)
        m = config.patches or DEFAULT_PATCHES
        held = plan["stage_weights"]
        summary = (f"pipefusion: {len(shares)} stages, work shares {' / '.join(f'{100 * s:.1f}%' for s in shares)}, "
                   f"weights {' / '.join(f'{w / 2**20:.0f}' for w in held)} MiB of {plan['whole_weights'] / 2**20:.0f} "
                   f"(cap {plan['weights_cap'] / 2**20:.0f}{held_elsewhere(plan['lent'], plan['lent_bytes'])}), {m} "
                   f"patches; warm-up {counted(config.warmup, 'step')}; "
                   f"{moved / 2**20:.2f} MiB between stages per call, {1000 * exposed:.1f} ms waited not hidden by "
                   f"compute ({parts['summary']})")
        return {"ideal_speedup": 1.0 / slowest, "stage_shares": shares, "stage_weights_bytes": held,
                "stage_weights_cap_bytes": plan["weights_cap"], "modulation_lent": plan["lent"], "patches": m,
                "warmup": config.warmup,
                "transfer_bytes_per_call_median": moved, "exposed_wait_seconds_per_call_median": exposed,
                "wait_parts_seconds_median": parts["stages"], "outside_stages_seconds_median": parts["outside"],
                "summary": summary}

    def worker_handlers(self) -> dict:
        return {ProfileBlocks: _on_runner("profile"), PlaceBlocks: _on_runner("setup"), PipeCall: _on_runner("call")}


def wait_parts(calls: list[dict], seconds: list[float]) -> dict:
    """Where the patched calls' waits went, per stage (each rank's `waits` from runner.py, medians over the calls):
    {"stages": {rank: {part: seconds}}, "outside": the call's time outside its slowest stage's runner (the host's
    dispatch, the output's return and gather), "summary": in words}."""
    ranks = sorted({r for c in calls for r, extra in c["extra"].items() if "waits" in extra})
    if not ranks:
        return {"stages": {}, "outside": 0.0, "summary": "no patched call"}
    stages = {r: {part: statistics.median(c["extra"][r]["waits"][part] for c in calls) for part in WAITS}
              for r in ranks}
    outside = statistics.median(s - max(c["extra"][r]["seconds"] for r in ranks) for c, s in zip(calls, seconds))
    first, total = calls[0]["extra"][ranks[-1]]["first_patch_tokens"]
    words = "; ".join(f"worker {r}: " + (", ".join(f"{part} {1000 * t:.1f}" for part, t in stages[r].items()
                                                    if t >= 5e-4) or "none") for r in ranks)
    return {"stages": stages, "outside": outside,
            "summary": f"ms per part, {words}; the first patch holds {first} of {total} tokens; "
                       f"{1000 * outside:.1f} ms per call outside the stages"}


def held_elsewhere(lent, sizes) -> str:
    """What `lent` ((block, its stage, the holding stage)) says in words: "; stage 1 holds the modulation of 2 of
    stage 0's blocks (24 MiB)", "" where none moved."""
    pairs = {}
    for (_, owner, holder), size in zip(lent, sizes):
        count, total = pairs.get((holder, owner), (0, 0))
        pairs[holder, owner] = count + 1, total + size
    return "".join(f"; stage {holder} holds the modulation of {count} of stage {owner}'s blocks "
                   f"({total / 2**20:.0f} MiB)" for (holder, owner), (count, total) in sorted(pairs.items()))


def mesh_stages(state: dict) -> int:
    """The stages of the cut the workers hold (from the plan asyncdiff's set-up records)."""
    return len(state.get("plan", {}).get("cuts", [])) + 1


def _on_runner(method: str):
    """A worker handler that hands the message to the worker's PipeRunner for the message's model."""

    def handle(worker, message):
        from .runner import PipeRunner

        module, family = worker.model(message.fingerprint)
        runner = worker.slot(message.fingerprint, "pipefusion", lambda: PipeRunner(module, family, worker.device))
        worker.on_forward(message.fingerprint, runner.place_whole)
        return getattr(runner, method)(message)

    return handle


STRATEGY = PipeFusion()
