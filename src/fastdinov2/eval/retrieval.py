"""Instance retrieval on the revisited Oxford5k / Paris6k benchmarks (Radenovic et al., CVPR 2018).

Layout (as distributed by the benchmark authors)::

    ROOT/<dataset>/jpg/<name>.jpg             database and query images
    ROOT/<dataset>/gnd_<dataset>.pkl          {"imlist": [name, ...], "qimlist": [name, ...],
                                               "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [i, ...],
                                                        "hard": [i, ...], "junk": [i, ...]}, ...]}

``<dataset>`` is usually ``roxford5k`` or ``rparis6k``. The ground truth pickle is read with the restricted
unpickler of :mod:`fastdinov2.safe_pickle` (a pickle can run code; ours only admits plain data).

Protocol: every query image is cropped to its ``bbx``; query and database images are resized so their long
side is ``image_size`` (aspect kept, both sides rounded to a multiple of the patch size); the descriptor is
the L2-normalised CLS token (multi-scale: the per-scale normalised descriptors at scales 1, 1/sqrt(2), 1/2
are averaged and re-normalised). The database is ranked by cosine similarity, and mAP / mP@k are computed
exactly as revisitop's ``compute_map`` for three setups:

=========  ===================  ====================================
setup      positives            ignored (removed from the ranking)
=========  ===================  ====================================
Easy       easy                 hard + junk
Medium     easy + hard          junk
Hard       hard                 easy + junk
=========  ===================  ====================================

Queries with no positive image in a setup are excluded from that setup's means (their AP and P@k are NaN),
as in revisitop.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from fastdinov2.eval.features import resolve_device
from fastdinov2.eval.options import non_negative_int, positive_int
from fastdinov2.eval.results import EvalError, write_result
from fastdinov2.eval.transforms import normalize_batch
from fastdinov2.safe_pickle import safe_load

SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # setup: (ground-truth lists that are positives, lists that are ignored)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
DEFAULT_KAPPAS = (1, 5, 10)
MULTISCALE_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


class RetrievalDataError(EvalError):
    """The benchmark folder or its ground truth is missing or malformed; the message names file and key."""


# ----------------------------------------------------------------------------------------------------------
# Metric (pure numpy)
# ----------------------------------------------------------------------------------------------------------
def compute_ap(positions: np.ndarray, n_positives: int) -> float:
    """Average precision from the 0-based ranks of the positives (junk already removed), revisitop style.

    The precision-recall curve is integrated with trapezoids: the j-th positive (0-based) found at rank
    ``r`` adds ``(p0 + p1) / (2 * n_positives)`` where ``p1 = (j + 1) / (r + 1)`` is the precision just after
    it and ``p0 = j / r`` (1 when ``r == 0``) the precision just before it.

    Args:
        positions: int [P], sorted ranks of the positives that appear in the ranking.
        n_positives: number of positives of the query (the recall denominator).
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.size == 0:
        return 0.0
    j = np.arange(pos.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(pos == 0, 1.0, j / np.where(pos == 0, 1.0, pos))
    p1 = (j + 1.0) / (pos + 1.0)
    return float(np.sum((p0 + p1) / 2.0) / n_positives)


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision@k of a ranking, with revisitop's exact conventions.

    Args:
        ranks: int [n_db, n_queries]; column q lists database indices from most to least similar.
        gnd: one dict per query with ``ok`` (positive database indices) and optionally ``junk`` (indices
            removed from the ranking: positives after a junk image move up one place per junk before them).
        kappas: the k of precision@k.

    Returns:
        ``(map, aps [Q], pr [K], prs [Q, K])`` as fractions in [0, 1]. ``precision@k`` of a query is taken at
        ``min(k, rank of its last positive)``, as revisitop does. A query with an empty ``ok`` list gets NaN
        in ``aps`` and ``prs`` and is left out of ``map`` and ``pr`` (the means are over the other queries;
        if no query has a positive, ``map`` and ``pr`` are NaN where revisitop would divide by zero). A query
        whose positives are all absent from a truncated ranking gets AP 0 and P@k 0.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be [n_db, n_queries], got shape {ranks.shape}")
    nq = len(gnd)
    if ranks.shape[1] != nq:
        raise ValueError(f"ranks has {ranks.shape[1]} query columns but the ground truth has {nq} queries")
    kappas = [int(k) for k in kappas]
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"], dtype=np.int64).reshape(-1)
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        junk = np.asarray(gnd[i].get("junk", ()), dtype=np.int64).reshape(-1)
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))  # sorted 0-based positions of positives
        junk_pos = np.flatnonzero(np.isin(column, junk))
        # every junk image ranked strictly before a positive moves that positive up by one place
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        aps[i] = compute_ap(pos, ok.size)  # ok.size counts duplicates, as revisitop's len(qgnd) does
        if pos.size == 0:
            continue  # prs stays 0
        pos1 = pos + 1  # 1-based ranks
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k)
            prs[i, j] = np.count_nonzero(pos1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def setup_ground_truth(gnd: Sequence[Mapping[str, Any]], setup: str) -> list[dict[str, np.ndarray]]:
    """Per-query ``{"ok", "junk"}`` index arrays for the Easy / Medium / Hard setup (see the module doc)."""
    if setup not in SETUPS:
        raise ValueError(f"unknown retrieval setup {setup!r}: expected one of {', '.join(SETUPS)}")
    positives, ignored = SETUPS[setup]

    def cat(q: Mapping[str, Any], keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(q[key], dtype=np.int64).reshape(-1) for key in keys])

    return [{"ok": cat(q, positives), "junk": cat(q, ignored)} for q in gnd]


