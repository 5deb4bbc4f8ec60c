"""Image discovery and safe image loading.

Three layouts are understood (see :func:`discover_training_images`):

* ImageNet style: ``ROOT/train/<class>/**/<image>`` (and ``ROOT/val/<class>/...`` for evaluation);
* class folders: ``ROOT/<class>/**/<image>``;
* unlabelled: any image anywhere below ``ROOT`` (label ``-1``).

A ``ROOT`` without ``train/`` that holds a held-out split folder (``val``, ``valid``, ``validation``,
``test``, ``testing``, any case) is refused rather than read as class folders or unlabelled images,
which would train on the held-out images.

Every listing is sorted, so the same tree always yields the same records in the same order. Hidden
files and folders (name starting with ``.``) are skipped: they hold markers, AppleDouble ``._x.jpg``
files and editor state, never data. Symbolic links to folders are followed (``fastdinov2 data
imagenet100`` builds its tree out of them), each real folder at most once.

A file that cannot be decoded raises :class:`BadImageError` naming the file and the reason; there is
no silent fallback. ``fastdinov2 data verify`` runs :func:`verify_images` over a whole tree up front.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: key of ``PIL.Image.info`` where :func:`load_image` stores the (width, height) of the file before any
#: DCT-domain downscaling, so callers can map coordinates between the decoded and the stored image.
ORIGINAL_SIZE_KEY = "fastdinov2_original_size"


class DataError(Exception):
    """A dataset folder is missing, is not a folder, or holds no usable images. The message names the path."""


class BadImageError(DataError):
    """One image file cannot be decoded. ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across data-loader worker processes
        return (BadImageError, (str(self.path), self.reason))


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: its path and its class index (``-1`` when unlabelled)."""

    path: Path
    label: int


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _extensions_text() -> str:
    return " ".join(IMAGE_EXTENSIONS)


def _check_dir(root: str | os.PathLike[str]) -> Path:
    path = Path(root)
    if not path.exists():
        raise DataError(f"dataset folder not found: {path}")
    if not path.is_dir():
        raise DataError(f"dataset path is not a folder: {path}")
    return path


def _iter_image_files(root: Path) -> list[Path]:
    """Every non-hidden image file below ``root`` (recursive, following folder links once), sorted."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or two links to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _loose_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p)
    )


