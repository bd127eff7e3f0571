"""GPU predictions on paper: the cost model's inputs (model.Inputs) for named full-size models on named GPUs,
from counted figures only; nothing is timed and no weight is loaded.

Counted: each model's FLOPs per call by torch's FlopCounterMode running the real-size architecture on the
`meta` device (shapes only, no memory); for UNets each layer's FLOPs and what crosses each cut (asyncdiff's
stages), from the same run; one token-mixing attention's FLOPs, 4 L^2 W per row (q k^T and the weighted sum of
v, 2 L^2 W each); the weights' bytes from the parameter count in the model's dtype; the kernels a call launches
(`count_launches`, in the same run: the host's share of a step, plan/fitted.py).
Published: each GPU's dense fp16/bf16 tensor throughput (GPUS, sources beside them). Stated: the fraction of it
a call reaches (EFFICIENCY). Time = FLOPs / (peak x efficiency), the same for the whole call, each layer and
the attention. The links are plan/links.py's profiles; the per-call host overhead is measure.py's CUDA
assumption. The models and their configs: plan/paper_models.py. RIGS: sets of GPUs the models larger than one
device are predicted on, each candidate's memory per device checked against the GPU's (`rig_candidates`), and
the smallest set of a GPU that holds a model (`smallest_fit`). A run's end to end cuts the fitted serial part into
each model's own VAE decode (plan/paper_decode.py: counted on meta, whole on one GPU and in tiles on the pool) and
the rest; the published rows (plan/published.py) keep it whole, as their peers ran it. These are a model's
predictions, never measurements. `python -m parallel_backend.plan.paper_doc` writes them to docs/gpu-predictions.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..engine.oracle import sample_call
from ..models.benchmodels_dit import TransformerBenchModel
from . import paper_models
from .choose import Choice, NothingFits, choose
from .fitted import FITTED, Constants, job_inputs
from .links import Link, link_named
from .measure import HOST_OVERHEAD_S, call_shape, shard_units
from .model import Candidate, Inputs, candidates
from .paper_decode import RunDecode, count_vae_of, run_decode
from .vae_costs import VaeDecode, VaePrediction, predict_decode

TFLOPS = 1e12
GB = 1e9


@dataclass(frozen=True)
class Gpu:
    """A GPU's published dense fp16/bf16 tensor throughput (FP32 accumulate), FLOP/s, and its memory."""

    name: str
    peak_flops: float
    memory_bytes: int
    source: str
    link: str = "pcie4x16"  # the link `tandem plan --gpu` assumes for a set of these cards unless --link says


