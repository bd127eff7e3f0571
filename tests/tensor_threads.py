"""A tensor group's ranks as threads of one process, for the cut's oracle tests (tests/test_tensor_parallel.py,
tests/comfy/test_tensor_cut.py, which load this file by path): every rank's tensor meets the others' at a
barrier; `sum` adds them in rank order, `gather` joins them along the last dimension, `start` and `finish` hand
every rank's piece to a shard group (models/weight_shards.py; tests/test_weight_shards.py)."""

from __future__ import annotations

import threading

import torch


class ThreadGroup:
    def __init__(self, degree: int):
        self.barrier, self.slots = threading.Barrier(degree, timeout=60), [None] * degree

    def rank(self, index: int):
        group = self

        class Rank:
            def sum(self, partial):
                return group.sum(index, partial)

            def gather(self, piece):
                return torch.cat(group._everyones(index, piece), dim=-1)

            degree = len(group.slots)

            def start(self, piece, name=""):  # a shard group's gather (models/weight_shards.py): met at once
                return torch.cat(group._everyones(index, piece))

            def finish(self, started):
                return started

        return Rank()

    def sum(self, index, partial):
        """Every rank's partial, added in rank order."""
        everyone = self._everyones(index, partial)
        out = everyone[0]
        for piece in everyone[1:]:
            out = out + piece
        return out

    def _everyones(self, index, tensor):
        self.slots[index] = tensor
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # every rank has read the slots before the next exchange fills them
        return everyone


class ThreadBands:
    """A VAE's tiles (models/vae_bands.py) as threads: `rank(index)` is tile `index`'s group, `columns` tiles
    across (1: bands of rows), numbered row by row."""

    def __init__(self, degree: int, columns: int = 1):
        self.group, self.columns = ThreadGroup(degree), columns

    def rank(self, index: int):
        group, degree, columns = self.group, len(self.group.slots), self.columns
        at = index % columns

        class Band:
            def halo(self, top, bottom):
                everyone = group._everyones(index, (top, bottom))
                return (everyone[index - columns][1] if index >= columns else None,
                        everyone[index + columns][0] if index + columns < degree else None)

            def halo_columns(self, left, right):
                everyone = group._everyones(index, (left, right))
                return (everyone[index - 1][1] if at > 0 else None,
                        everyone[index + 1][0] if at < columns - 1 else None)

            def sum(self, partial):
                return group.sum(index, partial)

            def gather_rows(self, band):
                everyone = group._everyones(index, band)
                return torch.cat(everyone, dim=-2), sum(t.shape[-2] for t in everyone[:index])

            def gather_tiles(self, tile):
                everyone = group._everyones(index, tile)
                lines = [torch.cat(everyone[i:i + columns], dim=-1) for i in range(0, degree, columns)]
                return (torch.cat(lines, dim=-2), sum(t.shape[-2] for t in everyone[at:index:columns]),
                        sum(t.shape[-1] for t in everyone[index - at:index]))

        Band.degree, Band.index, Band.columns = degree, index, columns
        return Band()


def run_cut(modules: list, family: str, forward, cut=None) -> tuple[list, list]:
    """Each rank's output and weights (bytes) when len(modules) threads cut their module (built by the caller:
    threads would share a seeded RNG) for `family` and run `forward(module)`. A rank's error is raised here, the
    barrier broken for the others. cut(module, degree, index, group): the cut (default: the tensor split)."""
    from parallel_backend.models.tensor_splits import plan_for, split_in_place
    from parallel_backend.runtime.recipe import weights_bytes

    if cut is None:
        def cut(module, degree, index, group):
            split_in_place(module, plan_for(module, family), degree, index, group)

    degree = len(modules)
    group, outs, held = ThreadGroup(degree), [None] * degree, [0] * degree

    def rank(index):
        module = modules[index]
        cut(module, degree, index, group.rank(index))
        held[index] = weights_bytes(module)
        with torch.inference_mode():
            outs[index] = forward(module)

    run_threads(group, rank)
    return outs, held


def run_threads(group: ThreadGroup, rank) -> None:
    """rank(index) in one thread per rank of `group`; the first error is raised here once every thread has
    ended (an error breaks the barrier for the others)."""
    errors = []

    def run(index):
        try:
            rank(index)
        except BaseException as exc:  # noqa: BLE001 - raised below, once every thread has ended
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(group.slots))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