def evaluate_ranks(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> dict[str, Any]:
    """Easy / Medium / Hard metrics of a ranking ``[n_db, n_queries]`` against revisitop ground truth.

    Returns ``{setup: {"map", "mp@1", "mp@5", "mp@10", "num_queries", "aps": [per query]}}`` in percent;
    ``num_queries`` counts the queries with at least one positive, ``aps`` holds ``None`` for the others.
    """
    out: dict[str, Any] = {}
    for setup in SETUPS:
        m, aps, pr, _ = compute_map(ranks, setup_ground_truth(gnd, setup), kappas)
        entry: dict[str, Any] = {"map": _percent(m)}
        entry.update({f"mp@{k}": _percent(p) for k, p in zip(kappas, pr)})
        entry["num_queries"] = int(np.count_nonzero(~np.isnan(aps)))
        entry["aps"] = [_percent(a) for a in aps]
        out[setup] = entry
    return out


def _percent(x: float) -> float | None:
    return None if math.isnan(float(x)) else round(100.0 * float(x), 4)


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RevisitopDataset:
    """A revisitop benchmark: database names, query names, per-query ground truth and query boxes."""

    name: str
    image_dir: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]  # per query: easy/hard/junk int arrays, bbx (x1, y1, x2, y2) floats

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"


