"""Bad input is refused before any work (issue 12, part 6): one sentence, exit != 0, no traceback, nothing started.

One table per entry point. CLI rows run `cli.main` in this process with a WorkerPool whose start, the sampler
loops and the bench's runs fail the test if reached, and CUDA made absent (the same on every machine); each row
must come back with its exit code, one line on stderr holding its fragment, no new child process, and soon.
API rows call GenerationRequest, ParallelConfig, run_bench, the demo's generate_pair, a pipeline and the
workflow's --set parser directly. A few rows run `tandem` as a process, for the exit code a shell sees.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch

from parallel_backend.commands import bench, cli
from parallel_backend.runtime import validation
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.hosts import diffusers as diffusers_host
from parallel_backend.plan import measure as plan_measure
from parallel_backend.runtime.pool import WorkerPool
from parallel_backend.models.sampling import GenerationRequest
from parallel_backend.hosts import tiny as tiny_pipeline

pytestmark = pytest.mark.pool

SECONDS_LIMIT = 15.0  # a refusal is quick: most rows take milliseconds; those that load a model, a few seconds
GEN = ["generate", "--quiet", "--out", "{tmp}/x.png"]
TWO = ["--devices", "cpu:2"]
BENCH = ["bench", "--quiet", "--model", "tiny"]
PLAN = ["plan", "--model", "tiny"]
RUN = ["workflow", "run", "{workflow}", "--quiet", "--out", "{tmp}/outs"]
COMPARE = ["workflow", "compare", "{workflow}", "--quiet", "--out", "{tmp}/cmp"]
LOW_MEMORY = "low memory"  # the row runs with 1 MiB of memory available

# (arguments, exit code, a fragment of the one line on stderr[, LOW_MEMORY])
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
    (GEN + ["--num-images", "64"], 1, "64 image(s) needs at least", LOW_MEMORY),
    (GEN + ["--timeout", "nan"], 1, "--timeout must be a finite number of seconds > 0; got nan"),
    (GEN + ["--timeout", "0"], 1, "--timeout must be a finite number of seconds > 0; got 0.0"),
    (GEN + TWO + ["--timeout", "-1"], 1, "--timeout must be a finite number of seconds > 0; got -1.0"),
    (GEN + ["--scheduler", "nope"], 1, "unknown scheduler 'nope'; choose one of: euler"),
    # devices
    (GEN + ["--device", "cuda"], 1, "--device cuda: this machine has no CUDA device"),
    (GEN + ["--device", "cuda:1"], 1, "--device cuda:1: this machine has no CUDA device"),
    (GEN + ["--device", "banana"], 1, "--device 'banana' is not a device"),
    (GEN + ["--devices", "cuda:0,cuda:1"], 1, "cuda:0, cuda:1 do not exist: this machine has 0 CUDA device(s)"),
    (GEN + ["--devices", "gpu:0"], 1, "device 'gpu:0' is not understood"),
    (GEN + ["--devices", "cpu:0"], 1, "a CPU pool needs at least one worker"),
    (GEN + ["--devices", "cpu,cuda:0"], 1, "devices mix CPU and CUDA workers"),
    # strategies and their knobs
    (GEN + TWO + ["--strategy", "cfg", "--cfg", "1"], 1, "cfg degree 2 needs cfg > 1"),
    (GEN + ["--devices", "auto", "--strategy", "cfg", "--cfg", "1"], 1, "cfg degree 2 needs cfg > 1"),
    (GEN + ["--devices", "cpu:1", "--strategy", "cfg"], 1, "cfg 2 x batch 1 = 2 devices, but there are 1"),
    (GEN + TWO + ["--strategy", "asyncdiff", "--warmup", "0"], 1, "strategy 'asyncdiff' on 2 stages needs warmup >= 1"),
    (GEN + TWO + ["--strategy", "asyncdiff", "--warmup", "-1"], 1, "warmup must be a whole number from 0 to 10000"),
    (GEN + TWO + ["--strategy", "asyncdiff", "--stride", "3"], 1, "stride must be 1 or 2; got 3"),
    (GEN + TWO + ["--strategy", "asyncdiff", "--stages", "0"], 1, "stages must be a whole number >= 1; got 0"),
    (GEN + TWO + ["--strategy", "cfg", "--stages", "2"], 1, "cut the model into stages"),
    (GEN + TWO + ["--strategy", "warp"], 1, "unknown strategy 'warp'"),
    (GEN + ["--strategy", "cfg"], 2, "--strategy, --stages, --ulysses, --ring and --tensor split the work over --devices: give --devices too"),
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
    (GEN + ["--model", "{models}/wrong_shapes"], 1, "could not load the pipeline in"),
    (GEN + ["--model", "{sd}", "--num-images", "8"], 1, "8 image(s) of 16 px needs at least", LOW_MEMORY),
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
    (BENCH + ["--resolution", "30"], 1, "resolution 30x30: model tiny needs multiples of 4 pixels"),
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
    (PLAN + ["--resolution", "30"], 1, "resolution 30x30: model tiny needs multiples of 4 pixels"),
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


def _refuse_work(*args, **kwargs):
    raise AssertionError("work began before the input was checked (a pool started or a sampler step ran)")


@pytest.fixture
def no_work(monkeypatch):
    """No CUDA, and any pool start, sampler loop, bench run or plan measurement fails the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(WorkerPool, "start", _refuse_work)
    monkeypatch.setattr(WorkerPool, "_start", _refuse_work)
    monkeypatch.setattr(tiny_pipeline, "denoise", _refuse_work)
    monkeypatch.setattr(diffusers_host, "make_scheduler", _refuse_work)
    monkeypatch.setattr(bench, "run_once", _refuse_work)
    monkeypatch.setattr(plan_measure, "measure_inputs", _refuse_work)
    return monkeypatch


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("row", CLI_ROWS, ids=lambda row: " ".join(row[0]).replace("{", "").replace("}", ""))
def test_cli_refuses_before_any_work(row, no_work, models, tiny_sd_folder, workflow_file, tmp_path, capfd):
    args, code, fragment = row[:3]
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "x.txt").write_text("a file")
    if LOW_MEMORY in row:
        no_work.setattr(validation, "available_bytes", lambda device="cpu": 2**20)
    places = {"tmp": tmp_path, "models": models, "sd": tiny_sd_folder, "workflow": workflow_file}
    argv = [arg.format(**places) for arg in args]
    before, started = _children(), time.monotonic()
    returned = cli.main(argv)
    took = time.monotonic() - started
    err = capfd.readouterr().err
    assert returned == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment.format(**places) in err, err
    assert _children() <= before, "a process was left running"
    assert took < SECONDS_LIMIT, f"took {took:.1f} s"


