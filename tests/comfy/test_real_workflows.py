"""Real workflows: what people load and patch, each run with the stock sampler and with the Multi-GPU one.

Every pattern (PATTERNS: a row of the README's compatibility table) either runs split on the pool and equals the
stock KSampler within 1e-4 of scale, with the pool used and no stock-path line, or takes the stock path with its
one sentence and still equals stock. A pattern that changes the output is also checked to change it (stock with
it against stock without it), so a patch silently dropped on the workers fails. Models: the tiny Flux and Wan 2.1
files loaded by the stock UNETLoader (write_families.py), the tiny SD1 UNet for the UNet-only patches, and the
quantized files of write_quantized.py through their stock loaders. A node this host lacks, or a third-party pack
not installed (TANDEM_TEST_PACKS), skips its pattern with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest

STEPS = 4
LORA_FILES = {"flux": "tiny_flux_lora.safetensors", "wan21_t2v": "tiny_wan_lora.safetensors"}  # conftest.loras


@dataclass(frozen=True)
class Pattern:
    """A workflow pattern: `build(sampler, prefix, strategy)` gives its graph with the stock or Multi-GPU sampler;
    `stock_path`: the sentence of a pattern that takes the stock path (None: it splits); `nodes`: the node
    classes it needs; `matters`: stock with the pattern differs from stock without it (`plain`)."""

    build: Callable
    stock_path: str | None = None
    nodes: tuple = ()
    matters: bool = True
    plain: Callable | None = None
    calls: int | None = None  # model calls on the pool per run, where the pattern adds some
    runs: int = 1  # sampling runs (a sampler node each)
    pack: str | None = None  # the third-party pack it needs (conftest.THIRD_PARTY_PACKS)
    files: tuple = field(default_factory=tuple)


def _family(family="flux", from_file=True, steps=STEPS, **kw):
    def build(comfy, sampler, prefix, strategy):
        return comfy.family_workflow(sampler, prefix, strategy, family=family, from_file=from_file, steps=steps, **kw)
    return build


def _sd1(**kw):
    """The small SD1.5 file through the stock UNETLoader (the narrow fixture model barely reacts to PAG or FreeU)."""
    def build(comfy, sampler, prefix, strategy):
        return comfy.checkpoint_workflow(sampler, prefix, strategy, steps=STEPS, **kw)
    return build


def _patched(base, *patches):
    """`base` with model-patching nodes (class, inputs) chained between its model and its sampler."""
    def build(comfy, sampler, prefix, strategy):
        workflow = base(comfy, sampler, prefix, strategy)
        model = workflow["5"]["inputs"]["model"]
        for number, (class_type, inputs) in enumerate(patches, start=40):
            workflow[str(number)] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
            model = [str(number), 0]
        workflow["5"]["inputs"]["model"] = model
        return workflow
    return build


def _loader(base, **inputs):
    """`base` with other UNETLoader inputs (its weight dtype, another file)."""
    def build(comfy, sampler, prefix, strategy):
        workflow = base(comfy, sampler, prefix, strategy)
        workflow["1"]["inputs"].update(inputs)
        return workflow
    return build


def _gguf(base, name: str):
    """`base` with ComfyUI-GGUF's UnetLoaderGGUF loading `name` (write_quantized.py) instead of UNETLoader."""
    def build(comfy, sampler, prefix, strategy):
        workflow = base(comfy, sampler, prefix, strategy)
        workflow["1"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}
        return workflow
    return build


def _lora(base, family="flux", strength=1.0):
    return _patched(base, ("LoraLoaderModelOnly", {"lora_name": LORA_FILES[family], "strength_model": strength}))


def _guided(kind: str, family="flux"):
    """SamplerCustomAdvanced with a guider (CFGGuider, DualCFGGuider or BasicGuider); with a strategy the guider's
    model goes through the Multi-GPU Model node."""
    def build(comfy, sampler, prefix, strategy):
        workflow = comfy.family_workflow("KSampler", prefix, strategy, family=family, from_file=True, steps=STEPS)
        inputs = workflow["5"]["inputs"]
        model = inputs["model"]
        if strategy is not None:
            workflow["22"] = {"class_type": "TandemModel", "inputs": {"model": model, "settings": inputs["settings"]}}
            model = ["22", 0]
        guiders = {
            "CFGGuider": {"model": model, "positive": inputs["positive"], "negative": inputs["negative"], "cfg": 4.0},
            "DualCFGGuider": {"model": model, "cond1": inputs["positive"], "cond2": ["12", 0],
                              "negative": inputs["negative"], "cfg_conds": 4.0, "cfg_cond2_negative": 2.0,
                              "style": "regular"},
            "BasicGuider": {"model": model, "conditioning": inputs["positive"]},
        }
        workflow["12"] = {"class_type": "TandemTestFamilyConditioning", "inputs": {"seed": 3, "family": family}}
        workflow.update({
            "23": {"class_type": kind, "inputs": guiders[kind]},
            "24": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "25": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple",
                                                              "steps": STEPS, "denoise": 1.0}},
            "26": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
            "5": {"class_type": "SamplerCustomAdvanced",
                  "inputs": {"noise": ["26", 0], "guider": ["23", 0], "sampler": ["24", 0], "sigmas": ["25", 0],
                             "latent_image": inputs["latent_image"]}},
        })
        return workflow
    return build


