"""KoLeoLoss on point sets whose nearest-neighbour distances are known."""

from __future__ import annotations

import math

import pytest
import torch

from fastdinov2.losses import KoLeoLoss


def _on_circle(degrees: list[float]) -> torch.Tensor:
    rad = [math.radians(d) for d in degrees]
    return torch.tensor([[math.cos(a), math.sin(a)] for a in rad])


def test_square_corners() -> None:
    x = _on_circle([45, 135, 225, 315])  # every nearest neighbour is sqrt(2) away
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_three_points_hand_computed() -> None:
    # 0 and 60 degrees are each other's neighbours at distance 1; 180 degrees is sqrt(3) from 60
    x = _on_circle([0, 60, 180])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


def test_scale_invariant_and_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g)
    scaled = x * torch.rand(9, 1, generator=g).add(0.5) * 10
    loss = KoLeoLoss()(x)
    torch.testing.assert_close(KoLeoLoss()(scaled), loss)
    u = x / x.norm(dim=1, keepdim=True)
    nearest = [min(float((u[i] - u[j]).norm()) for j in range(9) if j != i) for i in range(9)]
    assert loss.item() == pytest.approx(-sum(math.log(d) for d in nearest) / 9, rel=1e-5)


def test_gradients_are_finite_even_with_duplicates() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()


def test_fp32_under_autocast() -> None:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = KoLeoLoss()(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, KoLeoLoss()(x.float()))


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        KoLeoLoss()(torch.randn(2, 3, 4))