GPUS: dict[str, Gpu] = {gpu.name: gpu for gpu in (
    # NVIDIA Ada GPU architecture whitepaper, RTX 4090: peak FP16 / BF16 tensor TFLOPS with FP32 accumulate
    # 165.2 dense (330.4 with sparsity; 330.3 dense with FP16 accumulate). 24 GB GDDR6X.
    Gpu("RTX 4090", 165.2 * TFLOPS, 24 * GB, "NVIDIA Ada architecture whitepaper: 165.2 TFLOPS dense fp16/bf16 "
        "tensor, FP32 accumulate", "pcie4-nop2p"),
    # The same whitepaper's appendix, RTX 4080 (16GB): peak FP16 / BF16 tensor TFLOPS with FP32 accumulate 97.5
    # dense (194.9 with sparsity). 16 GB GDDR6X.
    Gpu("RTX 4080", 97.5 * TFLOPS, 16 * GB, "NVIDIA Ada architecture whitepaper (RTX 4080 16GB): 97.5 TFLOPS dense "
        "fp16/bf16 tensor, FP32 accumulate", "pcie4-nop2p"),
    # NVIDIA L40S datasheet: BF16 tensor core 362.05 TFLOPS dense (733 with sparsity). 48 GB GDDR6 with ECC;
    # PCIe 4.0 x16, no NVLink.
    Gpu("L40S", 362.05 * TFLOPS, 48 * GB, "NVIDIA L40S datasheet: 733 TFLOPS bf16 tensor with sparsity, 362.05 "
        "dense"),
    # NVIDIA A100 datasheet: BF16 / FP16 tensor core 312 TFLOPS dense (624 with sparsity), PCIe and SXM alike.
    Gpu("A100 80GB PCIe", 312 * TFLOPS, 80 * GB, "NVIDIA A100 datasheet: 312 TFLOPS dense bf16 tensor"),
    Gpu("A100 80GB SXM", 312 * TFLOPS, 80 * GB, "NVIDIA A100 datasheet: 312 TFLOPS dense bf16 tensor", "nvlink-a100"),
    # NVIDIA H100 datasheet, SXM: BF16 tensor core 1,979 TFLOPS with sparsity -> 989 dense. 80 GB HBM3.
    Gpu("H100 SXM", 989 * TFLOPS, 80 * GB, "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 tensor with sparsity, "
        "989 dense", "nvlink-h100"),
    # The GPUs of the published measurements (tests/data/published_gpu_figures.csv); each figure as its source gives
    # it or, where marked, derived from one.
    # H20 (Hopper, export model): 148 TFLOPS FP16 dense, 96 GB HBM3, NVLink 4 at 900 GB/s (willitrunai.com's H20
    # page, which gives NVIDIA's figures).
    Gpu("H20", 148 * TFLOPS, 96 * GB, "NVIDIA's figures as willitrunai.com's H20 page gives them: 148 TFLOPS FP16 "
        "dense", "nvlink-h20"),
    # L20 (AD102, export model): 59.35 TFLOPS FP32 (technical.city's L20 page); its tensor rate is capped like the
    # H20's: 119.5 TFLOPS FP16/BF16 dense is NVIDIA's L20 datasheet figure as recalled, not re-read (marked so).
    Gpu("L20", 119.5 * TFLOPS, 48 * GB, "NVIDIA L20 datasheet: 119.5 TFLOPS dense fp16/bf16 tensor (recalled, not "
        "re-read for this table)"),
    # RTX 2000 Ada: "Tensor Performance 191.9 TFLOPS", 16 GB GDDR6, PCIe 4.0 x8 (itcreations.com's listing of
    # NVIDIA's datasheet). For Ada that headline is FP8 with sparsity; dense fp16 is a quarter of it: 48 (derived).
    Gpu("RTX 2000 Ada", 191.9 / 4 * TFLOPS, 16 * GB, "NVIDIA datasheet's 191.9 tensor TFLOPS (FP8, sparse) / 4: "
        "48 dense fp16 (derived)", "pcie4x8-sys"),
    # RTX A5000 (GA102): 222.2 tensor TFLOPS with sparsity in NVIDIA's datasheet -> 111.1 dense (recalled).
    Gpu("RTX A5000", 111.1 * TFLOPS, 24 * GB, "NVIDIA RTX A5000 datasheet: 222.2 tensor TFLOPS with sparsity, "
        "111.1 dense (recalled, not re-read)"),
    # Intel Arc A770: 32 Xe cores, 512 XMX engines at 2100 MHz, 16 GB (svethardware.cz on Intel's published
    # specifications); an Xe-HPG XMX engine does 64 fp16 multiply-adds a clock: 512 x 2.1 GHz x 128 = 137.6 TFLOPS
    # (derived).
    Gpu("Arc A770", 137.6 * TFLOPS, 16 * GB, "512 XMX engines x 2.1 GHz x 128 fp16 FLOP per clock (derived from "
        "Intel's published engine count and clock)", "pcie4-nop2p"),
    # Intel Arc B580: 20 Xe2 cores (160 XMX engines), 12 GB, ~2.85 GHz (a Geekbench listing as reported by chip.pl);
    # an Xe2 XMX engine does 128 fp16 multiply-adds a clock: 160 x 2.85 GHz x 256 = 116.7 TFLOPS (derived).
    Gpu("Arc B580", 116.7 * TFLOPS, 12 * GB, "160 XMX engines x 2.85 GHz x 256 fp16 FLOP per clock (derived)",
        "pcie4-nop2p"),
    # `tandem plan --gpu`'s other cards. Figures marked "recalled" are the vendor's as recalled, not re-read.
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: peak FP16 tensor TFLOPS with FP32 accumulate 71 dense (142 sparse);
    # 24 GB GDDR6X. GeForce: no peer-to-peer over PCIe.
    Gpu("RTX 3090", 71 * TFLOPS, 24 * GB, "NVIDIA GA102 whitepaper: 71 TFLOPS dense fp16 tensor, FP32 accumulate "
        "(recalled)", "pcie4-nop2p"),
    # NVIDIA RTX Blackwell GPU architecture whitepaper, RTX 5090: FP16/BF16 tensor with FP32 accumulate 209.5 dense
    # (419 sparse); 32 GB GDDR7; PCIe 5.0 x16, no peer-to-peer.
    Gpu("RTX 5090", 209.5 * TFLOPS, 32 * GB, "NVIDIA RTX Blackwell whitepaper: 209.5 TFLOPS dense fp16/bf16 tensor, "
        "FP32 accumulate (recalled)", "pcie5-nop2p"),
    # NVIDIA L40 datasheet: BF16 tensor 181.05 TFLOPS dense (362.1 sparse); 48 GB GDDR6; PCIe 4.0 x16.
    Gpu("L40", 181.05 * TFLOPS, 48 * GB, "NVIDIA L40 datasheet: 362.1 TFLOPS bf16 tensor with sparsity, 181.05 dense "
        "(recalled)"),
    # H200 SXM: the H100's Hopper compute (989 dense bf16) with 141 GB HBM3e; NVLink 4 (NVIDIA H200 datasheet).
    Gpu("H200", 989 * TFLOPS, 141 * GB, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 tensor with sparsity, 989 dense; "
        "141 GB (recalled)", "nvlink-h100"),
    # H800 SXM: the H100's compute, 80 GB; its NVLink is cut to 400 GB/s bidirectional (the export model).
    Gpu("H800", 989 * TFLOPS, 80 * GB, "NVIDIA H800: the H100 SXM's 989 TFLOPS dense bf16; NVLink 400 GB/s "
        "(recalled)", "nvlink-h800"),
    # B200 (HGX): FP16/BF16 tensor 4.5 PFLOPS with sparsity -> 2.25 dense; 180 GB HBM3e; NVLink 5 at 1.8 TB/s.
    Gpu("B200", 2250 * TFLOPS, 180 * GB, "NVIDIA B200 (HGX): 4.5 PFLOPS bf16 tensor with sparsity, 2.25 dense; "
        "180 GB (recalled)", "nvlink-b200"),
)}
# `tandem plan --gpu`'s short names
GPU_NAMES = {"rtx3090": "RTX 3090", "rtx4080": "RTX 4080", "rtx4090": "RTX 4090", "rtx5090": "RTX 5090",
             "rtx2000ada": "RTX 2000 Ada", "a5000": "RTX A5000", "l20": "L20", "l40": "L40", "l40s": "L40S",
             "a100": "A100 80GB SXM", "a100-pcie": "A100 80GB PCIe", "h100": "H100 SXM", "h200": "H200",
             "h800": "H800", "h20": "H20", "b200": "B200", "arc-a770": "Arc A770", "arc-b580": "Arc B580"}

