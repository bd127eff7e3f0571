"""The weights cache across two 'machines' (namespaces, conftest.py): a model crosses to the serving machine
once however many of its workers the pool has, not at all from a new host process once cached there, and the
cache's bound evicts the least recently used model, and a cached file changed on disk (a flipped byte, a
truncation, in the tensors file or the skeleton) is found out, removed and sent again in the next job; every job
still equals one device. An entry is a safetensors file of the tensors and a skeleton of the rest
(cache_format.py); with sharded weights, one entry per cut, holding only that worker's shares."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime.cache_digest import record_path
from parallel_backend.runtime.cache_format import join
from parallel_backend.runtime.remote_weights import cache_image
from parallel_backend.runtime.shipping import weights_hash

from .conftest import REMOTE_IP, SERVE_PORT, finish_host, read_line, stop_host

ATOL = 1e-4  # fp32 on CPU (TESTING.md)
MACHINE = f"{REMOTE_IP}:{SERVE_PORT}"
DEVICES = f"cpu:1,{MACHINE}/cpu:2"  # one worker here, two on the serving machine


def _tiny(variant: int):
    """host_job.py's model for --variant `variant`: (its weights_hash, the bytes sent of it: skeleton + tensors)."""
    model = build_bench_model("tiny")
    with torch.no_grad():
        for parameter in model.module.parameters():
            parameter.mul_(1 + variant / 100)
    skeleton, tensors = cache_image(model.module)
    return weights_hash(model.module, model.family), len(skeleton) + tensors.numel()


def _job(machines, variant: int = 0, weights: str = "replicated") -> dict:
    """One batch job from a new host process: its line (max_diff, shipped, sent per machine, calls)."""
    host = machines.host(DEVICES, "--strategies", "batch", "--variant", str(variant), "--weights", weights)
    try:
        line = read_line(host, 240)
        finish_host(host)
    finally:
        stop_host(host)
    assert line["max_diff"] <= ATOL and line["calls"] > 0, line  # the pool ran, and equals one device
    return line


def _cached(folder) -> list[str]:
    """The hashes of the cached models: each has HASH.safetensors and HASH.skeleton, each with the record of its
    digest beside it (HASH.safetensors.sha256), and nothing else is there."""
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    hashes = sorted({n.split(".")[0] for n in names})
    assert names == {f"{h}{suffix}" for h in hashes for suffix in (".safetensors", ".safetensors.sha256",
                                                                   ".skeleton", ".skeleton.sha256")}, names
    return hashes


def _size(folder, model_hash: str) -> int:
    return sum((folder / f"{model_hash}{suffix}").stat().st_size for suffix in (".safetensors", ".skeleton"))


class CachedServe:
    """`tandem worker serve` with two CPU workers and its weights cache in `folder`/cache."""

    def __init__(self, machines, folder):
        self.machines, self.folder, self.cache, self.process = machines, folder, folder / "cache", None

    def start(self, gib: float) -> None:
        self.process = self.machines.serve(self.folder / "serve.log", devices="cpu:2", cache_dir=self.cache,
                                           cache_gib=gib)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)


@pytest.fixture
def remote(machines, tmp_path):
    serve = CachedServe(machines, tmp_path)
    yield serve
    serve.stop()


def test_a_model_is_sent_to_a_machine_once_and_not_after_host_or_daemon_restarts(machines, remote):
    remote.start(1.0)
    cache = remote.cache
    model_hash, image_bytes = _tiny(0)
    first = _job(machines)
    assert first["sent"] == {MACHINE: image_bytes}, first  # once for the machine, not once per worker (two)
    assert _cached(cache) == [model_hash] and _size(cache, model_hash) == image_bytes
    second = _job(machines)  # a new host process: a new fingerprint, the same weights
    assert second["sent"] == {MACHINE: 0}, second
    assert second["shipped"] == first["shipped"] - image_bytes, (first, second)  # only this machine's worker's file
    remote.stop()  # the daemon restarts too: the cache is its folder, nothing held in memory
    remote.start(1.0)
    third = _job(machines)
    assert third["sent"] == {MACHINE: 0}, third
    print(f"image {image_bytes} B; first job sent {first['sent']}, shipped {first['shipped']}; second (new host) "
          f"sent {second['sent']}, shipped {second['shipped']}; third (new daemon) sent {third['sent']}")


