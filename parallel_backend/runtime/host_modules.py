"""Host modules a worker cannot import by name, made importable there under the same names.

A host may hold modules whose names are not import paths: ComfyUI loads each custom-node package under its
folder's absolute path (`/.../custom_nodes/ComfyUI-GGUF`, its submodules `/.../ComfyUI-GGUF.ops`). A model or
a patch that uses their classes or functions is pickled by those names, so a worker must know where they
live. The host lists them (`host_modules`); a worker registers the list with a finder on its import path
(`register`), after which an unpickler imports them like any other module.

A package of the list is made importable without running its `__init__` (only its submodules that are
imported run): a custom-node package's `__init__` registers nodes and web routes with the host's server, which
does not exist in a worker. A module that needs its package's `__init__` to have run fails to import, and the
host takes the stock path for what needed it (carry.py, recipe.py).

Such names are not always import paths at all: ComfyUI names a single-file node module by its path without
`.py` (its own `comfy_extras/nodes_freelunch.py` too), dots of the folders included, so `import` would split the
name at them. `HostPickler` therefore pickles the classes, functions and modules of listed modules as calls of
`host_object` / `host_module`, which load them by file, never through the import statement.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


def _not_importable_by_name(name: str) -> bool:
    return os.sep in name or (os.altsep is not None and os.altsep in name)


def host_modules() -> dict[str, tuple[str, bool]]:
    """{module name: (its file or folder, whether it is a package)} of every module of this process whose name
    is not an import path (ComfyUI's custom-node packages and their submodules)."""
    found = {}
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if not _not_importable_by_name(name) or spec is None:
            continue
        if spec.submodule_search_locations:
            found[name] = (list(spec.submodule_search_locations)[0], True)
        elif spec.origin and os.path.isfile(spec.origin):
            found[name] = (spec.origin, False)
    return found


class _PackageWithoutInit(importlib.abc.Loader):
    """Makes a package module whose submodules import from its folder, without executing its __init__."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = None


class HostModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the modules a host listed (host_modules) by their files."""

    def __init__(self):
        self.known: dict[str, tuple[str, bool]] = {}

    def find_spec(self, name, path=None, target=None):
        entry = self.known.get(name)
        if entry is None:
            return None
        location, is_package = entry
        if is_package:
            spec = importlib.machinery.ModuleSpec(name, _PackageWithoutInit(), is_package=True)
            spec.submodule_search_locations = [location]
            return spec
        return importlib.util.spec_from_file_location(name, location)


def host_module(name: str):
    """Worker side: the host's module `name` (registered by `register`), loaded by its file on first use; its
    parent packages (as the list has them) first, without their __init__."""
    if name in sys.modules:
        return sys.modules[name]
    finder = _finder()
    if name not in finder.known:
        raise ModuleNotFoundError(f"the host's module {name!r} is not on this machine")
    parent = max((p for p in finder.known if name.startswith(p + ".")), key=len, default=None)
    if parent is not None:
        host_module(parent)
    spec = finder.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    if parent is not None:
        setattr(sys.modules[parent], name[len(parent) + 1:], module)
    return module


def host_object(module: str, qualname: str):
    """Worker side: a class or function of the host's module `module` (see host_module)."""
    obj = host_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _listed(module_name) -> bool:
    return isinstance(module_name, str) and _not_importable_by_name(module_name) and module_name in sys.modules


def host_pickler():
    """cloudpickle's Pickler, with the classes, functions and modules of the host's listed modules pickled as
    host_object / host_module calls (by file, see above); everything else as cloudpickle pickles it."""
    import types

    import cloudpickle

    class HostPickler(cloudpickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, types.ModuleType) and _listed(obj.__name__):
                return host_module, (obj.__name__,)
            if isinstance(obj, (types.FunctionType, type)) and _listed(getattr(obj, "__module__", None)) \
                    and "<locals>" not in obj.__qualname__:
                return host_object, (obj.__module__, obj.__qualname__)
            return super().reducer_override(obj)

    return HostPickler


def dumps(obj) -> bytes:
    """`obj` pickled with host_pickler()."""
    import io

    buffer = io.BytesIO()
    host_pickler()(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


def _finder() -> "HostModuleFinder":
    finder = next((f for f in sys.meta_path if isinstance(f, HostModuleFinder)), None)
    if finder is None:
        finder = HostModuleFinder()
        sys.meta_path.append(finder)
    return finder


def register(modules: dict[str, tuple[str, bool]]) -> None:
    """Worker side: makes the host's modules `modules` (host_modules) importable in this process. Entries of this
    machine that are gone (another machine's paths) are skipped: importing them then fails by name."""
    _finder().known.update({name: entry for name, entry in modules.items() if os.path.exists(entry[0])})
