"""Sharded weights on a pool (engine/weights.py, models/weight_shards.py): two gloo workers each keep half of
every block and gather a block as it runs. Oracle: the model whole in this process. Each strategy's output must
equal it, each worker must report holding a share, and a call that leaves a worker without rows must still run
(the worker runs one row to serve its shards)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models import forward_for_family
from parallel_backend.models.weight_shards import units_of
from parallel_backend.runtime.recipe import weights_bytes

pytestmark = pytest.mark.pool


_CASES = importlib.util.spec_from_file_location("sequence_dit_cases", Path(__file__).with_name("test_sequence_dit.py"))
_built = importlib.util.module_from_spec(_CASES)  # its tiny Flux and Wan and their calls (tests are not a package)
_CASES.loader.exec_module(_built)
FLUX, WAN = "diffusers_dit:flux", "diffusers_dit:wan"


def _close(out, reference):
    assert (out - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


def _share_bound(model, degree: int) -> float:
    """What a rank may hold: everything outside the units, a 1/degree share of them, and their padding."""
    blocks = sum(weights_bytes(unit) for _, unit in units_of(model))
    return weights_bytes(model) - blocks + blocks / degree + 64 * degree * len(units_of(model))


def _held(pool, result_fingerprint=None) -> list[int]:
    sizes = pool.weights_bytes[result_fingerprint or pool.loaded_fingerprint]
    return [sizes[rank] for rank in sorted(sizes)]


CASES = [("batch", {}, "wan", 2), ("cfg", {}, "wan", 2), ("ulysses", {}, "flux", 1), ("ring", {}, "flux", 2),
         ("tensor", {}, "flux", 2), ("auto", {}, "wan", 2)]


@pytest.mark.parametrize("strategy, knobs, model_name, branches", CASES, ids=[c[0] for c in CASES])
def test_sharded_weights_equal_one_device_and_each_worker_holds_a_share(cpu_pool, strategy, knobs, model_name,
                                                                         branches):
    if model_name == "wan":
        model, family, call = _built.tiny_wan(), WAN, _built.wan_call(2, 3, 6, 10)
    else:
        model, family, call = _built.tiny_flux(), FLUX, _built.flux_call(2, 7, 3, 5)
    call = dataclasses.replace(call, branches=branches)
    with torch.inference_mode():
        reference = forward_for_family(family)(model, call)
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", strategy, weights="sharded", **knobs))
    for _ in range(3 if strategy == "auto" else 1):  # auto: two calls on rank 0 (the other serves its shards)
        result = executor.run(model, family, call)
        _close(result.out, reference)
    held = _held(cpu_pool)
    assert len(held) == 2 and all(size <= _share_bound(model, 2) for size in held), held
    assert all(size < weights_bytes(model) for size in held)
    if strategy == "tensor":  # a tensor group of two shards what its cut left whole: less than the cut alone
        tensor_only = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "tensor"))
        _close(tensor_only.run(model, family, call).out, reference)
        assert all(size < cut for size, cut in zip(held, _held(cpu_pool))), (held, _held(cpu_pool))


READS = [("batch", "sharded", 0.75), ("tensor", "replicated", 0.75), ("tensor", "sharded", 0.75),
         ("batch", "replicated", None)]


@pytest.mark.parametrize("strategy, weights, share", READS, ids=[f"{s}-{w}" for s, w, _ in READS])
def test_each_worker_reads_only_what_it_keeps_of_the_hosts_file(cpu_pool, strategy, weights, share):
    """The host writes the model once; a worker whose Load cuts it (shards, a tensor cut, both) reads only its
    parts of the file, a worker that holds it whole reads all of it. The output equals the whole model's."""
    model, call = _built.tiny_flux(), _built.flux_call(2, 7, 3, 5)
    with torch.inference_mode():
        reference = forward_for_family(FLUX)(model, call)
    cpu_pool.release_models()
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", strategy, weights=weights))
    _close(executor.run(model, FLUX, call).out, reference)
    read = cpu_pool.stats.last_load_bytes_read
    assert sorted(read) == [0, 1]
    if share is None:
        assert list(read.values()) == [weights_bytes(model)] * 2
    else:  # tiny Flux: its embedders, read whole by each worker, are 17 % of it
        assert all(0 < nbytes < share * weights_bytes(model) for nbytes in read.values()), read
    assert not list(cpu_pool._dir.glob("model-*")), "the host's files outlive the load"