def load_revisitop(root: str | Path, dataset: str) -> RevisitopDataset:
    """Read ``ROOT/<dataset>/gnd_<dataset>.pkl`` safely and check it; errors name the file and key."""
    data_dir = Path(root) / dataset
    gnd_file = data_dir / f"gnd_{dataset}.pkl"
    if not gnd_file.is_file():
        found = sorted(p.parent.name for p in Path(root).glob("*/gnd_*.pkl")) if Path(root).is_dir() else []
        hint = f" (datasets found under {root}: {', '.join(found)})" if found else ""
        raise RetrievalDataError(f"ground truth file not found: {gnd_file}{hint}")
    image_dir = data_dir / "jpg"
    if not image_dir.is_dir():
        raise RetrievalDataError(f"image folder not found: {image_dir}")
    raw = safe_load(gnd_file)
    if not isinstance(raw, Mapping):
        raise RetrievalDataError(f"{gnd_file}: expected a dict, got {type(raw).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in raw:
            raise RetrievalDataError(f"{gnd_file}: missing key {key!r}")
    imlist = _names(raw["imlist"], gnd_file, "imlist")
    qimlist = _names(raw["qimlist"], gnd_file, "qimlist")
    if len(raw["gnd"]) != len(qimlist):
        raise RetrievalDataError(
            f"{gnd_file}: 'gnd' has {len(raw['gnd'])} entries but 'qimlist' has {len(qimlist)} queries"
        )
    gnd = []
    for i, q in enumerate(raw["gnd"]):
        if not isinstance(q, Mapping):
            raise RetrievalDataError(f"{gnd_file}: gnd[{i}] is a {type(q).__name__}, expected a dict")
        entry: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            if key not in q:
                raise RetrievalDataError(f"{gnd_file}: gnd[{i}] has no {key!r} list")
            idx = np.asarray(q[key], dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= len(imlist)):
                raise RetrievalDataError(
                    f"{gnd_file}: gnd[{i}][{key!r}] holds an index outside imlist (0..{len(imlist) - 1})"
                )
            entry[key] = idx
        if "bbx" not in q:
            raise RetrievalDataError(f"{gnd_file}: gnd[{i}] has no 'bbx' query box")
        bbx = np.asarray(q["bbx"], dtype=np.float64).reshape(-1)
        if bbx.size != 4 or not np.all(np.isfinite(bbx)):
            raise RetrievalDataError(f"{gnd_file}: gnd[{i}]['bbx'] must be 4 finite numbers: {q['bbx']!r}")
        entry["bbx"] = tuple(float(v) for v in bbx)
        gnd.append(entry)
    return RevisitopDataset(dataset, image_dir, imlist, qimlist, gnd)


def _names(value: Any, path: Path, key: str) -> list[str]:
    names = list(value) if isinstance(value, list | tuple | np.ndarray) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise RetrievalDataError(f"{path}: {key!r} must be a list of image names (strings)")
    return names


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------
def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def resized_size(width: int, height: int, long_side: float, patch_size: int) -> tuple[int, int]:
    """(W, H) with the long side ``long_side`` and the aspect kept, each rounded to a patch multiple."""
    scale = long_side / max(width, height)
    return _round_to(width * scale, patch_size), _round_to(height * scale, patch_size)


def _crop_box(bbx: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    # PIL's Image.crop rounds float boxes; revisitop crops with PIL, so do the same rounding explicitly.
    x1, y1, x2, y2 = (int(round(v)) for v in bbx)
    return x1, y1, x2, y2


@dataclass(frozen=True)
class RetrievalImage:
    """An image to describe; queries carry their integer crop box (PIL pads outside the image, as revisitop)."""

    path: Path
    box: tuple[int, int, int, int] | None = None


class _ResizedImages(torch.utils.data.Dataset):
    """Item ``(i, (W, H))`` -> uint8 [3, H, W]: image i, cropped if a query, bicubic-resized."""

    def __init__(self, items: list[RetrievalImage]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, tuple[int, int]]) -> torch.Tensor:
        i, size = key
        img = _open_rgb(self.items[i]).resize(size, Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _open_rgb(item: RetrievalImage) -> Image.Image:
    try:
        with Image.open(item.path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise RetrievalDataError(f"cannot read image {item.path}: {exc}") from exc
    return img.crop(item.box) if item.box is not None else img


def _source_size(item: RetrievalImage) -> tuple[int, int]:
    if item.box is not None:
        x1, y1, x2, y2 = item.box
        if x2 <= x1 or y2 <= y1:
            raise RetrievalDataError(f"query box {item.box} of {item.path} is empty")
        return x2 - x1, y2 - y1
    try:
        with Image.open(item.path) as im:  # reads the header only
            return im.size
    except (OSError, ValueError) as exc:
        raise RetrievalDataError(f"cannot read image {item.path}: {exc}") from exc


def _size_batches(
    keys: list[tuple[int, tuple[int, int]]], batch_size: int
) -> list[list[tuple[int, tuple[int, int]]]]:
    """Split ``(image index, (W, H))`` keys into batches whose images share one size (so they stack)."""
    by_size: dict[tuple[int, int], list[tuple[int, tuple[int, int]]]] = {}
    for key in keys:
        by_size.setdefault(key[1], []).append(key)
    return [group[s : s + batch_size] for group in by_size.values() for s in range(0, len(group), batch_size)]


@torch.inference_mode()
def extract_descriptors(
    model: torch.nn.Module,
    items: list[RetrievalImage],
    *,
    image_size: int,
    scales: Sequence[float],
    patch_size: int,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "images",
) -> torch.Tensor:
    """Global descriptors [N, D] (float32, CPU): per-scale L2-normalised CLS, averaged, re-normalised."""
    sizes = [_source_size(it) for it in items]
    keys = [(i, resized_size(w, h, image_size * s, patch_size)) for s in scales
            for i, (w, h) in enumerate(sizes)]
    batches = _size_batches(keys, batch_size)
    # The batch sampler hands whole keys to the dataset; the loader keeps the batches' order.
    loader = torch.utils.data.DataLoader(
        _ResizedImages(items), batch_sampler=batches, num_workers=num_workers
    )
    out: torch.Tensor | None = None
    bar = tqdm(zip(batches, loader, strict=True), total=len(batches), desc=desc, unit="batch",
               disable=not progress, leave=False)
    for batch_keys, x in bar:
        x = normalize_batch(x.to(device).float() / 255.0)
        feats = F.normalize(model(x).float(), dim=-1).cpu()  # [b, D]
        if out is None:
            out = torch.zeros(len(items), feats.shape[1])
        out.index_add_(0, torch.tensor([i for i, _ in batch_keys]), feats)
    if out is None:
        raise RetrievalDataError("no images to describe")
    return F.normalize(out, dim=-1)


def rank_database(db: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Database indices sorted by decreasing cosine similarity: int [n_db, n_queries] (ties keep index order).

    Args:
        db: [N, D] and queries: [Q, D], both L2-normalised.
    """
    sim = (db.double() @ queries.double().T).numpy()  # [N, Q]
    return np.argsort(-sim, axis=0, kind="stable")


def evaluate_retrieval(
    model: torch.nn.Module,
    root: str | Path,
    dataset: str,
    *,
    image_size: int = 224,
    multiscale: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the revisited Oxford/Paris protocol for one backbone.

    Args:
        model: a backbone whose ``forward([B, 3, H, W]) -> [B, D]`` returns the CLS token and that has a
            ``patch_size`` attribute (any ``DinoVisionTransformer`` from ``interop.load_backbone``).
        root: folder holding ``<dataset>/jpg`` and ``<dataset>/gnd_<dataset>.pkl``.
        dataset: e.g. ``roxford5k`` or ``rparis6k``.

    Returns:
        ``{"dataset", "num_db", "num_queries", "image_size", "scales", "easy": {...}, "medium": {...},
        "hard": {...}}`` where each setup holds ``map``, ``mp@k`` (percent), ``num_queries`` (queries with a
        positive) and per-query ``aps``.
    """
    if image_size <= 0 or batch_size <= 0:
        raise EvalError(f"image_size ({image_size}) and batch_size ({batch_size}) must be positive")
    data = load_revisitop(root, dataset)
    patch_size = int(getattr(model, "patch_size", 0))
    if patch_size <= 0:
        raise EvalError(f"model {type(model).__name__} has no positive 'patch_size' attribute")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    scales = MULTISCALE_SCALES if multiscale else (1.0,)
    kw: dict[str, Any] = dict(image_size=image_size, scales=scales, patch_size=patch_size, device=dev,
                              batch_size=batch_size, num_workers=num_workers, progress=progress)
    db = extract_descriptors(model, [RetrievalImage(data.image_path(n)) for n in data.imlist], desc="database", **kw)
    qitems = [RetrievalImage(data.image_path(n), _crop_box(g["bbx"])) for n, g in zip(data.qimlist, data.gnd)]
    queries = extract_descriptors(model, qitems, desc="queries", **kw)
    ranks = rank_database(db, queries)
    results: dict[str, Any] = {
        "dataset": dataset,
        "num_db": len(data.imlist),
        "num_queries": len(data.qimlist),
        "image_size": image_size,
        "scales": [round(s, 6) for s in scales],
    }
    results.update(evaluate_ranks(ranks, data.gnd, kappas))
    return results


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of mAP and mP@k per setup."""
    kcols = [k for k in results["easy"] if k.startswith("mp@")]
    head = f"{'':8s}{'mAP':>8s}" + "".join(f"{k.replace('mp', 'mP'):>8s}" for k in kcols) + f"{'queries':>9s}"
    lines = [
        f"{results['dataset']}: {results['num_queries']} queries, {results['num_db']} database images, "
        f"long side {results['image_size']}, scales {results['scales']}",
        head,
    ]
    for setup in SETUPS:
        r = results[setup]
        cells = "".join(_cell(r[c]) for c in ["map", *kcols])
        lines.append(f"{setup.capitalize():8s}{cells}{r['num_queries']:>9d}")
    return "\n".join(lines)


def _cell(v: float | None) -> str:
    return f"{'n/a':>8s}" if v is None else f"{v:8.2f}"


def add_retrieval_command(eval_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fastdinov2 eval retrieval`` on the ``eval`` group's sub-parsers."""
    p = eval_subparsers.add_parser(
        "retrieval",
        help="revisited Oxford5k / Paris6k instance retrieval (mAP, mP@k; Easy/Medium/Hard)",
        description="Instance retrieval on revisited Oxford5k / Paris6k with L2-normalised CLS features. "
        "Expects ROOT/<dataset>/jpg/*.jpg and ROOT/<dataset>/gnd_<dataset>.pkl.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="backbone: our export, a run dir, a checkpoint dir, the seed's teacher_checkpoint.pth, "
                        "an official DINOv2 or a timm file")
    p.add_argument("--data", required=True, type=Path, help="ROOT folder holding <dataset>/")
    p.add_argument("--dataset", required=True, help="dataset folder name, e.g. roxford5k or rparis6k")
    p.add_argument("--multiscale", action="store_true", help="average scales 1, 1/sqrt(2), 1/2")
    p.add_argument("--image-size", type=positive_int, default=224,
                   help="long side of the resized images, rounded to the patch size (default: 224)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="data-loader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--output", type=Path, default=None,
                   help="result JSON, must end in .json (default: RUN/eval/retrieval_<dataset>.json for a run dir, "
                        "else ./eval_retrieval_<dataset>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_retrieval_command)
    return p


def run_retrieval_command(args: argparse.Namespace) -> int:
    """``fastdinov2 eval retrieval``: evaluate, print the table, write the JSON result."""
    from fastdinov2.eval.commands import default_output
    from fastdinov2.eval.options import check_output_file, refuse_torchrun
    from fastdinov2.interop import load_backbone

    explicit = args.output is not None
    output = args.output if explicit else default_output(args.checkpoint, f"retrieval_{args.dataset}")
    try:
        refuse_torchrun("retrieval")
        check_output_file(output, "--output" if explicit else "output file (the default of --output)", ".json")
        device = resolve_device(args.device)
        model = load_backbone(args.checkpoint, device=device)
        results = evaluate_retrieval(
            model, args.data, args.dataset, image_size=args.image_size, multiscale=args.multiscale,
            device=device, batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress,
        )
    except (EvalError, pickle.UnpicklingError) as exc:
        print(f"fastdinov2: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    config = {
        "data": str(args.data), "dataset": args.dataset, "image_size": args.image_size,
        "multiscale": args.multiscale, "scales": results["scales"], "batch_size": args.batch_size,
        "device": str(device), "descriptor": "L2-normalised CLS token",
    }
    path = write_result(output, "retrieval", args.checkpoint, config, results)
    print(f"wrote {path}")
    return 0
