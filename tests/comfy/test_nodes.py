"""The pack in a real ComfyUI: it loads, and the Multi-GPU KSampler gives the stock KSampler's latents."""

from __future__ import annotations

import pytest


def _untipped(node_info: dict) -> list[str]:
    """The inputs of a node (as /object_info lists it) that have no tooltip."""
    inputs = {**node_info["input"]["required"], **node_info["input"].get("optional", {})}
    return [name for name, spec in inputs.items() if len(spec) < 2 or not spec[1].get("tooltip")]


def test_the_pack_loads_and_lists_its_nodes_with_a_tooltip_on_every_input(comfy_server, comfy):
    info = comfy_server.get("/object_info")
    assert not _untipped(info["KSampler"])  # as the stock KSampler has them
    for node in ("TandemKSampler", "TandemKSamplerAdvanced", "TandemSettings", "TandemModel"):
        assert node in info, f"{node} missing from /object_info"
        assert not _untipped(info[node]), f"{node}: no tooltip on {_untipped(info[node])}"
    assert "Multi-GPU" in info["TandemKSampler"]["display_name"]


@pytest.mark.parametrize("strategy, cfg, batch", [("cfg", 6.0, 1), ("batch", 1.0, 2), ("batch", 6.0, 2)])
def test_multi_gpu_ksampler_equals_stock_ksampler(comfy_server, comfy, strategy, cfg, batch):
    stock, tandem = comfy.run_pair(comfy_server, f"{strategy}_{batch}_{int(cfg)}", strategy, cfg=cfg, batch=batch)
    assert stock.shape == (batch, 4, 8, 8)
    comfy.assert_same_latents(tandem, stock)


def test_lora_patched_model_on_workers_equals_stock(comfy_server, comfy):
    stock, tandem = comfy.run_pair(comfy_server, "lora", "cfg", lora=True)
    plain = comfy.run_pair(comfy_server, "plain_for_lora", "cfg")[0]
    assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the LoRA changes the result...
    comfy.assert_same_latents(tandem, stock)  # ...and the workers have it baked in


def test_samplers_that_call_the_model_twice_per_step(comfy_server, comfy):
    stock, tandem = comfy.run_pair(comfy_server, "heun", "cfg", sampler_name="heun")
    comfy.assert_same_latents(tandem, stock)


def test_example_workflow_uses_only_nodes_and_inputs_that_exist(comfy_server, comfy):
    import json
    from pathlib import Path

    api = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "multi_gpu_ksampler_api.json").read_text())
    info = comfy_server.get("/object_info")
    for node_id, node in api.items():
        assert node["class_type"] in info, node["class_type"]
        required = info[node["class_type"]]["input"].get("required", {})
        missing = [name for name in required if name not in node["inputs"]]
        assert not missing, f"node {node_id} ({node['class_type']}) lacks {missing}"


@pytest.mark.parametrize("strategy, cfg, batch", [("cfg", 6.0, 1), ("batch", 6.0, 2)])
def test_sdxl_unet_with_its_adm_vector_equals_stock(comfy_server, comfy, strategy, cfg, batch):
    stock, tandem = comfy.run_pair(comfy_server, f"sdxl_{strategy}", strategy, cfg=cfg, batch=batch, family="sdxl")
    assert stock.shape == (batch, 4, 8, 8)
    comfy.assert_same_latents(tandem, stock)


@pytest.mark.parametrize("strategy, settings", [("cfg", None), ("batch", None), ("asyncdiff", {"warmup": 6})])
def test_area_conditioning_equals_stock(comfy_server, comfy, strategy, settings):
    """An area cond is evaluated on its own crop of the latent: calls of other shapes and branch mixes.
    (128 px: this tiny UNet's one-channel norm groups cannot take a 1x1 map of a single row.)"""
    stock, tandem = comfy.run_pair(comfy_server, f"area_{strategy}", strategy, area=True, settings=settings, size=128)
    plain = comfy.run_pair(comfy_server, f"no_area_{strategy}", strategy, settings=settings, size=128)[0]
    assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the area matters
    comfy.assert_same_latents(tandem, stock)


@pytest.mark.parametrize("strategy, settings", [("cfg", None), ("batch", None), ("asyncdiff", {"warmup": 6})])
def test_controlnet_residuals_travel_with_the_call(comfy_server, comfy, strategy, settings):
    stock, tandem = comfy.run_pair(comfy_server, f"control_{strategy}", strategy, control=True, settings=settings)
    plain = comfy.run_pair(comfy_server, f"no_control_{strategy}", strategy, settings=settings)[0]
    assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the ControlNet matters
    comfy.assert_same_latents(tandem, stock)


def test_an_attention_patch_travels_with_its_call_to_the_pool(comfy_server, comfy):
    """Perturbed-Attention Guidance adds a third model call per step that carries an attention replacement
    (patches_replace: attn1, a closure of the node): it goes to the pool with its patch, like cond and uncond."""
    def with_pag(workflow):
        return comfy.with_model_patch(workflow, "PerturbedAttentionGuidance", scale=3.0)

    build = comfy.checkpoint_workflow  # the small SD1.5 file: on it, unlike the narrow model, PAG changes the image
    comfy.run_checked(comfy_server, with_pag(build("KSampler", "pag_stock", None)))
    comfy.run_checked(comfy_server, build("KSampler", "pag_plain", None))
    with comfy_server.on_the_pool():
        comfy.run_checked(comfy_server, with_pag(build("TandemKSampler", "pag_tandem", "cfg")))
    assert comfy_server.get("/tandem/status")["last_run"]["calls"] == 12  # 6 steps x (cond and uncond, PAG's)
    stock, plain = comfy_server.latent("pag_stock"), comfy_server.latent("pag_plain")
    assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the patch matters
    comfy.assert_same_latents(comfy_server.latent("pag_tandem"), stock)


def test_each_model_call_goes_to_the_engine_once(comfy_server, comfy):
    """One trip per call: the node hands each model call to the engine once, and the engine alone tries left-out
    machines again and makes the workers hold the model (the pool counts both checks)."""
    before = comfy_server.get("/tandem/status")["stats"]
    stock, tandem = comfy.run_pair(comfy_server, "one_trip", "cfg", steps=5)  # a graph of its own: none cached
    after = comfy_server.get("/tandem/status")["stats"]
    counted = {name: after[name] - before[name] for name in ("calls", "rejoin_checks", "model_checks")}
    assert counted["calls"] >= 5 and counted == dict.fromkeys(counted, counted["calls"]), counted
    comfy.assert_same_latents(tandem, stock)
