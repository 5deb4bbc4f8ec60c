"""compute.half_residual: under autocast the ViT's residual stream stays in the autocast dtype (bf16), as with
DINOv2's half-precision parameters; without autocast nothing changes. Checked with CPU autocast (bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastdinov2.config import load_config
from fastdinov2.models.vit import DinoVisionTransformer, layer_norm


def _vit(half: bool, drop_path: float = 0.0) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                  layerscale_init=0.5, drop_path_rate=drop_path)
    model.half_residual = half
    return model


def _block_output_dtypes(model: DinoVisionTransformer) -> tuple[list[torch.dtype], list[object]]:
    seen: list[torch.dtype] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for blk in model.blocks]
    return seen, hooks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("packed", [False, True])
def test_under_autocast_the_stream_is_bf16_and_the_result_close_to_the_fp32_stream(packed: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x, loc = torch.randn(4, 3, 32, 32, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    outs, grads = {}, {}
    for half in (False, True):
        model = _vit(half)
        gl = torch.Generator().manual_seed(2)
        seen, hooks = _block_output_dtypes(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_features([x, loc]) if packed else [model.forward_features(x)]
        for h in hooks:
            h.remove()  # type: ignore[attr-defined]
        assert set(seen) == {torch.bfloat16 if half else torch.float32}
        assert all(o["x_norm_clstoken"].dtype == (torch.bfloat16 if half else torch.float32) for o in out)
        # fixed random read-outs: every parameter gets a gradient well above rounding noise
        loss = sum((o["x_norm_patchtokens"].float() * torch.randn(o["x_norm_patchtokens"].shape, generator=gl)).sum()
                   + (o["x_norm_clstoken"].float() * torch.randn(o["x_norm_clstoken"].shape, generator=gl)).sum()
                   for o in out)
        loss.backward()  # type: ignore[union-attr]
        outs[half] = [o["x_norm_patchtokens"] for o in out]
        grads[half] = {n: p.grad for n, p in model.named_parameters()}
    for a, b in zip(outs[True], outs[False], strict=True):
        assert _rel(a, b) < 2e-2
    for name, grad in grads[True].items():
        if name == "mask_token":  # no masks here
            continue
        assert grad is not None and grad.dtype == torch.float32, name  # parameters and their gradients: fp32
        assert torch.isfinite(grad).all(), name
        assert _rel(grad, grads[False][name]) < 0.05, name  # measured: 0.016 (the fp32 stream: 0.007 vs fp32)


def test_without_autocast_nothing_changes() -> None:
    x = torch.randn(2, 3, 32, 32)
    a = _vit(False).forward_features(x)["x_norm_patchtokens"]
    b = _vit(True).forward_features(x)["x_norm_patchtokens"]
    assert b.dtype == torch.float32 and torch.equal(a, b)


def test_layer_norm_keeps_half_inputs_half_under_autocast_only() -> None:
    norm = nn.LayerNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm(norm, x.bfloat16())
        assert layer_norm(norm, x).dtype == torch.float32  # the fp32 stream: as the module
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x), rtol=2e-2, atol=2e-2)


def test_drop_path_on_the_half_stream_keeps_or_drops_whole_crops() -> None:
    model = _vit(True, drop_path=0.5).train()
    x, loc = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features([x, loc])
    assert all(torch.isfinite(o["x_norm_patchtokens"].float()).all() for o in out)
    assert out[0]["x_prenorm"].dtype == torch.bfloat16


def test_trainer_key_reaches_both_backbones_and_trains(tmp_path: Path) -> None:
    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from fastdinov2.train.loop import Trainer, train

    from .test_train_e2e import TINY

    root = tmp_path / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    assert load_config("fastdinov2_tiny").compute.half_residual is False
    common = [*TINY, f"data.root={root}", "compute.precision=bf16", "train.max_steps=2"]
    trainer = Trainer(load_config("fastdinov2_tiny", [*common, "compute.half_residual=true"]), tmp_path / "t")
    assert trainer.model.student.backbone.half_residual and trainer.model.teacher.backbone.half_residual
    runs = [train(load_config("fastdinov2_tiny", [*common, f"compute.half_residual={h}"]), tmp_path / f"r{h}")
            for h in (False, True)]
    for a, b in zip(runs[0]["history"], runs[1]["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-2), a["step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_residual_trains_like_the_fp32_stream_on_the_gpu(tmp_path: Path) -> None:
    from .test_fused_loss import assert_like_reference

    assert_like_reference(tmp_path, "compute.half_residual=true", ("loss",), rel=5e-2)
