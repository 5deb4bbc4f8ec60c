"""Low-pass methods: how a DINOv2 crop box becomes a crop at a curriculum stage's (smaller) size.

All three take the same crop box (drawn in the coordinates of the full-resolution image) and return
uint8 crops ``[n, 3, S, S]`` at the stage size ``S``:

* ``resize`` (the paper): the box is resized bicubically (antialiased) straight to ``S``. When ``S`` is
  the full crop size this is plain DINOv2.
* ``fourier`` (EfficientTrain style): the box is resized to the *full* crop size ``F``, then only the
  central ``S x S`` block of its 2-D FFT (the lowest frequencies) is kept and inverse-transformed at
  size ``S`` (real FFT, so the output is real); the result is scaled by ``S^2 / F^2`` so intensities
  are preserved, and clamped to [0, 255]. An ideal (brick-wall) low-pass: exactly the frequencies below
  ``S / 2`` cycles per crop pass, unchanged; sharp edges ring (Gibbs), hence the clamp.
* ``jpeg_draft``: the JPEG is decoded at reduced scale in the DCT domain (Pillow ``draft``, 1/2, 1/4 or
  1/8): the largest power-of-two reduction ``1/2^k`` that is still >= ``S / F`` (so a crop box spanning at
  least ``F`` original pixels, as every box of an ImageNet-size image does, still has ``S`` drafted pixels; a
  smaller box, on a small image, is upsampled: a stronger low-pass than ``resize``). The box is mapped to the
  drafted image and resized bicubically to ``S``. Decoding is the cheapest of the three; the DCT-domain
  downscale is a slightly different filter than bicubic. Non-JPEG files (PNG, WebP, ...) are decoded at
  full size and then behave exactly like ``resize``.

Decoding: a JPEG decoded at full size (``resize``, ``fourier``, and ``jpeg_draft`` when no reduction applies)
goes through torchcodec's libjpeg-turbo decoder straight into a uint8 tensor, pixel-identical to Pillow and
0.3-0.6 ms cheaper per 500x375 sample (no Pillow image to copy out of; the tensor is already
channels-last, as the resize wants it). Pillow decodes everything
else: other formats, reduced-scale JPEGs (``draft``), JPEGs whose EXIF orientation is not 1 (torchcodec
would rotate them; Pillow, torchvision's loader and DINOv2 keep the stored orientation), any file
torchcodec refuses (so a bad file's error is Pillow's, naming the reason), and every JPEG when torchcodec
cannot be loaded (e.g. built for another torch; a warning says so once per process).

Resampling (all methods): each box is cut out of the decoded image, held once as a uint8 channels-last
tensor, and resized by ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``: the filter
of Pillow's antialiased bicubic (a = -0.5, support widened by the reduction factor) applied as
torchvision's ``RandomResizedCrop`` does it (crop, then resize: no pixels from outside the box), within
+-1 grey level of Pillow's ``crop().resize()`` and ~2.7x cheaper on one core. On a drafted JPEG
(``scale = 2^k``) a box's edges are divided by the scale and rounded half-to-even to the drafted grid
(:func:`decoded_boxes`; at most ``scale / 2`` full-resolution pixels per edge). The crops of one call
are written into one preallocated uint8 buffer, mirrored there when asked (``flips``).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastdinov2.data.datasets import ORIGINAL_SIZE_KEY, BadImageError, load_image

MAX_DRAFT_SHIFT = 3  # libjpeg scales by 1/2, 1/4, 1/8
_JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker + the first marker's prefix
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image and how its pixel grid relates to the full-resolution image.

    ``full_size`` = (W, H) of the full-resolution image (the coordinates crop boxes are drawn in);
    a full-resolution coordinate ``x`` is at ``x / scale`` in the decoded image. The pixels are held as
    a PIL image (``image``, as decoded) or as a writable uint8 ``[H, W, 3]`` array (``pixels``, e.g.
    after in-place noise patching); when both are given they must hold the same pixels.
    """

    image: Image.Image | None
    full_size: tuple[int, int]
    scale: int = 1
    pixels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.pixels is None:
            raise ValueError("DecodedImage needs an image or pixels")
        if self.pixels is not None and (
            self.pixels.dtype != np.uint8 or self.pixels.ndim != 3 or self.pixels.shape[2] != 3
        ):
            raise ValueError(f"pixels must be uint8 [H, W, 3], got {self.pixels.dtype} {self.pixels.shape}")

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the decoded pixel grid."""
        if self.pixels is not None:
            return int(self.pixels.shape[1]), int(self.pixels.shape[0])
        assert self.image is not None
        return self.image.size

    def array(self) -> np.ndarray:
        """The pixels as a uint8 ``[H, W, 3]`` array (``pixels`` itself, or a writable copy of ``image``)."""
        if self.pixels is not None:
            return self.pixels
        assert self.image is not None
        return np.array(self.image, dtype=np.uint8)

    def with_pixels(self) -> DecodedImage:
        """This image with its pixels as a writable array (for in-place edits); ``image`` is dropped."""
        return DecodedImage(None, self.full_size, self.scale, self.array())


def draft_shift(ratio: float) -> int:
    """k such that ``1/2^k`` is the largest power-of-two reduction >= ``ratio`` (capped at 1/8)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"stage/full size ratio must be in (0, 1], got {ratio}")
    k = math.floor(math.log2(1.0 / ratio) + 1e-9)
    return max(0, min(MAX_DRAFT_SHIFT, k))