def test_asyncdiff_on_one_device_says_so_in_one_line(no_work, tmp_path, capfd):
    assert cli.main(["generate", "--devices", "cpu:1", "--strategy", "asyncdiff", "--cfg", "4", "--explain",
                     "--out", str(tmp_path / "x.png")]) == 0
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [
        "tandem: warning: asyncdiff (cfg 1 x batch 1 x stages 1) runs the whole model on one device: nothing is "
        "split (give two devices or more)"]


# ---- the API ------------------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
REQUEST_ROWS = [
    (dict(cfg=NAN), ValueError, "cfg must be a finite number from 0 to 100; got nan"),
    (dict(cfg=INF), ValueError, "cfg must be a finite number from 0 to 100; got inf"),
    (dict(cfg=-0.5), ValueError, "cfg must be a finite number from 0 to 100"),
    (dict(cfg="7"), TypeError, "cfg must be a number; got '7' (str)"),
    (dict(cfg=None), TypeError, "cfg must be a number; got None"),
    (dict(seed=1.5), ValueError, "seed must be a whole number from 0 to 9223372036854775807; got 1.5"),
    (dict(seed=-1), ValueError, "seed must be a whole number from 0 to"),
    (dict(seed=2**64), ValueError, "seed must be a whole number from 0 to"),
    (dict(seed="1"), TypeError, "seed must be a whole number; got '1' (str)"),
    (dict(seed=True), TypeError, "seed must be a whole number; got True (bool)"),
    (dict(seed=NAN), ValueError, "seed must be a whole number"),
    (dict(num_images=10**9), ValueError, "num_images must be a whole number from 1 to 10000; got 1000000000"),
    (dict(num_images=0), ValueError, "num_images must be a whole number from 1 to 10000; got 0"),
    (dict(num_images=2.5), ValueError, "num_images must be a whole number"),
    (dict(steps=0), ValueError, "steps must be a whole number from 1 to 10000; got 0"),
    (dict(steps=10**9), ValueError, "steps must be a whole number from 1 to 10000"),
    (dict(steps=INF), ValueError, "steps must be a whole number from 1 to 10000; got inf"),
    (dict(steps=None), TypeError, "steps must be a whole number; got None (NoneType)"),
    (dict(prompt=None), TypeError, "prompt must be text; got None (NoneType)"),
    (dict(prompt=7), TypeError, "prompt must be text; got 7 (int)"),
    (dict(negative_prompt=None), TypeError, "negative_prompt must be text"),
    (dict(scheduler=["euler"]), ValueError, "unknown scheduler ['euler']; choose one of"),
    (dict(scheduler="nope"), ValueError, "unknown scheduler 'nope'"),
]


