"""How Tandem sits inside ComfyUI's sampling: two wrappers installed on a cloned ModelPatcher.

- CALC_COND_BATCH: a call that goes to the pool gets cond and uncond as one batch (the work runs on the
  workers, so the host device's free memory must not split them apart); any other call keeps ComfyUI's
  memory estimate. The weights' identity travels with the call.
- DIFFUSION_MODEL: each diffusion-model call (any family models/comfy_dit.py knows: UNets, Flux, SD3, Wan, ...)
  is split over the pool; anything that cannot travel to a worker (a model patch that is a host function,
  weights only partly loaded, a family Tandem has no adapter for) takes the stock path, and the log says why.
- APPLY_MODEL: a family whose forward has no DIFFUSION_MODEL hook (SD3's MMDiT) has its diffusion model stood in
  for, during the call, by one that hands each call to the same DIFFUSION_MODEL wrapper.
- OUTER_SAMPLE: one multi-GPU split per model. ComfyUI's own MultiGPU CFG Split (v0.23+) on the same model is
  switched off for the run (its device copies are not loaded), and the log says so.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time

import comfy.model_management
import comfy.patcher_extension
import torch

from parallel_backend import strategies
from parallel_backend.runtime.calls import ModelCall
from parallel_backend.runtime.carry import CannotCarry
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models import comfy_dit
from parallel_backend.runtime.devices import PoolUnavailable

from .runtime import RUNTIME, UNAVAILABLE
from .settings import default_config
from .travel import fingerprint, host_reason, recipe_of, run_facts

KEY = "tandem"
RUN_KEY = "tandem_run"
log = logging.getLogger("tandem")
_RUN_NUMBERS = itertools.count(1)


def install(model, config: ParallelConfig | None = None):
    """A clone of `model` (a ModelPatcher) whose diffusion-model calls run on the pool per `config`
    (None: the pack's default devices, strategy auto)."""
    config = config or default_config()
    RUNTIME.check_devices(config.devices)  # devices that do not exist fail the run, before any work
    family = comfy_dit.recognise(getattr(model.model, "diffusion_model", None))
    if family is not None and config.strategy != "auto":  # e.g. asyncdiff on a DiT: refused before any work
        strategies.get(config.strategy).check_family(family.wire)
        named = strategies.get(config.strategy)
        if (named.splits_tokens or named.patches_tokens) and not _has_attention_override():
            raise ValueError(f"strategy {config.strategy!r} splits attention through ComfyUI's "
                             "optimized_attention_override, which this ComfyUI lacks (v0.8 and later have it): "
                             "update ComfyUI, or use cfg, batch or auto")
    patched = model.clone()
    earlier = [w for w in patched.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
               if isinstance(w, PoolForward)]
    if earlier:
        log.info("Tandem: this model already went through a Multi-GPU node (devices %s, strategy %s); the later "
                 "one applies (devices %s, strategy %s)", earlier[-1].config.devices, earlier[-1].config.strategy,
                 config.devices, config.strategy)
    kinds = comfy.patcher_extension.WrappersMP
    for kind in (kinds.DIFFUSION_MODEL, kinds.CALC_COND_BATCH, kinds.OUTER_SAMPLE, kinds.APPLY_MODEL):
        patched.remove_wrappers_with_key(kind, KEY)
    _drop_comfy_multigpu(patched)
    forward = PoolForward(config)
    patched.add_wrapper_with_key(kinds.OUTER_SAMPLE, KEY, one_split_per_model)
    patched.add_wrapper_with_key(kinds.CALC_COND_BATCH, KEY, batch_cond_and_uncond)
    patched.add_wrapper_with_key(kinds.APPLY_MODEL, KEY, ReachUnhookedModel(forward))
    patched.add_wrapper_with_key(kinds.DIFFUSION_MODEL, KEY, forward)
    return patched


def _has_attention_override() -> bool:
    """Whether this ComfyUI's attention functions hand their calls to transformer_options'
    optimized_attention_override (what a sequence split runs attention through on the workers)."""
    import comfy.ldm.modules.attention as attention

    return hasattr(attention, "wrap_attn")


def _has_comfy_multigpu(patcher) -> bool:
    """Whether ComfyUI's MultiGPU CFG Split attached device copies to `patcher` (v0.8 has no such node)."""
    getter = getattr(patcher, "get_additional_models_with_key", None)
    return getter is not None and bool(getter("multigpu"))


def _drop_comfy_multigpu(patcher) -> bool:
    """Removes the device copies ComfyUI's MultiGPU CFG Split attached to `patcher` (a clone of ours), so they
    are never loaded; True if there were any."""
    if not _has_comfy_multigpu(patcher):
        return False
    patcher.remove_additional_models("multigpu")
    log.warning("Tandem: ComfyUI's MultiGPU CFG Split is also on this model; Tandem's Multi-GPU node splits it "
                "over its worker processes, so the CFG Split is off for it (both at once would split each call "
                "twice and load the model again on every GPU)")
    return True


def one_split_per_model(executor, *args, **kwargs):
    """OUTER_SAMPLE: a MultiGPU CFG Split placed after Tandem's node attached device copies to the model being
    sampled; they are dropped before ComfyUI loads them (the guider samples a clone without them)."""
    guider = executor.class_obj
    patcher = getattr(guider, "model_patcher", None)
    if patcher is not None and _has_comfy_multigpu(patcher):
        guider.model_patcher = patcher.clone()
        _drop_comfy_multigpu(guider.model_patcher)
    return executor(*args, **kwargs)


def batch_cond_and_uncond(executor, model, conds, x_in, timestep, model_options):
    # model_options is the sampling run's own copy (CFGGuider clones it per run), so a number stored in it names
    # the run; id() would not: a finished run's dict address is often reused by the next run's.
    if RUN_KEY not in model_options:
        model_options[RUN_KEY] = next(_RUN_NUMBERS)
    # ComfyUI hands the diffusion model a merged copy of this dict: it carries facts, never counters.
    model_options.setdefault("transformer_options", {})[KEY] = run_facts(model, model_options, model_options[RUN_KEY])
    # ComfyUI batches cond and uncond only while model.memory_required(...) * 1.5 fits the host device's free
    # memory. A call that goes to the pool holds no activations on the host, so it sees an estimate of 0; every
    # other call (stock path) keeps ComfyUI's estimate. `model` is the BaseModel that every clone of the
    # ModelPatcher shares: it is never changed, the call gets a view of it instead.
    if _goes_to_pool(model, conds, model_options):
        model = _NoHostActivations(model)
    return executor(model, conds, x_in, timestep, model_options)


class _NoHostActivations:
    """The host's BaseModel as ComfyUI's cond batching sees it for a call that runs on the pool: every attribute
    is the model's own (read and written through), except the memory estimate, which is 0."""

    __slots__ = ("_model",)

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    @staticmethod
    def memory_required(*args, **kwargs):
        return 0


def _goes_to_pool(model, conds, model_options) -> bool:
    """Whether PoolForward will send this cond batch's calls to the pool (the same checks, in its order; the pool is
    asked for here, for them: `_pool_of`); when in doubt False: ComfyUI's own estimate then decides, as on the stock
    path."""
    if "multigpu_clones" in model_options:  # ComfyUI's MultiGPU CFG Split batches per device itself
        return False
    options = model_options.get("transformer_options", {})
    if _run_reason(options) is not None or host_reason(options[KEY], model.diffusion_model) is not None:
        return False
    if comfy_dit.unsupported_reason(model.diffusion_model) is not None:
        return False
    forwards = [w for w in comfy.patcher_extension.get_wrappers_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, model_options, is_model_options=True)
        if isinstance(w, PoolForward)]
    if not forwards:
        return False
    pool, _ = _pool_of(options[KEY], forwards[-1].config.devices)  # why not: PoolForward says it
    if any("gligen" in c or c.get("hooks") is not None for cond in conds if cond for c in cond):
        return False  # their patches join the call's transformer_options only inside the batching
    return pool is not None and len(pool.devices) >= 2


