"""The content digest of a weights cache's file (weights_cache.py): the sha256 of the file's own bytes, recorded
beside it (`HASH.safetensors.sha256`, `HASH.skeleton.sha256`) once the file is whole, and the check of the file
against that record.

The name HASH is shipping.weights_hash: a hash of what the model is (its family, class and weights), computed
from the loaded model, not of the files' bytes; so each file's bytes get a digest of their own.

When a file is checked: hashing a file costs time in proportion to its size, and a stat nothing. Measured on
this project's development machine (2 shared Xeon cores with SHA-NI, loaded), a 500 MiB file in the page
cache: sha256 1.0 GiB/s (1 MiB reads into one buffer, as here, and hashlib.file_digest alike), blake2b
0.6 GiB/s, a stat some microseconds. Hashing on every load would add ~20 s to each pool's first load of a 20 GB
model, so a file is hashed as it is written, and again only when its size, modification time or inode differ
from those recorded then (a write, a truncation, a copy or a restore from elsewhere). The record is made with
the file's modification time set SEALED_AGO_NS in the past: any later write sets it to the present, so it
differs from the record even within the file system's timestamp tick. A change that leaves all three as they
were (a disk that silently returns other bytes) is not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

READ_BYTES = 2**20  # one read's size when hashing a file (1 MiB: as fast as larger reads, measured above)
SEALED_AGO_NS = 10 * 10**9


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in READ_BYTES pieces into one buffer (hashlib.file_digest is 3.11+)."""
    digest, buffer = hashlib.sha256(), bytearray(READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as source:
        while count := source.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def record_path(path: Path) -> Path:
    """Where the digest of cached file `path` is recorded: HASH.skeleton -> HASH.skeleton.sha256."""
    return path.with_name(path.name + ".sha256")


def seal(path: Path, digest: str, record: Path, partial: Path) -> None:
    """Records `digest` (the sha256 of `path`'s bytes, which must be whole and synced) at `record`, written to
    `partial` first and renamed, with `path`'s size, inode and modification time (set in the past first)."""
    past = time.time_ns() - SEALED_AGO_NS
    os.utime(path, ns=(past, past))
    stat = os.stat(path)
    try:
        partial.write_text(json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                       "inode": stat.st_ino}))
        os.replace(partial, record)
    finally:
        partial.unlink(missing_ok=True)


def _record(path: Path) -> tuple | None:
    """(sha256, size, mtime_ns, inode) recorded for cached file `path`; None when there is no readable record."""
    try:
        recorded = json.loads(record_path(path).read_text())
        return tuple(recorded[k] for k in ("sha256", "size", "mtime_ns", "inode"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded for cached file `path` when it was written (None: no readable record)."""
    record = _record(path)
    return record[0] if record is not None else None


def problem(path: Path, partial: Path) -> str | None:
    """Why cached file `path` is not whole, in words (a truncated file is told by its size, unread); "" when
    there is no such file; None when it is whole (re-recorded if only its stat changed: a copy or a restore
    with the same bytes). `partial`: where a new record is written first."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ""
    record = _record(path)
    if record is None:
        return "no content digest beside it (written by an older Tandem, or its write was cut short)"
    digest, size, mtime_ns, inode = record
    if stat.st_size != size:
        return f"it is {stat.st_size} bytes, not the {size} it was written with (truncated or extended)"
    if (stat.st_mtime_ns, stat.st_ino) == (mtime_ns, inode):
        return None
    found = file_sha256(path)
    if found != digest:
        return f"its bytes changed since it was written (sha256 {found[:16]}..., not {digest[:16]}...)"
    seal(path, found, record_path(path), partial)
    return None
