"""`tandem workflow compare`: a workflow against its stock twin (or another workflow) on a running ComfyUI.

Both run on the same server, in alternation, after one untimed warm-up run each (models loaded, pool started,
weights shipped). The times are ComfyUI's own (execution start to success, from the run's history); the
outputs of each variant's last run are compared file by file. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from .workflow import ComfyClient, Session, WorkflowError, apply_settings, load_workflow

# Multi-GPU sampler node -> the stock node with the same inputs (less "settings").
STOCK_SAMPLERS = {"TandemKSampler": "KSampler", "TandemKSamplerAdvanced": "KSamplerAdvanced"}
MODEL_NODE, SETTINGS_NODE = "TandemModel", "TandemSettings"


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def stock_twin(workflow: dict) -> dict:
    """The same graph on ComfyUI's stock nodes: Multi-GPU samplers become their stock counterparts, Multi-GPU
    Model nodes are bypassed (their input model is used directly), and settings nodes left unused are dropped."""
    twin = json.loads(json.dumps(workflow))
    bypass = {node_id: node["inputs"].get("model") for node_id, node in twin.items() if node["class_type"] == MODEL_NODE}
    swapped = [node_id for node_id, node in twin.items() if node["class_type"] in STOCK_SAMPLERS]
    if not bypass and not swapped:
        raise WorkflowError("the workflow has no Multi-GPU node (TandemKSampler, TandemKSamplerAdvanced, TandemModel):"
                            " nothing to compare with stock; pass --against OTHER.json to compare two workflows")
    for node_id in bypass:
        del twin[node_id]
    for node_id in swapped:
        twin[node_id]["class_type"] = STOCK_SAMPLERS[twin[node_id]["class_type"]]
        twin[node_id]["inputs"].pop("settings", None)
    for node in twin.values():
        for name, value in node["inputs"].items():
            while _is_link(value) and value[0] in bypass:
                value = bypass[value[0]]
            node["inputs"][name] = value
    used = {value[0] for node in twin.values() for value in node["inputs"].values() if _is_link(value)}
    for node_id in [i for i, node in twin.items() if node["class_type"] == SETTINGS_NODE and i not in used]:
        del twin[node_id]
    return twin


def _seconds(entry: dict) -> float:
    """ComfyUI's execution time of a run: its execution_start to execution_success timestamps (ms)."""
    stamps = {event: data.get("timestamp") for event, data in entry.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        raise WorkflowError("the run's history has no start/success timestamps (is this ComfyUI too old?)")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def _cached(entry: dict) -> set[str]:
    return {node for event, data in entry.get("status", {}).get("messages", []) if event == "execution_cached"
            for node in data.get("nodes", [])}


def _changed_nodes(a: dict, b: dict) -> set[str]:
    return {node_id for node_id in a.keys() & b.keys() if a[node_id] != b[node_id]} | (a.keys() ^ b.keys())


def compare_files(a: Path, b: Path) -> str:
    """How two output files differ: images in 8-bit levels and PSNR, latents relative to their scale."""
    try:
        return _compare_files(a, b)
    except Exception as exc:  # an unreadable or unexpected file is a verdict, not a failed comparison run
        return f"cannot compare ({type(exc).__name__}: {exc})"


def _compare_files(a: Path, b: Path) -> str:
    if a.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        import numpy as np
        from PIL import Image

        x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
        y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
        if x.shape != y.shape:
            return f"different sizes {x.shape} vs {y.shape}"
        mse = float(((x - y) ** 2).mean())
        psnr = "inf" if mse == 0 else f"{10 * math.log10(255.0 ** 2 / mse):.1f}"
        return f"max |diff| {int(abs(x - y).max())}/255, PSNR {psnr} dB"
    if a.suffix == ".latent":
        from safetensors.torch import load

        x, y = (load(path.read_bytes())["latent_tensor"] for path in (a, b))
        if x.shape != y.shape:
            return f"different shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        difference, scale = (x - y).abs().max().item(), max(1.0, x.abs().max().item())
        return f"max |diff| {difference:.3g} ({difference / scale:.1e} of the scale)"
    return "identical bytes" if a.read_bytes() == b.read_bytes() else "different bytes"


def _pool_status(session: Session) -> dict | None:
    """The server's /tandem/status (None: the server has no Tandem pack)."""
    try:
        return session.client.get_json("/tandem/status")
    except WorkflowError:
        return None


def _last_pool_run(session: Session, before: dict | None, expected: int, check: bool) -> dict:
    """The pool's last run, after checking (for a stock-twin comparison) that every Multi-GPU run used the pool:
    a node that fell back to the stock path would make the comparison stock against stock."""
    after = _pool_status(session)
    if after is None or before is None:
        if check:
            raise WorkflowError(f"{session.client.server} has no Tandem pack (/tandem/status): nothing ran on a pool")
        return {}
    ran = after["runs"] - before["runs"]
    if check and ran < expected:
        raise WorkflowError(f"only {ran} of {expected} Multi-GPU runs used the pool; the others took the stock "
                            "path (ComfyUI's log says why: 'Tandem: using the stock sampling path')")
    return after.get("last_run", {}) if ran > 0 else {}


def what_ran(run: dict) -> str:
    """How the pool ran a call, from /tandem/status's `last_run`: on one device, nothing split (e.g. `auto` found
    no split worth it), or the mesh that split it, with the devices it left idle."""
    idle, used = len(run.get("devices", [])) - 1, run.get("devices_used")
    if used == 1:
        return f"the whole model on one device{f' ({idle} idle)' if idle > 0 else ''}: nothing was split"
    return f"split as {run.get('mesh')}" if used else str(run.get("mesh"))  # used unknown: an older pack's status


@dataclasses.dataclass
class Comparison:
    names: tuple[str, str]
    seconds: dict[str, list[float]]
    outputs: dict[str, str]  # output key -> how the two variants' files differ
    pool: dict

    def speedup(self) -> float:
        baseline, candidate = (statistics.median(self.seconds[name]) for name in self.names)
        return baseline / candidate

    def table(self) -> str:
        rows = [f"{'variant':<10}{'runs':>5}{'median s':>10}{'best s':>9}{'speedup':>9}"]
        baseline = statistics.median(self.seconds[self.names[0]])
        for name in self.names:
            times = self.seconds[name]
            rows.append(f"{name:<10}{len(times):>5}{statistics.median(times):>10.2f}{min(times):>9.2f}"
                        f"{baseline / statistics.median(times):>8.2f}x")
        rows += [f"output {key}: {verdict}" for key, verdict in sorted(self.outputs.items())]
        if self.pool:
            rows.append(f"pool: {', '.join(self.pool.get('devices', []))}; last run: {self.pool.get('calls')} calls, "
                        f"median {1000 * self.pool.get('median_seconds_per_call', 0):.1f} ms per call; its last "
                        f"call: {what_ran(self.pool)}")
        return "\n".join(rows)

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "speedup": self.speedup()}