# The fraction of the peak a one-device call reaches (model FLOPs utilisation), stated, not measured. DiTs are
# almost all large GEMMs and flash attention over thousands of tokens, which run near 60-70 % of the peak;
# norms, modulation and RoPE are memory-bound: 0.45 for the whole call. The doc checks it against xDiT's
# one-H100 Flux.1-dev figures (28 steps, whole pipeline): 6.71 s eager and 4.30 s compiled imply at least
# ~0.31 and ~0.49 of the counted FLOPs. SDXL's UNet spends a larger share in convolutions at 320 channels,
# group norms and narrow attention heads (64 wide), so less: 0.35 (no published one-device figure was checked).
#
# VAEs: 3x3 convolutions over large feature maps (implicit GEMMs, near the peak on their own) between memory-bound
# passes over the same maps (GroupNorm or RMSNorm, SiLU, upsampling, residual additions, Wan's padding and cache
# copies): 0.15. Checked against one published figure (the doc's VAE section): sglang's Wan 2.1 VAE decoding a
# 720p clip on one H20 in 26.3 s implies ~0.16 of that GPU's peak.
EFFICIENCY = {"unet": 0.35, "dit": 0.45, "vae": 0.15}


@dataclass(frozen=True)
class Scenario:
    """A named job: a full-size model (built on meta by `build`), its resolution, guidance branches (2: cfg > 1),
    the steps of a run, the kind of efficiency it gets and the hardware it is predicted on (GPU, link; () for
    the models only predicted on RIGS). runs_as: the family Tandem runs the model as where its diffusers class
    has none in Tandem's diffusers adapter (ComfyUI's); refuses: (strategy, why) the plan lists for that family
    but Tandem refuses for this model; frames: a video's clip length."""

    name: str
    title: str
    build: str  # a function of this module: () -> a BenchModel on the meta device
    resolution: tuple[int, int]
    branches: int
    steps: int
    kind: str
    hardware: tuple[tuple[str, str], ...]
    source: str
    runs_as: str = ""
    refuses: tuple[tuple[str, str], ...] = ()
    frames: int | None = None  # a video's pixel frames per clip (its builder's), None for an image


