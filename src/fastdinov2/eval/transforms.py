"""Evaluation transforms shared by every protocol.

The DINOv2 classification eval transform: resize the shorter side (bicubic) to ``round(S * 256 / 224)``,
centre-crop ``S``, convert to ``[0, 1]`` floats and normalise with the ImageNet mean/std. ``S`` is
``--image-size`` (224 by default; the embedded tiny dataset is evaluated at 64).

The transform is split in two so that protocols can work between the steps:
:func:`make_eval_geometry` (PIL -> PIL: resize + centre crop) and :func:`normalize_batch` (a batch of
``[0, 1]`` tensors -> normalised tensors). Frequency filtering acts on the un-normalised tensor; generated
corruptions act on the uint8 crop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # torchvision is imported where a transform is built: it costs ~1 s at start-up
    from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_size_for(image_size: int) -> int:
    """Shorter-side resize before the centre crop: ``round(image_size * 256 / 224)`` (256 for 224)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return round(image_size * 256 / 224)


@dataclass(frozen=True)
class EvalTransformSettings:
    """Everything that determines the eval transform; recorded in result JSONs and feature-cache keys."""

    image_size: int = 224
    resize_size: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_size(cls, image_size: int) -> EvalTransformSettings:
        return cls(image_size=image_size, resize_size=resize_size_for(image_size))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


def make_eval_geometry(image_size: int) -> T.Compose:
    """PIL -> PIL: bicubic shorter-side resize to ``round(S*256/224)``, then centre crop ``S x S``."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(resize_size_for(image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
        ]
    )


def make_eval_transform(image_size: int = 224, normalize: bool = True) -> T.Compose:
    """PIL -> tensor ``[3, S, S]``: eval geometry, ``[0, 1]`` floats, ImageNet normalisation if ``normalize``."""
    from torchvision import transforms as T

    steps: list = [make_eval_geometry(image_size), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def make_tensor_transform(normalize: bool = True) -> T.Compose:
    """PIL (already at its final size) -> tensor ``[3, H, W]``; no geometry."""
    from torchvision import transforms as T

    steps: list = [T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def normalize_batch(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a batch ``[B, 3, H, W]`` of ``[0, 1]`` images (any device); returns a new tensor."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
