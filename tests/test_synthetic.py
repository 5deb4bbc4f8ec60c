"""The embedded synthetic dataset: determinism, layout, atomic writes, class evidence, extra sets."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fastdinov2.data import synthetic as syn
from fastdinov2.data.datasets import DataError, discover_training_images, load_image, scan_class_folders
from fastdinov2.data.synthetic import (
    RetrievalSpec,
    SyntheticSpec,
    class_names,
    class_pairs,
    default_dataset_root,
    describe,
    render_sample,
    write_corrupted_set,
    write_retrieval_set,
    write_synthetic_dataset,
)

TINY = SyntheticSpec(num_classes=3, train_per_class=4, val_per_class=2, image_size=48, seed=7)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ classes


def test_class_names_default() -> None:
    names = class_names()
    assert len(names) == 10 and len(set(names)) == 10
    assert names == sorted(names)  # label order == folder order
    assert "disc-stripes0" in names
    shapes = {s for s, _ in class_pairs()}
    textures = {t for _, t in class_pairs()}
    assert len(shapes) == 10 and len(textures) == 10  # each shape and each texture used once
    d = describe()
    assert [c["name"] for c in d] == names and all(c["description"] for c in d)


def test_class_pairs_are_distinct_up_to_100() -> None:
    pairs = class_pairs(100)
    assert len(set(pairs)) == 100
    assert class_names(100) == sorted(class_names(100))
    with pytest.raises(ValueError, match="num_classes"):
        class_pairs(101)
    with pytest.raises(ValueError, match="num_classes"):
        class_pairs(0)


def test_render_sample_is_a_pure_function() -> None:
    a = np.asarray(render_sample(3, 5, seed=1))
    b = np.asarray(render_sample(3, 5, seed=1))
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render_sample(3, 5, seed=2)))
    assert not np.array_equal(a, np.asarray(render_sample(3, 6, seed=1)))
    assert not np.array_equal(a, np.asarray(render_sample(3, 5, seed=1, split="val")))


def test_object_box_and_occluded_fraction() -> None:
    scene = syn.sample_scene(np.random.default_rng(0), ("square", "checkers"), 64)
    scene = syn.replace(scene, cx=32.0, cy=32.0, radius=20.0, rotation=0.0)
    _, bbox = syn.render(scene)
    # the square has half-side 0.8 radii = 16 px: pixels 16..47
    assert bbox == [16.0, 16.0, 48.0, 48.0]
    occ = syn._occluder_for(scene, 0.75, np.random.default_rng(1))
    gx, gy = syn._grid(64)
    xc, yc = gx - 32.0, gy - 32.0
    mask = syn._shape_mask("square", xc / 20.0, yc / 20.0)
    hidden = ((xc * math.cos(occ[0]) + yc * math.sin(occ[0])) > occ[1]) & (xc**2 + yc**2 < (1.2 * 20) ** 2)
    assert abs((mask & hidden).sum() / mask.sum() - 0.75) < 0.01


# ------------------------------------------------------------------------------------------------ evidence


def _knn_accuracy(ftr: np.ndarray, ytr: np.ndarray, fva: np.ndarray, yva: np.ndarray, k: int = 10) -> float:
    ftr = ftr / np.linalg.norm(ftr, axis=1, keepdims=True)
    fva = fva / np.linalg.norm(fva, axis=1, keepdims=True)
    sim = fva @ ftr.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(fva), int(ytr.max()) + 1))
    for j in range(k):
        weight = np.exp(sim[np.arange(len(fva)), idx[:, j]] / 0.07)
        np.add.at(votes, (np.arange(len(fva)), ytr[idx[:, j]]), weight)
    return float((votes.argmax(1) == yva).mean())


def _spectrum_features(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Translation-invariant, colour-normalised features: log Fourier magnitude of the grey image,
    pooled over (radius, orientation) bins for radii in [lo, hi) cycles per image."""
    g = x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    g = g - g.mean(axis=(1, 2), keepdims=True)
    g /= g.std(axis=(1, 2), keepdims=True) + 1e-6
    mag = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(g), axes=(1, 2))))
    n = x.shape[1]
    fy, fx = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    r = np.sqrt(fx**2 + fy**2)
    rbin = np.floor(r / 2).astype(int)
    tbin = (np.mod(np.arctan2(fy, fx), np.pi) / np.pi * 12).astype(int) % 12
    sel = (r >= lo) & (r < hi)
    idx = (rbin * 12 + tbin)[sel]
    out = np.zeros((len(x), int(idx.max()) + 1))
    for i in range(len(x)):
        out[i] = np.bincount(idx, weights=mag[i][sel], minlength=out.shape[1])
    return out - out.mean(axis=0)


