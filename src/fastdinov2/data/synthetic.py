"""The embedded synthetic dataset: generated offline, deterministically, once.

Each class is a (shape, texture) pair: a coarse cue (the silhouette: low spatial frequency) and a fine
cue (a texture with a period of 4-6 px at 96 px, i.e. 16-24 cycles per image: high spatial frequency,
right at the Nyquist limit of a 2x downscale, which halves its energy) filling the shape. Everything
else is a nuisance drawn at random per image: the colours (object, texture, background), position,
scale, rotation of the shape, a smooth background colour field, thin clutter lines, up to two
untextured distractor blobs, and pixel noise. Random features latch onto
colour and layout and do poorly; DINO's colour jitter and crops teach invariance to exactly these
nuisances, so learned features separate the classes clearly. A human separates them at a glance.

Written as an ordinary image folder::

    ROOT/train/<class>/<n:05d>.jpg     (JPEG quality 95, 4:4:4 chroma)
    ROOT/val/<class>/<n:05d>.jpg
    ROOT/meta.json                     generator version, seed, counts, image size, class descriptions
    ROOT/.complete                     written last

It is generated into a temporary sibling folder and renamed into place, so ``ROOT`` is either absent or
complete. Each image is a pure function of ``(seed, split, class, index)``.

Besides the classification splits, :func:`write_corrupted_set` writes an ImageNet-C style corrupted copy
of (part of) the val split and :func:`write_retrieval_set` a small revisited-Oxford style instance
retrieval set built from the same renderer.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import json
import math
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# fastdinov2.data.datasets (and with it torch) is imported inside the functions that need it, so that
# generator worker processes start quickly.

GENERATOR = "fastdinov2.synthetic"
GENERATOR_VERSION = 2
#: Colours are drawn with at most this HSV saturation. With fully saturated random hues, colour is the
#: easiest cue that two DINO views of one image share (DINOv2's hue jitter is only +-0.1), so a short
#: self-supervised run learns colour clusters instead of the class evidence (shape and texture);
#: measured on the tiny preset: kNN +3 points over random init after 150 steps with saturation up to 1,
#: +7 with saturation up to 0.3 (version 2).
MAX_SATURATION = 0.3
DEFAULT_DIRNAME = f"synthetic-v{GENERATOR_VERSION}"
CACHE_ENV = "FASTDINOV2_CACHE"
COMPLETE_MARKER = ".complete"
JPEG_QUALITY = 95
SUPERSAMPLE = 2  # shapes and textures are rendered at 2x and box-filtered down (anti-aliasing)

SHAPES: dict[str, str] = {
    "disc": "a filled disc",
    "square": "a filled square",
    "triangle": "an equilateral triangle",
    "ring": "an annulus (inner radius 55%)",
    "cross": "a plus-shaped cross",
    "bars": "two parallel bars",
    "star": "a five-pointed star",
    "ellipse": "an ellipse with 2:1 axes",
    "chevron": "a V-shaped chevron",
    "crescent": "a crescent (a disc minus an offset disc)",
}
TEXTURES: dict[str, str] = {
    "stripes0": "stripes at 0 degrees",
    "stripes45": "stripes at 45 degrees",
    "stripes90": "stripes at 90 degrees",
    "stripes135": "stripes at 135 degrees",
    "checkers": "a checkerboard",
    "dots": "a grid of dots",
    "grid": "a grid of thin lines",
    "waves": "wavy stripes",
    "zigzag": "zigzag stripes",
    "speckle": "random binary speckle (~2 px cells)",
}
_SHAPE_NAMES = tuple(SHAPES)
_TEXTURE_NAMES = tuple(TEXTURES)
MAX_CLASSES = len(_SHAPE_NAMES) * len(_TEXTURE_NAMES)

# streams of the per-image random generator: (seed, stream, class, index)
_STREAM_TRAIN, _STREAM_VAL, _STREAM_RETRIEVAL, _STREAM_CORRUPT = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# classes


def class_pairs(num_classes: int = 10) -> list[tuple[str, str]]:
    """The (shape, texture) pair of each class, in label order (the sorted order of the class names).

    The pairs are drawn as ``k -> (shape k % 10, texture (k + k // 10) % 10)`` for ``k < num_classes``
    (all distinct up to 100 classes; the first 10 use each shape and each texture once), then sorted by
    name, so that folder order (how every loader assigns labels) and this order agree.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes} must be in [1, {MAX_CLASSES}]")
    n = len(_SHAPE_NAMES)
    pairs = [(_SHAPE_NAMES[k % n], _TEXTURE_NAMES[(k + k // n) % n]) for k in range(num_classes)]
    return sorted(pairs, key=lambda p: f"{p[0]}-{p[1]}")


def class_names(num_classes: int = 10) -> list[str]:
    """Class folder names such as ``"disc-stripes0"``, in label order (sorted)."""
    return [f"{s}-{t}" for s, t in class_pairs(num_classes)]


def describe(num_classes: int = 10) -> list[dict[str, str]]:
    """One dict per class: ``name``, ``shape``, ``texture`` and a human-readable ``description``."""
    out = []
    for name, (s, t) in zip(class_names(num_classes), class_pairs(num_classes)):
        desc = f"{SHAPES[s]} filled with {TEXTURES[t]}"
        out.append({"name": name, "shape": s, "texture": t, "description": desc})
    return out


# ----------------------------------------------------------------------------------------------------
# rendering


@dataclass
class Blob:
    """An untextured distractor: a wobbly ellipse with a linear colour gradient."""

    cx: float
    cy: float
    radius: float
    aspect: float
    angle: float
    wobble: float
    wobble_phase: float
    color: tuple[float, float, float]
    gradient: tuple[float, float, float]  # colour change across the blob


@dataclass
class Line:
    """A thin clutter segment from ``(x0, y0)`` to ``(x1, y1)``, alpha-blended over the background."""

    x0: float
    y0: float
    x1: float
    y1: float
    width: float
    color: tuple[float, float, float]
    alpha: float


@dataclass
class Scene:
    """Every parameter of one rendered image (sizes in output pixels, angles in radians, colours in [0,1])."""

    size: int
    shape: str
    texture: str
    cx: float
    cy: float
    radius: float
    rotation: float  # of the silhouette
    texture_angle: float  # of the texture, in the image frame
    period: float
    phase: tuple[float, float]
    color_a: tuple[float, float, float]  # texture colours
    color_b: tuple[float, float, float]
    bg_color: tuple[float, float, float]
    bg_field: list[list[list[float]]]  # 4x4x3 smooth colour offsets, bicubically upsampled
    noise_sigma: float
    noise_seed: int  # pixel noise and the speckle texture
    blobs: list[Blob] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    # (angle, offset, colour): hides the part of the disc of 1.2 radii around the object centre that
    # lies beyond `offset` pixels along direction `angle`
    occluder: tuple[float, float, tuple[float, float, float]] | None = None


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in output-pixel units: two ``[S*size, S*size]`` arrays."""
    n = size * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xx, yy = np.meshgrid(c, c, indexing="xy")
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def _window(size: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
    """Supersampled ``(rows, cols)`` slices covering the output-pixel box, or None when it misses."""
    n, s = size * SUPERSAMPLE, SUPERSAMPLE
    c0, c1 = max(0, math.floor(x0 * s)), min(n, math.ceil(x1 * s))
    r0, r1 = max(0, math.floor(y0 * s)), min(n, math.ceil(y1 * s))
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean silhouette in object coordinates (radius 1, centred at the origin)."""
    r2 = u * u + v * v
    if shape == "disc":
        return r2 < 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape == "triangle":
        m = np.ones_like(u, dtype=bool)
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            m &= (u * math.cos(a) + v * math.sin(a)) > -0.55
        return m & (r2 < 1.3)
    if shape == "ring":
        return (r2 < 1.0) & (r2 > 0.55**2)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95))
    if shape == "bars":
        av = np.abs(v)
        return (np.abs(u) < 0.95) & (av > 0.22) & (av < 0.7)
    if shape == "star":
        theta = np.arctan2(v, u)
        t = np.abs(((theta * 5 / (2 * math.pi)) % 1.0) - 0.5) * 2.0  # 0 at the points, 1 between them
        return np.sqrt(r2) < 1.0 - 0.6 * t
    if shape == "ellipse":
        return u * u + (v / 0.5) ** 2 < 1.0
    if shape == "chevron":
        f = v - 0.9 * np.abs(u)
        return (f > -0.55) & (f < 0.0) & (np.abs(u) < 0.95) & (v > -0.9)
    if shape == "crescent":
        return (r2 < 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    raise ValueError(f"unknown shape {shape!r}")


def _square_wave(s: np.ndarray) -> np.ndarray:
    """Soft square wave in [0, 1] with period 1 (steep sine, so edges stay anti-aliased)."""
    return 0.5 + 0.5 * np.clip(3.0 * np.sin(2 * math.pi * s), -1.0, 1.0)


def _texture(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Texture value in [0, 1] at object-centred image coordinates ``x, y`` (output pixels)."""
    ca, sa = math.cos(scene.texture_angle), math.sin(scene.texture_angle)
    xr, yr = x * ca + y * sa, -x * sa + y * ca
    p = scene.period
    px, py = scene.phase
    name = scene.texture
    if name.startswith("stripes"):
        return _square_wave(yr / p + px)
    if name == "checkers":
        a = np.clip(3.0 * np.sin(2 * math.pi * (xr / p + px)), -1, 1)
        b = np.clip(3.0 * np.sin(2 * math.pi * (yr / p + py)), -1, 1)
        return 0.5 + 0.5 * a * b
    if name == "dots":
        fx = (xr / p + px) % 1.0 - 0.5
        fy = (yr / p + py) % 1.0 - 0.5
        return (fx * fx + fy * fy < 0.3**2).astype(np.float32)
    if name == "grid":
        q = 1.25 * p
        fx = np.abs((xr / q + px) % 1.0 - 0.5)
        fy = np.abs((yr / q + py) % 1.0 - 0.5)
        return (np.minimum(fx, fy) < 0.16).astype(np.float32)
    if name == "waves":
        return _square_wave(yr / p + 0.45 * np.sin(2 * math.pi * xr / (3.0 * p)) + px)
    if name == "zigzag":
        q = 2.0 * p
        tri = np.abs((xr / q + py) % 1.0 - 0.5) * 2.0  # triangle wave in [0, 1]
        return _square_wave(yr / p + 1.2 * tri + px)
    if name == "speckle":
        # random cells of 0.4 periods (~2 px) in object-centred coordinates: the pattern moves, rotates
        # and scales with the object, whatever part of it is inside the image
        cell = 0.4 * p
        k = int(math.ceil(1.3 * scene.radius / cell)) + 1
        cells = np.random.default_rng(scene.noise_seed + 1).random((2 * k + 1, 2 * k + 1)) < 0.5
        ix = np.clip(np.floor(xr / cell).astype(np.int64) + k, 0, 2 * k)
        iy = np.clip(np.floor(yr / cell).astype(np.int64) + k, 0, 2 * k)
        return cells[iy, ix].astype(np.float32)
    raise ValueError(f"unknown texture {name!r}")


def _downsample(img: np.ndarray) -> np.ndarray:
    """Box-filter a ``[2H, 2W, C]`` array to ``[H, W, C]`` (the supersampling factor is 2)."""
    return 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])


@functools.lru_cache(maxsize=8)
def _upsample_weights(small: int, n: int) -> np.ndarray:
    """``[n, small]`` bicubic interpolation matrix (PIL's filter); PIL resizes separably, so
    ``W @ field @ W.T`` equals a 2-D PIL bicubic resize of a ``[small, small]`` field."""
    cols = []
    for i in range(small):
        basis = np.zeros((1, small), dtype=np.float32)
        basis[0, i] = 1.0
        cols.append(np.asarray(Image.fromarray(basis, "F").resize((n, 1), Image.Resampling.BICUBIC))[0])
    w = np.stack(cols, axis=1)
    w.flags.writeable = False
    return w


def _upsample_field(small: np.ndarray, n: int) -> np.ndarray:
    """Bicubically upsample a smooth ``[k, k, 3]`` float field to ``[n, n, 3]``."""
    w = _upsample_weights(small.shape[0], n)
    return np.einsum("yi,ijc,xj->yxc", w, small, w, optimize=True).astype(np.float32)


def _composite(canvas: np.ndarray, win: tuple[slice, slice], alpha: np.ndarray, color: np.ndarray) -> None:
    """In place on a window: ``canvas = canvas * (1 - alpha) + color * alpha``.

    ``alpha`` is ``[h, w]``; ``color`` is ``[3]`` or ``[h, w, 3]``."""
    a = alpha[..., None]
    sub = canvas[win]
    sub *= 1.0 - a
    sub += color * a


def render(scene: Scene) -> tuple[np.ndarray, list[float]]:
    """Render a scene. Returns ``(image uint8 [size, size, 3], bbox [x1, y1, x2, y2])`` of the object.

    The box is the tight box of the visible (unoccluded) object silhouette, clipped to the image, in
    pixel units (``x2``/``y2`` exclusive); the full image when nothing of the object is visible.
    Layers are drawn back to front (background field, clutter lines, distractor blobs, the object, the
    occluder: a cap of the disc of 1.2 object radii beyond a line), each only inside its own window.
    """
    size, n = scene.size, scene.size * SUPERSAMPLE
    gx, gy = _grid(size)
    canvas = _upsample_field(np.asarray(scene.bg_field, dtype=np.float32), n)
    canvas += np.asarray(scene.bg_color, dtype=np.float32)

    for line in scene.lines:
        pad = line.width
        win = _window(size, min(line.x0, line.x1) - pad, max(line.x0, line.x1) + pad,
                      min(line.y0, line.y1) - pad, max(line.y0, line.y1) + pad)
        if win is None:
            continue
        x, y = gx[win], gy[win]
        dx, dy = line.x1 - line.x0, line.y1 - line.y0
        length2 = max(dx * dx + dy * dy, 1e-6)
        t = np.clip(((x - line.x0) * dx + (y - line.y0) * dy) / length2, 0.0, 1.0)
        d2 = (x - line.x0 - t * dx) ** 2 + (y - line.y0 - t * dy) ** 2
        alpha = (d2 < (line.width / 2) ** 2).astype(np.float32) * line.alpha
        _composite(canvas, win, alpha, np.asarray(line.color, dtype=np.float32))

    for b in scene.blobs:
        ext = b.radius * (1.0 + b.wobble)
        win = _window(size, b.cx - ext, b.cx + ext, b.cy - ext, b.cy + ext)
        if win is None:
            continue
        ca, sa = math.cos(b.angle), math.sin(b.angle)
        xu, yu = gx[win] - b.cx, gy[win] - b.cy
        u, v = (xu * ca + yu * sa) / b.radius, (-xu * sa + yu * ca) / (b.radius * b.aspect)
        inside = np.sqrt(u * u + v * v) < 1.0 + b.wobble * np.sin(3 * np.arctan2(v, u) + b.wobble_phase)
        color = np.asarray(b.color, dtype=np.float32) + (
            np.clip(u, -1, 1)[..., None] * np.asarray(b.gradient, dtype=np.float32) * 0.5)
        _composite(canvas, win, inside.astype(np.float32), color)

    ext = scene.radius * 1.2  # every silhouette lies within 1.15 radii of its centre
    win = _window(size, scene.cx - ext, scene.cx + ext, scene.cy - ext, scene.cy + ext)
    visible: np.ndarray | None = None
    if win is not None:
        xc, yc = gx[win] - scene.cx, gy[win] - scene.cy
        ca, sa = math.cos(scene.rotation), math.sin(scene.rotation)
        u, v = (xc * ca + yc * sa) / scene.radius, (-xc * sa + yc * ca) / scene.radius
        mask = _shape_mask(scene.shape, u, v)
        t = _texture(scene, xc, yc)[..., None]
        obj = (np.asarray(scene.color_a, dtype=np.float32) * (1.0 - t)
               + np.asarray(scene.color_b, dtype=np.float32) * t)
        _composite(canvas, win, mask.astype(np.float32), obj)
        visible = mask
        if scene.occluder is not None:
            ang, off, occ_color = scene.occluder
            # a cap: the half-plane beyond `off` within 1.2 radii of the centre (covers the silhouette)
            occ = ((xc * math.cos(ang) + yc * math.sin(ang)) > off) & (
                xc * xc + yc * yc < (1.2 * scene.radius) ** 2)
            visible = mask & ~occ
            _composite(canvas, win, occ.astype(np.float32), np.asarray(occ_color, dtype=np.float32))

    img = _downsample(canvas)
    if scene.noise_sigma > 0:
        noise = np.random.default_rng(scene.noise_seed).standard_normal(img.shape, dtype=np.float32)
        img += noise * np.float32(scene.noise_sigma)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    bbox = [0.0, 0.0, float(size), float(size)]
    if win is not None and visible is not None and visible.any():
        ys, xs = np.nonzero(visible)
        r0, c0 = win[0].start, win[1].start
        s = SUPERSAMPLE
        bbox = [float((xs.min() + c0) // s), float((ys.min() + r0) // s),
                float((xs.max() + c0) // s + 1), float((ys.max() + r0) // s + 1)]
    return out, bbox


# ----------------------------------------------------------------------------------------------------
# sampling


def _luma(c: tuple[float, float, float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _random_color(rng: np.random.Generator, s_range: tuple[float, float] = (0.25, 1.0),
                  v_range: tuple[float, float] = (0.15, 1.0)) -> tuple[float, float, float]:
    s_lo, s_hi = min(s_range[0], MAX_SATURATION), min(s_range[1], MAX_SATURATION)
    h, s, v = float(rng.random()), float(rng.uniform(s_lo, s_hi)), float(rng.uniform(*v_range))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (r, g, b)


def _dist(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))


def _object_colors(rng: np.random.Generator) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Two texture colours with a clear luminance difference (so textures survive greyscale)."""
    while True:
        a, b = _random_color(rng), _random_color(rng)
        if abs(_luma(a) - _luma(b)) >= 0.3:
            return a, b


def _texture_angle(texture: str, rng: np.random.Generator) -> float:
    base = {"stripes0": 0.0, "stripes45": 45.0, "stripes90": 90.0, "stripes135": 135.0}.get(texture, 0.0)
    return math.radians(base + rng.uniform(-8.0, 8.0))


def sample_scene(rng: np.random.Generator, pair: tuple[str, str], size: int) -> Scene:
    """Draw every nuisance of one image of class ``pair = (shape, texture)``."""
    shape, texture = pair
    color_a, color_b = _object_colors(rng)
    while True:
        bg = _random_color(rng, (0.0, 1.0), (0.1, 1.0))
        if min(_dist(bg, color_a), _dist(bg, color_b)) > 0.25:
            break
    radius = size * rng.uniform(0.22, 0.38)
    margin = radius * 0.8
    cx, cy = rng.uniform(margin, size - margin, size=2)
    blobs = []
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        blobs.append(Blob(
            cx=float(rng.uniform(0, size)), cy=float(rng.uniform(0, size)),
            radius=float(size * rng.uniform(0.08, 0.2)), aspect=float(rng.uniform(0.5, 1.0)),
            angle=float(rng.uniform(0, math.pi)), wobble=float(rng.uniform(0.0, 0.25)),
            wobble_phase=float(rng.uniform(0, 2 * math.pi)), color=_random_color(rng),
            gradient=tuple(float(g) for g in rng.uniform(-0.3, 0.3, size=3)),  # type: ignore[arg-type]
        ))
    lines = []
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = (float(c) for c in rng.uniform(-0.1 * size, 1.1 * size, size=4))
        lines.append(Line(x0, y0, x1, y1, width=float(rng.uniform(0.8, 2.0)), color=_random_color(rng),
                          alpha=float(rng.uniform(0.3, 0.7))))
    return Scene(
        size=size, shape=shape, texture=texture, cx=float(cx), cy=float(cy), radius=float(radius),
        rotation=float(rng.uniform(0, 2 * math.pi)), texture_angle=_texture_angle(texture, rng),
        period=float(rng.uniform(4.0, 6.0)), phase=(float(rng.random()), float(rng.random())),
        color_a=color_a, color_b=color_b, bg_color=bg,
        bg_field=rng.uniform(-0.15, 0.15, size=(4, 4, 3)).tolist(),
        noise_sigma=float(rng.uniform(0.0, 0.04)), noise_seed=int(rng.integers(2**31)),
        blobs=blobs, lines=lines,
    )


def _rng(seed: int, stream: int, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, label, index]))


def render_sample(label: int, index: int, *, split: str = "train", seed: int = 0, size: int = 96,
                  num_classes: int = 10) -> Image.Image:
    """Image ``index`` of class ``label`` of a split: a pure function of its arguments."""
    stream = {"train": _STREAM_TRAIN, "val": _STREAM_VAL}.get(split)
    if stream is None:
        raise ValueError(f"split {split!r} is not 'train' or 'val'")
    pair = class_pairs(num_classes)[label]
    arr, _ = render(sample_scene(_rng(seed, stream, label, index), pair, size))
    return Image.fromarray(arr, "RGB")


# ----------------------------------------------------------------------------------------------------
# writing folders atomically


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. The defaults are the embedded dataset (3000 train + 600 val images)."""

    num_classes: int = 10
    train_per_class: int = 300
    val_per_class: int = 60
    image_size: int = 96
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes={self.num_classes} must be in [1, {MAX_CLASSES}]")
        if self.train_per_class < 1:
            raise ValueError(f"train_per_class={self.train_per_class} must be >= 1")
        if self.val_per_class < 1:
            raise ValueError(f"val_per_class={self.val_per_class} must be >= 1")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size} must be >= 32")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path``, so concurrent processes generate once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the result consistent
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(root: Path) -> bool:
    return (root / COMPLETE_MARKER).is_file()


def _save_jpeg(arr: np.ndarray | Image.Image, path: Path) -> None:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr, "RGB")
    img.save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)


def _atomic_build(root: Path, identity: dict[str, Any], build: Callable[[Path], dict[str, Any]],
                  overwrite: bool, what: str) -> bool:
    """Make ``root`` hold the output of ``build`` for ``identity``; True when it was (re)generated.

    ``build(tmp)`` fills a temporary sibling folder and returns the extra fields of its ``meta.json``;
    ``meta.json`` (``identity`` + extras) and the ``.complete`` marker are written last, then the folder
    is renamed to ``root``. A complete ``root`` with the same identity is reused; a complete one with
    another identity is an error unless ``overwrite``. An incomplete one (no marker) is replaced when it
    is empty or was written by this generator, and is an error otherwise (it might be the user's data).
    """
    from fastdinov2.data.datasets import DataError

    root = Path(root)
    with _lock(root.parent / f".{root.name}.lock"):
        if root.exists():
            if not root.is_dir():
                raise DataError(f"{root} exists and is not a folder; cannot write the {what} there")
            meta = _read_meta(root)
            if _is_complete(root) and meta is not None:
                stored = {k: meta.get(k) for k in identity}
                if stored == identity:
                    return False
                if not overwrite:
                    diff = ", ".join(f"{k}: {stored[k]!r} != {identity[k]!r}" for k in identity
                                     if stored[k] != identity[k])
                    raise DataError(f"{root} already holds a different {what} ({diff}); choose another "
                                    "folder, or pass --overwrite (overwrite=True in Python) to replace it")
            elif any(root.iterdir()) and (meta is None or meta.get("generator") != GENERATOR):
                raise DataError(f"{root} exists, is not empty and holds no {what} written by {GENERATOR}; "
                                "refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
            extras = build(tmp)
            meta = {"generator": GENERATOR, **identity, **extras}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if root.exists():
                shutil.rmtree(root)
            try:
                os.rename(tmp, root)
            except OSError:
                # another host (no shared lock) finished first: keep its identical result
                meta = _read_meta(root)
                same = meta is not None and all(meta.get(k) == v for k, v in identity.items())
                if not (_is_complete(root) and same):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def _run_jobs(fn: Callable[[Any], str], jobs: list[Any], num_workers: int, log: Log) -> None:
    """Run ``fn(job)`` for every job, in ``num_workers`` spawned processes when > 0; log each result.

    Each job writes its own files, so the outcome does not depend on the order or the worker count.
    """
    if num_workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            log(fn(job))
        return
    ctx = multiprocessing.get_context("spawn")  # safe even when the caller has started CUDA or threads
    with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), mp_context=ctx) as pool:
        for msg in pool.map(fn, jobs):
            log(msg)


def _class_split_job(job: tuple[Path, SyntheticSpec, str, int, int]) -> str:
    """Render and save every image of one (split, class) of a :class:`SyntheticSpec`."""
    tmp, spec, split, per_class, label = job
    stream = _STREAM_TRAIN if split == "train" else _STREAM_VAL
    name, pair = class_names(spec.num_classes)[label], class_pairs(spec.num_classes)[label]
    d = tmp / split / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        arr, _ = render(sample_scene(_rng(spec.seed, stream, label, i), pair, spec.image_size))
        _save_jpeg(arr, d / f"{i:05d}.jpg")
    return f"  {split}/{name}: {per_class} images"


def write_synthetic_dataset(root: str | os.PathLike[str], spec: SyntheticSpec | None = None, *,
                            overwrite: bool = False, num_workers: int = 0, log: Log = _quiet) -> Path:
    """Write (once) the synthetic classification dataset ``root/{train,val}/<class>/<n>.jpg``.

    ``num_workers > 0`` renders in that many spawned processes (same bytes as serial).
    Reuses a complete dataset of the same spec; raises :class:`DataError` when ``root`` holds a
    different one (unless ``overwrite``) or holds something else. Returns ``root``.
    """
    spec = spec or SyntheticSpec()
    spec.validate()
    root = Path(root)
    names = class_names(spec.num_classes)
    identity = {"kind": "classification", "generator_version": GENERATOR_VERSION, **asdict(spec)}

    def build(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        jobs = [(tmp, spec, split, per_class, label)
                for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class))
                for label in range(spec.num_classes)]
        _run_jobs(_class_split_job, jobs, num_workers, _quiet)
        log(f"  rendered {len(names) * (spec.train_per_class + spec.val_per_class)} images "
            f"in {time.perf_counter() - t0:.1f} s")
        return {
            "counts": {"train": spec.train_per_class * spec.num_classes,
                       "val": spec.val_per_class * spec.num_classes},
            "classes": describe(spec.num_classes),
            "jpeg_quality": JPEG_QUALITY,
            "texture_period_px": [4.0, 6.0],
            "object_radius_fraction": [0.22, 0.38],
        }

    if _atomic_build(root, identity, build, overwrite, "synthetic dataset"):
        log(f"wrote synthetic dataset to {root}")
    else:
        log(f"reusing synthetic dataset at {root}")
    return root


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FASTDINOV2_CACHE``, else ``~/.cache/fastdinov2``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastdinov2"


def default_dataset_root(cache_dir: str | os.PathLike[str] | None = None, *, corrupted: bool = False,
                         retrieval: bool = False, num_workers: int = 0, log: Log = _quiet) -> Path:
    """The embedded dataset's folder ``<cache>/synthetic-v2``, generated on first use (~10-15 s).

    ``corrupted``/``retrieval`` also make sure :func:`write_corrupted_set` / :func:`write_retrieval_set`
    (default arguments) were written inside it. Safe to call from several processes at once (a file
    lock serialises them; the others then reuse the result).
    """
    root = default_cache_dir(cache_dir) / DEFAULT_DIRNAME
    write_synthetic_dataset(root, SyntheticSpec(), num_workers=num_workers, log=log)
    if corrupted:
        write_corrupted_set(root, num_workers=num_workers, log=log)
    if retrieval:
        write_retrieval_set(root, log=log)
    return root


# ----------------------------------------------------------------------------------------------------
# ImageNet-C style corrupted copy of the val split

#: Corruptions whose parameters are in pixels and were tuned for 224 px ImageNet-C images: on smaller
#: images they are applied at 224 px (bicubic upsampling) and the result is brought back to the stored
#: size (antialiased bicubic), so the corruption covers the same fraction of the image as in ImageNet-C.
#: All other corruptions are per-pixel or scale-free (noise, brightness, contrast, saturate, JPEG,
#: pixelate, elastic and zoom blur) and are applied at the stored size, which keeps their per-pixel
#: statistics (downscaling would average the noise away).
REFERENCE_SCALE_CORRUPTIONS = frozenset(
    {"defocus_blur", "glass_blur", "motion_blur", "gaussian_blur", "snow", "frost", "fog", "spatter"}
)
CORRUPTION_REFERENCE_SIZE = 224


def corruption_names() -> list[str]:
    """The 19 ImageNet-C corruption names (15 standard + 4 extra), in ``imagecorruptions`` order."""
    from imagecorruptions import get_corruption_names

    return list(get_corruption_names("all"))


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """``imagecorruptions`` draws from numpy's global generator: seed it for one call, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def apply_corruption(img: np.ndarray, name: str, severity: int, seed: int,
                     reference_size: int = CORRUPTION_REFERENCE_SIZE) -> np.ndarray:
    """Corrupt one ``uint8 [H, W, 3]`` image deterministically; same shape out.

    Pixel-unit corruptions (:data:`REFERENCE_SCALE_CORRUPTIONS`) run at ``reference_size`` when the
    image is smaller than that (see there).
    """
    from imagecorruptions import corrupt

    if name not in corruption_names():
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(corruption_names())}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity {severity} must be in 1..5")
    h, w = img.shape[:2]
    rescale = name in REFERENCE_SCALE_CORRUPTIONS and min(h, w) < reference_size
    src = img
    if rescale:
        f = reference_size / min(h, w)
        src = np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC))
    kwargs: dict[str, Any] = {"seed": seed} if name in ("glass_blur", "impulse_noise") else {}
    with _global_numpy_seed(seed):
        out = np.asarray(corrupt(src, severity=severity, corruption_name=name, **kwargs)).astype(np.uint8)
    if rescale:
        out = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.BICUBIC))
    if out.shape != img.shape:
        raise RuntimeError(f"corruption {name} changed the image shape {img.shape} -> {out.shape}")
    return out


