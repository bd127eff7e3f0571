"""Writes tiny quantized diffusion-model files in the formats people download: Comfy-Org's `*_fp8_scaled`
checkpoints (read by ComfyUI's own UNETLoader) and GGUF (read by city96/ComfyUI-GGUF's UnetLoaderGGUF).

Run with ComfyUI's checkout as the working directory: `python write_quantized.py MODELS_DIR` (the base's
models/). Each file holds the tiny Flux or Wan 2.1 model of write_families.py (the same config and seeded
weights, fixture_nodes/families.py), quantized:

- `tiny_<family>_fp8_scaled.safetensors`: the layout of Comfy-Org's published `_fp8_scaled` files: a
  `scaled_fp8` marker (an empty float8_e4m3fn tensor, as ComfyUI itself used to save it; two elements would
  ask for full-precision matmuls) and, for each quantized Linear layer, its weight in float8_e4m3fn with a
  float32 per-tensor `<layer>.scale_weight` (weight = fp8 * scale). Some published files also carry
  `<layer>.scale_input`, which ComfyUI drops when it is 1.0; these leave it out. ComfyUI
  (comfy.utils.convert_old_quants, called by comfy.sd.load_diffusion_model_state_dict before model detection)
  rewrites that into the per-layer format below, so comfy.model_detection.model_config_from_unet sets
  model_config.quant_config and comfy.ops.pick_operations builds the model with mixed_precision_ops().
- `tiny_<family>_fp8_comfy_quant.safetensors`: the per-layer format that ComfyUI's mixed precision ops save
  (and read): `<layer>.comfy_quant` (a uint8 tensor holding the JSON {"format": "float8_e4m3fn"}) and
  `<layer>.weight_scale`; comfy.utils.detect_layer_quantization finds it. (ComfyUI reads the same per-layer
  configuration from a `_quantization_metadata` safetensors header too.)
- `tiny_<family>_Q8_0.gguf` and `tiny_<family>_F16.gguf`: GGUF files as ComfyUI-GGUF's tools write them
  (general.architecture "flux" / "wan", ComfyUI's own key names): tools/convert.py's F16 file (1-D and tiny
  tensors and Wan's modulation in F32, Wan's 5-D patch embedding added back in F32 as tools/fix_5d_tensors.py
  does), then llama-quantize's Q8_0 with the pack's lcpp.patch rules (the input, time, text and final layers
  stay F16).

Layers kept in higher precision, as those files keep them: norms, biases, modulation, the input embeddings
and the final layer (Flux: img_in, txt_in, time_in, vector_in, guidance_in, final_layer; Wan:
patch_embedding, text_embedding, time_embedding, time_projection, head), in bf16 in the safetensors files.

It also writes, under diffusion_models/reference/, for UNETLoader to load as the tests' oracles:
`<file stem>_dequantized.safetensors`, each file's weights dequantized to float32 as its loader dequantizes
them on a CPU (fp8 codes * scale; GGUF Q8_0 as ComfyUI-GGUF does by default: the fp16 block scale times the
int8 values in fp16), and `tiny_<family>_float32.safetensors`, the unquantized seeded weights.

Where this host cannot load a file as the tiny model (its model detection infers another config, no
convert_old_quants, no gguf package), it writes FILE.skip with the reason instead, for the test to skip with.
The names are module constants (no ComfyUI import at module level) so the tests can import them.
"""

import json
import os
import sys

SEED = 13  # write_families.SEED: the same seeded weights as tiny_flux / tiny_wan21_t2v
FAMILIES = ("flux", "wan21_t2v")
FP8_FORMATS = ("fp8_scaled", "fp8_comfy_quant")
GGUF_TYPES = ("Q8_0", "F16")
GGUF_ARCH = {"flux": "flux", "wan21_t2v": "wan"}  # ComfyUI-GGUF's loader.py IMG_ARCH_LIST names
REFERENCE_DIR = "reference"  # under diffusion_models/: UNETLoader lists these as "reference/NAME"