def scan_images(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """All images below ``root`` (any depth), unlabelled (``label == -1``), sorted by path.

    Raises :class:`DataError` when ``root`` is missing, is a file, or holds no image.
    """
    path = _check_dir(root)
    files = _iter_image_files(path)
    if not files:
        raise DataError(f"no images found in {path} (looked for {_extensions_text()}, recursively)")
    return [ImageRecord(f, -1) for f in files]


def scan_class_folders(
    root: str | os.PathLike[str], allow_empty: bool = False
) -> tuple[list[ImageRecord], list[str]]:
    """Images of ``root/<class>/**/<image>``; labels index the sorted list of class folder names.

    Returns ``(records, classes)``. Loose images directly in ``root`` are not part of any class and
    are ignored. Raises :class:`DataError` when ``root`` is missing, is a file, has no class folder,
    holds no image, or (unless ``allow_empty``) when one class folder holds no image.
    """
    path = _check_dir(root)
    dirs = _class_dirs(path)
    if not dirs:
        raise DataError(f"no class folders in {path} (expected {path}/<class>/<image>)")
    records: list[ImageRecord] = []
    classes: list[str] = []
    for label, d in enumerate(dirs):
        files = _iter_image_files(d)
        if not files and not allow_empty:
            raise DataError(
                f"class folder {d} holds no images (looked for {_extensions_text()}, recursively)"
            )
        classes.append(d.name)
        records.extend(ImageRecord(f, label) for f in files)
    if not records:
        raise DataError(f"no images found in the class folders of {path} (looked for {_extensions_text()})")
    return records, classes


#: Names (compared case-insensitively) of sub-folders that hold a held-out split. A root without
#: ``train/`` that holds one is refused by :func:`discover_training_images`.
HELD_OUT_SPLIT_NAMES: tuple[str, ...] = ("val", "valid", "validation", "test", "testing")

#: Names (case-insensitive) that look like a training split but are not the exact ``train``.
_TRAIN_LOOKALIKES: tuple[str, ...] = ("train", "training")


def _check_no_held_out_split(path: Path, dirs: list[Path]) -> None:
    """Raise :class:`DataError` when ``path`` (which has no ``train/``) holds a held-out split folder."""
    held_out = [d.name for d in dirs if d.name.lower() in HELD_OUT_SPLIT_NAMES]
    if not held_out:
        return
    found = ", ".join(f"{n}/" for n in held_out)
    lookalikes = [d.name for d in dirs if d.name.lower() in _TRAIN_LOOKALIKES]
    renamed = " or ".join(f"{n}/" for n in lookalikes) if lookalikes else "the training folder"
    raise DataError(
        f"{path} has no train/ folder but holds the held-out split folder(s) {found}; reading {path} as class "
        f"folders or as unlabelled images would train on them. Expected {path}/train/<class>/<image> (and "
        f"{path}/val/<class>/<image> for evaluation; split names are exact and lower-case): rename {renamed} "
        "to train/, or point data.root at a folder that holds only training images"
    )


def discover_training_images(root: str | os.PathLike[str]) -> tuple[list[ImageRecord], list[str]]:
    """The pre-training images of ``root``, whatever its layout.

    * ``root/train`` exists: its class folders (ImageNet layout); other sub-folders (``val/``, ...)
      are not read;
    * no ``root/train`` but a sub-folder named like a held-out split (:data:`HELD_OUT_SPLIT_NAMES`,
      any case, e.g. ``val/`` next to ``Train/`` or ``training/``): :class:`DataError` naming ``root``
      and the split folder(s), since either layout below would train on the held-out images;
    * ``root`` holds no loose image and at least one sub-folder with images: class folders (sub-folders
      without images are kept as empty classes so label indices stay stable);
    * otherwise: every image below ``root``, unlabelled (``classes == []``, labels ``-1``).

    The split name is the exact ``train`` (as for evaluation, which reads ``root/train`` and
    ``root/val``); ``Train/`` or ``training/`` is not taken for it.
    """
    path = _check_dir(root)
    train = path / "train"
    if train.is_dir():
        return scan_class_folders(train)
    dirs = _class_dirs(path)
    _check_no_held_out_split(path, dirs)
    if not _loose_images(path) and any(_iter_image_files(d) for d in dirs):
        return scan_class_folders(path, allow_empty=True)
    return scan_images(path), []


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale PNG/TIFF
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise ValueError("32-bit floating-point images are not supported (no defined 0..255 range)")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting a palette with transparency straight to RGB
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str], draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode one image fully and return it as RGB.

    ``draft_size=(w, h)``: for a JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain,
    choosing the largest reduction that keeps the result at least ``w`` x ``h`` (much faster than a
    full decode followed by a resize). Other formats ignore it. The returned image's ``size`` is the
    decoded size; ``img.info[ORIGINAL_SIZE_KEY]`` is the stored (width, height), so the scale factor is
    ``original[0] / img.size[0]``.

    Truncated files fail (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False). Any failure raises
    :class:`BadImageError` naming the file and the reason.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise BadImageError(p, "file not found") from None
    except OSError as exc:
        raise BadImageError(p, f"cannot stat file: {exc}") from exc
    if size == 0:
        raise BadImageError(p, "zero-byte file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise BadImageError(
            p, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to load possibly truncated data"
        )
    out: Image.Image | None = None
    try:
        img = Image.open(p)
        try:
            original = img.size
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (int(draft_size[0]), int(draft_size[1])))
            img.load()
            out = _to_rgb(img)
            if out is img and getattr(img, "fp", None) is not None:
                out = img.copy()  # multi-frame files keep their handle open after load(): detach
        finally:
            if out is not img:  # keep the handle of an image we return; close everything else
                img.close()
    except Image.UnidentifiedImageError:
        raise BadImageError(p, "not an image (PIL cannot identify the format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(p, f"decompression bomb: {exc}") from exc
    except OSError as exc:
        msg = str(exc)
        truncated = "truncated" in msg or "broken" in msg
        reason = f"truncated or corrupt file: {msg}" if truncated else f"cannot decode: {msg}"
        raise BadImageError(p, reason) from exc
    except Exception as exc:  # PIL raises ValueError, SyntaxError, struct.error, ... on malformed files
        raise BadImageError(p, f"cannot decode: {type(exc).__name__}: {exc}") from exc
    assert out is not None
    out.info[ORIGINAL_SIZE_KEY] = original
    return out


def _check_one(path: Path) -> tuple[Path, str] | None:
    try:
        load_image(path)
    except BadImageError as exc:
        return exc.path, exc.reason
    return None


def verify_images(
    records: Iterable[ImageRecord | str | os.PathLike[str]],
    num_workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[Path, str]]:
    """Decode every image fully; return ``(path, reason)`` for each bad one, in input order.

    ``num_workers > 0`` decodes in that many threads (PIL releases the GIL while decoding).
    ``progress(n)`` is called after each file with the number checked so far.
    """
    paths = [r.path if isinstance(r, ImageRecord) else Path(r) for r in records]
    bad: list[tuple[Path, str]] = []
    if num_workers > 0:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            results: Iterable[tuple[Path, str] | None] = pool.map(_check_one, paths)
            for n, res in enumerate(results, 1):
                if res is not None:
                    bad.append(res)
                if progress is not None:
                    progress(n)
    else:
        for n, path in enumerate(paths, 1):
            res = _check_one(path)
            if res is not None:
                bad.append(res)
            if progress is not None:
                progress(n)
    return bad


class ClassFolderDataset(Dataset[tuple[Any, int]]):
    """``root/<class>/**/<image>`` as a map-style dataset of ``(transform(image), label)``.

    ``image`` is an RGB ``PIL.Image``; with ``transform`` set it is whatever the transform returns
    (typically a float tensor ``[3, H, W]``). ``classes[label]`` is the class folder name.
    Bad files raise :class:`BadImageError` when read.
    """

    def __init__(
        self, root: str | os.PathLike[str], transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        self.root = Path(root)
        self.records, self.classes = scan_class_folders(self.root)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        """Labels of all records, in order (torchvision ``ImageFolder`` compatible)."""
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rec = self.records[index]
        img = load_image(rec.path)
        return (self.transform(img) if self.transform is not None else img), rec.label
