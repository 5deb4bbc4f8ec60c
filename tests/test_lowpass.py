"""Low-pass methods: resize, fourier (ideal band limit, checked against numpy FFT), jpeg_draft (DCT decode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from fastdinov2.data.datasets import BadImageError
from fastdinov2.data.lowpass import (
    DecodedImage,
    decode_full,
    decode_image,
    draft_shift,
    fourier_crops,
    fourier_lowpass,
    jpeg_decoder,
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
    assert full.scale == 1 and full.size == (w, h)


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


# ------------------------------------------------------------------ resampling implementation (torch)


def _photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth field plus texture: has both low and high frequencies."""
    rng = np.random.default_rng(seed)
    base = np.asarray(_smooth_image(w, h, seed), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def test_resize_crops_match_pils_box_resize_in_distribution():
    """Same filter family as the former Pillow implementation (``resize(box=...)``): per-crop statistics agree."""
    img = _photo_like(200, 150)
    decoded = DecodedImage(img, img.size, 1)
    rng = np.random.default_rng(0)
    from fastdinov2.data.augment import sample_resized_crop_boxes

    for scale, size in (((0.32, 1.0), 64), ((0.05, 0.32), 24), ((0.005, 0.01), 32)):  # down / up-sampling
        boxes = sample_resized_crop_boxes(rng, 200, 150, 40, scale)
        out = resize_crops(decoded, boxes, size).permute(0, 2, 3, 1).numpy().astype(np.float64)
        ref = np.stack([
            np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=(lf, t, lf + w, t + h)))
            for t, lf, h, w in boxes.tolist()
        ]).astype(np.float64)
        assert np.abs(out - ref).mean() < 1.0  # differences only at the box border (support outside it)
        np.testing.assert_allclose(out.mean(axis=(1, 2)), ref.mean(axis=(1, 2)), atol=1.0)
        np.testing.assert_allclose(out.std(axis=(1, 2)), ref.std(axis=(1, 2)), rtol=0.05, atol=0.5)


@pytest.mark.parametrize("lowpass", ["resize", "fourier", "jpeg_draft"])
def test_flips_mirror_the_unflipped_crops_exactly(tmp_path, lowpass):
    path = tmp_path / "f.jpg"
    _photo_like(160, 120).save(path, quality=95)
    decoded = decode_image(path, lowpass, 0.5)
    boxes = np.array([[0, 0, 120, 120], [10, 33, 61, 47], [5, 7, 100, 150]])
    flips = np.array([True, False, True])
    plain = render_crops(decoded, boxes, 24, 48, lowpass)
    flipped = render_crops(decoded, boxes, 24, 48, lowpass, flips)
    assert flipped.shape == plain.shape == (3, 3, 24, 24) and flipped.is_contiguous()
    for i, f in enumerate(flips.tolist()):
        assert torch.equal(flipped[i], plain[i].flip(-1) if f else plain[i])
    with pytest.raises(ValueError, match="flip"):
        render_crops(decoded, boxes, 24, 48, lowpass, flips[:2])


