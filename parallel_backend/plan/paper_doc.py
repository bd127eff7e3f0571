"""docs/gpu-predictions.md, generated: the paper scenarios' inputs (plan/paper.py) and, on each GPU and link for
2, 4 and 8 devices, every candidate model.candidates predicts and the one choose.choose picks, next to the peers'
published measurements (PEERS); and for the models larger than one device, on each rig (paper.RIGS), every
candidate with its memory per device against the GPU's, and its speed-up over the fewest devices of that GPU
that hold the model. Run: python -m parallel_backend.plan.paper_doc --out docs/gpu-predictions.md
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import diffusers
import torch

from .choose import FLOOR, NothingFits, choose
from .links import link_named
from . import published
from .fitted import FITTED
from .model import candidates
from .paper import (BIG_MODELS, EFFICIENCY, RIGS, SCENARIOS, VAE_DEVICES, VAE_SCENARIOS, count, count_vae,
                    gpu_named, paper_inputs, rig_candidates, smallest_fit, vae_prediction)
from .paper_decode import MODEL_VAES

COMMAND = "python -m parallel_backend.plan.paper_doc --out docs/gpu-predictions.md"
DEVICES = (2, 4, 8)
TOP = 4  # candidates shown per cell (the choice is added when it is not among them)
MIB, GIB = 2**20, 2**30


@dataclass(frozen=True)
class Peer:
    """A peer's published measurement, and the cell of this model it is set beside: (scenario, GPU, link,
    devices, candidate label; None: the choice)."""

    system: str
    setting: str
    figure: str
    source: str
    beside: tuple | None = None


PEERS = (
    Peer("AsyncDiff", "SD 2.1, 4x RTX A5000 (PCIe)", "2.7x (negligible quality loss); 4.0x with stride denoising "
         "(CLIP score -0.38)", "Chen et al., AsyncDiff, NeurIPS 2024, arXiv 2406.06911, abstract",
         ("sdxl-1024", "RTX 4090", "pcie4-nop2p", 4, "asyncdiff (cfg 1 x batch 1 x stages 4)")),
    Peer("AsyncDiff", "SDXL, 50 steps, RTX A5000", "2 devices 1.7x, 4 devices 2.7x, 4 devices stride 2 3.8x",
         "AsyncDiff paper's SDXL results as recorded in design/PERFORMANCE.md (not re-read for this page)",
         ("sdxl-1024", "RTX 4090", "pcie4-nop2p", 2, "asyncdiff (cfg 1 x batch 1 x stages 2)")),
    Peer("DistriFusion", "SDXL 1024x1024, A100 + NVLink, 2 / 4 / 8 GPUs", "1.5x / 2.2x / 2.8x",
         "Li et al., DistriFusion, CVPR 2024, arXiv 2402.19481, as recorded in design/PERFORMANCE.md",
         ("sdxl-1024", "A100 80GB SXM", "nvlink-a100", 8, None)),
    Peer("DistriFusion", "SDXL 3840x3840, 8x A100", "up to 6.1x (2 / 4 / 8 GPUs: 1.8x / 3.4x / 6.1x)",
         "DistriFusion abstract (6.1x on 8 A100s); per-count figures as recorded in design/PERFORMANCE.md"),
    Peer("xDiT", "Flux.1-dev 1024, 28 steps, H100 NVLink, eager PyTorch",
         "1 GPU 6.71 s; Ulysses-2 4.38 s (1.53x); Ring-2 5.31 s (1.26x); Ulysses-4 4.24 s (1.58x); Ring-4 5.11 s "
         "(1.31x); Ulysses-2 x Ring-2 5.19 s (1.29x)", "xdit-project/xDiT docs/performance/flux.md",
         ("flux-dev-1024", "H100 SXM", "nvlink-h100", 4, "ulysses (cfg 1 x batch 1 x ulysses 4)")),
    Peer("xDiT", "Flux.1-dev 1024, 28 steps, H100 NVLink, torch.compile",
         "1 GPU 4.30 s; Ulysses-2 2.68 s (1.60x); Ring-2 2.60 s (1.65x); Ulysses-4 1.63 s (2.64x); Ring-4 1.98 s "
         "(2.17x)", "xdit-project/xDiT docs/performance/flux.md",
         ("flux-dev-1024", "H100 SXM", "nvlink-h100", 2, "ring (cfg 1 x batch 1 x ring 2)")),
    Peer("xDiT", "Flux.1-schnell 1024, 8x L40 over PCIe Gen4", "4 GPUs (Ulysses-2 x Ring-2) fastest, 1.41 s; 8 "
         "GPUs slower than 4", "xdit-project/xDiT docs/performance/flux.md",
         ("flux-dev-1024", "A100 80GB PCIe", "pcie4x16", 8, None)),
    Peer("Raylight", "Flux fp8 1024, Ulysses 2, 2x RTX 2000 Ada over PCIe", "2.22 -> 1.26 s/it (1.76x)",
         "Raylight (ComfyUI nodes, Ray + xDiT USP), figure as given in the issue brief",
         ("flux-dev-1024", "A100 80GB PCIe", "pcie4x16", 2, "ulysses (cfg 1 x batch 1 x ulysses 2)")),
    Peer("ComfyUI CFG split", "Wan 2.1 i2v 720p 14B bf16, 2x RTX 4090 (4x: capped at 2x)", "\"essentially 2x\"",
         "a tester's comment on Comfy-Org/ComfyUI pull request #7063 (MultiGPU work units)",
         ("wan14b-720p", "A100 80GB PCIe", "pcie4x16", 2, "cfg (cfg 2 x batch 1)")),
    Peer("ComfyUI CFG split", "SDXL 2048x2048, cfg 7, 2x Intel Arc A770", "1.73-2.00 -> 1.10 s/it (~1.7x)",
         "Comfy-Org/ComfyUI pull request #14191",
         ("sdxl-1024", "RTX 4090", "pcie4-nop2p", 2, "cfg (cfg 2 x batch 1)")),
    Peer("ComfyUI CFG split", "SDXL, 2 GPUs", "1.79x per step, 1.58x end to end", "design/PERFORMANCE.md "
         "(its source not recorded there)"),
    Peer("MiniMax-H3 nodes (buqi-minimax-h3-multigpu)", "MiniMax-H3, Ulysses on 2 to 8 GPUs (RTX PRO 5000, RTX "
         "5090)", "1.35x-3.0x on 2 GPUs, up to 6.9x on 8 (settings not given)",
         "Comfy-Org/ComfyUI-Manager pull request #3158 (its description); the repository's own table is in the "
         "published table above"),
    Peer("Raylight", "Wan 2.1 i2v 14B, Ulysses 2, 2x RTX 4090 (rented on vast.ai; GeForce: no peer-to-peer)",
         "slower than one 4090 "
         "(the figures only in screenshots)", "komikndr/raylight issue #22 (2x4090 running slower than one 4090)",
         ("flux-dev-1024", "RTX 4090", "pcie4-nop2p", 2, "ulysses (cfg 1 x batch 1 x ulysses 2)")),
    Peer("xDiT", "Ulysses on 8 x L40 (PCIe)", "slower than one GPU (the figure only in a screenshot)",
         "xdit-project/xDiT issue #553 (Why sp-Ulysses with 8 GPUs slower than a single GPU?)"),
)

# xDiT's one-H100 Flux.1-dev runs (28 steps, whole pipeline): seconds eager and with torch.compile; a check of
# the stated efficiency (xdit-project/xDiT docs/performance/flux.md).
XDIT_FLUX_H100 = {"eager PyTorch": 6.71, "torch.compile": 4.30}
XDIT_FLUX_STEPS = 28


def cell(name: str, gpu: str, link: str, devices: int):
    """(candidates, choice, exact-only choice) of one scenario on `devices` GPUs."""
    found = candidates(paper_inputs(name, gpu, link, devices=devices), devices)
    return found, choose(found), choose(found, exact_only=True)


def _mib(c) -> str:
    return f"{(c.peer_bytes_per_call + c.host_bytes_per_call) / MIB:,.1f}"


def _row(c, mark: str = "") -> str:
    return (f"| {mark}{c.label()} | {c.devices} | {c.predicted_speedup:.2f}x | {c.predicted_speedup_end_to_end:.2f}x "
            f"| {'exact' if c.exact else 'stale'} | {_mib(c)} | {c.memory_bytes_per_device / GIB:.1f} "
            f"| {1000 * c.exposed_seconds:.2f} |")


def _gpus(scenario) -> list[str]:
    """The GPUs a scenario is predicted on: its hardware's, else the rigs'."""
    return list(dict.fromkeys(g for g, _ in scenario.hardware or [(r.gpu, r.link) for r in RIGS]))


def inputs_section() -> list[str]:
    used = sorted({(g, lk) for s in SCENARIOS.values() for g, lk in s.hardware} | {(r.gpu, r.link) for r in RIGS})
    out = ["## Inputs", "", "### GPUs (published figures)", "", "| GPU | dense fp16/bf16 tensor TFLOPS | memory GB | "
           "source |", "|---|---|---|---|"]
    for gpu in dict.fromkeys(g for g, _ in used):
        g = gpu_named(gpu)
        out.append(f"| {g.name} | {g.peak_flops / 1e12:g} | {g.memory_bytes / 1e9:g} | {g.source} |")
    c = FITTED
    out += ["", "### Constants fitted to published measurements (plan/fitted.py FITTED)", "",
            "| constant | fitted | what it is |", "|---|---|---|",
            f"| launch_s | {1e6 * c.launch_s:.1f} us | the host's time per kernel a call launches (each model's "
            "kernels counted on meta): a call takes the longer of its GPU work and its launches, issued ahead; every "
            "rank of a sequence, patch or tensor split launches every kernel, an asyncdiff stage its layers' |",
            f"| compiled_launches | {c.compiled_launches:.3f} | the launches' share left with torch.compile (CUDA "
            "graphs, DistriFusion's default: none) |",
            f"| step_s | {1000 * c.step_s:.1f} ms | per step and device (the sampler's own work, the synchronisation), "
            "never hidden |",
            f"| peak_fraction | {c.peak_fraction:.3f} | the fraction of the peak a large call reaches |",
            f"| half_work | {c.half_work / 1e9:.3g} GFLOP | the work per device at which a call runs at half of "
            "peak_fraction |",
            f"| split_s | {1000 * c.split_s:.3g} ms | per step, any split |",
            f"| message_s | {1e6 * c.message_s:.0f} us | added to every message's latency |",
            f"| serial_flops_per_pixel | {c.serial_flops_per_pixel / 1e6:.0f} MFLOP | the text encoder and VAE of a "
            "run, per output pixel (and frame), at the GPU's peak x peak_fraction: the end-to-end figures |", "",
            "Fitted by `plan/published.py` (least squares on the log of the speed-up) to the rows of "
            "`tests/data/published_gpu_figures.csv` it can predict; nothing is fitted per row. How well they fit, "
            "row by row, and with each row left out of the fit: the section *Published measurements against the "
            "fitted model* below and `tests/test_plan_published.py`. A constant the table does not support (it ran "
            "to the search's floor) is shown as fitted. Ulysses' all-to-all is counted exposed whole, as the "
            "peers' Ulysses runs it.", "", *measured_lines(), "### Links (plan/links.py)", "",
            "| link | effective GB/s per direction | latency per message | source |", "|---|---|---|---|"]
    for name in dict.fromkeys(lk for _, lk in used):
        link = link_named(name)
        out.append(f"| {name} | {link.bandwidth / 1e9:.1f} | {link.latency * 1e6:g} us | {link.source} |")
    return out + [""]


def model_section(name: str) -> list[str]:
    s, c = SCENARIOS[name], count(name)
    shape = c.shape
    out = [f"### {s.title}", "", f"Config: {s.source}.", "",
           f"- parameters {c.parameters / 1e9:.3f} B; weights {c.weight_bytes / 1e9:.2f} GB in "
           f"{shape.itemsize * 8}-bit floats",
           "- FLOPs per call (FlopCounterMode on meta): " + ", ".join(f"{r} row(s) {f / 1e12:,.2f} TFLOP"
                                                                       for r, f in sorted(c.flops.items())),
           "- of one row, by op: " + ", ".join(f"{op} {f / 1e12:,.2f}" for op, f in c.flop_ops) + " TFLOP",
           f"- kernels launched per call (the ops dispatched on meta that make a tensor): {c.launches:,}",
           f"- per row: {shape.input_bytes / MIB:.2f} MiB in (latents, text, extras), {shape.output_bytes / MIB:.2f} "
           f"MiB prediction out; at least {c.activation_bytes_per_row / MIB:,.0f} MiB of activations held"]
    if shape.attentions:
        share = shape.attentions * c.attention_flops / c.flops[1]
        out.append(f"- {shape.attentions} token-mixing attentions of {shape.tokens:,} tokens x {shape.width} wide "
                   f"({shape.heads} heads): {c.attention_flops / 1e12:,.3f} TFLOP each per row (4 L^2 W), "
                   f"{100 * share:.0f} % of the call")
    if c.layers:
        handover = shape.handover_bytes
        out.append(f"- {len(c.layers)} layers (models/stages.py); what crosses a cut per row: "
                   f"{min(handover[1:]) / MIB:.2f} to {max(handover[1:]) / MIB:.2f} MiB")
        out += ["", "<details><summary>per-layer FLOPs and hand-over bytes (one row)</summary>", "",
                "| layer | GFLOP | MiB crossing the cut before it | weights MiB |", "|---|---|---|---|"]
        out += [f"| {n} | {f / 1e9:,.1f} | {h / MIB:.2f} | {w / MIB:.1f} |"
                for (n, f), h, w in zip(c.layers, handover, c.layer_weight_bytes)]
        out += ["", "</details>"]
    hardware = s.hardware or [(r.gpu, r.link) for r in RIGS]
    times = ", ".join(f"{g} {1000 * paper_inputs(name, g, lk).one_device:,.1f} ms"
                      for g, lk in dict(hardware).items())
    out += ["", f"One device, the whole call ({s.branches} row(s)), with the fitted constants: {times}.", ""]
    return out


def efficiency_check() -> list[str]:
    inp = paper_inputs("flux-dev-1024", "H100 SXM", "nvlink-h100")
    run = XDIT_FLUX_STEPS * inp.one_device + inp.serial_seconds + inp.decode_seconds
    published = ", ".join(f"{how} {total} s" for how, total in XDIT_FLUX_H100.items())
    return ["### A check of the fitted constants on one device", "",
            f"xDiT's one-H100 Flux.1-dev 1024 runs of {XDIT_FLUX_STEPS} steps, text encoders and VAE included: "
            f"{published}. With the fitted constants one eager run is predicted at {run:.2f} s "
            f"({1000 * inp.one_device:.0f} ms per step, {inp.serial_seconds:.2f} s for the text encoders and the "
            f"rest and {inp.decode_seconds:.2f} s for the VAE decode). The constants were fitted to speed-ups, not "
            "to seconds: this is a check, not a fitted figure.", ""]


def decode_section() -> list[str]:
    """Each scenario's end to end in parts: the rest of the fitted serial part, the decode whole and in tiles."""
    out = ["### The VAE decode in the end to end", "",
           "Each scenario's fitted serial part cut into the text encoders and the rest, and its model's own VAE "
           "decode (`plan/paper_decode.py` MODEL_VAES, counted on meta; the VAE section's efficiency), whole on one "
           "GPU and in tiles on the pool (what every split's *end to end* below counts; one device decodes whole). "
           "Seconds, predicted.", "",
           "| scenario | VAE | GPUs | link | text encoders and the rest | decode whole | "
           + " | ".join(f"decode on {n}" for n in DEVICES) + " |", "|---|---|---|---|---|---|" + "---|" * len(DEVICES)]
    for name, s in SCENARIOS.items():
        vae = MODEL_VAES.get(s.build)
        for gpu, link in s.hardware:
            split = [paper_inputs(name, gpu, link, devices=n) for n in DEVICES]
            rest, whole = split[0].serial_seconds, split[0].decode_seconds
            cells = " | ".join(f"{i.decode_split_seconds:,.2f}" for i in split)
            out.append(f"| {name} | {vae.build if vae else 'none known: the serial part whole'} | {gpu} | {link} "
                       f"| {rest:,.2f} | {whole:,.2f} | {cells} |")
    return out + [""]