def _pool_of(run: dict, devices: str) -> tuple:
    """(pool, None) or (None, why) for one cond batch's calls, asked of the runtime once, by the batching's
    estimate (`_goes_to_pool`), and kept in the batch's facts (`run`, made anew per batch), which each of its calls
    gets a copy of; a call asks itself only where the estimate stopped before the pool. Nothing on the way checks
    the pool again: the engine looks after its health with the call itself."""
    if "pool" not in run:
        run["pool"] = pool_or_reason(devices)
    return run["pool"]


def pool_or_reason(devices: str) -> tuple:
    """(the running pool, None), or (None, why) when it cannot take calls now (runtime.UNAVAILABLE). Any other error
    is a fault, not a refusal: it fails the run, naming the devices."""
    try:
        pool = RUNTIME.get_pool(devices)
    except UNAVAILABLE as exc:
        return None, f"the worker pool is not available ({exc})"
    except Exception as exc:  # a fault: the run fails, its message naming the devices (the cause chained)
        named = RUNTIME.devices if devices == "auto" else devices if isinstance(devices, str) else ",".join(devices)
        raise RuntimeError(f"Tandem's worker pool on {named} failed: {type(exc).__name__}: {exc}") from exc
    return pool, None


def _run_reason(transformer_options: dict) -> str | None:
    """Why a call whose options can travel still stays on the host (ComfyUI's own split, a partly loaded
    model, no Tandem batching), or None."""
    if "multigpu_thread_device" in transformer_options:
        return "ComfyUI's MultiGPU CFG Split runs this call on its own threads"
    if transformer_options.get(KEY, {}).get("lowvram"):
        return "the model is only partly loaded (low VRAM): its patched weights are not all in place to ship"
    if KEY not in transformer_options:
        return "the sampler bypassed cond batching (no Tandem batch wrapper ran)"
    return None


