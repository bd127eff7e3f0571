"""A serving machine's weights cache (`tandem worker serve --cache-dir DIR --cache-size GIB`): the models its
workers were sent, named by their content hash (shipping.weights_hash), so a model crosses the network to a
machine once, is shared by that machine's workers, and is found again after the host, the daemon or the workers
restart.

An entry is two files (cache_format.py): `HASH.safetensors`, the model's tensors, mapped by safetensors' loader
when a worker loads it (no code runs, a machine's CPU workers share its pages), and `HASH.skeleton`, everything
else (the recipe without its weights, or the module with references in place of its tensors), which is
unpickled. No file is loaded with torch.load. The skeleton unpickled is the one a host that proved the secret
sent over the authenticated channel: its bytes are read once, hashed, compared with the sha256 recorded when it
was stored, and those same bytes are unpickled.

Nothing is kept that its name does not describe: an upload's two parts are written to temporary files, loaded,
and hashed again; only when the model hashes to the announced value is the sha256 of each file's bytes recorded
beside it (`HASH.safetensors.sha256`, `HASH.skeleton.sha256`, cache_digest.py) and the files renamed
(atomically), the skeleton last: an entry whose skeleton is there is whole. Each time a host asks whether the
machine holds the model, and each time a worker loads it, both files are checked against their records; an
entry that fails (a flipped byte, a truncation, no record, a part missing) is removed, logged with the failing
file's path and the reason, and answered as not held, so the host sends it again in the same job. The entries'
total size stays within the bound: the least recently used (oldest modification time of the skeleton's record,
renewed on each use) go first; a model larger than the whole bound is refused with a sentence. The workers of
every daemon using the folder share it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from .cache_digest import problem, record_path, recorded_sha256, seal
from .messages import HoldsWeights, StoreWeights

log = logging.getLogger("tandem")
DEFAULT_SIZE_GIB = 50.0
LOG_PREFIX = "Tandem: weights cache"  # how its log lines start (the daemon relays them: cache_lines)
TENSORS, SKELETON = ".safetensors", ".skeleton"  # an entry's two files: HASH.safetensors, HASH.skeleton
_CACHED = re.compile(r"^([0-9a-f]{64})\.(safetensors|skeleton)$")
# .partial-PID-HASH.safetensors (.sha256): a write under way (.pt: of an older Tandem)
_PARTIAL = re.compile(r"^\.partial-(\d+)-[0-9a-f]{64}\.(safetensors|skeleton|pt)(\.sha256)?$")
_OLD_FORMAT = re.compile(r"^[0-9a-f]{64}\.pt(\.sha256)?$")  # an older Tandem's entry: a torch.save image
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
            probe = self.folder / f".partial-{os.getpid()}-{'0' * 64}{SKELETON}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"--cache-dir {str(folder)!r}: cannot write there ({exc.strerror or exc}); give a "
                             "folder this user can create and write") from None

    def files_of(self, weights_hash: str) -> tuple[Path, Path]:
        """The model's two files: (HASH.safetensors, HASH.skeleton)."""
        if not re.fullmatch(r"[0-9a-f]{64}", weights_hash):
            raise ValueError(f"{weights_hash!r} is not a weights hash (64 lowercase hex digits)")
        return self.folder / f"{weights_hash}{TENSORS}", self.folder / f"{weights_hash}{SKELETON}"

    def holds(self, weights_hash: str) -> bool:
        """Whether the model is cached, whole (check)."""
        return self.check(weights_hash)[0]

    def check(self, weights_hash: str) -> tuple[bool, str]:
        """(held, why not): whether the model's files are here and whole (cache_digest.problem). A hit counts as a
        use (the model moves to the back of the eviction line); an entry that fails is removed, and logged with the
        failing file's path and the reason, which `why` says ("" when there was no entry)."""
        tensors, skeleton = self.files_of(weights_hash)
        for path in (skeleton, tensors):  # the skeleton first: it is published last, so without it there is no entry
            why = problem(path, self._partial(weights_hash, path.suffix + ".sha256"))
            if why is None:
                continue
            if why == "" and path == skeleton:
                return False, ""
            return False, self._discard(weights_hash, path, why or "it is missing (the rest of its entry was there)")
        try:
            os.utime(record_path(skeleton))
            return True, ""
        except FileNotFoundError:  # evicted meanwhile by another worker
            return False, ""

    def _discard(self, weights_hash: str, path: Path, why: str) -> str:
        """Removes the model's entry because its file `path` failed its check (`why`); logs it; returns `why`."""
        _remove(self.files_of(weights_hash))
        log.warning("Tandem: weights cache: removed %s: %s; a host that asks for the model is sent it again",
                    path, why)
        return why

    def _partial(self, weights_hash: str, suffix: str) -> Path:
        return self.folder / f".partial-{os.getpid()}-{weights_hash}{suffix}"

    def store(self, weights_hash: str, family: str, skeleton: bytes, tensors, parts: dict | None = None,
              whole_hash: str | None = None) -> tuple[Path, Path]:
        """Keeps the model `weights_hash` of `family`, sent as its `skeleton` (bytes) and its `tensors` (the
        safetensors file's bytes, or a uint8 tensor of them; cache_format.py), once it hashes to that value;
        evicts the least recently used models to stay within the bound. Returns the cached files. A cut of a
        model (`parts`: {name: tensor_parts part}, each part a tensor of the file; `whole_hash`: the whole
        model's weights_hash) is named by tensor_parts.cut_hash instead. Raises ValueError (nothing kept) for an
        upload that does not hash to it or is larger than the bound."""
        from .cache_format import join_tensors
        from .shipping import weights_hash as hash_of
        from .tensor_parts import cut_hash, mark, read

        cut = parts
        if cut is not None and whole_hash is None:
            raise ValueError("a cut of a model is stored with the whole model's weights hash")
        targets = self.files_of(weights_hash)
        parts = (memoryview(tensors.numpy() if hasattr(tensors, "numpy") else tensors).cast("B"),
                 memoryview(skeleton).cast("B"))
        nbytes = sum(part.nbytes for part in parts)
        if nbytes > self.limit:
            raise ValueError(f"the model ({nbytes / 2**30:.2f} GiB) is larger than this machine's weights cache "
                             f"({self.limit / 2**30:.2f} GiB, --cache-size): not cached; restart its "
                             "`tandem worker serve` with a larger --cache-size")
        partials = [self._partial(weights_hash, target.suffix) for target in targets]
        try:
            digests = [_write(partial, part) for partial, part in zip(partials, parts)]
            try:  # the bytes just written and hashed are the bytes unpickled
                loaded, _ = read(partials[0], {})
                payload = join_tensors(bytes(parts[1]), loaded if cut is None else mark(dict(loaded), cut))
                found = hash_of(payload, family) if cut is None else cut_hash(whole_hash, family, loaded, cut)
            except Exception as exc:  # garbage or a truncated upload: whatever loading it raises
                raise ValueError(f"the upload is not a readable model ({type(exc).__name__}: {exc}): "
                                 "not kept") from None
            if found != weights_hash:
                raise ValueError(f"the weights received hash to {found[:16]}..., not the announced "
                                 f"{weights_hash[:16]}...: a corrupt upload, not kept")
            self._make_room(nbytes, keep=weights_hash)
            for partial, digest, target in zip(partials, digests, targets):
                seal(partial, digest, record_path(target), self._partial(weights_hash, target.suffix + ".sha256"))
            try:  # the records first: a file others see has one; the skeleton last: an entry with one is whole
                for partial, target in zip(partials, targets):
                    os.replace(partial, target)
            except BaseException:
                _remove(targets)
                raise
        finally:
            for partial in partials:
                partial.unlink(missing_ok=True)
        return targets

    def load(self, weights_hash: str, parts: dict | None = None):
        """The cached model (a module or a recipe.Recipe, its tensors mapped from HASH.safetensors), checked first
        (check); the skeleton's bytes are hashed as read and unpickled only if they match its record. parts: a cut's
        entry, {name: tensor_parts part} its tensors hold, which they then carry for the cut to take. Raises
        RuntimeError in one sentence when the model is not held or fails its check (its entry is then removed)."""
        from .cache_format import join

        held, why = self.check(weights_hash)
        tensors, skeleton = self.files_of(weights_hash)
        if held:
            try:
                data = skeleton.read_bytes()
            except FileNotFoundError:  # evicted meanwhile by another worker
                held, data = False, b""
            found = hashlib.sha256(data).hexdigest()
            if held and found != recorded_sha256(skeleton):
                why = self._discard(weights_hash, skeleton, f"its bytes changed since it was written (sha256 "
                                                            f"{found[:16]}..., not as recorded)")
                held = False
        if not held:
            why = (f"its file failed its check and was removed ({why})" if why
                   else "it was evicted meanwhile (another pool using the same --cache-dir?)")
            raise RuntimeError(f"model {weights_hash[:16]}... is not in this machine's weights cache "
                               f"({self.folder}): {why}; run the job again")
        try:
            return join(data, tensors, parts)
        except ValueError as exc:
            why = self._discard(weights_hash, tensors, str(exc))
            raise RuntimeError(f"model {weights_hash[:16]}... could not be read from this machine's weights cache "
                               f"({self.folder}): {why}; it was removed, run the job again") from None

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, weights hash) of every cached model, the least recently used first. The last use is
        the modification time of its skeleton's record (renewed on each use), else of its newest file."""
        found: dict[str, list] = {}  # weights hash -> [last use, bytes, whether its skeleton was seen]
        for path in self.folder.iterdir():
            match = _CACHED.match(path.name)
            if not match:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted meanwhile by another worker
                continue
            entry = found.setdefault(match.group(1), [stat.st_mtime, 0, False])
            entry[1] += stat.st_size
            if path.suffix == SKELETON:
                used = _mtime(record_path(path))
                entry[0], entry[2] = (stat.st_mtime if used is None else used), True
            elif not entry[2]:  # a tensors file without its skeleton (yet): its own time
                entry[0] = stat.st_mtime
        return sorted((used, size, weights_hash) for weights_hash, (used, size, _) in found.items())

    def _make_room(self, nbytes: int, keep: str) -> None:
        entries = [e for e in self.entries() if e[2] != keep]
        total = sum(size for _, size, _ in entries)
        for _, size, weights_hash in entries:
            if total + nbytes <= self.limit:
                break
            _remove(self.files_of(weights_hash))
            total -= size
            log.warning("Tandem: weights cache %s: removed %s (%.1f MiB, the least recently used) to stay within "
                        "%.2f GiB", self.folder, weights_hash[:16], size / 2**20, self.limit / 2**30)

    def remove_stale(self) -> int:
        """Removes the temporary files of writes whose process is gone (killed mid-upload) and the entries of an
        older Tandem (`HASH.pt`, a torch.save image: never loaded now); returns how many files."""
        import psutil

        removed = 0
        for path in self.folder.iterdir():
            match = _PARTIAL.match(path.name)
            if (match and not psutil.pid_exists(int(match.group(1)))) or _OLD_FORMAT.match(path.name):
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


