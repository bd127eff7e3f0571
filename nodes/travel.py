"""What of a ComfyUI model and its calls goes to the workers: the model's fingerprint (everything that changes
its output), its recipe, torch.compile's settings, and what keeps a model on the host.

Per sampling run, the cond batching wrapper notes in `transformer_options["tandem"]` the facts a call needs
(`run_facts`); per call, the model wrapper asks `host_reason` whether the model can go and `fingerprint`
which copy the workers must hold.
"""

from __future__ import annotations

import functools
import weakref

from parallel_backend.runtime.carry import CannotCarry, is_plain
from parallel_backend.runtime.recipe import identity_of

from .recipe import HostModel

COMPILE_KEY = "torch.compile"  # ComfyUI's TorchCompileModel: an APPLY_MODEL wrapper under this key


def run_facts(model, model_options: dict, run_id: int) -> dict:
    """What a sampling run's calls need to know of the host's BaseModel `model`: its weights' identity, its
    object patches on the diffusion model, torch.compile's settings, whether it is fully loaded."""
    return {"weights": f"{id(model)}:{model.current_weight_patches_uuid}", "base_model": weakref.ref(model),
            "lowvram": bool(getattr(model, "model_lowvram", False)), "id": run_id,
            "object_patches": _object_patches(model), "compile": compile_settings(model_options)}


def _object_patches(model) -> str:
    """The object patches of the model's current patcher that touch the diffusion model, as a digest."""
    patcher = getattr(model, "current_patcher", None)
    patches = getattr(patcher, "object_patches", None) or {}
    touched = sorted((key, type(value).__qualname__, value if is_plain(value) else id(value))
                     for key, value in patches.items() if key.split(".", 1)[0] == "diffusion_model")
    return identity_of(touched) if touched else ""


def compile_settings(model_options: dict) -> dict | None:
    """TorchCompileModel's torch.compile arguments, where it compiles the whole diffusion model (the workers
    then compile their copy with them); None where the model is not compiled."""
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {}).get("apply_model", {})
    if not wrappers.get(COMPILE_KEY):
        return None
    compiled = _compiled_keys(wrappers[COMPILE_KEY][-1])
    if compiled != ["diffusion_model"]:
        return {"unsupported": compiled}
    return dict(model_options.get("torch_compile_kwargs") or {})


def _compiled_keys(wrapper) -> list | None:
    for cell in getattr(wrapper, "__closure__", None) or ():
        if isinstance(cell.cell_contents, dict):
            return sorted(cell.cell_contents)
    return None


def host_reason(run: dict, diffusion_model) -> str | None:
    """Why this model's calls stay on the host (one sentence), or None: something replaced methods of its
    instances (a cache such as TeaCache, MagCache or a first-block cache swaps `forward_orig` and keeps its own
    state across calls, which a split would divide), an object patch replaced the whole diffusion model, or it
    cannot be built again in a worker."""
    if run["object_patches"] and "diffusion_model" in _patched_keys(run):
        return "an object patch replaces the whole diffusion model (e.g. a pack's own torch.compile)"
    compile_kwargs = run["compile"] or {}
    if "unsupported" in compile_kwargs:
        return (f"TorchCompileModel compiles parts of the model ({compile_kwargs['unsupported']}); Tandem's "
                "workers compile only the whole diffusion model")
    try:
        host = HostModel.of(run["base_model"](), diffusion_model)
    except CannotCarry as exc:
        return str(exc)
    replaced = host.watch.replaced()
    if replaced:
        return (f"something replaced methods of the model object ({', '.join(replaced[:3])}), as caches like "
                "TeaCache, MagCache and first-block caches do; their skip decisions and state span the whole "
                "call, which a split would divide")
    return None


def _patched_keys(run: dict) -> set:
    model = run["base_model"]()
    patcher = getattr(model, "current_patcher", None)
    return set(getattr(patcher, "object_patches", None) or {})


def fingerprint(family_wire: str, run: dict) -> str:
    """Names the copy the workers must hold: the family, the weights (their version), the object patches on
    the diffusion model and torch.compile's settings."""
    extra = identity_of(run["object_patches"], sorted((run["compile"] or {}).items(), key=str))
    return f"{family_wire}:{run['weights']}:{extra[:16]}"


def recipe_of(run: dict, diffusion_model):
    """A function giving the model's recipe (called only when it ships)."""
    return functools.partial(_recipe, run["base_model"], weakref.ref(diffusion_model), run["compile"])


def _recipe(base_model_ref, module_ref, compile_kwargs):
    base_model = base_model_ref()
    return HostModel.of(base_model, module_ref()).recipe(compile_kwargs, source_files(base_model))


# ComfyUI's own loaders that record the file a model came from (ModelPatcher.cached_patcher_init, from v0.2x: the
# function ComfyUI calls to load the same model again, and its arguments, the file's path first).
_FILE_LOADERS = frozenset({"load_diffusion_model", "load_checkpoint_guess_config"})


def source_files(base_model) -> tuple[str, ...]:
    """The safetensors file ComfyUI's own loader (UNETLoader, CheckpointLoaderSimple) read `base_model` from, where
    its weights carry no weight patch (a LoRA merged in place no longer equals the file: the host then writes the
    model for the workers): what ComfyUI itself records to load the model again (`cached_patcher_init`, v0.2x;
    v0.8 records none: ()). The workers check every weight they read against the host's copy (sources.py)."""
    patcher = getattr(base_model, "current_patcher", None)
    init = getattr(patcher, "cached_patcher_init", None)
    if patcher is None or not init or getattr(patcher, "patches", None):
        return ()
    loader, arguments = init[0], init[1]
    if getattr(loader, "__module__", "") != "comfy.sd" or getattr(loader, "__name__", "") not in _FILE_LOADERS:
        return ()
    path = arguments[0] if arguments and isinstance(arguments[0], str) else ""
    return (path,) if path.lower().endswith((".safetensors", ".sft")) else ()
