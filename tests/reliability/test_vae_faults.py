"""A worker lost in the middle of a VAE decode in bands (engine/vae.py): killed (SIGKILL) or stopped (SIGSTOP) as
it posts its k-th halo or statistics exchange (exchange_fault.py). The host must name that worker within the
deadline, leave no process behind, and the next decode must equal the one before. A worker killed between two
decodes restarts the pool before the second, which succeeds."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from parallel_backend.engine.pool_engine import engine_for
from parallel_backend.engine.vae import decode
from parallel_backend.runtime.pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow

FAULT = str(Path(__file__).with_name("exchange_fault.py"))
HANG_FLOOR_S = 5.0
_BANDS = importlib.util.spec_from_file_location("vae_band_cases", Path(__file__).parents[1] / "test_vae_bands.py")
cases = importlib.util.module_from_spec(_BANDS)
_BANDS.loader.exec_module(cases)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_worker_lost_mid_decode_is_named_and_the_next_decode_succeeds(how, procs, tmp_path):
    vae = cases.tiny_vae()
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(7))
    pool = WorkerPool("cpu:2", hang_floor_s=HANG_FLOOR_S)
    try:
        before = decode(engine_for(pool), vae, z).out
        pool.shutdown()
        fired = tmp_path / "fault_time"
        pool.worker_setup = (FAULT, "signal_at_exchange", f"1:12:{how}:{fired}")  # the restarted workers'
        with pytest.raises(WorkerError) as caught:
            decode(engine_for(pool), vae, z)
        noticed = time.time() - float(fired.read_text())
        message = str(caught.value)
        assert caught.value.rank == 1 and message.startswith("cpu (worker 1), decoding in bands of rows"), message
        assert noticed < (5.0 if how == "SIGKILL" else HANG_FLOOR_S + 5.0), (message, noticed)
        assert not pool.started and procs.orphans(pool.worker_pids() or [], 10) == []
        pool.worker_setup = None
        after = decode(engine_for(pool), vae, z)
        assert after.extra["bands"] == 2
        torch.testing.assert_close(after.out, before, atol=1e-5, rtol=1e-5)
    finally:
        pool.shutdown()


def test_a_worker_killed_between_decodes_restarts_the_pool_and_the_next_decode_succeeds(procs):
    vae = cases.tiny_vae()
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(7))
    pool = WorkerPool("cpu:2")
    try:
        before = decode(engine_for(pool), vae, z).out
        victim = pool.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        assert procs.orphans([victim], 5) == []
        after = decode(engine_for(pool), vae, z)
        assert after.extra["bands"] == 2 and pool.stats.idle_restarts == 1 and victim not in pool.worker_pids()
        torch.testing.assert_close(after.out, before, atol=0, rtol=0)
    finally:
        pool.shutdown()
