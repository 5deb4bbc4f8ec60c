"""iBOTPatchLoss: hand-computed masked loss, weights, truncation, centring and Sinkhorn-Knopp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdinov2.losses import DINOLoss, iBOTPatchLoss

MASKS = torch.tensor([[True, False, False, False], [True, True, False, False]])  # 1 + 2 masked tokens


def test_forward_masked_matches_hand_computation() -> None:
    loss = iBOTPatchLoss(3, student_temp=1.0)
    student = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])
    # token CEs: log 3 (uniform student), -log(0.5) = log 2, log 3; weights 1 (image 0), 1/2, 1/2 (image 1)
    expected = (1.0 * math.log(3) + 0.5 * math.log(2) + 0.5 * math.log(3)) / 2
    got = loss.forward_masked(student, teacher, MASKS)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-6)
    explicit = loss.forward_masked(student, teacher, MASKS, masks_weight=torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(explicit, got)
    unweighted = loss.forward_masked(student, teacher, MASKS, masks_weight=torch.ones(3))
    assert unweighted.item() == pytest.approx((2 * math.log(3) + math.log(2)) / 2, rel=1e-6)


def test_forward_masked_equals_weighted_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 9, generator=g) < 0.5
    masks[0, 0] = True
    m = int(masks.sum())
    s = torch.randn(m, 10, generator=g)
    t = torch.softmax(torch.randn(m, 10, generator=g), -1)
    counts = masks.sum(1, keepdim=True).expand_as(masks)[masks].float()
    expected = (F.cross_entropy(s / 0.1, t, reduction="none") / counts).sum() / 3
    torch.testing.assert_close(iBOTPatchLoss(10).forward_masked(s, t, masks), expected)


def test_truncation_drops_padding_rows() -> None:
    g = torch.Generator().manual_seed(1)
    loss = iBOTPatchLoss(5)
    s = torch.randn(3, 5, generator=g)
    t = torch.softmax(torch.randn(3, 5, generator=g), -1)
    ref = loss.forward_masked(s, t, MASKS)
    s_pad = torch.cat([s, torch.randn(2, 5, generator=g)])
    t_pad = torch.cat([t, torch.full((2, 5), 0.2)])
    torch.testing.assert_close(loss.forward_masked(s_pad, t_pad, MASKS, n_masked_patches=3), ref)
    weights = torch.tensor([1.0, 0.5, 0.5, 9.0, 9.0])
    torch.testing.assert_close(loss.forward_masked(s_pad, t_pad, MASKS, 3, masks_weight=weights), ref)


def test_gradient_reaches_only_the_student() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.softmax(torch.randn(3, 4, generator=g), -1).requires_grad_(True)
    iBOTPatchLoss(4).forward_masked(s, t, MASKS).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_forward_masked_input_errors() -> None:
    loss = iBOTPatchLoss(4)
    s, t = torch.zeros(3, 4), torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="teacher_probs"):
        loss.forward_masked(s, t[:2], MASKS)
    with pytest.raises(ValueError, match="bool"):
        loss.forward_masked(s, t, MASKS.float())
    with pytest.raises(ValueError, match="masks_weight has 2 entries for 3"):
        loss.forward_masked(s, t, MASKS, masks_weight=torch.ones(2))
    with pytest.raises(ValueError, match="n_masked_patches=4"):
        loss.forward_masked(s, t, MASKS, n_masked_patches=4)
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        loss.forward_masked(torch.zeros(3, 5), torch.zeros(3, 5), MASKS)


def test_softmax_center_teacher_and_center_updates() -> None:
    loss = iBOTPatchLoss(3, center_momentum=0.5)
    assert loss.center.shape == (1, 3)
    loss.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 5.0]]))  # mean [2, 2, 3]
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 1.0, 1.5]]))
    loss.update_center(torch.zeros(0, 3))  # no masked token anywhere: unchanged
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 1.0, 1.5]]))
    loss.update_center(torch.tensor([[3.0, 3.0, 0.5]]))
    torch.testing.assert_close(loss.center, torch.tensor([[2.0, 2.0, 1.0]]))
    probs = loss.softmax_center_teacher(torch.tensor([[2.0, 2.0, 1.0], [2.0, 3.0, 1.0]]), teacher_temp=1.0)
    torch.testing.assert_close(probs[0], torch.full((3,), 1 / 3))
    torch.testing.assert_close(probs[1], torch.softmax(torch.tensor([0.0, 1.0, 0.0]), -1))


def test_center_state_dict_accepts_dinov2_shape() -> None:
    loss = iBOTPatchLoss(3)
    loss.load_state_dict({"center": torch.tensor([[[1.0, 2.0, 3.0]]])})  # DINOv2 keeps [1, 1, K]
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 2.0, 3.0]]))
    assert loss.state_dict()["center"].shape == (1, 3)


def test_sinkhorn_knopp_matches_dino_on_the_same_rows() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 6, generator=g)
    q = iBOTPatchLoss(6).sinkhorn_knopp_teacher(logits, 0.3, torch.tensor(7))
    torch.testing.assert_close(q, DINOLoss(6).sinkhorn_knopp_teacher(logits, 0.3))
    torch.testing.assert_close(q.sum(1), torch.ones(7))
    torch.testing.assert_close(iBOTPatchLoss(6).sinkhorn_knopp_teacher(logits, 0.3, 7), q)
    with pytest.raises(ValueError, match="n_masked_patches_tensor=5"):
        iBOTPatchLoss(6).sinkhorn_knopp_teacher(logits, 0.3, 5)
