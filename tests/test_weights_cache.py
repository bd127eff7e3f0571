"""A serving machine's weights cache (weights_cache.py) and the content hash naming its files
(shipping.weights_hash), without processes or namespaces: what is kept (a safetensors file of the tensors and a
skeleton of the rest, cache_format.py), what is refused, what is evicted, how a cached file that changed on disk
is found out (cache_digest.py), and that loading an entry never runs torch.load."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from parallel_backend.runtime import cache_digest, cache_format, shipping
from parallel_backend.runtime.cache_digest import record_path
from parallel_backend.runtime.messages import Load
from parallel_backend.runtime.recipe import Recipe, identity_of, layout
from parallel_backend.runtime.remote_weights import cache_image
from parallel_backend.runtime.serve import ServeDaemon
from parallel_backend.runtime.weights_cache import WeightsCache, cache_lines, cache_size_bytes
from parallel_backend.runtime.worker_loop import WorkerState

pytestmark = pytest.mark.pool

FAMILY = "test_mlp"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))


def _image(payload) -> tuple[bytes, bytes]:
    """What a host sends a machine's cache of `payload`: (skeleton, the tensors' safetensors file)."""
    skeleton, tensors = cache_image(payload)
    return skeleton, tensors.numpy().tobytes()


def _size(image) -> int:
    return sum(map(len, image))


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _entry(weights_hash: str) -> list[str]:
    """A cached model's files: its tensors, its skeleton, and the record of each file's digest."""
    return [f"{weights_hash}{suffix}" for suffix in (".safetensors", ".safetensors.sha256", ".skeleton",
                                                      ".skeleton.sha256")]


@pytest.fixture
def no_torch_load(monkeypatch):
    """torch.load fails when called: loading from the cache must not call it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load called ({args}, {kwargs})")

    monkeypatch.setattr(torch, "load", refuse)


def test_the_hash_names_the_weights_not_the_object():
    a, b = _model(0), _model(0)
    assert shipping.weights_hash(a, FAMILY) == shipping.weights_hash(b, FAMILY)  # two objects, same weights
    assert shipping.weights_hash(a, FAMILY) != shipping.weights_hash(a, "other_family")
    assert shipping.weights_hash(a, FAMILY) != shipping.weights_hash(_model(1), FAMILY)
    before = shipping.weights_hash(a, FAMILY)
    with torch.no_grad():
        a[0].weight[3, 5] += 1e-3  # an in-place change (a LoRA merge)
    assert shipping.weights_hash(a, FAMILY) != before
    assert shipping.weights_hash(b.to(torch.float64), FAMILY) != before  # same values, another dtype


class _WithExtraState(torch.nn.Linear):
    def get_extra_state(self):
        return {"made_by": object()}  # its repr holds an address: differs between two equal models

    def set_extra_state(self, state):
        pass


def test_extra_state_does_not_make_equal_models_differ():
    torch.manual_seed(0)
    a = _WithExtraState(8, 8)
    torch.manual_seed(0)
    b = _WithExtraState(8, 8)
    assert shipping.weights_hash(a, FAMILY) == shipping.weights_hash(b, FAMILY)


def test_the_hash_is_computed_once_per_fingerprint(monkeypatch):
    model, calls = _model(2), []
    real = shipping.weights_hash
    monkeypatch.setattr(shipping, "weights_hash", lambda m, f: calls.append(1) or real(m, f))
    first = shipping.cached_weights_hash(model, FAMILY, shipping.model_fingerprint(model, FAMILY))
    again = shipping.cached_weights_hash(model, FAMILY, shipping.model_fingerprint(model, FAMILY))
    assert first == again == real(model, FAMILY) and len(calls) == 1
    with torch.no_grad():
        model[2].bias.add_(1.0)  # bumps the version counter: a new fingerprint, hashed again
    changed = shipping.cached_weights_hash(model, FAMILY, shipping.model_fingerprint(model, FAMILY))
    assert changed != first and len(calls) == 2


