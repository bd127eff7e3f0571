"""GPU predictions on paper: the cost model's inputs (model.Inputs) for named full-size models on named GPUs,
from counted figures only; nothing is timed and no weight is loaded.

Counted: each model's FLOPs per call by torch's FlopCounterMode running the real-size architecture on the
`meta` device (shapes only, no memory); for UNets each layer's FLOPs and what crosses each cut (asyncdiff's
stages), from the same run; one token-mixing attention's FLOPs, 4 L^2 W per row (q k^T and the weighted sum of
v, 2 L^2 W each); the weights' bytes from the parameter count in the model's dtype.
Published: each GPU's dense fp16/bf16 tensor throughput (GPUS, sources beside them). Stated: the fraction of it
a call reaches (EFFICIENCY). Time = FLOPs / (peak x efficiency), the same for the whole call, each layer and
the attention. The links are plan/links.py's profiles; the per-call host overhead is measure.py's CUDA
assumption. These are a model's predictions, never measurements. `python -m parallel_backend.plan.paper_doc`
writes them to docs/gpu-predictions.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..engine.oracle import sample_call
from .links import link_named
from .measure import HOST_OVERHEAD_S, call_shape
from .model import Inputs

TFLOPS = 1e12
GB = 1e9


@dataclass(frozen=True)
class Gpu:
    """A GPU's published dense fp16/bf16 tensor throughput (FP32 accumulate), FLOP/s, and its memory."""

    name: str
    peak_flops: float
    memory_bytes: int
    source: str


GPUS: dict[str, Gpu] = {gpu.name: gpu for gpu in (
    # NVIDIA Ada GPU architecture whitepaper, RTX 4090: peak FP16 / BF16 tensor TFLOPS with FP32 accumulate
    # 165.2 dense (330.4 with sparsity; 330.3 dense with FP16 accumulate). 24 GB GDDR6X.
    Gpu("RTX 4090", 165.2 * TFLOPS, 24 * GB, "NVIDIA Ada architecture whitepaper: 165.2 TFLOPS dense fp16/bf16 "
        "tensor, FP32 accumulate"),
    # NVIDIA A100 datasheet: BF16 / FP16 tensor core 312 TFLOPS dense (624 with sparsity), PCIe and SXM alike.
    Gpu("A100 80GB PCIe", 312 * TFLOPS, 80 * GB, "NVIDIA A100 datasheet: 312 TFLOPS dense bf16 tensor"),
    Gpu("A100 80GB SXM", 312 * TFLOPS, 80 * GB, "NVIDIA A100 datasheet: 312 TFLOPS dense bf16 tensor"),
    # NVIDIA H100 datasheet, SXM: BF16 tensor core 1,979 TFLOPS with sparsity -> 989 dense. 80 GB HBM3.
    Gpu("H100 SXM", 989 * TFLOPS, 80 * GB, "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 tensor with sparsity, "
        "989 dense"),
)}

# The fraction of the peak a one-device call reaches (model FLOPs utilisation), stated, not measured. DiTs are
# almost all large GEMMs and flash attention over thousands of tokens, which run near 60-70 % of the peak;
# norms, modulation and RoPE are memory-bound: 0.45 for the whole call. The doc checks it against xDiT's
# one-H100 Flux.1-dev figures (28 steps, whole pipeline): 6.71 s eager and 4.30 s compiled imply at least
# ~0.31 and ~0.49 of the counted FLOPs. SDXL's UNet spends a larger share in convolutions at 320 channels,
# group norms and narrow attention heads (64 wide), so less: 0.35 (no published one-device figure was checked).
EFFICIENCY = {"unet": 0.35, "dit": 0.45}


@dataclass(frozen=True)
class Scenario:
    """A named job: a full-size model (built on meta by `build`), its resolution, guidance branches (2: cfg > 1),
    the steps of a run, the kind of efficiency it gets and the hardware it is predicted on (GPU, link)."""

    name: str
    title: str
    build: str  # a function of this module: () -> a BenchModel on the meta device
    resolution: tuple[int, int]
    branches: int
    steps: int
    kind: str
    hardware: tuple[tuple[str, str], ...]
    source: str


