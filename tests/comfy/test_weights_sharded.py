"""Sharded weights in ComfyUI (models/weight_shards.py). ComfyUI's own Flux.1 and Wan classes sharded over two
ranks in this process (threads whose gathers meet at a barrier) equal the whole model. Then the Multi-GPU
KSampler on two CPU workers against the stock KSampler: with weights 'sharded', and with weights 'auto' under a
memory cap below the model's weights, the pool splits the call, each worker holding about half of the blocks."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CUT = _module("comfy_tensor_cut", Path(__file__).with_name("test_tensor_cut.py"))
comfy_models = _CUT.comfy_models  # the fixture: ComfyUI's tiny seeded models


@pytest.mark.parametrize("fixture, family, inputs", [("flux", "flux", _CUT._flux_inputs),
                                                     ("wan21_t2v", "wan", _CUT._wan_inputs)])
def test_comfy_models_sharded_over_two_ranks_equal_the_whole(comfy_models, fixture, family, inputs):
    from parallel_backend.models.weight_shards import shard_in_place

    threads = _module("tensor_threads", Path(__file__).parents[1] / "tensor_threads.py")
    model = comfy_models(fixture)
    args, kwargs = inputs()
    with torch.inference_mode():
        reference = model(*args, **kwargs)

    def cut(module, degree, index, group):
        shard_in_place(module, degree, index, group)

    outs, held = threads.run_cut([copy.deepcopy(model) for _ in range(2)], f"comfy_dit:{family}",
                                 lambda m: m(*args, **kwargs), cut=cut)
    for out in outs:
        assert torch.equal(out, reference)
    whole = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert all(size < 0.75 * whole for size in held), (held, whole)


def _whole_and_held(comfy_server, comfy, family: str, cfg: float, name: str, settings: dict) -> tuple[int, list]:
    stock, tandem = comfy.run_pair(comfy_server, name, "ulysses" if cfg == 1.0 else "cfg", kind="family",
                                   family=family, steps=3, cfg=cfg, degrees=settings)
    comfy.assert_same_latents(tandem, stock)
    status = comfy_server.get("/tandem/status")
    assert status["last_run"]["devices_used"] == 2, status["last_run"]
    return status["model_weights_bytes"]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("family", ["flux", "wan21_t2v"])
def test_the_multi_gpu_ksampler_with_sharded_weights_equals_stock(comfy_server, comfy, family, cfg):
    whole = _whole_and_held(comfy_server, comfy, family, cfg, f"replicated_{family}_{cfg:g}", {})
    held = _whole_and_held(comfy_server, comfy, family, cfg, f"sharded_{family}_{cfg:g}", {"weights": "sharded"})
    assert len(held) == 2 and all(size < 0.75 * whole[0] for size in held), (held, whole)


@pytest.mark.parametrize("family", ["flux_deep", "wan21_t2v"])
def test_a_memory_cap_below_the_weights_shards_them_and_equals_stock(comfy_server, comfy, comfy_models, family):
    """A cap below the model's weights, above what a device holds of them sharded (its share of the blocks, the
    rest, one block gathered): weights 'auto' shards them, the run equals stock, each worker holds its share."""
    from parallel_backend.engine.weights import HEADROOM, sharded_bytes, sizes

    model = comfy_models(family)
    whole, sharded = sizes(model)[0], sharded_bytes(model, 2)
    assert sharded < whole / HEADROOM, (sharded, whole)
    cap = (sharded + whole / HEADROOM) / 2 / 2**30  # GiB: the whole weights leave no room, a share does
    held = _whole_and_held(comfy_server, comfy, family, 4.0, f"capped_{family}",
                           {"weights": "auto", "memory_per_device": cap})
    assert all(size < 0.75 * whole for size in held), (held, whole)
