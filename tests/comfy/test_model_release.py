"""A model replaced after a Multi-GPU run is freed in ComfyUI, and the workers drop their copy of it."""

from __future__ import annotations

import time


def _wait_until_released(server, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while server.get("/tandem/status")["model_loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return not server.get("/tandem/status")["model_loaded"]


def test_a_model_replaced_after_a_multi_gpu_run_is_freed_and_the_workers_release_it(comfy_server, comfy):
    workflow = comfy.sampler_workflow("TandemKSampler", "replaced_tandem", "cfg")
    workflow["2"]["inputs"]["seed"] = 1501  # a prompt no other test samples: ComfyUI's cache cannot answer the run
    with comfy_server.on_the_pool():
        comfy.run_checked(comfy_server, workflow)
    assert comfy_server.get("/tandem/status")["model_loaded"]
    time.sleep(3)  # as between a user's runs: Tandem's release watcher (every 2 s) sees the model in use
    log_before = comfy_server.log_size()
    for seed in (6, 7):  # another model (other weights) replaces it, in stock-only runs
        other = comfy.sampler_workflow("KSampler", f"replaced_stock_{seed}", None)
        other["1"]["inputs"]["seed"] = seed
        comfy.run_checked(comfy_server, other)  # ComfyUI checks at its start that the models it dropped are freed
    said = comfy_server.log_since(log_before)
    leaks = [line for line in said.splitlines() if "WARNING, memory leak" in line]  # still referenced after a gc
    assert not leaks, leaks
    assert _wait_until_released(comfy_server), "the workers still hold the replaced model"