def _write(path: Path, data: memoryview) -> str:
    """Writes `data` to `path` in WRITE_BYTES pieces, hashed as they are written (no second read), synced; returns
    the sha256 of the bytes."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for start in range(0, data.nbytes, WRITE_BYTES):
            piece = data[start:start + WRITE_BYTES]
            out.write(piece)
            digest.update(piece)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _remove(files) -> None:
    """Removes an entry's files, the skeleton first (then the entry is no longer held), each before its record (a
    file others see has a record)."""
    for path in sorted(files, key=lambda p: p.suffix != SKELETON):
        path.unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def holds_weights(state, message: HoldsWeights) -> dict:
    """Worker handler: whether this machine's cache holds the model, whole, and the cache's bound; "removed": why
    its file was removed just now (it failed its check), or None."""
    cache = _cache_of(state)
    held, why = cache.check(message.weights_hash)
    return {"held": held, "limit": cache.limit, "removed": why or None}


def store_weights(state, message: StoreWeights) -> dict:
    """Worker handler: keeps the model's skeleton and tensors in this machine's cache (checked against its hash)."""
    from .host_modules import register

    register(message.modules)
    files = _cache_of(state).store(message.weights_hash, message.family, message.skeleton, message.blob,
                                   message.parts, message.whole_hash)
    return {"files": [str(path) for path in files]}


def cached_payload(state, weights_hash: str, parts: dict | None = None):
    """The payload of a model this worker is told to load, from its machine's cache (WeightsCache.load; parts:
    a cut's entry)."""
    return _cache_of(state).load(weights_hash, parts)


def _cache_of(state) -> WeightsCache:
    cache = getattr(state, "weights_cache", None)
    if cache is None:
        raise RuntimeError("this worker has no weights cache: workers of other machines are started by "
                           "`tandem worker serve`, which gives them one")
    return cache