DATACENTRE = (("A100 80GB PCIe", "pcie4x16"), ("A100 80GB SXM", "nvlink-a100"), ("H100 SXM", "nvlink-h100"))
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("sdxl-1024", "SDXL 1024x1024, cfg 7.5 (2 branches), 50 steps", "sdxl_meta", (1024, 1024), 2, 50,
             "unet", (("RTX 4090", "pcie4-nop2p"), *DATACENTRE),
             "SDXL base 1.0's UNet config (parallel_backend/models/benchmodels.py SDXL_UNET, the bench's `sdxl`)"),
    Scenario("flux-dev-1024", "Flux.1-dev 1024x1024, guidance-distilled (cfg 1: one branch), 28 steps",
             "flux_dev_meta", (1024, 1024), 1, 28, "dit", (("RTX 4090", "pcie4-nop2p"), *DATACENTRE),
             "FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev transformer/config.json): 19 double + "
             "38 single blocks, 24 heads x 128, 64 input channels, T5 width 4096 (512 tokens), pooled 768, "
             "guidance embedding"),
    Scenario("wan14b-720p", "Wan 2.1 14B t2v 720x1280 x 81 frames, cfg 5 (2 branches), 50 steps", "wan14b_meta",
             (720, 1280), 2, 50, "dit", DATACENTRE,
             "Wan2.1-T2V-14B's transformer config (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json): 40 "
             "layers, 40 heads x 128, ffn 13824, 16 latent channels, patch (1, 2, 2), umT5 width 4096 "
             "(512 tokens)", frames=paper_models.WAN_FRAMES),
    Scenario("qwen-image-1328", "Qwen-Image 20B 1328x1328, true cfg 4.0 (2 branches), 50 steps", "qwen_image_meta",
             (1328, 1328), 2, 50, "dit", (),
             "Qwen-Image's transformer config (Qwen/Qwen-Image transformer/config.json): 60 blocks, 24 heads x 128, "
             "64 input channels (16 latent channels in 2x2 patches), 16 out, Qwen2.5-VL width 3584 (assumed 128 "
             "prompt tokens: the pipeline pads only to the longest prompt); the model card's call: true_cfg_scale "
             "4.0 with a negative prompt, 50 steps"),
    Scenario("flux2-dev-1024", "Flux.2-dev 32B 1024x1024, guidance-distilled (cfg 1: one branch), 50 steps",
             "flux2_dev_meta", (1024, 1024), 1, 50, "dit", (),
             "FLUX.2-dev's transformer config (black-forest-labs/FLUX.2-dev transformer/config.json): 8 double + 48 "
             "single blocks, 48 heads x 128, mlp ratio 3 (SwiGLU), 128 input channels (32 latent channels in 2x2 "
             "patches), Mistral width 15360 (512 tokens, padded); Flux2Pipeline's defaults: embedded guidance 4.0, "
             "50 steps. Tandem runs it through ComfyUI (its diffusers adapter has no Flux2Transformer2DModel "
             "family)", runs_as="comfy_dit:flux",
             refuses=(("tensor", "Tandem's tensor cut of ComfyUI's Flux refuses Flux.2 (models/tensor_splits.py)"),)),
    Scenario("hunyuan-video-720p", "HunyuanVideo 13B 720x1280 x 129 frames, guidance-distilled (cfg 1: one "
             "branch), 50 steps", "hunyuan_video_meta", (720, 1280), 1, 50, "dit", (),
             "HunyuanVideo's transformer config (hunyuanvideo-community/HunyuanVideo transformer/config.json): 20 "
             "double + 40 single blocks, 24 heads x 128, mlp ratio 4, 2 text-refiner blocks, 16 latent channels, "
             "patch (1, 2, 2), Llama width 4096 (256 tokens, padded), pooled CLIP 768; HunyuanVideoPipeline's "
             "defaults: 720x1280, 129 frames, embedded guidance 6.0, true cfg 1.0, 50 steps. Tandem runs it "
             "through ComfyUI (its diffusers adapter has no HunyuanVideoTransformer3DModel family)",
             runs_as="comfy_dit:hunyuan_video", frames=paper_models.HUNYUAN_FRAMES),
    Scenario("ltx-video-512", "LTX-Video 2B 512x704 x 161 frames, cfg 3 (2 branches), 50 steps", "ltx_video_meta",
             (512, 704), 2, 50, "dit", (("RTX 4090", "pcie4-nop2p"), *DATACENTRE),
             "LTX-Video's transformer config (Lightricks/LTX-Video transformer/config.json, 2B 0.9.x): 28 layers, "
             "32 heads x 64, cross-attention to T5's 4096-wide tokens (128, padded), patch size 1 over 128 latent "
             "channels, VAE 32x per side and 8x in time; LTXPipeline's defaults: 512x704, 161 frames, guidance 3.0, "
             "50 steps. Tandem runs it through ComfyUI (its diffusers adapter has no LTXVideoTransformer3DModel "
             "family)", runs_as="comfy_dit:ltxv", frames=paper_models.LTX_FRAMES),
)}


