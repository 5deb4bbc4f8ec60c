"""fastdinov2: fast, robust DINOv2 pre-training with a frequency curriculum (FastDINOv2)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_backbone"]


def load_backbone(path: Any, device: Any = "cpu", **kwargs: Any) -> Any:
    """Load any supported backbone file or run directory; see :func:`fastdinov2.interop.load_backbone`."""
    from fastdinov2.interop import load_backbone as _load

    return _load(path, device=device, **kwargs)
