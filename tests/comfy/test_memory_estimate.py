"""ComfyUI's memory estimate decides how cond and uncond are batched on the host (`_calc_cond_batch`: together only
while model.memory_required(...) * 1.5 fits the free memory). Tandem switches it off only for the calls that go to
the pool; a Multi-GPU run on the stock path batches exactly as the stock sampler does.

The probe node (fixture_nodes) records each model call's chunks and can raise the model's memory factor (an
object patch on its own clone) until the estimate exceeds any free memory: ComfyUI then runs cond and uncond apart.
The tiny model has its own seed here, so the factor never reaches the model the other tests share."""

from __future__ import annotations

import json

HUGE_FACTOR = 1e12  # the estimate of one 8x8 latent is then ~1e13 MB


def _probed(comfy, sampler: str, name: str, strategy: str | None, host_only: bool) -> dict:
    workflow = comfy.sampler_workflow(sampler, name, strategy)
    workflow["1"]["inputs"]["seed"] = 31
    workflow["31"] = {"class_type": "TandemTestBatchProbe",
                      "inputs": {"model": ["1", 0], "name": name, "memory_usage_factor": HUGE_FACTOR}}
    model = ["31", 0]
    if host_only:  # a method replaced on the model object: the Multi-GPU sampler takes the stock path
        workflow["30"] = {"class_type": "TandemTestReplacedForward", "inputs": {"model": model}}
        model = ["30", 0]
    workflow["5"]["inputs"]["model"] = model
    return workflow


def _calls(server, name: str) -> list[list[int]]:
    with open(server.base / "output" / "probes" / f"{name}.jsonl") as lines:
        return [json.loads(line) for line in lines]


def test_a_multi_gpu_run_on_the_stock_path_keeps_the_hosts_memory_estimate(comfy_server, comfy):
    comfy.run_checked(comfy_server, _probed(comfy, "KSampler", "estimate_stock", None, host_only=True))
    stock = _calls(comfy_server, "estimate_stock")
    assert len(stock) == 12 and all(len(chunks) == 1 for chunks in stock), stock  # the estimate splits them
    runs_before, log_before = comfy_server.get("/tandem/status")["runs"], comfy_server.log_size()
    comfy.run_checked(comfy_server, _probed(comfy, "TandemKSampler", "estimate_tandem", "cfg", host_only=True))
    assert comfy_server.get("/tandem/status")["runs"] == runs_before  # nothing ran on the pool
    said = comfy_server.log_since(log_before)
    assert "using the stock sampling path: something replaced methods of the model object" in said, said[-2000:]
    assert _calls(comfy_server, "estimate_tandem") == stock  # batched as ComfyUI batches, not forced together
    comfy.assert_same_latents(comfy_server.latent("estimate_tandem"), comfy_server.latent("estimate_stock"))


def test_calls_on_the_pool_batch_cond_and_uncond_whatever_the_hosts_estimate(comfy_server, comfy):
    with comfy_server.on_the_pool():
        comfy.run_checked(comfy_server, _probed(comfy, "TandemKSampler", "estimate_pool", "cfg", host_only=False))
    calls = _calls(comfy_server, "estimate_pool")
    assert len(calls) == 6 and all(sorted(chunks) == [0, 1] for chunks in calls), calls
