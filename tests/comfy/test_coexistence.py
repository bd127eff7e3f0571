"""One multi-GPU split per model: Tandem's node next to ComfyUI's own MultiGPU CFG Split (v0.24; v0.8 has
none), and Tandem's node placed twice. One of them runs, never both; the log says which and why."""

from __future__ import annotations

import pytest

SPLIT_OFF = "ComfyUI's MultiGPU CFG Split is also on this model; Tandem's Multi-GPU node splits it"
TWICE = "this model already went through a Multi-GPU node (devices cpu:2, strategy batch); the later one applies"


def _graph(comfy, prefix: str, chain: list[str]) -> dict:
    """The tiny SD1 KSampler graph with `chain` (node classes, first to last) between the model and the
    stock KSampler; Tandem's Model nodes take batch then cfg settings in turn."""
    workflow = comfy.sampler_workflow("KSampler", prefix, None, cfg=6.0)
    model, tandem_nodes = ["1", 0], 0
    for i, class_type in enumerate(chain):
        node = str(40 + i)
        inputs = {"model": model}
        if class_type == "TandemModel":
            settings = str(50 + i)
            workflow[settings] = {"class_type": "TandemSettings",
                                  "inputs": {"devices": "cpu:2", "strategy": ("batch", "cfg")[tandem_nodes % 2],
                                             "cfg_degree": 0, "batch_degree": 0}}
            inputs["settings"] = [settings, 0]
            tandem_nodes += 1
        workflow[node] = {"class_type": class_type, "inputs": inputs}
        model = [node, 0]
    workflow["5"]["inputs"]["model"] = model
    return workflow


@pytest.fixture(scope="module")
def stock(comfy_server, comfy):
    comfy.run_checked(comfy_server, _graph(comfy, "coexist_stock", []))
    return comfy_server.latent("coexist_stock")


@pytest.mark.parametrize("chain", [["TandemTestMultiGPUStandIn", "TandemModel"],
                                   ["TandemModel", "TandemTestMultiGPUStandIn"]], ids=["split_first", "tandem_first"])
def test_tandem_runs_and_comfyuis_split_is_switched_off(comfy_server, comfy, stock, chain):
    info = comfy_server.get("/object_info")
    if "MultiGPU_WorkUnits" not in info:
        pytest.skip("this ComfyUI has no MultiGPU CFG Split (it came with v0.23)")
    prefix = "coexist_" + "_".join(c.lower() for c in chain)
    before = comfy_server.log_size()
    with comfy_server.on_the_pool():
        comfy.run_checked(comfy_server, _graph(comfy, prefix, chain))
    assert SPLIT_OFF in comfy_server.log_since(before)
    comfy.assert_same_latents(comfy_server.latent(prefix), stock)


def test_tandems_node_twice_runs_the_later_one_once(comfy_server, comfy, stock):
    before = comfy_server.log_size()
    with comfy_server.on_the_pool():
        comfy.run_checked(comfy_server, _graph(comfy, "coexist_twice", ["TandemModel", "TandemModel"]))
    assert TWICE in comfy_server.log_since(before)
    assert comfy_server.get("/tandem/status")["last_run"]["strategy"] == "cfg"
    comfy.assert_same_latents(comfy_server.latent("coexist_twice"), stock)
