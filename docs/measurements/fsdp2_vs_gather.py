"""Why models/weight_shards.py gathers blocks by hand: 2 gloo ranks run 8 MLP blocks (512 -> 2048 -> 512, 8 MiB
of fp32 weights each) sharded by torch's FSDP2 (`fully_shard`, reshard after forward) and by Tandem's own shards
(with and without the next block's gather posted ahead), against the blocks whole, under inference_mode.
Interleaved rounds, the median of each. Run: python docs/measurements/fsdp2_vs_gather.py

Printed on the project's 2-core VM (torch 2.13.0 CPU, 2026-12-06):
tokens 64: whole 24.3 ms, fsdp2 101.9 ms, tandem 54.5 ms, tandem, next posted ahead 52.0 ms; max|diff| 0 for all
tokens 1024: whole 240.5 ms, fsdp2 430.2 ms, tandem 404.1 ms, tandem, next posted ahead 408.6 ms; max|diff| 0 for all
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def blocks():
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
                                        for _ in range(8)]))


def run_blocks(model, x):
    for block in model[0]:
        x = block(x)
    return x


def main(rank, world, port, tokens):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallel_backend.models.weight_shards import PeerGroup, shard_in_place

    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(1))
    whole = blocks()
    fsdp = blocks()
    mesh = init_device_mesh("cpu", (world,))
    for block in fsdp[0]:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(fsdp, mesh=mesh)
    group = PeerGroup(tuple(range(world)), rank, torch.device("cpu"))
    own, ahead = blocks(), blocks()
    shard_in_place(own, world, rank, group, prefetch=False)
    shard_in_place(ahead, world, rank, group, prefetch=True)
    runs = {"whole": whole, "fsdp2": fsdp, "tandem": own, "tandem, next posted ahead": ahead}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        reference = run_blocks(whole, x)
        errors = {name: (run_blocks(m, x) - reference).abs().max().item() for name, m in runs.items()}
        for _ in range(5):
            for name, model in runs.items():
                run_blocks(model, x)
                dist.barrier()
                started = time.perf_counter()
                for _ in range(5):
                    run_blocks(model, x)
                times[name].append((time.perf_counter() - started) / 5)
    if rank == 0:
        print(f"tokens {tokens}: " + ", ".join(f"{name} {1e3 * statistics.median(t):.1f} ms" for name, t in times.items())
              + "; max|diff| " + ", ".join(f"{name} {e:.1e}" for name, e in errors.items() if name != "whole"))
    dist.destroy_process_group()


if __name__ == "__main__":
    for port, tokens in ((29561, 64), (29562, 1024)):
        mp.spawn(main, args=(2, port, tokens), nprocs=2)
