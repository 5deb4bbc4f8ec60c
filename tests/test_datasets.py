"""Image discovery, safe loading and the bad-file policy of fastdinov2.data.datasets."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastdinov2.data.datasets import (
    IMAGE_EXTENSIONS,
    ORIGINAL_SIZE_KEY,
    BadImageError,
    ClassFolderDataset,
    DataError,
    ImageRecord,
    discover_training_images,
    load_image,
    scan_class_folders,
    scan_images,
    verify_images,
)


def _write(path: Path, size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (10, 200, 30),
           fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _jpeg_bytes(size: tuple[int, int] = (256, 192), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth content so a DCT-domain downscale is close to a proper resize
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ scanning


def test_scan_images_is_recursive_sorted_case_insensitive_and_skips_hidden(tmp_path: Path) -> None:
    a = _write(tmp_path / "b" / "deep" / "x.JPG", fmt="JPEG")
    b = _write(tmp_path / "a.png")
    c = _write(tmp_path / "b" / "y.WebP", fmt="WEBP")
    d = _write(tmp_path / "c.TIFF", fmt="TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden.jpg", fmt="JPEG")
    _write(tmp_path / ".cache" / "z.jpg", fmt="JPEG")
    recs = scan_images(tmp_path)
    assert [r.path for r in recs] == sorted([a, b, c, d])
    assert all(r.label == -1 for r in recs)


def test_every_listed_extension_is_found(tmp_path: Path) -> None:
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF", ".gif": "GIF"}
    assert set(fmt) == set(IMAGE_EXTENSIONS)
    for i, (ext, f) in enumerate(sorted(fmt.items())):
        _write(tmp_path / f"img{i}{ext.upper() if i % 2 else ext}", fmt=f)
    assert len(scan_images(tmp_path)) == len(fmt)


def test_scan_class_folders_labels_follow_sorted_folder_names(tmp_path: Path) -> None:
    d1 = _write(tmp_path / "dog" / "1.jpg", fmt="JPEG")
    c1 = _write(tmp_path / "cat" / "sub" / "deeper" / "2.png")
    c2 = _write(tmp_path / "cat" / "0.jpg", fmt="JPEG")
    _write(tmp_path / "loose.jpg", fmt="JPEG")  # not in a class folder: ignored
    recs, classes = scan_class_folders(tmp_path)
    assert classes == ["cat", "dog"]
    assert recs == [ImageRecord(c2, 0), ImageRecord(c1, 0), ImageRecord(d1, 1)]


def test_scan_class_folders_rejects_an_empty_class_naming_it(tmp_path: Path) -> None:
    _write(tmp_path / "cat" / "1.jpg", fmt="JPEG")
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError, match=r"dog.*holds no images"):
        scan_class_folders(tmp_path)
    recs, classes = scan_class_folders(tmp_path, allow_empty=True)
    assert classes == ["cat", "dog"] and len(recs) == 1


def test_discover_imagenet_layout_uses_train(tmp_path: Path) -> None:
    _write(tmp_path / "train" / "n01" / "a.JPEG", fmt="JPEG")
    _write(tmp_path / "train" / "n02" / "b.JPEG", fmt="JPEG")
    _write(tmp_path / "val" / "n01" / "c.JPEG", fmt="JPEG")
    recs, classes = discover_training_images(tmp_path)
    assert classes == ["n01", "n02"]
    assert [r.label for r in recs] == [0, 1]
    assert all("train" in r.path.parts for r in recs)


def test_discover_class_folders(tmp_path: Path) -> None:
    _write(tmp_path / "red" / "a.png")
    _write(tmp_path / "blue" / "x" / "b.png")
    (tmp_path / "empty").mkdir()
    recs, classes = discover_training_images(tmp_path)
    assert classes == ["blue", "empty", "red"]
    assert [r.label for r in recs] == [0, 2]


def test_discover_unlabelled_when_loose_images_exist(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.png")
    b = _write(tmp_path / "2020" / "b.jpg", fmt="JPEG")
    recs, classes = discover_training_images(tmp_path)
    assert classes == []
    assert [(r.path, r.label) for r in recs] == [(b, -1), (a, -1)]


def test_discover_follows_symlinked_class_folders(tmp_path: Path) -> None:
    real = tmp_path / "store" / "n01"
    img = _write(real / "a.jpg", fmt="JPEG")
    root = tmp_path / "ds" / "train"
    root.mkdir(parents=True)
    (root / "n01").symlink_to(real, target_is_directory=True)
    recs, classes = discover_training_images(tmp_path / "ds")
    assert classes == ["n01"] and recs[0].path.resolve() == img.resolve()


@pytest.mark.parametrize(("dirs", "split", "rename"), [
    (["Train/n01", "val/n01"], "val/", "rename Train/ to train/"),
    (["training/n01", "training/n02", "val/n01"], "val/", "rename training/ to train/"),
    (["val/n01", "val/n02"], "val/", "rename the training folder to train/"),
    (["cat", "dog", "Validation/cat"], "Validation/", "rename the training folder to train/"),
    (["photos", "TEST"], "TEST/", "rename the training folder to train/"),
])
def test_discover_refuses_a_held_out_split_without_train(tmp_path: Path, dirs: list[str], split: str,
                                                         rename: str) -> None:
    for d in dirs:
        _write(tmp_path / d / "a.jpg", fmt="JPEG")
    _write(tmp_path / "loose.png")  # the unlabelled layout would read val too
    if (tmp_path / "train").is_dir():
        pytest.skip("case-insensitive file system: Train/ is train/ here")
    with pytest.raises(DataError) as exc:
        discover_training_images(tmp_path)
    msg = str(exc.value)
    assert f"{tmp_path} has no train/ folder" in msg
    assert f"held-out split folder(s) {split}" in msg
    assert f"{tmp_path}/train/<class>/<image>" in msg and rename in msg and "data.root" in msg


def test_discover_lists_every_held_out_split_and_ignores_them_next_to_train(tmp_path: Path) -> None:
    _write(tmp_path / "test" / "n01" / "a.jpg", fmt="JPEG")
    _write(tmp_path / "valid" / "n01" / "b.jpg", fmt="JPEG")
    with pytest.raises(DataError, match=r"split folder\(s\) test/, valid/;"):
        discover_training_images(tmp_path)
    t = _write(tmp_path / "train" / "n01" / "c.jpg", fmt="JPEG")
    recs, classes = discover_training_images(tmp_path)
    assert classes == ["n01"] and [r.path for r in recs] == [t]


def test_discover_class_names_that_only_resemble_a_split_are_classes(tmp_path: Path) -> None:
    _write(tmp_path / "valley" / "a.png")
    _write(tmp_path / "testudo" / "b.png")
    _write(tmp_path / ".val" / "c.png")  # hidden: skipped like everywhere else
    recs, classes = discover_training_images(tmp_path)
    assert classes == ["testudo", "valley"] and len(recs) == 2


@pytest.mark.parametrize("fn", [scan_images, scan_class_folders, discover_training_images])
def test_missing_folder_error_names_path(tmp_path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="not found") as exc:
        fn(missing)
    assert str(missing) in str(exc.value)


@pytest.mark.parametrize("fn", [scan_images, scan_class_folders, discover_training_images])
def test_file_instead_of_folder_error_names_path(tmp_path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    f = _write(tmp_path / "a.png")
    with pytest.raises(DataError, match="not a folder") as exc:
        fn(f)
    assert str(f) in str(exc.value)


def test_empty_folder_error_names_path_and_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError) as exc:
        discover_training_images(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and ".jpg" in msg and ".webp" in msg


# ------------------------------------------------------------------------------------------------ loading


def test_load_image_converts_modes_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (5, 4), 77).save(tmp_path / "l.png")
    Image.new("RGBA", (5, 4), (1, 2, 3, 0)).save(tmp_path / "rgba.png")
    pal = Image.new("P", (5, 4), 0)
    pal.putpalette([9, 8, 7] * 256)
    pal.save(tmp_path / "p.gif", transparency=0)
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    expected = {"l.png": (77, 77, 77), "rgba.png": (1, 2, 3), "p.gif": (9, 8, 7), "i16.png": (255, 255, 255),
                "cmyk.jpg": (255, 255, 255)}
    for name, px in expected.items():
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (5, 4), name
        assert np.abs(np.asarray(img)[0, 0].astype(int) - px).max() <= 2, name
        assert img.info[ORIGINAL_SIZE_KEY] == (5, 4)


def test_draft_decodes_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg_bytes((256, 192)))
    full = load_image(p)
    assert full.size == (256, 192)
    # the largest 1/2^k reduction keeping at least the asked size
    assert load_image(p, draft_size=(60, 40)).size == (64, 48)
    assert load_image(p, draft_size=(100, 90)).size == (128, 96)
    assert load_image(p, draft_size=(200, 100)).size == (256, 192)
    small = load_image(p, draft_size=(64, 48))
    assert small.info[ORIGINAL_SIZE_KEY] == (256, 192)
    ref = np.asarray(full.resize((64, 48), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(small, dtype=np.float64) - ref).mean() < 4.0


def test_draft_is_ignored_for_png(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.png", size=(256, 192))
    assert load_image(p, draft_size=(32, 32)).size == (256, 192)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImageError, match="zero-byte") as exc:
        load_image(p)
    assert str(p) in str(exc.value) and exc.value.path == p
    assert isinstance(exc.value, DataError)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg_bytes((128, 96))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated") as exc:
        load_image(p)
    assert str(p) in str(exc.value)
    with pytest.raises(BadImageError, match="truncated"):
        load_image(p, draft_size=(32, 24))


def test_text_file_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "fake.jpg"
    p.write_text("hello, I am not a JPEG\n")
    with pytest.raises(BadImageError, match="not an image") as exc:
        load_image(p)
    assert str(p) in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="file not found"):
        load_image(tmp_path / "gone.png")


def test_refuses_when_truncated_images_are_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path / "a.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(p)


def test_bad_image_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(BadImageError("/x/y.jpg", "zero-byte file")))
    assert isinstance(err, BadImageError) and err.path == Path("/x/y.jpg")
    assert str(err) == "/x/y.jpg: zero-byte file"


@pytest.mark.parametrize("workers", [0, 3])
def test_verify_images_reports_every_bad_file_in_order(tmp_path: Path, workers: int) -> None:
    good = [_write(tmp_path / f"g{i}.png") for i in range(4)]
    (tmp_path / "b1.jpg").write_bytes(b"")
    (tmp_path / "b2.jpg").write_text("text")
    data = _jpeg_bytes((64, 64))
    (tmp_path / "b3.jpg").write_bytes(data[:200])
    recs = scan_images(tmp_path)
    assert len(recs) == 7
    seen: list[int] = []
    bad = verify_images(recs, num_workers=workers, progress=seen.append)
    assert [p.name for p, _ in bad] == ["b1.jpg", "b2.jpg", "b3.jpg"]
    assert "zero-byte" in bad[0][1] and "not an image" in bad[1][1] and bad[2][1]
    assert seen[-1] == 7
    assert verify_images(good, num_workers=workers) == []


def test_class_folder_dataset(tmp_path: Path) -> None:
    _write(tmp_path / "b" / "1.png", color=(0, 0, 255))
    _write(tmp_path / "a" / "1.png", color=(255, 0, 0))
    _write(tmp_path / "a" / "2.png", color=(255, 0, 0))
    ds = ClassFolderDataset(tmp_path, transform=lambda im: np.asarray(im)[0, 0].tolist())
    assert ds.classes == ["a", "b"] and len(ds) == 3 and ds.targets == [0, 0, 1]
    assert ds[0] == ([255, 0, 0], 0) and ds[2] == ([0, 0, 255], 1)
    raw, label = ClassFolderDataset(tmp_path)[2]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB" and label == 1
    assert [r.label for r in ds.records] == [0, 0, 1]
