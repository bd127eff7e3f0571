"""Everything that changes a model's output changes what the workers hold, or keeps the model on the host: a test
per kind of change, each run after a plain run of the same model (the case where a stale copy on the workers
would give a silent wrong result). Weights (another weight dtype, a LoRA strength), an object patch on the
diffusion model, a method replaced on the model object, wrappers added by another node, torch.compile."""

from __future__ import annotations

import pytest

STEPS = 4


@pytest.fixture(autouse=True)
def _flux_file(comfy_base, comfy):
    skip = comfy_base / "models" / "diffusion_models" / (comfy.FAMILY_FILES["flux"] + ".skip")
    if skip.exists():
        pytest.skip(skip.read_text())


def _flux(comfy, sampler, prefix, strategy, **loader):
    workflow = comfy.family_workflow(sampler, prefix, strategy, family="flux", from_file=True, steps=STEPS)
    workflow["1"]["inputs"].update(loader)
    return workflow


def _with(workflow: dict, class_type: str, **inputs) -> dict:
    """A model-patching node between the workflow's model and its sampler."""
    workflow["40"] = {"class_type": class_type, "inputs": {"model": workflow["5"]["inputs"]["model"], **inputs}}
    workflow["5"]["inputs"]["model"] = ["40", 0]
    return workflow


def _loads(server) -> int:
    return server.get("/tandem/status")["stats"]["model_loads"]


def _after_a_plain_run(server, comfy, name: str, change, ships: bool, pool: bool = True, differs: bool = True):
    """A plain Multi-GPU run, then `change` (workflow -> workflow) with the stock and the Multi-GPU sampler: equal;
    the workers got a new copy exactly when `ships`; on the pool, or (pool False) the stock path said; `differs`:
    the change changes the output (so a stale copy would be seen)."""
    comfy.run_checked(server, _flux(comfy, "TandemKSampler", f"{name}_before", "cfg"))
    comfy.run_checked(server, change(_flux(comfy, "KSampler", f"{name}_stock", None)))
    loads = _loads(server)
    if pool:
        with server.on_the_pool():
            comfy.run_checked(server, change(_flux(comfy, "TandemKSampler", f"{name}_tandem", "cfg")))
    else:
        log_before = server.log_size()
        comfy.run_checked(server, change(_flux(comfy, "TandemKSampler", f"{name}_tandem", "cfg")))
        assert "using the stock sampling path: something replaced methods" in server.log_since(log_before)
    assert _loads(server) == loads + (1 if ships else 0)
    stock, before = server.latent(f"{name}_stock"), server.latent(f"{name}_before")
    comfy.assert_same_latents(server.latent(f"{name}_tandem"), stock)
    if differs:
        assert (stock - before).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()


def test_another_weight_dtype_is_another_copy(comfy_server, comfy):
    def fp8(workflow):
        workflow["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
        return workflow
    _after_a_plain_run(comfy_server, comfy, "change_dtype", fp8, ships=True)


def test_an_object_patch_on_the_diffusion_model_ships_it_again(comfy_server, comfy):
    def no_guidance_embedding(workflow):
        return _with(workflow, "TandemTestObjectPatch", key="diffusion_model.params.guidance_embed", value="false")
    _after_a_plain_run(comfy_server, comfy, "change_object", no_guidance_embedding, ships=True)


def test_a_method_replaced_after_a_plain_run_keeps_the_model_on_the_host(comfy_server, comfy):
    def replaced(workflow):  # computes what the class's forward does: the stock-path sentence is what is checked
        return _with(workflow, "TandemTestReplacedForward")
    _after_a_plain_run(comfy_server, comfy, "change_method", replaced, ships=False, pool=False, differs=False)


def test_a_wrapper_added_after_a_plain_run_runs_around_the_pool(comfy_server, comfy):
    def easycache(workflow):
        workflow["5"]["inputs"]["steps"] = 10
        return _with(workflow, "EasyCache", reuse_threshold=1.0, start_percent=0.0, end_percent=1.0, verbose=False)
    _after_a_plain_run(comfy_server, comfy, "change_wrapper", easycache, ships=False)


def test_torch_compile_compiles_the_workers_copies_once_per_shape(comfy_server, comfy):
    def compiled(workflow):
        return _with(workflow, "TorchCompileModel", backend="inductor")
    _after_a_plain_run(comfy_server, comfy, "change_compile", compiled, ships=True, differs=False)
    graphs = comfy_server.get("/tandem/status")["last_run"].get("compiled_graphs")
    assert graphs and all(g and g > 0 for g in graphs), graphs  # each worker ran its compiled copy
    again = compiled(_flux(comfy, "TandemKSampler", "compile_again", "cfg"))
    again["5"]["inputs"]["seed"] += 1  # another run (ComfyUI would reuse the cached result of the same inputs)
    with comfy_server.on_the_pool():  # of the same shapes: nothing compiled anew
        comfy.run_checked(comfy_server, again)
    assert comfy_server.get("/tandem/status")["last_run"]["compiled_graphs"] == graphs


def test_a_lora_after_a_plain_run_ships_the_model_again(comfy_server, comfy, loras):
    def lora(workflow):
        return _with(workflow, "LoraLoaderModelOnly", lora_name=loras["flux"], strength_model=0.5)
    _after_a_plain_run(comfy_server, comfy, "change_lora", lora, ships=True)