def test_an_upload_is_kept_under_its_hash_and_loads_back(tmp_path, no_torch_load):
    cache, model = WeightsCache(tmp_path / "cache", 2**30), _model(3)
    weights_hash = shipping.weights_hash(model, FAMILY)
    assert not cache.holds(weights_hash)
    skeleton, tensors = cache_image(model)
    files = cache.store(weights_hash, FAMILY, skeleton, tensors)
    assert _files(cache.folder) == _entry(weights_hash) and files == cache.files_of(weights_hash)
    assert cache.holds(weights_hash)
    assert files[1].read_bytes() == skeleton and len(skeleton) < 4096  # everything but the tensors: small
    from safetensors.torch import load_file

    on_disk = load_file(files[0])  # a plain safetensors file, named as the module names its weights
    assert set(on_disk) == set(model.state_dict()) and all(torch.equal(on_disk[k], v)
                                                           for k, v in model.state_dict().items())
    loaded = cache.load(weights_hash)
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), model(x))


class Quantized(torch.Tensor):
    """A tensor subclass with attributes of its own (as ComfyUI-GGUF's): safetensors cannot name its class."""


def _unusual_model(seed: int) -> torch.nn.Module:
    """Tied weights, a view of a weight, a non-contiguous buffer and a tensor subclass with an attribute."""
    model = _model(seed)
    model[2] = torch.nn.Linear(64, 64)
    model[2].weight = model[0].weight  # tied
    model.register_buffer("head", model[0].bias[:8])  # a view of another weight
    model.register_buffer("turned", torch.randn(16, 64).t())  # not contiguous
    packed = torch.randn(8, 8).as_subclass(Quantized)
    packed.kind = "q4"
    model.register_buffer("packed", packed)
    return model


def test_tied_views_non_contiguous_and_subclass_tensors_come_back_without_torch_load(tmp_path, no_torch_load):
    cache, model = WeightsCache(tmp_path, 2**30), _unusual_model(12)
    weights_hash = shipping.weights_hash(model, FAMILY)
    cache.store(weights_hash, FAMILY, *_image(model))
    loaded = cache.load(weights_hash)
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), model(x)) and shipping.weights_hash(loaded, FAMILY) == weights_hash
    assert loaded[2].weight is loaded[0].weight  # still tied
    assert type(loaded.packed) is Quantized and loaded.packed.kind == "q4" and torch.equal(loaded.packed, model.packed)
    assert torch.equal(loaded.turned, model.turned) and torch.equal(loaded.head, model.head)


def _build_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))


def _recipe(seed: int) -> tuple[Recipe, torch.nn.Module]:
    model = _model(seed)
    model[1].eps = 1e-3  # a setting written after building: carried as an override
    build = lambda: _build_mlp()  # noqa: E731  (a closure: travels by value in the skeleton)
    return Recipe(build, dict(model.state_dict()), layout(model), identity_of("mlp", seed),
                  overrides={"1": {"eps": 1e-3}}), model


def test_a_recipe_round_trips_through_the_cache_and_builds_the_hosts_model(tmp_path, no_torch_load):
    cache = WeightsCache(tmp_path, 2**30)
    recipe, model = _recipe(13)
    weights_hash = shipping.weights_hash(recipe, FAMILY)
    skeleton, tensors = _image(recipe)
    assert len(skeleton) < 8192 and len(tensors) > shipping.model_bytes(recipe)  # the weights are in the tensors
    cache.store(weights_hash, FAMILY, skeleton, tensors)
    loaded = cache.load(weights_hash)
    assert isinstance(loaded, Recipe) and loaded.identity == recipe.identity and loaded.overrides == recipe.overrides
    built = loaded.make("cpu")
    x = torch.randn(4, 64)
    assert built[1].eps == 1e-3 and torch.equal(built(x), model.eval()(x))


