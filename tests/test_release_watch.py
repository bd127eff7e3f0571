"""The ComfyUI pack's release watcher (nodes/runtime.py), without ComfyUI: once the host model is gone, every
copy the workers hold of it goes, the whole one and each cut of it (a tensor or stage cut, sharded weights:
held as `FINGERPRINT~LAYOUT`), and no other model's. Oracle: the pool's list of what it holds."""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path


def _runtime_module():
    """nodes/runtime.py by its file (the pack's package imports ComfyUI)."""
    spec = importlib.util.spec_from_file_location("tandem_nodes_runtime",
                                                  Path(__file__).parents[1] / "nodes" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Pool:
    def __init__(self, held):
        self.loaded_fingerprints = tuple(held)
        self.released = []

    def release_models(self, fingerprint=None):
        self.released.append(fingerprint)
        self.loaded_fingerprints = tuple(f for f in self.loaded_fingerprints if f != fingerprint)


class _HostModel:
    current_weight_patches_uuid = "u1"


def test_a_gone_host_model_releases_its_whole_copy_and_every_cut_of_it():
    runtime_module = _runtime_module()
    runtime = runtime_module.Runtime()
    pool = _Pool(["flux:w1:x", "flux:w1:x~0a1b2c3d4e5f", "flux:w1:x~ffeeddccbbaa", "flux:w1:xy", "sd:w2:z"])
    runtime.pool = pool
    host = _HostModel()
    watched = (weakref.ref(host), f"{id(host)}:u1")
    runtime._watched = {"flux:w1:x": watched}
    assert runtime_module._still_loaded(watched)
    runtime._release_unless_replaced("flux:w1:x", watched)
    assert pool.released == ["flux:w1:x", "flux:w1:x~0a1b2c3d4e5f", "flux:w1:x~ffeeddccbbaa"]
    assert pool.loaded_fingerprints == ("flux:w1:xy", "sd:w2:z")


def test_a_model_held_only_as_a_cut_stays_watched():
    runtime_module = _runtime_module()
    runtime = runtime_module.Runtime()
    runtime._watcher = object()  # no thread: the watch's bookkeeping only
    host = _HostModel()
    runtime._watched = {"flux:w1:x": (weakref.ref(host), "w"), "gone:w0:q": (weakref.ref(host), "w")}
    runtime.watch(_Pool(["flux:w1:x~0a1b2c3d4e5f"]), "sd:w2:z", weakref.ref(host), "w")
    assert sorted(runtime._watched) == ["flux:w1:x", "sd:w2:z"]  # the one the pool dropped is forgotten