def scenario_section(name: str) -> list[str]:
    s = SCENARIOS[name]
    out = [f"### {s.title}", "", "| GPUs | link | devices | chosen | speed-up per step | end to end | output | "
           "MiB moved per step | GiB per device | best exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for gpu, link in s.hardware:
        for n in DEVICES:
            found, choice, exact = cell(name, gpu, link, n)
            best = choice.best
            fits = "" if best.memory_bytes_per_device <= gpu_named(gpu).memory_bytes else " (does not fit)"
            out.append(f"| {gpu} | {link} | {n} | {best.label()} | {best.predicted_speedup:.2f}x | "
                       f"{best.predicted_speedup_end_to_end:.2f}x | {'exact' if best.exact else 'stale'} | "
                       f"{_mib(best)} | {best.memory_bytes_per_device / GIB:.1f}{fits} | "
                       f"{exact.best.label()} {exact.best.predicted_speedup:.2f}x |")
            shown = found[:TOP] + [best] * (best not in found[:TOP])
            details += [f"**{gpu}, {link}, {n} devices** ({len(found)} candidates; top {TOP} shown)", "",
                        "| candidate | devices | speed-up per step | end to end | output | MiB moved per step | "
                        "GiB per device | exposed ms per step |", "|---|---|---|---|---|---|---|---|"]
            details += [_row(c, "**chosen:** " if c is best else "") for c in shown]
            details += ["", f"Choice: {choice.reason}", ""]
    return out + ["", "<details><summary>the top candidates of every cell</summary>", "", *details, "</details>", ""]


def _beside(peer: Peer) -> str:
    if peer.beside is None:
        return "no matching cell"
    name, gpu, link, n, label = peer.beside
    found, choice, _ = cell(name, gpu, link, n)
    c = choice.best if label is None else next(c for c in found if c.label() == label)
    what = "chosen: " if label is None else ""
    return f"{name}, {gpu}, {link}, {n} devices, {what}{c.label()}: {c.predicted_speedup:.2f}x per step"


def published_section() -> list[str]:
    """Every row of the published table beside the fitted model's prediction for it (or why it has none)."""
    rows = published.load()
    out = ["## Published measurements against the fitted model", "",
           "Each row of `tests/data/published_gpu_figures.csv` (its source in the table), the figure its peer "
           "published (speed-up over one GPU of the same source: per step, end to end, or of the sampling "
           "alone, latents out), this model's prediction with the fitted constants, and the error. The mode is how "
           "the peer launched its kernels: eager, compiled (torch.compile) or graphed (CUDA graphs). The constants "
           "were fitted to these rows "
           "(`tests/test_plan_published.py` also checks each row with it left out of the fit).", "",
           "| row | peer | model, size | GPUs, link | strategy | published | predicted | error |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size = (f"{row.height}x{row.width}" if row.height else "size not stated") + (
            f" x {row.frames}" if row.frames else "")
        mesh = " x ".join(f"{k} {v}" for k, v in row.mesh.items())
        head = (f"| {row.id} | {row.peer} | {row.model} {size} | {row.devices} x {row.gpu}, {row.link} | {mesh} "
                f"({row.mode}, {row.metric.replace('_', ' ')}) | {row.published_speedup:.2f}x |")
        why = row.unpredicted()
        if why:
            out.append(f"{head} - | not predicted: {why} |")
        else:
            guess = published.predicted(row, FITTED)
            out.append(f"{head} {guess:.2f}x | {100 * published.error(guess, row):+.0f} % |")
    return out + [""]


CONSUMER_GPUS = (("RTX 3090", "pcie4x16"), ("RTX 4090", "pcie4x16"), ("RTX 5090", "pcie5x16"))
CONSUMER_DEVICES = (2, 4)


def consumer_cell(name: str, gpu: str, link: str, devices: int, weights: str = "bf16") -> str:
    """One scenario on `devices` consumer cards, its weights in `weights`: the choice within the card's memory, or
    what it would need."""
    found = rig_candidates(name, gpu, link, devices, weights)
    try:
        best = choose(found).best
    except NothingFits:
        return f"does not fit: needs {_gib(_least(found).memory_bytes_per_device)} GiB per device"
    alone = next(c for c in found if not c.mesh)

    def said(c) -> str:
        speedup = f"{c.predicted_speedup:.2f}x, " if alone.fits else ""  # over one card only where one holds it
        return f"{c.label()}: {speedup}{c.seconds_per_call:,.2f} s per step"

    exact = "" if best.exact else f"; auto: {said(choose(found, exact_only=True).best)}"
    return said(best) + exact


def consumer_section() -> list[str]:
    """Two and four consumer cards, with and without peer-to-peer, for every scenario: what the plan chooses."""
    out = ["## Two and four consumer cards, with and without peer-to-peer", "",
           "**Predictions, not measurements.** GeForce cards have no peer-to-peer over PCIe: their exchanges go "
           "through host memory (`pcie4-nop2p`, `pcie5-nop2p`); *with* is the same slot with peer copies "
           "(`pcie4x16`, `pcie5x16`: what a workstation card gets). Each cell is what `plan/choose.py` picks within "
           "the card's memory (weights whole or sharded), its speed-up per step over one card (only where one card "
           "holds the model) and its seconds per step. Weights in bf16 (fp16 for SDXL); a model whose bf16 weights "
           "and activations do not fit one 24 GB card is shown again with **fp8** weights (`tandem plan --gpu ... "
           "--weights-dtype fp8`: 1 byte a parameter, as ComfyUI's fp8 checkpoints; compute still counted at bf16, "
           "as ComfyUI casts fp8 weights up layer by layer). *auto* is the exact choice (`auto` promises one "
           "device's output: asyncdiff, stale, is left out); where the plan's choice is asyncdiff it follows.",
           "", "| model | weights | GPUs | link | " + " | ".join(f"{n} cards" for n in CONSUMER_DEVICES) + " |",
           "|---|---|---|---|" + "---|" * len(CONSUMER_DEVICES)]
    for name in SCENARIOS:
        for weights in ("bf16", "fp8") if _needs_fp8(name) else ("bf16",):
            for gpu, p2p in CONSUMER_GPUS:
                for link in (p2p, gpu_named(gpu).link):
                    cells = " | ".join(consumer_cell(name, gpu, link, n, weights) for n in CONSUMER_DEVICES)
                    out.append(f"| {name} | {'**fp8**' if weights == 'fp8' else weights} | {gpu} | {link} | {cells} |")
    return out + [""]


def _needs_fp8(name: str) -> bool:
    """Whether scenario `name` in bf16 does not fit one 24 GB card (an RTX 4090)."""
    return not next(c for c in rig_candidates(name, "RTX 4090", "pcie4-nop2p", 1) if not c.mesh).fits


def measured_lines() -> list[str]:
    """What was measured on a lent GPU (plan/gpu_calibration.py MEASURED), or that nothing was."""
    from .gpu_calibration import MEASURED, describe, measured_files

    found = measured_files()
    out = ["### Measured on a lent GPU (tandem plan --calibrate)", "",
           "`tandem plan --calibrate --devices cuda:0[,cuda:1] --out FILE` measures a card's time per kernel launched "
           "(a call of next to no arithmetic, over its counted launches), its "
           "compute rate by work per device (one rank's part of a Ulysses split of 1, 2, 4 and 8 of the bench model "
           "flux-small, timed, its FLOPs counted) and the link (two GPUs: their exchange; one: its host copies); "
           "`tandem plan --gpu CARD --constants FILE` then predicts with the measured launch time, half work and rate "
           "(as peak_fraction of the card's published peak) and a measured peer link, the rest fitted. "
           "`tests/gpu/test_plan_calibrate.py` runs it where a GPU is lent; its files are kept in "
           f"`{MEASURED.relative_to(MEASURED.parents[2])}/`.", ""]
    if not found:
        return out + ["None is kept yet: no GPU has been lent for this page, so **every figure on it is a "
                      "prediction from the fitted constants**; none is measured.", ""]
    out += ["| file | measured |", "|---|---|"] + [f"| {name} | {describe(data)} |" for name, data in found]
    return out + ["", "The tables below still use the fitted constants; `--constants` gives a card's measured "
                      "figures in `tandem plan --gpu`.", ""]


def peers_section() -> list[str]:
    out = ["## Published peer figures (their measurements, on their hardware; not Tandem's)", "",
           "Set beside the nearest cell of this model's predictions; models, GPUs and software differ (e.g. fp8 "
           "on RTX 2000 Ada for Raylight: the section above predicts it on its own GPU), so a difference is no "
           "verdict.", "",
           "| system | setting | published figure | source | this model's prediction, nearest cell |",
           "|---|---|---|---|---|"]
    out += [f"| {p.system} | {p.setting} | {p.figure} | {p.source} | {_beside(p)} |" for p in PEERS]
    return out + ["", "No published figure was found for ComfyUI's CFG split on 4 or 8 GPUs beyond the 2x cap "
                  "reported in pull request #7063 (cfg has two branches).", ""]


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f}"


