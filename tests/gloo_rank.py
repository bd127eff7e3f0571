"""The start of a rank script that conftest's `gloo_ranks` runs (argv: rank, world, a gloo rendezvous, the
tests folder): one thread, point-to-point messages paired in issue order as on NCCL, the group joined."""

import sys

import torch


def join() -> tuple[int, int]:
    from parallel_backend.runtime import primitives

    torch.set_num_threads(1)
    rank, world, rendezvous = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    primitives.pair_in_issue_order()
    primitives.join_group(rendezvous, rank, world, "cpu", timeout_s=30.0)
    return rank, world
