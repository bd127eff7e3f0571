"""The cost model's inputs for a bench model, taken on the spot: its shapes (counted from the model object and
the call the bench makes) and its one-device times (measured here, on one device's share of the cores for CPU
devices, as the bench's reference runs). Nothing here predicts; model.py does.

Measured: the whole call for 1 row (the fastest of `repeats` or more rounds, after one warm-up), and taking turns
with it in those rounds, the call of the job's rows and what one rank of each sequence split computes for one
row with its exchanges stubbed out (the bench's ideal does the same), each its median ratio to the one-row call
of the same round, one token-mixing attention of one row (sequence models: torch's attention on the model's heads
and tokens), the layer profile (UNets: models.stages.profile, what asyncdiff cuts by).
Counted: the bytes a device receives per row, the prediction's, q/k/v widths, what crosses each cut of the
layers, the weights (whole and per layer).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from .. import strategies
from ..engine.pool_engine import sequence_hint
from ..engine.mesh import Mesh
from ..engine.oracle import local_forward, sample_call
from ..runtime.portable import cpu_cores
from .calibrate import HOST_OVERHEAD_S, tensor_bytes
from .model import Inputs, meshes
from .probe import more_rounds
from .traffic import CallShape


def timed_rounds(runs: dict, repeats: int, budget_s: float = 0.0, most: int = 20) -> dict:
    """{key: [seconds of each timed run of runs[key]()]}, after one untimed run of each: `repeats` rounds, and
    more (up to `most`) while the rounds have taken less than `budget_s` (quick calls: more runs are
    steadier). The runs take turns within a round."""
    for run in runs.values():
        run()
    times = {key: [] for key in runs}
    started = time.perf_counter()
    while more_rounds(len(times[next(iter(runs))]), repeats, started, budget_s, most):
        add_round(runs, times)
    return times


def add_round(runs: dict, times: dict) -> None:
    """One more timed run of each of `runs`, in turn, appended to `times`."""
    for key, run in runs.items():
        began = time.perf_counter()
        run()
        times[key].append(time.perf_counter() - began)


def paced(times: dict) -> dict:
    """{key: seconds} from timed rounds: the first key's fastest run (other load only ever adds time); every
    other key's, that times the median of its runs over the first key's run of the same round (a drift of the
    machine's speed, which lasts seconds here, hits the runs of one round alike, so their ratio keeps while
    their fastest runs may fall in different rounds)."""
    first = times[next(iter(times))]
    return {key: min(first) * statistics.median(t / f for t, f in zip(values, first)) for key, values in times.items()}


def fastest_seconds(runs: dict, repeats: int, budget_s: float = 0.0, most: int = 20) -> dict:
    """paced(timed_rounds(...)): each key's seconds, the first key's fastest and the others by their ratio to it."""
    return paced(timed_rounds(runs, repeats, budget_s, most))


def fastest_seconds_of(run, repeats: int) -> float:
    """The fastest of `repeats` runs of `run()` after an untimed one."""
    return fastest_seconds({0: run}, repeats)[0]


@contextmanager
def device_share(device: str, devices: int):
    """CPU devices: this process runs on one device's share of the cores meanwhile (as a worker would)."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(cpu_cores()) // devices))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def call_shape(model, resolution: tuple[int, int], rows: int) -> CallShape:
    """The sizes of a call of `rows` rows of `model` at `resolution` (pixels, H x W)."""
    one = sample_call(model, 1, resolution)
    itemsize = next(model.module.parameters()).element_size()
    fields = dict(rows=rows, input_bytes=tensor_bytes([one.x, one.t, one.context, one.extras]),
                  output_bytes=math.prod(model.latent_shape(1, resolution)) * itemsize, itemsize=itemsize)
    hint = sequence_hint(model.module, model.family)
    if hint is not None and hint.heads:
        tokens, attentions = model.sequence_sizes(resolution)
        fields.update(tokens=tokens, attentions=attentions, heads=hint.heads,
                      width=hint.heads * model.module.config.attention_head_dim)
    return CallShape(**fields)


def _profile(model, resolution, repeats: int):
    """(layer seconds, bytes crossing each cut per row, each layer's weight bytes, the part of them any stage may
    hold (a DiT block's modulation)): a UNet's layers (asyncdiff) or a DiT's blocks (pipefusion); () where the
    model's family cannot be cut into stages."""
    from ..models.stage_families import adapter_for
    from ..models.stages import Activations, modules_of, profile

    from ..models.comfy_forward import one_call
    from ..models.dit_stages import FAMILIES

    call = sample_call(model, 1, resolution)
    dit = FAMILIES.get(model.family)
    try:
        adapter = adapter_for(model.family) if dit is None else None
    except ValueError:
        return (), (), (), ()
    with torch.inference_mode(), one_call():
        if dit is not None:  # pipefusion's blocks
            layers = dit.layers(model.module)
            ctx, first = dit.context(model.module, call), dit.tokens(model.module, call)
        else:
            layers = adapter.layers(model.module)
            ctx, first = adapter.prepare(model.module, call, call.t), Activations(call.x)
        measured = profile(layers, ctx, first, repeats)
    weights = tuple(sum(tensor_bytes(list(m.parameters())) for m in modules_of([layer])) for layer in layers)
    movable = tuple(tensor_bytes([p for _, m in dit.modulations(layer) for p in m.parameters()]) for layer in layers
                    ) if dit is not None else ()
    return tuple(measured.seconds), tuple(measured.bytes_per_row(i) for i in range(len(layers))), weights, movable