@dataclass(frozen=True)
class Rig:
    """A set of equal GPUs joined by one link, the models larger than one device are predicted on."""

    name: str
    gpu: str
    devices: int
    link: str
    note: str


# GeForce cards have no peer-to-peer over PCIe: NCCL copies through host memory (plan/links.py pcie4-nop2p).
RIGS = (
    Rig("2 x 24 GB", "RTX 4090", 2, "pcie4-nop2p", "PCIe 4.0 x16 per card, no peer-to-peer (GeForce): copies "
        "through host memory"),
    Rig("4 x 16 GB", "RTX 4080", 4, "pcie4-nop2p", "PCIe 4.0 x16 per card (a desktop board rarely gives four cards "
        "x16 each: optimistic), no peer-to-peer"),
    Rig("2 x 48 GB", "L40S", 2, "pcie4x16", "PCIe 4.0 x16, no NVLink"),
    Rig("2 x 80 GB", "H100 SXM", 2, "nvlink-h100", "NVLink 4 (an HGX board's usual pair)"),
)
BIG_MODELS = ("wan14b-720p", "qwen-image-1328", "flux2-dev-1024", "hunyuan-video-720p")

@dataclass(frozen=True)
class Counted:
    """A scenario's counted figures. flops: {rows: FLOPs of one call}; attention_flops: one token-mixing
    attention of one row (4 L^2 W); layers: (name, FLOPs of one row) in order (UNets; () for DiTs);
    flop_ops: the whole call's FLOPs of one row per aten op, as the counter split them; unit_bytes: the bytes of
    each unit sharded weights gather (models/weight_shards.py); launches: the kernels one call launches (the same
    for any rows: a call of more rows launches the same kernels on larger tensors), by count_launches."""

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
    unit_bytes: tuple = ()
    launches: int = 0


class _Launches(TorchDispatchMode):
    """Counts the aten ops a run dispatches that make a tensor of their own: the kernels an eager GPU run launches
    (a view, or an op that hands back its input, as dropout does in inference, launches none)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not view and not (args and out is args[0]):
            self.count += 1
        return out


def count_launches(run) -> int:
    """The kernels `run()` launches, counted as _Launches counts them (on the meta device: nothing computed)."""
    with _Launches() as counter:
        run()
    return counter.count


def count_flops(run) -> tuple[int, dict]:
    """(total FLOPs, {aten op: FLOPs}) of `run()`, by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def _meta_call(model, rows: int, resolution):
    return sample_call(model, rows, resolution).to(torch.device("meta"))


def _call_flops(model, rows: int, resolution) -> tuple[int, dict, int]:
    """(FLOPs, {aten op: FLOPs}, kernels launched) of one call of `rows` rows, from one meta run."""
    from ..models import forward_for_family

    call = _meta_call(model, rows, resolution)
    launches = _Launches()

    def run():
        with launches:  # inside the FLOP counter: it sees the ops the model calls, before the counter decomposes them
            forward_for_family(model.family)(model.module, call)

    with torch.inference_mode():
        flops, ops = count_flops(run)
    return flops, ops, launches.count


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


