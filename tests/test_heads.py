"""The DINO head against torch's own weight_norm and a hand-built MLP, key names, init."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdinov2.models.heads import DINOHead


def reference_head(in_dim: int, out_dim: int, nlayers: int, hidden: int, bottleneck: int) -> nn.Module:
    """DINOv2's structure built from torch modules, with torch's (legacy) weight_norm prototype layer."""
    if nlayers == 1:
        mlp: nn.Module = nn.Linear(in_dim, bottleneck)
    else:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        mlp = nn.Sequential(*layers, nn.Linear(hidden, bottleneck))

    class Ref(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = mlp
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))

    return Ref()


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_matches_torch_weight_norm_reference(nlayers: int) -> None:
    torch.manual_seed(0)
    head = DINOHead(24, 50, nlayers=nlayers, hidden_dim=40, bottleneck_dim=16)
    ref = reference_head(24, 50, nlayers, 40, 16)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # not all ones, so g matters
    assert set(head.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(7, 24)
    torch.testing.assert_close(head(x), ref(x))


def test_key_names_and_shapes() -> None:
    head = DINOHead(384, 1000, nlayers=3, hidden_dim=2048, bottleneck_dim=256)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (1000, 1), "last_layer.weight_v": (1000, 256),
    }
    one = DINOHead(8, 10, nlayers=1, bottleneck_dim=4, mlp_bias=False)
    assert set(one.state_dict()) == {"mlp.weight", "last_layer.weight_g", "last_layer.weight_v"}
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, 10, nlayers=0)


def test_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(256, 500, hidden_dim=512, bottleneck_dim=128)
    assert torch.all(head.last_layer.weight_g == 1)
    sd = head.state_dict()
    assert abs(sd["mlp.0.weight"].std().item() - 0.02) < 0.002 and torch.all(sd["mlp.0.bias"] == 0)
    # with g == 1 every prototype row has unit norm, and the input to it is unit-normalised
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(500))
    out = head(torch.randn(5, 256))
    assert out.shape == (5, 500) and out.abs().max() <= 1 + 1e-5


def test_output_scale_is_input_scale_free_and_fp16_eps() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 30, nlayers=1, bottleneck_dim=8, mlp_bias=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(head(x), head(10 * x))  # the bottleneck output is L2-normalised
    zero = head(torch.zeros(2, 16))
    assert torch.isfinite(zero).all() and torch.all(zero == 0)
    half = head.half()(torch.zeros(2, 16, dtype=torch.float16))  # 1e-12 would underflow in fp16
    assert torch.isfinite(half).all()


def test_weight_norm_function_matches_the_operators() -> None:
    from fastdinov2.models.heads import _WeightNorm

    torch.manual_seed(0)
    g = torch.rand(7, 1, dtype=torch.float64, requires_grad=True) + 0.5
    v = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WeightNorm.apply, (g, v))
    gf, vf = g.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    w = _WeightNorm.apply(gf, vf)
    ref_g, ref_v = gf.detach().clone().requires_grad_(), vf.detach().clone().requires_grad_()
    ref = ref_g * ref_v / ref_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w, ref)
    dw = torch.randn_like(w)
    torch.testing.assert_close(torch.autograd.grad(w, (gf, vf), dw), torch.autograd.grad(ref, (ref_g, ref_v), dw))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 gradient from the matmul comes back in fp32
        out = torch.nn.functional.linear(torch.randn(3, 5), _WeightNorm.apply(gf, vf))
    gv = torch.autograd.grad(out.float().sum(), vf)[0]
    assert gv.dtype == torch.float32 and torch.isfinite(gv).all()