def _parts(c) -> str:
    """A candidate's memory per device: total (weights + gathered blocks + activations), GiB."""
    weights, gathered = c.weights_bytes_per_device, c.gathered_bytes_per_device
    activations = c.memory_bytes_per_device - weights - gathered
    return f"{_gib(c.memory_bytes_per_device)} ({_gib(weights)} + {_gib(gathered)} + {_gib(activations)})"


def rig_cell(name: str, rig):
    """(every candidate on the rig's devices, the rig's choice or None, (n, choice) of the fewest devices that
    hold the model or None)."""
    found = rig_candidates(name, rig.gpu, rig.link, rig.devices)
    fit = smallest_fit(name, rig.gpu, rig.link, rig.devices)
    return found, (None if fit is None else choose(found)), fit


def _least(found):
    return min(found, key=lambda c: (c.memory_bytes_per_device, -c.predicted_speedup))


def _rig_row(rig, found, choice, fit) -> str:
    head = f"| {rig.name} ({rig.gpu}, {rig.link}) |"
    if fit is None:
        least = _least(found)
        return (f"{head} does not fit: needs {_gib(least.memory_bytes_per_device)} GiB per device "
                f"({least.label()}), has {_gib(gpu_named(rig.gpu).memory_bytes)} | - | - | - | - | - |")
    n, base = fit
    best = choice.best
    return (f"{head} {sum(1 for c in found if c.fits)} of {len(found)} candidates fit | {n} device(s): "
            f"{base.best.label()}, {base.best.seconds_per_call:,.2f} s | {best.label()} | {_parts(best)} | "
            f"{best.seconds_per_call:,.2f} | {base.best.seconds_per_call / best.seconds_per_call:.2f}x |")


