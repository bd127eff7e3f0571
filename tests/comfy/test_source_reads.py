"""A model file loaded by ComfyUI's own UNETLoader (fp16 on disk, cast by ComfyUI): its workers read their weights
from that file, each checked against the host's copy (runtime/sources.py), and the host writes only the skeleton,
where ComfyUI records the file (ModelPatcher.cached_patcher_init, v0.2x). With a LoRA applied the host writes the
model. Either way the Multi-GPU KSampler equals the stock one. ComfyUI v0.8 records no file: the host writes."""

from __future__ import annotations

import os
from pathlib import Path

RECORDS_FILE = "cached_patcher_init" in (Path(os.environ.get("COMFYUI_PATH", ".")) / "comfy" /
                                         "model_patcher.py").read_text(errors="replace") \
    if os.environ.get("COMFYUI_PATH") else False


def _stats(server) -> dict:
    return server.get("/tandem/status")["stats"]


def _fresh_load(server, comfy, name: str, strategy: str = "cfg", kind: str = "checkpoint", **kw):
    """The stock and Multi-GPU runs, after ComfyUI unloaded its models (so the workers load this one anew)."""
    server.post("/free", {"unload_models": True, "free_memory": True})
    loads = _stats(server)["model_loads"]
    stock, tandem = comfy.run_pair(server, name, strategy, kind=kind, **kw)
    comfy.assert_same_latents(tandem, stock)
    stats = _stats(server)
    assert stats["model_loads"] > loads, "the workers did not load the model anew"
    return stats


def test_the_workers_read_the_file_comfyui_loaded(comfy_server, comfy):
    stats = _fresh_load(comfy_server, comfy, "source_plain")
    read_from_file = stats["last_load_sources"]
    if not RECORDS_FILE:
        assert read_from_file == {} and stats["last_load_bytes_written"] > 1 << 20
        return
    assert sorted(read_from_file) == ["0", "1"] and min(read_from_file.values()) > 50, read_from_file
    assert stats["last_load_bytes_written"] < 256 << 10, "the host wrote more than the skeleton"


def test_a_lora_on_the_loaded_file_makes_the_host_write_the_model(comfy_server, comfy):
    stats = _fresh_load(comfy_server, comfy, "source_lora", lora=True)
    assert stats["last_load_sources"] == {} and stats["last_load_bytes_written"] > 1 << 20


def test_a_tensor_cut_reads_only_its_parts_of_the_flux_file(comfy_server, comfy_base, comfy, host_families):
    """Tiny Flux from its file (UNETLoader) cut by tensor: each worker reads its rows and columns of the file."""
    if "flux" not in host_families or (comfy_base / "models" / "diffusion_models" /
                                       (comfy.FAMILY_FILES["flux"] + ".skip")).exists():
        import pytest

        pytest.skip("this ComfyUI has no Flux, or its file could not be written")
    stats = _fresh_load(comfy_server, comfy, "source_tensor", "tensor", kind="family", family="flux", steps=3,
                        cfg=1.0, from_file=True)
    if not RECORDS_FILE:
        assert stats["last_load_sources"] == {}
        return
    read, whole = stats["last_load_bytes_read"], stats["weights_bytes_shipped"]
    assert sorted(stats["last_load_sources"]) == ["0", "1"], stats["last_load_sources"]
    assert stats["last_load_bytes_written"] < 256 << 10, "the host wrote more than the skeleton"
    file_bytes = (comfy_base / "models" / "diffusion_models" / comfy.FAMILY_FILES["flux"]).stat().st_size
    assert all(0 < n < 0.8 * file_bytes for n in read.values()), (read, file_bytes, whole)
