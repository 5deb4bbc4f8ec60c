"""Frequency sensitivity: how a clean-trained linear head copes with low- and high-pass filtered images, and
how corruption accuracy splits by the frequency band each corruption lives in.

Filtering happens on the eval-transformed image (resize + centre crop, values in ``[0, 1]``) *before*
ImageNet normalisation, per channel, in the 2-D Fourier domain: with integer frequencies ``(u, v)`` of the
centred spectrum (``u in [-H/2, H/2)``), the low-pass keeps ``sqrt(u^2 + v^2) <= r`` and the high-pass keeps the
rest, so ``low_r(x) + high_r(x) == x`` and a low-pass at ``r >= sqrt((H/2)^2 + (W/2)^2)`` (the half-diagonal) is
the identity. Filtered images are not clipped (a high-pass image has zero mean and negative values).

Corruption bands (:data:`FREQUENCY_BANDS`), after the Fourier analysis of ImageNet-C by Yin et al. 2019
("A Fourier perspective on model robustness in computer vision"):

- ``high``: additive/multiplicative noise puts energy at high frequencies (gaussian, shot, impulse, speckle);
- ``low_pass``: blurs remove high frequencies and keep the low ones (defocus, glass, motion, zoom, gaussian);
- ``mid``: corruptions with broad-band or mid-frequency content: textures and local geometric/blocking
  artifacts (snow, frost, spatter, elastic transform, pixelate, JPEG);
- ``low``: global photometric changes concentrated at low frequencies (fog, brightness, contrast, saturate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import transforms as T
from tqdm.auto import tqdm

from fastdinov2.eval.corruption import CORRUPTIONS_ALL, RecordSubset, per_class_indices
from fastdinov2.eval.features import open_class_folder, resolve_device
from fastdinov2.eval.linear import LinearHead, evaluate_head
from fastdinov2.eval.results import EvalError, read_result
from fastdinov2.eval.transforms import make_eval_geometry, normalize_batch

FREQUENCY_BANDS: dict[str, tuple[str, ...]] = {
    "high": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "low_pass": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "mid": ("snow", "frost", "spatter", "elastic_transform", "pixelate", "jpeg_compression"),
    "low": ("fog", "brightness", "contrast", "saturate"),
}
assert sorted(c for band in FREQUENCY_BANDS.values() for c in band) == sorted(CORRUPTIONS_ALL)


def default_radii(image_size: int) -> list[int]:
    """Powers of two from 2 up to ``image_size / 2``, plus ``image_size // 2`` itself (e.g. 64 -> 2..32;
    224 -> 2, 4, ..., 64, 112)."""
    half = image_size // 2
    radii = [2**i for i in range(1, 32) if 2**i <= half]
    if half >= 2 and half not in radii:
        radii.append(half)
    return radii


def half_diagonal(height: int, width: int) -> float:
    """Largest frequency radius of an ``H x W`` spectrum: ``sqrt((H/2)^2 + (W/2)^2)``."""
    return math.hypot(height / 2, width / 2)


def low_pass_mask(height: int, width: int, radius: float, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[H, W]`` in unshifted FFT order: True where the integer frequency ``(u, v)`` has
    ``sqrt(u^2 + v^2) <= radius`` (the disc of radius ``radius`` around the centre of the centred spectrum)."""
    u = torch.fft.fftfreq(height, d=1.0 / height, device=device)  # integer frequencies, -H/2 .. H/2-1
    v = torch.fft.fftfreq(width, d=1.0 / width, device=device)
    return (u[:, None] ** 2 + v[None, :] ** 2) <= radius**2


def fourier_filter(x: Tensor, radius: float, mode: str = "low") -> Tensor:
    """Low- or high-pass filter ``x [..., H, W]`` (per channel) with a circular mask of ``radius``.

    ``mode="low"`` keeps frequencies with ``|f| <= radius``; ``"high"`` keeps the complement. Returns a real
    tensor of the same shape and dtype (float32 math for lower precisions)."""
    if mode not in ("low", "high"):
        raise ValueError(f"mode must be 'low' or 'high', got {mode!r}")
    h, w = x.shape[-2:]
    mask = low_pass_mask(h, w, radius, x.device)
    if mode == "high":
        mask = ~mask
    spec = torch.fft.fft2(x.float(), dim=(-2, -1))
    out = torch.fft.ifft2(spec * mask, dim=(-2, -1)).real
    return out.to(x.dtype)


class _Filter:
    """Picklable batch transform: filter (optional) then ImageNet-normalise."""

    def __init__(self, radius: float | None, mode: str) -> None:
        self.radius, self.mode = radius, mode

    def __call__(self, x: Tensor) -> Tensor:
        if self.radius is not None:
            x = fourier_filter(x, self.radius, self.mode)
        return normalize_batch(x)


