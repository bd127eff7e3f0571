"""`tandem bench` across two 'machines' (the tests' namespaces) with the link limited to 1 Gbit/s by `tc tbf`,
next to the same pool on one machine; the bench prints `tandem plan`'s prediction (probed link) beside each.
Run by hand as root (not a test: it measures, it does not check):

    PYTHONPATH=. python tests/multimachine/bench_two_machines.py [--steps 10] [--repeats 2]

netem is not in every kernel (it is not in this project's CI kernel), so no added latency: only the rate. The
two 'machines' share this machine's cores: the host's namespace gets the first half, the other the rest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REMOTE_IP, REPO, SERVE_PORT, environment, make_machines, remove_machines  # noqa: E402


def bench(m, devices: str, args, cores: str) -> str:
    command = ["ip", "netns", "exec", m.a, "taskset", "-c", cores, sys.executable, "-m", "parallel_backend.commands.cli", "bench", "--model",
               args.model, "--devices", devices, "--strategies", "cfg,batch", "--steps", str(args.steps), "--repeats",
               str(args.repeats), "--secret-file", str(m.secret), "--interface", m.veth_a, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO, timeout=1800)
    return done.stdout + (done.stderr[-2000:] if done.returncode else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    m = make_machines(Path(tempfile.mkdtemp()) / "secret")
    try:
        for namespace, veth in ((m.a, m.veth_a), (m.b, m.veth_b)):
            m.run_in(namespace, "tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", "1gbit", "burst", "128kb",
                     "latency", "50ms", check=True)
        log = Path(tempfile.mkdtemp()) / "serve.log"
        # Both 'machines' share this one's cores: each gets its own, as two machines would have.
        cores = sorted(os.sched_getaffinity(0))
        half = max(1, len(cores) // 2)
        here, there = ",".join(map(str, cores[:half])), ",".join(map(str, cores[half:] or cores))
        serve = m.serve(log, cores=there)
        try:
            time.sleep(0.5)
            print(f"## two machines: cpu:1 here + {REMOTE_IP}:{SERVE_PORT}/cpu:1 over veth, tc tbf 1 Gbit/s\n")
            print(bench(m, f"cpu:1,{REMOTE_IP}:{SERVE_PORT}/cpu:1", args, here))
            print("## one machine: cpu:2\n")
            print(bench(m, "cpu:2", args, ",".join(map(str, cores))))
        finally:
            serve.kill()
            serve.wait(timeout=30)
    finally:
        remove_machines(m)


if __name__ == "__main__":
    main()
