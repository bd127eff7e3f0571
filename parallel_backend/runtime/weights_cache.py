"""A serving machine's weights cache (`tandem worker serve --cache-dir DIR --cache-size GIB`): the models its
workers were sent, as torch.save images named by their content hash (shipping.weights_hash), so a model
crosses the network to a machine once, is shared by that machine's workers, and is found again after the
host, the daemon or the workers restart.

Nothing is kept that its name does not describe: an upload is written to a temporary file, loaded, and hashed
again; only when it hashes to the announced value is it renamed (atomically) to `HASH.pt`, after the sha256 of
its bytes is recorded beside it (`HASH.pt.sha256`, cache_digest.py). Each time a host asks whether the machine
holds the model, and each time a worker loads it, the file is checked against that record; a file that fails
(a flipped byte, a truncation, no record) is removed, logged with its path and the reason, and answered as not
held, so the host sends it again in the same job. The files' total size stays within the bound: the least
recently used (oldest modification time of the record, renewed on each use) go first; a model larger than the
whole bound is refused with a sentence. The workers of every daemon using the folder share it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from .cache_digest import problem, record_path, seal
from .messages import HoldsWeights, StoreWeights

log = logging.getLogger("tandem")
DEFAULT_SIZE_GIB = 50.0
LOG_PREFIX = "Tandem: weights cache"  # how its log lines start (the daemon relays them: cache_lines)
_CACHED = re.compile(r"^[0-9a-f]{64}\.pt$")
# .partial-PID-HASH.pt (.sha256): a write under way
_PARTIAL = re.compile(r"^\.partial-(\d+)-[0-9a-f]{64}\.pt(\.sha256)?$")
WRITE_BYTES = 8 * 2**20  # an upload is written and hashed in pieces of this size


def default_cache_dir() -> Path:
    """~/.cache/tandem/weights, or $XDG_CACHE_HOME/tandem/weights."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tandem" / "weights"


def cache_size_bytes(size_gib) -> int:
    """--cache-size in GiB (a positive number, fractions allowed) as bytes; a ValueError in one sentence."""
    try:
        gib = float(size_gib)
    except (TypeError, ValueError):
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise ValueError(f"--cache-size {size_gib!r}: give the weights cache's bound in GiB, a positive number "
                         f"(e.g. {DEFAULT_SIZE_GIB:g}); it must hold the largest model a host sends")
    return int(gib * 2**30)