DATACENTRE = (("A100 80GB PCIe", "pcie4x16"), ("A100 80GB SXM", "nvlink-a100"), ("H100 SXM", "nvlink-h100"))
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("sdxl-1024", "SDXL 1024x1024, cfg 7.5 (2 branches), 50 steps", "sdxl_meta", (1024, 1024), 2, 50,
             "unet", (("RTX 4090", "pcie4x16"), *DATACENTRE),
             "SDXL base 1.0's UNet config (parallel_backend/models/benchmodels.py SDXL_UNET, the bench's `sdxl`)"),
    Scenario("flux-dev-1024", "Flux.1-dev 1024x1024, guidance-distilled (cfg 1: one branch), 28 steps",
             "flux_dev_meta", (1024, 1024), 1, 28, "dit", DATACENTRE,
             "FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev transformer/config.json): 19 double + "
             "38 single blocks, 24 heads x 128, 64 input channels, T5 width 4096 (512 tokens), pooled 768, "
             "guidance embedding"),
    Scenario("wan14b-720p", "Wan 2.1 14B t2v 720x1280 x 81 frames, cfg 5 (2 branches), 50 steps", "wan14b_meta",
             (720, 1280), 2, 50, "dit", DATACENTRE,
             "Wan2.1-T2V-14B's transformer config (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json): 40 "
             "layers, 40 heads x 128, ffn 13824, 16 latent channels, patch (1, 2, 2), umT5 width 4096 "
             "(512 tokens)"),
)}

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_DEV_TEXT_TOKENS = 512  # FLUX.1-dev's T5 length (schnell's is 256)
FLUX_DEV_GUIDANCE = 3.5  # the pipeline's default distilled guidance
WAN_14B = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, patch_size=(1, 2, 2), cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_FRAMES = 81