def _candidate_row(c, base) -> str:
    speedup = f"{base / c.seconds_per_call:.2f}x" if c.fits and base else "-"
    return (f"| {c.label()} | {c.devices} | {c.weights} | {_parts(c)} | {'yes' if c.fits else 'no'} | "
            f"{c.seconds_per_call:,.2f} | {speedup} |")


def big_models_section() -> list[str]:
    rigs = ["| rig | GPU | memory per device | link | note |", "|---|---|---|---|---|"]
    rigs += [f"| {r.name} | {r.gpu} | {gpu_named(r.gpu).memory_bytes / 1e9:g} GB "
             f"({_gib(gpu_named(r.gpu).memory_bytes)} GiB) | {r.link} | {r.note} |" for r in RIGS]
    out = ["## Models larger than one device", "",
           "**Predictions, not measurements**, as everything on this page. For each rig, every candidate "
           "`model.candidates` lists for its devices, its weights whole (replicated) or sharded (each device "
           "keeps 1/N of every block and gathers a block before it runs, the next gather posted ahead as on "
           "CUDA; N is every device of the rig, also those a smaller mesh leaves without rows, which run each "
           "forward to pass their shards on: engine/weights.py), its memory per device against the GPU's "
           "memory (`fits`, the budget `plan/choose.py` chooses within), its predicted seconds per step (one "
           "call: both guidance branches) and its predicted speed-up over the **baseline**: what `choose` picks "
           "on the fewest devices of that GPU that hold the model (one device where one does). GiB per device: "
           "total (weights kept + blocks gathered at once + activations), the activations a lower bound "
           "(latents and the widest feature maps; no attention workspace, CUDA context or allocator slack), so "
           "*fits* is optimistic near the limit. The budget is the card's whole memory.", "",
           "Flux.2-dev and HunyuanVideo: Tandem runs them through ComfyUI (`comfy_dit:flux`, "
           "`comfy_dit:hunyuan_video`; its diffusers adapter has no family for their diffusers classes), so "
           "their candidates are that family's; the FLOPs are counted on diffusers' classes (the same "
           "architecture). Strategies the plan lists but Tandem refuses for a model are left out, each named "
           "under its table. Wan 2.2 A14B has two transformers of Wan 2.1 14B's config (high-noise and "
           "low-noise experts, one per step): holding both doubles the weights; the figures are for one.", "",
           *rigs, ""]
    for name in BIG_MODELS:
        s = SCENARIOS[name]
        out += [f"### {s.title}", "",
                "| rig | fits | baseline: the fewest devices that hold it (predicted s per step) | chosen on the "
                "rig | GiB per device (weights + gathered + activations) | s per step (predicted) | speed-up "
                "over the baseline (predicted) |", "|---|---|---|---|---|---|---|"]
        details = []
        for rig in RIGS:
            found, choice, fit = rig_cell(name, rig)
            out.append(_rig_row(rig, found, choice, fit))
            base = None if fit is None else fit[1].best.seconds_per_call
            said = ("no candidate fits" if fit is None else
                    f"baseline {fit[0]} device(s), {fit[1].best.label()}: {base:,.2f} s per step")
            details += [f"**{rig.name}, {rig.devices} x {rig.gpu}, {rig.link}** ({len(found)} candidates; {said})", "",
                        "| candidate | devices | weights | GiB per device (weights + gathered + activations) | fits "
                        "| s per step (predicted) | speed-up over the baseline (predicted) |",
                        "|---|---|---|---|---|---|---|"]
            details += [_candidate_row(c, base) for c in found] + [""]
        out += ["", *(f"Left out: {strategy}: {why}." for strategy, why in s.refuses)] + [""] * bool(s.refuses)
        out += ["<details><summary>every candidate on each rig</summary>", "", *details, "</details>", ""]
    return out


