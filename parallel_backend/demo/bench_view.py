"""The Benchmark tab's data: a `tandem bench` report (run here or loaded from JSON) as a table of speed-ups."""

from __future__ import annotations

import json

BENCH_MODELS = ("tiny", "small", "sd15", "sdxl", "flux-small", "wan-small")


def bench_strategies() -> tuple[str, ...]:
    """Every registered strategy (what `tandem bench --strategies` accepts)."""
    from .. import strategies

    return strategies.names()


def bench_figure(report: dict):
    """A pandas DataFrame, one row (bar) per strategy measured: speed-up vs one device, the ideal, and the PSNR
    against one device (`psnr_text`).

    The one-device "serial" rows are the 1.0x reference and are left out.
    """
    import pandas as pd

    rows = [{"strategy": r["strategy"], "speedup": round(float(r["speedup_vs_serial"]), 3),
             "ideal": round(float(r["ideal_speedup"]), 3), "devices": int(r["devices"]), "psnr": psnr_text(r)}
            for r in report.get("results", []) if r["strategy"] != "serial"]
    return pd.DataFrame(rows, columns=["strategy", "speedup", "ideal", "devices", "psnr"])


def psnr_text(row: dict) -> str:
    """A bench row's PSNR against one device (the bench's serial run, same inputs): "identical", "31.2 dB", or
    "not computed" where the report does not hold it (a report saved without it)."""
    value = row.get("psnr_vs_serial_db")
    if value is None:
        return "not computed"
    return "identical" if float(value) == float("inf") else f"{float(value):.1f} dB"


def load_report(path: str) -> dict:
    """A bench report from a JSON file (`tandem bench --json`); ValueError if it is not one."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read a bench report from {path}: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list) or not all(
            isinstance(r, dict) and {"strategy", "speedup_vs_serial", "ideal_speedup"} <= r.keys()
            for r in report["results"]):
        raise ValueError(f"{path} is not a tandem bench report (written by `tandem bench --json`)")
    return report


def report_table(report: dict) -> str:
    """The `tandem bench` text table, or a short summary when the report lacks some of its columns."""
    from ..commands.bench import format_table

    try:
        return format_table(report)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "\n".join(f"{r['strategy']:<10} {float(r['speedup_vs_serial']):.2f}x "
                         f"(ideal {float(r['ideal_speedup']):.2f}x), PSNR against one device {psnr_text(r)}"
                         for r in report["results"])
