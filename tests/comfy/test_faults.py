"""Interrupt, worker failure and shutdown in a real ComfyUI: the run stops or fails with a named device, the next
works; ComfyUI exiting takes its workers with it."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest


def _queue(server, workflow) -> str:
    import uuid

    return server.post("/prompt", {"prompt": workflow, "client_id": str(uuid.uuid4())})["prompt_id"]


def _wait_for_calls(server, calls: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get("/tandem/status")
        if status["last_run"].get("calls", 0) >= calls and status["state"] == "running":
            return status
        time.sleep(0.05)
    raise TimeoutError(f"the Tandem run did not reach {calls} calls")


def _wait_for_history(server, prompt_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.1)
    raise TimeoutError(f"{prompt_id} did not finish")


def _long_run(server, comfy, prefix: str) -> str:
    workflow = comfy.sampler_workflow("TandemKSampler", prefix, "cfg")
    workflow["5"]["inputs"]["steps"] = 3000
    before = server.get("/tandem/status")["runs"]
    prompt_id = _queue(server, workflow)
    deadline = time.monotonic() + 60
    while server.get("/tandem/status")["runs"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    _wait_for_calls(server, 10)
    return prompt_id


def test_interrupt_stops_the_run_and_leaves_the_pool_usable(comfy_server, comfy):
    comfy.run_pair(comfy_server, "warm", "cfg")  # the pool is up and holds the model
    pids = comfy_server.get("/tandem/status")["worker_pids"]
    prompt_id = _long_run(comfy_server, comfy, "interrupted")
    comfy_server.post("/interrupt", {})
    entry = _wait_for_history(comfy_server, prompt_id, timeout=30)
    messages = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    assert comfy_server.get("/tandem/status")["last_run"]["calls"] < 2 * 3000  # stopped long before the end
    stock, tandem = comfy.run_pair(comfy_server, "after_interrupt", "cfg")
    comfy.assert_same_latents(tandem, stock)
    assert comfy_server.get("/tandem/status")["worker_pids"] == pids  # the same pool, not a restarted one


def test_a_killed_worker_fails_the_run_with_its_device_named_and_the_next_run_works(comfy_server, comfy):
    comfy.run_pair(comfy_server, "before_kill", "cfg")
    prompt_id = _long_run(comfy_server, comfy, "killed")
    victim = comfy_server.get("/tandem/status")["worker_pids"][1]
    os.kill(victim, signal.SIGKILL)
    entry = _wait_for_history(comfy_server, prompt_id, timeout=30)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "cpu (worker 1), call" in errors[0]["exception_message"], entry["status"]
    assert "SIGKILL" in errors[0]["exception_message"]
    named = re.search(r"call (\d+) \(step (\d+)\):", errors[0]["exception_message"])  # call and its step
    named_call = int(named.group(1))
    assert named_call >= 10  # the kill came after at least 10 calls: the error names the real one
    stock, tandem = comfy.run_pair(comfy_server, "after_kill", "cfg")
    comfy.assert_same_latents(tandem, stock)
    assert victim not in comfy_server.get("/tandem/status")["worker_pids"]


def test_freeing_memory_in_comfyui_releases_the_workers_copies(comfy_server, comfy):
    comfy.run_pair(comfy_server, "before_free", "cfg")
    status = comfy_server.get("/tandem/status")
    assert status["model_loaded"]
    loads = status["stats"]["model_loads"]
    comfy_server.post("/free", {"unload_models": True, "free_memory": True})
    # An idle ComfyUI unloads at once (the flag wakes its queue); the workers follow within the watch period.
    deadline = time.monotonic() + 30
    while comfy_server.get("/tandem/status")["model_loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not comfy_server.get("/tandem/status")["model_loaded"]
    stock, tandem = comfy.run_pair(comfy_server, "after_free", "cfg")  # the next run ships the model again
    comfy.assert_same_latents(tandem, stock)
    assert comfy_server.get("/tandem/status")["stats"]["model_loads"] == loads + 1


def test_a_pool_switched_off_takes_the_stock_path_and_says_why_once(comfy_base, comfy):
    """An expected refusal (the pool cannot take calls) keeps the stock path and its one sentence."""
    server = comfy.start_server(comfy_base, "comfy_pool_off.log", TANDEM_POOL_START="off")
    try:
        comfy.run_checked(server, comfy.sampler_workflow("KSampler", "pool_off_stock", None))
        before = server.log_size()
        comfy.run_checked(server, comfy.sampler_workflow("TandemKSampler", "pool_off_tandem", "cfg"))
        said = [line for line in server.log_since(before).splitlines() if "using the stock sampling path" in line]
        assert len(said) == 1 and "the worker pool is not available (the Tandem pool is off" in said[0], said
        comfy.assert_same_latents(server.latent("pool_off_tandem"), server.latent("pool_off_stock"))
    finally:
        comfy.stop_server(server)


def test_a_bad_setting_fails_the_run_naming_it_instead_of_running_stock(comfy_base, comfy):
    """A TANDEM_* variable the pool cannot use is checked as the pack loads: no pool starts, the log says so once,
    and the first Tandem node of a run fails with the sentence naming the variable, instead of running stock."""
    server = comfy.start_server(comfy_base, "comfy_bad_setting.log", TANDEM_HANG_FACTOR="soon")
    try:
        assert "Tandem: TANDEM_HANG_FACTOR='soon' is not a valid number; Tandem's nodes fail until it is changed" in (
            server.log_since(0))
        before = server.log_size()
        result = server.run(comfy.sampler_workflow("TandemKSampler", "bad_setting", "cfg"))
        errors = [m[1]["exception_message"] for m in result["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0].strip() == "TANDEM_HANG_FACTOR='soon' is not a valid number", result["status"]
        assert "using the stock sampling path" not in server.log_since(before)
    finally:
        comfy.stop_server(server)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_comfyui_shutting_down_leaves_no_worker_behind(comfy_base, comfy, how):
    """Ctrl+C, a service stop and a hard kill of ComfyUI (its own server, not the shared one): the workers go too."""
    server = comfy.start_server(comfy_base, f"comfy_{how}.log")
    try:
        comfy.run_checked(server, comfy.sampler_workflow("TandemKSampler", f"shutdown_{how}", "cfg"))
        pids = server.get("/tandem/status")["worker_pids"]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        os.kill(server.process.pid, getattr(signal, how))
        server.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], f"workers outlived ComfyUI ({how})"
    finally:
        if server.process.poll() is None:
            server.process.kill()