@functools.cache
def jpeg_decoder() -> Callable[[bytes], torch.Tensor] | None:
    """torchcodec's CPU JPEG decoder (bytes -> uint8 [3, H, W] RGB), or None when it cannot be loaded."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception as exc:  # not installed, or its native library does not match this torch
        warnings.warn(f"torchcodec cannot be loaded ({type(exc).__name__}: {exc}); JPEGs are decoded with "
                      "Pillow instead (0.3-0.6 ms more per ImageNet-size image)", RuntimeWarning, stacklevel=2)
        return None
    return functools.partial(decode_jpeg, mode="RGB")


def _exif_rotated(data: bytes) -> bool:
    """Whether a JPEG's EXIF orientation asks for a rotation or mirror (tag present and not 1)."""
    if b"Exif" not in data[:65536]:  # EXIF lives in an APP1 segment near the start of the file
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only
            return im.getexif().get(_EXIF_ORIENTATION, 1) != 1
    except Exception:
        return True  # unreadable header: leave the file to Pillow, which names the problem


def decode_full(path: Path | str) -> DecodedImage:
    """Decode ``path`` at full resolution (module docstring, "Decoding"). Raises BadImageError."""
    decoder = jpeg_decoder()
    if decoder is not None:
        try:
            with open(path, "rb") as f:  # the rest of the file only for a JPEG: Pillow reads any other itself
                data = f.read(len(_JPEG_SOI))
                data = data + f.read() if data == _JPEG_SOI else b""
        except OSError:
            data = b""  # Pillow reports the error
        if data and not _exif_rotated(data):
            try:
                chw = decoder(data)
            except Exception:  # corrupt or truncated: Pillow decodes again and names the reason
                chw = None
            if chw is not None and chw.shape[1] * chw.shape[2] <= (Image.MAX_IMAGE_PIXELS or 1 << 62):
                pixels = chw.permute(1, 2, 0).contiguous().numpy()  # [H, W, 3], writable
                return DecodedImage(None, (int(pixels.shape[1]), int(pixels.shape[0])), 1, pixels)
    image = load_image(path)
    return DecodedImage(image, image.size, 1)


def decode_image(path: Path | str, lowpass: str, ratio: float = 1.0) -> DecodedImage:
    """Decode ``path`` for a stage; ``jpeg_draft`` decodes JPEGs at reduced scale (see module docstring).

    ``ratio`` = stage size / full size (the largest over global and local crops). Raises BadImageError.
    """
    if lowpass != "jpeg_draft":
        return decode_full(path)
    k = draft_shift(ratio)
    try:
        with Image.open(path) as probe:  # header only: size and format
            full_w, full_h = probe.size
            is_jpeg = probe.format == "JPEG"
    except Exception as exc:  # any header failure makes it a bad image
        raise BadImageError(path, f"cannot read image header: {exc}") from exc
    if k == 0 or not is_jpeg:
        return decode_full(path)
    # Pillow picks the largest of 1/8, 1/4, 1/2 keeping the result >= the request: ask for exactly 1/2^k
    image = load_image(path, draft_size=(max(1, full_w >> k), max(1, full_h >> k)))
    full_w, full_h = image.info.get(ORIGINAL_SIZE_KEY, (full_w, full_h))
    scale = 2 ** round(math.log2(full_w / image.size[0]))
    return DecodedImage(image, (full_w, full_h), scale)


def _check_flips(flips: np.ndarray | None, n: int) -> np.ndarray:
    if flips is None:
        return np.zeros(n, dtype=bool)
    flips = np.asarray(flips, dtype=bool).reshape(-1)
    if flips.shape[0] != n:
        raise ValueError(f"{n} boxes but {flips.shape[0]} flip flags")
    return flips


def decoded_boxes(boxes: np.ndarray, scale: int, size: tuple[int, int]) -> np.ndarray:
    """Full-resolution boxes ``(top, left, height, width)`` -> int64 boxes on a ``1/scale`` decoded grid.

    Each edge is divided by ``scale`` and rounded half-to-even (so no direction is favoured), then
    clipped to the decoded ``size = (W, H)``; every box keeps at least one pixel. ``scale = 1`` only clips.
    """
    return np.asarray(_decoded_rows(boxes, scale, size), dtype=np.int64).reshape(-1, 4)


