"""CUDA paths (NCCL group, CUDA tensors through the pool, fp16). Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch

from parallel_backend.engine.oracle import job_for, run_loop
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _devices() -> str:
    return ",".join(f"cuda:{i}" for i in range(min(torch.cuda.device_count(), 2)))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.float16, 2e-2)])
def test_batch_on_cuda_workers_equals_the_host_device(dtype, atol):
    model = build_bench_model("sd15-narrow", dtype)
    model.unet.to("cuda:0")
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job_for("batch"), resolution, steps=4, repeats=0).latents
    devices = _devices()
    with WorkerPool(devices) as pool:  # NCCL process group, one rank per process
        executor = ParallelExecutor(pool, ParallelConfig(devices, "batch"))
        result = run_loop(model, job_for("batch"), resolution, steps=4, repeats=0, executor=executor).latents
        assert all(peak > 0 for peak in pool.memory())
    torch.testing.assert_close(result.cpu(), reference.cpu(), atol=atol, rtol=atol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cfg_on_two_gpus_equals_one():
    model = build_bench_model("sd15-narrow", torch.float16)
    model.unet.to("cuda:0")
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job_for("cfg"), resolution, steps=4, repeats=0).latents
    with WorkerPool("cuda:0,cuda:1") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cuda:0,cuda:1", "cfg"))
        result = run_loop(model, job_for("cfg"), resolution, steps=4, repeats=0, executor=executor).latents
    torch.testing.assert_close(result.cpu(), reference.cpu(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two ranks on one GPU)")
def test_asyncdiff_stages_on_two_gpus_pair_their_hand_over_in_issue_order():
    """NCCL ignores point-to-point tags: the next stage must post its receives in the order the sends are
    issued (skips as they become final, then h). Warm-up covering every step is exact, so it must equal one
    device; a mispaired hand-over fails with a size mismatch or gives wrong latents."""
    model = build_bench_model("sd15-narrow", torch.float16)
    model.unet.to("cuda:0")
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job_for("asyncdiff"), resolution, steps=4, repeats=0).latents
    with WorkerPool("cuda:0,cuda:1") as pool:
        exact = ParallelExecutor(pool, ParallelConfig("cuda:0,cuda:1", "asyncdiff", warmup=4))
        result = run_loop(model, job_for("asyncdiff"), resolution, steps=4, repeats=0, executor=exact).latents
        stale = ParallelExecutor(pool, ParallelConfig("cuda:0,cuda:1", "asyncdiff", warmup=1))
        after = run_loop(model, job_for("asyncdiff"), resolution, steps=4, repeats=0, executor=stale)
        assert all(call["bytes"] > 0 for call in after.calls)  # stages handed over on the GPUs
    torch.testing.assert_close(result.cpu(), reference.cpu(), atol=2e-2, rtol=2e-2)


def test_the_worker_on_the_hosts_gpu_maps_the_hosts_weights():
    """No device holds two copies: the worker on the host model's GPU maps it through CUDA IPC."""
    model = build_bench_model("small", torch.float16)  # ~25 MB of weights; 64 px keeps activations far below
    model.unet.to("cuda:0")
    resolution = (64, 64)
    reference = run_loop(model, job_for("cfg"), resolution, steps=3, repeats=0).latents
    weights = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    with WorkerPool("cuda:0") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cuda:0", "batch"))
        result = run_loop(model, job_for("cfg"), resolution, steps=3, repeats=0, executor=executor).latents
        assert pool.stats.weights_bytes_shipped == 0
        # the worker's own allocations in a call (its peak is reset per request) are activations only: far
        # less than a copy of the weights
        assert 0 < pool.peak_memory[0] < weights
    torch.testing.assert_close(result.cpu(), reference.cpu(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
def test_block_attention_on_cuda_merges_to_full_attention(dtype, atol):
    """The CUDA kernel that returns the log-sum-exp (memory-efficient attention, its lse padded along the
    queries) against torch's attention: two key blocks merged equal attention to all keys, with odd lengths."""
    from parallel_backend.strategies.sequence.attention import block_attention, merge

    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=dtype, generator=generator) for n in (37, 53, 53))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    out, _ = merge(block_attention(q, k[:, :, :20], v[:, :, :20]), block_attention(q, k[:, :, 20:], v[:, :, 20:]))
    torch.testing.assert_close(out, whole, atol=atol, rtol=atol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two ranks on one GPU)")
