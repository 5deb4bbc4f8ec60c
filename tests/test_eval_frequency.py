"""Frequency sensitivity (fastdinov2.eval.frequency)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdinov2.eval.corruption import CORRUPTIONS_ALL
from fastdinov2.eval.frequency import (
    FREQUENCY_BANDS,
    default_radii,
    evaluate_frequency,
    fourier_filter,
    group_by_band,
    half_diagonal,
    low_pass_mask,
    plot_frequency_curves,
)
from fastdinov2.eval.linear import LinearHead, apply_linear_head
from fastdinov2.models.vit import build_vit


def test_low_pass_beyond_half_diagonal_is_identity() -> None:
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    r = half_diagonal(16, 20)
    assert r == pytest.approx(math.hypot(8, 10))
    assert bool(low_pass_mask(16, 20, r).all())
    assert torch.allclose(fourier_filter(x, r, "low"), x, atol=1e-5)
    assert torch.allclose(fourier_filter(x, 1000.0, "low"), x, atol=1e-5)
    assert fourier_filter(x, r, "high").abs().max() < 1e-5
    # just below the half-diagonal the corner frequency (-8, -10) is removed
    assert not bool(low_pass_mask(16, 20, r - 1e-3).all())


@pytest.mark.parametrize("radius", [0.0, 1.0, 2.5, 4.0, 7.0])
def test_low_plus_high_is_the_original(radius: float) -> None:
    x = torch.rand(1, 3, 17, 16, generator=torch.Generator().manual_seed(1))
    low, high = fourier_filter(x, radius, "low"), fourier_filter(x, radius, "high")
    assert low.dtype == x.dtype and low.shape == x.shape
    assert torch.allclose(low + high, x, atol=1e-5)


def test_filters_on_a_pure_cosine_by_hand() -> None:
    # a horizontal cosine of 3 cycles per image on a constant 0.5: energy only at |f| = 0 and 3
    n = 32
    cols = torch.arange(n, dtype=torch.float32)
    wave = 0.25 * torch.cos(2 * math.pi * 3 * cols / n)
    x = (0.5 + wave).expand(1, 1, n, n).clone()
    assert torch.allclose(fourier_filter(x, 2.0, "low"), torch.full_like(x, 0.5), atol=1e-5)  # cosine removed
    assert torch.allclose(fourier_filter(x, 3.0, "low"), x, atol=1e-5)  # |f| = 3 <= r kept
    assert torch.allclose(fourier_filter(x, 2.0, "high"), wave.expand(1, 1, n, n), atol=1e-5)
    # r = 0 keeps only the mean (DC)
    y = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fourier_filter(y, 0.0, "low"), y.mean(dim=(-2, -1), keepdim=True).expand_as(y), atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        fourier_filter(y, 1.0, "band")


def test_default_radii() -> None:
    assert default_radii(64) == [2, 4, 8, 16, 32]
    assert default_radii(224) == [2, 4, 8, 16, 32, 64, 112]
    assert default_radii(32) == [2, 4, 8, 16]


def test_bands_cover_every_corruption_once_and_group_by_hand() -> None:
    members = [c for band in FREQUENCY_BANDS.values() for c in band]
    assert sorted(members) == sorted(CORRUPTIONS_ALL) and len(members) == len(set(members))
    assert set(FREQUENCY_BANDS["high"]) == {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"}
    res = {"results": {"accuracy": {"gaussian_noise": {"1": 40.0, "2": 20.0}, "shot_noise": {"1": 50.0},
                                    "fog": {"1": 70.0}}, "clean_top1": 90.0}}
    bands = group_by_band(res)
    assert bands["bands"]["high"]["mean"] == pytest.approx((30.0 + 50.0) / 2)
    assert bands["bands"]["high"]["types"] == ["gaussian_noise", "shot_noise"]
    assert bands["bands"]["low"]["mean"] == pytest.approx(70.0)
    assert bands["bands"]["low_pass"]["mean"] is None and bands["clean_top1"] == 90.0


def _class_folders(root: Path, n_per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for ci, (name, color) in enumerate((("a", (220, 40, 40)), ("b", (40, 40, 220)))):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.array(color)[None, None, :] + rng.normal(0, 25 + 10 * ci, (36, 44, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"im{i}.png")
    return root


def test_evaluate_frequency_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_vit("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32).eval()
    head = LinearHead(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), torch.zeros(2), 1, False, 32,
                      ["a", "b"], 32, {})
    head_file = head.save(tmp_path / "h.safetensors")
    val = _class_folders(tmp_path / "val", 3)
    res = evaluate_frequency(model, head_file, val, radii=[2, 23], batch_size=4, progress=False)
    assert res["radii"] == [2.0, 23.0] and set(res["low_pass"]) == {"2", "23"} and res["num_images"] == 6
    # the unfiltered pass (geometry -> [0, 1] -> normalise on the batch) equals the standard eval transform
    assert res["clean_top1"] == pytest.approx(apply_linear_head(model, head_file, val, progress=False))
    # r = 23 > half-diagonal of 32 x 32 (22.6): the low-pass is the identity
    assert res["low_pass"]["23"] == pytest.approx(res["clean_top1"])
    png = plot_frequency_curves(res, tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