def _decoded_rows(boxes: np.ndarray, scale: int, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """:func:`decoded_boxes` as a list of int tuples (plain Python: a sample has only a few boxes)."""
    w_img, h_img = size
    rows = []
    for top, left, height, width in np.asarray(boxes).reshape(-1, 4).tolist():
        bottom, right = top + height, left + width
        if scale != 1:  # round() is half-to-even
            top, left, bottom, right = (round(v / scale) for v in (top, left, bottom, right))
        top, left = min(max(top, 0), h_img - 1), min(max(left, 0), w_img - 1)
        bottom, right = min(max(bottom, top + 1), h_img), min(max(right, left + 1), w_img)
        rows.append((top, left, bottom - top, right - left))
    return rows


def resize_crops(
    decoded: DecodedImage, boxes: np.ndarray, size: int, flips: np.ndarray | None = None
) -> torch.Tensor:
    """Crop each box (full-resolution coords, rows ``(top, left, height, width)``) and resize to ``size``.

    Antialiased bicubic (see the module docstring); on a drafted image (``scale > 1``) the box is first
    mapped to the decoded grid by :func:`decoded_boxes`. Crop ``i`` is mirrored horizontally where
    ``flips[i]``. Returns uint8 [n, 3, size, size].
    """
    rows = _decoded_rows(boxes, decoded.scale, decoded.size)
    flips = _check_flips(flips, len(rows))
    out = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    if not rows:
        return out
    src = torch.from_numpy(np.ascontiguousarray(decoded.array())).permute(2, 0, 1).unsqueeze(0)  # channels-last
    for i, (top, left, height, width) in enumerate(rows):
        region = src[..., top:top + height, left:left + width]
        crop = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)[0]
        out[i].copy_(crop.flip(-1) if flips[i] else crop)
    return out


def fourier_lowpass(x: torch.Tensor, size: int) -> torch.Tensor:
    """Keep the lowest ``size x size`` frequencies of x's 2-D spectrum and invert at ``size``.

    x: real [..., F, F] -> float32 [..., size, size] (intensity-preserving, not clamped). Kept per axis:
    the frequencies ``-(size // 2) .. (size - 1) // 2`` cycles per crop; for even ``size`` the
    Nyquist bin (+-size/2) contributes its real (Hermitian-symmetric) part, so the output is real.
    Uses the real FFT (half spectrum), which is ~10x cheaper on the CPU than a complex FFT.
    """
    full = x.shape[-1]
    if x.shape[-2] != full or not 0 < size <= full:
        raise ValueError(f"fourier_lowpass needs a square input >= size, got {tuple(x.shape)} -> {size}")
    if size == full:
        return x.to(torch.float32, copy=True)
    spec = torch.fft.rfft2(x.to(torch.float32))  # [..., F, F//2 + 1]
    neg = size // 2  # negative row frequencies kept: -neg .. -1
    rows = torch.cat([spec[..., : size - neg, :], spec[..., full - neg:, :]], dim=-2)
    block = rows[..., : size // 2 + 1]
    out = torch.fft.irfft2(block, s=(size, size))
    return out * (size * size) / (full * full)


def fourier_crops(
    decoded: DecodedImage, boxes: np.ndarray, size: int, full_size: int, flips: np.ndarray | None = None
) -> torch.Tensor:
    """Boxes resized to ``full_size`` then Fourier low-passed to ``size`` (then mirrored where ``flips``).

    Returns uint8 [n, 3, size, size].
    """
    full = resize_crops(decoded, boxes, full_size)
    if size == full_size or full.shape[0] == 0:
        low = full if size == full_size else torch.empty(0, 3, size, size, dtype=torch.uint8)
    else:
        low = fourier_lowpass(full.float(), size).round_().clamp_(0, 255).to(torch.uint8)
    flips = _check_flips(flips, low.shape[0])
    if flips.any():
        sel = torch.from_numpy(flips)
        low[sel] = low[sel].flip(-1)
    return low


def render_crops(
    decoded: DecodedImage,
    boxes: np.ndarray,
    size: int,
    full_size: int,
    lowpass: str,
    flips: np.ndarray | None = None,
) -> torch.Tensor:
    """Render crop boxes at the stage size with the stage's low-pass method -> uint8 [n, 3, size, size].

    Crop ``i`` is mirrored horizontally where ``flips[i]`` (after the low-pass).
    """
    if lowpass in ("resize", "jpeg_draft"):  # jpeg_draft's reduction already happened in decode_image
        return resize_crops(decoded, boxes, size, flips)
    if lowpass == "fourier":
        return fourier_crops(decoded, boxes, size, full_size, flips)
    raise ValueError(f"lowpass must be resize, fourier or jpeg_draft, got {lowpass!r}")
