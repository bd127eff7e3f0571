"""tensor: transformer blocks cut by heads and MLP units over a group (models/tensor_splits.py,
strategies/tensor.py). Oracles: the uncut model in one process. In one process, a group's ranks run as threads
whose all-reduce meets at a barrier; on a pool, the workers cut the model they hold, exchange their partial sums
over gloo, and hold a share of the weights."""

from __future__ import annotations

import copy

import pytest
import torch

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models import forward_for_family
from parallel_backend.models.tensor_splits import check_heads, expand, plan_for, split_in_place
from parallel_backend.runtime.pool import WorkerPool
from parallel_backend.runtime.recipe import weights_bytes

def _load(name: str, file: str):
    """A module of this folder by its file (the tests are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_built = _load("sequence_dit_cases", "test_sequence_dit.py")  # its tiny Flux and Wan and their calls
run_cut = _load("tensor_threads", "tensor_threads.py").run_cut
flux_call, tiny_flux, tiny_wan, wan_call = _built.flux_call, _built.tiny_flux, _built.tiny_wan, _built.wan_call

FLUX, WAN = "diffusers_dit:flux", "diffusers_dit:wan"
CASES = [("flux, controlnet", tiny_flux, flux_call(2, 7, 3, 5, controlnet=True), FLUX),
         ("wan t2v", tiny_wan, wan_call(2, 3, 6, 10), WAN),
         ("wan timestep per token", tiny_wan, wan_call(1, 1, 10, 14, per_token_t=True), WAN),
         ("wan i2v", lambda: tiny_wan(i2v=True), wan_call(1, 1, 10, 14, i2v=True), WAN)]


def _close(out, reference):
    assert (out - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


class Alone:
    """One rank with its exchanges left out (for the checks of what a cut holds)."""

    def sum(self, partial):
        return partial

    def gather(self, piece):
        return piece


# (case, degree): the tiny Wan's 32 feed-forward units take 2 ranks, not 3
GROUPS = [(case, degree) for case in CASES for degree in ((2, 3) if case[3] == FLUX else (2,))]


@pytest.mark.parametrize("case, degree", GROUPS, ids=[f"{c[0]}-{d}" for c, d in GROUPS])
def test_a_cut_group_equals_the_whole_model_on_every_rank(case, degree):
    _, build, call, family = case
    model = build()
    with torch.inference_mode():
        reference = forward_for_family(family)(model, call)
    outs, held = run_cut([build() for _ in range(degree)], family, lambda m: forward_for_family(family)(m, call))
    for out in outs:
        _close(out, reference)
        assert torch.equal(out, outs[0])  # the same sum, bit for bit, on every rank
    assert max(held) < weights_bytes(model)


def test_the_cut_layers_hold_one_share_each_and_the_rest_stays_whole():
    model = tiny_flux()
    whole = dict(model.named_parameters())
    cut = copy.deepcopy(model)
    split_in_place(cut, plan_for(cut, FLUX), 2, 1, Alone())
    cut_names = {name for name, _ in expand(model, plan_for(model, FLUX))}
    assert any(name.startswith("single_transformer_blocks.0.proj_out") for name in cut_names)
    for name, parameter in cut.named_parameters():
        layer = name.rpartition(".")[0]
        if layer in cut_names:
            assert parameter.numel() < whole[name].numel(), name
        else:
            assert torch.equal(parameter, whole[name]), name
    to_q = cut.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(to_q, model.transformer_blocks[0].attn.to_q.weight[24:])  # heads 3 to 5 of 6 (8 wide each)
    assert cut.transformer_blocks[0].attn.heads == 3


def test_a_degree_that_does_not_divide_the_heads_is_refused_before_anything_is_cut():
    model = tiny_flux()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="tensor 4 does not divide"):
        split_in_place(model, plan_for(model, FLUX), 4, 0, Alone())
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="tensor 4 does not divide the model's 6 attention heads"):
        check_heads(6, 4)  # what the strategy checks on the host, from the model's sequence hint


def test_families_without_a_cut_are_refused_in_one_sentence():
    from parallel_backend import strategies

    tensor = strategies.get("tensor")
    with pytest.raises(ValueError, match="^strategy 'tensor' has no tensor split for sd3 models in diffusers yet"):
        tensor.check_family("diffusers_dit:sd3")
    with pytest.raises(ValueError, match="^strategy 'tensor' has no tensor split for sd3 models in ComfyUI yet"):
        tensor.check_family("comfy_dit:sd3")
    with pytest.raises(ValueError, match="^strategy 'tensor' splits the blocks of transformers .* a UNet"):
        tensor.check_family("diffusers_unet")


# ---- on a pool: the workers cut the model they hold ------------------------------------------------------------

@pytest.mark.pool
def test_tensor_on_two_workers_equals_one_device_and_halves_the_weights(cpu_pool):
    model, call = tiny_wan(), wan_call(2, 3, 6, 10)
    with torch.inference_mode():
        reference = forward_for_family(WAN)(model, call)
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "tensor"))
    result = executor.run(model, WAN, call)
    _close(result.out, reference)
    assert (result.mesh.strategy, result.mesh.split) == ("tensor", (2,)) and result.bytes_sent > 0
    assert set(result.extra) == {0, 1} and all(e["passes"] > 0 for e in result.extra.values())
    whole = weights_bytes(model)
    held = [result.extra[rank]["weights_bytes"] for rank in (0, 1)]
    assert all(h < 0.8 * whole for h in held), (held, whole)  # tiny: embeddings are a large part
    (cut,) = [f for f, sizes in cpu_pool.weights_bytes.items() if sizes == dict(enumerate(held))]
    loads = cpu_pool.stats.model_loads
    _close(executor.run(model, WAN, call).out, reference)  # the cut is kept: nothing shipped again
    rows = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch")).run(model, WAN, call)
    _close(rows.out, reference)  # another strategy gets the whole model, shipped beside the cut
    assert cpu_pool.stats.model_loads == loads + 1 and len(cpu_pool.loaded_fingerprints) == 2
    assert all(size == whole for size in cpu_pool.weights_bytes[cpu_pool.loaded_fingerprint].values())
    _close(executor.run(model, WAN, call).out, reference)  # both held (max_models 2): no third load
    assert cpu_pool.stats.model_loads == loads + 1 and cut in cpu_pool.loaded_fingerprints


@pytest.mark.pool
def test_the_workers_cut_the_model_as_it_loads_before_it_reaches_their_device(cpu_pool):
    """A Load with a cut: each worker reports the weights it holds once loaded, its share, not the whole."""
    model = tiny_flux()
    cuts = {rank: ("tensor", (0, 1), rank) for rank in (0, 1)}
    cpu_pool.ensure_model(model, FLUX, "cut-on-load", cuts=cuts)
    held = cpu_pool.weights_bytes["cut-on-load"]
    assert set(held) == {0, 1} and all(size < 0.8 * weights_bytes(model) for size in held.values()), held
    cpu_pool.release_models("cut-on-load")


@pytest.fixture(scope="module")
def four_workers():
    with WorkerPool("cpu:4", timeout_s=120) as pool:
        yield pool


@pytest.mark.pool
@pytest.mark.slow
def test_cfg_times_tensor_on_four_workers_equals_one_device(four_workers):
    from dataclasses import replace

    model = tiny_flux()
    call = replace(flux_call(2, 7, 3, 5), branches=2)  # a cond and an uncond row
    with torch.inference_mode():
        reference = forward_for_family(FLUX)(model, call)
    result = ParallelExecutor(four_workers, ParallelConfig("cpu:4", "tensor", cfg_degree=2)).run(model, FLUX, call)
    _close(result.out, reference)
    assert (result.mesh.cfg, result.mesh.split) == (2, (2,))
    assert set(result.extra) == {0, 1, 2, 3} and all(e["bytes"] > 0 for e in result.extra.values())