@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_sequence_split_on_two_gpus_equals_one(strategy):
    """ulysses and ring over NCCL: every exchange posted in the order the peer posts its receives (NCCL ignores
    tags), and the local-first Ulysses overlapping both all-to-alls with attention; equal to one device."""
    model = build_bench_model("flux-small", torch.float16)
    model.module.to("cuda:0")
    resolution = (256, 256)
    job = job_for(strategy, cfg=1.0)
    reference = run_loop(model, job, resolution, steps=2, repeats=0).latents
    with WorkerPool("cuda:0,cuda:1") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cuda:0,cuda:1", strategy))
        result = run_loop(model, job, resolution, steps=2, repeats=0, executor=executor).latents
    torch.testing.assert_close(result.cpu().float(), reference.cpu().float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two ranks on one GPU)")
@pytest.mark.parametrize("model_name", ["flux-small", "wan-small"])
def test_tensor_on_two_gpus_equals_one_and_halves_the_block_weights(model_name):
    """tensor over NCCL: every all-reduce an exchange posted in the same order on both ranks, the sum taken in
    rank order; the workers hold their cut of the blocks, not the whole model."""
    from parallel_backend.runtime.recipe import weights_bytes

    model = build_bench_model(model_name, torch.float16)
    model.module.to("cuda:0")
    resolution = (256, 256) if model_name == "flux-small" else (192, 320)
    job = job_for("tensor", cfg=1.0)
    reference = run_loop(model, job, resolution, steps=2, repeats=0).latents
    with WorkerPool("cuda:0,cuda:1") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cuda:0,cuda:1", "tensor"))
        loop = run_loop(model, job, resolution, steps=2, repeats=0, executor=executor)
    torch.testing.assert_close(loop.latents.cpu().float(), reference.cpu().float(), atol=2e-2, rtol=2e-2)
    held = [loop.calls[-1]["extra"][rank]["weights_bytes"] for rank in (0, 1)]
    assert max(held) < 0.6 * weights_bytes(model.module), held


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two ranks on one GPU)")
@pytest.mark.parametrize("strategy, cfg", [("cfg", 4.0), ("ulysses", 1.0), ("tensor", 1.0)])
def test_sharded_weights_on_two_gpus_equal_one_and_halve_the_weights(strategy, cfg):
    """Sharded weights over NCCL (models/weight_shards.py PeerGroup): each block's pieces cross as messages
    posted in the same order on both ranks, the next block's gather posted ahead; a call with fewer rows than
    devices still finds every gather's peer (the engine's fillers). Equal to one device; each worker holds about
    half of the weights."""
    from parallel_backend.runtime.recipe import weights_bytes

    model = build_bench_model("flux-small", torch.float16)
    model.module.to("cuda:0")
    resolution = (256, 256)
    job = job_for(strategy, cfg=cfg)
    reference = run_loop(model, job, resolution, steps=2, repeats=0).latents
    with WorkerPool("cuda:0,cuda:1") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cuda:0,cuda:1", strategy, weights="sharded"))
        loop = run_loop(model, job, resolution, steps=2, repeats=0, executor=executor)
    torch.testing.assert_close(loop.latents.cpu().float(), reference.cpu().float(), atol=2e-2, rtol=2e-2)
    held = list(loop.calls[-1]["weights"].values())
    assert len(held) == 2 and max(held) < 0.6 * weights_bytes(model.module), held


