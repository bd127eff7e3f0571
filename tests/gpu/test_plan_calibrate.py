"""`tandem plan --calibrate` on the lent CUDA devices: the host's time per kernel launched, the compute rate by work
per device and the link (two GPUs: their peer exchange; one: the host<->device copies) measured there, plausible
for a GPU, and a `tandem plan --gpu ... --constants` that predicts from them. Skipped without CUDA. Where $OUT names
a folder (the device runner's), the file is copied there, so that docs/gpu-predictions.md can name what was
measured."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from parallel_backend.commands import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# tandem plan --gpu's short names, by what torch calls the card (the first match)
CARDS = (("H200", "h200"), ("H100", "h100"), ("H800", "h800"), ("H20", "h20"), ("A100", "a100"), ("L40S", "l40s"),
         ("L40", "l40"), ("L20", "l20"), ("B200", "b200"), ("5090", "rtx5090"), ("4090", "rtx4090"),
         ("3090", "rtx3090"))


def _card() -> str | None:
    name = torch.cuda.get_device_name(0)
    return next((short for token, short in CARDS if token in name), None)


def test_calibrate_on_the_lent_gpus_and_plan_with_its_figures(tmp_path, capsys):
    devices = ",".join(f"cuda:{i}" for i in range(min(torch.cuda.device_count(), 2)))
    path = tmp_path / "calibration.json"
    assert cli.main(["plan", "--calibrate", "--devices", devices, "--out", str(path)]) == 0
    data = json.loads(path.read_text())
    print(json.dumps(data, indent=1))
    if os.environ.get("OUT"):
        shutil.copy(path, os.path.join(os.environ["OUT"], f"calibration-{_card() or 'gpu'}.json"))
    assert data["devices"] == devices.split(",")
    assert 1e12 < data["flops_per_s"] < 1e16  # between a small GPU's bf16 rate and ten B200s
    assert 0 <= data["launch_s"] < 1e-3 and data["half_work_flops"] >= 0  # under a millisecond a kernel
    assert 100 < data["tiny"]["launches"] < 2000
    shards = data["shards"]
    assert all(a["seconds"] > b["seconds"] for a, b in zip(shards, shards[1:]))  # less work, less time
    link = data["link"]
    assert link["kind"] == ("peer" if "," in devices else "host-device")
    assert 1e9 < link["bandwidth_bytes_per_s"] < 2e12 and 0 < link["latency_s"] < 1e-2
    card = _card()
    if card is None:
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no published figures in plan/paper.py GPUS")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "flux-dev", "--gpu", card, "--gpus", "2", "--cfg", "1", "--steps", "28",
                     "--constants", str(path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    from parallel_backend.plan.paper import gpu_for

    fraction = data["flops_per_s"] / gpu_for(card).peak_flops
    print(f"{card}: measured {fraction:.3f} of the published peak; fitted constants say 0.675")
    assert 0.05 < fraction <= 1.2  # a measured rate near its datasheet: the card is the one named
    assert report["constants"] == str(path) and report["candidates"]