def on_meta(cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(**config)` with its parameters on the meta device (shapes only), in `dtype`, for inference."""
    with torch.device("meta"):
        module = cls(**config)
    return module.to(dtype).eval().requires_grad_(False)


def sdxl_meta():
    from diffusers import UNet2DConditionModel

    from ..models.benchmodels import UNETS
    from ..models.benchmodels_base import BenchModel

    config, context, resolution, extras = UNETS["sdxl"]
    unet = on_meta(UNet2DConditionModel, dict(sample_size=resolution // 8, **config), torch.float16)
    return BenchModel("sdxl", unet, context, 8, resolution, extras)


def flux_dev_meta():
    from diffusers import FluxTransformer2DModel

    from ..models.benchmodels_dit import FluxBenchModel

    class FluxDev(FluxBenchModel):
        """flux-small's inputs plus the distilled guidance input Flux.1-dev takes per row."""

        def extras(self, rows, resolution=None):
            return {**super().extras(rows, resolution), "guidance": torch.full((rows,), FLUX_DEV_GUIDANCE)}

    module = on_meta(FluxTransformer2DModel, FLUX_DEV, torch.bfloat16)
    return FluxDev("flux-dev", module, (FLUX_DEV_TEXT_TOKENS, FLUX_DEV["joint_attention_dim"]), latent_factor=8,
                   default_resolution=1024, family="diffusers_dit:flux", patch=2)


def wan14b_meta():
    from diffusers import WanTransformer3DModel

    from ..models.benchmodels_dit import WAN_TEXT_TOKENS, WanBenchModel

    module = on_meta(WanTransformer3DModel, WAN_14B, torch.bfloat16)
    return WanBenchModel("wan-14b", module, (WAN_TEXT_TOKENS, WAN_14B["text_dim"]), latent_factor=8,
                         default_resolution="720x1280", family="diffusers_dit:wan", patch=2, frames=WAN_FRAMES)


@dataclass(frozen=True)
class Counted:
    """A scenario's counted figures. flops: {rows: FLOPs of one call}; attention_flops: one token-mixing
    attention of one row (4 L^2 W); layers: (name, FLOPs of one row) in order (UNets; () for DiTs);
    flop_ops: the whole call's FLOPs of one row per aten op, as the counter split them."""

    shape: object  # traffic.CallShape
    family: str
    flops: dict
    attention_flops: int
    layers: tuple = ()
    layer_weight_bytes: tuple = ()
    weight_bytes: int = 0
    parameters: int = 0
    activation_bytes_per_row: int = 0
    flop_ops: tuple = ()


def count_flops(run) -> tuple[int, dict]:
    """(total FLOPs, {aten op: FLOPs}) of `run()`, by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def _meta_call(model, rows: int, resolution):
    return sample_call(model, rows, resolution).to(torch.device("meta"))


def _call_flops(model, rows: int, resolution) -> tuple[int, dict]:
    from ..models import forward_for_family

    call = _meta_call(model, rows, resolution)
    with torch.inference_mode():
        return count_flops(lambda: forward_for_family(model.family)(model.module, call))


def count_layers(model, resolution) -> tuple[tuple, tuple, tuple]:
    """UNets: ((name, FLOPs of one row) per layer, bytes crossing the cut before each layer per row, each layer's
    weight bytes), from one meta run of models.stages' layers; ((), (), ()) for a family that has no stages."""
    from ..models.stage_families import adapter_for
    from ..models.stages import Activations, modules_of

    try:
        adapter = adapter_for(model.family)
    except ValueError:
        return (), (), ()
    call = _meta_call(model, 1, resolution)
    layers = adapter.layers(model.module)
    flops, crossing = [], []
    with torch.inference_mode():
        ctx = adapter.prepare(model.module, call, call.t)
        acts = Activations(call.x)
        for layer in layers:
            crossing.append(sum(t.numel() * t.element_size() for t in acts.tensors()))
            flops.append((layer.name, count_flops(lambda layer=layer: layer.run(ctx, acts))[0]))
    weights = tuple(sum(p.numel() * p.element_size() for m in modules_of([layer]) for p in m.parameters())
                    for layer in layers)
    return tuple(flops), tuple(crossing), weights


def attention_flops(tokens: int, width: int) -> int:
    """One attention of one row over `tokens` tokens of `width` (heads x head width): q k^T and the weighted sum
    of v, 2 L^2 W FLOPs each."""
    return 4 * tokens * tokens * width


@functools.lru_cache(maxsize=None)
def count(name: str) -> Counted:
    """The counted figures of scenario `name` (a few seconds: meta runs of the full-size model)."""
    scenario = scenario_named(name)
    model = globals()[scenario.build]()
    rows = scenario.branches
    shape = call_shape(model, scenario.resolution, rows)
    one, ops = _call_flops(model, 1, scenario.resolution)
    flops = {1: one} if rows == 1 else {1: one, rows: _call_flops(model, rows, scenario.resolution)[0]}
    layers, handover, layer_weights = count_layers(model, scenario.resolution)
    shape = replace(shape, handover_bytes=handover)
    params = list(model.module.parameters())
    return Counted(shape, model.family, flops, attention_flops(shape.tokens, shape.width), layers, layer_weights,
                   sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params),
                   model.memory_bytes(1, scenario.resolution), tuple(sorted(ops.items())))


def seconds(flops: float, gpu: Gpu, efficiency: float) -> float:
    """Time of `flops` on `gpu` at `efficiency` of its peak."""
    return flops / (gpu.peak_flops * check_efficiency(efficiency))


def check_efficiency(efficiency: float) -> float:
    if not (isinstance(efficiency, (int, float)) and 0 < efficiency <= 1):
        raise ValueError(f"efficiency {efficiency!r}: give the fraction of the peak a call reaches, in (0, 1]")
    return float(efficiency)


def scenario_named(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}") from None


def gpu_named(name: str) -> Gpu:
    try:
        return GPUS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown GPU {name!r}; choose one of: {', '.join(GPUS)}") from None


def paper_inputs(name: str, gpu: str, link: str, efficiency: float | None = None) -> Inputs:
    """model.Inputs of scenario `name` on `gpu`s joined by `link`, from counted FLOPs at `efficiency` (None: the
    scenario kind's EFFICIENCY)."""
    scenario, device, joined = scenario_named(name), gpu_named(gpu), link_named(link)
    efficiency = check_efficiency(EFFICIENCY[scenario.kind] if efficiency is None else efficiency)
    counted = count(name)
    return Inputs(counted.shape, counted.family, scenario.branches,
                  {rows: seconds(f, device, efficiency) for rows, f in counted.flops.items()}, joined,
                  attention_seconds=seconds(counted.attention_flops, device, efficiency),
                  layer_seconds=tuple(seconds(f, device, efficiency) for _, f in counted.layers),
                  weight_bytes=counted.weight_bytes, layer_weight_bytes=counted.layer_weight_bytes,
                  activation_bytes_per_row=counted.activation_bytes_per_row,
                  host_overhead_s=HOST_OVERHEAD_S["cuda"][0], steps=scenario.steps)
