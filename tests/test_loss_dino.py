"""DINOLoss: hand-computed values, the cross-entropy identity, centring and Sinkhorn-Knopp invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdinov2.losses import DINOLoss, sinkhorn_knopp


def _ce(t_row: list[float], s_row: list[float], temp: float) -> float:
    """-sum_k t_k log softmax(s / temp)_k in plain Python."""
    z = [v / temp for v in s_row]
    m = max(z)
    log_norm = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(t * (v - log_norm) for t, v in zip(t_row, z))


def _sk_reference(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """DINOv2's Sinkhorn-Knopp, transcribed in float64 numpy (single process)."""
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def test_forward_matches_hand_computation() -> None:
    loss = DINOLoss(3, student_temp=0.5)
    students = [[[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], [[0.5, -1.0, 2.0], [3.0, 0.0, 0.0]]]
    teachers = [[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], [[1 / 3, 1 / 3, 1 / 3], [0.6, 0.2, 0.2]]]
    expected = 0.0
    for s in students:
        for t in teachers:
            expected += sum(_ce(t[b], s[b], 0.5) for b in range(2)) / 2
    got = loss([torch.tensor(s) for s in students], [torch.tensor(t) for t in teachers])
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_uniform_student_costs_log_k_per_pair() -> None:
    loss = DINOLoss(3)
    s = torch.zeros(4, 3)
    t = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert loss([s, s], [t, t]).item() == pytest.approx(4 * math.log(3), rel=1e-6)


def test_equals_soft_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    loss = DINOLoss(16, student_temp=0.1)
    students = [torch.randn(5, 16, generator=g) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(5, 16, generator=g), -1) for _ in range(2)]
    expected = sum(F.cross_entropy(s / 0.1, t) for s in students for t in teachers)
    torch.testing.assert_close(loss(students, teachers), expected)


def test_gradient_reaches_only_the_student() -> None:
    g = torch.Generator().manual_seed(2)
    loss = DINOLoss(6, student_temp=0.2)
    s = torch.randn(4, 6, generator=g, requires_grad=True)
    t = torch.softmax(torch.randn(4, 6, generator=g), -1).requires_grad_(True)
    loss([s], [t]).backward()
    assert t.grad is None
    assert s.grad is not None
    # d/ds of mean_b CE(t, softmax(s / T)) = (softmax(s / T) - t) / (T * B)
    expected = (torch.softmax(s.detach() / 0.2, -1) - t.detach()) / (0.2 * 4)
    torch.testing.assert_close(s.grad, expected)


def test_forward_is_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(3)
    loss = DINOLoss(32)
    s = torch.randn(8, 32, generator=g).bfloat16()
    t = torch.softmax(torch.randn(8, 32, generator=g), -1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss([s], [t])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss([s.float()], [t.float()]))


def test_softmax_center_teacher() -> None:
    loss = DINOLoss(3)
    t = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    probs = loss.softmax_center_teacher(t, teacher_temp=0.5)
    assert not probs.requires_grad and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(t.detach() / 0.5, -1))
    loss.center.copy_(torch.tensor([[0.0, 1.0, 2.0]]))  # t - center = [1, 1, 1] -> uniform
    torch.testing.assert_close(loss.softmax_center_teacher(t, 0.5), torch.full((1, 3), 1 / 3))


def test_center_ema_after_two_updates_and_state_dict() -> None:
    loss = DINOLoss(3, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))  # mean [2, 3, 4]
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.3, 0.4]]))
    loss.update_center(torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))  # mean [1, 1, 1]
    torch.testing.assert_close(loss.center, torch.tensor([[0.28, 0.37, 0.46]]))
    state = loss.state_dict()
    assert list(state) == ["center"] and state["center"].shape == (1, 3)
    other = DINOLoss(3)
    other.load_state_dict(state)
    torch.testing.assert_close(other.center, loss.center)


def test_center_update_rejects_empty_and_wrong_width() -> None:
    loss = DINOLoss(3)
    with pytest.raises(ValueError, match="at least one"):
        loss.update_center(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        loss.update_center(torch.zeros(2, 4))


def test_sinkhorn_knopp_marginals_and_reference() -> None:
    g = torch.Generator().manual_seed(4)
    loss = DINOLoss(8)
    logits = torch.randn(12, 8, generator=g)
    q = loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.5)
    assert q.shape == (12, 8) and q.dtype == torch.float32 and not q.requires_grad
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # every sample's assignment sums to 1
    ref = _sk_reference(logits.numpy(), 0.5, 3)
    np.testing.assert_allclose(q.numpy(), ref, rtol=1e-5, atol=1e-7)
    # prototype marginals approach uniform (12 / 8 samples each) as iterations increase
    errs = [(loss.sinkhorn_knopp_teacher(logits, 0.5, n).sum(0) - 12 / 8).abs().max().item() for n in (1, 3, 30)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4


def test_sinkhorn_knopp_equal_logits_is_uniform_and_large_logits_do_not_overflow() -> None:
    loss = DINOLoss(4)
    torch.testing.assert_close(loss.sinkhorn_knopp_teacher(torch.full((3, 4), 7.0), 0.1), torch.full((3, 4), 0.25))
    # exp(10 / 0.04) overflows fp32; the max shift keeps the result exact
    logits = torch.tensor([[10.0, 9.9, 9.0, 8.0], [9.5, 10.0, 9.9, 9.0], [8.0, 9.0, 10.0, 9.95]])
    q = loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    assert torch.isfinite(q).all()
    np.testing.assert_allclose(q.numpy(), _sk_reference(logits.numpy(), 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_knopp_argument_errors() -> None:
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.0, 2.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, 2.0, n_iterations=0)


def test_forward_shape_errors() -> None:
    loss = DINOLoss(3)
    with pytest.raises(ValueError, match="at least one"):
        loss([], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"teacher_list\[0\]"):
        loss([torch.zeros(2, 3)], [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match=r"student_list\[1\]"):
        loss([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(3, student_temp=0.0)