def test_a_serving_worker_loads_a_cached_model_without_torch_load(tmp_path, no_torch_load):
    cache, model = WeightsCache(tmp_path, 2**30), _model(14)
    weights_hash = shipping.weights_hash(model, FAMILY)
    cache.store(weights_hash, FAMILY, *_image(model))
    state = WorkerState(0, 1, "cpu")
    state.weights_cache = cache
    state.load(Load("f" * 64, FAMILY, cached=weights_hash))
    x = torch.randn(4, 64)
    assert torch.equal(state.model("f" * 64)[0](x), model(x))


@pytest.mark.parametrize("corruption", ["other_model", "flipped_byte", "truncated", "garbage", "garbage_skeleton",
                                        "skeleton_of_another"])
def test_a_corrupt_upload_is_never_kept(tmp_path, corruption):
    cache, model = WeightsCache(tmp_path, 2**30), _model(4)
    weights_hash = shipping.weights_hash(model, FAMILY)
    skeleton, tensors = _image(model)
    tensors = bytearray(tensors)
    if corruption == "other_model":
        skeleton, tensors = _image(_model(5))
    elif corruption == "flipped_byte":
        weights_at = bytes(tensors).index(model[0].weight.detach().numpy().tobytes()[:64])  # inside the weights
        tensors[weights_at + 7] ^= 0xFF
    elif corruption == "truncated":
        tensors = tensors[: len(tensors) // 2]
    elif corruption == "garbage":
        tensors = bytearray(os.urandom(4096))
    elif corruption == "garbage_skeleton":
        skeleton = os.urandom(512)
    else:  # the skeleton of a larger model: it names a tensor the tensors file lacks
        skeleton = _image(torch.nn.Sequential(*_model(4), torch.nn.Linear(8, 8)))[0]
    with pytest.raises(ValueError, match="not kept"):
        cache.store(weights_hash, FAMILY, skeleton, bytes(tensors))
    assert _files(tmp_path) == [] and not cache.holds(weights_hash)


def test_the_least_recently_used_model_is_evicted_to_stay_within_the_bound(tmp_path):
    models = [_model(10 + i) for i in range(3)]
    images = [_image(m) for m in models]
    hashes = [shipping.weights_hash(m, FAMILY) for m in models]
    cache = WeightsCache(tmp_path, int(2.5 * max(map(_size, images))))  # two fit, not three
    cache.store(hashes[0], FAMILY, *images[0])
    cache.store(hashes[1], FAMILY, *images[1])
    os.utime(record_path(cache.files_of(hashes[0])[1]), (1, 1))  # stored first, then used: the second is the oldest
    os.utime(record_path(cache.files_of(hashes[1])[1]), (0, 0))
    assert cache.holds(hashes[0])  # a use renews it
    cache.store(hashes[2], FAMILY, *images[2])
    assert _files(tmp_path) == sorted(_entry(hashes[0]) + _entry(hashes[2]))
    assert sum(size for _, size, _ in cache.entries()) <= cache.limit
    assert [h for _, _, h in cache.entries()] == [hashes[0], hashes[2]]
    assert [size for _, size, _ in cache.entries()] == [_size(images[0]), _size(images[2])]


def test_a_model_larger_than_the_bound_is_refused_before_writing(tmp_path):
    model = _model(6)
    image = _image(model)
    cache = WeightsCache(tmp_path, _size(image) - 1)
    with pytest.raises(ValueError, match="larger than this machine's weights cache.*--cache-size"):
        cache.store(shipping.weights_hash(model, FAMILY), FAMILY, *image)
    assert _files(tmp_path) == []


def test_a_write_cut_short_leaves_no_file_under_the_hash(tmp_path, monkeypatch):
    cache, model = WeightsCache(tmp_path, 2**30), _model(7)
    weights_hash = shipping.weights_hash(model, FAMILY)

    def fail(*_):
        raise OSError(28, "No space left on device")

    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: fail() if str(b).endswith(".skeleton") else real(a, b))
    with pytest.raises(OSError):  # the rename that publishes it (the skeleton's, the last) fails
        cache.store(weights_hash, FAMILY, *_image(model))
    assert _files(tmp_path) == [] and not cache.holds(weights_hash)


