"""Host objects inside a model call's inputs (a host's patches: functions, closures, small objects), carried to
the workers by value or by reference.

A call's inputs travel as plain data (tensors, numbers, strings, containers: the channel pickles those and
nothing it does not know). Anything else in them (a model patch's function, a closure, an object holding its
settings) is pickled with cloudpickle: by reference where the worker can import it under the same name
(host_modules.py makes a host's custom-node packages importable), by value otherwise (closures, lambdas,
functions of `__main__`), and goes to the workers once: a call carries only its digest (`CarriedRef`).

New objects reach the workers in a request of their own (`Carry`) before the call that needs them, so an
object a worker cannot load (a module it lacks) is refused there, with a sentence, while the pool stays
usable: the host then takes its stock path for that call (`CannotCarry`).
"""

from __future__ import annotations

import enum
import hashlib
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch

KEPT = 512  # objects a worker keeps (and the host remembers it keeps), the least recently sent dropped first
MAX_BYTES = 256 * 2**20  # an object this large is not a patch: refused rather than sent with calls
_SCALARS = (type(None), bool, int, float, complex, str, bytes, uuid.UUID, torch.Tensor, torch.dtype, torch.device,
            slice, range)


class CannotCarry(ValueError):
    """A call input the workers cannot be given (it does not pickle, or a worker cannot load it). The message is
    one sentence naming the input; the caller takes its stock path."""


@dataclass(frozen=True)
class CarriedRef:
    """A host object the workers hold under this digest (sent earlier in a `Carry` request)."""

    digest: str


def is_plain(value) -> bool:
    """Whether `value` is data the channel carries as it is (an enum of a module any process can import counts)."""
    if isinstance(value, enum.Enum):
        return os.sep not in type(value).__module__
    return isinstance(value, _SCALARS)


def map_leaves(value, fn, path: tuple = ()):
    """`value` with every leaf that is not a dict, list or tuple replaced by fn(leaf, path); path: the keys and
    indices that lead to it. Containers keep their types (named tuples too)."""
    if isinstance(value, dict):
        return {k: map_leaves(v, fn, (*path, k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [map_leaves(v, fn, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return fn(value, path)


def describe(path: tuple) -> str:
    """A leaf's path for people: `transformer_options['patches']['output_block_patch'][0]`."""
    return path[0] + "".join(f"[{key!r}]" for key in path[1:]) if path else "the input"


class Carrier:
    """The host's side: what each leaf pickles to, and which digests the workers hold."""

    def __init__(self):
        self.held: OrderedDict[str, None] = OrderedDict()  # digests the workers hold, oldest first
        self.refused: dict[str, str] = {}  # digest -> why the workers could not load it (not sent again)

    def reset(self) -> None:
        """The workers were (re)started: they hold nothing."""
        self.held.clear()

    def prepare(self, inputs: dict) -> tuple[dict, dict[str, bytes]]:
        """(`inputs` with every leaf that is not plain data replaced by its CarriedRef, the blobs the workers do
        not hold yet by digest). Raises CannotCarry naming a leaf that does not pickle."""
        new: dict[str, bytes] = {}

        def carry(leaf, path):
            if is_plain(leaf):
                return leaf
            digest, blob = self._pickled(leaf, path)
            if digest in self.refused:
                raise CannotCarry(self.refused[digest])
            if digest not in self.held:
                new[digest] = blob
            return CarriedRef(digest)

        return map_leaves(inputs, carry), new

    def refuse(self, digests, reason: str) -> None:
        """The workers could not load `digests`: later calls that carry them take the stock path at once."""
        self.refused.update(dict.fromkeys(digests, reason))

    def sent(self, digests) -> None:
        """The workers now hold `digests` (they keep the KEPT most recent, as this record does)."""
        for digest in digests:
            self.held[digest] = None
            self.held.move_to_end(digest)
        while len(self.held) > KEPT:
            self.held.popitem(last=False)

    @staticmethod
    def _pickled(leaf, path) -> tuple[str, bytes]:
        # Pickled on every call, not cached by identity: a closure's cells or an object's fields may change
        # between calls, and the digest then says so (a small patch pickles in well under a millisecond).
        from .host_modules import dumps

        if isinstance(leaf, torch.nn.Module):
            raise CannotCarry(f"{describe(path)} holds a model ({type(leaf).__name__}): its weights would travel "
                              "with every call")
        try:
            blob = dumps(leaf)
        except Exception as exc:  # whatever the object's own reduction raises
            raise CannotCarry(f"{describe(path)} holds a {type(leaf).__name__} that cannot be sent to a worker "
                              f"({type(exc).__name__}: {exc})") from None
        if len(blob) > MAX_BYTES:
            raise CannotCarry(f"{describe(path)} holds a {type(leaf).__name__} of {len(blob) / 2**20:.0f} MiB, too "
                              "large to send with every call")
        return hashlib.sha256(blob).hexdigest(), blob


class CarriedStore:
    """A worker's side: the objects the host sent, by digest."""

    def __init__(self):
        self.objects: OrderedDict[str, object] = OrderedDict()

    def load(self, blobs: dict[str, bytes]) -> None:
        """Unpickles `blobs` (digest -> cloudpickle bytes); raises on the first that does not load, keeping none
        of them (the host then takes its stock path for the call that needed them)."""
        import cloudpickle

        loaded = {}
        for digest, blob in blobs.items():
            loaded[digest] = cloudpickle.loads(blob)
        for digest, obj in loaded.items():
            self.objects[digest] = obj
            self.objects.move_to_end(digest)
        while len(self.objects) > KEPT:
            self.objects.popitem(last=False)

    def resolve(self, value):
        """`value` with every CarriedRef replaced by the object it names."""
        def live(leaf, path):
            if not isinstance(leaf, CarriedRef):
                return leaf
            if leaf.digest not in self.objects:
                raise RuntimeError(f"{describe(path)}: object {leaf.digest[:12]} was never sent to this worker")
            return self.objects[leaf.digest]

        return map_leaves(value, live)
