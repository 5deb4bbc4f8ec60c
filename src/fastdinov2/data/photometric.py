"""DINOv2 photometric augmentation as one batched torch function with per-crop parameters.

DINOv2 applies, per crop: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
random order) with p=0.8, grayscale with p=0.2, Gaussian blur (p=1.0 on global crop 1, 0.1 on global
crop 2, 0.5 on local crops), solarize (threshold 128/255) with p=0.2 on global crop 2 only, then
ImageNet mean/std normalisation.

The random parameters are drawn on the CPU from a sample's numpy generator by
:func:`sample_photometric_params` and kept as tensors in :class:`PhotometricParams`; the pixels are
transformed by :func:`apply_photometric`, which takes a whole batch of crops of one size. The same
function therefore runs inside a data-loader worker (per sample) or on the GPU (per batch) and gives the
same result up to floating-point rounding.

Blur kernel: DINOv2 uses a 9-tap kernel with sigma ~ U(0.1, 2.0) px for both 224 px global and 96 px
local crops. A crop rendered at a fraction ``r`` of its full size (``stage size / full size``, e.g. 0.5
in the low-resolution stage) gets kernel size ``max(3, odd_round(9 r))`` and sigma scaled by ``r``,
i.e. the blur a full-resolution crop would get, seen at the lower resolution. At ``r = 1`` this is plain
DINOv2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

CropKind = Literal["global1", "global2", "local"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# colour jitter strengths (torchvision ColorJitter arguments used by DINOv2)
BRIGHTNESS = 0.4
CONTRAST = 0.4
SATURATION = 0.2
HUE = 0.1
P_JITTER = 0.8
P_GRAYSCALE = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL_FULL = 9  # DINOv2's kernel size at full resolution
SOLARIZE_THRESHOLD = 128.0 / 255.0
P_BLUR: dict[str, float] = {"global1": 1.0, "global2": 0.1, "local": 0.5}
P_SOLARIZE: dict[str, float] = {"global1": 0.0, "global2": 0.2, "local": 0.0}

# jitter op ids, as in torchvision's ColorJitter
OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE = 0, 1, 2, 3

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision / PIL "L"


def blur_kernel_size(resolution_scale: float) -> int:
    """Odd Gaussian-blur kernel size for a crop rendered at ``resolution_scale`` of its full size.

    9 at full size (DINOv2), scaled linearly, rounded to the nearest odd integer, at least 3.
    """
    if resolution_scale <= 0:
        raise ValueError(f"resolution_scale must be positive, got {resolution_scale}")
    k = 2 * math.floor((BLUR_KERNEL_FULL * resolution_scale - 1) / 2 + 0.5) + 1
    return max(3, k)


@dataclass
class PhotometricParams:
    """Per-crop photometric parameters for ``n`` crops; every field is a tensor with leading dim ``n``.

    ``jitter_order[i]`` is a permutation of the op ids (brightness 0, contrast 1, saturation 2, hue 3).
    Factors follow torchvision: brightness/contrast/saturation multiply (1 = identity), hue is a shift
    in turns (0 = identity). ``blur_sigma`` is in pixels of the rendered crop.
    """

    jitter: torch.Tensor  # bool [n]
    jitter_order: torch.Tensor  # int64 [n, 4]
    brightness: torch.Tensor  # float32 [n]
    contrast: torch.Tensor  # float32 [n]
    saturation: torch.Tensor  # float32 [n]
    hue: torch.Tensor  # float32 [n]
    grayscale: torch.Tensor  # bool [n]
    blur: torch.Tensor  # bool [n]
    blur_sigma: torch.Tensor  # float32 [n]
    blur_kernel_size: torch.Tensor  # int64 [n]
    solarize: torch.Tensor  # bool [n]

    def __len__(self) -> int:
        return int(self.jitter.shape[0])

    def _map(self, fn) -> PhotometricParams:  # type: ignore[no-untyped-def]
        return PhotometricParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PhotometricParams:
        """A copy on ``device``; ``blur_kernel_size`` stays on the CPU: it sets the shape of the blur, which
        the host must know, and reading it from a GPU would stall the launch queue."""
        return PhotometricParams(**{
            f.name: getattr(self, f.name).cpu() if f.name == "blur_kernel_size"
            else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        })

    def pin_memory(self) -> PhotometricParams:
        return self._map(lambda t: t.pin_memory())

    def select(self, idx: torch.Tensor | slice | list[int]) -> PhotometricParams:
        """The parameters of a subset of crops (``idx`` indexes the leading dim)."""
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(parts: list[PhotometricParams]) -> PhotometricParams:
        """Concatenate along the crop dimension."""
        if not parts:
            raise ValueError("PhotometricParams.cat needs at least one part")
        return PhotometricParams(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(PhotometricParams)}
        )

    @staticmethod
    def stack_crop_major(per_sample: list[PhotometricParams]) -> PhotometricParams:
        """B samples with k crops each -> k*B crops ordered crop-major ([all crop 0; all crop 1; ...])."""
        if not per_sample:
            raise ValueError("PhotometricParams.stack_crop_major needs at least one sample")

        def stack(name: str) -> torch.Tensor:
            t = torch.stack([getattr(p, name) for p in per_sample])  # [B, k, ...]
            return t.transpose(0, 1).reshape(t.shape[0] * t.shape[1], *t.shape[2:])

        return PhotometricParams(**{f.name: stack(f.name) for f in fields(PhotometricParams)})


def identity_params(n: int, kernel_size: int = BLUR_KERNEL_FULL) -> PhotometricParams:
    """Parameters that leave crops unchanged except for the final normalisation (tests, evaluation)."""
    return PhotometricParams(
        jitter=torch.zeros(n, dtype=torch.bool),
        jitter_order=torch.arange(4).repeat(n, 1),
        brightness=torch.ones(n),
        contrast=torch.ones(n),
        saturation=torch.ones(n),
        hue=torch.zeros(n),
        grayscale=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool),
        blur_sigma=torch.ones(n),
        blur_kernel_size=torch.full((n,), kernel_size, dtype=torch.int64),
        solarize=torch.zeros(n, dtype=torch.bool),
    )


def sample_photometric_params(
    rng: np.random.Generator, n: int, crop_kind: CropKind, resolution_scale: float = 1.0
) -> PhotometricParams:
    """Draw DINOv2 photometric parameters for ``n`` crops of one kind from ``rng``.

    ``resolution_scale`` = rendered crop size / full crop size scales the blur kernel and sigma (see the
    module docstring). The number of draws does not depend on the outcomes, so the stream is stable.
    Same draws as ``sample_crops_photometric_params(rng, [crop_kind] * n, [resolution_scale] * n)``.
    """
    if crop_kind not in P_BLUR:
        raise ValueError(f"crop_kind must be one of {', '.join(P_BLUR)}, got {crop_kind!r}")
    blur_kernel_size(resolution_scale)  # validates the scale even for n = 0
    return sample_crops_photometric_params(rng, [crop_kind] * n, [resolution_scale] * n)


def sample_crops_photometric_params(
    rng: np.random.Generator, crop_kinds: Sequence[CropKind], resolution_scales: Sequence[float]
) -> PhotometricParams:
    """Draw DINOv2 photometric parameters for crops of mixed kinds (one draw per field for all crops).

    Crop ``i`` has kind ``crop_kinds[i]`` and rendered/full size ratio ``resolution_scales[i]``; each
    crop's parameters have exactly the distribution :func:`sample_photometric_params` gives its kind.
    Drawing a whole sample's crops at once (e.g. ``["global1", "global2"] + ["local"] * 8``) is cheaper
    than one call per kind; the draws differ from the per-kind calls'.
    """
    n = len(crop_kinds)
    if len(resolution_scales) != n:
        raise ValueError(f"{n} crop kinds but {len(resolution_scales)} resolution scales")
    for kind in set(crop_kinds):
        if kind not in P_BLUR:
            raise ValueError(f"crop_kind must be one of {', '.join(P_BLUR)}, got {kind!r}")
    p_blur = np.array([P_BLUR[k] for k in crop_kinds])
    p_solarize = np.array([P_SOLARIZE[k] for k in crop_kinds])
    scales = np.asarray(resolution_scales, dtype=np.float64)
    by_scale = {float(r): blur_kernel_size(float(r)) for r in set(resolution_scales)}
    kernels = [by_scale[float(r)] for r in resolution_scales]
    jitter = rng.random(n) < P_JITTER
    order = np.argsort(rng.random((n, 4)), axis=1)
    brightness = rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, n)
    contrast = rng.uniform(1 - CONTRAST, 1 + CONTRAST, n)
    saturation = rng.uniform(1 - SATURATION, 1 + SATURATION, n)
    hue = rng.uniform(-HUE, HUE, n)
    gray = rng.random(n) < P_GRAYSCALE
    blur = rng.random(n) < p_blur
    sigma = rng.uniform(*BLUR_SIGMA, n) * scales
    solarize = rng.random(n) < p_solarize
    f32 = np.float32
    return PhotometricParams(
        jitter=torch.from_numpy(jitter),
        jitter_order=torch.from_numpy(order.astype(np.int64)),
        brightness=torch.from_numpy(brightness.astype(f32)),
        contrast=torch.from_numpy(contrast.astype(f32)),
        saturation=torch.from_numpy(saturation.astype(f32)),
        hue=torch.from_numpy(hue.astype(f32)),
        grayscale=torch.from_numpy(gray),
        blur=torch.from_numpy(blur),
        blur_sigma=torch.from_numpy(sigma.astype(f32)),
        blur_kernel_size=torch.tensor(kernels, dtype=torch.int64).reshape(n),
        solarize=torch.from_numpy(solarize),
    )


# ---------------------------------------------------------------------------------------------------
# per-crop ops on float images in [0, 1]; x: [n, 3, H, W], factors: [n]


_HUE_OFFSETS = (5.0, 3.0, 1.0)  # per-channel sextant offsets of the hexcone hue rotation (R, G, B)
_CONSTANTS: dict[tuple[tuple[float, ...], torch.device, torch.dtype], torch.Tensor] = {}


def _device_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a [1, 3, 1, 1] tensor on ``like``'s device and dtype, made once per device (a copy from
    the host on every call would wait for the GPU's queue)."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return _CONSTANTS[key]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[n,3,H,W] -> [n,1,H,W] luma (two kernels: a product with the [1,3,1,1] weights and a channel sum)."""
    return (x * _device_constant(_GRAY_WEIGHTS, x)).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` clamped to [0, 1], as one lerp and one clamp."""
    return torch.lerp(other, x, factor.reshape(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.reshape(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space, as torchvision does for float images.

    Uses the hexcone identities: with ``max``, ``delta = max - min`` and hue ``h`` in sextants,
    channel c of the result is ``max - delta * clamp(min(k, 4 - k), 0, 1)``, ``k = (o_c + h) mod 6``
    with ``o = (5, 3, 1)`` for (R, G, B); value and saturation are unchanged.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    delta = maxc - x.amin(dim=1)
    r_max = maxc == r
    g_max = (maxc == g) & ~r_max
    num = torch.where(r_max, g - b, torch.where(g_max, b - r, r - g))
    sextant = torch.where(r_max, 0.0, torch.where(g_max, 2.0, 4.0))
    h6 = num / delta.clamp_min(1e-12) + sextant + (6.0 * shift).view(-1, 1, 1)  # grey pixels: delta = 0
    k = torch.remainder(h6.unsqueeze(1) + _device_constant(_HUE_OFFSETS, x), 6.0)  # [n, 3, H, W], all channels
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * w


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-crop separable Gaussian blur with reflect padding (as torchvision's ``gaussian_blur``).

    x: [n,C,H,W] float, sigma: [n] (pixels) -> [n,C,H,W]. Implemented as shifted multiply-adds, which is
    faster than a grouped convolution on the CPU for these kernel sizes.
    """
    n, _, hgt, wid = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k1 = k1 / k1.sum(dim=1, keepdim=True)  # [n, k]
    pad = kernel_size // 2
    xp = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    taps = [k1[:, i].view(-1, 1, 1, 1) for i in range(kernel_size)]
    y = xp[..., :wid] * taps[0]
    for i in range(1, kernel_size):
        y.addcmul_(xp[..., i:i + wid], taps[i])
    yp = F.pad(y, (0, 0, pad, pad), mode="reflect")
    out = yp[..., :hgt, :] * taps[0]
    for i in range(1, kernel_size):
        out.addcmul_(yp[..., i:i + hgt, :], taps[i])
    return out


_JITTER_OPS = {
    OP_BRIGHTNESS: ("brightness", adjust_brightness),
    OP_CONTRAST: ("contrast", adjust_contrast),
    OP_SATURATION: ("saturation", adjust_saturation),
    OP_HUE: ("hue", adjust_hue),
}


def _apply_subset(x: torch.Tensor, sel: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """x with ``fn`` applied to the crops where ``sel`` is True (the whole batch without copies if all)."""
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, *args)
    x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


def _gaussian_blur_conv(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """:func:`gaussian_blur` as two depthwise convolutions (one kernel launch each): the GPU version.

    x: [n,C,H,W] float, sigma: [n] -> [n,C,H,W].
    """
    n, c, hgt, wid = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0, output_size=n * c)  # [n*C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, hgt, wid), (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, k1.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    y = F.conv2d(y, k1.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def _where(sel: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(sel.view(-1, 1, 1, 1), a, b)


def _apply_dense(x: torch.Tensor, params: PhotometricParams, ksize: int | None) -> torch.Tensor:
    """The augmentation computed for every crop and selected per crop with ``torch.where``: no data-dependent
    shapes, hence no host synchronisation (the GPU path).

    Each crop's colour jitter runs in its own op order. Brightness, contrast and saturation are cheap and
    use factor 1 (an exact identity) where a crop skips them; the hue rotation, the costliest op, runs once
    for all crops: first every crop's ops placed *before* its hue, then hue, then the ops placed after it.
    That is each crop's own order, with one hue pass instead of one per position.
    """
    order = params.jitter_order  # [n, 4]: the op at each position
    positions = torch.arange(4, device=order.device)
    hue_pos = torch.where(order == OP_HUE, positions, 4).amin(dim=1, keepdim=True)  # [n, 1]
    # Every crop's factor of op o at position p, before and after its hue, in a few kernels for the whole
    # table: [n, 4 positions, 3 ops] (brightness, contrast, saturation), 1 where the crop does not apply it.
    at = order.unsqueeze(2) == positions[:3].view(1, 1, 3)  # [n, 4, 3]: position p holds op o
    values = torch.stack([params.brightness, params.contrast, params.saturation], dim=1).unsqueeze(1)  # [n,1,3]
    jittered = params.jitter.view(-1, 1, 1)
    tables = [torch.where(at & jittered & phase.unsqueeze(2), values, 1.0)
              for phase in (positions < hue_pos, positions > hue_pos)]
    for before_hue, table in zip((True, False), tables, strict=True):
        # per position the coefficients of _jitter_position, for all positions at once: [n, 4, 3]
        coefs = torch.stack([table.prod(dim=2), 1.0 - table[..., OP_SATURATION], 1.0 - table[..., OP_CONTRAST]],
                            dim=2)
        # a jittered crop's hue sits at position 0..3: nothing precedes position 0's hue or follows position 3's
        for pos in range(3) if before_hue else range(1, 4):
            x = _jitter_position(x, coefs[:, pos])
        if before_hue:
            x = _where(params.jitter, adjust_hue(x, params.hue), x)
    # the luma plane broadcast over the channels (no 3-channel copy of it)
    x = _where(params.grayscale, _gray(x), x)
    if ksize is not None:
        x = _where(params.blur, _gaussian_blur_conv(x, params.blur_sigma, ksize), x)
    # one select: the crop solarizes and the value is above the threshold
    return torch.where(params.solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)


def _jitter_position(x: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation at one position of the crops' jitter orders, as one blend.

    A crop applies at most one of the three ops per position, with factor ``f``; each is an affine blend
    (torchvision's ``_blend``): brightness ``f x``, contrast ``f x + (1 - f) mean(gray(x))``, saturation
    ``f x + (1 - f) gray(x)``. So one expression covers every crop,
    ``clamp(f_b f_c f_s x + (1 - f_s) gray(x) + (1 - f_c) mean(gray(x)), 0, 1)``, with the factors of the ops
    a crop does not apply equal to 1 (an exact identity for a crop that applies none). ``coefs [n, 3]``:
    ``f_b f_c f_s``, ``1 - f_s``, ``1 - f_c`` per crop. About half the memory passes of the three ops in
    turn: for a batch of 64 at 224/96 the dense path's ``aten`` calls read and write 24.8 GB before, 15.6 GB
    with this (the same values to rounding: ``tests/test_augment.py`` compares it with the subset path).
    """
    scale, w_gray, w_mean = (c.view(-1, 1, 1, 1) for c in coefs.unbind(1))
    gray = _gray(x)  # [n, 1, H, W]
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)  # [n, 1, 1, 1]
    offset = torch.addcmul(mean * w_mean, gray, w_gray)  # [n, 1, H, W]
    return torch.addcmul(offset, x, scale).clamp_(0.0, 1.0)


def _solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return _gray(x).expand(-1, 3, -1, -1).contiguous()


DenseFn = Callable[[torch.Tensor, PhotometricParams, int | None], torch.Tensor]


def _make_constants(like: torch.Tensor) -> None:
    """Create the cached constants for ``like``'s device and dtype now, outside any compiled region."""
    for values in (_GRAY_WEIGHTS, _HUE_OFFSETS, IMAGENET_MEAN, IMAGENET_STD):
        _device_constant(values, like)


def compiled_dense_fn(**compile_kwargs: Any) -> DenseFn:
    """The dense (GPU) path compiled with ``torch.compile(**compile_kwargs)``: its ~125 operators
    per call fuse into a few (one graph per crop size and blur kernel). Pass it as ``apply_photometric``'s
    ``dense_fn``; the trainer does with ``compute.compile`` on CUDA.

    The cached constants (:func:`_device_constant`) are made eagerly before the first call: made inside the
    compiled function they would be outputs of a CUDA graph (``reduce-overhead``, the ``cudagraphs``
    backend), kept in the cache and overwritten by the next replay (seen on an H100)."""
    compiled = torch.compile(_apply_dense, **compile_kwargs)

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _make_constants(x)
        return compiled(x, *args, **kwargs)

    return run


def apply_photometric(
    crops: torch.Tensor, params: PhotometricParams, normalize: bool = True, dense: bool | None = None,
    dense_fn: DenseFn | None = None,
) -> torch.Tensor:
    """DINOv2 photometric augmentation of a batch of crops of one size.

    crops: uint8 [N,3,S,S] (or float in [0,1]); params: N crops' parameters on the same device.
    Returns float32 [N,3,S,S]: ImageNet-normalised (``normalize=True``) or in [0, 1].
    Order: colour jitter (per-crop op order), grayscale, blur, solarize, normalise.

    ``dense`` (default: True off the CPU) computes every op for every crop and selects per crop with
    ``torch.where`` — no host synchronisation, one kernel sequence per op, blur as depthwise convolutions;
    otherwise each op runs on the subset of crops that drew it (cheaper on a CPU, but the subset sizes
    are read back to the host). ``dense_fn`` replaces the dense path's function (e.g.
    :func:`compiled_dense_fn`).
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be [N,3,H,W], got {tuple(crops.shape)}")
    if len(params) != crops.shape[0]:
        raise ValueError(f"{crops.shape[0]} crops but parameters for {len(params)}")
    x = crops.float().mul_(1.0 / 255.0) if crops.dtype == torch.uint8 else crops.float().clone()
    if dense is None:
        dense = crops.device.type != "cpu"
    if x.shape[0] > 0 and dense:
        sizes = params.blur_kernel_size.cpu().unique()  # a CPU tensor after PhotometricParams.to
        if sizes.numel() != 1:
            raise ValueError(f"crops of one batch must share one blur kernel size, got {sizes.tolist()}")
        x = (dense_fn or _apply_dense)(x, params, int(sizes.item()))
    elif x.shape[0] > 0:  # the CPU path: each op on the crops that draw it
        for pos in range(4):
            op_at_pos = params.jitter_order[:, pos]
            for op, (name, fn) in _JITTER_OPS.items():
                x = _apply_subset(x, params.jitter & (op_at_pos == op), fn, getattr(params, name))
        x = _apply_subset(x, params.grayscale, _grayscale)
        if params.blur.any():
            sizes = params.blur_kernel_size[params.blur.to(params.blur_kernel_size.device)].unique()
            if sizes.numel() != 1:
                raise ValueError(f"crops of one batch must share one blur kernel size, got {sizes.tolist()}")
            ksize = int(sizes.item())
            x = _apply_subset(x, params.blur, lambda t, s: gaussian_blur(t, s, ksize), params.blur_sigma)
        x = _apply_subset(x, params.solarize, _solarize)
    if normalize:
        x = x.sub_(_device_constant(IMAGENET_MEAN, x)).div_(_device_constant(IMAGENET_STD, x))
    return x
