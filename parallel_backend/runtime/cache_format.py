"""A model as another machine's weights cache keeps it (weights_cache.py) and as it crosses to that machine: its
tensors' bytes in a safetensors file, and a small skeleton holding everything else.

The skeleton is the payload (a module, or a recipe.Recipe) pickled with host_modules' pickler, each tensor's data
replaced by a reference to an entry of the tensors file (pickle's persistent ids, the way torch.save keeps its own
storages apart):
- a plain tensor or Parameter (exactly those classes, no attributes of its own, a dtype safetensors holds, not on
  the meta device) becomes one tensor of the file, named as the module or the recipe names it, moved to the CPU
  and made contiguous; the reference says whether it was a Parameter and whether it required grad;
- every other tensor (a subclass such as ComfyUI-GGUF's, a quantized or an unusual dtype's) is pickled as usual
  (its class, shape and attributes in the skeleton) except for its storage, whose raw bytes become one uint8
  tensor of the file.
What stays in the skeleton as bytes: whatever holds data without a torch storage (a numpy array kept on a
module) and meta tensors (no data). A tensor referenced twice (tied weights) is kept once and comes back as one
object; two tensors that are views of one storage come back as separate copies (the second is cloned: a
safetensors file holds no overlapping tensors).

Loading maps the tensors file with safetensors' loader (its pages are shared, not copied; reading it runs no
code), then unpickles the skeleton, whose references take the mapped tensors. Unpickling the skeleton runs
whatever the host pickled into it (the recipe's build, the module's classes): weights_cache.py unpickles only a
skeleton the host sent over the authenticated channel, checked against the sha256 recorded when it was stored.
"""

from __future__ import annotations

import io
import pickle
import warnings

_PLAIN = "t"  # a persistent id's kind: a plain tensor (kind, name, is a Parameter, requires grad)
_STORAGE = "s"  # the storage of another tensor (kind, name, its dtype's name: TypedStorage), or "u" (UntypedStorage)
_UNTYPED = "u"


def split(payload, leave: frozenset = frozenset()) -> tuple[bytes, dict]:
    """(skeleton: bytes, tensors: {name: CPU tensor}) of a payload (see above). leave: names of plain tensors the
    skeleton refers to but `tensors` leaves out (not copied: the workers read them elsewhere, sources.py)."""
    import torch

    from .host_modules import host_pickler
    from .recipe import Recipe

    known = payload.weights.items() if isinstance(payload, Recipe) else (
        *payload.named_parameters(), *payload.named_buffers())
    names = {}
    for name, tensor in known:
        names.setdefault(id(tensor), name)
    holds = _held_dtypes()
    tensors: dict = {}
    keys: dict = {}  # id(tensor) or storage's (device, pointer, bytes) -> its name in `tensors`
    kept: list = []  # the tensors whose ids are keys: alive until pickled, so no id is reused
    storages: set = set()  # (device, pointer) of the storages already in `tensors`

    used: set = set()  # the names in `tensors`, and those left out

    def add(key, name: str, data) -> str:
        while name in used:  # a recipe's weight named like an unnamed tensor
            name = f"#{len(used)}-{name}"
        used.add(name)
        pointer = (str(data.device), data.untyped_storage().data_ptr())
        if name in leave:
            storages.add(pointer)
            keys[key] = name
            return name
        data = data.detach().to("cpu").contiguous()
        if pointer[1] and pointer in storages:  # a view of a storage already kept: safetensors holds no overlaps
            data = data.clone()
        storages.add(pointer)
        tensors[name] = data
        keys[key] = name
        return name

    class SkeletonPickler(host_pickler()):
        def persistent_id(self, obj):
            if plain(obj, holds):
                name = keys.get(id(obj))
                if name is None:
                    kept.append(obj)
                    name = add(id(obj), names.get(id(obj), f"#{len(tensors)}"), obj)
                return _PLAIN, name, type(obj) is torch.nn.Parameter, obj.requires_grad
            if not isinstance(obj, (torch.storage.TypedStorage, torch.UntypedStorage)):
                return None
            untyped = obj._untyped_storage if isinstance(obj, torch.storage.TypedStorage) else obj
            if untyped.device.type != "meta":
                key = (str(untyped.device), untyped.data_ptr(), untyped.nbytes())
                name = keys.get(key)
                if name is None:
                    raw = torch.empty(0, dtype=torch.uint8, device=untyped.device).set_(untyped)
                    name = add(key, f"#storage{len(tensors)}", raw)
                if isinstance(obj, torch.storage.TypedStorage):
                    return _STORAGE, name, str(obj.dtype).removeprefix("torch.")
                return _UNTYPED, name
            return None

    buffer = io.BytesIO()
    SkeletonPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    return buffer.getvalue(), tensors