def test_partial_uploads_of_dead_processes_and_an_older_tandems_entries_are_removed(tmp_path):
    cache = WeightsCache(tmp_path, 2**30)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = [tmp_path / f".partial-{int(gone.stdout)}-{'a' * 64}{suffix}"
            for suffix in (".safetensors", ".skeleton.sha256", ".pt", ".pt.sha256")]
    old = [tmp_path / f"{'c' * 64}.pt", tmp_path / f"{'c' * 64}.pt.sha256"]  # a torch.save image: never loaded now
    alive = tmp_path / f".partial-{os.getpid()}-{'b' * 64}.safetensors"
    other = tmp_path / "notes.txt"
    for path in (*dead, *old, alive, other):
        path.write_bytes(b"x")
    assert cache.remove_stale() == 6
    assert _files(tmp_path) == sorted([alive.name, other.name])


def test_only_hex_hashes_name_files(tmp_path):
    cache = WeightsCache(tmp_path, 2**30)
    with pytest.raises(ValueError, match="not a weights hash"):
        cache.files_of("../../etc/passwd")


@pytest.mark.parametrize("size", ["0", "-1", "abc", "inf", "nan"])
def test_a_bad_cache_size_is_one_sentence(size):
    with pytest.raises(ValueError, match="--cache-size .*positive number"):
        cache_size_bytes(size)


