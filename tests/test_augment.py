"""Multi-crop geometry, photometric augmentation and the per-sample dataset (shapes, determinism)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fastdinov2.config import Config, NoiseConfig, StageConfig, validate
from fastdinov2.data.augment import multicrop, sample_resized_crop_boxes, sample_rngs
from fastdinov2.data.datasets import ImageRecord
from fastdinov2.data.lowpass import DecodedImage
from fastdinov2.data.photometric import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_photometric,
    blur_kernel_size,
    gaussian_blur,
    identity_params,
    sample_photometric_params,
)
from fastdinov2.data.pretrain import REPLACEMENT_TRIES, BadSample, PretrainDataset

# ------------------------------------------------------------------------------------------ helpers


def _write_images(root: Path, sizes: list[tuple[int, int]]) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(sizes):
        small = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
        path = root / f"img{i}.jpg"
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(path, quality=92)
        records.append(ImageRecord(path, i))
    return records


def _cfg(full: tuple[int, int], low: tuple[int, int], patch: int, lowpass: str = "resize",
         n_local: int = 3, noise: str = "none", mask_sampling: str = "sample") -> Config:
    cfg = Config()
    cfg.ibot.mask_sampling = mask_sampling  # "sample": the masks are part of each sample (tested here)
    cfg.student.patch_size = patch
    cfg.crops.global_crops_size, cfg.crops.local_crops_size = full
    cfg.crops.local_crops_number = n_local
    cfg.curriculum.stages = [
        StageConfig(name="low", fraction=0.75, global_size=low[0], local_size=low[1], lowpass=lowpass,
                    noise=NoiseConfig(kind=noise)),
        StageConfig(name="full", fraction=0.25, global_size=full[0], local_size=full[1],
                    noise=NoiseConfig(kind=noise)),
    ]
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    return _write_images(tmp_path_factory.mktemp("imgs"), [(120, 90), (90, 120), (64, 64)])


# ------------------------------------------------------------------------------------- randomness


def test_sample_rngs_are_deterministic_and_independent():
    a, b = sample_rngs(0, 5), sample_rngs(0, 5)
    assert a.geometry.random() == b.geometry.random()
    c = sample_rngs(0, 6)
    d = sample_rngs(1, 5)
    x = sample_rngs(0, 5)
    streams = [x.noise.random(), x.geometry.random(), x.photometric.random(), x.masks.random()]
    assert len(set(streams)) == 4
    assert c.geometry.random() != sample_rngs(0, 5).geometry.random()
    assert d.geometry.random() != sample_rngs(0, 5).geometry.random()
    with pytest.raises(ValueError, match="non-negative"):
        sample_rngs(0, -1)


# --------------------------------------------------------------------------------------- geometry


def test_crop_boxes_follow_scale_and_ratio_and_fit():
    rng = np.random.default_rng(0)
    boxes = sample_resized_crop_boxes(rng, 200, 150, 2000, (0.32, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 150).all() and (left + w <= 200).all()
    area = h * w / (200 * 150)
    assert area.min() > 0.30 and area.max() <= 1.0
    ratio = w / h
    fitted = (area < 0.9)  # boxes that were not clipped by the image border
    assert ratio[fitted].min() > 0.7 and ratio[fitted].max() < 1.4
    local = sample_resized_crop_boxes(rng, 200, 150, 2000, (0.05, 0.32))
    larea = local[:, 2] * local[:, 3] / (200 * 150)
    assert larea.min() > 0.04 and larea.max() < 0.34
    assert abs(np.log(local[:, 3] / local[:, 2]).mean()) < 0.05  # log-uniform ratio centred on 1


def test_crop_boxes_fall_back_to_centre_crop_for_extreme_aspect():
    boxes = sample_resized_crop_boxes(np.random.default_rng(0), 400, 10, 5, (0.9, 1.0))
    # no 3/4..4/3 box of >= 90% area fits a 40:1 image: centre crop clamped to ratio 4/3
    assert (boxes == np.array([0, (400 - 13) // 2, 10, 13])).all()


def test_multicrop_shapes_flips_and_stage_independent_boxes():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    dec = DecodedImage(img, img.size)
    cfg = _cfg((64, 32), (32, 16), 8, n_local=4)
    low = multicrop(dec, cfg.crops, cfg.curriculum.stages[0], sample_rngs(0, 1).geometry)
    full = multicrop(dec, cfg.crops, cfg.curriculum.stages[1], sample_rngs(0, 1).geometry)
    assert low.global_crops.shape == (2, 3, 32, 32) and low.local_crops.shape == (4, 3, 16, 16)
    assert full.global_crops.shape == (2, 3, 64, 64) and full.local_crops.shape == (4, 3, 32, 32)
    assert low.global_crops.dtype == torch.uint8
    assert np.array_equal(low.global_boxes, full.global_boxes)  # same regions at both resolutions
    assert np.array_equal(low.flips, full.flips)
    # crops are the boxes cut out and resized (antialiased bicubic, as Pillow's crop().resize() within
    # rounding); flipped ones are mirrored
    key = 1
    while not (full.flips[:2].any() and not full.flips[:2].all()):
        key += 1
        full = multicrop(dec, cfg.crops, cfg.curriculum.stages[1], sample_rngs(0, key).geometry)
    for i in range(2):
        t, left, h, w = full.global_boxes[i].tolist()
        ref = np.asarray(img.crop((left, t, left + w, t + h)).resize((64, 64), Image.Resampling.BICUBIC))
        got = full.global_crops[i].permute(1, 2, 0).numpy()
        got = (got[:, ::-1] if full.flips[i] else got).astype(int)
        assert np.abs(got - ref).max() <= 4 and np.abs(got - ref).mean() < 0.1
        assert np.abs(got[:, ::-1] - ref).mean() > 20  # the other orientation is far off


# ------------------------------------------------------------------------------------ photometric


def test_blur_kernel_size_scales_with_resolution():
    assert blur_kernel_size(1.0) == 9  # DINOv2 at full size (224 global, 96 local)
    assert blur_kernel_size(0.5) == 5  # 112 / 48
    assert blur_kernel_size(0.25) == 3
    assert blur_kernel_size(0.1) == 3
    for r in (0.3, 0.5, 0.75, 1.0):
        assert blur_kernel_size(r) % 2 == 1


def test_jitter_ops_match_torchvision():
    x = torch.rand(4, 3, 16, 16)
    x[0, :, :4, :4] = 0.5  # grey pixels (hue undefined)
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    for i in range(4):
        f, s = float(factors[i]), float(shifts[i])
        torch.testing.assert_close(adjust_brightness(x, factors)[i], TF.adjust_brightness(x[i], f))
        torch.testing.assert_close(adjust_contrast(x, factors)[i], TF.adjust_contrast(x[i], f))
        torch.testing.assert_close(adjust_saturation(x, factors)[i], TF.adjust_saturation(x[i], f))
        torch.testing.assert_close(adjust_hue(x, shifts)[i], TF.adjust_hue(x[i], s), atol=1e-5, rtol=0)


def test_blur_matches_torchvision_gaussian_blur():
    x = torch.rand(3, 3, 20, 20)
    sigma = torch.tensor([0.1, 0.8, 2.0])
    out = gaussian_blur(x, sigma, 9)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [9, 9], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_identity_params_only_normalise():
    crops = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    out = apply_photometric(crops, identity_params(2))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ((200 / 255 - mean) / std).expand(2, 3, 8, 8))
    raw = apply_photometric(crops, identity_params(2), normalize=False)
    torch.testing.assert_close(raw, torch.full((2, 3, 8, 8), 200 / 255))


def test_normalised_output_statistics():
    # uniform random pixels: after normalisation, channel means are (0.5 - mean) / std, stds (1/sqrt 12)/std
    crops = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = apply_photometric(crops, identity_params(4))
    m = out.mean(dim=(0, 2, 3))
    s = out.std(dim=(0, 2, 3))
    for c in range(3):
        assert abs(float(m[c]) - (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]) < 0.02
        assert abs(float(s[c]) - (1 / math.sqrt(12)) / IMAGENET_STD[c]) < 0.02


def test_solarize_only_on_global2_and_frequencies():
    rng = np.random.default_rng(0)
    g1 = sample_photometric_params(rng, 4000, "global1")
    g2 = sample_photometric_params(rng, 4000, "global2")
    loc = sample_photometric_params(rng, 4000, "local")
    assert not g1.solarize.any() and not loc.solarize.any()
    assert abs(g2.solarize.float().mean().item() - 0.2) < 0.02
    for p in (g1, g2, loc):
        assert abs(p.grayscale.float().mean().item() - 0.2) < 0.02
        assert abs(p.jitter.float().mean().item() - 0.8) < 0.02
        assert sorted(p.jitter_order[0].tolist()) == [0, 1, 2, 3]
        assert (p.brightness >= 0.6).all() and (p.brightness <= 1.4).all()
        assert (p.hue.abs() <= 0.1).all()
    assert g1.blur.all()
    assert abs(g2.blur.float().mean().item() - 0.1) < 0.02
    assert abs(loc.blur.float().mean().item() - 0.5) < 0.03
    half = sample_photometric_params(rng, 100, "global1", resolution_scale=0.5)
    assert (half.blur_sigma <= 1.0).all() and (half.blur_sigma >= 0.05).all()
    assert (half.blur_kernel_size == 5).all()


def test_solarize_and_grayscale_are_applied_as_specified():
    crops = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = crops.float() / 255
    params = identity_params(3)
    params.solarize[1] = True
    params.grayscale[2] = True
    out = apply_photometric(crops, params, normalize=False)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], torch.where(x[1] >= SOLARIZE_THRESHOLD, 1 - x[1], x[1]))
    gray = 0.2989 * x[2, 0] + 0.587 * x[2, 1] + 0.114 * x[2, 2]
    for c in range(3):
        torch.testing.assert_close(out[2, c], gray)


def test_jitter_runs_in_each_crops_own_order():
    crops = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = crops.float() / 255
    params = identity_params(2)
    params.jitter[:] = True
    params.brightness[:] = 1.3
    params.hue[:] = 0.08
    params.jitter_order[0] = torch.tensor([0, 3, 1, 2])  # brightness then hue
    params.jitter_order[1] = torch.tensor([3, 1, 2, 0])  # hue then brightness
    out = apply_photometric(crops, params, normalize=False)
    torch.testing.assert_close(out[0], TF.adjust_hue(TF.adjust_brightness(x[0], 1.3), 0.08), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], TF.adjust_brightness(TF.adjust_hue(x[1], 0.08), 1.3), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- dataset


@pytest.mark.parametrize("lowpass", ["resize", "fourier", "jpeg_draft"])
def test_dataset_shapes_per_stage_tiny(records, lowpass):
    cfg = _cfg((64, 32), (32, 16), 8, lowpass=lowpass, noise="gaussian")
    ds = PretrainDataset(records, cfg, seed=0)
    for stage, (g, loc, grid) in enumerate([(32, 16, 4), (64, 32, 8)]):
        s = ds[(0, 3, stage)]
        assert not isinstance(s, BadSample)
        assert s["global_crops"].shape == (2, 3, g, g) and s["global_crops"].dtype == torch.float32
        assert s["local_crops"].shape == (3, 3, loc, loc)
        assert s["masks"].shape == (2, grid * grid) and s["masks"].dtype == torch.bool
        assert s["shape"].stage == stage and s["shape"].mask_grid == (grid, grid)
        assert s["noise"].applied and s["label"] == 0 and s["sample_key"] == 3


def test_dataset_leaves_the_masks_to_the_batch_by_default(records):
    cfg = _cfg((64, 32), (32, 16), 8, mask_sampling="batch")
    s = PretrainDataset(records, cfg, seed=7)[(0, 3, 1)]
    assert s["masks"] is None  # collate_train draws them for the whole batch
    spec = s["shape"].batch_masks
    assert spec is not None and spec.seed == 7 and spec.probability == cfg.ibot.mask_sample_probability


def test_dataset_shapes_at_paper_sizes(records):
    cfg = _cfg((224, 96), (112, 48), 16, n_local=8)
    ds = PretrainDataset(records, cfg, seed=0, photometric_on="device")
    s0, s1 = ds[(1, 0, 0)], ds[(1, 0, 1)]
    assert s0["global_crops"].shape == (2, 3, 112, 112) and s0["local_crops"].shape == (8, 3, 48, 48)
    assert s1["global_crops"].shape == (2, 3, 224, 224) and s1["local_crops"].shape == (8, 3, 96, 96)
    assert s0["masks"].shape == (2, 49) and s1["masks"].shape == (2, 196)
    assert s0["global_crops"].dtype == torch.uint8
    assert len(s0["global_params"]) == 2 and len(s0["local_params"]) == 8
    assert (s0["global_params"].blur_kernel_size == 5).all()
    assert (s1["local_params"].blur_kernel_size == 9).all()


def _same(a, b) -> bool:
    return (torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
            and torch.equal(a["masks"], b["masks"]) and a["noise"] == b["noise"])


def test_dataset_is_deterministic_per_sample_key(records):
    cfg = _cfg((64, 32), (32, 16), 8, noise="gaussian")
    ds = PretrainDataset(records, cfg, seed=3)
    again = PretrainDataset(records, cfg, seed=3)
    for stage in (0, 1):
        a = ds[(2, 11, stage)]
        assert _same(a, ds[(2, 11, stage)]) and _same(a, again[(2, 11, stage)])
        assert not torch.equal(a["global_crops"], ds[(2, 12, stage)]["global_crops"])
        other_seed = PretrainDataset(records, cfg, seed=4)[(2, 11, stage)]
        assert not torch.equal(a["global_crops"], other_seed["global_crops"])


def test_worker_and_device_photometric_agree(records):
    cfg = _cfg((64, 32), (32, 16), 8)
    worker = PretrainDataset(records, cfg, seed=0, photometric_on="worker")[(0, 5, 1)]
    device = PretrainDataset(records, cfg, seed=0, photometric_on="device")[(0, 5, 1)]
    torch.testing.assert_close(worker["global_crops"],
                               apply_photometric(device["global_crops"], device["global_params"]))
    torch.testing.assert_close(worker["local_crops"],
                               apply_photometric(device["local_crops"], device["local_params"]))


def test_bad_image_gives_bad_sample_and_bad_requests_raise(tmp_path, records):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    cfg = _cfg((64, 32), (32, 16), 8, lowpass="jpeg_draft")
    ds = PretrainDataset([*records, ImageRecord(bad, 7)], cfg, seed=0)
    for stage in (0, 1):
        out = ds[(3, 0, stage)]
        assert isinstance(out, BadSample) and out.path == str(bad) and out.reason
        assert out.shape is not None and out.shape.stage == stage
    with pytest.raises(IndexError, match="stage 2"):
        ds[(0, 0, 2)]
    with pytest.raises(IndexError, match="index 9"):
        ds[(9, 0, 0)]
    with pytest.raises(TypeError, match="sample_key"):
        ds[0]
    with pytest.raises(ValueError, match="photometric_on"):
        PretrainDataset(records, cfg, seed=0, photometric_on="gpu")  # type: ignore[arg-type]


def test_bad_image_is_replaced_by_another_drawn_from_the_sample_key(tmp_path, records):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    cfg = _cfg((64, 32), (32, 16), 8, lowpass="jpeg_draft")
    recs = [*records, ImageRecord(bad, 7)]
    ds = PretrainDataset(recs, cfg, seed=0, on_bad="replace")
    drop = PretrainDataset(recs, cfg, seed=0, on_bad="drop")
    for key in range(6):
        out = ds[(3, key, 1)]
        assert not isinstance(out, BadSample) and out["index"] != 3 and out["label"] != 7
        assert out["index"] == ds.replacement_index(3, key, 0)
        assert out["replaced"] == [(str(bad), drop[(3, key, 1)].reason)]
        again = ds[(3, key, 1)]  # the same replacement and the same crops: drawn from (seed, key, attempt)
        assert again["index"] == out["index"] and torch.equal(again["global_crops"], out["global_crops"])
        # the replacement is augmented with the requested sample's key, like any sample drawn at that key
        assert torch.equal(out["global_crops"], ds[(out["index"], key, 1)]["global_crops"])
    assert ds[(0, 0, 1)]["replaced"] == []
    assert {ds.replacement_index(3, k, 0) for k in range(60)} == {0, 1, 2}  # any other image, never itself
    # Every image bad: after REPLACEMENT_TRIES further tries the sample is a BadSample naming the first file.
    all_bad = PretrainDataset([ImageRecord(bad, 0), ImageRecord(bad, 1)], cfg, seed=0, on_bad="replace")
    out = all_bad[(0, 5, 0)]
    assert isinstance(out, BadSample) and out.path == str(bad) and f"{REPLACEMENT_TRIES} replacement(s)" in out.reason
    with pytest.raises(ValueError, match="on_bad"):
        PretrainDataset(records, cfg, seed=0, on_bad="skip")  # type: ignore[arg-type]


# ------------------------------------------------------------------ one draw for all crops of a sample


def test_crops_photometric_params_follow_each_crops_kind():
    from fastdinov2.data.photometric import sample_crops_photometric_params

    # per-kind calls are the mixed sampler with one kind: the same stream
    a = sample_photometric_params(np.random.default_rng(4), 5, "global2", 0.5)
    b = sample_crops_photometric_params(np.random.default_rng(4), ["global2"] * 5, [0.5] * 5)
    for name in ("jitter", "jitter_order", "brightness", "hue", "blur", "blur_sigma", "blur_kernel_size", "solarize"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    kinds = ["global1", "global2"] + ["local"] * 8
    scales = [0.5, 0.5] + [0.25] * 8
    rng = np.random.default_rng(0)
    draws = [sample_crops_photometric_params(rng, kinds, scales) for _ in range(3000)]
    blur = torch.stack([d.blur for d in draws]).float().mean(0)
    sol = torch.stack([d.solarize for d in draws]).float().mean(0)
    jit = torch.stack([d.jitter for d in draws]).float().mean(0)
    gray = torch.stack([d.grayscale for d in draws]).float().mean(0)
    assert blur[0] == 1.0 and abs(blur[1] - 0.1) < 0.02 and (blur[2:] - 0.5).abs().max() < 0.04
    assert sol[0] == 0 and abs(sol[1] - 0.2) < 0.025 and (sol[2:] == 0).all()
    assert (jit - 0.8).abs().max() < 0.03 and (gray - 0.2).abs().max() < 0.03
    sigma = torch.stack([d.blur_sigma for d in draws])
    assert sigma[:, :2].min() >= 0.05 and sigma[:, :2].max() <= 1.0 and sigma[:, 2:].max() <= 0.5
    assert draws[0].blur_kernel_size.tolist() == [5, 5] + [3] * 8
    with pytest.raises(ValueError, match="resolution scales"):
        sample_crops_photometric_params(rng, kinds, scales[:3])
    with pytest.raises(ValueError, match="crop_kind"):
        sample_crops_photometric_params(rng, ["global3"], [1.0])  # type: ignore[list-item]


def test_dataset_noise_changes_only_pixels_not_geometry_or_params(records):
    noisy = PretrainDataset(records, _cfg((64, 32), (32, 16), 8, noise="gaussian"), seed=0,
                            photometric_on="device")
    clean = PretrainDataset(records, _cfg((64, 32), (32, 16), 8), seed=0, photometric_on="device")
    changed = 0
    for key in range(6):
        a, b = noisy[(0, key, 1)], clean[(0, key, 1)]
        assert a["noise"].applied and not b["noise"].applied
        assert torch.equal(a["masks"], b["masks"])
        assert torch.equal(a["global_params"].blur_sigma, b["global_params"].blur_sigma)
        changed += int(not torch.equal(a["global_crops"], b["global_crops"]))
    assert changed >= 4  # a patch of side U{1..90} on the 120x90 image mostly lands in a global crop


@pytest.mark.parametrize("kind,scale", [("global1", 1.0), ("global2", 0.5), ("local", 1.0)])
def test_dense_device_path_matches_the_subset_path_without_host_reads(kind, scale):
    from fastdinov2.data.photometric import _gaussian_blur_conv, gaussian_blur

    from .test_train_sync_free import SyncRecorder

    rng = np.random.default_rng(3)
    n, size = 64, 20
    params = sample_photometric_params(rng, n, kind, scale)
    hue_at = (params.jitter_order == 3).int().argmax(dim=1)[params.jitter]
    assert set(hue_at.tolist()) == {0, 1, 2, 3}  # the hue rotation at every position of the order
    crops = torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    subset = apply_photometric(crops, params, dense=False)
    moved = params.to("cpu")
    with SyncRecorder() as rec:
        dense = apply_photometric(crops, moved, dense=True)
    # the only host reads are of the blur kernel size, which PhotometricParams.to keeps on the CPU
    assert moved.blur_kernel_size.device.type == "cpu" and rec.calls == ["unique", "item"]
    torch.testing.assert_close(dense, subset, rtol=1e-4, atol=1e-4)
    x = torch.rand(3, 3, 17, 19)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    torch.testing.assert_close(_gaussian_blur_conv(x, sigma, 9), gaussian_blur(x, sigma, 9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_dense_path_matches_eager(backend):
    from fastdinov2.data.photometric import compiled_dense_fn

    rng = np.random.default_rng(5)
    params = sample_photometric_params(rng, 32, "local", 0.5)
    crops = torch.from_numpy(rng.integers(0, 256, (32, 3, 12, 12), dtype=np.uint8))
    eager = apply_photometric(crops, params, dense=True)
    # fullgraph: one graph per crop size, no graph break (the hue rotation once wrote into a strided out=)
    compiled = apply_photometric(crops, params, dense=True,
                                 dense_fn=compiled_dense_fn(backend=backend, fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_dense_fn_makes_its_constants_outside_the_compiled_region(monkeypatch):
    """Constants made inside a compiled function would be CUDA-graph outputs under ``reduce-overhead`` or the
    ``cudagraphs`` backend, cached and then overwritten by the next replay (an H100 run failed on it)."""
    from fastdinov2.data import photometric as ph

    seen: list[set[tuple[float, ...]]] = []

    def fake_compile(fn, **kwargs):  # records which constants exist when the compiled region is entered
        def run(x, *args, **kw):
            seen.append({key[0] for key in ph._CONSTANTS if key[1] == x.device and key[2] == x.dtype})
            return fn(x, *args, **kw)
        return run

    monkeypatch.setattr(ph, "_CONSTANTS", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    rng = np.random.default_rng(6)
    params = sample_photometric_params(rng, 4, "local", 0.5)
    crops = torch.from_numpy(rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    out = apply_photometric(crops, params, dense=True, dense_fn=ph.compiled_dense_fn())
    torch.testing.assert_close(out, apply_photometric(crops, params, dense=True))
    assert seen == [{ph._GRAY_WEIGHTS, ph._HUE_OFFSETS, ph.IMAGENET_MEAN, ph.IMAGENET_STD}]


def test_one_blend_per_jitter_position_equals_the_ops_in_turn():
    # brightness, contrast and saturation of one position as one affine blend (the dense path): a crop that
    # applies none is unchanged exactly, brightness is exact, the blends equal the ops to rounding
    from fastdinov2.data.photometric import _jitter_position, adjust_brightness, adjust_contrast, adjust_saturation

    torch.manual_seed(0)
    x = torch.rand(4, 3, 9, 7)
    factors = torch.ones(4, 3)  # crop 0: none; 1: brightness; 2: contrast; 3: saturation
    factors[1, 0], factors[2, 1], factors[3, 2] = 1.4, 0.6, 1.7
    coefs = torch.stack([factors.prod(dim=1), 1.0 - factors[:, 2], 1.0 - factors[:, 1]], dim=1)
    out = _jitter_position(x.clone(), coefs)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1:2], adjust_brightness(x[1:2], factors[1:2, 0]))
    torch.testing.assert_close(out[2:3], adjust_contrast(x[2:3], factors[2:3, 1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[3:4], adjust_saturation(x[3:4], factors[3:4, 2]), rtol=0, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
