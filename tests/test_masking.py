"""iBOT block masks: counts, ratios, per-crop masking probability, grids of every curriculum stage."""

from __future__ import annotations

import numpy as np
import pytest

from fastdinov2.config import IbotConfig
from fastdinov2.data.masking import (
    BatchMaskSpec,
    MaskingGenerator,
    batch_mask_rng,
    sample_batch_ibot_masks,
    sample_ibot_masks,
)


@pytest.mark.parametrize("grid", [4, 7, 8, 14])
def test_generator_never_exceeds_target_and_usually_reaches_it(grid):
    gen = MaskingGenerator(grid, grid)
    n = grid * grid
    assert gen.max_num_patches == 0.5 * n
    rng = np.random.default_rng(grid)
    reached = []
    for _ in range(200):
        target = int(n * rng.uniform(0.1, 0.5))
        mask = gen(target, rng)
        assert mask.shape == (grid, grid) and mask.dtype == bool
        assert mask.sum() <= target
        reached.append(mask.sum() == target)
    assert np.mean(reached) > 0.85


def test_zero_target_gives_empty_mask_and_masks_are_unions_of_blocks():
    gen = MaskingGenerator(14, 14)
    rng = np.random.default_rng(0)
    assert not gen(0, rng).any()
    isolated = total = 0
    for _ in range(50):
        mask = gen(30, rng)
        padded = np.pad(mask, 1)
        neigh = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        isolated += int((mask & ~neigh).sum())
        total += int(mask.sum())
    # block masking: almost no isolated patches (only a last 1-patch top-up block can be one);
    # independent random masking of 30/196 patches would leave about half of them isolated
    assert isolated / total < 0.05


def test_non_square_grid_keeps_height_and_width():
    gen = MaskingGenerator(6, 10)
    mask = gen(20, np.random.default_rng(1))
    assert mask.shape == (6, 10) and 0 < mask.sum() <= 20
    masks = sample_ibot_masks(np.random.default_rng(2), (6, 10), IbotConfig(mask_sample_probability=1.0))
    assert masks.shape == (2, 60)


@pytest.mark.parametrize("grid", [4, 7, 8, 14])
def test_sample_masks_probability_and_ratio_range(grid):
    cfg = IbotConfig()  # p 0.5, ratio U(0.1, 0.5)
    n = grid * grid
    counts = []
    for key in range(300):
        masks = sample_ibot_masks(np.random.default_rng([0, key]), (grid, grid), cfg)
        assert masks.shape == (2, n) and masks.dtype == bool
        counts.extend(masks.sum(1).tolist())
    counts = np.asarray(counts)
    masked = counts > 0
    assert abs(masked.mean() - 0.5) < 0.07  # each crop masked with probability 0.5 (a few fail to place)
    assert counts.max() <= int(n * 0.5)
    ratios = counts[masked] / n
    assert ratios.min() >= (1 / n if grid == 4 else 0.1 - 1 / n)
    assert 0.2 < ratios.mean() < 0.4  # ~ U(0.1, 0.5)


def test_probability_extremes_and_determinism():
    always = IbotConfig(mask_sample_probability=1.0, mask_ratio_min=0.3, mask_ratio_max=0.3)
    never = IbotConfig(mask_sample_probability=0.0)
    m = sample_ibot_masks(np.random.default_rng(3), (14, 14), always)
    assert (m.sum(1) <= int(196 * 0.3)).all() and (m.sum(1) > 0).all()
    assert not sample_ibot_masks(np.random.default_rng(3), (14, 14), never).any()
    a = sample_ibot_masks(np.random.default_rng([1, 2]), (7, 7), always)
    b = sample_ibot_masks(np.random.default_rng([1, 2]), (7, 7), always)
    c = sample_ibot_masks(np.random.default_rng([1, 3]), (7, 7), always)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_invalid_grid_is_rejected():
    with pytest.raises(ValueError, match="grid"):
        MaskingGenerator(0, 4)


@pytest.mark.parametrize("grid", [7, 14])
def test_batch_masks_mask_exactly_half_the_crops_with_stratified_ratios(grid):
    """DINOv2's collate: int(R * p) crops masked, targets one per interval of linspace(min, max, n + 1)."""
    spec = BatchMaskSpec.from_config(IbotConfig(), seed=3)
    n = grid * grid
    totals, totals_sample = [], []
    for b in range(40):
        keys = list(range(64 * b, 64 * b + 64))
        masks = sample_batch_ibot_masks(batch_mask_rng(spec.seed, keys), (grid, grid), spec, 128)
        assert masks.shape == (128, n) and masks.dtype == bool
        counts = masks.sum(axis=1)
        assert (counts > 0).sum() == 64  # exactly int(128 * 0.5) crops masked (the smallest target is >= 4)
        ordered = np.sort(counts[counts > 0])  # the i-th smallest target lies in the i-th interval
        edges = np.linspace(0.1, 0.5, 65)
        assert (ordered <= (n * edges[1:]).astype(int) + 1).mean() > 0.9
        totals.append(int(counts.sum()))
        rng = np.random.default_rng(b)
        totals_sample.append(sum(int(sample_ibot_masks(rng, (grid, grid), IbotConfig(), 2).sum()) for _ in range(64)))
    # the same expected masked share as per-crop sampling, ~0.15 of the tokens (the generator falls a little
    # short of some targets), but a count that barely moves (padded to its upper bound: one compiled shape per stage)
    assert np.mean(totals) == pytest.approx(np.mean(totals_sample), rel=0.05)
    assert np.mean(totals) == pytest.approx(0.15 * 128 * n, rel=0.08)
    assert np.std(totals) < 0.01 * np.mean(totals) and np.std(totals) < 0.1 * np.std(totals_sample)


def test_batch_masks_follow_the_seed_and_the_sample_keys():
    spec = BatchMaskSpec.from_config(IbotConfig(), seed=1)

    def draw(seed, keys):
        return sample_batch_ibot_masks(batch_mask_rng(seed, keys), (14, 14), spec, 2 * len(keys))

    a = draw(1, [5, 6, 7, 8])
    assert np.array_equal(a, draw(1, [5, 6, 7, 8]))
    assert not np.array_equal(a, draw(1, [5, 6, 7, 9]))
    assert not np.array_equal(a, draw(2, [5, 6, 7, 8]))
    assert draw(1, [3]).sum(axis=1).tolist().count(0) == 1  # 2 crops: int(2 * 0.5) = 1 masked


@pytest.mark.parametrize("grid,n_crops", [((7, 7), 128), ((14, 14), 128), ((14, 14), 8), ((4, 6), 3)])
def test_batch_masks_never_exceed_the_upper_bound(grid, n_crops):
    """DINOv2's ``upperbound``: padding to it gives every batch of a stage one shape (and the same on every rank)."""
    spec = BatchMaskSpec.from_config(IbotConfig(), seed=5)
    bound = spec.upper_bound(grid, n_crops)
    n = grid[0] * grid[1]
    edges = np.linspace(0.1, 0.5, int(n_crops * 0.5) + 1)
    assert bound == sum(int(n * e) for e in edges[1:])
    totals = [int(spec.draw(grid, list(range(k * n_crops, (k + 1) * n_crops)), n_crops).sum()) for k in range(60)]
    assert max(totals) <= bound
    if n_crops == 128:  # the bound is tight: about 1% above the mean count at B = 64
        assert bound <= 1.03 * np.mean(totals)