def test_raw_pixels_are_poor_but_both_frequency_bands_carry_class_evidence() -> None:
    """The design goal: nuisances defeat raw pixels; coarse and fine scales both hold the class."""
    def split(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs = [np.asarray(render_sample(c, i, split=name)) for c in range(10) for i in range(n)]
        return np.stack(xs), np.repeat(np.arange(10), n)

    xtr, ytr = split("train", 40)
    xva, yva = split("val", 10)

    def raw(x: np.ndarray) -> np.ndarray:  # 24x24 RGB thumbnails
        bilinear = Image.Resampling.BILINEAR
        small = [np.asarray(Image.fromarray(i).resize((24, 24), bilinear), np.float32) for i in x]
        return np.stack(small).reshape(len(x), -1)

    acc_raw = _knn_accuracy(raw(xtr), ytr, raw(xva), yva)
    acc_low = _knn_accuracy(_spectrum_features(xtr, 1, 10), ytr, _spectrum_features(xva, 1, 10), yva)
    acc_high = _knn_accuracy(_spectrum_features(xtr, 12, 48), ytr, _spectrum_features(xva, 12, 48), yva)
    assert acc_raw < 0.3, acc_raw  # chance is 0.1
    assert acc_low > 0.3, acc_low  # wavelengths >= 9.6 px: silhouettes
    assert acc_high > 0.8, acc_high  # wavelengths 2-8 px: textures


# ------------------------------------------------------------------------------------------------ writing


def test_layout_counts_and_meta(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "ds", TINY)
    names = class_names(3)
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == names
        for name in names:
            files = sorted(p.name for p in (root / split / name).iterdir())
            assert files == [f"{i:05d}.jpg" for i in range(n)]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["generator_version"] == syn.GENERATOR_VERSION and meta["seed"] == 7
    assert meta["counts"] == {"train": 12, "val": 6} and meta["image_size"] == 48
    assert [c["name"] for c in meta["classes"]] == names
    assert (root / ".complete").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    recs, classes = discover_training_images(root)
    assert classes == names and len(recs) == 12
    img = Image.open(recs[0].path)
    assert img.format == "JPEG" and img.size == (48, 48)
    # the stored file is the rendered image up to JPEG loss
    ref = np.asarray(render_sample(0, 0, seed=7, size=48, num_classes=3), dtype=np.float64)
    assert np.abs(np.asarray(load_image(recs[0].path), dtype=np.float64) - ref).mean() < 4.0  # JPEG q95 error


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", TINY)
    b = write_synthetic_dataset(tmp_path / "b", TINY)
    c = write_synthetic_dataset(tmp_path / "c", SyntheticSpec(**{**TINY.__dict__, "seed": 8}))
    rel = ["train/" + class_names(3)[0] + "/00000.jpg", "train/" + class_names(3)[2] + "/00003.jpg",
           "val/" + class_names(3)[1] + "/00001.jpg"]
    for r in rel:
        assert (a / r).read_bytes() == (b / r).read_bytes()
        assert (a / r).read_bytes() != (c / r).read_bytes()
    assert (a / "meta.json").read_bytes() == (b / "meta.json").read_bytes()


def test_second_call_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_synthetic_dataset(tmp_path / "ds", TINY)
    calls: list[int] = []
    monkeypatch.setattr(syn, "render", lambda *a: calls.append(1))  # would crash if called
    assert write_synthetic_dataset(root, TINY) == root
    assert calls == []


def test_missing_marker_means_regenerate(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "ds", TINY)
    victim = root / "train" / class_names(3)[0] / "00000.jpg"
    original = victim.read_bytes()
    victim.write_bytes(b"")  # a partial, interrupted state
    (root / ".complete").unlink()
    write_synthetic_dataset(root, TINY)
    assert (root / ".complete").is_file()
    assert victim.read_bytes() == original


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = syn.render
    count = [0]

    def flaky(scene: Any) -> Any:
        count[0] += 1
        if count[0] == 5:
            raise RuntimeError("disk on fire")
        return real(scene)

    monkeypatch.setattr(syn, "render", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic_dataset(tmp_path / "ds", TINY)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".ds.lock"]


def test_other_spec_in_same_folder_is_an_error_unless_overwrite(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "ds", TINY)
    other = SyntheticSpec(**{**TINY.__dict__, "train_per_class": 5})
    with pytest.raises(DataError, match=r"train_per_class: 4 != 5") as exc:
        write_synthetic_dataset(root, other)
    assert str(root) in str(exc.value)
    write_synthetic_dataset(root, other, overwrite=True)
    assert len(list((root / "train" / class_names(3)[0]).iterdir())) == 5


def test_refuses_to_replace_foreign_folder(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing"):
        write_synthetic_dataset(user, TINY, overwrite=True)
    assert (user / "thesis.tex").read_text() == "precious"


def test_invalid_spec_values_are_named() -> None:
    with pytest.raises(ValueError, match="image_size=16"):
        write_synthetic_dataset("/nonexistent", SyntheticSpec(image_size=16))
    with pytest.raises(ValueError, match="train_per_class=0"):
        write_synthetic_dataset("/nonexistent", SyntheticSpec(train_per_class=0))


def test_default_root_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple[Path, SyntheticSpec]] = []
    def fake_write(root: Path, spec: SyntheticSpec, **kw: Any) -> Path:
        written.append((Path(root), spec))
        return Path(root)

    monkeypatch.setattr(syn, "write_synthetic_dataset", fake_write)
    monkeypatch.setenv("FASTDINOV2_CACHE", str(tmp_path / "env"))
    assert default_dataset_root() == tmp_path / "env" / "synthetic-v2"
    assert default_dataset_root(tmp_path / "explicit") == tmp_path / "explicit" / "synthetic-v2"
    monkeypatch.delenv("FASTDINOV2_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dataset_root() == tmp_path / "home" / ".cache" / "fastdinov2" / "synthetic-v2"
    assert all(spec == SyntheticSpec() for _, spec in written)
    assert SyntheticSpec() == SyntheticSpec(10, 300, 60, 96, 0)


def test_parallel_generation_writes_the_same_bytes(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_classes=2, train_per_class=2, val_per_class=1, image_size=32, seed=3)
    a = write_synthetic_dataset(tmp_path / "a", spec)
    b = write_synthetic_dataset(tmp_path / "b", spec, num_workers=2)
    fa, fb = _files(a), _files(b)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))


