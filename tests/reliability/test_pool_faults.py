"""Faults: dead workers, worker errors, shutdown, a dying host, Ctrl-C, and what the pool listens on."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.runtime.pool import WorkerError, WorkerPool
from parallel_backend.models.sampling import GenerationRequest

pytestmark = pytest.mark.slow


def test_a_worker_killed_mid_job_gives_a_named_error_fast_and_the_pool_recovers(digits_pipeline, procs):
    pool = WorkerPool("cpu:2", timeout_s=300)  # a long timeout: the death must be seen from the process ending
    config = ParallelConfig("cpu:2", "cfg")
    long_job = GenerationRequest("a handwritten 2", steps=400, cfg=4.0)
    try:
        with digits_pipeline.parallel(config, pool=pool) as parallel:
            victim = pool.worker_pids()[1]
            killed_at = []

            def kill_mid_job():  # a few calls in: a worker lost before a job's first call only restarts the pool
                deadline = time.monotonic() + 120
                while pool.stats.calls < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
                killed_at.append(time.monotonic())
                os.kill(victim, signal.SIGKILL)

            killer = threading.Thread(target=kill_mid_job, daemon=True)
            killer.start()
            with pytest.raises(WorkerError) as caught:
                parallel.generate(long_job, progress=False)
            noticed = time.monotonic() - killed_at[0]
        message = str(caught.value)
        assert message.startswith("cpu (worker 1), call ") and "SIGKILL" in message, message
        assert noticed < 5.0, f"took {noticed:.1f} s to notice"
        assert caught.value.device == "cpu" and caught.value.rank == 1
        assert not pool.started and procs.gone(victim) and procs.orphans([victim], 1) == []
        # The next job restarts the pool and succeeds, with the same result as one device.
        request = GenerationRequest("a handwritten 2", steps=5, cfg=4.0)
        with digits_pipeline.parallel(config, pool=pool) as parallel:
            result = parallel.generate(request, progress=False)
        torch.testing.assert_close(result.latents, digits_pipeline.generate(request, progress=False).latents,
                                   atol=1e-4, rtol=1e-4)
        assert pool.stats.starts == 2 and victim not in pool.worker_pids()
    finally:
        pool.shutdown()


def test_an_error_inside_a_worker_names_device_and_call_and_the_pool_stays_usable(cpu_pool):
    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.runtime.calls import ModelCall
    from parallel_backend.hosts.executor import ParallelExecutor

    model = build_bench_model("tiny")
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch"))
    bad = ModelCall(torch.randn(2, 3, 8, 8), torch.tensor(10), torch.randn(2, 8, 64), index=17)  # 3 channels, not 4
    with pytest.raises(WorkerError, match=r"^cpu \(worker 0\), call 17 \(step 0\): RuntimeError") as caught:
        executor(model.unet, "diffusers_unet", bad)
    assert "Traceback" in caught.value.remote_traceback
    good = ModelCall(torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 8, 64), index=18)
    with torch.no_grad():
        expected = model.unet(good.x, good.t, encoder_hidden_states=good.context).sample
    torch.testing.assert_close(executor(model.unet, "diffusers_unet", good), expected, atol=1e-4, rtol=1e-4)


def test_shutdown_leaves_no_process_and_no_files(procs):
    pool = WorkerPool("cpu:2").start()
    pids, folder = pool.worker_pids(), pool._dir
    assert folder.exists() and not any(procs.gone(p) for p in pids)
    pool.shutdown()
    pool.shutdown()  # idempotent
    assert procs.orphans(pids, 5) == [] and not folder.exists()


def _listening_sockets(pids):
    inodes = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].rsplit(":", 1)[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net shows them


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
def test_the_pool_listens_on_loopback_only(cpu_pool):
    addresses = _listening_sockets([os.getpid(), *cpu_pool.worker_pids()])
    assert addresses, "expected the workers' process-group listeners"
    assert set(addresses) <= LOOPBACK, addresses


def test_an_unknown_device_fails_before_any_process_starts():
    pool = WorkerPool("cuda:7")
    with pytest.raises(ValueError, match="cuda:7 does not exist"):
        pool.start()
    assert not pool.started


def test_the_hosts_modules_come_first_on_the_workers_import_path(tmp_path):
    # ComfyUI has a top-level nodes.py; this pack has a nodes/ package: a worker must import the host's
    host = tmp_path / "host"
    host.mkdir()
    (host / "nodes.py").write_text("WHOSE = 'the host'\n")
    report = tmp_path / "report.txt"
    setup = tmp_path / "setup.py"
    setup.write_text("def configure(path):\n    import nodes\n    open(path, 'w').write(nodes.WHOSE)\n")
    with WorkerPool("cpu:1", import_paths=(str(host),), worker_setup=(str(setup), "configure", str(report))):
        assert report.read_text() == "the host"
