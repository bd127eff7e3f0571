"""Which devices a Multi-GPU run uses in ComfyUI: devices that do not exist fail the run, a Settings node at
'auto' means TANDEM_DEVICES, named devices win, and the same devices written differently keep the pool."""

from __future__ import annotations

import time

import pytest

RESTART = "restarting the worker pool for other devices"


def _running_pids(server, timeout: float = 120) -> list[int]:
    """The worker pids of the pool the server starts at load, once it runs."""
    deadline = time.monotonic() + timeout
    while (status := server.get("/tandem/status"))["state"] != "running":
        assert time.monotonic() < deadline, f"the pool did not start: {status}"
        time.sleep(0.3)
    return status["worker_pids"]


def _errors(result: dict) -> list[str]:
    return [m[1]["exception_message"] for m in result["status"]["messages"] if m[0] == "execution_error"]


@pytest.mark.parametrize("devices, strategy, sentence", [
    ("cuda:98,cuda:99", "cfg", "cuda:98, cuda:99 do not exist"),  # no test machine has 99 GPUs
    ("cuda:99", "auto", "cuda:99 does not exist"),
])
def test_devices_that_do_not_exist_fail_the_run_naming_them_and_leave_the_pool_alone(comfy_server, comfy, devices,
                                                                                     strategy, sentence):
    comfy.run_checked(comfy_server, comfy.sampler_workflow("TandemKSampler", "before_missing", "cfg"))
    pids = comfy_server.get("/tandem/status")["worker_pids"]
    result = comfy_server.run(comfy.sampler_workflow("TandemKSampler", f"missing_{strategy}", strategy,
                                                     settings={"devices": devices}))
    errors = _errors(result)
    assert errors and sentence in errors[0], result["status"]
    status = comfy_server.get("/tandem/status")
    assert status["state"] == "running" and status["worker_pids"] == pids  # the running pool is untouched


def test_settings_at_auto_mean_tandem_devices_and_named_devices_win(comfy_base, comfy):
    server = comfy.start_server(comfy_base, "comfy_tandem_devices_cpu3.log", devices="cpu:3")
    try:
        pids = _running_pids(server)
        assert len(pids) == 3
        with server.on_the_pool():
            comfy.run_checked(server, comfy.sampler_workflow("TandemKSampler", "env_auto", "cfg",
                                                             settings={"devices": "auto"}))
        status = server.get("/tandem/status")
        assert status["last_run"]["devices"] == ["cpu"] * 3 and status["worker_pids"] == pids
        log_before = server.log_size()
        with server.on_the_pool():  # the Settings node names cpu:2
            comfy.run_checked(server, comfy.sampler_workflow("TandemKSampler", "env_named", "cfg"))
        assert server.get("/tandem/status")["last_run"]["devices"] == ["cpu"] * 2
        said = server.log_since(log_before)
        assert f"{RESTART}: cpu,cpu,cpu -> cpu,cpu" in said, said[-2000:]  # a restart says why
    finally:
        comfy.stop_server(server)


def test_the_same_devices_written_differently_keep_the_pool(comfy_base, comfy):
    from parallel_backend.runtime.devices import resolve_devices

    auto = resolve_devices(("auto",))  # TANDEM_DEVICES unset: the pool at load runs on these
    spellings = {"auto": "auto", "listed": ",".join(auto)}
    if set(auto) == {"cpu"}:
        spellings["counted"] = f"cpu:{len(auto)}"
    server = comfy.start_server(comfy_base, "comfy_devices_auto.log", devices=None)
    try:
        pids = _running_pids(server)
        log_before = server.log_size()
        for name, devices in spellings.items():
            comfy.run_checked(server, comfy.sampler_workflow("TandemKSampler", f"same_{name}", "auto",
                                                             settings={"devices": devices}))
            assert server.get("/tandem/status")["worker_pids"] == pids, f"devices {devices!r} restarted the pool"
        said = server.log_since(log_before)
        assert RESTART not in said, said[-2000:]
    finally:
        comfy.stop_server(server)
