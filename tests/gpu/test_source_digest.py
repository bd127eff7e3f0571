"""runtime/sources.py on CUDA: the host's digest of its weights in GPU memory equals a CPU worker's digest of what it
read (int64 sums wrap alike), and CPU workers read a model held on the GPU from its file. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from parallel_backend.runtime import sources
from parallel_backend.runtime.tensor_parts import Slices, Span

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("part", [None, Slices((4099, 515), 0, ((1, 700), (900, 4000))),
                                  Slices((4099, 515), 1, ((0, 100), (300, 515))), Span((4099, 515), 17, 2_000_001)])
def test_a_digest_on_cuda_equals_the_digest_on_the_cpu(dtype, part):
    tensor = (torch.randn(4099, 515, generator=torch.Generator().manual_seed(3)) * 1e4).to(dtype)
    assert sources.digest(tensor.to("cuda:0"), part) == sources.digest(tensor, part)


def test_cpu_workers_read_the_file_of_a_model_held_on_the_gpu(tmp_path):
    """The host's weights on cuda:0 (digests summed there), two CPU workers: both read every weight from the file,
    and hold what the host holds."""
    from diffusers import UNet2DConditionModel

    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.runtime.pool import WorkerPool

    build_bench_model("sd15-narrow", torch.float32).unet.save_pretrained(tmp_path / "unet")
    model = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval().requires_grad_(False).to("cuda:0")
    sources.note(model, sorted((tmp_path / "unet").glob("*.safetensors")))
    with WorkerPool("cpu:2") as pool:
        pool.ensure_model(model, "diffusers_unet")
        every = len(model.state_dict())
        assert pool.stats.last_load_sources == {0: every, 1: every}
        assert pool.stats.last_load_bytes_written < 1 << 20
