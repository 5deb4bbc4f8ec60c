"""Chunked iBOT loss (losses/chunked.py): loss and gradients equal the materialised reference path
(prototype layer + ``iBOTPatchLoss``), padding rows are ignored, the centre update from sums equals
``update_center``, gradcheck in float64, and ``MetaArch`` with ``ibot.loss_chunk_rows`` matches the default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdinov2.config import ConfigError, load_config
from fastdinov2.losses import iBOTPatchLoss
from fastdinov2.losses.chunked import chunked_ibot_loss, teacher_logit_sum
from fastdinov2.models.heads import WeightNormLinear

K, D, TT, TS = 37, 8, 0.07, 0.1


def _case(m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(4, 16, dtype=torch.bool)  # B = 4 global crops
    masks.view(-1)[torch.randperm(64, generator=g)[:m]] = True
    counts = masks.sum(1, keepdim=True).expand_as(masks)[masks].float()
    return {
        "xs": F.normalize(torch.randn(m, D, generator=g), dim=-1),
        "xt": F.normalize(torch.randn(m, D, generator=g), dim=-1),
        "wt": torch.randn(K, D, generator=g),
        "center": torch.randn(1, K, generator=g) * 0.1,
        "masks": masks,
        "weights": 1.0 / counts,
    }


def _reference(c: dict[str, torch.Tensor], layer: WeightNormLinear, xs: torch.Tensor) -> torch.Tensor:
    loss = iBOTPatchLoss(K, student_temp=TS)
    loss.center.copy_(c["center"])
    t = loss.softmax_center_teacher(c["xt"] @ c["wt"].t(), TT)
    return loss.forward_masked(layer(xs), t, c["masks"], masks_weight=c["weights"])


def _chunked(c: dict[str, torch.Tensor], layer: WeightNormLinear, xs: torch.Tensor, rows: int) -> torch.Tensor:
    return chunked_ibot_loss(xs, layer.weight, c["xt"], c["wt"], c["center"], c["weights"], teacher_temp=TT,
                             student_temp=TS, n_images=c["masks"].shape[0], chunk_rows=rows)


def _layer(seed: int = 1) -> WeightNormLinear:
    torch.manual_seed(seed)
    layer = WeightNormLinear(D, K)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    return layer


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to ``rel`` relative to the tensor's scale (elements near 0 differ by fp32 rounding of the
    matmul blocking, which changes with the chunk size)."""
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()) if b.numel() else 0.0)


def _loss_and_grads(fn, c, rows=None):  # type: ignore[no-untyped-def]
    layer = _layer()
    xs = c["xs"].clone().requires_grad_(True)
    loss = fn(c, layer, xs) if rows is None else fn(c, layer, xs, rows)
    loss.backward()
    return loss.detach(), xs.grad, layer.weight_g.grad, layer.weight_v.grad


@pytest.mark.parametrize("rows", [1, 5, 13, 64])
def test_loss_and_gradients_match_reference(rows: int) -> None:
    c = _case(13)
    ref = _loss_and_grads(_reference, c)
    got = _loss_and_grads(_chunked, c, rows)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, ref, strict=True):
        _close(a, b)


def test_gradient_wrt_the_weight_tensor_matches_reference() -> None:
    c = _case(10, seed=3)
    ws = torch.randn(K, D, requires_grad=True)
    xs = c["xs"].clone().requires_grad_(True)
    loss = iBOTPatchLoss(K, student_temp=TS)
    loss.center.copy_(c["center"])
    t = loss.softmax_center_teacher(c["xt"] @ c["wt"].t(), TT)
    ref_gx, ref_gw = torch.autograd.grad(loss.forward_masked(xs @ ws.t(), t, c["masks"], masks_weight=c["weights"]),
                                         [xs, ws])
    got = chunked_ibot_loss(xs, ws, c["xt"], c["wt"], c["center"], c["weights"], teacher_temp=TT, student_temp=TS,
                            n_images=4, chunk_rows=3)
    gx, gw = torch.autograd.grad(got, [xs, ws])
    _close(gx, ref_gx)
    _close(gw, ref_gw)


