"""Deterministic, resumable batch sampler that tells the dataset which curriculum stage to produce.

The data stream is an endless concatenation of per-epoch permutations of the dataset, each seeded by
``(seed, epoch)``. Global step ``s`` consumes the stream positions
``[sample_position(s), sample_position(s) + global_batch)``; within them, micro-batch ``a`` of rank ``r``
takes the slice ``[(a * world + r) * B, (a * world + r + 1) * B)``. Hence:

- the shards of all ranks are disjoint and together cover exactly the global batch, and one process
  with batch ``world * B`` sees the same samples as ``world`` processes with batch ``B``;
- each request carries its stream position as ``sample_key``, which seeds that sample's augmentation,
  so augmentations do not depend on the rank, the worker or on resuming;
- the stage of every request comes from the step (:class:`~fastdinov2.curriculum.Curriculum`), so
  loader workers never hold a stale stage: the first batch after a switch already has the new sizes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fastdinov2.curriculum import Curriculum

Request = tuple[int, int, int]  # (dataset index, sample_key, stage index)


class EpochPermutations:
    """``index_at(position)``: dataset index at a stream position (permutation per epoch, cached)."""

    def __init__(self, dataset_len: int, seed: int) -> None:
        self.dataset_len = dataset_len
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
            self._epoch = epoch
        return self._perm

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_len)
        return int(self.permutation(epoch)[offset])


class StepBatchSampler:
    """Yields, for each global step in ``[start_step, end_step)``, ``grad_accum_steps`` micro-batches of
    requests ``(index, sample_key, stage)`` for this rank (usable as a DataLoader ``batch_sampler``)."""

    def __init__(
        self,
        curriculum: Curriculum,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size != curriculum.world_size:
            raise ValueError(f"world_size {world_size} differs from the curriculum's {curriculum.world_size}")
        self.cur = curriculum
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.cur.grad_accum_steps

    def requests_for_step(self, step: int, perms: EpochPermutations | None = None) -> list[list[Request]]:
        """The micro-batches of ``step`` for this rank."""
        perms = perms or EpochPermutations(self.cur.dataset_len, self.seed)
        stage = self.cur.stage_at(step)
        base = self.cur.sample_position(step)
        b = stage.batch_size_per_gpu
        out = []
        for a in range(self.cur.grad_accum_steps):
            first = base + (a * self.world_size + self.rank) * b
            out.append([(perms.index_at(p), p, stage.index) for p in range(first, first + b)])
        return out

    def __iter__(self) -> Iterator[list[Request]]:
        perms = EpochPermutations(self.cur.dataset_len, self.seed)
        for step in range(self.start_step, self.end_step):
            yield from self.requests_for_step(step, perms)