# sgl-project/sglang pull request #16510: Wan 2.2 A14B (Wan 2.1's VAE) at 720x1280 on one H20, "VAE decoding
# time: 26.2795s" (its frames not given; 81, the pipeline's default, assumed). The H20's dense bf16 tensor figure
# as commonly given, 148 TFLOPS (no NVIDIA datasheet read for it: not in paper.GPUS).
SGLANG_WAN_VAE_H20_S = 26.2795
H20_BF16_FLOPS = 148e12


def _vae_row(gpu: str, link: str, p) -> str:
    devices = p.devices if p.grid[1] == 1 else f"{p.devices} (grid {p.grid[0]}x{p.grid[1]})"
    return (f"| {gpu} | {link} | {devices} | {p.seconds:,.3f} | {p.speedup:.2f}x | {_gib(p.memory_bytes)} "
            f"({_gib(p.weight_bytes)} + {_gib(p.activation_bytes)}) | {1000 * p.exchange_seconds:,.1f} "
            f"| {p.peer_bytes / MIB:,.1f} |")


def vae_model_lines(name: str) -> list[str]:
    """A VAE scenario's counted figures."""
    s = VAE_SCENARIOS[name]
    d, params = count_vae(name)
    edges = sum(edge * ways for edge, ways in d.halos)
    attention = ", ".join(f"{size / MIB:,.1f}" for size in sorted(set(d.whole_inputs)))
    return [f"Config: {s.source}. Latent {' x '.join(map(str, s.latent_shape()))}, bf16.", "",
            f"- parameters {params / 1e6:.1f} M; weights {d.weight_bytes / 1e6:.0f} MB (the whole VAE, on every device)",
            f"- FLOPs of the decode (FlopCounterMode on meta): {d.flops / 1e12:,.2f} TFLOP, of which the attention "
            f"blocks every rank runs whole {d.whole_flops / 1e12:,.3f} TFLOP ({100 * d.whole_flops / d.flops:.1f} %)",
            f"- {len(d.halos)} padded convolution calls; their halos, one band edge both ways: {edges / MIB:,.1f} MiB "
            f"per decode (counted from each call's input shape)",
            f"- {len(d.norms)} GroupNorm calls outside the attention (1 all-gather each) and {len(d.whole_inputs)} "
            f"attention call(s) (2 all-gathers each; whole input {attention} MiB): {d.collectives()} small "
            "collectives per decode on more than one device",
            f"- one device holds at most {_gib(d.activation_bytes)} GiB of activations (tensors counted live on "
            f"meta, outside the attention; {d.whole_entry_bytes / MIB:,.0f} MiB held when an attention starts, which "
            f"adds {d.whole_working_bytes / MIB:,.0f} MiB); latent {d.latent_bytes / MIB:,.2f} MiB in, image "
            f"{d.image_bytes / MIB:,.1f} MiB out", ""]