def test_generation_request_keeps_whole_floats_as_ints():
    request = GenerationRequest("a handwritten 7", steps=20.0, seed=3.0, num_images=2.0, cfg=4)
    assert (request.steps, request.seed, request.num_images, request.cfg) == (20, 3, 2, 4.0)
    assert all(type(v) is int for v in (request.steps, request.seed, request.num_images))


CONFIG_ROWS = [
    (dict(strategy="asyncdiff", warmup=0), ValueError, "strategy 'asyncdiff' on 2 stages needs warmup >= 1"),
    (dict(strategy="asyncdiff", warmup=1.5), ValueError, "warmup must be a whole number from 0 to 10000; got 1.5"),
    (dict(strategy="asyncdiff", warmup=NAN), ValueError, "warmup must be a whole number"),
    (dict(strategy="asyncdiff", stages=NAN), ValueError, "stages must be a whole number >= 1; got nan"),
    (dict(strategy="asyncdiff", stride="2"), ValueError, "stride must be 1 or 2; got '2'"),
    (dict(strategy="asyncdiff", stride=True), ValueError, "stride must be 1 or 2; got True"),
    (dict(strategy="asyncdiff", time_shift="yes"), TypeError, "time_shift must be True or False"),
    (dict(strategy="batch", batch_degree=1.5), ValueError, "batch_degree must be a whole number >= 1; got 1.5"),
    (dict(strategy=None), TypeError, "strategy must be text; got None"),
    (dict(devices=2), TypeError, "devices must be text like 'cuda:0,cuda:1', 'cpu:2' or 'auto'"),
    (dict(devices=None), TypeError, "devices must be text"),
    (dict(timeout_s=NAN), ValueError, "timeout_s must be a finite number of seconds > 0; got nan"),
    (dict(timeout_s="5"), ValueError, "timeout_s must be a finite number of seconds > 0; got '5'"),
]


API_ROWS = ([(GenerationRequest, {"prompt": "a handwritten 7", **fields}, error, fragment)
             for fields, error, fragment in REQUEST_ROWS]
            + [(ParallelConfig, {"devices": "cpu:2", **fields}, error, fragment) for fields, error, fragment in CONFIG_ROWS])


@pytest.mark.parametrize("build, fields, error, fragment", API_ROWS)
def test_the_api_names_the_field(build, fields, error, fragment):
    with pytest.raises(error) as raised:
        build(**fields)
    assert fragment in str(raised.value)


BENCH_ROWS = [
    (dict(steps=0), "steps must be a whole number from 1 to 10000; got 0"),
    (dict(steps=NAN), "steps must be a whole number from 1 to 10000; got nan"),
    (dict(repeats=-1), "repeats must be a whole number from 0 to 1000; got -1"),
    (dict(strategies_=()), "strategies must name at least one strategy"),
    (dict(strategies_="cfg"), "strategies must name at least one strategy"),
    (dict(resolution="30"), "resolution 30x30: model tiny needs multiples of 4 pixels"),
    (dict(resolution="0"), "write pixels as 256 or 1024x768"),
    (dict(dtype="fp8"), "dtype 'fp8'"),
    (dict(knobs={"warmup": 0}, strategies_=("asyncdiff",)), "strategy 'asyncdiff' on 2 stages needs warmup >= 1"),
]