def _attention_seconds(shape: CallShape, device, dtype, repeats: int) -> float:
    if not shape.attentions:
        return 0.0
    q = torch.randn(1, shape.heads, shape.tokens, shape.width // shape.heads, device=device, dtype=dtype)
    with torch.inference_mode():
        return fastest_seconds_of(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), repeats)


def _shard_runs(model, resolution, splits) -> dict:
    """{(ulysses, ring): one rank's compute for a one-row call in a sequence group of that split, its exchanges
    stubbed out (the strategy's own `bench_part`), to run}, for each (strategy, split) in `splits`."""
    call = sample_call(model, 1, resolution)
    out = {}
    for name, split in sorted(splits):
        mesh = Mesh(name, 1, 1, split, math.prod(split))
        key = strategies.get(name).shard_split(mesh)
        if key not in out:
            run = strategies.get(name).bench_part(model, call, mesh)
            if run is not None:  # None: nothing to time for this model (a UNet's bands)
                out[key] = run
    return out


def paced_calls(inputs: Inputs, times: dict) -> Inputs:
    """`inputs` with the whole calls' and the sequence ranks' seconds taken from `times` (measure_timed's keys:
    rows, or ("shard", (ulysses, ring)))."""
    seconds = paced(times)
    return replace(inputs, call_seconds={k: v for k, v in seconds.items() if not isinstance(k, tuple)},
                   shard_seconds={k[1]: v for k, v in seconds.items() if isinstance(k, tuple)})


def measure_timed(model, resolution: tuple[int, int], rows: int, branches: int, link, devices: int,
                  steps: int = 20, repeats: int = 3, budget_s: float = 4.0) -> tuple[Inputs, dict, dict]:
    """(inputs, runs, times): the model's Inputs for a job of `rows` rows (`branches` 2: [uncond; cond]) on
    `devices` devices joined by `link`, measured on the model's device, and the timed runs behind its whole
    calls and sequence ranks' shares ({1: one-row call, rows: the job's, ("shard", (u, r)): a rank's part of a
    one-row call}, taking turns in rounds, at least `budget_s` seconds of them) with their times so far (more
    rounds: add_round, then paced_calls)."""
    weight = next(model.module.parameters())
    device = weight.device.type
    shape = call_shape(model, resolution, rows)
    with device_share(device, devices):
        attention = _attention_seconds(shape, weight.device, weight.dtype, repeats)
        layer_seconds, handover, layer_weights, layer_movable = _profile(model, resolution, repeats)
        shape = CallShape(**{**shape.__dict__, "handover_bytes": handover})
        inputs = Inputs(shape, model.family, branches, {}, link, attention, layer_seconds,
                        tensor_bytes(list(model.module.parameters())), layer_weights, model.memory_bytes(1, resolution),
                        HOST_OVERHEAD_S[device][0], steps, layer_movable_bytes=layer_movable,
                        unit_bytes=shard_units(model.module),
                        gathers_overlap=device == "cuda")
        calls = {r: sample_call(model, r, resolution) for r in sorted({1, rows})}
        runs = {r: lambda c=c: local_forward(model, c) for r, c in calls.items()}
        splits = {(m.strategy, m.split) for m in meshes(inputs, devices) if strategies.get(m.strategy).splits_tokens}
        runs.update({("shard", key): run for key, run in _shard_runs(model, resolution, splits).items()})
        times = timed_rounds(runs, repeats, budget_s)
    return paced_calls(inputs, times), runs, times


def shard_units(module) -> tuple[int, ...]:
    """The bytes of each unit sharded weights gather (models/weight_shards.py), for the plan's sharded
    candidates."""
    from ..models.weight_shards import units_of

    return tuple(tensor_bytes(list(unit.parameters())) for _, unit in units_of(module))


def measure_inputs(model, resolution: tuple[int, int], rows: int, branches: int, link, devices: int,
                   steps: int = 20, repeats: int = 3, budget_s: float = 4.0) -> Inputs:
    """measure_timed's Inputs."""
    return measure_timed(model, resolution, rows, branches, link, devices, steps, repeats, budget_s)[0]