def compare_workflows(path: str, server: str, settings: list[str], against: str | None = None, repeats: int = 2,
                      out_dir: str = "tandem-compare", timeout_s: float = 3600.0,
                      progress=lambda node, value, total: None, say=lambda line: None) -> Comparison:
    """Times the workflow at `path` against its stock twin (or the workflow at `against`) and compares outputs."""
    if repeats < 1:
        raise WorkflowError(f"--repeats must be at least 1 (got {repeats})")
    tandem = apply_settings(load_workflow(path), settings, ComfyClient(server).declared_inputs)
    baseline = load_workflow(against) if against else stock_twin(tandem)
    names = ("other" if against else "stock", "tandem")
    variants = dict(zip(names, (baseline, tandem)))
    changed = _changed_nodes(baseline, tandem)
    if not changed:
        raise WorkflowError("the two workflows are the same graph: ComfyUI would answer the second from its cache")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, dict] = {}
    with Session(server, timeout_s) as session:
        before = _pool_status(session)
        for round_number in range(repeats + 1):
            for name in names:
                label = "warm-up" if round_number == 0 else f"run {round_number}/{repeats}"
                say(f"{name} workflow, {label}")
                entry = session.run(variants[name], progress)
                if round_number == 0:
                    continue
                cached = _cached(entry) & changed
                if cached:
                    raise WorkflowError(f"ComfyUI answered nodes {sorted(cached)} of '{name}' from its cache, so the "
                                        "time means nothing; restart ComfyUI without --cache-lru/--cache-ram")
                took = _seconds(entry)
                if took <= 0:
                    raise WorkflowError(f"'{name}' ran in no measurable time: nothing was computed")
                seconds[name].append(took)
                last[name] = entry
        pool = _last_pool_run(session, before, repeats + 1, check=not against)
        folder = Path(out_dir)
        files = {name: session.download_outputs(last[name], folder / name) for name in names}
    outputs = {}
    for key in sorted(files[names[0]].keys() | files[names[1]].keys()):
        if key in files[names[0]] and key in files[names[1]]:
            outputs[key] = compare_files(files[names[0]][key], files[names[1]][key])
        else:
            outputs[key] = f"only in {names[0] if key in files[names[0]] else names[1]}"
    return Comparison(names, seconds, outputs, pool)
