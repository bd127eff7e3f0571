"""Workers read the weights from the safetensors files the host loaded them from (runtime/sources.py): the host
writes only the skeleton, each worker reads only its parts, checked against the host's digest of them. Oracle:
the model whole in this process. A weight changed after loading (a merged LoRA) or a source file changed since
falls back to the host's write, and the output still equals the oracle."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models import forward_for_family
from parallel_backend.runtime import sources
from parallel_backend.runtime.recipe import weights_bytes
from parallel_backend.runtime.tensor_parts import Slices, Span, read_one

_CASES = importlib.util.spec_from_file_location("sequence_dit_cases", Path(__file__).with_name("test_sequence_dit.py"))
_built = importlib.util.module_from_spec(_CASES)  # its tiny Flux and its calls (tests are not a package)
_CASES.loader.exec_module(_built)
FLUX = "diffusers_dit:flux"


def _reference_sums(data: bytes) -> tuple[int, int]:
    """The block sums of sources._block_sums, in Python integers: 64-bit little-endian words, zero-padded."""
    data = data + bytes(-len(data) % 8)
    words = [int.from_bytes(data[i:i + 8], "little", signed=True) for i in range(0, len(data), 8)]
    mask = (1 << 64) - 1
    return sum(words) & mask, sum((j + 1) * w for j, w in enumerate(words)) & mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_block_sums_equal_python_integers(dtype):
    gen = torch.Generator().manual_seed(1)
    for numel in (1, 7, 1023, 1024 * 3 + 5):
        values = torch.randn(numel, generator=gen) * 1e4
        tensor = values.to(dtype) if dtype.is_floating_point else values.abs().to(dtype)
        raw = tensor.view(torch.uint8).numpy().tobytes()
        assert sources._block_sums(tensor) == _reference_sums(raw)


PARTS = [None, Slices((10, 6), 0, ((0, 3), (7, 9))), Slices((10, 6), 1, ((1, 2), (4, 6))), Span((10, 6), 5, 41),
         Slices((10, 6, 3), 1, ((0, 2), (5, 6)))]


@pytest.mark.parametrize("part", PARTS, ids=["whole", "rows", "columns", "span", "columns-3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_hosts_digest_of_a_part_equals_the_digest_of_what_a_worker_reads(tmp_path, monkeypatch, part, dtype):
    """The host sums the part in its tensor's memory; the worker sums the part it read, joined. Tiny blocks, so
    a part spans several (and a block spans two row ranges)."""
    monkeypatch.setattr(sources, "BLOCK_BYTES", 40)
    shape = part.shape if part is not None else (10, 6)
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    save_file({"model.w": tensor}, str(tmp_path / "f.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as opened:
        value, _ = read_one(opened, "model.w", part)
    assert sources.digest(value) == sources.digest(tensor, part)
    changed = tensor.clone()
    flat = changed.reshape(-1)
    flat[_kept(part, shape)[-1]] += 1  # the last element the part keeps
    assert sources.digest(changed, part) != sources.digest(tensor, part)


def _kept(part, shape) -> torch.Tensor:
    """The flat indices of the elements the part keeps."""
    at = torch.arange(torch.Size(shape).numel()).reshape(shape)
    if part is None:
        return at.reshape(-1)
    if isinstance(part, Span):
        return at.reshape(-1)[part.start:part.stop]
    ranges = torch.cat([torch.arange(a, b) for a, b in part.ranges])
    return at.index_select(part.dim, ranges).reshape(-1)


def test_swapped_words_change_the_digest():
    tensor = torch.arange(16, dtype=torch.float64)
    swapped = tensor.clone()
    swapped[[3, 9]] = swapped[[9, 3]]
    assert sources.digest(tensor)[0] == sources.digest(swapped)[0]
    assert sources.digest(tensor) != sources.digest(swapped)


def test_names_match_under_the_prefix_most_share_and_only_same_shapes_and_castable_dtypes(tmp_path):
    weights = {"a.weight": torch.ones(2, 3), "b.weight": torch.ones(4), "c": torch.ones(2), "d": torch.ones(3)}
    save_file({"model.diffusion_model.a.weight": torch.ones(2, 3, dtype=torch.float16),
               "model.diffusion_model.b.weight": torch.ones(4), "model.diffusion_model.c": torch.ones(3),
               "vae.d": torch.ones(3), "other.a.weight": torch.ones(2, 3)}, str(tmp_path / "ckpt.safetensors"))
    found = sources.matches(weights, [tmp_path / "ckpt.safetensors", tmp_path / "missing.safetensors"])
    assert found == {"a.weight": (str(tmp_path / "ckpt.safetensors"), "model.diffusion_model.a.weight"),
                     "b.weight": (str(tmp_path / "ckpt.safetensors"), "model.diffusion_model.b.weight")}
    assert sources.matches({"i": torch.ones(2, dtype=torch.int64)},
                           [_saved(tmp_path, {"i": torch.ones(2, dtype=torch.int32)})]) == {}


def test_every_dtype_safetensors_writes_is_named_as_torch_names_it(tmp_path):
    """The header's dtype names, as safetensors' own writer gives them, map to the dtypes written."""
    from safetensors import safe_open

    dtypes = {name: getattr(torch, name) for name in (
        "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "bfloat16",
        "float32", "float64", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, name)}
    written = {}
    for name, dtype in dtypes.items():
        try:
            save_file({"w": torch.zeros(2).to(dtype)}, str(tmp_path / f"{name}.safetensors"))
            written[name] = dtype
        except (TypeError, KeyError, ValueError):  # a dtype this safetensors cannot write
            continue
    assert {"float16", "bfloat16", "float32", "float8_e4m3fn", "int64"} <= set(written)
    for name, dtype in written.items():
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert sources._dtype(f.get_slice("w").get_dtype()) == dtype, name
    assert sources._dtype("F4") is None  # packed, no torch dtype of its own


def _saved(folder: Path, tensors: dict) -> Path:
    path = folder / "x.safetensors"
    save_file(tensors, str(path))
    return path


def test_a_file_cut_short_or_changed_is_refused_in_one_sentence(tmp_path):
    tensor = torch.randn(64, 8)
    path = _saved(tmp_path, {"w": tensor})
    read = {"w": sources.SourceRead(str(path), "w", "float32", sources.digest(tensor))}
    assert torch.equal(sources.read(read, {})[0]["w"], tensor)
    wrong = {"w": dataclasses.replace(read["w"], digest=sources.digest(tensor + 1))}
    with pytest.raises(sources.SourceRefused, match=r"^w as .* differs from the host's copy"):
        sources.read(wrong, {})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(sources.SourceRefused, match=r"^the model's file .* cannot be read \("):
        sources.read(read, {})


# ---- on a pool --------------------------------------------------------------------------------------------------

def _flux_from_folder(tmp_path: Path, dtype=torch.float32):
    """A tiny Flux saved as a diffusers folder in shards (fp16 on disk), loaded back as `dtype`, its files noted."""
    from diffusers import FluxTransformer2DModel

    _built.tiny_flux().to(torch.float16).save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    model = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=dtype)
    model = model.eval().requires_grad_(False)
    files = sorted((tmp_path / "transformer").glob("*.safetensors"))
    assert len(files) > 1
    sources.note(model, files)
    return model, files


def _run(pool, model, strategy, weights):
    call = _built.flux_call(2, 7, 3, 5)
    with torch.inference_mode():
        reference = forward_for_family(FLUX)(model, call)
    out = ParallelExecutor(pool, ParallelConfig("cpu:2", strategy, weights=weights)).run(model, FLUX, call).out
    assert (out - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


pool_test = pytest.mark.pool


@pool_test
@pytest.mark.parametrize("strategy, weights", [("tensor", "replicated"), ("batch", "sharded"),
                                               ("batch", "replicated")])
def test_workers_read_the_hosts_source_files_and_only_their_parts(cpu_pool, tmp_path, strategy, weights):
    model, _ = _flux_from_folder(tmp_path)
    cpu_pool.release_models()
    shipped = cpu_pool.stats.weights_bytes_shipped
    _run(cpu_pool, model, strategy, weights)
    stats = cpu_pool.stats
    every = len(model.state_dict())
    assert stats.last_load_sources == {0: every, 1: every}, "each worker reads every weight from the source files"
    assert stats.weights_bytes_shipped == shipped, "the host wrote weights although the files hold them all"
    assert 0 < stats.last_load_bytes_written < 64 << 10, "the host wrote more than the skeleton"
    read = stats.last_load_bytes_read
    whole = weights_bytes(model) // 2  # read as the file holds them: fp16
    if weights == "replicated" and strategy == "batch":
        assert list(read.values()) == [whole, whole]
    else:
        assert all(0 < n < 0.75 * whole for n in read.values()), read
    assert not list(cpu_pool._dir.glob("model-*"))


@pool_test
def test_a_weight_changed_after_loading_takes_the_written_path(cpu_pool, tmp_path, caplog):
    """A LoRA merged in place: its weight no longer equals the file's, the workers refuse, the host writes the
    model (said once), and the output is the changed model's."""
    model, _ = _flux_from_folder(tmp_path)
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_q.weight.add_(0.01)  # the merge
    cpu_pool.release_models()
    with caplog.at_level(logging.WARNING, logger="tandem"):
        _run(cpu_pool, model, "tensor", "replicated")
        _run(cpu_pool, model, "tensor", "replicated")
    said = [r.getMessage() for r in caplog.records if "cannot read the model from the file" in r.getMessage()]
    assert len(said) == 1 and "transformer_blocks.0.attn.to_q.weight" in said[0] and "differs" in said[0], said
    assert cpu_pool.stats.last_load_sources == {}
    assert cpu_pool.stats.last_load_bytes_written > weights_bytes(model) // 2