@pytest.mark.parametrize("fields, fragment", BENCH_ROWS)
def test_run_bench_refuses_before_a_pool_starts(fields, fragment, no_work):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        bench.run_bench(**{"model_name": "tiny", "devices": "cpu:2", "steps": 2, "repeats": 1, "progress": None,
                           **fields})


DEMO_ROWS = [
    (dict(steps=NAN), ValueError, "steps must be a whole number from 1 to 10000; got nan"),
    (dict(steps=None), TypeError, "steps must be a whole number; got None"),
    (dict(seed=1.5), ValueError, "seed must be a whole number"),
    (dict(cfg=INF), ValueError, "cfg must be a finite number from 0 to 100; got inf"),
    (dict(strategy="asyncdiff", warmup=0), ValueError, "strategy 'asyncdiff' on 2 stages needs warmup >= 1"),
    (dict(strategy="asyncdiff", stages=1.5), ValueError, "stages must be a whole number >= 1; got 1.5"),
    (dict(strategy="cfg", cfg=1.0), ValueError, "cfg degree 2 needs cfg > 1"),
    (dict(devices="cuda:0,cuda:1"), ValueError, "cuda:0, cuda:1 do not exist"),
]


@pytest.mark.parametrize("fields, error, fragment", DEMO_ROWS)
def test_the_demo_checks_like_the_api_before_loading(fields, error, fragment, no_work):
    from parallel_backend.demo.session import DemoSession, generate_pair

    session = DemoSession()
    with pytest.raises(error) as raised:
        generate_pair(session, **{"prompt": "a handwritten 7", "steps": 2, "devices": "cpu:2", **fields})
    assert fragment in str(raised.value)
    assert session._pipeline is None and session.pool is None  # nothing loaded, nothing started


def test_a_pipeline_refuses_what_memory_cannot_hold_before_a_step(digits_pipeline, no_work):
    no_work.setattr(validation, "available_bytes", lambda device="cpu": 2**20)
    with pytest.raises(ValueError, match=r"^64 image\(s\) needs at least .* GiB available on cpu; ask for fewer"):
        digits_pipeline.generate(GenerationRequest("a handwritten 7", num_images=64), progress=False)


def test_asyncdiff_warmup_0_is_refused_where_the_stages_are_known():
    from parallel_backend.engine.mesh import check_job

    config = ParallelConfig("auto", "asyncdiff", warmup=0)  # the stages depend on the machine: known at the job
    with pytest.raises(ValueError, match="strategy 'asyncdiff' on 2 stages needs warmup >= 1"):
        check_job(config, 2, guided=True)
    assert check_job(ParallelConfig("cpu:1", "asyncdiff", warmup=0), 1, True).inner == 1  # one stage: exact


def test_an_executor_counts_devices_without_starting_its_pool(no_work):
    executor = ParallelExecutor(WorkerPool("cpu:2"), ParallelConfig("cpu:2", "cfg"))
    with pytest.raises(ValueError, match="cfg degree 2 needs cfg > 1"):
        executor.check_job(guided=False)
    assert executor.check_job(guided=True).degrees() == {"cfg": 2, "batch": 1}
    assert not executor.pool.started


# ---- as a shell sees it ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["generate", "--cfg", "nan"], "cfg must be a finite number"),
    (["bench", "--steps", "0"], "steps must be a whole number"),
])
def test_as_a_process_one_line_and_exit_1(args, fragment, tmp_path):
    run = subprocess.run([sys.executable, "-m", "parallel_backend", *args, "--quiet"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("tandem: error: ") and fragment in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_the_guard_sees_work_begin(no_work, tmp_path):
    """The table's observable: good input reaches the sampler loop, where `no_work` stops it."""
    with pytest.raises(AssertionError, match="work began before the input was checked"):
        cli.main(["generate", "--quiet", "--steps", "1", "--out", str(tmp_path / "x.png")])
    with pytest.raises(AssertionError, match="work began"):
        cli.main(["generate", "--quiet", "--steps", "1", "--devices", "cpu:2", "--out", str(tmp_path / "x.png")])
