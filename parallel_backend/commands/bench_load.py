"""What makes a bench's figures unreliable, watched during its run: other processes' load on the machine
(`_other_load`, `note_other_load`) and repeats of one variant spread too far apart (`_spread`). The sampler's
bench (bench.py) and the VAE's (bench_vae.py) mark a run DISTURBED with them."""

from __future__ import annotations

import statistics
import time

SPREAD_LIMIT = 0.10  # repeats of one variant further apart than this (of their median) mark the run disturbed
OTHER_LOAD_LIMIT = 0.10  # CPU time of other processes above this share of the machine marks it disturbed


def _own_cpu_seconds(me) -> float:
    """CPU seconds of psutil process `me` and its children: running ones, and ended ones whoever reaped them (the
    pool's, or the launcher's for the CPU workers it forked: runtime/launcher.py)."""
    import psutil

    def spent(process) -> float:  # children_*: its children already waited for (e.g. a stopped pool's workers)
        times = process.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    total = spent(me)
    for child in me.children(recursive=True):
        try:
            total += spent(child)
        except psutil.Error:
            pass
    return total


def _other_load() -> "callable":
    """Starts watching the machine; the returned function gives the share of all cores that processes other
    than this one and its children (the workers, running or ended) kept busy since (0 where psutil is
    missing)."""
    try:
        import psutil
    except ImportError:
        return lambda: 0.0
    me = psutil.Process()

    def busy() -> float:
        times = psutil.cpu_times()
        return times.user + times.system + getattr(times, "nice", 0.0)

    start_busy, start_ours, started = busy(), _own_cpu_seconds(me), time.monotonic()

    def share() -> float:
        elapsed = (time.monotonic() - started) * (psutil.cpu_count() or 1)
        return max(0.0, (busy() - start_busy) - (_own_cpu_seconds(me) - start_ours)) / elapsed if elapsed > 0 else 0.0

    return share


def note_other_load(other_load, disturbed: list[str]) -> float:
    """The share of the cores other processes kept busy (`_other_load`'s watch), noted first in `disturbed`
    when it passes OTHER_LOAD_LIMIT."""
    load = other_load()
    if load > OTHER_LOAD_LIMIT:
        disturbed.insert(0, f"other processes kept {100 * load:.0f}% of the machine's cores busy "
                            f"(> {100 * OTHER_LOAD_LIMIT:.0f}%)")
    return load


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0