@pool_test
def test_a_source_file_changed_since_loading_falls_back(cpu_pool, tmp_path, caplog):
    """Bytes of a shard changed on disk after the host loaded it: the worker's check refuses, the host writes."""
    model, files = _flux_from_folder(tmp_path)
    biggest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's data, past the header
    biggest.write_bytes(bytes(data))
    cpu_pool.release_models()
    with caplog.at_level(logging.WARNING, logger="tandem"):
        _run(cpu_pool, model, "batch", "replicated")
    assert any("cannot read the model from the file" in r.getMessage() for r in caplog.records)
    assert cpu_pool.stats.last_load_sources == {}


def test_a_diffusers_models_files_are_found_from_its_config(tmp_path):
    """from_pretrained of a pipeline's subfolder, of the model's own folder, or a model built in memory."""
    from diffusers import FluxTransformer2DModel

    from parallel_backend.hosts.model_folder import weight_files

    _built.tiny_flux().save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    shards = tuple(sorted((tmp_path / "transformer").glob("*.safetensors")))
    in_pipeline = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    alone = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert len(shards) > 1
    assert weight_files(in_pipeline, "transformer") == shards and weight_files(in_pipeline) == ()
    assert weight_files(alone) == shards
    assert weight_files(_built.tiny_flux(), "transformer") == ()