def test_with_sharded_weights_a_machine_stores_and_loads_only_its_workers_shards(machines, remote):
    """Sharded over three workers, two of them on the serving machine: the machine is sent one cut entry per
    worker (the skeleton, the weights outside the units, that worker's share of each unit), each smaller than the
    whole model, together less than two whole copies; the job equals one device; a new host sends nothing."""
    remote.start(1.0)
    cache = remote.cache
    _, image_bytes = _tiny(0)
    first = _job(machines, weights="sharded")
    entries = _cached(cache)
    assert len(entries) == 2 and all(_size(cache, entry) < image_bytes for entry in entries), (entries, image_bytes)
    assert first["sent"] == {MACHINE: sum(_size(cache, entry) for entry in entries)} and \
        first["sent"][MACHINE] < 2 * image_bytes, (first, image_bytes)
    again = _job(machines, weights="sharded")
    assert again["sent"] == {MACHINE: 0}, again
    print(f"whole image {image_bytes} B; cut entries {[_size(cache, e) for e in entries]} B")


def test_a_bound_smaller_than_two_models_evicts_the_older(machines, remote):
    (a_hash, a_bytes), (b_hash, b_bytes) = _tiny(0), _tiny(1)
    assert a_hash != b_hash
    remote.start(1.5 * max(a_bytes, b_bytes) / 2**30)
    cache = remote.cache
    assert _job(machines, variant=0)["sent"] == {MACHINE: a_bytes}
    assert _job(machines, variant=1)["sent"] == {MACHINE: b_bytes}
    assert _cached(cache) == [b_hash]  # a went to make room
    assert _job(machines, variant=0)["sent"] == {MACHINE: a_bytes}  # so it crosses again
    assert _cached(cache) == [a_hash]


@pytest.mark.parametrize("how", ["flipped_byte", "truncated", "flipped_skeleton_byte"])
def test_a_cached_file_changed_on_disk_is_removed_logged_and_sent_again_in_the_next_job(machines, remote, how):
    remote.start(1.0)
    model_hash, image_bytes = _tiny(0)
    assert _job(machines)["sent"] == {MACHINE: image_bytes}
    path = remote.cache / f"{model_hash}{'.skeleton' if how == 'flipped_skeleton_byte' else '.safetensors'}"
    original = path.read_bytes()
    middle = len(original) // 2  # in the tensors file: inside the weights' bytes, so it still reads as safetensors
    if how != "truncated":
        with open(path, "r+b") as out:
            out.seek(middle)
            out.write(bytes([original[middle] ^ 0xFF]))
    else:
        os.truncate(path, middle)
    corrupt = path.read_bytes()
    again = _job(machines)  # it equals one device (checked there): the workers loaded the file sent again
    assert again["sent"] == {MACHINE: image_bytes}, again  # answered "not held", so sent in that same job
    # Replaced: the same model, each record matches its file's bytes.
    assert _cached(remote.cache) == [model_hash] and path.read_bytes() != corrupt
    assert len(path.read_bytes()) == len(original)
    assert path.suffix == ".skeleton" or path.read_bytes() == original  # a safetensors file is made the same each time
    for part in (".safetensors", ".skeleton"):
        written = remote.cache / f"{model_hash}{part}"
        assert json.loads(record_path(written).read_text())["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
    loaded = join((remote.cache / f"{model_hash}.skeleton").read_bytes(), remote.cache / f"{model_hash}.safetensors")
    assert weights_hash(loaded, build_bench_model("tiny").family) == model_hash
    serve_log = remote.folder / "serve.log"
    until = time.monotonic() + 10  # the daemon relays its workers' cache lines every 0.5 s and when they stop
    while str(path) not in serve_log.read_text() and time.monotonic() < until:
        time.sleep(0.2)
    removed = [line for line in serve_log.read_text().splitlines() if f"removed {path}:" in line]
    reason = {"flipped_byte": "bytes changed", "truncated": "truncated", "flipped_skeleton_byte": "bytes changed"}[how]
    assert len(removed) == 1 and reason in removed[0], serve_log.read_text()[-3000:]
    assert _job(machines)["sent"] == {MACHINE: 0}  # whole again: held, nothing crosses
    print(f"{how}: the second job sent {again['sent']}; the serve log: {removed[0]}")