# Linear layers left unquantized (bf16 in the fp8 files, F16 in Q8_0): the embeddings and the final layer.
# For GGUF these are ComfyUI-GGUF's lcpp.patch rules for the "flux" and "wan" architectures.
KEEP_LAYERS = {"flux": ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
               "wan21_t2v": ("modulation", "patch_embedding.", "text_embedding.", "time_projection.",
                             "time_embedding.", "img_emb.", "head.")}
FP8_MAX = 448.0  # float8_e4m3fn


def fp8_file(family: str, fmt: str) -> str:
    return f"tiny_{family}_{fmt}.safetensors"


def gguf_file(family: str, qtype: str) -> str:
    return f"tiny_{family}_{qtype}.gguf"


def reference_file(name: str) -> str:
    """UNETLoader's name of the dequantized float32 copy of `name`."""
    return f"{REFERENCE_DIR}/{os.path.splitext(name)[0]}_dequantized.safetensors"


def unquantized_file(family: str) -> str:
    """UNETLoader's name of the unquantized float32 file of the same seeded weights."""
    return f"{REFERENCE_DIR}/tiny_{family}_float32.safetensors"


def all_files() -> list:
    return ([fp8_file(f, fmt) for f in FAMILIES for fmt in FP8_FORMATS]
            + [gguf_file(f, q) for f in FAMILIES for q in GGUF_TYPES])


# --- everything below runs inside ComfyUI's checkout ---

def _tiny_model(family: str):
    """The tiny model's diffusion model, exactly as write_families.py builds it (float32 seeded weights)."""
    from fixture_nodes import _seeded, families  # this script's folder is on sys.path

    return families.fill_buffers(_seeded(families.model_config(family).get_model({}), SEED), SEED).diffusion_model


def _quantized_layers(model, family: str) -> set:
    """The Linear layers the files quantize: every torch.nn.Linear but the kept ones."""
    import torch

    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(keep in name + "." for keep in KEEP_LAYERS[family])}


def _fp8(weight):
    """Per-tensor float8_e4m3fn: (fp8 codes, float32 scale) with weight ~= codes * scale."""
    import torch

    scale = (weight.abs().max().float() / FP8_MAX).clamp(min=1e-12)
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_state(model, family: str, fmt: str) -> tuple:
    """(the file's tensors, the float32 dequantized state dict): quantized layers in fp8 with their scale,
    everything else in bf16."""
    import torch

    layers = _quantized_layers(model, family)
    tensors, dequantized = {}, {}
    for key, value in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if layer in layers and key.endswith(".weight"):
            codes, scale = _fp8(value)
            tensors[key] = codes
            dequantized[key] = codes.float() * scale
            if fmt == "fp8_scaled":
                tensors[layer + ".scale_weight"] = scale
            else:
                tensors[layer + ".weight_scale"] = scale
                tensors[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                               dtype=torch.uint8)
        else:
            tensors[key] = value.to(torch.bfloat16).contiguous()
            dequantized[key] = tensors[key].float()
    if fmt == "fp8_scaled":
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # the marker, as ComfyUI saved it
    return tensors, dequantized


