"""`tandem plan`'s table and JSON: every candidate, the choice and the inputs it was predicted from."""

from __future__ import annotations

import json

from .choose import Choice
from .model import Candidate, Inputs
from ..runtime.words import counted

MIB = 2**20


def inputs_line(inp: Inputs, overhead_source: str) -> str:
    """The measured and counted inputs, in one line."""
    times = ", ".join(f"{counted(rows, 'row')} {1000 * s:.1f} ms" for rows, s in sorted(inp.call_seconds.items()))
    parts = [f"one device per call: {times}"]
    if inp.attention_seconds:
        parts.append(f"one attention of one row {1000 * inp.attention_seconds:.2f} ms x {inp.shape.attentions} "
                     f"({inp.shape.tokens} tokens, {inp.shape.heads} heads)")
    if inp.layer_seconds:
        parts.append(f"layer profile of {len(inp.layer_seconds)} layers")
    if inp.contention != 1.0 or inp.contention_by_rows:
        factors = ", ".join(f"{f:.2f}x at {r} rows" for r, f in ((1, inp.contention), *inp.contention_by_rows))
        parts.append(f"compute slower with every device busy: {factors} (measured on the pool)")
    parts.append(f"host overhead {1000 * inp.host_overhead_s:.1f} ms per call ({overhead_source})")
    if inp.decode_seconds:
        parts.append(f"end to end with the VAE decode: {inp.decode_seconds:.2f} s on one device, "
                     f"{inp.decode_split_seconds:.2f} s in tiles on every device of the pool (predicted)")
    return "inputs: " + "; ".join(parts)


def format_table(candidates: list[Candidate], choice: Choice | None, nothing_fits: str = "") -> str:
    """GiB/device: weights, activations and gathered blocks; fits: within the memory per device (blank where
    none was given). choice None: `nothing_fits` says why."""
    lines = [f"{'strategy (mesh)':<48}{'devices':>8}{'speed-up':>10}{'e2e':>7}{'':>2}{'output':<7}"
             f"{'GiB/device':>11}{'fits':>6}{'MiB moved':>11}"]
    for c in candidates:
        mark = "*" if choice is not None and c is choice.best else " "
        fits = "" if c.fits is None else ("yes" if c.fits else "no")
        lines.append(f"{mark}{c.label():<47}{c.devices:>8}{c.predicted_speedup:>9.2f}x{c.predicted_speedup_end_to_end:>6.2f}x"
                     f"{'':>2}{'exact' if c.exact else 'stale':<7}{c.memory_bytes_per_device / 2**30:>11.3f}{fits:>6}"
                     f"{(c.peer_bytes_per_call + c.host_bytes_per_call) / MIB:>11.2f}")
    lines.append(f"choice: {choice.reason}" if choice is not None else f"choice: none: {nothing_fits}")
    return "\n".join(lines)


def as_json(header: dict, inp: Inputs, candidates: list[Candidate], choice: Choice | None,
            nothing_fits: str = "") -> dict:
    return {**header, "prediction": True, "link": {"name": inp.link.name, "bandwidth_bytes_per_s": inp.link.bandwidth,
                                                    "latency_s": inp.link.latency, "source": inp.link.source},
            "inputs": {"call_seconds": {str(r): s for r, s in sorted(inp.call_seconds.items())},
                       "attention_seconds": inp.attention_seconds, "layers": len(inp.layer_seconds),
                       "host_overhead_s": inp.host_overhead_s, "contention": inp.contention,
                       "contention_by_rows": [list(pair) for pair in inp.contention_by_rows],
                       "decode_seconds": inp.decode_seconds, "decode_split_seconds": inp.decode_split_seconds},
            "candidates": [c.as_json() for c in candidates],
            "choice": {**choice.best.as_json(), "why": choice.reason} if choice is not None else
            {"why": nothing_fits}}


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