def evaluate_frequency(
    model: nn.Module,
    head_file: str | Path,
    val_dir: str | Path,
    *,
    radii: Sequence[float] | None = None,
    image_size: int | None = None,
    max_per_class: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Top-1 of a saved linear head on ``val_dir`` unfiltered, low-passed and high-passed at each radius.

    ``image_size`` defaults to the head's; ``radii`` to :func:`default_radii`. Returns ``{"image_size",
    "radii", "half_diagonal", "clean_top1", "low_pass": {"<r>": top1}, "high_pass": {"<r>": top1},
    "num_images", "head"}``.
    """
    head = LinearHead.load(head_file)
    head.check_model(model, head_file)
    size = image_size or head.image_size
    radii = list(radii) if radii is not None else default_radii(size)
    if not radii or any(r <= 0 for r in radii):
        raise EvalError(f"radii must be positive, got {radii}")
    dev = resolve_device(device)
    base = open_class_folder(val_dir, T.Compose([make_eval_geometry(size), T.ToTensor()]))
    ds = RecordSubset(base, per_class_indices(base.records, max_per_class, seed))
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "device": dev, "progress": False,
              "head_file": head_file}

    variants: list[tuple[str, float | None]] = [("clean", None)]
    variants += [("low", r) for r in radii] + [("high", r) for r in radii]
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    clean = float("nan")
    n = 0
    for mode, r in tqdm(variants, desc="frequency filters", unit="pass", disable=not progress, leave=False):
        res = evaluate_head(model, head, ds, batch_transform=_Filter(r, mode), desc=f"{mode} {r}", **common)
        n = res["num_images"]
        if r is None:
            clean = res["top1"]
        else:
            (low if mode == "low" else high)[f"{r:g}"] = res["top1"]
    return {
        "image_size": size,
        "radii": [float(r) for r in radii],
        "half_diagonal": half_diagonal(size, size),
        "clean_top1": clean,
        "low_pass": low,
        "high_pass": high,
        "num_images": n,
        "head": {"file": str(head_file), "n_last_blocks": head.n_blocks, "pooling": head.pooling,
                 "num_classes": len(head.classes)},
    }


def group_by_band(corruption_result: str | Path | dict) -> dict:
    """Corruption accuracy grouped by :data:`FREQUENCY_BANDS`, from a corruption result (path or dict).

    Returns ``{"bands": {band: {"types": [...], "mean": top1 | None, "type_mean": {type: top1}}},
    "grouping": FREQUENCY_BANDS, "clean_top1": ...}``; a band's mean is over the types evaluated (None if none).
    """
    if isinstance(corruption_result, dict):
        obj, where = corruption_result, "the corruption result"
    else:
        obj, where = read_result(corruption_result, "corruption"), str(corruption_result)
    res = obj.get("results", obj)
    acc = res.get("accuracy")
    if not isinstance(acc, dict):
        raise EvalError(f"{where} has no results.accuracy mapping")
    type_mean = {c: float(np.mean(list(sev.values()))) for c, sev in acc.items() if sev}
    bands = {}
    for band, members in FREQUENCY_BANDS.items():
        present = [c for c in members if c in type_mean]
        bands[band] = {
            "types": present,
            "mean": float(np.mean([type_mean[c] for c in present])) if present else None,
            "type_mean": {c: type_mean[c] for c in present},
        }
    return {"bands": bands, "grouping": {k: list(v) for k, v in FREQUENCY_BANDS.items()},
            "clean_top1": res.get("clean_top1")}


def plot_frequency_curves(results: dict, path: str | Path) -> Path:
    """PNG: top-1 against filter radius (log2 axis) for low- and high-pass, with the clean top-1 dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    radii = results["radii"]
    ax.plot(radii, [results["low_pass"][f"{r:g}"] for r in radii], "o-", label="low-pass (keep |f| <= r)")
    ax.plot(radii, [results["high_pass"][f"{r:g}"] for r in radii], "s-", label="high-pass (keep |f| > r)")
    ax.axhline(results["clean_top1"], color="gray", linestyle="--", label="unfiltered")
    ax.set_xscale("log", base=2)
    ax.set_xticks(radii, [f"{r:g}" for r in radii])
    ax.minorticks_off()
    ax.set_xlabel("radius r (cycles per image)")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"frequency sensitivity at {results['image_size']} px")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def frequency_table(results: dict) -> str:
    """A short text table: radius, low-pass top-1, high-pass top-1."""
    lines = [f"clean top-1: {results['clean_top1']:.2f}", f"{'radius':>8s} {'low-pass':>9s} {'high-pass':>9s}"]
    for r in results["radii"]:
        k = f"{r:g}"
        lines.append(f"{k:>8s} {results['low_pass'][k]:9.2f} {results['high_pass'][k]:9.2f}")
    bands = results.get("bands")
    if bands:
        lines.append("corruption top-1 by band:")
        for band, info in bands["bands"].items():
            mean = "–" if info["mean"] is None else f"{info['mean']:.2f}"
            lines.append(f"  {band:<9s} {mean:>7s}  ({', '.join(info['types']) or 'no types evaluated'})")
    return "\n".join(lines)