# ------------------------------------------------------------------------------------------------ extras


def test_corrupted_set_layout_and_determinism(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_classes=2, train_per_class=1, val_per_class=2, image_size=48, seed=0)
    root = write_synthetic_dataset(tmp_path / "ds", spec)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    out = write_corrupted_set(root, per_class=1)
    assert np.random.random() == expected  # the global generator is left where it was
    names = syn.corruption_names()
    assert len(names) == 19
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names)
    for name in names:
        for sev in range(1, 6):
            recs, classes = scan_class_folders(out / name / str(sev))
            assert classes == class_names(2) and len(recs) == 2, (name, sev)
            assert [r.path.name for r in recs] == ["00000.jpg", "00000.jpg"]
            assert Image.open(recs[0].path).size == (48, 48)
    first = Path(class_names(2)[0]) / "00000.jpg"
    clean = np.asarray(load_image(root / "val" / first), dtype=np.float64)
    mild = np.asarray(load_image(out / "gaussian_noise" / "1" / first), np.float64)
    strong = np.asarray(load_image(out / "gaussian_noise" / "5" / first), np.float64)
    assert 0 < np.abs(mild - clean).mean() < np.abs(strong - clean).mean()
    # same seed, same bytes; a subset of types gives the same files as the full set
    again = write_corrupted_set(write_synthetic_dataset(tmp_path / "ds2", spec), per_class=1,
                                corruptions=["glass_blur", "frost"])
    for name in ("glass_blur", "frost"):
        f = Path(name) / "3" / class_names(2)[1] / "00000.jpg"
        assert (out / f).read_bytes() == (again / f).read_bytes()
    assert (out / ".complete").is_file()