def vae_section() -> list[str]:
    wan, _ = count_vae("wan-vae-720p") if "wan-vae-720p" in VAE_SCENARIOS else (None, 0)
    out = ["## VAE decode in bands of rows, or a grid of tiles on 4 devices (issue 29)", "",
           "**Predictions, not measurements.** Each device decodes a band of the latent's rows (on 4 devices a tile "
           "of a grid of rows x columns, `models/vae_grid.py`: the grid that moves the fewest halo bytes) through "
           "the whole VAE (`models/vae_bands.py`): every padded convolution first takes its edge rows and columns "
           "(the halo, corners included) from the neighbouring tiles, every GroupNorm sums its statistics over the "
           "tiles, and an attention block gathers its whole input and runs whole on every rank. Predicted time "
           "(`plan/vae_costs.py`) = the largest tile's share of the FLOPs outside the attention + the attention's "
           "FLOPs whole + every halo "
           "exchange, exposed + a link latency per message of every small collective + the host's transfers and "
           f"per-call overhead; one device's time: counted FLOPs at {EFFICIENCY['vae']:g} of the GPU's peak "
           "(`plan/paper.py` EFFICIENCY). GiB per device: the weights (whole on every device) + the activations "
           "(the band's share of one device's peak, counted as live tensors on the meta device, or while an "
           "attention runs the band's share of what is held + the attention's working set + its gathered input; "
           "no allocator slack, cuDNN workspace or CUDA context). Not modelled: slower kernels on narrower bands, "
           "transfers hidden behind compute, a shared PCIe uplink.", "",
           "Flux.1's VAE (like SD's and SDXL's) has one attention block, in its mid block, at the latent's "
           "resolution: 1/64 of the image's pixels. Every rank runs it whole, so it bounds the speed-up "
           "(Amdahl). Wan's VAE decodes its 21 latent frames one after another (the first to 1 frame, each further "
           "one to 4), each through a cache of the frames before it: the whole decode is counted on meta, frame "
           "by frame as it runs; every frame pays its own halos and its attention (per frame, at the latent's "
           "resolution). Wan's VAE has no GroupNorm (RMS norms over the channels, row by row): no statistics to "
           "sum.", ""]
    if wan is not None:
        implied = wan.flops / (SGLANG_WAN_VAE_H20_S * H20_BF16_FLOPS)
        out += [f"A check of the stated efficiency: sglang's one-H20 Wan VAE decode of a 720p clip in "
                f"{SGLANG_WAN_VAE_H20_S:.1f} s (sgl-project/sglang pull request #16510; 81 frames assumed) and the "
                f"counted {wan.flops / 1e12:,.0f} TFLOP at the H20's {H20_BF16_FLOPS / 1e12:g} TFLOPS (as commonly "
                f"given) imply {100 * implied:.0f} % of its peak; this page assumes {100 * EFFICIENCY['vae']:.0f} % "
                "for every VAE on every GPU. A GPU with more compute per byte of memory bandwidth than the H20 "
                "(the H100 SXM: 989 TFLOPS to 3.35 TB/s; the H20: 148 to 4.0) likely reaches less of its peak on "
                "the memory-bound passes, so the H100's one-device times below are likely optimistic.", ""]
    for name, s in VAE_SCENARIOS.items():
        out += [f"### {s.title}", "", *vae_model_lines(name),
                "| GPU | link | devices | decode s (predicted) | speed-up over 1 (predicted) | GiB per device "
                "(weights + activations) | exchange ms (halos, collectives, host) | MiB between devices |",
                "|---|---|---|---|---|---|---|---|"]
        out += [_vae_row(gpu, link, vae_prediction(name, gpu, link, n)) for gpu, link in s.hardware
                for n in VAE_DEVICES]
        out += [""]
    return out


