"""tensor in ComfyUI. The cut of ComfyUI's own Flux.1 and Wan classes (models/tensor_splits.py BUILT) in this
process: a group's ranks run as threads whose exchanges meet at a barrier, each rank's output equal to the uncut
model's. Then the Multi-GPU KSampler with strategy tensor on two CPU workers against the stock KSampler, the
status saying the pool ran tensor on both. (A patched call's whole rows: test_real_workflows.py.)"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def comfy_models(comfy_server):
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(Path(__file__).parent)]
    from comfy.cli_args import args

    args.cpu = True
    from fixture_nodes import _seeded, families

    def build(family):
        return families.fill_buffers(_seeded(families.model_config(family).get_model({}), 3), 3).diffusion_model

    return build


def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    return (x, torch.tensor([0.7]), torch.randn(1, 8, 64, generator=g)), {"y": torch.randn(1, 32, generator=g),
                                                                           "guidance": torch.tensor([3.5])}


def _wan_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    return (x, torch.tensor([700.0]), torch.randn(1, 8, 4096, generator=g)), {}


@pytest.mark.parametrize("fixture, family, inputs", [("flux", "flux", _flux_inputs),
                                                     ("wan21_t2v", "wan", _wan_inputs)])
def test_comfy_models_cut_over_two_ranks_equal_the_whole(comfy_models, fixture, family, inputs):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tensor_threads", Path(__file__).parents[1] / "tensor_threads.py")
    threads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(threads)
    model = comfy_models(fixture)
    args, kwargs = inputs()
    with torch.inference_mode():
        reference = model(*args, **kwargs)
    outs, _ = threads.run_cut([copy.deepcopy(model) for _ in range(2)], f"comfy_dit:{family}",
                              lambda m: m(*args, **kwargs))
    for out in outs:
        assert (out - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("family", ["flux", "wan21_t2v", "wan21_i2v"])
def test_the_multi_gpu_ksampler_with_tensor_equals_stock(comfy_server, comfy, family, cfg):
    stock, tandem = comfy.run_pair(comfy_server, f"tensor_{family}_{cfg:g}", "tensor", kind="family", family=family,
                                   steps=3, cfg=cfg)
    comfy.assert_same_latents(tandem, stock)
    status = comfy_server.get("/tandem/status")
    assert (status["last_run"]["strategy"], status["last_run"]["devices_used"]) == ("tensor", 2), status["last_run"]
    held = status["model_weights_bytes"]  # the cut: each worker holds its share of the blocks
    assert len(held) == 2 and held[0] == held[1] > 0, held
