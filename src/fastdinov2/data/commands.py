"""``fastdinov2 data synth|verify|imagenet100``: write the embedded dataset, check image trees, build IN-100.

The behaviour lives in functions (:func:`build_imagenet100`, the writers of
:mod:`fastdinov2.data.synthetic`, :func:`fastdinov2.data.datasets.verify_images`); the ``cmd_*``
functions only parse, call and print.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastdinov2.data.datasets import DataError, scan_images, verify_images
from fastdinov2.data.synthetic import (
    DEFAULT_DIRNAME,
    RetrievalSpec,
    SyntheticSpec,
    corruption_names,
    default_cache_dir,
    write_corrupted_set,
    write_retrieval_set,
    write_synthetic_dataset,
)
from fastdinov2.eval.options import non_negative_int

# The ImageNet-100 class list of Tian et al., "Contrastive Multiview Coding" (CMC, 2019): the file
# imagenet100.txt of github.com/HobbitLong/CMC, in that file's order. Used by most self-supervised
# papers reporting "ImageNet-100" (including FastDINOv2).
IMAGENET100_WNIDS: tuple[str, ...] = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890",
    "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505",
    "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376",
    "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168",
    "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630",
    "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------
# ImageNet-100


def _same_target(link: Path, target: Path) -> bool:
    try:
        return link.resolve() == target.resolve()
    except OSError:
        return False


def build_imagenet100(
    imagenet_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    copy: bool = False,
    wnids: Sequence[str] = IMAGENET100_WNIDS,
    splits: Sequence[str] = ("train", "val"),
    log: Log = print,
) -> dict[str, int]:
    """Build ``out/<split>/<wnid>`` for the ImageNet-100 classes from ``imagenet_root/<split>/<wnid>``.

    Each class folder becomes a symbolic link to the ImageNet-1K folder (default) or a copy of it
    (``copy=True``; copied into a hidden temporary folder, then renamed, so a class folder that exists
    is complete). Every source folder is checked before anything is written: a missing one raises
    :class:`DataError` naming all of them. Running it again is a no-op; a link pointing elsewhere is an
    error. Also writes ``out/classes.txt``. Returns counts ``{"created": n, "existing": m}``.
    """
    src_root, dst_root = Path(imagenet_root), Path(out)
    if len(set(wnids)) != len(wnids):
        raise ValueError("the class list has duplicate wnids")
    if not src_root.is_dir():
        raise DataError(f"ImageNet folder not found: {src_root}")
    for split in splits:
        if not (src_root / split).is_dir():
            raise DataError(f"no '{split}' folder in {src_root} (expected {src_root}/{split}/<wnid>/*.JPEG)")
    missing = [src_root / split / w for split in splits for w in wnids if not (src_root / split / w).is_dir()]
    if missing:
        listed = "\n  ".join(str(p) for p in missing)
        raise DataError(f"{len(missing)} ImageNet class folder(s) missing (val must be sorted into class "
                        f"folders too):\n  {listed}")
    src_abs, dst_abs = src_root.resolve(), dst_root.resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents:
        raise DataError(f"--out {dst_root} is inside the ImageNet folder {src_root}: ImageNet-1K's training data would "
                        "then hold the subset's val images too; choose a folder outside it")
    try:
        return _link_classes(src_root, dst_root, wnids, splits, copy, log)
    except (OSError, shutil.Error) as exc:
        raise DataError(f"cannot build ImageNet-100 at {dst_root}: {exc}") from exc


def _link_classes(src_root: Path, dst_root: Path, wnids: Sequence[str], splits: Sequence[str], copy: bool,
                  log: Log) -> dict[str, int]:
    created = existing = 0
    for split in splits:
        (dst_root / split).mkdir(parents=True, exist_ok=True)
        for w in wnids:
            src, dst = src_root / split / w, dst_root / split / w
            if dst.is_symlink():
                if copy:
                    raise DataError(f"{dst} is a symbolic link but --copy was asked; remove it first")
                if not _same_target(dst, src):
                    raise DataError(f"{dst} links to {os.readlink(dst)}, not to {src}; remove it first")
                existing += 1
            elif dst.exists():
                if not dst.is_dir():
                    raise DataError(f"{dst} exists and is not a folder")
                existing += 1  # a finished copy (copies are renamed into place only when complete)
            elif copy:
                tmp = Path(tempfile.mkdtemp(prefix=f".{w}.tmp-", dir=dst_root / split))
                try:
                    shutil.copytree(src, tmp / w)
                    os.rename(tmp / w, dst)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                created += 1
            else:
                os.symlink(os.path.abspath(src), dst, target_is_directory=True)
                created += 1
    (dst_root / "classes.txt").write_text("".join(f"{w}\n" for w in wnids))
    log(f"ImageNet-100 at {dst_root}: {created} class folders {'copied' if copy else 'linked'}, "
        f"{existing} already there ({len(wnids)} classes x {len(splits)} splits)")
    return {"created": created, "existing": existing}


# ----------------------------------------------------------------------------------------------------
# command functions


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_synth(args: argparse.Namespace) -> int:
    """``fastdinov2 data synth``: write the synthetic dataset (and its corrupted/retrieval sets)."""
    out = Path(args.out) if args.out is not None else default_cache_dir() / DEFAULT_DIRNAME
    spec = SyntheticSpec(num_classes=args.classes, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, image_size=args.size, seed=args.seed)
    t0 = time.perf_counter()
    try:
        spec.validate()
        write_synthetic_dataset(out, spec, overwrite=args.overwrite, num_workers=args.workers, log=print)
        print(f"  {out}/train: {spec.num_classes} classes x {spec.train_per_class} images "
              f"({spec.image_size}x{spec.image_size} JPEG)")
        print(f"  {out}/val:   {spec.num_classes} classes x {spec.val_per_class} images")
        if args.corrupted:
            c = write_corrupted_set(out, per_class=args.corrupted_per_class, seed=args.seed,
                                    overwrite=args.overwrite, num_workers=args.workers, log=print)
            print(f"  {c}/<type>/<severity>/<class>/*.jpg: {len(corruption_names())} types x 5 severities x "
                  f"{spec.num_classes} classes x {min(args.corrupted_per_class, spec.val_per_class)} images")
        if args.retrieval:
            rspec = RetrievalSpec(image_size=spec.image_size, seed=args.seed)
            r = write_retrieval_set(out, rspec, overwrite=args.overwrite, log=print)
            n_db = rspec.num_instances * (rspec.easy_per_query + rspec.hard_per_query + rspec.junk_per_query)
            print(f"  {r}/jpg: {rspec.num_instances} queries + {n_db + rspec.distractors} database images; "
                  f"{r}/gnd_{rspec.name}.pkl")
    except (DataError, ValueError) as exc:
        return _error(str(exc))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``fastdinov2 data verify DIR``: decode every image; list the bad ones; exit 1 if any."""
    try:
        records = scan_images(args.dir)
    except DataError as exc:
        return _error(str(exc))
    bar: Any = None
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="img", desc="verify")

        def progress(n: int) -> None:
            bar.n = n
            bar.refresh()

    try:
        bad = verify_images(records, num_workers=args.workers, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for path, reason in bad:
        print(f"{path}: {reason}")
    print(f"{len(bad)} bad of {len(records)} image files in {args.dir}")
    return 1 if bad else 0


def cmd_imagenet100(args: argparse.Namespace) -> int:
    """``fastdinov2 data imagenet100``: link (or copy) the ImageNet-100 classes out of ImageNet-1K."""
    try:
        build_imagenet100(args.imagenet, args.out, copy=args.copy)
    except DataError as exc:
        return _error(str(exc))
    return 0


def _default_workers() -> int:
    cpus = os.cpu_count() or 1
    return 0 if cpus < 4 else min(8, cpus)  # process start-up (~2 s each) only pays off with several cores


def add_data_commands(subparsers: Any) -> None:
    """Register ``data`` and its sub-commands on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("data", help="prepare and check datasets",
                              description="Prepare and check datasets.")
    sub = p.add_subparsers(dest="data_command", metavar="{synth,verify,imagenet100}", required=True)

    s = sub.add_parser("synth", help="write the embedded synthetic dataset",
                       description="Write the synthetic (shape x texture) dataset as an image folder, with "
                       "an ImageNet-C style corrupted val subset and a revisited-Oxford style retrieval set.")
    s.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: $FASTDINOV2_CACHE or ~/.cache/fastdinov2, "
                   f"then /{DEFAULT_DIRNAME})")
    s.add_argument("--classes", type=int, default=10, help="number of classes (default 10, at most 100)")
    s.add_argument("--train-per-class", type=int, default=300, help="train images per class (default 300)")
    s.add_argument("--val-per-class", type=int, default=60, help="val images per class (default 60)")
    s.add_argument("--size", type=int, default=96, help="image side in pixels (default 96, at least 32)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    s.add_argument("--corrupted", action=argparse.BooleanOptionalAction, default=True,
                   help="also write corrupted/<type>/<severity>/<class>/ (19 types x 5 severities)")
    s.add_argument("--corrupted-per-class", type=int, default=5,
                   help="val images per class in the corrupted set (default 5)")
    s.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True,
                   help="also write retrieval/synth5k/ (revisitop layout)")
    s.add_argument("--overwrite", action="store_true", help="replace a dataset generated with other settings")
    s.add_argument("--workers", type=non_negative_int, default=_default_workers(),
                   help="generator processes (default: min(8, CPUs), 0 below 4 CPUs; 0 = this process; "
                   "the files are identical either way)")
    s.set_defaults(func=cmd_synth)

    v = sub.add_parser("verify", help="decode every image of a folder and list the bad files",
                       description="Decode every image below DIR fully; print each bad file with the reason; "
                       "exit 1 when any is bad.")
    v.add_argument("dir", type=Path, metavar="DIR")
    v.add_argument("--workers", type=non_negative_int, default=0, help="decoding threads (default 0: this thread)")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("imagenet100", help="build ImageNet-100 (CMC class list) from ImageNet-1K",
                       description="Create OUT/train/<wnid> and OUT/val/<wnid> for the 100 CMC classes as "
                       "symbolic links into an ImageNet-1K copy (ROOT/train/<wnid>, ROOT/val/<wnid>).")
    i.add_argument("--imagenet", type=Path, required=True, metavar="ROOT", help="ImageNet-1K root")
    i.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    i.add_argument("--copy", action="store_true", help="copy the files instead of linking the folders")
    i.set_defaults(func=cmd_imagenet100)
