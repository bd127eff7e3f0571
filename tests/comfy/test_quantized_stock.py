"""Quantized model files through the stock loaders: Comfy-Org's fp8_scaled format and ComfyUI's newer per-layer
comfy_quant format (ComfyUI's own UNETLoader), and GGUF Q8_0 / F16 (city96's ComfyUI-GGUF, UnetLoaderGGUF): the
tiny Flux and Wan 2.1 models of write_quantized.py -> the stock KSampler -> SaveLatent.

For each file:
- the loader built what the file claims: the fixture family's model config class and unet_config, and every
  Linear layer of the diffusion model is ComfyUI's MixedPrecisionOps.Linear (fp8 files; quantized layers hold
  fp8 QuantizedTensor weights, and the log says "Using mixed precision operations") or ComfyUI-GGUF's
  GGMLOps.Linear holding GGMLTensor weights of the file's types;
- exact oracle: the same weights dequantized to float32 (reference/<file>_dequantized.safetensors) through
  UNETLoader give the same latent, within the suite's RTOL_OF_SCALE. On a CPU ComfyUI has no fp8 matmul
  ("emulated ops" in its log): MixedPrecisionOps dequantizes each weight (codes * scale) to the float32
  compute dtype before torch's linear; ComfyUI-GGUF (dequant_dtype "default") turns F16 into float32 and Q8_0
  into its fp16 block scale times its int8 values, computed in fp16, then float32; write_quantized.py
  dequantizes the same way. So both runs multiply by the same float32 weights;
- closeness: the unquantized tiny model (the same seeded float32 weights, reference/tiny_<family>_float32
  through UNETLoader) gives a latent within QUANTIZATION_BOUND[format] of its scale, and not the same latent
  (the file is quantized). The error comes from each format's weight rounding (relative error per weight:
  float8_e4m3fn's 3 mantissa bits up to 2^-4; Q8_0 up to half a step of 1/127 of the largest magnitude in its
  32-value block; F16 2^-11; bf16 for the kept layers 2^-9) carried through the random tiny model's 3 guided
  steps; the bounds are about 3x the error measured on v0.24 (listed beside each), far below what a wrong scale
  or another model gives (the same tiny model with another seed differs by 2.2x (Flux) and 4.7x (Wan) the
  latent's scale). For comparison, write_families.py's bf16 files measure 0.0064 (Flux) and 0.0047 (Wan).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("write_quantized", Path(__file__).with_name("write_quantized.py"))
write_quantized = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_quantized)  # its names only: it imports ComfyUI inside its functions

STEPS, CFG = 3, 4.0
# max |quantized - unquantized| / max(1, max |unquantized|) of the stock KSampler's latents; measured on v0.24
# (Flux, Wan): fp8 0.048, 0.041; Q8_0 0.011, 0.0091; F16 0.00087, 0.00037
QUANTIZATION_BOUND = {"fp8_scaled": 0.15, "fp8_comfy_quant": 0.15, "Q8_0": 0.03, "F16": 0.003}


def _format(name: str) -> str:
    return next(fmt for fmt in QUANTIZATION_BOUND if f"_{fmt}." in name)


def _family(name: str) -> str:
    return next(family for family in write_quantized.FAMILIES if name.startswith(f"tiny_{family}_"))


def _loader(name: str) -> dict:
    if name.endswith(".gguf"):
        return {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def _workflow(comfy, prefix: str, family: str, model: dict, describe: bool = False) -> dict:
    """The family's stock KSampler graph (conftest.family_workflow: seeded prompts and empty latent) on `model`."""
    workflow = comfy.family_workflow("KSampler", prefix, None, family=family, cfg=CFG, steps=STEPS)
    workflow["1"] = model
    if describe:
        workflow["40"] = {"class_type": "TandemTestDescribeModel", "inputs": {"model": ["1", 0], "family": family}}
    return workflow


@pytest.fixture(scope="module")
def unquantized(comfy_server, comfy):
    """family -> the stock KSampler's latent with the unquantized tiny model's float32 file."""
    latents = {}

    def latent(family: str):
        if family not in latents:
            model = _loader(write_quantized.unquantized_file(family))
            comfy.run_checked(comfy_server, _workflow(comfy, f"quant_unquantized_{family}", family, model))
            latents[family] = comfy_server.latent(f"quant_unquantized_{family}")
        return latents[family]
    return latent


def _check_description(description: dict, name: str, log: str) -> None:
    assert description["model_config"] == description["expected_config"], description
    assert not description["config_mismatch"], f"{name} loads with another config: {description['config_mismatch']}"
    linears = description["linears"]
    if name.endswith(".gguf"):
        qtype = _format(name)
        assert all(kind.startswith("GGMLOps.Linear GGMLTensor:") for kind in linears), linears
        assert any(kind.endswith(f":{qtype}") for kind in linears), f"no {qtype} weight in {linears}"
    else:
        assert "Using mixed precision operations" in log, log[-3000:]
        assert all(kind.startswith("mixed_precision_ops.<locals>.MixedPrecisionOps.Linear ") for kind in linears), \
            linears
        assert any("QuantizedTensor:TensorCoreFP8" in kind for kind in linears), f"no fp8 weight in {linears}"


@pytest.mark.parametrize("name", write_quantized.all_files())
def test_quantized_file_through_the_stock_loader(comfy_server, comfy_base, comfy, need_pack, unquantized, name):
    skip = comfy_base / "models" / "diffusion_models" / (name + ".skip")
    if skip.exists():
        pytest.skip(skip.read_text())
    if name.endswith(".gguf"):
        need_pack("ComfyUI-GGUF", comfy_server)
    family, stem = _family(name), name.rsplit(".", 1)[0]

    log_before = comfy_server.log_size()
    result = comfy.run_checked(comfy_server, _workflow(comfy, f"quant_{stem}", family, _loader(name), describe=True))
    _check_description(result["outputs"]["40"]["description"][0], name, comfy_server.log_since(log_before))
    quantized = comfy_server.latent(f"quant_{stem}")

    reference = _loader(write_quantized.reference_file(name))
    comfy.run_checked(comfy_server, _workflow(comfy, f"quant_reference_{stem}", family, reference))
    dequantized = comfy_server.latent(f"quant_reference_{stem}")
    comfy.assert_same_latents(quantized, dequantized)

    plain = unquantized(family)
    assert quantized.shape == plain.shape
    error = (quantized - plain).abs().max().item() / max(1.0, plain.abs().max().item())
    print(json.dumps({"file": name, "max_difference_to_dequantized": (quantized - dequantized).abs().max().item(),
                      "relative_error_to_unquantized": error}))
    assert 0 < error <= QUANTIZATION_BOUND[_format(name)], \
        f"{name}: max |quantized - unquantized| is {error:.3g} of the latent's scale"
