"""The only module that calls torch.distributed: joining/leaving the workers' group and collective helpers.

Point-to-point messages pair in the order they are issued. NCCL ignores the `tag` of a send or receive: the
k-th receive posted from a peer gets the k-th send issued to it, whatever the tags say. gloo matches tags,
which hides a receiver that posts in another order than its sender sends. Strict mode (`pair_in_issue_order`;
a worker switches it on at its start when TANDEM_STRICT_P2P=1, as in the tests) makes gloo behave as NCCL does:
every tag becomes 0, so messages pair in issue order only and a mismatch fails on CPU as it would on a GPU. Tags
stay in the code as labels.

Test hooks are installed, never looked up: an exchange reads a module flag and an optional hook (`on_exchange`),
no environment variable.

NCCL work is asynchronous: `work.wait()` only makes the current CUDA stream wait. Where the host needs the
data to have arrived (timings, a copy to the host), `wait_all(handles, device)` also synchronizes the device.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def join_group(init_method: str | None, rank: int, world: int, device: str, timeout_s: float, store=None) -> None:
    """Joins the workers' process group (through `init_method`, or a rendezvous `store` such as
    store_relay.RelayStore) and proves it works with one all-reduce.

    The timeout bounds every collective, so a worker never blocks forever on a dead peer.
    """
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    where = {"store": store} if store is not None else {"init_method": init_method}
    dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                            **where)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != world:
        raise RuntimeError(f"process-group check failed: all-reduce gave {probe.item()}, expected {world}")


def leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_strict = False


def pair_in_issue_order(on: bool = True) -> None:
    """Strict mode on (or off): from now on this process's point-to-point messages pair in issue order only
    (tags ignored), as on NCCL. Set once, before the process's first exchange."""
    global _strict
    _strict = bool(on)


def strict() -> bool:
    """Point-to-point messages pair in issue order only (tags ignored), as on NCCL."""
    return _strict


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


def exchange(sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, tuple[int, ...], torch.dtype]],
             device, into: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list]:
    """Starts, as one batch, every send (dst, tensor) and receive (src, shape, dtype), without waiting.
    Returns (buffers, handles): buffers[i] gets receive i; keep the sent tensors alive until `wait_all(handles)`.

    The batch is one NCCL group (`batch_isend_irecv`): NCCL runs a pair's sends and receives on one stream, so
    two ranks that each post a large send to the other before the receive would wait for each other forever;
    inside a group they do not, whatever the order in the list. Per peer, the k-th receive posted from it gets
    the k-th tensor it sends here (module doc): list the receives from a peer in the order that peer lists its
    sends to this rank. A message with no element is neither sent nor received (its buffer is made here): both
    sides know the shapes from the same plan, so they skip the same messages. `into`: the caller's buffers, one
    per receive (contiguous, of its shape and dtype), in place of new ones.
    """
    if _exchange_hook is not None:
        _exchange_hook()
    buffers = into if into is not None else [torch.empty(shape, dtype=dtype, device=device)
                                             for _, shape, dtype in receives]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst) for dst, t in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, b, src) for (src, _, _), b in zip(receives, buffers) if b.numel()]
    return buffers, (dist.batch_isend_irecv(ops) if ops else [])


_exchange_hook = None


def on_exchange(hook) -> None:
    """Tests only: `hook()` runs as this process posts each exchange, before anything is sent (None: no hook).
    The reliability tests install one through the pool's worker set-up to stop or kill a worker in the middle of
    a ring pass or an all-to-all (tests/reliability/exchange_fault.py)."""
    global _exchange_hook
    _exchange_hook = hook


def all_to_all(pieces: list[torch.Tensor], shapes: list[tuple[int, ...]], peers: list[int], index: int,
               device) -> list[torch.Tensor]:
    """The group `peers` (global ranks; this rank is peers[index]) swaps pieces: pieces[s] goes to peers[s] and
    the returned list holds at s what peers[s] sent here, of shape shapes[s] (known from the plan, no size
    exchange; the own piece stays in place). One message per peer each way, all in one batch (see `exchange`),
    so the order between peers cannot deadlock and the per-peer order is trivially the same on both sides.
    Waits until every piece has arrived (within the group's timeout)."""
    return finish_all_to_all(start_all_to_all(pieces, shapes, peers, index, device))


def start_all_to_all(pieces: list[torch.Tensor], shapes: list[tuple[int, ...]], peers: list[int], index: int,
                     device) -> tuple:
    """`all_to_all` posted without waiting: hand the result to `finish_all_to_all`. Every rank of the group must
    start its all-to-alls in the same order (their messages pair in that order)."""
    others = [(index + step) % len(peers) for step in range(1, len(peers))]
    dtype = pieces[index].dtype
    buffers, handles = exchange([(peers[s], pieces[s]) for s in others],
                                [(peers[s], tuple(shapes[s]), dtype) for s in others], device)
    received = list(pieces)
    for s, buffer in zip(others, buffers):
        received[s] = buffer
    return received, handles, pieces  # the sent pieces stay referenced until the wait


def finish_all_to_all(started: tuple) -> list[torch.Tensor]:
    received, handles, _ = started
    wait_all(handles)
    return received


def start_all_gather(piece: torch.Tensor, peers: list[int], index: int, device) -> tuple:
    """Every rank of the group `peers` (this rank is peers[index]) sends its `piece` (a flat tensor, the same
    size on every rank) to every other, received straight into one tensor: the pieces end to end in peer order
    (no copy after the transfer). Posted without waiting: hand the result to `finish_all_gather`. Every rank of
    the group must start its gathers in the same order."""
    size, count = piece.numel(), len(peers)
    whole = torch.empty(size * count, dtype=piece.dtype, device=device)
    whole[index * size:(index + 1) * size].copy_(piece)
    others = [(index + step) % count for step in range(1, count)]
    _, handles = exchange([(peers[s], piece) for s in others], [(peers[s], (size,), piece.dtype) for s in others],
                          device, into=[whole[s * size:(s + 1) * size] for s in others])
    return whole, handles, piece


def finish_all_gather(started: tuple) -> torch.Tensor:
    whole, handles, _ = started
    wait_all(handles)
    return whole


def chunk_sizes(total: int, parts: int) -> list[int]:
    """Near-equal contiguous split: chunk_sizes(5, 2) == [3, 2]; never negative, may contain zeros."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def chunk_for_rank(total: int, parts: int, index: int) -> range:
    """The rows of part `index` when `total` rows are split into `parts` near-equal contiguous chunks."""
    sizes = chunk_sizes(total, parts)
    start = sum(sizes[:index])
    return range(start, start + sizes[index])