def test_bf16_autocast_close_to_reference() -> None:
    """Under autocast the matmuls run in bf16 (as the head's ``F.linear`` would), the softmax in fp32."""
    c = _case(13, seed=7)
    ref = _loss_and_grads(_reference, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = _loss_and_grads(_reference, c)
        got = _loss_and_grads(_chunked, c, 5)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, b, r in zip(got, ref_bf16, ref, strict=True):
        _close(a, b, rel=3e-2)
        _close(a, r, rel=3e-2)


def test_zero_rows() -> None:
    c = _case(0)
    layer = _layer()
    xs = c["xs"].clone().requires_grad_(True)
    loss = _chunked(c, layer, xs, 4)
    assert loss.item() == 0.0
    loss.backward()
    assert xs.grad is not None and xs.grad.shape == (0, D)
    assert layer.weight_v.grad is not None and torch.count_nonzero(layer.weight_v.grad) == 0


def test_padding_rows_are_ignored() -> None:
    c = _case(9, seed=4)
    ref = _loss_and_grads(_chunked, c, 4)
    padded = dict(c)
    junk = torch.full((3, D), float("nan"))
    padded["xs"] = torch.cat([c["xs"], junk])
    padded["xt"] = torch.cat([c["xt"], torch.randn(3, D)])
    padded["weights"] = torch.cat([c["weights"], torch.zeros(3)])
    got = _loss_and_grads(_chunked, padded, 4)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1][:9], ref[1])
    assert torch.count_nonzero(got[1][9:]) == 0  # no gradient (and no NaN) on padding rows
    for a, b in zip(got[2:], ref[2:], strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(5)
    m, k, d = 5, 7, 3
    xs = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(k, d, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(m, d, generator=g, dtype=torch.float64)
    wt = torch.randn(k, d, generator=g, dtype=torch.float64)
    center = torch.randn(1, k, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 0.0, 1.0, 0.25, 2.0], dtype=torch.float64)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return chunked_ibot_loss(a, b, xt, wt, center, w, teacher_temp=0.5, student_temp=0.3, n_images=2,
                                 chunk_rows=2)

    assert torch.autograd.gradcheck(fn, (xs, ws))


def test_center_update_from_sums_equals_update_center() -> None:
    c = _case(11, seed=6)
    logits = c["xt"] @ c["wt"].t()
    ref, got = iBOTPatchLoss(K), iBOTPatchLoss(K)
    ref.center.copy_(c["center"])
    got.center.copy_(c["center"])
    ref.update_center(logits)
    got.update_center_from_sum(*teacher_logit_sum(c["xt"], c["wt"]))
    torch.testing.assert_close(got.center, ref.center)
    valid = torch.arange(11) < 7  # rows 7.. are padding
    ref.update_center(logits[:7])
    s, n = teacher_logit_sum(c["xt"], c["wt"], valid)
    assert n.item() == 7
    got.update_center_from_sum(s, n)
    torch.testing.assert_close(got.center, ref.center)
    before = got.center.clone()
    got.update_center_from_sum(torch.zeros(K), 0)  # no valid row: unchanged
    torch.testing.assert_close(got.center, before)


def test_config_key_validated() -> None:
    assert load_config("fastdinov2_tiny").ibot.loss_chunk_rows == 0
    assert load_config("fastdinov2_tiny", ["ibot.loss_chunk_rows=7"]).ibot.loss_chunk_rows == 7
    with pytest.raises(ConfigError, match="ibot.loss_chunk_rows"):
        load_config("fastdinov2_tiny", ["ibot.loss_chunk_rows=-1"])


TINY = [
    "student.embed_dim=32", "student.depth=1", "student.num_heads=2",
    "dino.head_n_prototypes=24", "ibot.head_n_prototypes=20", "dino.head_hidden_dim=16",
    "ibot.head_hidden_dim=16", "dino.head_bottleneck_dim=8", "ibot.head_bottleneck_dim=8",
    "crops.local_crops_number=2",
]  # patch 8: 16-px global crops have 4 patches, 8-px local crops 1


def _meta_step(extra: list[str], n_masked: int = 9):  # type: ignore[no-untyped-def]
    from fastdinov2.data.collate import mask_index_weights
    from fastdinov2.train.meta_arch import MetaArch

    cfg = load_config("fastdinov2_tiny", [*TINY, *extra])
    torch.manual_seed(0)
    model = MetaArch(cfg)
    with torch.no_grad():  # the teacher differs from the student, the centres are not zero
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.ibot_loss.center.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    b = 2
    global_crops = torch.randn(2 * b, 3, 16, 16, generator=g)
    local_crops = torch.randn(2 * b, 3, 8, 8, generator=g)
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks.view(-1)[torch.randperm(2 * b * 4, generator=g)[:n_masked]] = True
    mask_indices, masks_weight = mask_index_weights(masks)
    t_cls, t_patch = model.teacher_targets(global_crops, mask_indices, n_masked, 0.05)
    out = model.student(global_crops, local_crops, masks, mask_indices)
    losses = model.compute_losses(out, t_cls, t_patch, masks, masks_weight, n_local=2)
    losses["loss"].backward()
    grads = {n: p.grad for n, p in model.student.named_parameters()}
    return losses, grads, model.ibot_loss.center.clone(), model.dino_loss.center.clone()


@pytest.mark.parametrize("extra", [[], ["ibot.separate_head=true"]], ids=["shared_head", "separate_head"])
@pytest.mark.parametrize("n_masked", [9, 0])
def test_meta_arch_chunked_matches_reference(extra: list[str], n_masked: int) -> None:
    ref_losses, ref_grads, ref_ic, ref_dc = _meta_step(extra, n_masked)
    losses, grads, ic, dc = _meta_step([*extra, "ibot.loss_chunk_rows=4"], n_masked)
    for k in ref_losses:
        _close(losses[k], ref_losses[k])
    if n_masked > 0:
        assert ref_losses["ibot_loss"].item() > 0
    _close(ic, ref_ic)
    torch.testing.assert_close(dc, ref_dc)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        if ref_grads[n] is None:
            assert g is None, n
        else:
            _close(g, ref_grads[n])


def test_sinkhorn_knopp_falls_back_to_reference_path() -> None:
    from fastdinov2.train.meta_arch import MetaArch

    cfg = load_config("fastdinov2_tiny", [*TINY, "dino.centering=sinkhorn_knopp", "ibot.loss_chunk_rows=4"])
    with pytest.warns(UserWarning, match="loss_chunk_rows is ignored"):
        model = MetaArch(cfg)
    assert model.student.ibot_chunk_rows == 0 and model.teacher.ibot_chunk_rows == 0
