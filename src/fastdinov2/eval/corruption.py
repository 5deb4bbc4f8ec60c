"""Corruption robustness (ImageNet-C protocol): a clean-trained linear head applied to corrupted val sets.

Corrupted images come either from disk or are generated on the fly:

- Hendrycks ImageNet-C layout: ``ROOT/<type>/<severity>/<wnid>/*``;
- the seed code's mini-ImageNet-C layout: ``ROOT/<type>/<severity>/val/<wnid>/*``, optionally with a DINOv2
  ``labels.txt`` (CSV rows ``wnid,name``) in ``ROOT/<type>/<severity>/`` or ``ROOT/``;
- generated from a labelled val folder with ``imagecorruptions`` (19 types x 5 severities).

Generated images follow ImageNet-C's recipe: the image is resized (bicubic, shorter side
``round(C * 256 / 224)``) and centre-cropped to ``C = corruption_size`` (224 by default, the size the
corruption parameters were calibrated for: blur radii, frost texture scale, pixelation are in absolute pixels),
corrupted, then resized to the evaluation ``image_size`` when it differs. Small images are therefore upscaled
before corruption. ``corruption_size=0`` corrupts at ``image_size`` directly. Every image gets its own seed
(from the run seed, the corruption, the severity and the image's relative path); ``imagecorruptions`` draws from
NumPy's global generator, which is seeded per image and restored afterwards.

Reported: top-1 per (type, severity), the mean over the 15 standard types (``mean_common``; null unless all 15
were evaluated), the mean over all 19 (``mean_all``; null unless all 19 were evaluated), the mean over the types
evaluated (``mean_present``) and mCE against a reference result: ``CE_c = sum_s err_model(c, s) /
sum_s err_ref(c, s)``, ``mCE = mean_c CE_c`` over the types (and severities) present in both, in percent.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fastdinov2.eval.features import open_class_folder, resolve_device
from fastdinov2.eval.linear import LinearHead, evaluate_head
from fastdinov2.eval.results import EvalError, read_result
from fastdinov2.eval.transforms import make_eval_geometry, make_eval_transform, make_tensor_transform

#: the 19 ImageNet-C corruptions, in imagecorruptions' order (15 standard ones first, then 4 extra)
CORRUPTIONS_ALL: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
CORRUPTIONS_COMMON: tuple[str, ...] = CORRUPTIONS_ALL[:15]
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_CORRUPTION_SIZE = 32  # imagecorruptions refuses smaller images


# ----------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class CorruptionSet:
    """One corrupted val set: the class-folder root holding its images."""

    corruption: str
    severity: int
    root: Path


@dataclass
class CorruptionLayout:
    """What :func:`discover_corrupted_root` found."""

    root: Path
    layout: str  # "hendrycks" | "seed"
    sets: list[CorruptionSet]
    labels: dict[str, str] = field(default_factory=dict)  # wnid -> human name, from labels.txt files

    @property
    def corruptions(self) -> list[str]:
        return list(dict.fromkeys(s.corruption for s in self.sets))

    @property
    def severities(self) -> list[int]:
        return sorted({s.severity for s in self.sets})


def read_labels_txt(path: str | Path) -> dict[str, str]:
    """A DINOv2 ``labels.txt``: CSV rows ``class_id,class_name`` -> ``{class_id: class_name}``."""
    path = Path(path)
    out: dict[str, str] = {}
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise EvalError(f"{path}:{lineno}: expected 'class_id,class_name', got {','.join(row)!r}")
            out[row[0].strip()] = ",".join(row[1:]).strip()
    if not out:
        raise EvalError(f"{path} holds no 'class_id,class_name' rows")
    return out


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover_corrupted_root(
    root: str | Path,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
) -> CorruptionLayout:
    """Find and validate the corrupted val sets below ``root`` (Hendrycks or seed layout, see module doc).

    ``corruptions``: the types to use (each must exist); default every type folder found (each must be one
    of the 19 known names). Every type must hold every requested severity. Errors name the offending path.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"corrupted root {root} is not a folder")
    type_dirs = {p.name: p for p in _subdirs(root)}
    if corruptions is None:
        unknown = sorted(set(type_dirs) - set(CORRUPTIONS_ALL))
        if unknown:
            raise EvalError(
                f"{root} holds folder(s) {unknown} that are not corruption types; expected names among "
                f"{list(CORRUPTIONS_ALL)} (or pass an explicit list of corruptions)"
            )
        wanted = [c for c in CORRUPTIONS_ALL if c in type_dirs]
        if not wanted:
            raise EvalError(f"no corruption folders in {root} (expected {root}/<type>/<severity>/...)")
    else:
        wanted = list(corruptions)
        bad = [c for c in wanted if c not in CORRUPTIONS_ALL]
        if bad:
            raise EvalError(f"unknown corruption(s) {bad}; known: {list(CORRUPTIONS_ALL)}")
        for c in wanted:
            if c not in type_dirs:
                raise EvalError(f"corruption folder {root / c} is missing")
    bad_sev = [s for s in severities if s not in SEVERITIES]
    if bad_sev or not severities:
        raise EvalError(f"severities must be among {list(SEVERITIES)}, got {list(severities)}")

    layout: str | None = None
    first_set: Path | None = None
    sets: list[CorruptionSet] = []
    labels: dict[str, str] = {}
    root_labels = root / "labels.txt"
    if root_labels.is_file():
        labels.update(read_labels_txt(root_labels))
    for c in wanted:
        tdir = type_dirs[c]
        found = {p.name for p in _subdirs(tdir)}
        not_sev = sorted(n for n in found if n not in {str(s) for s in SEVERITIES})
        if not_sev:
            raise EvalError(f"{tdir} holds folder(s) {not_sev} that are not severities 1..5")
        for s in severities:
            sdir = tdir / str(s)
            if not sdir.is_dir():
                have = ", ".join(sorted(found)) or "none"
                raise EvalError(f"severity folder {sdir} is missing (found severities: {have})")
            this = "seed" if (sdir / "val").is_dir() else "hendrycks"
            if layout is None:
                layout, first_set = this, sdir
            elif this != layout:
                raise EvalError(
                    f"{sdir} uses the {this} layout but {first_set} uses the {layout} layout; "
                    "a corrupted root must use one layout"
                )
            if (sdir / "labels.txt").is_file():
                labels.update(read_labels_txt(sdir / "labels.txt"))
            sets.append(CorruptionSet(c, s, sdir / "val" if this == "seed" else sdir))
    assert layout is not None
    if labels:
        for st in sets:
            unlisted = sorted({p.name for p in _subdirs(st.root)} - set(labels))
            if unlisted:
                raise EvalError(f"class folder(s) {unlisted[:8]} of {st.root} are not listed in labels.txt")
    return CorruptionLayout(root, layout, sets, labels)