def tensors_image(tensors: dict) -> bytes:
    """The safetensors file of `tensors` ({name: CPU tensor}), as bytes."""
    from safetensors.torch import save

    return save(tensors)


def join(skeleton: bytes, tensors_file, parts: dict | None = None) -> object:
    """The payload of `skeleton` (bytes) with its tensors from the safetensors file `tensors_file` (mapped); parts:
    of a cut's file, {name: tensor_parts part} its tensors hold (they carry it: tensor_parts.mark). Raises
    ValueError for a tensors file safetensors cannot read or that lacks a tensor the skeleton names."""
    from .tensor_parts import mark, read

    tensors, _ = read(tensors_file, {})
    return join_tensors(skeleton, mark(tensors, parts) if parts else tensors)


def join_tensors(skeleton: bytes, tensors: dict) -> object:
    """The payload of `skeleton` (bytes) with its tensors taken from `tensors` ({name: tensor}); a tensor read in
    part (tensor_parts.read) becomes a weight that carries its part (tensor_parts.PART) for its cut to take.
    Raises ValueError when `tensors` lacks a tensor the skeleton names."""
    import torch

    from .tensor_parts import PART

    made: dict = {}

    class SkeletonUnpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            if pid in made:
                return made[pid]
            kind, name = pid[0], pid[1]
            if name not in tensors:
                raise ValueError(f"the skeleton names a tensor {name!r} that its tensors file does not hold")
            data = tensors[name]
            part = getattr(data, PART, None)
            if kind != _PLAIN and part is not None:
                raise ValueError(f"the tensor {name!r} is a storage, which is read whole, not in part")
            if kind != _PLAIN and (data.storage_offset() or data.untyped_storage().nbytes() != data.numel()):
                data = data.clone()  # a loader that slices one storage: the storage must be this entry's alone
            if kind == _PLAIN:
                value = (torch.nn.Parameter(data, requires_grad=pid[3]) if pid[2]
                         else data.requires_grad_(pid[3]))
                if part is not None:  # a Parameter is a new object: the part goes with it
                    setattr(value, PART, part)
            elif kind in (_STORAGE, _UNTYPED):
                value = data.untyped_storage()
                if kind == _STORAGE:
                    value = torch.storage.TypedStorage(wrap_storage=value, dtype=getattr(torch, pid[2]), _internal=True)
            else:
                raise ValueError(f"the skeleton holds an unknown reference {pid!r}")
            made[pid] = value
            return value

    with warnings.catch_warnings():  # TypedStorage: what torch's own tensor pickles name (deprecated for users)
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return SkeletonUnpickler(io.BytesIO(skeleton)).load()


def plain(tensor, holds: frozenset | None = None) -> bool:
    """Whether `tensor` travels as one tensor of the file under its own name (see above), not as a storage."""
    import torch

    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and not getattr(tensor, "__dict__", None)
            and tensor.layout == torch.strided and tensor.device.type != "meta"
            and tensor.dtype in (holds or _held_dtypes()))


def _held_dtypes() -> frozenset:
    """The dtypes a safetensors file holds (safetensors' own table where it has one)."""
    import torch
    import safetensors.torch as st

    table = getattr(st, "_TYPES", None)
    if table:
        return frozenset(table.values())
    return frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint8, torch.bool})