def _advanced(family="flux"):
    """Two KSampler (Advanced) passes: steps [0, 2) keep their leftover noise, [2, end) add none."""
    def build(comfy, sampler, prefix, strategy):
        stock = "KSamplerAdvanced" if strategy is None else "TandemKSamplerAdvanced"
        workflow = comfy.family_workflow("KSampler", prefix, strategy, family=family, from_file=True, steps=STEPS)
        inputs = dict(workflow["5"]["inputs"])
        common = {k: v for k, v in inputs.items() if k not in ("seed", "denoise", "latent_image")}
        common["noise_seed"] = inputs["seed"]
        workflow["5"] = {"class_type": stock, "inputs": {**common, "latent_image": inputs["latent_image"],
                                                         "add_noise": "enable", "start_at_step": 0, "end_at_step": 2,
                                                         "return_with_leftover_noise": "enable"}}
        workflow["21"] = {"class_type": stock, "inputs": {**common, "latent_image": ["5", 0], "add_noise": "disable",
                                                          "start_at_step": 2, "end_at_step": 10000,
                                                          "return_with_leftover_noise": "disable"}}
        workflow["6"]["inputs"]["samples"] = ["21", 0]
        return workflow
    return build


def _masked(base):
    """`base` denoising under a soft noise mask (SetLatentNoiseMask), what DifferentialDiffusion reads."""
    def build(comfy, sampler, prefix, strategy):
        workflow = base(comfy, sampler, prefix, strategy)
        workflow["27"] = {"class_type": "SolidMask", "inputs": {"value": 0.6, "width": 64, "height": 64}}
        workflow["28"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["27", 0]}}
        workflow["5"]["inputs"]["latent_image"] = ["28", 0]
        return workflow
    return build


def _with_model_node_first(base, cache: tuple):
    """`base` with the Multi-GPU Model node placed BEFORE a cache node (its DIFFUSION_MODEL wrapper is then the
    outer one); the sampler is the stock KSampler either way."""
    def build(comfy, sampler, prefix, strategy):
        workflow = base(comfy, "KSampler", prefix, strategy)
        settings = workflow["5"]["inputs"].pop("settings", None)
        model = workflow["5"]["inputs"]["model"]
        if strategy is not None:
            workflow["32"] = {"class_type": "TandemModel", "inputs": {"model": model, "settings": settings}}
            model = ["32", 0]
        workflow["33"] = {"class_type": cache[0], "inputs": {"model": model, **cache[1]}}
        workflow["5"]["inputs"]["model"] = ["33", 0]
        return workflow
    return build


