"""Low-pass methods: resize, fourier (ideal band limit, checked against numpy FFT), jpeg_draft (DCT decode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from fastdinov2.data.datasets import BadImageError
from fastdinov2.data.lowpass import (
    DecodedImage,
    decode_image,
    draft_shift,
    fourier_crops,
    fourier_lowpass,
    render_crops,
    resize_crops,
)


def _smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    small = (np.random.default_rng(seed).random((max(2, h // 16), max(2, w // 16), 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _ideal_lowpass_np(x: np.ndarray, size: int) -> np.ndarray:
    """Independent reference: zero every frequency with |f| >= size/2 on the full grid (numpy)."""
    full = x.shape[-1]
    f = np.fft.fftfreq(full) * full  # integer frequencies
    keep = np.abs(f) < size / 2
    spec = np.fft.fft2(x) * (keep[:, None] & keep[None, :])
    return np.fft.ifft2(spec).real


def _without_nyquist(x: np.ndarray, size: int) -> np.ndarray:
    """Remove the +-size/2 rows/columns of the spectrum (their handling is a documented convention)."""
    full = x.shape[-1]
    f = np.abs(np.fft.fftfreq(full) * full)
    bad = np.isclose(f, size / 2)
    spec = np.fft.fft2(x)
    spec[..., bad, :] = 0
    spec[..., :, bad] = 0
    return np.fft.ifft2(spec).real


@pytest.mark.parametrize("full,size", [(64, 32), (96, 48), (224, 112), (32, 16), (64, 28), (48, 21)])
def test_fourier_passes_low_band_unchanged_and_removes_high_band(full, size):
    rng = np.random.default_rng(full + size)
    x = _without_nyquist(rng.random((3, full, full)) * 255, size)
    low = _ideal_lowpass_np(x, size)
    high = x - low
    step = full // size if full % size == 0 else None
    out_high = fourier_lowpass(torch.from_numpy(high).float(), size).double().numpy()
    assert np.abs(out_high).max() < 1e-2  # nothing above the kept band survives
    out = fourier_lowpass(torch.from_numpy(x).float(), size).double().numpy()
    assert out.shape == (3, size, size)
    if step is not None:  # the low band itself, sampled on the coarse grid, is the output
        np.testing.assert_allclose(out, low[:, ::step, ::step], atol=2e-2)
    # the spectrum of the output is the (rescaled) low block of the input spectrum
    spec_in = np.fft.fft2(x)
    spec_out = np.fft.fft2(out) * (full * full) / (size * size)
    k = np.arange(-((size - 1) // 2), (size - 1) // 2 + 1)
    np.testing.assert_allclose(spec_out[:, k[:, None], k[None, :]], spec_in[:, k[:, None], k[None, :]],
                               atol=1e-3 * np.abs(spec_in).max())


def test_fourier_preserves_intensity_and_amplitude_of_a_low_cosine():
    full, size = 64, 32
    yy = np.arange(full)[:, None]
    xx = np.arange(full)[None, :]
    img = 100 + 50 * np.cos(2 * np.pi * (3 * xx + 5 * yy) / full)
    out = fourier_lowpass(torch.from_numpy(np.stack([img] * 3)).float(), size).double().numpy()
    ys = np.arange(size)[:, None] * 2
    xs = np.arange(size)[None, :] * 2
    expected = 100 + 50 * np.cos(2 * np.pi * (3 * xs + 5 * ys) / full)  # hand-computed samples
    np.testing.assert_allclose(out[0], expected, atol=1e-3)
    # a cosine above the band (frequency 20 > 32/2) leaves only the mean
    img_hi = 100 + 50 * np.cos(2 * np.pi * 20 * xx / full) * np.ones((full, 1))
    out_hi = fourier_lowpass(torch.from_numpy(np.stack([img_hi] * 3)).float(), size).double().numpy()
    np.testing.assert_allclose(out_hi, 100.0, atol=1e-3)


def test_fourier_crops_are_uint8_clamped_and_match_the_float_lowpass():
    stripes = ((np.arange(100) // 7) % 2 * 255).astype(np.uint8)  # sharp 0/255 edges ring (Gibbs)
    img = Image.fromarray(np.broadcast_to(stripes[None, :, None], (80, 100, 3)).copy())
    decoded = DecodedImage(img, img.size, 1)
    boxes = np.array([[0, 0, 80, 80], [10, 20, 50, 60]])
    out = fourier_crops(decoded, boxes, 32, 64)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    ref = fourier_lowpass(resize_crops(decoded, boxes, 64).float(), 32)
    assert (ref.min() < 0) or (ref.max() > 255)  # clamping is exercised
    np.testing.assert_array_equal(out.numpy(), ref.round().clamp(0, 255).to(torch.uint8).numpy())
    assert torch.equal(fourier_crops(decoded, boxes, 64, 64), resize_crops(decoded, boxes, 64))


def test_resize_crop_matches_pil_crop_then_bicubic_resize():
    img = _smooth_image(120, 90)
    decoded = DecodedImage(img, img.size, 1)
    boxes = np.array([[5, 10, 60, 70], [0, 0, 90, 120]])
    out = resize_crops(decoded, boxes, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        ref = np.asarray(img.crop((left, t, left + w, t + h)).resize((32, 32), Image.Resampling.BICUBIC))
        diff = np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
        assert diff.mean() < 1.0  # identical except for the filter support at the box border


def test_draft_shift_is_largest_power_of_two_reduction_keeping_the_resolution():
    assert draft_shift(1.0) == 0
    assert draft_shift(0.75) == 0
    assert draft_shift(0.5) == 1
    assert draft_shift(0.3) == 1
    assert draft_shift(0.25) == 2
    assert draft_shift(0.01) == 3  # libjpeg stops at 1/8
    with pytest.raises(ValueError):
        draft_shift(0.0)


@pytest.mark.parametrize("w,h", [(500, 375), (97, 64)])
def test_jpeg_draft_decodes_at_reduced_scale_via_draft(tmp_path, monkeypatch, w, h):
    path = tmp_path / "a.jpg"
    _smooth_image(w, h).save(path, quality=95)
    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    dec = decode_image(path, "jpeg_draft", 0.5)
    assert calls, "jpeg_draft must use PIL's draft"
    assert dec.scale == 2 and dec.full_size == (w, h)
    assert dec.image.size == ((w + 1) // 2, (h + 1) // 2)
    quarter = decode_image(path, "jpeg_draft", 0.25)
    assert quarter.scale == 4 and quarter.image.size == ((w + 3) // 4, (h + 3) // 4)
    full = decode_image(path, "resize", 0.5)
    assert full.scale == 1 and full.image.size == (w, h)


def test_jpeg_draft_crops_have_stage_size_and_match_resize_crops(tmp_path):
    path = tmp_path / "b.jpg"
    _smooth_image(400, 300).save(path, quality=95)
    boxes = np.array([[0, 0, 300, 300], [50, 100, 120, 160], [13, 7, 101, 99]])
    draft = decode_image(path, "jpeg_draft", 0.5)
    full = decode_image(path, "resize", 0.5)
    a = render_crops(draft, boxes, 48, 96, "jpeg_draft")
    b = render_crops(full, boxes, 48, 96, "resize")
    assert a.shape == b.shape == (3, 3, 48, 48)
    # same regions (box mapped to the drafted grid), slightly different filters
    assert (a.float() - b.float()).abs().mean() < 4.0


def test_jpeg_draft_falls_back_to_full_decode_for_png(tmp_path):
    path = tmp_path / "c.png"
    _smooth_image(64, 48).save(path)
    dec = decode_image(path, "jpeg_draft", 0.5)
    assert dec.scale == 1 and dec.image.size == (64, 48) and dec.full_size == (64, 48)


def test_bad_files_raise_bad_image_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for method in ("resize", "fourier", "jpeg_draft"):
        for name in ("empty.jpg", "junk.jpg", "missing.jpg"):
            with pytest.raises(BadImageError, match=name):
                decode_image(tmp_path / name, method, 0.5)


def test_render_crops_rejects_unknown_method():
    img = _smooth_image(32, 32)
    with pytest.raises(ValueError, match="lowpass"):
        render_crops(DecodedImage(img, img.size), np.array([[0, 0, 8, 8]]), 8, 16, "wavelet")