class WeightsCache:
    """The folder `folder` (made if missing), holding at most `limit` bytes of cached models."""

    def __init__(self, folder, limit: int):
        self.folder, self.limit = Path(folder).expanduser(), int(limit)
        if self.limit <= 0:
            raise ValueError(f"a weights cache needs a positive bound, not {limit} bytes")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".partial-{os.getpid()}-{'0' * 64}.pt"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"--cache-dir {str(folder)!r}: cannot write there ({exc.strerror or exc}); give a "
                             "folder this user can create and write") from None

    def path_of(self, weights_hash: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", weights_hash):
            raise ValueError(f"{weights_hash!r} is not a weights hash (64 lowercase hex digits)")
        return self.folder / f"{weights_hash}.pt"

    def holds(self, weights_hash: str) -> bool:
        """Whether the model is cached, whole (check)."""
        return self.check(weights_hash)[0]

    def check(self, weights_hash: str) -> tuple[bool, str]:
        """(held, why not): whether the model's file is here and whole (cache_digest.problem). A hit counts as a
        use (the model moves to the back of the eviction line); a file that fails is removed, and logged with its
        path and the reason, which `why` says ("" when there was no file)."""
        path = self.path_of(weights_hash)
        why = problem(path, self._partial(weights_hash, ".sha256"))
        if why is None:
            try:
                os.utime(record_path(path))
                return True, ""
            except FileNotFoundError:  # evicted meanwhile by another worker
                return False, ""
        if why:
            _remove(path)
            log.warning("Tandem: weights cache: removed %s: %s; a host that asks for the model is sent it again",
                        path, why)
        return False, why

    def _partial(self, weights_hash: str, suffix: str = "") -> Path:
        return self.folder / f".partial-{os.getpid()}-{weights_hash}.pt{suffix}"

    def store(self, weights_hash: str, family: str, image) -> Path:
        """Keeps `image` (a torch.save image: bytes or a uint8 tensor) as the model `weights_hash` of `family`,
        once it hashes to that value; evicts the least recently used models to stay within the bound. Returns
        the cached file. Raises ValueError (nothing kept) for an image that does not hash to it or is larger than
        the bound."""
        from .shipping import weights_hash as hash_of

        target = self.path_of(weights_hash)
        data = memoryview(image.numpy() if hasattr(image, "numpy") else image).cast("B")
        if data.nbytes > self.limit:
            raise ValueError(f"the model's image ({data.nbytes / 2**30:.2f} GiB) is larger than this machine's "
                             f"weights cache ({self.limit / 2**30:.2f} GiB, --cache-size): not cached; restart its "
                             "`tandem worker serve` with a larger --cache-size")
        partial, digest = self._partial(weights_hash), hashlib.sha256()
        try:
            with open(partial, "wb") as out:
                for start in range(0, data.nbytes, WRITE_BYTES):  # hashed as it is written: no second read
                    piece = data[start:start + WRITE_BYTES]
                    out.write(piece)
                    digest.update(piece)
                out.flush()
                os.fsync(out.fileno())
            try:
                payload = _load(partial)
            except Exception as exc:  # garbage or a truncated image: whatever torch.load raises for it
                raise ValueError(f"the upload is not a readable torch.save image ({type(exc).__name__}): "
                                 "not kept") from None
            found = hash_of(payload, family)
            if found != weights_hash:
                raise ValueError(f"the weights received hash to {found[:16]}..., not the announced "
                                 f"{weights_hash[:16]}...: a corrupt upload, not kept")
            self._make_room(data.nbytes, keep=target.name)
            seal(partial, digest.hexdigest(), record_path(target), self._partial(weights_hash, ".sha256"))
            try:  # the record first: a HASH.pt that others can see always has one
                os.replace(partial, target)
            except BaseException:
                record_path(target).unlink(missing_ok=True)
                raise
        finally:
            partial.unlink(missing_ok=True)
        return target

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every cached model, the least recently used first. The last use is the
        modification time of its digest's record (the file's own is part of that record), or of a file without one."""
        found = []
        for path in self.folder.iterdir():
            if _CACHED.match(path.name):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # evicted meanwhile by another worker
                    continue
                used = _mtime(record_path(path))
                found.append((stat.st_mtime if used is None else used, stat.st_size, path))
        return sorted(found)

    def _make_room(self, nbytes: int, keep: str) -> None:
        entries = [e for e in self.entries() if e[2].name != keep]
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total + nbytes <= self.limit:
                break
            _remove(path)
            total -= size
            log.warning("Tandem: weights cache %s: removed %s (%.1f MiB, the least recently used) to stay within "
                        "%.2f GiB", self.folder, path.name[:16], size / 2**20, self.limit / 2**30)

    def remove_partial(self) -> int:
        """Removes the temporary files of writes whose process is gone (killed mid-upload); returns how many."""
        import psutil

        removed = 0
        for path in self.folder.iterdir():
            match = _PARTIAL.match(path.name)
            if match and not psutil.pid_exists(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def cache_lines(worker_log: Path, offset: int) -> tuple[list[str], int]:
    """The lines about the weights cache (removed files, evictions) that a worker wrote to its log after byte
    `offset`, and the offset after the last whole line: `tandem worker serve` puts them in its own log, since
    a worker's log goes with its session's folder."""
    try:
        with open(worker_log, "rb") as source:
            source.seek(offset)
            data = source.read()
    except OSError:
        return [], offset
    whole = data[:data.rfind(b"\n") + 1]
    lines = [line for line in whole.decode(errors="replace").splitlines() if line.startswith(LOG_PREFIX)]
    return lines, offset + len(whole)


def _remove(path: Path) -> None:
    """Removes a cached file, then its digest's record (in that order: a file others see has a record)."""
    path.unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _load(path: Path):
    """The payload in a torch.save image (a module or a recipe.Recipe), mapped rather than read (a model as
    large as memory still loads)."""
    import torch

    return torch.load(path, mmap=True, map_location="cpu", weights_only=False)


def holds_weights(state, message: HoldsWeights) -> dict:
    """Worker handler: whether this machine's cache holds the model, whole, and the cache's bound; "removed": why
    its file was removed just now (it failed its check), or None."""
    cache = _cache_of(state)
    held, why = cache.check(message.weights_hash)
    return {"held": held, "limit": cache.limit, "removed": why or None}


def store_weights(state, message: StoreWeights) -> dict:
    """Worker handler: keeps the model's image in this machine's cache (checked against its hash)."""
    from .host_modules import register

    register(message.modules)
    path = _cache_of(state).store(message.weights_hash, message.family, message.blob)
    return {"path": str(path)}


def cached_model_path(state, weights_hash: str) -> Path:
    """The cached file of a model this worker is told to load, checked (renewed as recently used)."""
    cache = _cache_of(state)
    held, why = cache.check(weights_hash)
    if not held:
        why = (f"its file failed its check and was removed ({why})" if why
               else "it was evicted meanwhile (another pool using the same --cache-dir?)")
        raise RuntimeError(f"model {weights_hash[:16]}... is not in this machine's weights cache ({cache.folder}): "
                           f"{why}; run the job again")
    return cache.path_of(weights_hash)


def _cache_of(state) -> WeightsCache:
    cache = getattr(state, "weights_cache", None)
    if cache is None:
        raise RuntimeError("this worker has no weights cache: workers of other machines are started by "
                           "`tandem worker serve`, which gives them one")
    return cache
