"""torch.hub entry points: ``torch.hub.load(REPO, "vit_small", weights=PATH, ...)``.

Each entry builds a DINOv2 ViT with the official hub defaults (patch 14, ``img_size=518``) unless
overridden by keyword arguments, and loads ``weights`` (any file or run directory that
:func:`fastdinov2.interop.load_backbone` reads) when given. With weights, structural settings the
caller does not pass (patch size, image size, registers, FFN kind, LayerScale, biases) are taken from
the weights; position embeddings are resampled when ``img_size`` differs from the stored grid.
Nothing is downloaded: ``weights`` is a local path. ``pretrained`` is accepted for DINOv2's hub calls:
``pretrained=False`` (the default) builds a randomly initialised model; ``pretrained=True`` needs ``weights``
(it cannot fetch the official weights).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

dependencies = ["torch"]

try:
    import fastdinov2  # noqa: F401
except ImportError:  # a plain checkout used through torch.hub: the package lives in src/
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

_WIDTH_KEYS = ("embed_dim", "depth", "num_heads")


def _hub_model(arch: str, weights: str | None, pretrained: bool, kwargs: dict[str, Any]) -> Any:
    from fastdinov2.interop import load_backbone, load_state_dict_checked
    from fastdinov2.models.vit import build_vit, interpolate_pos_embed

    if not isinstance(pretrained, bool):
        raise ValueError(f"{arch}: pretrained={pretrained!r}: expected True or False")
    if pretrained and weights is None:
        raise ValueError(
            f"{arch}: pretrained=True would download the official DINOv2 weights, but fastdinov2's hub entry "
            "points download nothing (offline). Pass weights=PATH instead: a local file or run directory, e.g. "
            f"torch.hub.load(REPO, {arch!r}, source='local', weights='dinov2_vits14_pretrain.pth'), or "
            "pretrained=False for a randomly initialised model")
    if weights is None:
        kwargs.setdefault("patch_size", 14)
        kwargs.setdefault("img_size", 518)
        return build_vit(arch, **kwargs)
    loaded = load_backbone(weights, arch=arch)
    config = {k: v for k, v in loaded.config.items() if k not in _WIDTH_KEYS}
    config.update(kwargs)
    with torch.device("meta"):  # every tensor is replaced by a loaded one: skip the random init
        model = build_vit(arch, **config)
    sd = loaded.state_dict()
    if sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], (model.native_grid, model.native_grid))
    load_state_dict_checked(model, sd, str(weights), strict=True, assign=True)
    return model.eval()


def vit_tiny(weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ViT-Ti/14 (192 wide, 12 blocks)."""
    return _hub_model("vit_tiny", weights, pretrained, kwargs)


def vit_small(weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ViT-S/14 (384 wide, 12 blocks)."""
    return _hub_model("vit_small", weights, pretrained, kwargs)


def vit_base(weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ViT-B/14 (768 wide, 12 blocks)."""
    return _hub_model("vit_base", weights, pretrained, kwargs)


def vit_large(weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ViT-L/14 (1024 wide, 24 blocks)."""
    return _hub_model("vit_large", weights, pretrained, kwargs)


def vit_giant2(weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ViT-g/14 (1536 wide, 40 blocks, SwiGLU)."""
    return _hub_model("vit_giant2", weights, pretrained, kwargs)