@pytest.mark.parametrize("strategy", ["tensor", "batch"])
def test_a_recipes_workers_read_only_their_parts_and_its_build_takes_them(cpu_pool, strategy):
    """A model that travels as its recipe (ComfyUI's way: the workers build it with the host's code, then load
    its weights): each worker reads only its parts, its build takes them in place, the cut binds them."""
    import functools

    from diffusers import FluxTransformer2DModel

    from parallel_backend.runtime.recipe import Recipe, layout

    model, call = _built.tiny_flux(), _built.flux_call(2, 7, 3, 5)
    with torch.inference_mode():
        reference = forward_for_family(FLUX)(model, call)
    build = functools.partial(FluxTransformer2DModel, patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                              attention_head_dim=8, num_attention_heads=6, joint_attention_dim=16,
                              pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))

    def recipe():
        return Recipe(build, model.state_dict(), layout(model), "tiny flux")

    cpu_pool.release_models()
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", strategy, weights="sharded"))
    _close(executor.run(model, FLUX, call, recipe=recipe).out, reference)
    read = cpu_pool.stats.last_load_bytes_read
    assert sorted(read) == [0, 1] and all(0 < n < 0.75 * weights_bytes(model) for n in read.values()), read
    assert all(size <= _share_bound(model, 2) for size in _held(cpu_pool))


def test_a_call_that_leaves_a_worker_without_rows_still_gathers(cpu_pool):
    """batch over 2 workers, a call of one row: worker 1 has no rows, runs one to serve its shards."""
    model, call = _built.tiny_wan(), _built.wan_call(1, 3, 6, 10)
    with torch.inference_mode():
        reference = forward_for_family(WAN)(model, call)
    result = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch", weights="sharded")).run(model, WAN, call)
    _close(result.out, reference)
    assert set(result.compute_s) == {0}  # the filler's reply is not the call's