def test_a_cuda_worker_forked_from_the_launcher_equals_the_host_device(monkeypatch):
    """What FORKED_KINDS needs before it names "cuda": a forked worker starts CUDA as a fresh process would (the
    launcher never initialises it) and gives the host device's latents."""
    import psutil

    from parallel_backend.runtime import launcher

    monkeypatch.setattr(launcher, "FORKED_KINDS", ("cpu", "cuda"))
    model = build_bench_model("sd15-narrow", torch.float16)
    model.unet.to("cuda:0")
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job_for("batch"), resolution, steps=4, repeats=0).latents
    devices = _devices()
    with WorkerPool(devices) as pool:
        parents = {psutil.Process(pid).ppid() for pid in pool.worker_pids()}
        assert all("parallel_backend.runtime.launcher" in psutil.Process(p).cmdline() for p in parents)
        executor = ParallelExecutor(pool, ParallelConfig(devices, "batch"))
        result = run_loop(model, job_for("batch"), resolution, steps=4, repeats=0, executor=executor).latents
    torch.testing.assert_close(result.cpu(), reference.cpu(), atol=2e-2, rtol=2e-2)


def streamed_stage_against_held(device: str):
    """One stage of sd15-narrow on `device` running every layer, its last three streamed from host memory
    (models/stages.py Streamed) against the same stage holding them: (held output, streamed output, the most the
    device allocated over the stage's kept weights while streaming (CUDA; 0 elsewhere), the three layers' bytes)."""
    import copy

    from parallel_backend.engine.oracle import sample_call
    from parallel_backend.runtime.calls import ModelCall
    from parallel_backend.runtime.worker_loop import _materialize
    from parallel_backend.strategies.asyncdiff import STRATEGY
    from parallel_backend.strategies.asyncdiff.messages import PlaceStages, ProfileLayers, StageCall, StagePlan
    from parallel_backend.strategies.asyncdiff.runner import StageRunner

    model, where = build_bench_model("sd15-narrow", torch.float16), torch.device(device)
    sample = sample_call(model, 1, (model.default_resolution,) * 2)

    def runner_of():
        module = _materialize(copy.deepcopy(model.module), where,
                              lambda m: STRATEGY.cut_on_load(None, m, model.family, ("asyncdiff", (0,), 0)))
        return StageRunner(module, model.family, where)

    measured = runner_of().profile(ProfileLayers("fp", sample))
    plan = StagePlan(0, 1, (), None, None, 0, 1, False, tuple(tuple(c) for c in measured["crossing"]))
    n = len(measured["names"])
    streamed = (n - 4, n - 3, n - 2)
    sizes = [measured["layer_bytes"][i] for i in streamed]
    call = ModelCall(sample.x, sample.t, sample.context, job=1, stream=("s",), step=0)
    outputs, extra = [], []
    for message in (PlaceStages("fp", plan), PlaceStages("fp", plan, streamed=streamed)):
        runner = runner_of()
        runner.setup(message)
        base = 0
        if where.type == "cuda":
            torch.cuda.synchronize(where)
            base = torch.cuda.memory_allocated(where)
            torch.cuda.reset_peak_memory_stats(where)
        outputs.append(runner.call(StageCall("fp", call)).out.float().cpu())
        extra.append(torch.cuda.max_memory_allocated(where) - base if where.type == "cuda" else 0)
        del runner
    return outputs[0], outputs[1], extra[1] - extra[0], sizes


def test_streamed_layers_on_a_gpu_equal_held_ones():
    """Streamed on CUDA: pinned host weights copied on a side stream and waited for on the device give the held
    stage's output, and the device holds streamed layers only while they run: its peak over what the stage keeps
    exceeds the held stage's (activations alike) by at most two streamed layers, never all three."""
    held, streamed, extra, sizes = streamed_stage_against_held("cuda:0")
    torch.testing.assert_close(streamed, held, atol=0, rtol=0)
    two = max(a + b for a, b in zip(sizes, sizes[1:]))
    assert extra <= two + 16 * 1024 < sum(sizes), (extra, sizes)  # 16 KiB: the allocator's rounding
