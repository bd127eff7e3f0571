"""What the host writes into the pool's folder (RAM, in /dev/shm) and how long a load takes, when the host writes
the model for its workers and when they read it from the safetensors file the host loaded it from
(runtime/sources.py). A bench model is saved with save_pretrained in a temporary folder, loaded back with
from_pretrained, and loaded whole on 2 CPU workers, twice each way, alternating.
Run: PYTHONPATH=$PWD python3 docs/measurements/source_reads.py flux-small float32   (or sd15 float16)

Printed on the project's 2-core VM shared with other sessions (torch 2.13.0 CPU, 2026-12-07, host at 1 thread).
flux-small torch.float32: 138 MiB of weights, 1 file(s); host digest of every weight: 0.06 s
  before (host writes): pool folder written 138.27 MiB, load 0.40 s; again 0.29 s
  after (workers read the file): pool folder written 0.03 MiB, load 0.30 s; again 0.26 s (136 weights per worker)
  a weight changed (falls back): pool folder written 138.29 MiB, load 0.53 s (the refused read included)
sd15 torch.float16: 1639 MiB of weights, 1 file(s); host digest of every weight: 0.69 s
  before (host writes): pool folder written 1639.64 MiB, load 2.12 s; again 2.23 s
  after (workers read the file): pool folder written 0.16 MiB, load 2.06 s; again 2.48 s (686 weights per worker)
  a weight changed (falls back): pool folder written 1639.80 MiB, load 5.35 s (the refused read included: the
  changed weight was the file's last)
An earlier sd15 run, while the VM was busier (load average 8-10): before 7.03 and 13.13 s, after 4.43 and 3.25 s,
the host's digest 2.18 s. What changes is the RAM the host writes; the load's time is about the same.
"""
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime import sources
from parallel_backend.runtime.pool import WorkerPool
from parallel_backend.runtime.recipe import weights_bytes

torch.set_num_threads(1)  # the VM's 2 cores are shared: more threads only wait on each other
name, dtype = sys.argv[1], getattr(torch, sys.argv[2])
bench = build_bench_model(name, dtype)
folder = Path(tempfile.mkdtemp())
bench.module.save_pretrained(folder / "model")
cls, family = type(bench.module), bench.family
del bench
model = cls.from_pretrained(folder / "model", torch_dtype=dtype).eval().requires_grad_(False)
files = sorted((folder / "model").glob("*.safetensors"))
started = time.perf_counter()
for tensor in model.state_dict().values():
    sources.digest(tensor)
print(f"{name} {dtype}: {weights_bytes(model) / 2**20:.0f} MiB of weights, {len(files)} file(s); host digest of "
      f"every weight: {time.perf_counter() - started:.2f} s")
pool = WorkerPool("cpu:2", timeout_s=600).start()
try:
    for label, noted in (("before (host writes)", False), ("after (workers read the file)", True)) * 2:
        sources.note(model, files if noted else ())
        pool.release_models()
        pool.ensure_model(model, family, fingerprint=f"{label}-{time.time()}")
        stats = pool.stats
        print(f"  {label}: pool folder written {stats.last_load_bytes_written / 2**20:.2f} MiB, load "
              f"{stats.last_load_seconds:.2f} s, read per worker "
              f"{[round(v / 2**20, 1) for v in stats.last_load_bytes_read.values()]} MiB, weights from the file "
              f"per worker {stats.last_load_sources}")
    with torch.no_grad():  # a merged LoRA: the last weight changed in place, so the workers refuse, the host writes
        list(model.parameters())[-1].add_(0.01)
    pool.release_models()
    pool.ensure_model(model, family)
    print(f"  a weight changed (falls back): pool folder written {pool.stats.last_load_bytes_written / 2**20:.2f} "
          f"MiB, load {pool.stats.last_load_seconds:.2f} s (the refused read included)")
finally:
    pool.shutdown()
    shutil.rmtree(folder)