def _step_of(transformer_options: dict) -> int | None:
    """The sampler step of a call: its sigma's position in the run's schedule (a sampler evaluating the model
    twice per step gets the next step's number for its second evaluation, at the next sigma)."""
    schedule, sigma = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
    if schedule is None or sigma is None or not len(schedule):
        return None
    return int((schedule.to(sigma.device, sigma.dtype) - sigma.reshape(-1)[0]).abs().argmin())


class PoolForward:
    """The DIFFUSION_MODEL wrapper: one diffusion-model call, split over the pool."""

    def __init__(self, config: ParallelConfig):
        # A call holding one branch only (cfg = 1, or area conds in several chunks) has nothing to split by
        # branch: the mesh resolver splits its rows instead (mesh.resolve folds the cfg degree into batch).
        self.config = config
        self.said: set[str] = set()

    def _stock(self, reason: str):
        if reason not in self.said:
            self.said.add(reason)
            log.warning("Tandem: using the stock sampling path: %s", reason)

    @torch.compiler.disable  # a host's torch.compile (TorchCompileModel) must not trace the pool's call
    def __call__(self, executor, *args, **kwargs):
        inner = getattr(executor, "wrappers", [])[getattr(executor, "idx", 0) + 1:]
        if not inner:
            return self._split(executor, functools.partial(executor, *args, **kwargs), args, kwargs)
        # Tandem's call is always the innermost: another node's DIFFUSION_MODEL wrappers placed after this one
        # (EasyCache's, when the Multi-GPU Model node came first) run around it on the host, as they would
        # around the model's own forward.
        def innermost(*inner_args, **inner_kwargs):
            return self._split(executor, functools.partial(executor.original, *inner_args, **inner_kwargs),
                               inner_args, inner_kwargs)

        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            innermost, executor.class_obj, inner).execute(*args, **kwargs)

    def _split(self, executor, stock, args, kwargs):
        """The call on the pool; `stock()` (with the call's arguments) computes it on the host instead."""
        # ComfyUI hands the arguments positionally, in the order of the model class's own signature.
        named = comfy_dit.name_arguments(executor.original, args, kwargs)
        transformer_options = named.get("transformer_options") or {}
        model = executor.class_obj
        family = comfy_dit.recognise(model)
        reason = (_run_reason(transformer_options) or (comfy_dit.unsupported_reason(model) if family is None else None)
                  or host_reason(transformer_options[KEY], model))
        run = transformer_options.get(KEY, {})
        pool = None
        if reason is None:
            pool, reason = _pool_of(run, self.config.devices)
        if reason is not None:
            self._stock(reason)
            return stock()
        comfy.model_management.throw_exception_if_processing_interrupted()
        (x_name, x), (t_name, timesteps) = list(named.items())[:2]  # every family's first two: latents, timesteps
        rest = {name: value for name, value in named.items() if name not in (x_name, t_name)}
        context = rest.pop("context", None)
        rest["transformer_options"] = comfy_dit.portable_options(transformer_options)
        chunks = transformer_options.get("cond_or_uncond", [])
        guided = sorted(chunks) == [0, 1]
        call = ModelCall(x, timesteps, context, rest, branches=2 if guided else 1, index=RUNTIME.call_index(run["id"]),
                         step=_step_of(transformer_options), job=run["id"],
                         stream=(tuple(str(u) for u in transformer_options.get("uuids", ())), tuple(chunks)),
                         shared=family.shared | {"transformer_options"})
        key = fingerprint(family.wire, run)
        RUNTIME.watch(pool, key, run["base_model"], run["weights"])
        started = time.perf_counter()
        try:  # the one hand-over: the engine rejoins, starts the pool, carries patches and ships the model
            result = ParallelExecutor(pool, self.config).run(model, family.wire, call, key, recipe_of(run, model),
                                                             needs_split=True)
        except (CannotCarry, PoolUnavailable) as exc:  # refusals, said once: the model or a patch cannot travel, or
            self._stock(str(exc))  # one device is left, or none answers (a worker's failure fails the run instead)
            return stock()
        RUNTIME.record_call(run["id"], list(pool.devices), result.mesh, time.perf_counter() - started,
                            result.compute_s, result.extra)
        return result.out


