"""Bad input is refused before any work (issue 12, part 6; issue 28): one sentence naming the input, exit != 0, no
traceback, nothing started.

CLI rows run `cli.main` in this process with a WorkerPool whose start, the sampler loops and the bench's runs fail
the test if reached, and CUDA made absent (the same on every machine); each row must come back with its exit code,
one line on stderr holding its fragment, no new child process, and soon. The same rows run again as `tandem`
processes, as a shell sees them: every row the arguments alone decide (all but those marked MODEL or LOW_MEMORY) is
refused in under a second of wall time with torch never imported. The API's table is test_bad_input_api.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from parallel_backend.commands import cli
from parallel_backend.runtime import validation
from parallel_backend.runtime.devices import GPU_DEVICE_FILES

pytestmark = pytest.mark.pool

ROOT = Path(__file__).resolve().parents[2]

SECONDS_LIMIT = 15.0  # a refusal is quick: most rows take milliseconds; those that load a model, a few seconds
PROCESS_SECONDS = 1.0  # a refusal the arguments decide, as a process: the interpreter's start included
GEN = ["generate", "--quiet", "--out", "{tmp}/x.png"]
TWO = ["--devices", "cpu:2"]
BENCH = ["bench", "--quiet", "--model", "tiny"]
PLAN = ["plan", "--model", "tiny"]
RUN = ["workflow", "run", "{workflow}", "--quiet", "--out", "{tmp}/outs"]
COMPARE = ["workflow", "compare", "{workflow}", "--quiet", "--out", "{tmp}/cmp"]
LOW_MEMORY = "low memory"  # the row runs with 1 MiB of memory available (in this process only)
MODEL = "model"  # the refusal needs the model itself (its weights, latent size or memory): torch loads first
DIGITS = "1" * 5000  # more digits than Python reads into an int (4300)


def run_file(name: str) -> list[str]:
    return ["workflow", "run", name, "--quiet", "--out", "{tmp}/outs"]


# (arguments, exit code, a fragment of the one line on stderr[, LOW_MEMORY | MODEL | {TANDEM_* variables}])
CLI_ROWS = [
    # numbers: finite, whole where they count, in range
    (GEN + ["--cfg", "nan"], 1, "cfg must be a finite number from 0 to 100; got nan"),
    (GEN + ["--cfg", "inf"], 1, "cfg must be a finite number from 0 to 100; got inf"),
    (GEN + ["--cfg=-inf"], 1, "cfg must be a finite number from 0 to 100; got -inf"),
    (GEN + ["--cfg", "-1"], 1, "cfg must be a finite number from 0 to 100; got -1.0"),
    (GEN + ["--cfg", "101"], 1, "cfg must be a finite number from 0 to 100"),
    (GEN + ["--steps", "0"], 1, "steps must be a whole number from 1 to 10000; got 0"),
    (GEN + ["--steps", "-5"], 1, "steps must be a whole number from 1 to 10000; got -5"),
    (GEN + ["--steps", "1000000000"], 1, "steps must be a whole number from 1 to 10000; got 1000000000"),
    (GEN + ["--steps", "2.5"], 2, "argument --steps: invalid int value: '2.5'"),
    (GEN + ["--seed", "-1"], 1, "seed must be a whole number from 0 to 9223372036854775807; got -1"),
    (GEN + ["--seed", str(2**63)], 1, "seed must be a whole number from 0 to 9223372036854775807"),
    (GEN + ["--seed", "1.5"], 2, "argument --seed: invalid int value: '1.5'"),
    (GEN + ["--num-images", "0"], 1, "num_images must be a whole number from 1 to 10000; got 0"),
    (GEN + ["--num-images", "1000000000"], 1, "num_images must be a whole number from 1 to 10000"),
    (GEN + ["--num-images", "64"], 1, "64 images needs at least", LOW_MEMORY),
    (GEN + ["--timeout", "nan"], 1, "--timeout must be a finite number of seconds > 0; got nan"),
    (GEN + ["--timeout", "0"], 1, "--timeout must be a finite number of seconds > 0; got 0.0"),
    (GEN + TWO + ["--timeout", "-1"], 1, "--timeout must be a finite number of seconds > 0; got -1.0"),
    (GEN + ["--scheduler", "nope"], 1, "unknown scheduler 'nope'; choose one of: euler"),
    # devices
    (GEN + ["--device", "cuda"], 1, "--device cuda: this machine has no CUDA device"),
    (GEN + ["--device", "cuda:1"], 1, "--device cuda:1: this machine has no CUDA device"),
    (GEN + ["--device", "banana"], 1, "--device 'banana' is not a device"),
    (GEN + ["--devices", "cuda:0,cuda:1"], 1, "cuda:0, cuda:1 do not exist: this machine has 0 CUDA devices"),
    (GEN + ["--devices", "gpu:0"], 1, "device 'gpu:0' is not understood"),
    (GEN + ["--devices", "cpu:0"], 1, "a CPU pool needs at least one worker"),
    (GEN + ["--devices", "cpu,cuda:0"], 1, "devices mix CPU and CUDA workers"),
    # strategies and their knobs
    (GEN + TWO + ["--strategy", "cfg", "--cfg", "1"], 1, "cfg degree 2 needs cfg > 1"),
    (GEN + ["--devices", "auto", "--strategy", "cfg", "--cfg", "1"], 1, "cfg degree 2 needs cfg > 1"),
    (GEN + ["--devices", "cpu:1", "--strategy", "cfg"], 1, "cfg 2 x batch 1 = 2 devices, but there are 1", MODEL),
    (GEN + TWO + ["--strategy", "asyncdiff", "--warmup", "0"], 1, "strategy 'asyncdiff' on 2 stages needs warmup >= 1", MODEL),
    (GEN + TWO + ["--strategy", "asyncdiff", "--warmup", "-1"], 1, "warmup must be a whole number from 0 to 10000"),
    (GEN + TWO + ["--strategy", "asyncdiff", "--stride", "3"], 1, "stride must be 1 or 2; got 3"),
    (GEN + TWO + ["--strategy", "asyncdiff", "--stages", "0"], 1, "stages must be a whole number >= 1; got 0"),
    (GEN + TWO + ["--strategy", "cfg", "--stages", "2"], 1, "cut the model into stages"),
    (GEN + TWO + ["--strategy", "warp"], 1, "unknown strategy 'warp'"),
    (GEN + ["--strategy", "cfg"], 2, "--strategy, --stages, --ulysses, --ring, --tensor, --patch and --pipefusion split the work over --devices: give --devices too"),
    (GEN + ["--explain"], 2, "--explain needs --devices"),
    # output paths
    (["generate", "--quiet", "--out", "/proc/x.png"], 1, "--out /proc/x.png: could not write there"),
    (["generate", "--quiet", "--out", "/no/such/dir/x.png"], 1, "folder /no/such/dir does not exist"),
    (["generate", "--quiet", "--out", "{tmp}/x.txt"], 1, "use an image file name ending in .png"),
    (["generate", "--quiet", "--out", "{tmp}/taken.png"], 1, "taken.png: could not write there (it is a folder)"),
    # model folders
    (GEN + ["--model", "/no/such/model"], 1, "model not found: /no/such/model"),
    (GEN + ["--model", "{models}/a_file"], 1, "a_file is a single file"),
    (GEN + ["--model", "{models}/empty"], 1, "it has no model_index.json"),
    (GEN + ["--model", "{models}/list_index"], 1, "list_index/model_index.json holds a JSON list, not the object"),
    (GEN + ["--model", "{models}/binary_index"], 1, "binary_index/model_index.json is not UTF-8 text"),
    (GEN + ["--model", "{models}/broken_index"], 1, "broken_index/model_index.json is not valid JSON"),
    (GEN + ["--model", "{models}/flux"], 1, "holds a FluxPipeline pipeline; supported: StableDiffusionPipeline"),
    (GEN + ["--model", "{models}/no_vae"], 1, "model_index.json names 'vae', but there is no folder"),
    (GEN + ["--model", "{models}/bad_config"], 1, "bad_config/unet/config.json is not valid JSON"),
    (GEN + ["--model", "{models}/garbage_unet"], 1,
     "garbage_unet/unet/diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    (GEN + ["--model", "{models}/cut_text_encoder"], 1,
     "cut_text_encoder/text_encoder/model.safetensors is not a readable safetensors file"),
    (GEN + ["--model", "{models}/wrong_shapes"], 1, "could not load the pipeline in", MODEL),
    (GEN + ["--model", "{sd}", "--num-images", "8"], 1, "8 images of 16 px needs at least", LOW_MEMORY),
    # tandem bench
    (BENCH + ["--steps", "0"], 1, "steps must be a whole number from 1 to 10000; got 0"),
    (BENCH + ["--steps", "20000"], 1, "steps must be a whole number from 1 to 10000; got 20000"),
    (BENCH + ["--repeats", "-1"], 1, "repeats must be a whole number from 0 to 1000; got -1"),
    (BENCH + ["--strategies", "warp"], 1, "unknown strategy 'warp'"),
    (BENCH + ["--strategies", "auto"], 1, "unknown strategy 'auto'"),
    (BENCH + ["--strategies", ","], 1, "strategies must name at least one strategy"),
    (BENCH + ["--strategies", "cfg,batch,cfg"], 1, "strategies name cfg more than once"),
    (BENCH + ["--resolution", "big"], 1, "resolution 'big': write pixels as 256 or 1024x768"),
    (BENCH + ["--resolution", "100000"], 1, "(from 8 to 16384)"),
    (BENCH + ["--resolution", "30"], 1, "resolution 30x30: model tiny needs multiples of 4 pixels", MODEL),
    (BENCH + ["--resolution", "1024"], 1, "resolution 1024x1024 for model tiny needs at least", LOW_MEMORY),
    (BENCH + ["--json", "/no/such/dir/x.json"], 1, "--json /no/such/dir/x.json: folder /no/such/dir does not exist"),
    (BENCH + ["--json", "/proc/x.json"], 1, "--json /proc/x.json: could not write there"),
    (BENCH + ["--dtype", "fp8"], 1, "dtype 'fp8': choose auto, fp32"),
    (BENCH + ["--devices", "cuda:0,cuda:1"], 1, "cuda:0, cuda:1 do not exist"),
    (BENCH + ["--devices", "cpu:1", "--strategies", "cfg"], 1, "cfg 2 x batch 1 = 2 devices, but there are 1"),
    (BENCH + ["--strategies", "asyncdiff", "--warmup", "0"], 1, "strategy 'asyncdiff' on 2 stages needs warmup >= 1"),
    (["bench", "--quiet", "--model", "sd99"], 1, "unknown bench model 'sd99'"),
    # tandem plan (refused before the model is measured)
    (PLAN + ["--model", "sd99"], 1, "unknown bench model 'sd99'"),
    (PLAN + ["--link", "pcie9"], 1, "unknown link 'pcie9'; choose probe (measure it) or one of: pcie4x16"),
    (PLAN + ["--cfg", "0.5"], 1, "cfg must be a finite number from 1 to 100; got 0.5"),
    (PLAN + ["--cfg", "nan"], 1, "cfg must be a finite number from 1 to 100; got nan"),
    (PLAN + ["--resolution", "big"], 1, "resolution 'big': write pixels as 256 or 1024x768"),
    (PLAN + ["--resolution", "30"], 1, "resolution 30x30: model tiny needs multiples of 4 pixels", MODEL),
    (PLAN + ["--frames", "17"], 1, "model tiny makes still images"),
    (PLAN + ["--resolution", "1024"], 1, "resolution 1024x1024 for model tiny needs at least", LOW_MEMORY),
    (PLAN + ["--steps", "0"], 1, "steps must be a whole number from 1 to 10000; got 0"),
    (PLAN + ["--devices", "cuda:0,cuda:1"], 1, "cuda:0, cuda:1 do not exist"),
    (PLAN + ["--devices", "gpu:0"], 1, "device 'gpu:0' is not understood"),
    (PLAN + ["--json", "/no/such/dir/x.json"], 1, "--json /no/such/dir/x.json: folder /no/such/dir does not exist"),
    # tandem demo (refused before gradio loads)
    (["demo", "--port", "0"], 1, "--port must be a whole number from 1 to 65535; got 0"),
    (["demo", "--port", "70000"], 1, "--port must be a whole number from 1 to 65535; got 70000"),
    (["demo", "--model", "{models}/list_index"], 1, "model_index.json holds a JSON list"),
    # tandem workflow run / compare (refused before the server is contacted)
    (RUN + ["--timeout", "nan"], 1, "--timeout must be a finite number of seconds > 0; got nan"),
    (RUN + ["--timeout", "-3"], 1, "--timeout must be a finite number of seconds > 0"),
    (RUN + ["--set", "3.cfg=NaN"], 1, "--set '3.cfg=NaN': NaN is not a finite number"),
    (RUN + ["--set", "3.cfg=1e999"], 1, "--set '3.cfg=1e999': 1e999 is not a finite number"),
    (RUN + ["--set", "3.steps=[1, -Infinity]"], 1, "is not a finite number"),
    (RUN + ["--set", "3seed7"], 1, "write NODE.INPUT=VALUE"),
    (RUN + ["--server", "ftp://127.0.0.1"], 1, "--server 'ftp://127.0.0.1': give the server's address"),
    (RUN + ["--out", "/proc/outs"], 1, "--out /proc/outs: could not write there"),
    (RUN + ["--out", "{tmp}/x.txt/outs"], 1, "x.txt is a file, not a folder"),
    (["workflow", "run", "/no/such.json", "--quiet", "--out", "{tmp}/outs"], 1, "workflow file not found"),
    (COMPARE + ["--json", "/no/such/dir/x.json"], 1, "--json /no/such/dir/x.json: folder /no/such/dir does not exist"),
    (COMPARE + ["--timeout", "inf"], 1, "--timeout must be a finite number of seconds > 0; got inf"),
    (COMPARE + ["--repeats", "0"], 1, "--repeats must be at least 1"),
    # issue 28: CPU workers bounded by the machine's cores and memory, in generate, bench and plan alike
    (GEN + ["--devices", "cpu:1000"], 1, "devices 'cpu:1000': 1000 CPU workers are more than this machine can run"),
    (GEN + ["--devices", "cpu:99999999999"], 1, "99999999999 CPU workers are more than this machine can run"),
    (BENCH + ["--devices", "cpu:1000"], 1, "devices 'cpu:1000': 1000 CPU workers are more than this machine can run"),
    (PLAN + ["--devices", "cpu:1000"], 1, "devices 'cpu:1000': 1000 CPU workers are more than this machine can run"),
    # issue 28: the 16 inputs that fell short, each refused before work, naming the option, variable or file
    (run_file("/dev/zero"), 1, "workflow file /dev/zero is a character device, not a regular file"),
    (run_file("{tmp}/pipe.json"), 1, "workflow file {tmp}/pipe.json is a named pipe, not a regular file"),
    (run_file("{tmp}/big.json"), 1, "workflow file {tmp}/big.json holds 65.0 MiB, more than the 64 MiB"),
    (["generate", "--quiet", "--out", "{tmp}/x.png/"], 1, "--out {tmp}/x.png/: a name ending in '/' is a folder's"),
    (GEN + ["--device", "cpu:5"], 1, "--device cpu:5: the CPU is one device, without a number; use cpu"),
    (run_file("{tmp}/latin1.json"), 1, "workflow file {tmp}/latin1.json is not UTF-8 text"),
    (run_file("{tmp}/deep.json"), 1, "workflow file {tmp}/deep.json nests JSON arrays or objects too deeply"),
    (RUN + ["--server", "http://[::1"], 1, "--server 'http://[::1' is not an address (Invalid IPv6 URL)"),
    (RUN + ["--server", "http://127.0.0.1:99999"], 1, "--server 'http://127.0.0.1:99999': the port must be a number"),
    (RUN + ["--set", f"3.seed={DIGITS}"], 1, "(5007 characters): its value is a number of 5000 digits, more than"),
    (BENCH + ["--json", "/dev/full"], 1, "--json /dev/full: it is a character device, not a regular file"),
    (PLAN + ["--json", "/dev/full"], 1, "--json /dev/full: it is a character device, not a regular file"),
    (COMPARE + ["--json", "/dev/full"], 1, "--json /dev/full: it is a character device, not a regular file"),
    (["demo", "--host", "8.8.8.8"], 1, "--host 8.8.8.8: this machine cannot listen there"),
    (GEN, 1, "TANDEM_HANG_FLOOR_S='0.01': hang_floor_s must be a finite number >= 2", {"TANDEM_HANG_FLOOR_S": "0.01"}),
    (GEN, 1, "TANDEM_LINK_TIMEOUT_S='abc' is not a valid number", {"TANDEM_LINK_TIMEOUT_S": "abc"}),
    (BENCH, 1, "TANDEM_DEVICES='garbage': device 'garbage' is not understood", {"TANDEM_DEVICES": "garbage"}),
    (PLAN, 1, "TANDEM_POOL_START='bogus' is not one of: on_load, on_first_use, off", {"TANDEM_POOL_START": "bogus"}),
]


@pytest.fixture(scope="module")
def models(tiny_sd_folder, tmp_path_factory):
    """Model folders that are wrong in one way each, made from the tiny SD pipeline."""
    root = tmp_path_factory.mktemp("bad_models")

    def copy(name):
        return shutil.copytree(tiny_sd_folder, root / name)

    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    for name, content in (("list_index", b"[1, 2]"), ("binary_index", b"\xef\xbb\xff\xfe\x00garbage"),
                          ("broken_index", b'{"_class_name": ')):
        (root / name).mkdir()
        (root / name / "model_index.json").write_bytes(content)
    (root / "flux").mkdir()
    (root / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    shutil.rmtree(copy("no_vae") / "vae")
    (copy("bad_config") / "unet" / "config.json").write_text("{garbage")
    (copy("garbage_unet") / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(300))
    weights = copy("cut_text_encoder") / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    config = copy("wrong_shapes") / "unet" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), cross_attention_dim=48)))
    return root


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("workflow") / "api.json"
    path.write_text(json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 4, "cfg": 7.0}}}))
    return path


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _files(tmp_path: Path) -> None:
    """The files some rows name: a folder where an image should go, a file where a folder should, a named pipe, a
    workflow file too large, one nested too deeply and one that is not UTF-8."""
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "x.txt").write_text("a file")
    os.mkfifo(tmp_path / "pipe.json")
    with open(tmp_path / "big.json", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: takes no disk
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.json").write_bytes('{"3": {"class_type": "Caf\xe9"}}'.encode("latin-1"))


def _argv(row, places: dict) -> list[str]:
    return [arg.format(**places) for arg in row[0]]


def _variables(row) -> dict:
    return next((mark for mark in row[3:] if isinstance(mark, dict)), {})


def _row_id(row) -> str:
    text = " ".join(row[0]).replace("{", "").replace("}", "").replace(DIGITS, "<5000 digits>")
    return " ".join([*(f"{k}={v}" for k, v in _variables(row).items()), text])


@pytest.mark.parametrize("row", CLI_ROWS, ids=_row_id)
def test_cli_refuses_before_any_work(row, no_work, models, tiny_sd_folder, workflow_file, tmp_path, capfd):
    args, code, fragment = row[:3]
    _files(tmp_path)
    if LOW_MEMORY in row:
        no_work.setattr(validation, "available_bytes", lambda device="cpu": 2**20)
    for name, value in _variables(row).items():
        no_work.setenv(name, value)
    places = {"tmp": tmp_path, "models": models, "sd": tiny_sd_folder, "workflow": workflow_file}
    before, started = _children(), time.monotonic()
    returned = cli.main(_argv(row, places))
    took = time.monotonic() - started
    err = capfd.readouterr().err
    assert returned == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment.format(**places) in err, err
    assert _children() <= before, "a process was left running"
    assert took < SECONDS_LIMIT, f"took {took:.1f} s"


# The command as a shell runs it, saying at its exit whether torch was ever imported.
AS_TANDEM = """
import runpy, sys
try:
    runpy.run_module("parallel_backend", run_name="__main__", alter_sys=True)
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported")
"""
GPU_HERE = any(os.path.exists(path) for path in GPU_DEVICE_FILES)  # then torch counts the GPUs: CUDA rows skip
ARGUMENT_ROWS = [row for row in CLI_ROWS if LOW_MEMORY not in row and MODEL not in row]


def tandem_process(argv: list[str], cwd, variables: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`tandem ARGV` as a process (the package from this checkout), and its wall time in seconds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(variables or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", AS_TANDEM, *argv], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=120)
    return run, time.monotonic() - started


@pytest.mark.parametrize("row", ARGUMENT_ROWS, ids=_row_id)
def test_as_a_process_refused_in_under_a_second_without_torch(row, models, tiny_sd_folder, workflow_file, tmp_path):
    if GPU_HERE and any(word in " ".join(row[0]) for word in ("cuda", "auto")):
        pytest.skip("a machine with a GPU driver: torch counts its GPUs, and the row's CUDA devices may exist")
    args, code, fragment = row[:3]
    _files(tmp_path)
    places = {"tmp": tmp_path, "models": models, "sd": tiny_sd_folder, "workflow": workflow_file}
    run, took = tandem_process(_argv(row, places), tmp_path, _variables(row))
    assert run.returncode == code, run.stderr
    assert run.stderr.startswith("tandem: error: ") and fragment.format(**places) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "torch not imported", run.stdout
    assert took < PROCESS_SECONDS, f"took {took:.2f} s"


def test_asyncdiff_on_one_device_says_so_in_one_line(no_work, tmp_path, capfd):
    assert cli.main(["generate", "--devices", "cpu:1", "--strategy", "asyncdiff", "--cfg", "4", "--explain",
                     "--out", str(tmp_path / "x.png")]) == 0
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [
        "tandem: warning: asyncdiff (cfg 1 x batch 1 x stages 1) runs the whole model on one device: nothing is "
        "split (give two devices or more)"]


# ---- as a shell sees it ---------------------------------------------------------------------------------------

def test_the_comfy_pack_refuses_a_wrong_variable_naming_it(no_work, monkeypatch):
    """ComfyUI: a wrong TANDEM_DEVICES or TANDEM_POOL_START starts no pool; Tandem's nodes fail naming it."""
    for variable, value, fragment in (
            ("TANDEM_DEVICES", "garbage", "TANDEM_DEVICES='garbage': device 'garbage' is not understood"),
            ("TANDEM_POOL_START", "bogus", "TANDEM_POOL_START='bogus' is not one of: on_load, on_first_use, off")):
        monkeypatch.setenv(variable, value)
        spec = importlib.util.spec_from_file_location("tandem_nodes_runtime", ROOT / "nodes" / "runtime.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # builds RUNTIME as the pack's load does
        runtime = module.RUNTIME
        runtime.start_on_load()  # starts nothing
        for attempt in (lambda: runtime.get_pool("auto"), lambda: runtime.check_devices("cpu:2")):
            with pytest.raises(ValueError, match=re.escape(fragment)):
                attempt()
        assert runtime.pool is None and runtime.status()["error"].startswith(fragment)
        monkeypatch.delenv(variable)


def test_the_guard_sees_work_begin(no_work, tmp_path):
    """The table's observable: good input reaches the sampler loop, where `no_work` stops it."""
    with pytest.raises(AssertionError, match="work began before the input was checked"):
        cli.main(["generate", "--quiet", "--steps", "1", "--out", str(tmp_path / "x.png")])
    with pytest.raises(AssertionError, match="work began"):
        cli.main(["generate", "--quiet", "--steps", "1", "--devices", "cpu:2", "--out", str(tmp_path / "x.png")])
