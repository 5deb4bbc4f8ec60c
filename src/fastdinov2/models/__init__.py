"""fastdinov2.models: the DINOv2 ViT backbone and the DINO head."""

from fastdinov2.models.heads import DINOHead, WeightNormLinear
from fastdinov2.models.vit import (
    ARCH_WIDTHS,
    DinoVisionTransformer,
    build_backbone,
    build_vit,
    interpolate_pos_embed,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCH_WIDTHS",
    "DINOHead",
    "DinoVisionTransformer",
    "WeightNormLinear",
    "build_backbone",
    "build_vit",
    "interpolate_pos_embed",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
