"""iBOT block masks on a crop's patch grid (DINOv2's block-wise ``MaskingGenerator``), from a numpy rng.

A mask of ``target`` patches is grown from rectangular blocks: each block has an area drawn from
U(min_num_patches, min(remaining, max_num_patches)) and a log-uniform aspect ratio in
(min_aspect, 1/min_aspect); a block is accepted if it adds between 1 and ``remaining`` new patches
(10 tries per block). Growth stops when the target is reached or a block cannot be placed, so a mask
has at most ``target`` patches (on small grids sometimes fewer, as in DINOv2).

The grid is the stage's ``global_size // patch_size`` (7x7 at 112 px, 14x14 at 224 px with patch 16),
so the generator follows the curriculum stage (SPEC: it must be rebuilt at a stage switch; here it is a
pure function of the stage).

Which crops are masked, and how much (``ibot.mask_sampling``):

- ``"batch"`` (default; DINOv2's collate): of the ``R`` global crops of a micro-batch exactly
  ``int(R * mask_sample_probability)`` are masked, the i-th of them targeting ``int(N * U(r_i, r_{i+1}))``
  patches with ``r = linspace(mask_ratio_min, mask_ratio_max, n + 1)``, assigned to crops in a random order
  (:func:`sample_batch_ibot_masks`). The masked-token count of a batch then barely varies and never exceeds
  :meth:`BatchMaskSpec.upper_bound` (DINOv2's ``upperbound``, ~1% above the mean at B = 64), to which the
  collate function pads it: compiled code and CUDA graphs see one shape per stage. The draw is seeded
  from the run seed and the batch's sample keys (:func:`batch_mask_rng`).
- ``"sample"``: each crop independently, masked with probability ``mask_sample_probability`` at a ratio
  ``U(min, max)`` (:func:`sample_ibot_masks`, drawn in the sample's own stream); the same expectations, a
  masked-token count that varies ~10% (one s.d.) from batch to batch at B = 64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastdinov2.config import IbotConfig


class MaskingGenerator:
    """Block masks on an ``height x width`` patch grid. ``max_num_patches`` defaults to half the grid."""

    def __init__(
        self,
        height: int,
        width: int,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"mask grid must be positive, got {height}x{width}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_new: float, rng: np.random.Generator) -> int:
        for _ in range(10):
            area = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h, endpoint=True))
                left = int(rng.integers(0, self.width - w, endpoint=True))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A bool [height, width] mask with at most ``num_masking_patches`` True entries."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_new, rng)
            if added == 0:
                break
            count += added
        return mask


def sample_ibot_masks(
    rng: np.random.Generator, grid: tuple[int, int], ibot: IbotConfig, n_crops: int = 2
) -> np.ndarray:
    """Masks of one sample's global crops: bool [n_crops, H*W] for a ``grid = (H, W)`` patch grid.

    Each crop is masked with probability ``ibot.mask_sample_probability``, targeting
    ``int(N * ratio)`` patches with ``ratio ~ U(ibot.mask_ratio_min, ibot.mask_ratio_max)``; otherwise
    its mask is all False. Draws a fixed number of values before the block growth.
    """
    height, width = grid
    gen = MaskingGenerator(height, width)
    n = height * width
    masked = rng.random(n_crops) < ibot.mask_sample_probability
    ratios = rng.uniform(ibot.mask_ratio_min, ibot.mask_ratio_max, n_crops)
    out = np.zeros((n_crops, n), dtype=bool)
    for i in range(n_crops):
        if masked[i]:
            out[i] = gen(int(n * ratios[i]), rng).reshape(-1)
    return out


#: Keeps the batch masking stream apart from any per-sample stream.
_BATCH_MASK_STREAM = 0xBA7C4


@dataclass(frozen=True)
class BatchMaskSpec:
    """``ibot.mask_sampling="batch"`` for one run: the iBOT masking parameters and the run seed."""

    probability: float
    ratio_min: float
    ratio_max: float
    seed: int

    @classmethod
    def from_config(cls, ibot: IbotConfig, seed: int) -> BatchMaskSpec:
        return cls(ibot.mask_sample_probability, ibot.mask_ratio_min, ibot.mask_ratio_max, int(seed))

    def upper_bound(self, grid: tuple[int, int], n_crops: int) -> int:
        """The most patches :meth:`draw` can mask in ``n_crops`` crops on ``grid`` (DINOv2's ``upperbound``): the
        i-th masked crop targets ``int(N * U(r_i, r_{i+1})) <= int(N * r_{i+1})`` patches and a mask never
        exceeds its target. Padding the masked-token rows to it gives every batch of a stage one shape."""
        n_patches = grid[0] * grid[1]
        n_masked = int(n_crops * self.probability)
        edges = np.linspace(self.ratio_min, self.ratio_max, n_masked + 1)
        return int(sum(int(n_patches * r) for r in edges[1:]))

    def draw(self, grid: tuple[int, int], sample_keys: Sequence[int], n_crops: int) -> np.ndarray:
        """The masks ``bool [n_crops, H*W]`` of one micro-batch, from the run seed and its sample keys."""
        return sample_batch_ibot_masks(batch_mask_rng(self.seed, sample_keys), grid, self, n_crops)


def batch_mask_rng(seed: int, sample_keys: Sequence[int]) -> np.random.Generator:
    """The masking stream of one micro-batch: from the run seed and its samples' keys (unique per draw, so
    per rank and step), in order."""
    return np.random.default_rng([int(seed), _BATCH_MASK_STREAM, *(int(k) for k in sample_keys)])


def sample_batch_ibot_masks(
    rng: np.random.Generator, grid: tuple[int, int], spec: BatchMaskSpec, n_crops: int
) -> np.ndarray:
    """DINOv2's batch masking of ``n_crops`` global crops: bool ``[n_crops, H*W]`` (module docstring).

    ``n = int(n_crops * spec.probability)`` crops are masked; their targets are stratified over
    ``[ratio_min, ratio_max]`` (one draw in each of ``n`` equal intervals), and which crop gets which target
    is a random permutation; the other crops are unmasked.
    """
    height, width = grid
    gen = MaskingGenerator(height, width)
    n_patches = height * width
    n_masked = int(n_crops * spec.probability)
    edges = np.linspace(spec.ratio_min, spec.ratio_max, n_masked + 1)
    ratios = rng.uniform(edges[:-1], edges[1:])
    order = rng.permutation(n_crops)
    out = np.zeros((n_crops, n_patches), dtype=bool)
    for i in range(n_masked):
        out[order[i]] = gen(int(n_patches * ratios[i]), rng).reshape(-1)
    return out
