"""Per-sample randomness and DINOv2 multi-crop geometry at a curriculum stage's crop sizes.

Randomness: every draw for a sample comes from ``np.random.default_rng([seed, sample_key])``, split into
independent child streams (noise patching, crop geometry, photometric parameters, iBOT masks), so
changing one component's settings (e.g. turning noise patching on) leaves the others' draws unchanged,
and the same ``(seed, sample_key, stage)`` gives bit-identical crops in any worker or process. The crop
boxes do not depend on the stage: a sample's low-resolution crops show exactly the regions its
full-resolution crops would show.

Geometry (DINOv2): 2 global crops (RandomResizedCrop, scale ``crops.global_crops_scale_*``, aspect ratio
in (3/4, 4/3)), ``crops.local_crops_number`` local crops (``crops.local_crops_scale_*``), each flipped
horizontally with p=0.5, rendered at the stage's sizes by its low-pass method (:mod:`.lowpass`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdinov2.config import CropsConfig, StageConfig
from fastdinov2.data.lowpass import DecodedImage, render_crops

N_GLOBAL_CROPS = 2
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class SampleRngs:
    """Independent random streams of one sample, all derived from ``default_rng([seed, sample_key])``."""

    noise: np.random.Generator
    geometry: np.random.Generator
    photometric: np.random.Generator
    masks: np.random.Generator


def sample_rngs(seed: int, sample_key: int) -> SampleRngs:
    """The random streams of sample ``sample_key`` under run seed ``seed`` (both non-negative ints)."""
    if seed < 0 or sample_key < 0:
        raise ValueError(f"seed and sample_key must be non-negative, got seed={seed}, sample_key={sample_key}")
    base = np.random.default_rng([int(seed), int(sample_key)])
    noise, geometry, photometric, masks = base.spawn(4)
    return SampleRngs(noise=noise, geometry=geometry, photometric=photometric, masks=masks)


def sample_resized_crop_boxes(
    rng: np.random.Generator,
    width: int,
    height: int,
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """RandomResizedCrop boxes (torchvision's algorithm) for an image of ``width x height``.

    Up to 10 attempts per box: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first box
    that fits is placed uniformly; if none fits, a centre crop with the aspect ratio clamped to ``ratio``.
    Returns int64 [n, 4] rows ``(top, left, height, width)``. Draws a fixed number of values.
    """
    u = rng.random((n, CROP_ATTEMPTS, 2))
    pos = rng.random((n, 2))
    area = float(width * height)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    bw, bh = w[rows, first], h[rows, first]
    top = np.floor(pos[:, 0] * (height - bh + 1)).astype(np.int64)
    left = np.floor(pos[:, 1] * (width - bw + 1)).astype(np.int64)
    none_fit = ~fits.any(axis=1)
    if none_fit.any():
        in_ratio = width / height
        if in_ratio < ratio[0]:
            cw, ch = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(height * ratio[1])), height
        else:
            cw, ch = width, height
        bw, bh = np.where(none_fit, cw, bw), np.where(none_fit, ch, bh)
        top = np.where(none_fit, (height - ch) // 2, top)
        left = np.where(none_fit, (width - cw) // 2, left)
    return np.stack([top, left, bh, bw], axis=1)


@dataclass
class MultiCrops:
    """One sample's crops at the stage sizes (uint8) and the boxes they came from."""

    global_crops: torch.Tensor  # uint8 [2, 3, G, G]
    local_crops: torch.Tensor  # uint8 [nL, 3, L, L]
    global_boxes: np.ndarray  # int64 [2, 4] (top, left, height, width) in full-resolution pixels
    local_boxes: np.ndarray  # int64 [nL, 4]
    flips: np.ndarray  # bool [2 + nL]


def multicrop(
    decoded: DecodedImage, crops: CropsConfig, stage: StageConfig, rng: np.random.Generator
) -> MultiCrops:
    """DINOv2 multi-crop geometry of one decoded image at ``stage``'s sizes and low-pass method."""
    width, height = decoded.full_size
    n_local = crops.local_crops_number
    gboxes = sample_resized_crop_boxes(
        rng, width, height, N_GLOBAL_CROPS, (crops.global_crops_scale_min, crops.global_crops_scale_max)
    )
    lboxes = sample_resized_crop_boxes(
        rng, width, height, n_local, (crops.local_crops_scale_min, crops.local_crops_scale_max)
    )
    flips = rng.random(N_GLOBAL_CROPS + n_local) < 0.5
    if decoded.pixels is None:  # one PIL -> array conversion for all crops
        decoded = decoded.with_pixels()
    gcrops = render_crops(
        decoded, gboxes, stage.global_size, crops.global_crops_size, stage.lowpass, flips[:N_GLOBAL_CROPS]
    )
    lcrops = render_crops(
        decoded, lboxes, stage.local_size, crops.local_crops_size, stage.lowpass, flips[N_GLOBAL_CROPS:]
    )
    return MultiCrops(gcrops, lcrops, gboxes, lboxes, flips)
