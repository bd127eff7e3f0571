"""The only module that calls torch.distributed: joining/leaving the workers' group and collective helpers.

Point-to-point messages pair in the order they are issued. NCCL ignores the `tag` of a send or receive: the
k-th receive posted from a peer gets the k-th send issued to it, whatever the tags say. gloo matches tags,
which hides a receiver that posts in another order than its sender sends. Strict mode (TANDEM_STRICT_P2P=1,
on in the tests) makes gloo behave as NCCL does: every tag becomes 0, so messages pair in issue order only
and a mismatch fails on CPU as it would on a GPU. Tags stay in the code as labels.

NCCL work is asynchronous: `work.wait()` only makes the current CUDA stream wait. Where the host needs the
data to have arrived (timings, a copy to the host), `wait_all(handles, device)` also synchronizes the device.
"""

from __future__ import annotations

import os
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


STRICT_ENV = "TANDEM_STRICT_P2P"


def strict() -> bool:
    """Point-to-point messages pair in issue order only (tags ignored), as on NCCL."""
    return os.environ.get(STRICT_ENV) == "1"


def _tags(tags: list[int] | None, count: int) -> list[int]:
    if tags is None or strict():
        return [0] * count
    return list(tags)


def post_sends(tensors: list[torch.Tensor], dst: int, tags: list[int] | None = None) -> list:
    """Starts sending `tensors` to rank `dst`, in list order, without waiting; keep them alive until
    `wait_all`. The receiver must post its receives from this rank in the same order (see the module doc);
    `tags` are labels that gloo also matches on, outside strict mode."""
    return [dist.isend(t.contiguous(), dst, tag=tag) for t, tag in zip(tensors, _tags(tags, len(tensors)))]


def post_receives(specs: list[tuple[tuple[int, ...], torch.dtype]], src: int, device,
                  tags: list[int] | None = None) -> tuple[list, list]:
    """Starts receiving tensors of `specs` (shape, dtype) from rank `src`, in list order: the k-th receive
    gets the k-th tensor `src` sends here. Returns (buffers, handles)."""
    buffers = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    return buffers, [dist.irecv(b, src, tag=tag) for b, tag in zip(buffers, _tags(tags, len(buffers)))]


def wait_all(handles: list, device: torch.device | str | None = None) -> None:
    """Waits for every handle; with a CUDA `device`, also until the device has finished the transfers (NCCL's
    wait() alone returns before the data has arrived), so a time taken after it is the transfer's."""
    for handle in handles:
        handle.wait()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def chunk_sizes(total: int, parts: int) -> list[int]:
    """Near-equal contiguous split: chunk_sizes(5, 2) == [3, 2]; never negative, may contain zeros."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def chunk_for_rank(total: int, parts: int, index: int) -> range:
    """The rows of part `index` when `total` rows are split into `parts` near-equal contiguous chunks."""
    sizes = chunk_sizes(total, parts)
    start = sum(sizes[:index])
    return range(start, start + sizes[index])