def _gguf_type(key: str, value, family: str, qtype: str):
    """The GGML type ComfyUI-GGUF's tools give this tensor (convert.py for F16, then llama-quantize)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if value.dim() <= 1 or value.numel() <= 1024 or (family == "wan21_t2v" and ".modulation" in key) \
            or value.dim() > 4:
        return types.F32
    if qtype == "F16" or not key.endswith(".weight") or any(keep in key for keep in KEEP_LAYERS[family]) \
            or value.shape[-1] % 32:  # Q8_0 blocks hold 32 values of a row
        return types.F16
    return types.Q8_0


def write_gguf(model, family: str, qtype: str, path: str) -> dict:
    """Writes the GGUF file; returns the float32 dequantized state dict."""
    import gguf
    import numpy
    import torch

    writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCH[family])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    dequantized = {}
    for key, value in model.state_dict().items():
        ggml_type = _gguf_type(key, value, family, qtype)
        data = gguf.quants.quantize(value.float().numpy(), ggml_type)
        writer.add_tensor(key, data, raw_dtype=ggml_type)
        if ggml_type == gguf.GGMLQuantizationType.Q8_0:
            # as ComfyUI-GGUF dequantizes by default (dequant_dtype "default"): each block's fp16 scale times
            # its 32 int8 values, computed in fp16 (one rounding of the exact product), then float32
            block_bytes = gguf.GGML_QUANT_SIZES[ggml_type][1]
            blocks = torch.from_numpy(numpy.ascontiguousarray(data)).reshape(-1, block_bytes)
            values = blocks[:, :2].contiguous().view(torch.float16) * blocks[:, 2:].contiguous().view(torch.int8)
            dequantized[key] = values.float().reshape(value.shape)
        else:  # F16 and F32: exact in float32
            dequantized[key] = torch.from_numpy(numpy.ascontiguousarray(
                gguf.quants.dequantize(data, ggml_type), dtype=numpy.float32)).reshape(value.shape)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


def _detection_problem(family: str, state: dict, quantized: bool):
    """Why this host's UNETLoader would not load `state` (ComfyUI's key layout) as the fixture's model, or None."""
    import comfy.model_detection
    import comfy.utils
    from fixture_nodes import families

    if quantized:
        if not hasattr(comfy.utils, "convert_old_quants"):
            return "this ComfyUI has no comfy.utils.convert_old_quants (it reads fp8_scaled files another way)"
        state, _ = comfy.utils.convert_old_quants(dict(state), "", metadata={})
    detected = comfy.model_detection.model_config_from_unet(state, "")
    expected_class, unet_config = families.FAMILIES[family][:2]
    if detected is None or type(detected).__name__ != expected_class:
        return f"this ComfyUI detects {type(detected).__name__ if detected else 'no model'} in the tiny {family} file"
    wrong = {k: (v, detected.unet_config.get(k)) for k, v in unet_config.items()
             if not (list(v) == list(detected.unet_config.get(k) or ()) if isinstance(v, (list, tuple))
                     else v == detected.unet_config.get(k))}
    if wrong:
        return (f"this ComfyUI's model detection infers another {expected_class} config from the tiny {family} "
                f"file (fixture value, detected value): {wrong}")
    if quantized and not getattr(detected, "quant_config", None):
        return "this ComfyUI's model detection sets no quant_config for the file (no mixed precision operations)"
    return None


def _skip(path: str, reason: str) -> None:
    with open(path + ".skip", "w") as out:
        out.write(reason)


def write_family(family: str, out_dir: str) -> None:
    from safetensors.torch import save_file

    model = _tiny_model(family)
    os.makedirs(os.path.join(out_dir, REFERENCE_DIR), exist_ok=True)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()},
              os.path.join(out_dir, unquantized_file(family)))
    for fmt in FP8_FORMATS:
        path = os.path.join(out_dir, fp8_file(family, fmt))
        tensors, dequantized = fp8_state(model, family, fmt)
        problem = _detection_problem(family, tensors, quantized=True)
        if problem:
            _skip(path, problem)
            continue
        save_file(tensors, path)
        save_file(dequantized, os.path.join(out_dir, reference_file(fp8_file(family, fmt))))
    for qtype in GGUF_TYPES:
        path = os.path.join(out_dir, gguf_file(family, qtype))
        try:
            import gguf  # noqa: F401
        except ImportError:
            _skip(path, "the gguf package is not installed in the Python that runs ComfyUI (ComfyUI-GGUF's "
                        "requirements.txt: pip install gguf)")
            continue
        problem = _detection_problem(family, model.state_dict(), quantized=False)
        if problem:
            _skip(path, problem)
            continue
        dequantized = write_gguf(model, family, qtype, path)
        save_file(dequantized, os.path.join(out_dir, reference_file(gguf_file(family, qtype))))


def main(out_dir: str) -> None:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: this machine may have no GPU
    os.makedirs(out_dir, exist_ok=True)
    for family in FAMILIES:
        write_family(family, out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