def test_decoded_boxes_round_half_to_even_and_are_unbiased():
    from fastdinov2.data.lowpass import decoded_boxes

    got = decoded_boxes(np.array([[1, 3, 5, 7], [0, 0, 375, 500], [373, 499, 2, 1]]), 2, (250, 188))
    # edges 0.5 -> 0, 1.5 -> 2, 3 -> 3, 5 -> 5; clipped to the drafted image; at least one pixel
    np.testing.assert_array_equal(got, [[0, 2, 3, 3], [0, 0, 188, 250], [186, 249, 2, 1]])
    np.testing.assert_array_equal(decoded_boxes(np.array([[1, 3, 5, 7]]), 1, (250, 188)), [[1, 3, 5, 7]])
    assert decoded_boxes(np.zeros((0, 4), dtype=np.int64), 2, (4, 4)).shape == (0, 4)
    from fastdinov2.data.augment import sample_resized_crop_boxes

    boxes = sample_resized_crop_boxes(np.random.default_rng(0), 500, 375, 4000, (0.05, 1.0))
    for scale in (2, 4):
        snapped = decoded_boxes(boxes, scale, ((500 + scale - 1) // scale, (375 + scale - 1) // scale))
        err = snapped * scale - boxes  # in full-resolution pixels
        assert np.abs(err[:, :2]).max() <= scale / 2
        assert np.abs(err.mean(axis=0)).max() < 0.1 * scale  # no systematic shift or growth


def test_jpeg_draft_crops_are_pils_resize_of_the_snapped_box(tmp_path):
    """Drafted crops = Pillow's resize of the box snapped to the drafted grid; close to the fractional box."""
    from fastdinov2.data.lowpass import decoded_boxes

    for name, image in (("smooth", _smooth_image(300, 200)), ("textured", _photo_like(300, 200))):
        path = tmp_path / f"{name}.jpg"
        image.save(path, quality=95)
        draft = decode_image(path, "jpeg_draft", 0.5)
        assert draft.scale == 2 and draft.image is not None
        img = draft.image
        boxes = np.array([[1, 3, 151, 149], [20, 41, 99, 101], [0, 0, 200, 200], [7, 9, 55, 57]])  # >= 5% area
        out = resize_crops(draft, boxes, 48).permute(0, 2, 3, 1).numpy().astype(np.float64)

        def pil(rows, img=img) -> np.ndarray:  # type: ignore[no-untyped-def]
            return np.stack([
                np.asarray(img.resize((48, 48), Image.Resampling.BICUBIC, box=(lf, t, lf + w, t + h)))
                for t, lf, h, w in rows
            ]).astype(np.float64)

        snapped = pil(decoded_boxes(boxes, 2, img.size).tolist())
        assert np.abs(out - snapped).mean() < 0.5  # differences only at the box border
        fractional = pil((boxes / 2).tolist())  # the former implementation: a shift <= 1/2 drafted pixel
        np.testing.assert_allclose(out.mean(axis=(1, 2)), fractional.mean(axis=(1, 2)), atol=3.0)
        np.testing.assert_allclose(out.std(axis=(1, 2)), fractional.std(axis=(1, 2)), rtol=0.05)


def test_decoded_image_pixels_and_image_views():
    img = _smooth_image(20, 10)
    dec = DecodedImage(img, (40, 20), 2)
    arr = dec.array()
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8 and arr.flags.writeable
    own = dec.with_pixels()
    assert own.image is None and own.pixels is not None and own.size == (20, 10) == dec.size
    assert own.full_size == (40, 20) and own.scale == 2 and own.array() is own.pixels
    own.pixels[:] = 0
    assert np.array_equal(np.asarray(img), arr)  # the decoded PIL image is not touched
    with pytest.raises(ValueError, match="image or pixels"):
        DecodedImage(None, (1, 1))
    with pytest.raises(ValueError, match="uint8"):
        DecodedImage(None, (1, 1), 1, np.zeros((1, 1, 3), np.float32))


# ------------------------------------------------------------------ full-size JPEG decode (torchcodec)


def _jpeg_variants(tmp_path) -> dict[str, object]:
    img = _photo_like(120, 90)
    out = {}
    for name, im, kw in [
        ("rgb", img, {}),
        ("gray", img.convert("L"), {}),
        ("cmyk", img.convert("CMYK"), {}),
        ("progressive", img, {"progressive": True}),
        ("subsampled_420", img, {"subsampling": 2}),
    ]:
        path = tmp_path / f"{name}.jpg"
        im.save(path, "JPEG", quality=85, **kw)
        out[name] = path
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": Pillow (and so DINOv2, torchvision's loader) keeps the stored pixels
    img.save(tmp_path / "exif_rotated.jpg", "JPEG", exif=exif.tobytes())
    exif[0x0112] = 1
    img.save(tmp_path / "exif_upright.jpg", "JPEG", exif=exif.tobytes())
    out["exif_rotated"], out["exif_upright"] = tmp_path / "exif_rotated.jpg", tmp_path / "exif_upright.jpg"
    return out


def test_full_decode_of_jpegs_is_pixel_identical_to_pillow(tmp_path):
    from fastdinov2.data.datasets import load_image

    assert jpeg_decoder() is not None, "torchcodec (a dependency) could not be loaded"
    for name, path in _jpeg_variants(tmp_path).items():
        decoded = decode_full(path)
        fast = name != "exif_rotated"  # a rotated file is left to Pillow
        assert (decoded.image is None) == fast, name
        assert decoded.scale == 1 and decoded.full_size == (120, 90), name
        np.testing.assert_array_equal(decoded.array(), np.asarray(load_image(path)), err_msg=name)
        assert decoded.array().flags.writeable, name
        for method in ("resize", "fourier"):
            assert decode_image(path, method).full_size == (120, 90)


def test_full_decode_without_torchcodec_uses_pillow(tmp_path, monkeypatch):
    import fastdinov2.data.lowpass as lowpass

    path = _jpeg_variants(tmp_path)["rgb"]
    fast = decode_full(path).array()
    monkeypatch.setattr(lowpass, "jpeg_decoder", lambda: None)
    slow = decode_full(path)
    assert slow.image is not None
    np.testing.assert_array_equal(slow.array(), fast)


def test_torchcodec_refusals_are_reported_with_pillows_reason(tmp_path):
    good = _jpeg_variants(tmp_path)["rgb"].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "soi_only.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(BadImageError, match=r"truncated\.jpg: truncated or corrupt file"):
        decode_full(tmp_path / "truncated.jpg")
    with pytest.raises(BadImageError, match="soi_only.jpg"):
        decode_full(tmp_path / "soi_only.jpg")
