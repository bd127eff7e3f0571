"""`tandem generate` end to end, as a user runs it: images come out, bad input gives one line and exit != 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.pool


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tandem(*args, cwd=None):
    """`tandem ARGS` as a process, running this checkout's package wherever the package is installed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (ROOT, env.get("PYTHONPATH"))))
    return subprocess.run([sys.executable, "-m", "parallel_backend", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_generate_writes_a_visible_digit(tmp_path):
    out = tmp_path / "seven.png"
    run = tandem("generate", "--prompt", "a handwritten 7", "--steps", "20", "--scheduler", "dpmpp_2m",
                 "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "tandem: 1 image, 20 steps (dpmpp_2m, cfg 4) in " in run.stdout and "ms per model call" in run.stdout
    image = Image.open(out)
    assert image.size == (256, 256)  # 32x32 pixels, upscaled 8x


@pytest.mark.slow
def test_generate_several_images_side_by_side(tmp_path):
    out = tmp_path / "grid.png"
    run = tandem("generate", "--num-images", "3", "--steps", "5", "--quiet", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (3 * 256, 256)


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["--steps", "0"], "steps must be a whole number from 1 to 10000"),
    (["--steps", "many"], "invalid int value"),
    (["--model", "/no/such/model"], "model not found"),
    (["--out", "/no/such/folder/x.png"], "does not exist"),
    (["--out", "digit.txt"], "use an image file name"),
    (["--cfg", "-1"], "cfg must be a finite number from 0 to 100"),
    (["--devices", "cpu:2", "--strategy", "ulysses", "--ring", "2"],
     "ring 2: it splits the token sequence and passes keys and values around a ring: choose a strategy that does "
     "(ring, usp)"),
    (["--devices", "cpu:2", "--strategy", "usp", "--ulysses", "4"], "ring 1 x ulysses 4 = 4 devices, but there are 2"),
    (["--ulysses", "2"], "--strategy, --stages, --ulysses, --ring, --tensor, --patch and --pipefusion split the work over --devices"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, message):
    run = tandem("generate", "--quiet", *args, cwd=tmp_path)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_bench_refuses_a_usp_ulysses_degree_that_does_not_divide_the_heads_before_a_pool_starts(monkeypatch, capsys):
    from parallel_backend.commands import bench
    from parallel_backend.commands.cli import main

    def no_pool(*_, **__):
        raise AssertionError("a pool started for a request that should have been refused")

    monkeypatch.setattr(bench, "WorkerPool", no_pool)
    args = ["bench", "--model", "flux-small", "--devices", "cpu:6", "--strategies", "usp", "--steps", "1", "--quiet"]
    assert main([*args, "--ulysses", "3", "--ring", "2"]) == 1  # flux-small has 8 heads
    error = capsys.readouterr().err
    assert "ulysses degree 3 does not divide the model's 8 attention heads: use ring" in error
    assert error.count("\n") == 1


def test_unwritable_output_is_one_line(tmp_path):
    (tmp_path / "taken.png").mkdir()  # a folder where the image should go: saving fails
    run = tandem("generate", "--quiet", "--steps", "2", "--out", str(tmp_path / "taken.png"))
    assert run.returncode != 0 and "could not write" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    run = tandem("generate", "--quiet", "--model", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert run.returncode != 0 and "no model_index.json" in run.stderr


@pytest.mark.slow
def test_generate_with_a_local_diffusers_folder(tiny_sd_folder, tmp_path):
    out = tmp_path / "sd.png"
    run = tandem("generate", "--model", str(tiny_sd_folder), "--prompt", "a red house", "--steps", "3",
                 "--scheduler", "ddim", "--quiet", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (16, 16)  # the tiny pipeline's VAE upsamples 8x8 latents 2x


def test_root_package_import_is_cheap_and_side_effect_free():
    # ComfyUI imports the folder's __init__.py at start-up: it must not pull in torch or start anything.
    root = os.path.join(os.path.dirname(__file__), "..", "__init__.py")
    code = ("import importlib.util, sys, threading\n"
            f"spec = importlib.util.spec_from_file_location('tandem_pack', {root!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert threading.active_count() == 1, 'thread started'\n"
            "assert callable(module.comfy_entrypoint)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "", run.stderr + run.stdout


def test_the_cli_and_its_argument_checks_import_no_heavy_library():
    # A refusal comes before torch, diffusers or gradio load (tests/reliability/test_bad_input.py times each one).
    light = ("commands.cli", "commands.arguments", "commands.bench_inputs", "commands.workflow", "strategies",
             "engine.config", "engine.mesh", "engine.jobs", "models.request", "models.bench_names",
             "hosts.model_folder", "plan.links", "runtime.devices", "runtime.validation", "runtime.pool_settings")
    code = ("import importlib, sys\n"
            f"for name in {light!r}:\n"
            "    importlib.import_module('parallel_backend.' + name)\n"
            "print([m for m in ('torch', 'numpy', 'diffusers', 'gradio', 'PIL', 'safetensors') if m in sys.modules])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr + run.stdout

