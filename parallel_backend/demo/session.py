"""What the demo holds between clicks: the pipeline, one persistent WorkerPool, and a lock (one job at a time).

No gradio here: the UI in `app.py` calls these functions, and tests call them directly.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .. import strategies
from ..engine.mesh import check_job
from ..engine.oracle import psnr
from ..engine.config import ParallelConfig
from ..engine.pool_engine import engine_for
from ..runtime.pool import WorkerPool
from ..runtime.portable import cpu_cores
from ..runtime.devices import parse_devices, resolve_devices
from ..models.sampling import Generation, GenerationRequest

DIFF_GAIN = 10  # the difference image shows |a - b| x DIFF_GAIN


def default_devices() -> str:
    """'auto' where there are two GPUs or more, else two CPU workers."""
    return "auto" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "cpu:2"


class DemoSession:
    """The loaded pipeline (on first use) and a pool kept alive across jobs, remade when the devices change.

    model: None for the embedded digits model, or a local diffusers SD/SDXL folder.
    """

    def __init__(self, model: str | None = None):
        self.model = model
        self.pool: WorkerPool | None = None
        self.lock = threading.RLock()
        self._pipeline = None

    @property
    def model_name(self) -> str:
        return self.model or "embedded digits model"

    @property
    def pipeline(self):
        with self.lock:
            if self._pipeline is None:
                from ..hosts.diffusers import default_device
                from ..hosts.pipelines import load_pipeline

                self._pipeline = load_pipeline(self.model, default_device())
            return self._pipeline

    def pool_for(self, devices: str) -> WorkerPool:
        """The started pool for `devices`; the previous pool is shut down if it was for other devices."""
        wanted = parse_devices(devices)
        with self.lock:
            if self.pool is not None and self.pool.requested_devices != wanted:
                self.shutdown()
            if self.pool is None:
                self.pool = WorkerPool(wanted)
            try:
                return self.pool.start()
            except BaseException:
                self.shutdown()
                raise

    def restart(self, devices: str | None = None) -> WorkerPool:
        """Shuts the pool down and starts it again (on `devices`, or the ones it had)."""
        with self.lock:
            if devices is None:
                devices = ",".join(self.pool.requested_devices) if self.pool else default_devices()
            self.shutdown()
            return self.pool_for(devices)

    def shutdown(self) -> None:
        with self.lock:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None


@dataclass
class PairResult:
    """One device vs the pool on the same request."""

    single: Generation
    tandem: Generation
    strategy: str  # as run: "auto" says what it chose
    devices: tuple[str, ...]
    difference: object  # PIL image, |single - tandem| x DIFF_GAIN
    max_abs_diff: float  # on 0..255 pixels
    psnr_db: float  # on pixels, inf when identical
    exact: bool = True  # the strategy as run promises one device's result (False: approximate after warm-up)

    @property
    def single_ms_per_call(self) -> float:
        return 1000 * self.single.seconds / max(self.single.model_calls, 1)

    @property
    def tandem_ms_per_call(self) -> float:
        return 1000 * self.tandem.seconds / max(self.tandem.model_calls, 1)

    @property
    def speedup(self) -> float:
        return self.single_ms_per_call / self.tandem_ms_per_call

    def summary(self) -> str:
        """Markdown: timings, speed-up and how far the images differ (PSNR against one device, every run)."""
        quality = "identical pixels" if self.max_abs_diff == 0 else (
            f"max abs diff {self.max_abs_diff:.0f}/255, PSNR {self.psnr_db:.1f} dB")
        kind = "exact" if self.exact else "approximate after its warm-up steps: not expected to equal one device"
        return (f"**{self.speedup:.2f}x** per model call: one device {self.single_ms_per_call:.1f} ms, "
                f"{self.strategy} on {len(self.devices)} devices ({', '.join(self.devices)}) "
                f"{self.tandem_ms_per_call:.1f} ms ({self.tandem.model_calls} calls each).  \n"
                f"Difference against one device: {quality} ({self.strategy} is {kind}).")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def difference_image(a, b, gain: float = DIFF_GAIN):
    """|a - b| per pixel, times `gain`, clipped: black where the images agree."""
    from PIL import Image

    diff = np.clip(np.abs(pixels(a) - pixels(b)) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(diff, mode="RGB")


@contextmanager
def _threads(count: int):
    """Host CPU threads for the block (as `tandem bench`: one device's share for the reference)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate_pair(session: DemoSession, prompt: str, negative_prompt: str = "", steps: int = 20, cfg: float = 4.0,
                  seed: int = 0, scheduler: str = "euler", devices: str = "cpu:2", strategy: str = "auto",
                  progress=lambda fraction, message: None, **knobs) -> PairResult:
    """Generates with one device, then with `strategy` on the pool for `devices`, same seed; compares them.

    knobs: the strategy's settings by name (`strategies.knobs()`, e.g. stages=2, warmup=1; None: the strategy
    picks). Bad input raises ValueError or TypeError (the API's checks, before anything loads or starts); a
    failing worker raises RuntimeError.
    progress(fraction, message) is told about each phase.
    """
    request = GenerationRequest(prompt, negative_prompt, steps, cfg, seed, scheduler)
    config = ParallelConfig(devices, strategy, **knobs)
    check_job(config, len(resolve_devices(config.device_list)), request.cfg != 1.0)
    with session.lock:
        progress(0.0, f"loading {session.model_name}")
        pipeline = session.pipeline
        pipeline.check(request)  # memory, before the pool starts
        progress(0.05, f"starting workers on {devices}")
        pool = session.pool_for(devices)
        label = config.strategy
        cpu = all(d == "cpu" for d in pool.devices)
        cores = len(cpu_cores())
        progress(0.15, "one device")
        with _threads(cores // len(pool.devices) if cpu else torch.get_num_threads()):
            single = pipeline.generate(request, progress=False)
        progress(0.55, f"{label} on {len(pool.devices)} devices")
        # The host only steps the scheduler in pool runs: spare host threads would spin on the workers' cores.
        with _threads(1 if cpu else torch.get_num_threads()), pipeline.parallel(config, pool) as parallel:
            tandem = parallel.generate(request, progress=False)
        ran = config.strategy
        if ran == "auto":  # what the plan chose for the run's last call
            last = engine_for(pool).last_mesh
            ran = None if last.size == 1 else last.strategy
            label = f"auto ({ran or 'one device'})"
        progress(0.95, "comparing")
    a, b = single.images[0], tandem.images[0]
    max_abs = float(np.abs(pixels(a) - pixels(b)).max())
    return PairResult(single, tandem, label, tuple(pool.devices), difference_image(a, b), max_abs,
                      psnr(torch.from_numpy(pixels(a)), torch.from_numpy(pixels(b))),
                      ran is None or strategies.get(ran).exact)


def pool_status(session: DemoSession) -> str:
    """Markdown: the pool's devices, whether it runs, its workers, the model they hold, memory and counters."""
    pool = session.pool
    lines = [f"**Model:** {session.model_name}"]
    if pool is None or not pool.started:
        return "\n\n".join(lines + ["**Pool:** not started (it starts on the first Generate, or with Restart)."])
    stats = pool.stats
    memory = ", ".join(f"worker {rank}: {value / 2**20:.0f} MiB" for rank, value in sorted(pool.peak_memory.items()))
    fingerprint = pool.loaded_fingerprint
    lines += [f"**Pool:** started on {', '.join(pool.devices)}",
              f"**Worker pids:** {', '.join(map(str, pool.worker_pids()))}",
              f"**Loaded model:** {fingerprint[:12] if fingerprint else 'none'}",
              f"**Peak memory:** {memory or 'no call yet'}",
              f"**Stats:** {stats.starts} start(s), {stats.model_loads} model load(s) "
              f"({stats.weights_bytes_shipped / 2**20:.1f} MiB shipped, last in {stats.last_load_seconds:.2f} s), "
              f"{stats.calls} call(s)"]
    if stats.failures:
        lines.append("**Recent failures:**\n" + "\n".join(f"- {f}" for f in stats.failures[-5:]))
    return "\n\n".join(lines)
