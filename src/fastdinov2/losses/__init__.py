"""The three pre-training losses: DINO (class token), iBOT (masked patches) and KoLeo (spreading)."""

from fastdinov2.losses.dino import DINOLoss, sinkhorn_knopp
from fastdinov2.losses.ibot import iBOTPatchLoss
from fastdinov2.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "sinkhorn_knopp"]