_CorruptionJob = tuple[Path, str, int, tuple[int, ...], list[tuple[str, str, np.ndarray]], int]


def _corruption_job(job: _CorruptionJob) -> str:
    """Write every severity of one corruption type for all source images ``(class, stem, uint8 HxWx3)``."""
    tmp, name, type_index, severities, images, seed = job
    for si, (cls, stem, img) in enumerate(images):
        for sev in severities:
            d = tmp / name / str(sev) / cls
            d.mkdir(parents=True, exist_ok=True)
            s = int(np.random.SeedSequence([seed, _STREAM_CORRUPT, type_index, sev, si]).generate_state(1)[0])
            _save_jpeg(apply_corruption(img, name, sev, s), d / f"{stem}.jpg")
    return f"  {name}: {len(severities)} severities x {len(images)} images"


def write_corrupted_set(root: str | os.PathLike[str], *, per_class: int = 5, seed: int = 0,
                        corruptions: list[str] | None = None, severities: tuple[int, ...] = (1, 2, 3, 4, 5),
                        overwrite: bool = False, num_workers: int = 0, log: Log = _quiet) -> Path:
    """Write ``root/corrupted/<type>/<severity>/<class>/<name>.jpg`` (the Hendrycks ImageNet-C layout).

    The sources are the first ``per_class`` images (sorted) of every class of ``root/val``. Returns the
    ``root/corrupted`` folder. Reused when complete with the same parameters. ``num_workers > 0``
    corrupts in that many spawned processes (one corruption type per job; same bytes as serial).
    """
    from fastdinov2.data.datasets import load_image, scan_class_folders

    root = Path(root)
    names = list(corruptions) if corruptions is not None else corruption_names()
    unknown = [n for n in names if n not in corruption_names()]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; known: {', '.join(corruption_names())}")
    if per_class < 1:
        raise ValueError(f"per_class={per_class} must be >= 1")
    records, classes = scan_class_folders(root / "val")
    sources: list[tuple[str, Path]] = []
    for label, cls in enumerate(classes):
        sources += [(cls, r.path) for r in records if r.label == label][:per_class]
    out = root / "corrupted"
    identity = {"kind": "corrupted", "generator_version": GENERATOR_VERSION, "per_class": per_class,
                "seed": seed, "corruptions": names, "severities": list(severities),
                "reference_size": CORRUPTION_REFERENCE_SIZE}

    def build(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        all_names = corruption_names()  # seeds use the global type index: a subset gives the same bytes
        images = [(cls, path.stem, np.asarray(load_image(path))) for cls, path in sources]
        jobs = [(tmp, name, all_names.index(name), tuple(severities), images, seed) for name in names]
        _run_jobs(_corruption_job, jobs, num_workers, log)
        n = len(names) * len(severities) * len(sources)
        log(f"  corrupted {n} images in {time.perf_counter() - t0:.1f} s")
        return {"classes": classes, "images_per_corruption": len(sources),
                "rescaled_corruptions": sorted(REFERENCE_SCALE_CORRUPTIONS & set(names))}

    if _atomic_build(out, identity, build, overwrite, "corrupted set"):
        log(f"wrote corrupted val set to {out}")
    else:
        log(f"reusing corrupted val set at {out}")
    return out


# ----------------------------------------------------------------------------------------------------
# revisited-Oxford style instance retrieval set


@dataclass(frozen=True)
class RetrievalSpec:
    """How many instances (queries) and database images of each kind."""

    name: str = "synth5k"
    num_instances: int = 20
    easy_per_query: int = 3
    hard_per_query: int = 3
    junk_per_query: int = 2
    distractors: int = 40
    image_size: int = 96
    seed: int = 0


Occluder = tuple[float, float, tuple[float, float, float]]


def _occluder_for(scene: Scene, fraction: float, rng: np.random.Generator) -> Occluder:
    """An occluder (see :class:`Scene`) hiding ``fraction`` of the object's silhouette (up to sampling)."""
    gx, gy = _grid(scene.size)
    ca, sa = math.cos(scene.rotation), math.sin(scene.rotation)
    xc, yc = gx - scene.cx, gy - scene.cy
    mask = _shape_mask(scene.shape, (xc * ca + yc * sa) / scene.radius, (-xc * sa + yc * ca) / scene.radius)
    ang = float(rng.uniform(0, 2 * math.pi))
    proj = (xc * math.cos(ang) + yc * math.sin(ang))[mask]
    off = float(np.quantile(proj, 1.0 - fraction)) if proj.size else 0.0
    return ang, off, _random_color(rng)


def _variant(base: Scene, rng: np.random.Generator, pair: tuple[str, str], kind: str) -> Scene:
    """The instance of ``base`` in a new scene (new background, clutter, distractors, placement).

    easy: scale x0.9-1.1, rotation +-8 deg, same colours. hard: scale x0.6-0.75 or x1.3-1.5, rotation
    20-45 deg, colours scaled by 0.7-1.3, 20-40% of the silhouette occluded. junk: 70-85% occluded.
    """
    fresh = sample_scene(rng, pair, base.size)
    if kind == "easy":
        scale, drot, gain, occ = rng.uniform(0.9, 1.1), math.radians(rng.uniform(-8, 8)), 1.0, 0.0
    elif kind == "hard":
        scale = rng.uniform(0.6, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.5)
        drot = math.radians(rng.uniform(20, 45)) * (1 if rng.random() < 0.5 else -1)
        gain, occ = rng.uniform(0.7, 1.3), rng.uniform(0.2, 0.4)
    elif kind == "junk":
        scale, drot, gain = rng.uniform(0.9, 1.1), math.radians(rng.uniform(-8, 8)), 1.0
        occ = rng.uniform(0.7, 0.85)
    else:
        raise ValueError(kind)
    radius = base.radius * scale
    margin = min(radius * 0.8, base.size / 2)
    cx, cy = rng.uniform(margin, base.size - margin, size=2)

    def shade(c: tuple[float, float, float]) -> tuple[float, float, float]:
        return (min(c[0] * gain, 1.0), min(c[1] * gain, 1.0), min(c[2] * gain, 1.0))

    scene = replace(fresh, cx=float(cx), cy=float(cy), radius=float(radius),
                    rotation=base.rotation + drot, texture_angle=base.texture_angle + drot,
                    period=base.period * scale, phase=base.phase, color_a=shade(base.color_a),
                    color_b=shade(base.color_b), noise_seed=fresh.noise_seed)
    if base.texture == "speckle":  # the speckle pattern is the instance's: keep its seed (noise follows)
        scene = replace(scene, noise_seed=base.noise_seed)
    if occ > 0:
        scene = replace(scene, occluder=_occluder_for(scene, float(occ), rng))
    return scene


def write_retrieval_set(root: str | os.PathLike[str], spec: RetrievalSpec | None = None, *,
                        overwrite: bool = False, log: Log = _quiet) -> Path:
    """Write ``root/retrieval/<name>/jpg/*.jpg`` and ``root/retrieval/<name>/gnd_<name>.pkl``.

    Each query is one object instance (a class's shape and texture with its own colours, texture
    period and phase); the database holds, per query, ``easy`` views (small changes), ``hard`` views
    (large scale change and rotation, colour change, partial occlusion) and ``junk`` views (70-85%
    occluded), plus ``distractors`` images of other instances. The pickle (protocol 4, plain types) is
    ``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard":
    [...], "junk": [...]}, ...]}`` with indices into ``imlist``; names carry no extension (``.jpg``).
    Returns the ``root/retrieval/<name>`` folder.
    """
    spec = spec or RetrievalSpec()
    if spec.image_size < 32:
        raise ValueError(f"image_size={spec.image_size} must be >= 32")
    if spec.num_instances < 1:
        raise ValueError(f"num_instances={spec.num_instances} must be >= 1")
    out = Path(root) / "retrieval" / spec.name
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = class_pairs(10)
    identity = {"kind": "retrieval", "generator_version": GENERATOR_VERSION, **asdict(spec)}

    def build(tmp: Path) -> dict[str, Any]:
        jpg = tmp / "jpg"
        jpg.mkdir()
        db: list[tuple[str, Scene]] = []  # (role, scene) before shuffling
        roles: list[tuple[int, str]] = []  # (query index or -1, kind)
        queries: list[Scene] = []
        for q in range(spec.num_instances):
            rng = _rng(spec.seed, _STREAM_RETRIEVAL, 0, q)
            pair = pairs[q % len(pairs)]
            base = sample_scene(rng, pair, spec.image_size)
            centre = rng.uniform(0.4, 0.6, size=2) * spec.image_size
            base = replace(base, radius=spec.image_size * rng.uniform(0.28, 0.34), cx=float(centre[0]),
                           cy=float(centre[1]))
            queries.append(base)
            for kind, count in (("easy", spec.easy_per_query), ("hard", spec.hard_per_query),
                                ("junk", spec.junk_per_query)):
                for _ in range(count):
                    db.append((kind, _variant(base, rng, pair, kind)))
                    roles.append((q, kind))
        rng = _rng(spec.seed, _STREAM_RETRIEVAL, 1, 0)  # distractors and the shuffle
        for _ in range(spec.distractors):
            pair = pairs[int(rng.integers(len(pairs)))]
            db.append(("distractor", sample_scene(rng, pair, spec.image_size)))
            roles.append((-1, "distractor"))
        order = rng.permutation(len(db))
        imlist = [f"db_{i:05d}" for i in range(len(db))]
        gnd: list[dict[str, Any]] = [{"bbx": [], "easy": [], "hard": [], "junk": []} for _ in queries]
        for new_index, old_index in enumerate(order):
            _, scene = db[old_index]
            arr, _ = render(scene)
            _save_jpeg(arr, jpg / f"{imlist[new_index]}.jpg")
            q, kind = roles[old_index]
            if q >= 0:
                gnd[q][kind].append(new_index)
        qimlist = [f"query_{q:03d}" for q in range(len(queries))]
        for q, scene in enumerate(queries):
            arr, bbox = render(scene)
            _save_jpeg(arr, jpg / f"{qimlist[q]}.jpg")
            gnd[q]["bbx"] = [float(v) for v in bbox]
            for kind in ("easy", "hard", "junk"):
                gnd[q][kind] = sorted(int(i) for i in gnd[q][kind])
        with open(tmp / f"gnd_{spec.name}.pkl", "wb") as fh:
            pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh, protocol=4)
        return {"num_database": len(imlist), "num_queries": len(qimlist)}

    if _atomic_build(out, identity, build, overwrite, "retrieval set"):
        log(f"wrote retrieval set {spec.name} to {out}")
    else:
        log(f"reusing retrieval set at {out}")
    return out
