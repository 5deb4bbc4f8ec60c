"""Small helpers shared by the loss modules."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Disable autocast for ``t``'s device (losses are computed in fp32). A no-op on the ``meta`` device,
    where autocast does not exist (``fastdinov2 flops`` counts FLOPs there)."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)
