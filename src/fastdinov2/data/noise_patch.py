"""Gaussian noise patching (FastDINOv2, SPEC section 1), applied to the whole decoded image before cropping.

With probability ``p``: a square patch of side ``s ~ U{1..min(H, W)}`` at a uniformly random position
fully inside the image; its pixels (values in [0, 1]) get additive ``N(0, 1) * sigma`` noise with
``sigma ~ U(0, max_scale)`` and are clamped to [0, 1]. Pixels outside the patch are untouched. The
``blur`` variant replaces the patch by its Gaussian-blurred version instead
(``sigma ~ U(blur_sigma_min, blur_sigma_max)`` pixels, Pillow's ``GaussianBlur``, which blurs the patch
on its own, as the seed code does).

Images are ``[H, W, 3]`` numpy arrays, either float in [0, 1] or uint8 (0..255). The uint8 path only
touches the patch (``inplace=True`` also skips the copy of the whole image), and works in 8-bit units:
``clip(x + 255 sigma z)`` rounded, which equals the float path's result rounded to the nearest 1/255.

The Gaussian draws ``z`` (float32, exact N(0, 1)) come from ``torch.randn`` on a CPU generator seeded by
one 63-bit draw of the sample's numpy stream: ~3.5x cheaper than numpy's ``standard_normal`` and just
as deterministic per seed (same torch version and CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from fastdinov2.config import NoiseConfig


@dataclass(frozen=True)
class NoisePatchRecord:
    """What was drawn. ``side``/``top``/``left``/``sigma`` are drawn even when ``applied`` is False."""

    kind: str  # "none" | "gaussian" | "blur"
    applied: bool
    side: int = 0
    top: int = 0
    left: int = 0
    sigma: float = 0.0


def _check_image(image: np.ndarray, inplace: bool = False) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"noise patching needs an [H, W, 3] image, got shape {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"noise patching needs a uint8 or float image, got dtype {image.dtype}")
    if inplace and not image.flags.writeable:
        raise ValueError("inplace noise patching needs a writable image")


def _draw_patch(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int]:
    side = int(rng.integers(1, min(height, width), endpoint=True))
    top = int(rng.integers(0, height - side, endpoint=True))
    left = int(rng.integers(0, width - side, endpoint=True))
    return side, top, left


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 N(0, 1) draws of ``shape``, from a torch CPU generator seeded by one draw of ``rng``."""
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def gaussian_noise_patch(
    image: np.ndarray,
    rng: np.random.Generator,
    p: float = 1.0,
    max_scale: float = 0.5,
    inplace: bool = False,
) -> tuple[np.ndarray, NoisePatchRecord]:
    """Additive Gaussian noise on one random square patch. image: [H,W,3] uint8 or float in [0,1].

    Returns a new array of the same shape and dtype (``inplace=True``: ``image`` itself, modified), and
    the record of the draw.
    """
    _check_image(image, inplace)
    height, width = image.shape[:2]
    applied = bool(rng.random() < p)
    side, top, left = _draw_patch(rng, height, width)
    sigma = float(rng.uniform(0.0, max_scale))
    record = NoisePatchRecord("gaussian", applied, side, top, left, sigma)
    out = image if inplace else image.copy()
    if not applied:
        return out, record
    noise = standard_normal(rng, (side, side, 3))
    win = (slice(top, top + side), slice(left, left + side))
    if image.dtype == np.uint8:
        patch = torch.from_numpy(out[win])  # a view: written back in place
        noise.mul_(255.0 * sigma).add_(patch).round_().clamp_(0.0, 255.0)
        patch.copy_(noise)
    else:
        noise.mul_(sigma)
        out[win] = np.clip(image[win] + noise.numpy().astype(image.dtype), 0.0, 1.0)
    return out, record


def blur_noise_patch(
    image: np.ndarray,
    rng: np.random.Generator,
    p: float = 1.0,
    sigma_min: float = 0.1,
    sigma_max: float = 2.0,
    inplace: bool = False,
) -> tuple[np.ndarray, NoisePatchRecord]:
    """Replace one random square patch by its Gaussian-blurred version. image: [H,W,3] uint8 or float.

    Float images are blurred at 8-bit precision (the patch goes through a uint8 PIL image).
    ``inplace=True`` modifies ``image`` and returns it.
    """
    _check_image(image, inplace)
    height, width = image.shape[:2]
    applied = bool(rng.random() < p)
    side, top, left = _draw_patch(rng, height, width)
    sigma = float(rng.uniform(sigma_min, sigma_max))
    record = NoisePatchRecord("blur", applied, side, top, left, sigma)
    out = image if inplace else image.copy()
    if not applied:
        return out, record
    win = (slice(top, top + side), slice(left, left + side))
    patch = out[win]
    patch8 = patch if image.dtype == np.uint8 else np.rint(np.clip(patch, 0, 1) * 255).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(np.ascontiguousarray(patch8)).filter(ImageFilter.GaussianBlur(sigma)))
    out[win] = blurred if image.dtype == np.uint8 else blurred.astype(image.dtype) / 255.0
    return out, record


def apply_noise_patch(
    image: np.ndarray, noise: NoiseConfig, rng: np.random.Generator, inplace: bool = False
) -> tuple[np.ndarray, NoisePatchRecord]:
    """Noise patching as configured for a stage (``noise.kind`` "none" returns the image unchanged).

    ``inplace=True`` modifies ``image`` (which must be writable) and returns it.
    """
    if noise.kind == "none":
        return image, NoisePatchRecord("none", False)
    if noise.kind == "gaussian":
        return gaussian_noise_patch(image, rng, p=noise.p, max_scale=noise.max_scale, inplace=inplace)
    if noise.kind == "blur":
        return blur_noise_patch(image, rng, p=noise.p, sigma_min=noise.blur_sigma_min,
                                sigma_max=noise.blur_sigma_max, inplace=inplace)
    raise ValueError(f"noise.kind must be none, gaussian or blur, got {noise.kind!r}")