FLUX, WAN, SD1 = _family("flux"), _family("wan21_t2v"), _sd1()
CACHE = {"reuse_threshold": 1.0, "start_percent": 0.0, "end_percent": 1.0, "verbose": False}
REPLACED = "something replaced methods of the model object"
PATTERNS = {
    "default weights": Pattern(FLUX, matters=False),
    "fp8_e4m3fn weights": Pattern(_loader(FLUX, weight_dtype="fp8_e4m3fn"), matters=False),
    "fp8_e4m3fn_fast weights": Pattern(_loader(FLUX, weight_dtype="fp8_e4m3fn_fast"), matters=False),
    "LoRA": Pattern(_lora(FLUX), plain=FLUX, nodes=("LoraLoaderModelOnly",)),
    "LoRA on fp8 weights": Pattern(_lora(_loader(FLUX, weight_dtype="fp8_e4m3fn")),
                                   plain=_loader(FLUX, weight_dtype="fp8_e4m3fn")),
    "ModelSamplingFlux": Pattern(_patched(FLUX, ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5,
                                                                       "width": 64, "height": 64}))),
    "ModelSamplingSD3": Pattern(_patched(WAN, ("ModelSamplingSD3", {"shift": 3.0})), plain=WAN),  # Wan's own: 8
    "CFGNorm": Pattern(_patched(FLUX, ("CFGNorm", {"strength": 0.5}))),
    "CFGZeroStar": Pattern(_patched(FLUX, ("CFGZeroStar", {}))),
    "APG": Pattern(_patched(FLUX, ("APG", {"eta": 0.5, "norm_threshold": 2.0, "momentum": 0.0}))),
    "RescaleCFG": Pattern(_patched(FLUX, ("RescaleCFG", {"multiplier": 0.7}))),
    "Mahiro": Pattern(_patched(FLUX, ("Mahiro", {}))),
    "DifferentialDiffusion": Pattern(_masked(_patched(FLUX, ("DifferentialDiffusion", {}))), plain=_masked(FLUX)),
    "SamplerCustomAdvanced + CFGGuider": Pattern(_guided("CFGGuider"), matters=False),
    "SamplerCustomAdvanced + DualCFGGuider": Pattern(_guided("DualCFGGuider"), matters=False),
    "SamplerCustomAdvanced + BasicGuider": Pattern(_guided("BasicGuider"), matters=False),
    "KSamplerAdvanced, two passes": Pattern(_advanced(), matters=False, runs=2),
    "4 steps at cfg 1, ulysses": Pattern(_family("flux", cfg=1.0), matters=False),
    "4 steps at cfg 1, auto": Pattern(_family("flux", cfg=1.0), matters=False),
    "SkipLayerGuidanceDiT": Pattern(_patched(FLUX, ("SkipLayerGuidanceDiT", {
        "double_layers": "0", "single_layers": "0", "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0,
        "rescaling_scale": 0.0})), calls=2 * STEPS),
    "SkipLayerGuidanceDiT, ulysses": Pattern(_patched(FLUX, ("SkipLayerGuidanceDiT", {
        "double_layers": "0", "single_layers": "0", "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0,
        "rescaling_scale": 0.0})), calls=2 * STEPS),
    "SkipLayerGuidanceDiT, tensor": Pattern(_patched(FLUX, ("SkipLayerGuidanceDiT", {
        "double_layers": "0", "single_layers": "0", "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0,
        "rescaling_scale": 0.0})), calls=2 * STEPS),
    "PerturbedAttentionGuidance": Pattern(_patched(SD1, ("PerturbedAttentionGuidance", {"scale": 3.0})),
                                          plain=SD1, calls=2 * STEPS),
    "FreeU_V2": Pattern(_patched(SD1, ("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2})), plain=SD1),
    "EasyCache": Pattern(_patched(_family("flux", steps=10), ("EasyCache", CACHE)), plain=_family("flux", steps=10)),
    "EasyCache after the Multi-GPU Model node": Pattern(
        _with_model_node_first(_family("flux", steps=10), ("EasyCache", CACHE)), plain=_family("flux", steps=10)),
    "LazyCache": Pattern(_patched(_family("flux", steps=10), ("LazyCache", CACHE)), plain=_family("flux", steps=10)),
    "TorchCompileModel": Pattern(_patched(FLUX, ("TorchCompileModel", {"backend": "inductor"})), matters=False),
    # a weight format changes the weights, not what must travel: `matters` is a patch's check (see Pattern)
    "fp8_scaled checkpoint (Flux)": Pattern(_loader(FLUX, unet_name="tiny_flux_fp8_scaled.safetensors"),
                                            matters=False),
    "fp8_scaled checkpoint (Wan 2.1)": Pattern(_loader(WAN, unet_name="tiny_wan21_t2v_fp8_scaled.safetensors"),
                                               matters=False),
    "comfy_quant checkpoint (Flux)": Pattern(_loader(FLUX, unet_name="tiny_flux_fp8_comfy_quant.safetensors"),
                                             matters=False),
    "LoRA on an fp8_scaled checkpoint": Pattern(_lora(_loader(FLUX, unet_name="tiny_flux_fp8_scaled.safetensors")),
                                                plain=_loader(FLUX, unet_name="tiny_flux_fp8_scaled.safetensors")),
    "GGUF Q8_0 (Flux)": Pattern(_gguf(FLUX, "tiny_flux_Q8_0.gguf"), pack="ComfyUI-GGUF", matters=False),
    "GGUF F16 (Flux)": Pattern(_gguf(FLUX, "tiny_flux_F16.gguf"), pack="ComfyUI-GGUF", matters=False),
    "GGUF Q8_0 (Wan 2.1)": Pattern(_gguf(WAN, "tiny_wan21_t2v_Q8_0.gguf"), pack="ComfyUI-GGUF", matters=False),
    "GGUF F16 (Wan 2.1)": Pattern(_gguf(WAN, "tiny_wan21_t2v_F16.gguf"), pack="ComfyUI-GGUF", matters=False),
    "LoRA on GGUF Q8_0": Pattern(_lora(_gguf(FLUX, "tiny_flux_Q8_0.gguf")), pack="ComfyUI-GGUF",
                                 plain=_gguf(FLUX, "tiny_flux_Q8_0.gguf")),
    "TeaCache (Wan 2.1)": Pattern(_patched(WAN, ("TeaCache", {
        "model_type": "wan2.1_t2v_1.3B_ret_mode", "rel_l1_thresh": 0.3, "start_percent": 0.0, "end_percent": 1.0,
        "cache_device": "cpu"})), stock_path=REPLACED, pack="ComfyUI-TeaCache", plain=WAN),
    "MagCache (Wan 2.1)": Pattern(_patched(WAN, ("MagCache", {
        "model_type": "wan2.1_t2v_1.3B", "magcache_thresh": 0.24, "retention_ratio": 0.1, "magcache_K": 5,
        "start_step": 0, "end_step": -1})), stock_path=REPLACED, pack="ComfyUI-MagCache", plain=WAN),
    "First Block Cache (WaveSpeed, SD1.5)": Pattern(_patched(SD1, ("ApplyFBCacheOnModel", {
        "object_to_patch": "diffusion_model", "residual_diff_threshold": 0.5, "start": 0.0, "end": 1.0,
        "max_consecutive_cache_hits": -1})), stock_path=REPLACED, pack="Comfy-WaveSpeed", plain=SD1),
}
STRATEGY = {"4 steps at cfg 1, ulysses": "ulysses", "4 steps at cfg 1, auto": "auto",
            "SkipLayerGuidanceDiT, ulysses": "ulysses", "SkipLayerGuidanceDiT, tensor": "tensor"}


def _skip_unless_present(server, comfy_base, pattern: Pattern, workflow: dict) -> None:
    for node in {n["class_type"] for n in workflow.values()}:
        if not server.get(f"/object_info/{node}"):
            pytest.skip(f"this ComfyUI has no {node} node")
    for node in workflow.values():
        name = node["inputs"].get("unet_name")
        skip = comfy_base / "models" / "diffusion_models" / f"{name}.skip"
        if name and skip.exists():
            pytest.skip(skip.read_text())


def check_pattern(server, comfy, comfy_base, name: str, pattern: Pattern, strategy: str = "cfg") -> None:
    key = "rw_" + "".join(c if c.isalnum() else "_" for c in name.lower())
    stock_graph = pattern.build(comfy, "KSampler", f"{key}_stock", None)
    tandem_graph = pattern.build(comfy, "TandemKSampler", f"{key}_tandem", strategy)
    _skip_unless_present(server, comfy_base, pattern, tandem_graph)
    comfy.run_checked(server, stock_graph)
    if pattern.stock_path is None:
        with server.on_the_pool(pattern.runs):
            comfy.run_checked(server, tandem_graph)
        if pattern.calls is not None:
            assert server.get("/tandem/status")["last_run"]["calls"] == pattern.calls
    else:
        runs, log_before = server.get("/tandem/status")["runs"], server.log_size()
        comfy.run_checked(server, tandem_graph)
        said = server.log_since(log_before)
        assert f"using the stock sampling path: {pattern.stock_path}" in said, said[-2000:]
        assert server.get("/tandem/status")["runs"] == runs, (server.get("/tandem/status")["last_run"], said[-3000:])
    stock, tandem = server.latent(f"{key}_stock"), server.latent(f"{key}_tandem")
    comfy.assert_same_latents(tandem, stock)
    if pattern.matters:
        plain_build = pattern.plain or FLUX
        comfy.run_checked(server, plain_build(comfy, "KSampler", f"{key}_plain", None))
        plain = server.latent(f"{key}_plain")
        assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max(), \
            f"{name} does not change the stock output here: the test would not see it dropped"


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern(comfy_server, comfy, comfy_base, loras, need_pack, name):
    if PATTERNS[name].pack:
        need_pack(PATTERNS[name].pack, comfy_server)
    check_pattern(comfy_server, comfy, comfy_base, name, PATTERNS[name], STRATEGY.get(name, "cfg"))


def test_quantized_weights_stay_quantized_on_the_workers(comfy_server, comfy, comfy_base, need_pack):
    """A GGUF Q8_0 model's weights on each worker take about its file's bytes (its tensors as stored), not their
    float32 size; /tandem/status says so per worker."""
    need_pack("ComfyUI-GGUF", comfy_server)
    check_pattern(comfy_server, comfy, comfy_base, "GGUF Q8_0 (Flux)", PATTERNS["GGUF Q8_0 (Flux)"])
    file_bytes = (comfy_base / "models" / "diffusion_models" / "tiny_flux_Q8_0.gguf").stat().st_size
    float32_bytes = (comfy_base / "models" / "diffusion_models" / "reference" /
                     "tiny_flux_float32.safetensors").stat().st_size
    held = comfy_server.get("/tandem/status")["model_weights_bytes"]
    assert len(held) == 2 and all(0.8 * file_bytes < b < 1.3 * file_bytes for b in held), (held, file_bytes)
    assert all(b < 0.5 * float32_bytes for b in held), (held, float32_bytes)
