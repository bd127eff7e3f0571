"""A model as a recipe: how a worker builds it with the host's own code, and the weights it then loads.

A host whose models cannot travel as one pickled module (classes made inside functions, tensor subclasses of
a host's plug-in, quantized layers) describes each as a `Recipe`: a picklable `build` that makes the module
with the host's classes and settings, the weights (what `load_state_dict` takes; quantized weights stay
quantized), the attributes the host's instances carry beyond what building gives them (`overrides`: a
patch object, a setting a loader wrote), and the host module's `layout`, which the built one must match.
The worker loads the weights with `assign` (a CPU worker keeps the mapped file's pages, nothing is copied).

The whole recipe travels with cloudpickle (by reference for what the worker can import, host_modules.py; by
value for closures and classes of `__main__`). A recipe that does not build the host's module is refused on
the worker with the first difference named; the host then takes its stock path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .tensor_parts import PART


@dataclass
class Recipe:
    """build(): the module with its weights unset. weights: name -> tensor, loaded with assign. overrides:
    {module path ("" for the root): {attribute: value}} set after loading. layout: `layout(host module)`.
    identity: a digest of everything but the weights (what names the model in another machine's cache).
    compile: torch.compile's keyword arguments for the worker's whole-call forward, or None. sources: the
    safetensors files the host loaded the weights from, which its workers may read instead (sources.py)."""

    build: Callable[[], torch.nn.Module]
    weights: dict
    layout: tuple
    identity: str
    overrides: dict = field(default_factory=dict)
    compile: dict | None = None
    sources: tuple = ()

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.weights.values() if isinstance(t, torch.Tensor))

    def make(self, device) -> torch.nn.Module:
        """The module on `device`, built, loaded, patched and checked against the host's layout."""
        module = self.build()
        parted = {name: t for name, t in self.weights.items() if getattr(t, PART, None) is not None}
        missing, unexpected = module.load_state_dict({n: t for n, t in self.weights.items() if n not in parted},
                                                     strict=False, assign=True)
        missing = [name for name in missing if name not in parted]
        for name, tensor in parted.items():  # a weight read in part: in place as it is, for the cut to take
            unexpected += _put_part(module, name, tensor)
        if missing or unexpected:
            raise RuntimeError(f"the model built from its recipe does not take the host's weights (missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]})")
        modules = dict(module.named_modules())
        for path, attributes in self.overrides.items():
            for name, value in attributes.items():
                setattr(modules[path], name, value)
        built = layout(module)
        if built != self.layout:
            first = next((a, b) for a, b in zip(built + ((None,),), self.layout + ((None,),)) if a != b)
            raise RuntimeError(f"the model built from its recipe differs from the host's: {first[0]} where the "
                               f"host has {first[1]}")
        return module.to(device).eval().requires_grad_(False)


def _put_part(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> list[str]:
    """Sets the weight `name` of `module` to `tensor`, a part of it (tensor_parts.PART) that load_state_dict would
    refuse by its shape; [name] where the module has no such weight of the part's whole shape."""
    path, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return [name]
    current = owner._parameters.get(leaf)
    if current is None or tuple(current.shape) != tuple(getattr(tensor, PART).shape):
        return [name]
    owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    setattr(owner._parameters[leaf], PART, getattr(tensor, PART))
    return []


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor holds (a quantized subclass: its stored bytes, not its logical shape's)."""
    plain = t.detach().as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t
    return plain.numel() * plain.element_size()


def weights_bytes(module: torch.nn.Module, device=None) -> int:
    """The bytes of weights and buffers a module holds (a quantized layer's stored bytes); with `device`, only
    of those on that device (a torch.device)."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers())
               if device is None or t.device == device)


def layout(module: torch.nn.Module) -> tuple:
    """What a module is made of: each submodule's class, each parameter's and buffer's name, tensor class,
    dtype and shape."""
    classes = tuple((name, f"{type(m).__module__}.{type(m).__qualname__}") for name, m in module.named_modules())
    tensors = tuple((name, type(t).__qualname__, str(t.dtype), _whole_shape(t))
                    for name, t in (*module.named_parameters(), *module.named_buffers()))
    return classes + tensors


def _whole_shape(t: torch.Tensor) -> tuple:
    """A weight's shape; of one read in part (tensor_parts.PART), the whole weight's."""
    part = getattr(t, PART, None)
    return tuple(part.shape) if part is not None else tuple(t.shape)


_MISSING = object()
# What torch.nn.Module keeps in every instance's __dict__: its own machinery, never a host's setting.
_MODULE_STATE = frozenset(vars(torch.nn.Module()).keys())


def instance_overrides(host: torch.nn.Module, fresh: torch.nn.Module) -> dict:
    """{module path: {attribute: the host's value}} for every instance attribute of `host`'s modules that a
    freshly built `fresh` (the same recipe, e.g. on the meta device) lacks or holds otherwise: what loaders and
    patches wrote after building. Tensors, modules and torch's own module state are the weights' and the
    structure's business (layout), not compared here."""
    fresh_modules = dict(fresh.named_modules())
    overrides = {}
    for path, module in host.named_modules():
        twin = fresh_modules.get(path)
        if twin is None:
            continue
        twin_state = vars(twin)
        for name, value in vars(module).items():
            if name in _MODULE_STATE or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            if _shadows_method(module, name, value):  # a replaced method keeps the model on the host (MethodWatch)
                continue
            if not _same(value, twin_state.get(name, _MISSING)):
                overrides.setdefault(path, {})[name] = value
    return overrides


def _same(a, b) -> bool:
    if a is b:
        return True
    if getattr(a, "__func__", a) is getattr(b, "__func__", b) and getattr(a, "__self__", None) is not None:
        return type(getattr(a, "__self__")) is type(getattr(b, "__self__", None))  # the same method of twin objects
    try:
        return bool(a == b)
    except Exception:  # an object whose == raises or returns an array
        return False


class MethodWatch:
    """Which methods of a module's instances something replaced since it was built (a cache or patch that swaps
    `forward_orig` on the model object while a sampler runs) or hooked: compared, on every call, with a fresh
    build of the same recipe (whatever building itself sets on the instances is not a replacement)."""

    def __init__(self, module: torch.nn.Module, fresh: torch.nn.Module):
        self.modules = list(module.named_modules())
        self.built = {(path, name): _function(value) for path, m in fresh.named_modules()
                      for name, value in vars(m).items() if _shadows_method(m, name, value)}
        # What can change the submodules' scan: an instance attribute or a hook added or removed (the sizes of
        # these dicts), or the value of an attribute that stands in for a method (held, compared by identity).
        self._dicts = [d for _, m in self.modules[1:] for d in (m.__dict__, m._forward_hooks, m._forward_pre_hooks)]
        self._last = None  # (sizes, held values, what the scan found)

    def replaced(self) -> list[str]:
        """`path.name (function)` of each replaced method and `path (forward hook)` of each hooked module. Runs on
        every call: the whole tree took 3 ms for 1,500 modules, so the model object itself is scanned every time
        (caches keep their state on it, adding and deleting attributes within one call) and its submodules only
        when the sizes of their dicts or the held method stand-ins changed since the last scan (0.2 ms)."""
        root = self._scan(self.modules[:1])[0]
        sizes = sum(map(len, self._dicts))
        last = self._last
        if last is None or last[0] != sizes or not all(d.get(k) is v for d, k, v in last[1]):
            found, held = self._scan(self.modules[1:])
            last = self._last = (sizes, held, found)
        return root + last[2]

    def _scan(self, modules) -> tuple[list[str], list]:
        found, held = [], []
        for path, m in modules:
            for name in m.__dict__.keys() & _method_names(type(m)):
                value = m.__dict__[name]
                if not _shadows_method(m, name, value):
                    continue
                held.append((m.__dict__, name, value))
                if self.built.get((path, name)) is not _function(value) and not _own_method(m, name, value):
                    what = getattr(_function(value), "__qualname__", type(value).__name__)
                    found.append(f"{path + '.' if path else ''}{name} ({what})")
            if m._forward_hooks or m._forward_pre_hooks:
                found.append(f"{path or 'the model'} (a forward hook)")
        return found, held


_METHOD_NAMES: dict[type, frozenset] = {}


def _method_names(cls: type) -> frozenset:
    """The names of `cls`'s callable attributes (what an instance attribute would stand in for)."""
    names = _METHOD_NAMES.get(cls)
    if names is None:
        names = _METHOD_NAMES[cls] = frozenset(n for n in dir(cls) if not n.startswith("__")
                                               and callable(getattr(cls, n, None)))
    return names


def _function(value):
    return getattr(value, "__func__", value)


def _own_method(module, name: str, value) -> bool:
    """`value` is the class's own method bound to `module` (what a patch's undo leaves behind: ComfyUI restores
    an object patch by setting the attribute it read, the bound method, on the instance)."""
    return getattr(value, "__self__", None) is module and _function(value) is _function(getattr(type(module), name))


def _shadows_method(module, name: str, value) -> bool:
    return (not name.startswith("__") and callable(value) and not isinstance(value, torch.nn.Module)
            and callable(getattr(type(module), name, None)))


def identity_of(*parts) -> str:
    """A digest of `parts`' reprs (plain data: names, configs, settings)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()
