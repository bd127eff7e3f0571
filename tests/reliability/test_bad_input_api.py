"""Bad input handed to the API is refused before any work (issue 12, part 6): GenerationRequest, ParallelConfig,
run_bench, the demo's generate_pair, a pipeline and an executor each name the field in one sentence, with any pool
start or sampler step failing the test (`no_work`, tests/reliability/conftest.py). The CLI's table is
test_bad_input.py."""

from __future__ import annotations

import math

import pytest

from parallel_backend.commands import bench
from parallel_backend.runtime import validation
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.runtime.pool import WorkerPool
from parallel_backend.models.sampling import GenerationRequest

pytestmark = pytest.mark.pool


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
    (dict(devices="cpu:1000"), ValueError, "devices 'cpu:1000': 1000 CPU workers are more than this machine can run"),
    (dict(devices="cpu:99999999999"), ValueError, "99999999999 CPU workers are more than this machine can run"),
    (dict(devices="box2:7000/cpu:5000"), ValueError, "5000 CPU workers are more than Tandem runs on one machine"),
    (dict(hang_floor_s=0.01), ValueError, "hang_floor_s must be a finite number >= 2; got 0.01"),
    (dict(hang_factor=0.5), ValueError, "hang_factor must be a finite number >= 1; got 0.5"),
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


