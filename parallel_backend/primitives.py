"""The only module that calls torch.distributed: joining/leaving the workers' group and collective helpers."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def join_group(init_method: str, rank: int, world: int, device: str, timeout_s: float) -> None:
    """Joins the workers' process group and proves it works with one all-reduce.

    The timeout bounds every collective, so a worker never blocks forever on a dead peer.
    """
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != world:
        raise RuntimeError(f"process-group check failed: all-reduce gave {probe.item()}, expected {world}")


def leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def post_sends(tensors: list[torch.Tensor], dst: int, tags: list[int] | None = None) -> list:
    """Starts sending `tensors` to rank `dst` without waiting; keep them alive until `wait_all`. With `tags`,
    each send matches the receive of the same tag whatever the order they are posted in."""
    tags = tags if tags is not None else [0] * len(tensors)
    return [dist.isend(t.contiguous(), dst, tag=tag) for t, tag in zip(tensors, tags)]


def post_receives(specs: list[tuple[tuple[int, ...], torch.dtype]], src: int, device,
                  tags: list[int] | None = None) -> tuple[list, list]:
    """Starts receiving tensors of `specs` (shape, dtype) from rank `src`; returns (buffers, handles)."""
    buffers = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    tags = tags if tags is not None else [0] * len(buffers)
    return buffers, [dist.irecv(b, src, tag=tag) for b, tag in zip(buffers, tags)]


def wait_all(handles: list) -> None:
    for handle in handles:
        handle.wait()


def chunk_sizes(total: int, parts: int) -> list[int]:
    """Near-equal contiguous split: chunk_sizes(5, 2) == [3, 2]; never negative, may contain zeros."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def chunk_for_rank(total: int, parts: int, index: int) -> range:
    """The rows of part `index` when `total` rows are split into `parts` near-equal contiguous chunks."""
    sizes = chunk_sizes(total, parts)
    start = sum(sizes[:index])
    return range(start, start + sizes[index])
