"""A host's patches and models that are not plain data reach the workers: closures by value, a custom-node
package's functions and classes by reference (imported in the workers under the host's module names), a model
as a recipe built with the host's class. The oracle: the same call computed in this process. What a worker
cannot take is refused in one sentence while the pool stays usable."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
from pathlib import Path

import pytest
import torch

from parallel_backend.runtime.calls import ModelCall
from parallel_backend.runtime.carry import CannotCarry, Carrier, CarriedRef, CarriedStore
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.runtime.pool import WorkerError
from parallel_backend.runtime.recipe import MethodWatch, Recipe, identity_of, instance_overrides, layout

pytestmark = pytest.mark.pool

PACK = Path(__file__).with_name("host_pack")
FAMILY = "comfy_dit"  # called as ComfyUI calls a diffusion model: model(x, t, context=..., **extras)
ATOL = 1e-5


def import_as_custom_node(folder: Path):
    """Imports `folder` as ComfyUI imports a custom-node package: under its path as the module name."""
    name = str(folder)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(name + ".model")


@pytest.fixture(scope="module")
def pack():
    return import_as_custom_node(PACK)


def _model(pack, seed: int = 0):
    torch.manual_seed(seed)
    return pack.Patchable(8).eval().requires_grad_(False)


def _call(options: dict, rows: int = 4) -> ModelCall:
    generator = torch.Generator().manual_seed(1)
    return ModelCall(torch.randn(rows, 8, generator=generator), torch.arange(rows, dtype=torch.float32), None,
                     {"transformer_options": options})


def _on_pool(pool, model, call, recipe=None):
    return ParallelExecutor(pool, ParallelConfig("cpu:2", "batch")).run(model, FAMILY, call, recipe=recipe).out


def _on_host(model, call):
    with torch.no_grad():
        return model(call.x, call.t, **call.extras)


def _times(k):
    return lambda h: h * k  # a closure: it travels by value


def test_plain_inputs_stay_as_they_are_and_host_objects_become_references():
    carrier = Carrier()
    inputs = {"transformer_options": {"sigmas": torch.ones(2), "uuids": [1, 2], "patches": {"post": [_times(3)]}}}
    carried, new = carrier.prepare(inputs)
    options = carried["transformer_options"]
    assert options["sigmas"] is inputs["transformer_options"]["sigmas"] and options["uuids"] == [1, 2]
    (ref,) = options["patches"]["post"]
    assert isinstance(ref, CarriedRef) and list(new) == [ref.digest]
    carrier.sent(new)
    assert carrier.prepare(inputs)[1] == {}  # held by the workers: not sent again
    store = CarriedStore()
    store.load(new)
    live = store.resolve(carried)["transformer_options"]["patches"]["post"][0]
    assert live(torch.ones(1)).item() == 3.0


@pytest.mark.parametrize("leaf, named", [
    (threading.Lock(), "transformer_options['state'] holds a lock that cannot be sent to a worker"),
    (torch.nn.Linear(2, 2), "transformer_options['state'] holds a model (Linear)"),
])
def test_what_cannot_travel_is_refused_naming_where_it_sits(leaf, named):
    with pytest.raises(CannotCarry) as refused:
        Carrier().prepare({"transformer_options": {"state": leaf}})
    assert str(refused.value).startswith(named)


def test_patches_by_value_and_by_reference_run_on_the_workers(cpu_pool, pack):
    model = _model(pack)
    call = _call({"patches": {"post": [_times(3.0), pack.double]}})
    out = _on_pool(cpu_pool, model, call)
    torch.testing.assert_close(out, _on_host(model, call), atol=ATOL, rtol=ATOL)
    assert out.abs().sum() > 0
    call = _call({"patches": {"post": [_times(5.0)]}})  # another closure: another digest, sent before its call
    torch.testing.assert_close(_on_pool(cpu_pool, model, call), _on_host(model, call), atol=ATOL, rtol=ATOL)


def test_a_patch_a_worker_cannot_import_is_refused_and_the_pool_goes_on(cpu_pool, pack, tmp_path):
    folder = tmp_path / "GonePack"  # a pack the host loaded whose files the workers cannot find
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "model.py").write_text("def halve(h):\n    return h / 2\n")
    gone = import_as_custom_node(folder)
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    model = _model(pack)
    call = _call({"patches": {"post": [gone.halve]}})
    with pytest.raises(CannotCarry, match="a model patch cannot be loaded on the workers"):
        _on_pool(cpu_pool, model, call)
    assert cpu_pool.started
    requests = cpu_pool.stats.failures[:]
    with pytest.raises(CannotCarry):  # remembered: refused at once, nothing sent
        _on_pool(cpu_pool, model, call)
    assert cpu_pool.stats.failures == requests
    plain = _call({})
    torch.testing.assert_close(_on_pool(cpu_pool, model, plain), _on_host(model, plain), atol=ATOL, rtol=ATOL)


def test_a_pack_under_folders_with_dots_reaches_the_workers(cpu_pool, tmp_path):
    """ComfyUI names a custom-node module by its path, and `import` splits such a name at every dot: a pack under
    /opt/ComfyUI-0.24/custom_nodes/ still ships its plain model (no recipe) and its functions by file."""
    import shutil

    folder = tmp_path / "ComfyUI-0.24" / "custom_nodes" / "pack.v2"
    shutil.copytree(PACK, folder, ignore=shutil.ignore_patterns("__pycache__"))
    dotted = import_as_custom_node(folder)
    model = _model(dotted, seed=5)
    call = _call({"patches": {"post": [dotted.double]}})
    torch.testing.assert_close(_on_pool(cpu_pool, model, call), _on_host(model, call), atol=ATOL, rtol=ATOL)


def _recipe(pack, model, dim: int = 8) -> Recipe:
    build = functools.partial(pack.Patchable, dim)
    fresh = pack.Patchable(dim, device="meta")
    return Recipe(build, model.state_dict(), layout(model), identity_of("Patchable", dim),
                  instance_overrides(model, fresh))


def test_a_model_travels_as_its_recipe_with_its_instance_settings(cpu_pool, pack):
    model = _model(pack, seed=3)
    model.gain = 1.5  # what a loader wrote after building: an override the recipe carries
    recipe = _recipe(pack, model)
    assert recipe.overrides == {"": {"gain": 1.5}}
    call = _call({})
    out = _on_pool(cpu_pool, model, call, recipe=lambda: recipe)
    torch.testing.assert_close(out, _on_host(model, call), atol=ATOL, rtol=ATOL)


def test_a_recipe_that_builds_another_model_is_refused_and_the_pool_goes_on(cpu_pool, pack):
    model = _model(pack, seed=4)
    wrong = _recipe(pack, model)
    wrong.build = functools.partial(pack.Patchable, 6)  # not the host's shape
    wrong.weights = {}
    with pytest.raises(WorkerError, match="loading the model"):
        cpu_pool.ensure_model(model, FAMILY, "wrong-recipe", lambda: wrong)
    assert cpu_pool.started and "wrong-recipe" not in cpu_pool.loaded_fingerprints
    assert not any(path.name.startswith("model-") for path in cpu_pool._dir.iterdir())  # its file is gone


def test_the_engine_refuses_a_model_the_workers_cannot_take_and_does_not_ship_it_again(cpu_pool, pack):
    """A host hands the engine the call alone: the workers' refusal of its model comes back as CannotCarry (the
    host's cue for its stock path), and the model's later calls are refused without a second shipment."""
    model = _model(pack, seed=6)
    wrong = _recipe(pack, model)
    wrong.build = functools.partial(pack.Patchable, 6)  # not the host's shape
    wrong.weights = {}
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "batch"))
    with pytest.raises(CannotCarry, match="the workers could not take this model .*loading the model"):
        executor.run(model, FAMILY, _call({}), "refused-recipe", lambda: wrong)
    checks = cpu_pool.stats.model_checks
    with pytest.raises(CannotCarry, match="the workers could not take this model"):
        executor.run(model, FAMILY, _call({}), "refused-recipe", lambda: wrong)
    assert cpu_pool.stats.model_checks == checks and cpu_pool.started
    out = executor.run(model, FAMILY, _call({}), "accepted", lambda: _recipe(pack, model)).out
    torch.testing.assert_close(out, _on_host(model, _call({})), atol=ATOL, rtol=ATOL)

def test_a_recipe_checks_what_it_built_against_the_hosts_layout(pack):
    model = _model(pack)
    recipe = _recipe(pack, model)
    torch.testing.assert_close(recipe.make("cpu").proj.weight, model.proj.weight)
    recipe.layout = layout(pack.Patchable(6))
    with pytest.raises(RuntimeError, match="differs from the host's"):
        recipe.make("cpu")


def test_the_workers_import_a_packs_modules_without_running_its_init(cpu_pool, pack):
    model = _model(pack)
    call = _call({"patches": {"post": [_package_state(), pack.double]}})
    out = _on_pool(cpu_pool, model, call)
    assert torch.all(out == 0)  # on the workers the package's __init__ did not run (INIT_RAN absent)
    assert sys.modules[str(PACK)].INIT_RAN  # here it did


def _package_state():
    def scale(h):  # a closure, so it travels by value: this test module is not importable in a worker
        import sys as system

        # a copy: the worker's other threads may import while this looks (a live view then changes size)
        pack = next((m for name, m in list(system.modules.items()) if name.endswith("host_pack")), None)
        return h * float(getattr(pack, "INIT_RAN", False))

    return scale


def test_replaced_methods_and_hooks_are_found_against_a_fresh_build(pack):
    model = _model(pack)
    watch = MethodWatch(model, pack.Patchable(8, device="meta"))
    assert watch.replaced() == []
    model.forward = _times(2).__get__(model)  # what a cache such as TeaCache does to forward_orig
    assert watch.replaced() == ["forward (_times.<locals>.<lambda>)"]
    model.forward = type(model).forward.__get__(model)
    assert watch.replaced() == []  # the class's own method set back on the instance (an object patch undone)
    del model.forward
    handle = model.proj.register_forward_hook(lambda *args: None)
    assert watch.replaced() == ["proj (a forward hook)"]
    handle.remove()
    assert watch.replaced() == []
    model.state = 1  # a cache's state on the model object, deleted as forward is replaced: the same size
    assert watch.replaced() == []
    del model.state
    model.forward = _times(3).__get__(model)
    assert len(watch.replaced()) == 1
    del model.forward
    stand_in = _times(3).__get__(model)  # set, undone (the own method stays on the instance), set again:
    for value, expected in ((stand_in, 1), (type(model).forward.__get__(model), 0), (stand_in, 1)):
        model.forward = value  # the same number of attributes each time: the scan must still run again
        assert len(watch.replaced()) == expected


def test_a_model_that_cannot_be_written_leaves_no_file_and_the_pool_goes_on(cpu_pool, pack):
    model = _model(pack, seed=5)
    recipe = _recipe(pack, model)
    recipe.overrides = {"": {"lock": threading.Lock()}}  # does not pickle: the write fails part-way
    with pytest.raises(CannotCarry, match="the model cannot be written for the workers"):
        cpu_pool.ensure_model(model, FAMILY, "unwritable", lambda: recipe)
    assert cpu_pool.started and not any(path.name.startswith("model-") for path in cpu_pool._dir.iterdir())


def test_a_function_of_a_node_file_whose_path_has_dots_travels_by_file(cpu_pool, pack, tmp_path):
    """ComfyUI names a single-file node module by its path without `.py`, the folders' dots included (its own
    comfy_extras/nodes_freelunch.py under ComfyUI-0.24/): `import` would split that name at the dots."""
    folder = tmp_path / "ComfyUI-0.24" / "comfy_extras"
    folder.mkdir(parents=True)
    (folder / "nodes_scale.py").write_text("def thrice(h):\n    return h * 3.0\n")
    name = str(folder / "nodes_scale")
    spec = importlib.util.spec_from_file_location(name, folder / "nodes_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    model = _model(pack)
    call = _call({"patches": {"post": [module.thrice]}})
    torch.testing.assert_close(_on_pool(cpu_pool, model, call), _on_host(model, call), atol=ATOL, rtol=ATOL)
