"""A serving machine's weights cache (weights_cache.py) and the content hash naming its files
(shipping.weights_hash), without processes or namespaces: what is kept, what is refused, what is evicted."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from parallel_backend.runtime import shipping
from parallel_backend.runtime.serve import ServeDaemon
from parallel_backend.runtime.weights_cache import WeightsCache, cache_size_bytes

pytestmark = pytest.mark.pool

FAMILY = "test_mlp"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))


def _image(module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


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


def test_an_upload_is_kept_under_its_hash_and_loads_back(tmp_path):
    cache, model = WeightsCache(tmp_path / "cache", 2**30), _model(3)
    weights_hash = shipping.weights_hash(model, FAMILY)
    assert not cache.holds(weights_hash)
    path = cache.store(weights_hash, FAMILY, torch.frombuffer(bytearray(_image(model)), dtype=torch.uint8))
    assert _files(cache.folder) == [f"{weights_hash}.pt"] and path == cache.path_of(weights_hash)
    assert cache.holds(weights_hash)
    loaded = torch.load(path, mmap=True, weights_only=False)
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("corruption", ["other_model", "flipped_byte", "truncated", "garbage"])
def test_a_corrupt_upload_is_never_kept(tmp_path, corruption):
    cache, model = WeightsCache(tmp_path, 2**30), _model(4)
    weights_hash = shipping.weights_hash(model, FAMILY)
    image = bytearray(_image(model))
    if corruption == "other_model":
        image = bytearray(_image(_model(5)))
    elif corruption == "flipped_byte":
        data = _image(model)
        weights_at = data.index(model[0].weight.detach().numpy().tobytes()[:64])  # inside the weights' bytes
        image[weights_at + 7] ^= 0xFF
    elif corruption == "truncated":
        image = image[: len(image) // 2]
    else:
        image = bytearray(os.urandom(4096))
    with pytest.raises(ValueError, match="not kept"):
        cache.store(weights_hash, FAMILY, bytes(image))
    assert _files(tmp_path) == [] and not cache.holds(weights_hash)


def test_the_least_recently_used_model_is_evicted_to_stay_within_the_bound(tmp_path):
    models = [_model(10 + i) for i in range(3)]
    images = [_image(m) for m in models]
    hashes = [shipping.weights_hash(m, FAMILY) for m in models]
    cache = WeightsCache(tmp_path, int(2.5 * max(map(len, images))))  # two fit, not three
    cache.store(hashes[0], FAMILY, images[0])
    cache.store(hashes[1], FAMILY, images[1])
    os.utime(cache.path_of(hashes[0]), (1, 1))  # stored first, then used: the second is now the oldest
    os.utime(cache.path_of(hashes[1]), (0, 0))
    assert cache.holds(hashes[0])  # a use renews it
    cache.store(hashes[2], FAMILY, images[2])
    assert _files(tmp_path) == sorted(f"{h}.pt" for h in (hashes[0], hashes[2]))
    assert sum(size for _, size, _ in cache.entries()) <= cache.limit


def test_a_model_larger_than_the_bound_is_refused_before_writing(tmp_path):
    model = _model(6)
    image = _image(model)
    cache = WeightsCache(tmp_path, len(image) - 1)
    with pytest.raises(ValueError, match="larger than this machine's weights cache.*--cache-size"):
        cache.store(shipping.weights_hash(model, FAMILY), FAMILY, image)
    assert _files(tmp_path) == []


def test_a_write_cut_short_leaves_no_file_under_the_hash(tmp_path, monkeypatch):
    cache, model = WeightsCache(tmp_path, 2**30), _model(7)
    weights_hash = shipping.weights_hash(model, FAMILY)

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)  # the rename that publishes it fails
    with pytest.raises(OSError):
        cache.store(weights_hash, FAMILY, _image(model))
    assert _files(tmp_path) == [] and not cache.holds(weights_hash)


def test_partial_uploads_of_dead_processes_are_removed(tmp_path):
    cache = WeightsCache(tmp_path, 2**30)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".partial-{int(gone.stdout)}-{'a' * 64}.pt"
    alive = tmp_path / f".partial-{os.getpid()}-{'b' * 64}.pt"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert cache.remove_partial() == 1
    assert _files(tmp_path) == [alive.name]


def test_only_hex_hashes_name_files(tmp_path):
    cache = WeightsCache(tmp_path, 2**30)
    with pytest.raises(ValueError, match="not a weights hash"):
        cache.path_of("../../etc/passwd")


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
