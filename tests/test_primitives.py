"""The process group's timeout: a surviving worker never blocks forever on a dead peer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from parallel_backend.primitives import chunk_for_rank, chunk_sizes

RANK_SCRIPT = """
import os, sys, time, torch
from parallel_backend import primitives
rank = int(sys.argv[1])
primitives.join_group(sys.argv[2], rank, 2, "cpu", timeout_s=3.0)
if rank == 1:
    os._exit(0)  # dies without a word, mid-job
time.sleep(0.5)
try:
    primitives.dist.all_reduce(torch.ones(1))
    print("all_reduce returned")
except Exception as exc:
    print("raised", type(exc).__name__)
"""


def test_a_collective_with_a_dead_peer_fails_instead_of_hanging(tmp_path):
    rendezvous = f"file://{tmp_path}/rdzv"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), rendezvous], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    out, err = ranks[0].communicate(timeout=60)
    ranks[1].wait(timeout=10)
    assert "raised" in out or ranks[0].returncode != 0, out + err
    assert "all_reduce returned" not in out
    assert time.monotonic() - started < 45


def test_chunks():
    assert chunk_sizes(5, 2) == [3, 2] and chunk_sizes(1, 3) == [1, 0, 0]
    assert chunk_for_rank(5, 2, 1) == range(3, 5)