def render() -> str:
    lines = ["# GPU predictions, on paper", "",
             "**These are predictions of Tandem's cost model (`parallel_backend/plan/`), not measurements.** No GPU "
             "ran for this page: every one-device time is counted FLOPs over a GPU's published throughput, with "
             "global constants fitted to peers' published speed-ups (plan/fitted.py). Where a GPU is lent, "
             "`tandem plan --calibrate` measures its figures (the section *Measured on a lent GPU* below says which "
             "are), and `tandem plan` on CUDA devices measures a model's own call.", "",
             f"Generated by `{COMMAND}` (torch {torch.__version__.split('+')[0]}, diffusers {diffusers.__version__}); "
             "edit the generator, not this file.", "",
             "How a figure is made: time per call = the busiest device's compute + the exchange it cannot hide + the "
             "host's transfers + a per-call overhead (plan/model.py, plan/costs.py). One call per step: the two "
             "guidance branches go in one call of two rows. *Speed-up per step* is one device's call over the "
             "split's; *end to end* adds the run's steps with asyncdiff's exact warm-up step and the text encoders and "
             "VAE once: the fitted serial part (the peers' text encoders and VAE, whole on one device) cut into the "
             "VAE decode on one GPU (each model's own VAE counted on meta, at the VAE section's efficiency) and the "
             "rest (the serial part less that decode, floored at 0); one device decodes whole, a split decodes in "
             "tiles on all of the pool's devices (plan/vae_costs.py: bands of rows, a grid of tiles on 4 or more), so "
             "the end-to-end speed-up also counts the decode's split. The published rows keep the serial part whole, as "
             "their peers ran it. *MiB moved per step*: between devices plus host to devices and back. *Stale*: the "
             f"output differs from one device's (asyncdiff). A split under {FLOOR:g}x is never chosen. "
             "*Best exact*: the choice among exact strategies. GiB per device: weights plus a lower bound of the "
             "activations; \"does not fit\" marks a choice over the GPU's memory.", "",
             "Not modelled (plan/model.py): asyncdiff's stride 2, work a sequence split repeats on every rank (Wan's "
             "cross-attention to the text), devices sharing one PCIe uplink, compute slowed by a concurrent "
             "transfer, torch.compile's faster kernels (only its fewer launches are), the text encoders split over "
             "devices, fp8 matmuls (fp8 weights are counted as memory only), the decode's memory in *fits* (the "
             "decode runs after the steps: `tandem plan --gpu` states its GiB per device apart). The text encoders "
             "and VAE are one fitted cost per output pixel for every model, of which the rest is what the model's "
             "counted decode leaves: LTX-Video's VAE, 32x per side, costs far less per pixel than that, so its rest "
             "is large and its end-to-end figures are low.", ""]
    lines += inputs_section()
    lines += ["## The models (counted on the meta device)", ""]
    for name in SCENARIOS:
        lines += model_section(name)
    lines += efficiency_check()
    lines += ["## Predictions", ""]
    lines += decode_section()
    for name, scenario in SCENARIOS.items():
        if scenario.hardware:
            lines += scenario_section(name)
    lines += published_section()
    lines += peers_section()
    lines += big_models_section()
    lines += consumer_section()
    lines += vae_section()
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the GPU prediction tables (predictions, not measurements).")
    parser.add_argument("--out", required=True, help="the Markdown file to write, e.g. docs/gpu-predictions.md")
    args = parser.parse_args(argv)
    text = render()
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}: predictions of the cost model for {len(SCENARIOS)} scenarios")


if __name__ == "__main__":
    main()