class ReachUnhookedModel:
    """APPLY_MODEL: for a family whose forward has no DIFFUSION_MODEL hook (models/comfy_dit.py: hooked=False),
    the BaseModel's diffusion model is stood in for during the call by `_Hooked`, which hands each call to the
    PoolForward as the hook would; the real model is back when the call returns (or fails)."""

    def __init__(self, forward: PoolForward):
        self.forward = forward

    def __call__(self, executor, *args, **kwargs):
        base = executor.class_obj
        model = getattr(base, "diffusion_model", None)
        family = comfy_dit.recognise(model)
        if family is None or family.hooked:
            return executor(*args, **kwargs)
        base._modules["diffusion_model"] = _Hooked(model, self.forward)
        try:
            return executor(*args, **kwargs)
        finally:
            base._modules["diffusion_model"] = model


class _Hooked(torch.nn.Module):
    """A diffusion model whose calls go through `forward` (a DIFFUSION_MODEL wrapper); every attribute read is the
    model's own."""

    def __init__(self, model, forward: PoolForward):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_wrapper", forward)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args, **kwargs):
        return self._wrapper(_DirectCall(self._modules["model"]), *args, **kwargs)


class _DirectCall:
    """What a DIFFUSION_MODEL wrapper expects of its executor, for a model called directly."""

    def __init__(self, model):
        self.class_obj, self.original = model, model.forward

    def __call__(self, *args, **kwargs):
        return self.class_obj(*args, **kwargs)