def test_apply_corruption_rescales_pixel_unit_corruptions() -> None:
    img = np.asarray(render_sample(0, 0, size=64))
    for name in ("defocus_blur", "pixelate"):
        out = syn.apply_corruption(img, name, 3, seed=1)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out, syn.apply_corruption(img, name, 3, seed=1))
    assert "defocus_blur" in syn.REFERENCE_SCALE_CORRUPTIONS
    assert "pixelate" not in syn.REFERENCE_SCALE_CORRUPTIONS
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        syn.apply_corruption(img, "rain", 1, seed=0)
    with pytest.raises(ValueError, match="severity 6"):
        syn.apply_corruption(img, "fog", 6, seed=0)


def _plain(x: Any) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return type(x) in (str, int, float)


def test_retrieval_set_layout_and_ground_truth(tmp_path: Path) -> None:
    spec = RetrievalSpec(num_instances=4, easy_per_query=2, hard_per_query=2, junk_per_query=1, distractors=6,
                         image_size=64, seed=0)
    out = write_retrieval_set(tmp_path, spec)
    assert out == tmp_path / "retrieval" / "synth5k"
    with open(out / "gnd_synth5k.pkl", "rb") as fh:
        gt = pickle.load(fh)
    assert _plain(gt) and set(gt) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist, gnd = gt["imlist"], gt["qimlist"], gt["gnd"]
    assert len(imlist) == 4 * 5 + 6 and len(qimlist) == 4 == len(gnd)
    on_disk = sorted(p.name for p in (out / "jpg").iterdir())
    assert on_disk == sorted(f"{n}.jpg" for n in imlist + qimlist)
    used: set[int] = set()
    for g in gnd:
        assert len(g["easy"]) == 2 and len(g["hard"]) == 2 and len(g["junk"]) == 1
        ids = g["easy"] + g["hard"] + g["junk"]
        assert all(0 <= i < len(imlist) for i in ids) and not used & set(ids)
        used |= set(ids)
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    assert len(used) == 20  # the other 6 are distractors

    # easy positives keep the instance's colours: in colour-histogram space they are nearer the query
    # than the distractors are
    def hist(name: str, box: list[float] | None = None) -> np.ndarray:
        img = Image.open(out / "jpg" / f"{name}.jpg").convert("RGB")
        if box is not None:
            img = img.crop((box[0], box[1], box[2], box[3]))
        q = (np.asarray(img) // 32).reshape(-1, 3)  # 8 bins per channel: colours are muted (saturation <= 0.3)
        h = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512).astype(float)
        return h / np.linalg.norm(h)

    dis = sorted(set(range(len(imlist))) - used)
    easy_sim, dis_sim = [], []
    for qi, g in enumerate(gnd):
        qh = hist(qimlist[qi], g["bbx"])
        easy_sim += [qh @ hist(imlist[i]) for i in g["easy"]]
        dis_sim += [qh @ hist(imlist[i]) for i in dis]
    assert np.mean(easy_sim) > np.mean(dis_sim)

    again = write_retrieval_set(tmp_path / "again", spec)
    assert (again / "gnd_synth5k.pkl").read_bytes() == (out / "gnd_synth5k.pkl").read_bytes()
    assert (again / "jpg" / "query_002.jpg").read_bytes() == (out / "jpg" / "query_002.jpg").read_bytes()