def _flux_of_blocks():
    """A tiny Flux of 6 blocks: its blocks, not its embedders, hold most of its weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=4,
                                  attention_head_dim=8, num_attention_heads=6, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval().requires_grad_(False)


def test_weights_auto_shards_only_what_does_not_fit(cpu_pool, caplog):
    from parallel_backend.engine.weights import HEADROOM, sharded_bytes

    model, call = _flux_of_blocks(), _built.flux_call(2, 7, 3, 5)
    with torch.inference_mode():
        reference = forward_for_family(FLUX)(model, call)
    roomy = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch", weights="auto", memory_per_device=8))
    _close(roomy.run(model, FLUX, call).out, reference)
    assert _held(cpu_pool) == [weights_bytes(model)] * 2
    whole, sharded = weights_bytes(model), sharded_bytes(model, 2)
    assert sharded < whole / HEADROOM
    tight = (sharded + whole / HEADROOM) / 2 / 2**30  # GiB: the whole weights leave no room, a share does
    cramped = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch", weights="auto", memory_per_device=tight))
    with caplog.at_level(logging.INFO, logger="tandem"):
        _close(cramped.run(model, FLUX, call).out, reference)
    assert all(size <= _share_bound(model, 2) for size in _held(cpu_pool))
    assert any("weights 'auto' shards this flux model" in r.getMessage() for r in caplog.records)
    said = [r.getMessage() for r in caplog.records if "MiB of weights (sharded)" in r.getMessage()]
    held = _held(cpu_pool)  # the log names each device's holding, once
    assert said == [f"Tandem: the flux model's {whole / 2**20:.1f} MiB of weights (sharded): "
                    f"worker 0 (cpu) {held[0] / 2**20:.1f} MiB, worker 1 (cpu) {held[1] / 2**20:.1f} MiB"], said


def test_weights_that_do_not_fit_even_sharded_are_refused_before_they_move(cpu_pool):
    from parallel_backend.engine.weights import sharded_bytes

    model, call = _flux_of_blocks(), _built.flux_call(2, 7, 3, 5)
    loads = cpu_pool.stats.model_loads
    cap = 0.9 * sharded_bytes(model, 2) / 2**30
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch", weights="auto", memory_per_device=cap))
    with pytest.raises(ValueError, match=r"^this flux model does not fit .* GiB per device even with its weights "
                                         r"sharded over 2 devices"):
        executor.run(model, FLUX, call)
    assert cpu_pool.stats.model_loads == loads


def test_max_models_keeps_that_many_models_loaded(cpu_pool):
    """The bench holds a replicated and a sharded copy of each strategy's model at once (max_models 5): a load
    evicts only the least recently used model beyond the bound, never more."""
    model = torch.nn.Linear(4, 4)
    bound = cpu_pool.max_models
    cpu_pool.max_models = 3
    try:
        cpu_pool.release_models()
        for name in ("first", "second", "third"):
            cpu_pool.ensure_model(model, "diffusers_dit:flux", name)
        assert cpu_pool.loaded_fingerprints == ("first", "second", "third")
        cpu_pool.ensure_model(model, "diffusers_dit:flux", "fourth")
        assert cpu_pool.loaded_fingerprints == ("second", "third", "fourth")
    finally:
        cpu_pool.max_models = bound


def test_cpu_workers_keep_their_shards_in_the_pool_folder_until_the_model_goes(cpu_pool):
    """CPU workers of one machine read each other's shards from files (weight_shards.FileGroup): a call that
    leaves a worker without rows needs nothing of it; the files go when the model is dropped."""
    model, call = _built.tiny_wan(), _built.wan_call(1, 3, 6, 10)
    with torch.inference_mode():
        reference = forward_for_family(WAN)(model, call)
    cpu_pool.release_models()
    result = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch", weights="sharded")).run(model, WAN, call)
    _close(result.out, reference)
    shards = cpu_pool._dir / "shards"
    files = [p for p in shards.rglob("*") if p.is_file()]
    assert {p.name.split("-")[0] for p in files} == {"0", "1"}, files  # each worker's own pieces
    cpu_pool.release_models()
    assert not [p for p in shards.rglob("*") if p.is_file()]


def test_two_sharded_cuts_of_one_model_held_at_once_keep_apart(cpu_pool):
    """ulysses and tensor, both sharded, on the same model, held side by side and called in turn: each reads
    its own shards (their files must not share names)."""
    model, call = _built.tiny_flux(), _built.flux_call(1, 7, 3, 5)
    with torch.inference_mode():
        reference = forward_for_family(FLUX)(model, call)
    runs = [ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", s, weights="sharded")) for s in ("ulysses", "tensor")]
    for _ in range(2):
        for executor in runs:
            _close(executor.run(model, FLUX, call).out, reference)


def test_a_parallelized_pipeline_with_sharded_weights_equals_plain(cpu_pool, tiny_sd_folder):
    """parallelize(pipe, devices=..., weights="sharded"): a diffusers SD pipeline's UNet, sharded over two workers
    (its down and up blocks), gives the plain pipeline's latents; each worker holds less than the whole UNet."""
    import diffusers

    from parallel_backend.hosts.diffusers import parallelize, unparallelize

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red door", num_inference_steps=3, guidance_scale=6.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    reference = run()
    whole = weights_bytes(pipe.unet)
    with pytest.raises(TypeError, match="a config or its settings"):
        parallelize(pipe, ParallelConfig("cpu:2", "cfg"), weights="sharded")
    parallelize(pipe, pool=cpu_pool, devices="cpu:2", strategy="cfg", weights="sharded")
    try:
        calls = cpu_pool.stats.calls
        torch.testing.assert_close(run(), reference, atol=1e-4, rtol=1e-4)  # cfg rows apart: float order
        assert cpu_pool.stats.calls == calls + 3
        assert all(size < 0.75 * whole for size in _held(cpu_pool)), (_held(cpu_pool), whole)
    finally:
        unparallelize(pipe)
