"""Gaussian noise patching (SPEC section 1): distribution of the draws, additivity, clamping, locality."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fastdinov2.config import NoiseConfig
from fastdinov2.data.noise_patch import (
    NoisePatchRecord,
    apply_noise_patch,
    blur_noise_patch,
    gaussian_noise_patch,
)


def _rng(i: int) -> np.random.Generator:
    return np.random.default_rng([7, i])


def _outside(rec: NoisePatchRecord, shape: tuple[int, ...]) -> np.ndarray:
    inside = np.zeros(shape[:2], dtype=bool)
    inside[rec.top:rec.top + rec.side, rec.left:rec.left + rec.side] = True
    return ~inside


def test_side_is_uniform_over_1_to_min_side_and_patch_inside():
    h, w = 16, 24
    img = np.full((h, w, 3), 0.5, dtype=np.float32)
    sides, tops, lefts = [], [], []
    for i in range(3000):
        _, rec = gaussian_noise_patch(img, _rng(i), p=1.0, max_scale=0.1)
        assert 1 <= rec.side <= min(h, w)
        assert 0 <= rec.top <= h - rec.side and 0 <= rec.left <= w - rec.side
        sides.append(rec.side)
        tops.append(rec.top)
        lefts.append(rec.left)
    counts = np.bincount(sides, minlength=17)[1:]
    expected = 3000 / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.0, (chi2, counts)  # 15 dof; p ~ 1e-4
    # positions reach both borders (uniform placement, not centred)
    sides_a, tops_a, lefts_a = map(np.asarray, (sides, tops, lefts))
    small = sides_a <= 2
    assert tops_a[small].min() == 0 and (tops_a + sides_a)[small].max() == h
    assert lefts_a[small].min() == 0 and (lefts_a + sides_a)[small].max() == w


def test_sigma_within_range_and_uniform():
    img = np.full((8, 8, 3), 0.5, dtype=np.float32)
    sig = np.array([gaussian_noise_patch(img, _rng(i), 1.0, 0.3)[1].sigma for i in range(2000)])
    assert sig.min() >= 0.0 and sig.max() <= 0.3
    assert abs(sig.mean() - 0.15) < 0.01
    assert abs(np.mean(sig < 0.075) - 0.25) < 0.04  # uniform, not concentrated


def test_noise_is_additive_zero_mean_with_drawn_sigma_on_mid_grey():
    img = np.full((64, 64, 3), 0.5, dtype=np.float64)
    diffs, ratios = [], []
    for i in range(200):
        out, rec = gaussian_noise_patch(img, _rng(i), 1.0, 0.1)  # 5 sigma below the clamp: no clamping
        d = (out - img)[rec.top:rec.top + rec.side, rec.left:rec.left + rec.side]
        diffs.append(d.ravel())
        if rec.side >= 16 and rec.sigma > 0.02:
            ratios.append(d.std() / rec.sigma)
    all_d = np.concatenate(diffs)
    assert abs(all_d.mean()) < 3 * all_d.std() / np.sqrt(all_d.size) + 1e-4
    assert abs(np.mean(ratios) - 1.0) < 0.03


def test_additive_keeps_the_image_content_in_the_patch():
    img = np.random.default_rng(0).random((32, 32, 3))
    out, rec = gaussian_noise_patch(img, _rng(3), 1.0, 0.01)
    patch = (slice(rec.top, rec.top + rec.side), slice(rec.left, rec.left + rec.side))
    # replacement noise would be uncorrelated with the image; additive noise changes it by ~sigma only
    assert np.abs(out[patch] - img[patch]).max() <= 6 * max(rec.sigma, 1e-6)
    assert rec.side > 0


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_clamps_to_unit_range(value):
    img = np.full((32, 32, 3), value, dtype=np.float32)
    hit_bound = hit_inside = 0
    for i in range(30):
        out, rec = gaussian_noise_patch(img, _rng(i), 1.0, 2.0)
        assert out.min() >= 0.0 and out.max() <= 1.0
        patch = out[rec.top:rec.top + rec.side, rec.left:rec.left + rec.side]
        hit_bound += int((patch == value).any())
        hit_inside += int(((patch > 0) & (patch < 1)).any())
    assert hit_bound > 20 and hit_inside > 20  # clamped values sit exactly on the bound


def test_pixels_outside_the_patch_are_untouched():
    img = np.random.default_rng(1).random((20, 30, 3)).astype(np.float32)
    for i in range(50):
        out, rec = gaussian_noise_patch(img, _rng(i), 1.0, 0.5)
        outside = _outside(rec, img.shape)
        assert np.array_equal(out[outside], img[outside])
    assert img.dtype == out.dtype and out.shape == img.shape


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_probability_p_is_respected(p):
    img = np.full((8, 8, 3), 0.5, dtype=np.float32)
    applied = []
    for i in range(1500):
        out, rec = gaussian_noise_patch(img, _rng(i), p, 0.5)
        applied.append(rec.applied)
        if not rec.applied:
            assert np.array_equal(out, img)
    assert abs(np.mean(applied) - p) < 0.04


def test_uint8_path_matches_float_path_rounded():
    img8 = np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    imgf = img8.astype(np.float32) / 255
    for i in range(20):
        out8, rec8 = gaussian_noise_patch(img8, _rng(i), 1.0, 0.5)
        outf, recf = gaussian_noise_patch(imgf, _rng(i), 1.0, 0.5)
        assert rec8 == recf and out8.dtype == np.uint8
        assert np.abs(out8.astype(np.int32) - np.rint(outf * 255).astype(np.int32)).max() <= 1


def test_deterministic_per_rng_seed():
    img = np.full((16, 16, 3), 0.5, dtype=np.float32)
    a, ra = gaussian_noise_patch(img, _rng(5), 1.0, 0.5)
    b, rb = gaussian_noise_patch(img, _rng(5), 1.0, 0.5)
    c, rc = gaussian_noise_patch(img, _rng(6), 1.0, 0.5)
    assert ra == rb and np.array_equal(a, b)
    assert not np.array_equal(a, c) or ra != rc


def test_blur_variant_replaces_patch_with_its_blurred_version():
    img = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for i in range(10):
        out, rec = blur_noise_patch(img, _rng(i), 1.0, 0.1, 2.0)
        assert rec.kind == "blur" and 0.1 <= rec.sigma <= 2.0
        patch = img[rec.top:rec.top + rec.side, rec.left:rec.left + rec.side]
        ref = np.asarray(Image.fromarray(patch).filter(ImageFilter.GaussianBlur(rec.sigma)))
        assert np.array_equal(out[rec.top:rec.top + rec.side, rec.left:rec.left + rec.side], ref)
        outside = _outside(rec, img.shape)
        assert np.array_equal(out[outside], img[outside])
    # blurring lowers the local variation of a noisy image
    i = 0
    while (res := blur_noise_patch(img, _rng(i), 1.0, 2.0, 2.0))[1].side < 8:
        i += 1
    out, rec = res
    win = (slice(rec.top, rec.top + rec.side), slice(rec.left, rec.left + rec.side))
    grad_out = np.abs(np.diff(out[win].astype(float), axis=1)).mean()
    grad_in = np.abs(np.diff(img[win].astype(float), axis=1)).mean()
    assert grad_out < 0.5 * grad_in


def test_apply_noise_patch_dispatch():
    img = np.full((16, 16, 3), 128, dtype=np.uint8)
    out, rec = apply_noise_patch(img, NoiseConfig(kind="none"), _rng(0))
    assert out is img and not rec.applied and rec.kind == "none"
    out, rec = apply_noise_patch(img, NoiseConfig(kind="gaussian", p=1.0, max_scale=0.5), _rng(0))
    assert rec.kind == "gaussian" and rec.applied
    out, rec = apply_noise_patch(img, NoiseConfig(kind="blur", blur_sigma_min=0.5, blur_sigma_max=0.6), _rng(0))
    assert rec.kind == "blur" and 0.5 <= rec.sigma <= 0.6
    with pytest.raises(ValueError, match="kind"):
        apply_noise_patch(img, NoiseConfig(kind="salt"), _rng(0))
    with pytest.raises(ValueError, match="shape"):
        gaussian_noise_patch(np.zeros((4, 4)), _rng(0))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_inplace_gives_the_same_result_and_needs_a_writable_image(dtype):
    base = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    img = base if dtype == np.uint8 else base.astype(np.float32) / 255
    for kind in ("gaussian", "blur"):
        cfg = NoiseConfig(kind=kind, p=1.0)
        ref, rec = apply_noise_patch(img, cfg, _rng(1))
        buf = img.copy()
        out, rec2 = apply_noise_patch(buf, cfg, _rng(1), inplace=True)
        assert out is buf and rec == rec2 and np.array_equal(out, ref)
        ro = img.copy()
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="writable"):
            apply_noise_patch(ro, cfg, _rng(1), inplace=True)


def test_uint8_noise_is_gaussian_with_the_drawn_sigma():
    """The 8-bit path (the one the dataset uses) adds round(255 * sigma * z), z ~ N(0, 1) exactly."""
    img = np.full((48, 48, 3), 128, dtype=np.uint8)
    zs = []
    for i in range(300):
        out, rec = gaussian_noise_patch(img, _rng(i), 1.0, 0.1)  # <= 5 sigma from the bounds: no clamping
        if rec.sigma < 0.03 or rec.side < 8:
            continue
        d = out[rec.top:rec.top + rec.side, rec.left:rec.left + rec.side].astype(np.float64) - 128
        zs.append((d / (255 * rec.sigma)).ravel())
    z = np.concatenate(zs)
    assert z.size > 100_000
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(np.abs(z) > 1) - 0.3173) < 0.01
    assert abs(np.mean(np.abs(z) > 2) - 0.0455) < 0.004
    assert abs(np.mean(np.abs(z) > 3) - 0.0027) < 0.001
    assert abs(np.mean(z**4) - 3.0) < 0.1  # Gaussian kurtosis