def test_parallelize_notes_each_denoisers_files(tmp_path):
    """`parallelize(pipe)` (also what `tandem generate --model` runs) says where the transformer came from."""
    from diffusers import FluxTransformer2DModel

    from parallel_backend.hosts.diffusers import parallelize, unparallelize
    from parallel_backend.runtime.pool import WorkerPool

    _built.tiny_flux().save_pretrained(tmp_path / "transformer")
    pipe = type("Pipe", (), {})()
    pipe.transformer = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    pool = WorkerPool("cpu:2")  # never started
    parallelize(pipe, pool=pool)
    try:
        assert sources.files_of(pipe.transformer.real) == (str(tmp_path / "transformer" /
                                                               "diffusion_pytorch_model.safetensors"),)
    finally:
        unparallelize(pipe)


@pool_test
def test_a_weight_the_files_lack_is_written_and_the_rest_read(cpu_pool, tmp_path):
    """The host writes only what the files lack: here one weight taken out of its shard after loading."""
    from safetensors.torch import load_file

    model, files = _flux_from_folder(tmp_path)
    holder = next(f for f in files if "proj_out.weight" in load_file(str(f)))
    kept = {k: v for k, v in load_file(str(holder)).items() if k != "proj_out.weight"}
    if kept:
        save_file(kept, str(holder))
    else:
        holder.unlink()
    sources.note(model, [f for f in files if f.exists()])
    cpu_pool.release_models()
    shipped = cpu_pool.stats.weights_bytes_shipped
    _run(cpu_pool, model, "batch", "sharded")
    every = len(model.state_dict())
    assert cpu_pool.stats.last_load_sources == {0: every - 1, 1: every - 1}
    weight = model.proj_out.weight
    assert cpu_pool.stats.weights_bytes_shipped - shipped == weight.numel() * weight.element_size()