def test_serve_refuses_a_cache_folder_it_cannot_write_before_listening(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--cache-dir .*cannot write there"):
        ServeDaemon("127.0.0.1:0", "cpu:1", str(secret), interface="lo", cache_dir=str(blocker / "weights"))
    with pytest.raises(ValueError, match="--cache-size"):
        ServeDaemon("127.0.0.1:0", "cpu:1", str(secret), interface="lo", cache_dir=str(tmp_path / "w"),
                    cache_size_gib="0")
    assert cache_size_bytes("0.5") == 2**29


def test_tandem_worker_serve_refuses_a_bad_cache_size_in_one_line(tmp_path, capsys):
    from parallel_backend.commands import cli

    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    code = cli.main(["worker", "serve", "--listen", "127.0.0.1:0", "--devices", "cpu:1", "--secret-file",
                     str(secret), "--cache-dir", str(tmp_path / "w"), "--cache-size", "-2"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--cache-size '-2'" in err, err
    assert not (tmp_path / "w").exists()  # refused before anything was made


def _stored(tmp_path, seed: int = 8):
    """A cache holding one model: (cache, model, its hash, the cached tensors file's bytes)."""
    cache, model = WeightsCache(tmp_path / "cache", 2**30), _model(seed)
    weights_hash = shipping.weights_hash(model, FAMILY)
    tensors, _ = cache.store(weights_hash, FAMILY, *_image(model))
    return cache, model, weights_hash, tensors.read_bytes()


def _flip(path, at: int) -> None:
    """Flips the byte at `at` in place: the same inode and size, as a disk's error would be."""
    with open(path, "r+b") as out:
        out.seek(at)
        byte = out.read(1)
        out.seek(at)
        out.write(bytes([byte[0] ^ 0xFF]))


def _corrupt(path, how: str, model) -> None:
    """Flips one byte of the first weight's data in the cached tensors file or one byte of the skeleton, truncates
    the file, removes its digest, or removes the file."""
    if how == "flipped_byte":
        _flip(path, path.read_bytes().index(model[0].weight.detach().numpy().tobytes()[:64]) + 7)
    elif how == "flipped_skeleton_byte":
        _flip(path, path.stat().st_size // 2)
    elif how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "missing_digest":
        record_path(path).unlink()
    else:
        path.unlink()


CHANGES = {"flipped_byte": (0, "bytes changed"), "flipped_skeleton_byte": (1, "bytes changed"),
           "truncated": (0, "truncated"), "missing_digest": (0, "no content digest"),
           "missing_tensors": (0, "it is missing")}  # how -> (which file: tensors 0, skeleton 1, what is said)


@pytest.mark.parametrize("how", sorted(CHANGES))
def test_a_cached_file_that_changed_is_not_held_and_is_removed_with_its_path_logged(tmp_path, caplog, how):
    cache, model, weights_hash, _ = _stored(tmp_path)
    which, said = CHANGES[how]
    path = cache.files_of(weights_hash)[which]
    _corrupt(path, how, model)
    caplog.set_level(logging.WARNING, logger="tandem")
    held, why = cache.check(weights_hash)
    assert not held and why
    assert _files(cache.folder) == []  # the file and its record are gone: the next store starts clean
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 1 and str(path) in removed[0] and why in removed[0], removed
    assert said in why, why
    assert not cache.holds(weights_hash)  # asked again: simply not there, nothing more logged
    assert len([r for r in caplog.records if "removed" in r.getMessage()]) == 1


def test_a_good_file_is_checked_by_its_stat_and_hashed_again_only_once_it_changed(tmp_path, monkeypatch):
    cache, model, weights_hash, original = _stored(tmp_path)
    hashed = []
    real = cache_digest.file_sha256
    monkeypatch.setattr(cache_digest, "file_sha256", lambda path: hashed.append(path) or real(path))
    assert cache.holds(weights_hash) and cache.holds(weights_hash) and hashed == []  # as written: a stat each
    path = cache.files_of(weights_hash)[0]
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(path, copy)
    os.replace(copy, path)  # the same bytes in a new file (a restore, a copy): hashed once, then trusted again
    assert cache.holds(weights_hash) and len(hashed) == 1
    assert cache.holds(weights_hash) and len(hashed) == 1
    loaded = cache.load(weights_hash)  # the tensors file by its stat; the skeleton (small) hashed as it is read
    x = torch.randn(4, 64)
    assert path.read_bytes() == original and torch.equal(loaded(x), model(x)) and len(hashed) == 1


def test_a_skeleton_changed_behind_an_unchanged_stat_is_never_unpickled(tmp_path, caplog, monkeypatch):
    """A check goes by the files' stat; a load hashes the skeleton's bytes as it reads them, so bytes that differ
    from the record are not unpickled even when size, modification time and inode are as recorded."""
    cache, model, weights_hash, _ = _stored(tmp_path)
    skeleton = cache.files_of(weights_hash)[1]
    stat = skeleton.stat()
    _flip(skeleton, stat.st_size // 2)
    os.utime(skeleton, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as recorded: the check cannot tell
    assert cache.holds(weights_hash)
    unpickled = []
    monkeypatch.setattr(cache_format, "join", lambda *args: unpickled.append(args))  # the one place it unpickles
    caplog.set_level(logging.WARNING, logger="tandem")
    with pytest.raises(RuntimeError, match="failed its check and was removed .*bytes changed.*run the job again"):
        cache.load(weights_hash)
    assert unpickled == [] and _files(cache.folder) == []
    assert any(f"removed {skeleton}:" in r.getMessage() for r in caplog.records)


def test_a_truncated_cached_file_is_refused_at_load_in_a_sentence_not_a_zip_error(tmp_path):
    cache, model, weights_hash, _ = _stored(tmp_path)
    _corrupt(cache.files_of(weights_hash)[0], "truncated", model)
    state = WorkerState(0, 1, "cpu")
    state.weights_cache = cache
    with pytest.raises(RuntimeError) as failed:
        state.load(Load("f" * 64, FAMILY, cached=weights_hash))
    message = str(failed.value)
    assert "failed its check" in message and "truncated" in message and "\n" not in message, message
    assert "safetensor" not in message.lower() and state.models == {} and _files(cache.folder) == []


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_serving_worker_refuses_a_load_that_names_a_path(tmp_path, where):
    cache, _, weights_hash, _ = _stored(tmp_path)
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save(_model(9), elsewhere)
    path = elsewhere if where == "outside" else cache.files_of(weights_hash)[0]
    state = WorkerState(0, 1, "cpu")
    state.weights_cache = cache
    with pytest.raises(RuntimeError) as refused:
        state.load(Load("f" * 64, FAMILY, path=str(path)))
    message = str(refused.value)
    assert "only from its machine's weights cache" in message and str(path) in message, message
    assert message.count(". ") == 0 and "\n" not in message and state.models == {}
    state.load(Load("f" * 64, FAMILY, cached=weights_hash))  # by hash it loads
    assert list(state.models) == ["f" * 64]


def test_the_daemon_relays_a_workers_cache_lines_from_its_log(tmp_path):
    worker_log = tmp_path / "worker-1.log"
    worker_log.write_text("Traceback: nothing to do with it\nTandem: weights cache: removed /c/A.skeleton: why\n"
                          "Tandem: weights cache /c: removed B (1.0 MiB")  # the last line is not whole yet
    lines, offset = cache_lines(worker_log, 0)
    assert lines == ["Tandem: weights cache: removed /c/A.skeleton: why"]
    with open(worker_log, "a") as out:
        out.write(", the least recently used)\nother\n")
    lines, end = cache_lines(worker_log, offset)
    assert lines == ["Tandem: weights cache /c: removed B (1.0 MiB, the least recently used)"]
    assert end == worker_log.stat().st_size and cache_lines(worker_log, end) == ([], end)
    assert cache_lines(tmp_path / "gone.log", 7) == ([], 7)


def test_the_host_sends_again_a_model_whose_cached_file_was_removed(caplog):
    from types import SimpleNamespace

    from parallel_backend.runtime.messages import HoldsWeights, Reply, StoreWeights
    from parallel_backend.runtime.remote_weights import send_to_machines

    model, asked = _model(11), []

    def request(requests, what, deadline=None):
        asked.append(requests)
        if isinstance(next(iter(requests.values())), HoldsWeights):
            return {1: Reply(value={"held": False, "limit": 2**30, "removed": "it is 10 bytes, not the 20"}),
                    2: Reply(value={"held": True, "limit": 2**30, "removed": None})}
        return {rank: Reply(value={"path": "x"}) for rank in requests}

    workers = [SimpleNamespace(rank=1, device="10.0.0.2:7000/cpu"), SimpleNamespace(rank=2, device="10.0.0.3:7000/cpu")]
    caplog.set_level(logging.WARNING, logger="tandem")
    entries, sent = send_to_machines(request, workers, model, FAMILY, "fp-11")
    assert entries == dict.fromkeys((1, 2), shipping.weights_hash(model, FAMILY))
    assert list(asked[1]) == [1] and isinstance(asked[1][1], StoreWeights)  # only the machine that lacks it
    assert sent["10.0.0.2:7000"] > 0 and sent["10.0.0.3:7000"] == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("10.0.0.2:7000" in m and "it is 10 bytes, not the 20" in m and "sending it again" in m for m in said)


def test_a_model_that_does_not_pickle_is_refused_before_anything_is_sent():
    import threading
    from types import SimpleNamespace

    from parallel_backend.runtime.carry import CannotCarry
    from parallel_backend.runtime.messages import HoldsWeights, Reply
    from parallel_backend.runtime.remote_weights import send_to_machines

    model, asked = _model(15), []
    model.guard = threading.Lock()  # kept on the model by some host: no pickler takes it

    def request(requests, what, deadline=None):
        asked.append(requests)
        assert all(isinstance(r, HoldsWeights) for r in requests.values())
        return {rank: Reply(value={"held": False, "limit": 2**30, "removed": None}) for rank in requests}

    workers = [SimpleNamespace(rank=1, device="10.0.0.2:7000/cpu")]
    with pytest.raises(CannotCarry, match="cannot be written for the workers of other machines .*lock"):
        send_to_machines(request, workers, model, FAMILY, "fp-15")
    assert len(asked) == 1  # the question only: no StoreWeights


def _tiny_flux():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sequence_dit_cases", Path(__file__).with_name("test_sequence_dit.py"))
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    return cases.tiny_flux(), cases.flux_call(2, 7, 3, 5)


def test_a_machine_is_sent_only_the_shards_its_workers_keep_and_they_equal_the_whole_model(tmp_path, no_torch_load):
    """Two workers of one machine, each with its shard cut: the machine is sent two cut entries (each the
    skeleton, the weights outside the units and that rank's Span of each unit), keyed by the weights hash and
    the cut; stored, checked, loaded with their parts and bound, the group equals the whole model. Asked
    again, the machine holds both: nothing is sent."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    from parallel_backend.engine.weights import reads
    from parallel_backend.models import forward_for_family
    from parallel_backend.models.weight_shards import shard_in_place
    from parallel_backend.runtime.messages import HoldsWeights, Reply
    from parallel_backend.runtime.remote_weights import send_to_machines
    from parallel_backend.runtime.tensor_parts import check_bound

    spec = importlib.util.spec_from_file_location("tensor_threads", Path(__file__).with_name("tensor_threads.py"))
    threads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(threads)
    family = "diffusers_dit:flux"
    model, call = _tiny_flux()
    reference = forward_for_family(family)(model, call)
    cache = WeightsCache(tmp_path, 2**30)
    workers = [SimpleNamespace(rank=r, device=f"10.0.0.2:7000/cpu:{r}") for r in (1, 2)]
    parts = {r: reads(model, family, ("shard", (1, 2), r - 1, None)) for r in (1, 2)}
    stored = []

    def request(requests, what, deadline=None):
        out = {}
        for rank, message in requests.items():
            if isinstance(message, HoldsWeights):
                out[rank] = Reply(value={"held": cache.holds(message.weights_hash), "limit": cache.limit})
            else:
                stored.append(message)
                cache.store(message.weights_hash, message.family, message.skeleton, message.blob, message.parts,
                            message.whole_hash)
                out[rank] = Reply(value={})
        return out

    entries, sent = send_to_machines(request, workers, model, family, "fp-cut", parts=parts)
    whole_hash = shipping.weights_hash(model, family)
    assert len(set(entries.values())) == 2 and whole_hash not in entries.values()
    assert [m.whole_hash for m in stored] == [whole_hash] * 2
    whole_size = _size(_image(model))
    sizes = [len(m.skeleton) + m.blob.numel() for m in stored]
    assert all(size < 0.7 * whole_size for size in sizes), (sizes, whole_size)
    assert sent == {"10.0.0.2:7000": sum(sizes)}
    modules = [cache.load(entries[r], parts[r]) for r in (1, 2)]

    def cut(module, degree, index, group):
        shard_in_place(module, degree, index, group)
        check_bound(module)

    outs, _ = threads.run_cut(modules, family, lambda m: forward_for_family(family)(m, call), cut=cut)
    assert all(torch.equal(out, reference) for out in outs)
    stored.clear()
    assert send_to_machines(request, workers, model, family, "fp-cut", parts=parts) == (entries, {"10.0.0.2:7000": 0})
    assert not stored


def test_a_cut_upload_that_does_not_hash_to_its_name_is_not_kept(tmp_path):
    """A cut entry is checked as a whole one is: its tensors, with their parts, must hash to its name."""
    from parallel_backend.engine.weights import reads
    from parallel_backend.runtime.remote_weights import cut_image

    family = "diffusers_dit:flux"
    model, _ = _tiny_flux()
    whole_hash = shipping.weights_hash(model, family)
    parts = reads(model, family, ("shard", (0, 1), 0, None))
    name, skeleton, blob = cut_image(model, parts, whole_hash, family)
    other = reads(model, family, ("shard", (0, 1), 1, None))
    cache = WeightsCache(tmp_path, 2**30)
    with pytest.raises(ValueError):  # another rank's parts: the file's tensors are not what they say
        cache.store(name, family, skeleton, blob, other, whole_hash)
    with pytest.raises(ValueError, match="hash to"):  # another model's hash
        cache.store(name, family, skeleton, blob, parts, "0" * 64)
    flipped = blob.clone()
    flipped[-3] ^= 1
    with pytest.raises(ValueError, match="hash to"):
        cache.store(name, family, skeleton, flipped, parts, whole_hash)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    cache.store(name, family, skeleton, blob, parts, whole_hash)
    assert cache.holds(name)