# --------------------------------------------------------------------------------------------- generation
def image_seed(seed: int, corruption: str, severity: int, rel_path: str) -> int:
    """Per-image seed (uint32) from the run seed, corruption, severity and the image's relative path."""
    ci = CORRUPTIONS_ALL.index(corruption) if corruption in CORRUPTIONS_ALL else 99
    crc = zlib.crc32(rel_path.encode())
    return int(np.random.SeedSequence([seed, ci, severity, crc]).generate_state(1)[0])


def corrupt_array(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Apply one ImageNet-C corruption to ``image [H, W, 3] uint8`` (H, W >= 32); deterministic in ``seed``.

    ``imagecorruptions`` draws from NumPy's global generator (and, for glass blur and impulse noise, from a
    ``seed`` argument): the global state is seeded for the call and restored afterwards.
    """
    from imagecorruptions import corrupt

    if corruption not in CORRUPTIONS_ALL:
        raise EvalError(f"unknown corruption {corruption!r}; known: {list(CORRUPTIONS_ALL)}")
    if severity not in SEVERITIES:
        raise EvalError(f"severity must be in 1..5, got {severity}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise EvalError(f"expected an [H, W, 3] uint8 image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_CORRUPTION_SIZE:
        raise EvalError(f"image of {image.shape[1]}x{image.shape[0]} px is below the {MIN_CORRUPTION_SIZE} px "
                        "imagecorruptions needs")
    kwargs = {"seed": seed} if corruption in ("glass_blur", "impulse_noise") else {}
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = corrupt(image, corruption_name=corruption, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)
    if out.shape != image.shape:
        raise EvalError(f"{corruption} changed the image shape from {image.shape} to {out.shape}")
    return np.ascontiguousarray(out, dtype=np.uint8)


class GeneratedCorruptionDataset(Dataset):
    """A labelled val set corrupted on the fly (module doc). ``corruption=None`` gives the clean images
    through the same pipeline. Items ``(image [3, S, S] normalised, label)``; attributes ``records``,
    ``classes``, ``root`` like ``ClassFolderDataset``."""

    def __init__(
        self,
        records: Sequence[Any],
        classes: Sequence[str],
        root: str | Path,
        corruption: str | None,
        severity: int,
        image_size: int,
        corruption_size: int = 224,
        seed: int = 0,
    ) -> None:
        if corruption is not None and corruption not in CORRUPTIONS_ALL:
            raise EvalError(f"unknown corruption {corruption!r}; known: {list(CORRUPTIONS_ALL)}")
        self.records = list(records)
        self.classes = list(classes)
        self.root = Path(root)
        self.corruption = corruption
        self.severity = severity
        self.image_size = image_size
        if corruption_size < 0:
            raise EvalError(f"corruption size must be 0 (the eval size) or positive, got {corruption_size}")
        self.corruption_size = corruption_size if corruption_size > 0 else image_size
        if self.corruption_size < MIN_CORRUPTION_SIZE:
            raise EvalError(f"corruption size {self.corruption_size} is below the {MIN_CORRUPTION_SIZE} px "
                            "imagecorruptions needs; use --corruption-size 224")
        self.seed = seed
        self.geometry = make_eval_geometry(self.corruption_size)
        self.to_tensor = make_tensor_transform(normalize=True)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from fastdinov2.data.datasets import load_image

        rec = self.records[index]
        img = self.geometry(load_image(rec.path))
        if self.corruption is not None:
            rel = Path(rec.path).relative_to(self.root).as_posix() if Path(rec.path).is_relative_to(self.root) \
                else Path(rec.path).name
            seed = image_seed(self.seed, self.corruption, self.severity, rel)
            img = Image.fromarray(corrupt_array(np.asarray(img, dtype=np.uint8), self.corruption, self.severity, seed))
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return self.to_tensor(img), rec.label


class RecordSubset(Dataset):
    """The items ``indices`` of a class-folder dataset, keeping its ``classes``/``root``/``records``."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)
        self.classes = list(base.classes)
        self.root = base.root
        self.records = [base.records[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def per_class_indices(records: Sequence[Any], max_per_class: int | None, seed: int) -> list[int]:
    """At most ``max_per_class`` indices per label (a seeded random choice, returned in record order)."""
    if max_per_class is None:
        return list(range(len(records)))
    if max_per_class < 1:
        raise EvalError(f"--max-per-class must be >= 1, got {max_per_class}")
    by_label: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(int(r.label), []).append(i)
    keep: list[int] = []
    for label, idx in sorted(by_label.items()):
        if len(idx) > max_per_class:
            rng = np.random.default_rng([seed, label])
            idx = sorted(rng.choice(idx, size=max_per_class, replace=False).tolist())
        keep.extend(idx)
    return sorted(keep)


# -------------------------------------------------------------------------------------------- summaries
def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def summarize_accuracy(accuracy: dict[str, dict[str, float]]) -> dict:
    """Per-type means and the three overall means (see module doc) from ``{type: {"<sev>": top1}}``."""
    type_mean = {c: _mean(list(sev.values())) for c, sev in accuracy.items()}
    present = [c for c in CORRUPTIONS_ALL if c in type_mean]
    missing_common = [c for c in CORRUPTIONS_COMMON if c not in type_mean]
    return {
        "type_mean": type_mean,
        "mean_common": None if missing_common else _mean([type_mean[c] for c in CORRUPTIONS_COMMON]),
        "mean_all": None if len(present) < len(CORRUPTIONS_ALL) else _mean([type_mean[c] for c in CORRUPTIONS_ALL]),
        "mean_present": _mean(list(type_mean.values())) if type_mean else None,
        "common_types_missing": missing_common,
    }


def reference_accuracy(reference: str | Path | dict) -> dict[str, dict[str, float]]:
    """``{type: {"<sev>": top1}}`` from a corruption result JSON (path or loaded dict)."""
    if isinstance(reference, dict):
        obj, where = reference, "reference result"
    else:
        obj, where = read_result(reference, "corruption"), str(reference)
    acc = obj.get("results", obj).get("accuracy")
    if not isinstance(acc, dict):
        raise EvalError(f"{where} has no results.accuracy mapping")
    for c, sev in acc.items():
        if not isinstance(sev, dict) or not all(isinstance(v, int | float) for v in sev.values()):
            raise EvalError(f"{where}: results.accuracy.{c} must map severities to numbers")
    return acc


def compute_mce(
    accuracy: dict[str, dict[str, float]], reference: dict[str, dict[str, float]], reference_name: str = "reference"
) -> dict:
    """ImageNet-C mCE of ``accuracy`` against ``reference`` (both ``{type: {"<sev>": top1 %}}``).

    ``CE_c = sum_s (100 - acc_c,s) / sum_s (100 - ref_c,s)`` over the severities present in both;
    ``mCE = mean_c CE_c`` over the types present in both. Returned in percent (ratio x 100):
    ``{"mce", "ce": {type: CE}, "types": [...], "types_skipped": [...]}``.
    """
    ce: dict[str, float] = {}
    skipped = []
    for c in [c for c in CORRUPTIONS_ALL if c in accuracy] + sorted(set(accuracy) - set(CORRUPTIONS_ALL)):
        if c not in reference:
            skipped.append(c)
            continue
        sevs = sorted(set(accuracy[c]) & set(reference[c]), key=lambda s: int(s))
        if not sevs:
            skipped.append(c)
            continue
        err_model = sum(100.0 - accuracy[c][s] for s in sevs)
        err_ref = sum(100.0 - reference[c][s] for s in sevs)
        if err_ref <= 0:
            raise EvalError(f"{reference_name}: {c} has zero error at severities {sevs}; its CE is undefined")
        ce[c] = 100.0 * err_model / err_ref
    if not ce:
        raise EvalError(f"{reference_name} shares no corruption type (and severity) with this result")
    return {"mce": _mean(list(ce.values())), "ce": ce, "types": list(ce), "types_skipped": skipped}


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_corruption(
    model: nn.Module,
    head_file: str | Path,
    *,
    corrupted_root: str | Path | None = None,
    generate_from: str | Path | None = None,
    clean_val_dir: str | Path | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    image_size: int | None = None,
    corruption_size: int = 224,
    max_per_class: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    reference: str | Path | dict | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy of a saved linear head on every corrupted val set.

    Exactly one of ``corrupted_root`` (Hendrycks or seed layout on disk) and ``generate_from`` (a labelled val
    folder corrupted on the fly) is given. ``image_size`` defaults to the head's. ``clean_val_dir`` (on-disk
    mode) adds the clean top-1 with the standard eval transform; when generating, the clean top-1 uses the
    generation pipeline without corruption. Returns the ``results`` object documented in docs/evaluation.md.
    """
    if (corrupted_root is None) == (generate_from is None):
        raise EvalError("give exactly one of a corrupted root (--corrupted-root) and a val folder to corrupt "
                        "(--generate)")
    if corruption_size < 0:
        raise EvalError(f"corruption size must be 0 (the eval size) or positive, got {corruption_size}")
    head = LinearHead.load(head_file)
    head.check_model(model, head_file)
    size = image_size or head.image_size
    dev = resolve_device(device)
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "device": dev, "progress": False,
              "head_file": head_file}

    jobs: list[tuple[str, int, Any]] = []
    clean_ds: Any = None
    if corrupted_root is not None:
        found = discover_corrupted_root(corrupted_root, corruptions, severities)
        layout = found.layout
        transform = make_eval_transform(size)
        for st in found.sets:
            ds = open_class_folder(st.root, transform)
            jobs.append((st.corruption, st.severity, RecordSubset(ds, per_class_indices(ds.records, max_per_class,
                                                                                           seed))))
        if clean_val_dir is not None:
            base = open_class_folder(clean_val_dir, transform)
            clean_ds = RecordSubset(base, per_class_indices(base.records, max_per_class, seed))
    else:
        layout = "generated"
        types = list(corruptions) if corruptions is not None else list(CORRUPTIONS_ALL)
        bad = [c for c in types if c not in CORRUPTIONS_ALL]
        if bad:
            raise EvalError(f"unknown corruption(s) {bad}; known: {list(CORRUPTIONS_ALL)}")
        bad_sev = [s for s in severities if s not in SEVERITIES]
        if bad_sev or not severities:
            raise EvalError(f"severities must be among {list(SEVERITIES)}, got {list(severities)}")
        base = open_class_folder(generate_from, None)  # type: ignore[arg-type]
        keep = per_class_indices(base.records, max_per_class, seed)
        records = [base.records[i] for i in keep]

        def _gen(c: str | None, s: int) -> GeneratedCorruptionDataset:
            return GeneratedCorruptionDataset(records, base.classes, base.root, c, s, size, corruption_size, seed)

        jobs = [(c, s, _gen(c, s)) for c in types for s in severities]
        clean_ds = _gen(None, 1)

    accuracy: dict[str, dict[str, float]] = {}
    top5: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    bar = tqdm(jobs, desc="corruptions", unit="set", disable=not progress, leave=False)
    for c, s, ds in bar:
        bar.set_postfix_str(f"{c} {s}")
        res = evaluate_head(model, head, ds, desc=f"{c} {s}", **common)
        accuracy.setdefault(c, {})[str(s)] = res["top1"]
        top5.setdefault(c, {})[str(s)] = res["top5"]
        counts.setdefault(c, {})[str(s)] = res["num_images"]
    clean = evaluate_head(model, head, clean_ds, desc="clean", **common)["top1"] if clean_ds is not None else None

    results: dict[str, Any] = {
        "layout": layout,
        "corrupted_root": None if corrupted_root is None else str(corrupted_root),
        "generated_from": None if generate_from is None else str(generate_from),
        "image_size": size,
        "corruption_size": (corruption_size if corruption_size > 0 else size) if generate_from is not None else None,
        "types": list(accuracy),
        "severities": sorted({int(s) for sev in accuracy.values() for s in sev}),
        "accuracy": accuracy,
        "top5": top5,
        "num_images": counts,
        "clean_top1": clean,
        **summarize_accuracy(accuracy),
        "mce": None,
        "head": {"file": str(head_file), "n_last_blocks": head.n_blocks, "pooling": head.pooling,
                 "num_classes": len(head.classes)},
    }
    if reference is not None:
        ref_name = "reference result" if isinstance(reference, dict) else str(reference)
        results["mce"] = {**compute_mce(accuracy, reference_accuracy(reference), ref_name),
                          "reference": None if isinstance(reference, dict) else str(reference)}
    return results


# ------------------------------------------------------------------------------------------------ output
def corruption_markdown(results: dict) -> str:
    """A markdown table: one row per type (top-1 per severity, mean), then the overall means and mCE."""
    sevs = [str(s) for s in results["severities"]]
    lines = ["| corruption | " + " | ".join(f"s{s}" for s in sevs) + " | mean | CE |",
             "|---|" + "---:|" * (len(sevs) + 2)]
    ce = (results.get("mce") or {}).get("ce", {})

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    for c in results["types"]:
        row = [fmt(results["accuracy"][c].get(s)) for s in sevs]
        lines.append(f"| {c} | " + " | ".join(row) + f" | {fmt(results['type_mean'][c])} | {fmt(ce.get(c))} |")
    lines.append("")
    lines.append(f"- clean top-1: {fmt(results.get('clean_top1'))}")
    lines.append(f"- mean over the 15 standard types: {fmt(results.get('mean_common'))}")
    lines.append(f"- mean over all 19 types: {fmt(results.get('mean_all'))}")
    lines.append(f"- mean over the {len(results['types'])} types evaluated: {fmt(results.get('mean_present'))}")
    if results.get("mce"):
        lines.append(f"- mCE vs {results['mce'].get('reference') or 'reference'}: {fmt(results['mce']['mce'])}")
    return "\n".join(lines) + "\n"


def plot_corruption_heatmap(results: dict, path: str | Path) -> Path:
    """Heatmap PNG of top-1 per (type, severity) (Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types, sevs = results["types"], [str(s) for s in results["severities"]]
    data = np.array([[results["accuracy"][c].get(s, np.nan) for s in sevs] for c in types], dtype=float)
    fig = Figure(figsize=(1.2 + 0.9 * len(sevs), 0.9 + 0.38 * len(types)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sevs)), [f"s{s}" for s in sevs])
    ax.set_yticks(range(len(types)), types)
    for i in range(len(types)):
        for j in range(len(sevs)):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 60 else "black")
    ax.set_title("top-1 (%) under corruption")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