def count(name: str) -> Counted:
    """The counted figures of scenario `name` (a few seconds: meta runs of the full-size model)."""
    scenario = scenario_named(name)
    return count_job(scenario.build, scenario.resolution, scenario.branches, scenario.frames, scenario.runs_as)


@functools.lru_cache(maxsize=None)
def count_job(build: str, resolution: tuple, rows: int, frames: int | None = None, runs_as: str = "") -> Counted:
    """The counted figures of paper_models.`build`'s model at `resolution` (and `frames` for a video model; None:
    the builder's) for calls of 1 and `rows` rows: meta runs of the full-size model, a few seconds each."""
    model = getattr(paper_models, build)()
    if frames is not None:
        if not hasattr(model, "frames"):
            raise ValueError(f"{build} makes images: it takes no frames (got {frames})")
        model = replace(model, frames=frames)
    resolution = tuple(resolution)
    shape = _shape(model, resolution, rows)
    one, ops, launches = _call_flops(model, 1, resolution)
    flops = {1: one} if rows == 1 else {1: one, rows: _call_flops(model, rows, resolution)[0]}
    layers, handover, layer_weights = count_layers(model, resolution)
    shape = replace(shape, handover_bytes=handover)
    params = list(model.module.parameters())
    return Counted(shape, runs_as or model.family, flops, attention_flops(shape.tokens, shape.width), layers,
                   layer_weights, sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params),
                   model.memory_bytes(1, resolution), tuple(sorted(ops.items())), shard_units(model.module), launches)


count.cache_clear = count_job.cache_clear  # callers (tests) clear count's cache: it is count_job's


def _shape(model, resolution, rows: int):
    """measure.call_shape; for a transformer whose family the adapter cannot split (counted through diffusers'
    plain call: Flux.2, HunyuanVideo), its sequence sizes and heads from the model and its config."""
    shape = call_shape(model, resolution, rows)
    if shape.heads or not isinstance(model, TransformerBenchModel):
        return shape
    config = model.module.config
    tokens, attentions = model.sequence_sizes(resolution)
    return replace(shape, tokens=tokens, attentions=attentions, heads=config.num_attention_heads,
                   width=config.num_attention_heads * config.attention_head_dim)


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


def paper_inputs(name: str, gpu: str, link: str, efficiency: float | None = None, sharded: bool = False,
                 weights_dtype: str = "bf16", devices: int = 1) -> Inputs:
    """model.Inputs of scenario `name` on `gpu`s joined by `link`, from counted FLOPs: under the constants fitted
    to the published measurements (plan/fitted.py FITTED), the end to end with the VAE decode whole on one device
    and in tiles on `devices` (RunDecode), or, given an `efficiency`, at that fraction of the peak
    for every call with the CUDA host overhead and nothing else (the model before the fit); sharded: with the units
    sharded weights gather, the next one's gather posted ahead as on CUDA (model.candidates then lists each
    split's sharded twin); weights_dtype: fitted.WEIGHT_BYTES' name of the weights' size (the fitted model only)."""
    scenario, device, joined = scenario_named(name), gpu_named(gpu), link_named(link)
    counted = count(name)
    if efficiency is None:
        pixels = scenario.resolution[0] * scenario.resolution[1] * (scenario.frames or 1)
        inputs = job_inputs(counted, device.peak_flops, joined, scenario.branches, scenario.steps, pixels, FITTED,
                            FITTED_RANKS, sharded=sharded, weights_dtype=weights_dtype)
        return run_decode(scenario.build, scenario.resolution, scenario.frames,
                          device.peak_flops * EFFICIENCY["vae"], joined, devices, inputs.serial_seconds).apply(inputs)
    efficiency = check_efficiency(efficiency)
    return Inputs(counted.shape, counted.family, scenario.branches,
                  {rows: seconds(f, device, efficiency) for rows, f in counted.flops.items()}, joined,
                  attention_seconds=seconds(counted.attention_flops, device, efficiency),
                  layer_seconds=tuple(seconds(f, device, efficiency) for _, f in counted.layers),
                  weight_bytes=counted.weight_bytes, layer_weight_bytes=counted.layer_weight_bytes,
                  activation_bytes_per_row=counted.activation_bytes_per_row,
                  host_overhead_s=HOST_OVERHEAD_S["cuda"][0], steps=scenario.steps,
                  unit_bytes=counted.unit_bytes if sharded else (), gathers_overlap=sharded)


FITTED_RANKS = 8  # the most ranks of a sequence split paper_inputs gives a rank's part for


def rig_candidates(name: str, gpu: str, link: str, devices: int, weights_dtype: str = "bf16") -> list[Candidate]:
    """model.candidates of scenario `name` on `devices` of `gpu` joined by `link`, weights whole and sharded (in
    `weights_dtype`), each marked whether it fits the GPU's memory; less the strategies Tandem refuses for this model
    (its `refuses`)."""
    refused = dict(scenario_named(name).refuses)
    found = candidates(paper_inputs(name, gpu, link, sharded=True, weights_dtype=weights_dtype, devices=devices),
                       devices, gpu_named(gpu).memory_bytes)
    return [c for c in found if c.strategy not in refused]


def smallest_fit(name: str, gpu: str, link: str, most: int) -> tuple[int, Choice] | None:
    """(n, choose.choose of rig_candidates on n devices) for the fewest devices of `gpu`, up to `most`, on which
    some candidate fits; None where none fits on `most`."""
    for n in range(1, most + 1):
        try:
            return n, choose(rig_candidates(name, gpu, link, n))
        except NothingFits:
            continue
    return None


@dataclass(frozen=True)
class VaeScenario:
    """A full-size VAE decoding one image or clip (built on meta by `build`, a function of paper_models), predicted
    in bands of rows, or a grid of tiles on 4 (plan/vae_costs.py), on 1 to 4 of each hardware's GPUs."""

    name: str
    title: str
    build: str
    channels: int  # the latent's
    resolution: tuple[int, int]
    frames: int | None  # a clip's (the latent has 1 + (frames - 1) / 4), None for an image
    hardware: tuple[tuple[str, str], ...]
    source: str

    def latent_shape(self) -> tuple[int, ...]:
        clip = () if self.frames is None else (1 + (self.frames - 1) // paper_models.VIDEO_FRAMES_PER_LATENT,)
        return (1, self.channels, *clip, *(r // paper_models.VAE_SCALE for r in self.resolution))


VAE_HARDWARE = (("RTX 4090", "pcie4-nop2p"), ("H100 SXM", "nvlink-h100"))
VAE_DEVICES = (1, 2, 4)
VAE_SCENARIOS: dict[str, VaeScenario] = {s.name: s for s in (
    VaeScenario("flux-vae-1024", "Flux.1's VAE decoding 1024x1024", "flux_vae_meta", 16, (1024, 1024), None,
                VAE_HARDWARE, "FLUX.1-dev's VAE config (black-forest-labs/FLUX.1-dev vae/config.json): diffusers' "
                "AutoencoderKL, block widths 128, 256, 512, 512, 2 resnets per block, 32 norm groups, 16 latent "
                "channels, no quant convolutions; SD's and SDXL's VAEs have the same decoder with 4 latent channels"),
    VaeScenario("wan-vae-720p", "Wan 2.1's VAE decoding 720x1280 x 81 frames", "wan_vae_meta", 16, (720, 1280),
                paper_models.WAN_FRAMES, VAE_HARDWARE,
                "Wan 2.1's VAE (Wan-AI/Wan2.1-T2V-14B-Diffusers vae/config.json: diffusers' AutoencoderKLWan "
                "defaults, base width 96, 16 latent channels); Wan 2.2 A14B uses the same VAE"),
)}


def vae_scenario_named(name: str) -> VaeScenario:
    try:
        return VAE_SCENARIOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown VAE scenario {name!r}; choose one of: {', '.join(VAE_SCENARIOS)}") from None


@functools.lru_cache(maxsize=None)
def count_vae(name: str) -> tuple[VaeDecode, int]:
    """(the counted figures of VAE scenario `name`'s whole decode, its parameters): one meta run (seconds; Wan's
    21 latent frames decode one after another through its feature cache, each counted as it runs)."""
    scenario = vae_scenario_named(name)
    return count_vae_of(scenario.build, scenario.latent_shape())


def vae_prediction(name: str, gpu: str, link: str, devices: int, efficiency: float | None = None) -> VaePrediction:
    """VAE scenario `name` decoded in bands on `devices` of `gpu` joined by `link`: one device's time is the counted
    FLOPs at `efficiency` of the GPU's peak (None: EFFICIENCY["vae"]); a split pays the CUDA host overhead."""
    decode, _ = count_vae(name)
    one = seconds(decode.flops, gpu_named(gpu), EFFICIENCY["vae"] if efficiency is None else efficiency)
    return predict_decode(decode, one, link_named(link), devices, HOST_OVERHEAD_S["cuda"][0])


@dataclass(frozen=True)
class PaperModel:
    """A full-size model `tandem plan --gpu` predicts: its builder (paper_models), resolution, frames (videos) and
    the family Tandem runs it as where its diffusers class has none (Scenario.runs_as), and what Tandem refuses."""

    build: str
    resolution: tuple[int, int]
    frames: int | None = None
    runs_as: str = ""
    refuses: tuple[tuple[str, str], ...] = ()
    frames_per_latent: int = paper_models.VIDEO_FRAMES_PER_LATENT  # a clip has k x this + 1 frames


PAPER_MODELS = {
    "sdxl": PaperModel("sdxl_meta", (1024, 1024)),
    "sd3.5-large": PaperModel("sd35_large_meta", (1024, 1024)),
    "flux-dev": PaperModel("flux_dev_meta", (1024, 1024)),
    "flux2-dev": PaperModel("flux2_dev_meta", (1024, 1024), runs_as=SCENARIOS["flux2-dev-1024"].runs_as,
                            refuses=SCENARIOS["flux2-dev-1024"].refuses),
    "qwen-image": PaperModel("qwen_image_meta", (1328, 1328)),
    "wan-14b": PaperModel("wan14b_meta", (720, 1280), paper_models.WAN_FRAMES),
    "hunyuanvideo": PaperModel("hunyuan_video_meta", (720, 1280), paper_models.HUNYUAN_FRAMES,
                               runs_as=SCENARIOS["hunyuan-video-720p"].runs_as),
    "ltx-video": PaperModel("ltx_video_meta", (512, 704), paper_models.LTX_FRAMES,
                            runs_as=SCENARIOS["ltx-video-512"].runs_as,
                            frames_per_latent=paper_models.LTX_FRAMES_PER_LATENT),
}


def paper_model_named(name: str) -> PaperModel:
    try:
        return PAPER_MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r} for --gpu; choose one of: {', '.join(PAPER_MODELS)}") from None


def gpu_for(name: str) -> Gpu:
    """A GPU by `tandem plan --gpu`'s short name (GPU_NAMES) or its full name."""
    if name in GPU_NAMES:
        return GPUS[GPU_NAMES[name]]
    try:
        return GPUS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown GPU {name!r}; choose one of: {', '.join(GPU_NAMES)}") from None


def gpu_plan(model: str, gpu: str, gpus: int, link: str | Link | None, resolution=None, frames: int | None = None,
             steps: int = 50, branches: int = 2, weights_dtype: str = "bf16",
             constants: Constants = FITTED) -> tuple[Inputs, list[Candidate], Gpu, RunDecode]:
    """(inputs, candidates, the GPU, the run's decode) of paper model `model` on `gpus` of `gpu` joined by `link`
    (None: the GPU's usual link; a Link: a calibration's), under `constants` (the fitted ones, or a calibration's:
    plan/gpu_calibration.py): every mesh with its
    weights (in `weights_dtype`) whole and sharded, each marked whether it fits the GPU's memory, less the
    strategies Tandem refuses for the model; its end to end with the VAE decode whole on one GPU and in tiles on
    `gpus` (RunDecode)."""
    job, card = paper_model_named(model), gpu_for(gpu)
    joined = link if isinstance(link, Link) else link_named(link or card.link)
    resolution = tuple(resolution or job.resolution)
    frames = job.frames if frames is None else frames
    if frames is not None and job.frames is None:
        raise ValueError(f"{model} makes images: --frames is for video models")
    counted = count_job(job.build, resolution, branches, frames, job.runs_as)
    pixels = resolution[0] * resolution[1] * (frames or 1)
    inputs = job_inputs(counted, card.peak_flops, joined, branches, steps, pixels, constants, gpus, sharded=True,
                        weights_dtype=weights_dtype)
    decode = run_decode(job.build, resolution, frames, card.peak_flops * EFFICIENCY["vae"], joined, gpus,
                        inputs.serial_seconds)
    inputs = decode.apply(inputs)
    refused = dict(job.refuses)
    found = [c for c in candidates(inputs, gpus, card.memory_bytes) if c.strategy not in refused]
    return inputs, found, card, decode
