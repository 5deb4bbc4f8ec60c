"""iBOT and DINO cross-entropies as Triton row kernels on the GPU: no fp32 ``[M, K]`` tensor, two passes over the
logits.

The reference path (:meth:`iBOTPatchLoss.softmax_center_teacher`, :meth:`iBOTPatchLoss.update_center`,
:meth:`iBOTPatchLoss.forward_masked` and their backward) upcasts the ``[M, K]`` logits of the masked tokens
(``K = 65536``, ``M ~ 3,800`` at 224 px, batch 64) and runs about ten elementwise and reduction kernels
over fp32 ``[M, K]`` tensors of ~1 GB each: 14.4 ms of an 81.7 ms ViT-S/16 graph step on an H100
(``benchmarks/head_loss.py``). Here the logits stay in the heads' dtype (bf16 under autocast) and three
kernels read them:

- :func:`masked_column_sum`: ``sum_m w[m] * t[m, :]`` in fp32 over the teacher logits ``t [M, K]`` (the
  centre update's batch statistic; rows with ``w = 0`` are padding and left out even if not finite);
- forward, one program per row: with ``a = (t - center) / teacher_temp`` and ``b = s / student_temp``, an
  online (running-max) pass over ``K`` gives ``A = logsumexp(a)``, ``B = logsumexp(b)`` and
  ``sum_k softmax(a)_k * b_k``; the row's cross-entropy is
  ``ce[m] = -sum_k softmax(a)_k * log_softmax(b)_k = B - sum_k softmax(a)_k * b_k``;
- backward, one program per (row, block of ``K``): ``d ce[m] / d s[m, k] = (softmax(b)_k - softmax(a)_k) /
  student_temp``, recomputed from ``A`` and ``B`` and written in ``s``'s dtype.

So the teacher probabilities are never stored: they are recomputed from the teacher logits (same dtype as
the student's), the stored row statistics and the centre as it was before this step's update (a ``[K]`` copy).
The math is the reference's in fp32 (inputs upcast on load); only the summation order differs.

:func:`fused_ibot_loss` is what the meta-architecture calls (``ibot.fused_loss=true``).

The DINO term (``dino.fused_loss=true``, :func:`fused_dino_loss`) uses a second pair of row kernels,
:func:`cross_entropy_to_targets`: each student class-token row ``s [R, K]`` against a row of precomputed target
probabilities (the two teacher crops and their sum, ``[3B, K]`` fp32), ``ce = sum(p) * logsumexp(s / T) -
sum_k p_k * s_k / T`` forward and ``(sum(p) * softmax(s / T) - p) / T`` backward, in place of the reference's
~2.8 GB of fp32 ``[640, 65536]`` passes per step at batch 64 (``benchmarks/dino_loss.py``).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is first used; the tests do that), see :func:`fused_loss_available`. Everything stays on the
device (no host synchronisation, fixed launch shapes), so the loss can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from fastdinov2.losses.dino import _check_temperature

__all__ = [
    "cross_entropy_to_targets", "fused_dino_loss", "fused_ibot_loss", "fused_loss_available", "masked_column_sum",
    "row_soft_cross_entropy",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def fused_loss_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with Triton installed, or the CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreting()


@functools.cache
def _kernels() -> SimpleNamespace:
    """The jitted kernels, defined on first use (Triton reads ``TRITON_INTERPRET`` when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_ce_fwd(S, T, C, TT, CE, LSE_T, LSE_S, K, stride_s, stride_t, inv_ts, BLOCK_K: tl.constexpr):
        # one program per row; every lane keeps its own running maximum and sums, merged at the end
        row = tl.program_id(0).to(tl.int64)
        inv_tt = 1.0 / tl.load(TT).to(tl.float32)
        offs = tl.arange(0, BLOCK_K)
        m_t = tl.full([BLOCK_K], -1.0e38, tl.float32)  # finite start: exp(m - m_new) stays defined
        z_t = tl.zeros([BLOCK_K], tl.float32)
        d_t = tl.zeros([BLOCK_K], tl.float32)  # sum exp(a - m_t) * b
        m_s = tl.full([BLOCK_K], -1.0e38, tl.float32)
        z_s = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            inside = k < K
            t = tl.load(T + row * stride_t + k, mask=inside, other=0.0).to(tl.float32)
            c = tl.load(C + k, mask=inside, other=0.0).to(tl.float32)
            a = tl.where(inside, (t - c) * inv_tt, float("-inf"))
            b = tl.load(S + row * stride_s + k, mask=inside, other=0.0).to(tl.float32) * inv_ts
            m_new = tl.maximum(m_t, a)
            scale = tl.exp(m_t - m_new)
            e = tl.exp(a - m_new)
            z_t = z_t * scale + e
            d_t = d_t * scale + e * b
            m_t = m_new
            b_in = tl.where(inside, b, float("-inf"))
            m_new = tl.maximum(m_s, b_in)
            z_s = z_s * tl.exp(m_s - m_new) + tl.exp(b_in - m_new)
            m_s = m_new
        mt = tl.max(m_t, axis=0)
        r = tl.exp(m_t - mt)
        zt = tl.sum(z_t * r, axis=0)
        dt = tl.sum(d_t * r, axis=0)
        ms = tl.max(m_s, axis=0)
        zs = tl.sum(z_s * tl.exp(m_s - ms), axis=0)
        lse_s = ms + tl.log(zs)
        tl.store(CE + row, lse_s - dt / zt)
        tl.store(LSE_T + row, mt + tl.log(zt))
        tl.store(LSE_S + row, lse_s)

    @triton.jit
    def row_ce_bwd(S, T, C, TT, LSE_T, LSE_S, COEF, G, K, stride_s, stride_t, stride_g, inv_ts,
                   BLOCK_K: tl.constexpr):
        # one program per (row, block of K): G = COEF[row] * (softmax(b) - softmax(a))
        row = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = k < K
        inv_tt = 1.0 / tl.load(TT).to(tl.float32)
        coef = tl.load(COEF + row)
        t = tl.load(T + row * stride_t + k, mask=inside, other=0.0).to(tl.float32)
        c = tl.load(C + k, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(S + row * stride_s + k, mask=inside, other=0.0).to(tl.float32)
        p_t = tl.exp((t - c) * inv_tt - tl.load(LSE_T + row))
        p_s = tl.exp(s * inv_ts - tl.load(LSE_S + row))
        g = tl.where(coef != 0.0, coef * (p_s - p_t), 0.0)  # rows without gradient stay 0, even if not finite
        tl.store(G + row * stride_g + k, g.to(G.dtype.element_ty), mask=inside)

    @triton.jit
    def col_sum(T, W, OUT, M, K, stride_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # one program per block of columns, looping over the rows: OUT[k] = sum_m W[m] * T[m, k] (fp32)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < K
        acc = tl.zeros([BLOCK_N], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_in = rows < M
            w = tl.load(W + rows, mask=row_in, other=0.0).to(tl.float32)
            ptrs = T + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
            x = tl.load(ptrs, mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
            x = tl.where(w[:, None] != 0.0, x * w[:, None], 0.0)
            acc += tl.sum(x, axis=0)
        tl.store(OUT + cols, acc, mask=col_in)

    @triton.jit
    def target_ce_fwd(S, P, IDX, CE, LSE_S, PSUM, K, stride_s, stride_p, inv_ts, BLOCK_K: tl.constexpr):
        # one program per row: the target is row IDX[row] of P (probabilities); with b = s / student_temp,
        # ce = sum_k p_k * (logsumexp(b) - b_k) = sum(p) * logsumexp(b) - sum_k p_k * b_k
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(IDX + row).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        m_s = tl.full([BLOCK_K], -1.0e38, tl.float32)
        z_s = tl.zeros([BLOCK_K], tl.float32)
        d = tl.zeros([BLOCK_K], tl.float32)  # sum p * b
        q = tl.zeros([BLOCK_K], tl.float32)  # sum p
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            inside = k < K
            p = tl.load(P + target * stride_p + k, mask=inside, other=0.0).to(tl.float32)
            b = tl.load(S + row * stride_s + k, mask=inside, other=0.0).to(tl.float32) * inv_ts
            d += p * b
            q += p
            b_in = tl.where(inside, b, float("-inf"))
            m_new = tl.maximum(m_s, b_in)
            z_s = z_s * tl.exp(m_s - m_new) + tl.exp(b_in - m_new)
            m_s = m_new
        ms = tl.max(m_s, axis=0)
        lse_s = ms + tl.log(tl.sum(z_s * tl.exp(m_s - ms), axis=0))
        psum = tl.sum(q, axis=0)
        tl.store(CE + row, psum * lse_s - tl.sum(d, axis=0))
        tl.store(LSE_S + row, lse_s)
        tl.store(PSUM + row, psum)

    @triton.jit
    def target_ce_bwd(S, P, IDX, LSE_S, PSUM, COEF, G, K, stride_s, stride_p, stride_g, inv_ts,
                      BLOCK_K: tl.constexpr):
        # one program per (row, block of K): G = COEF[row] * (sum(p) * softmax(b) - p)
        row = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = k < K
        target = tl.load(IDX + row).to(tl.int64)
        coef = tl.load(COEF + row)
        p = tl.load(P + target * stride_p + k, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(S + row * stride_s + k, mask=inside, other=0.0).to(tl.float32)
        p_s = tl.exp(s * inv_ts - tl.load(LSE_S + row))
        g = coef * (tl.load(PSUM + row) * p_s - p)
        tl.store(G + row * stride_g + k, g.to(G.dtype.element_ty), mask=inside)

    return SimpleNamespace(row_ce_fwd=row_ce_fwd, row_ce_bwd=row_ce_bwd, col_sum=col_sum,
                           target_ce_fwd=target_ce_fwd, target_ce_bwd=target_ce_bwd)


def _block_k(k: int) -> int:
    """Columns per block: 2048 (or K rounded up to a power of two when smaller). For sm_90 the forward kernel
    then needs 76 registers per thread at 8 warps (three programs per SM) and the backward 70 at 4 warps,
    without spills (ptxas -v on Triton's PTX)."""
    return min(2048, 1 << max(4, (k - 1).bit_length()))


def _launch_guard(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_rows(s: Tensor, t: Tensor, center: Tensor) -> None:
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"student and teacher logits must be [M, K] of one shape, got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    if center.numel() != s.shape[1]:
        raise ValueError(f"center must have K = {s.shape[1]} entries, got shape {tuple(center.shape)}")
    if s.device != t.device or center.device != s.device:
        raise ValueError(f"logits and center must share a device, got {s.device}, {t.device}, {center.device}")


class _RowSoftCE(torch.autograd.Function):
    """``ce [M]`` fp32 from student logits ``s [M, K]`` (with gradient) and teacher logits ``t [M, K]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, s: Tensor, t: Tensor, center: Tensor, teacher_temp: Tensor, student_temp: float
    ) -> Tensor:
        s, t = s.contiguous(), t.contiguous()
        m, k = s.shape
        ce = torch.empty(m, device=s.device, dtype=torch.float32)
        lse_t, lse_s = torch.empty_like(ce), torch.empty_like(ce)
        if m > 0:
            with _launch_guard(s):
                _kernels().row_ce_fwd[(m,)](
                    s, t, center, teacher_temp, ce, lse_t, lse_s, k, s.stride(0), t.stride(0),
                    1.0 / student_temp, BLOCK_K=_block_k(k), num_warps=8,
                )
        ctx.save_for_backward(s, t, center, teacher_temp, lse_t, lse_s)
        ctx.student_temp = student_temp
        return ce

    @staticmethod
    def backward(ctx: Any, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        s, t, center, teacher_temp, lse_t, lse_s = ctx.saved_tensors
        m, k = s.shape
        grad = torch.empty_like(s)
        if m > 0:
            coef = (grad_ce.to(torch.float32) / ctx.student_temp).contiguous()
            block = _block_k(k)
            with _launch_guard(s):
                _kernels().row_ce_bwd[(m, -(-k // block))](
                    s, t, center, teacher_temp, lse_t, lse_s, coef, grad, k, s.stride(0), t.stride(0),
                    grad.stride(0), 1.0 / ctx.student_temp, BLOCK_K=block, num_warps=4,
                )
        return grad, None, None, None, None


def _temperature_tensor(teacher_temp: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(teacher_temp, Tensor):
        return teacher_temp.detach().to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(teacher_temp), device=device)  # a fill kernel, no host-to-device copy


def row_soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, teacher_temp: float | Tensor,
    student_temp: float,
) -> Tensor:
    """Per-row ``-sum_k softmax((t - center) / teacher_temp)_k * log_softmax(s / student_temp)_k``.

    Args:
        student_logits: ``s [M, K]`` (any float dtype; gradient flows back in this dtype).
        teacher_logits: ``t [M, K]`` (no gradient).
        center: ``[1, K]`` or ``[K]`` fp32 centre subtracted from the teacher logits.
        teacher_temp: a number or a 0-d / 1-element device tensor (read on the device).
        student_temp: student temperature (a number).

    Returns:
        ``[M]`` fp32 row cross-entropies.
    """
    _check_rows(student_logits, teacher_logits, center)
    _check_temperature("teacher_temp", teacher_temp)
    _check_temperature("student_temp", student_temp)
    if not fused_loss_available(student_logits.device):
        raise RuntimeError(f"the fused iBOT loss needs a CUDA device and Triton (got device "
                           f"{student_logits.device}, Triton importable: {_triton_importable()})")
    c = center.detach().to(torch.float32).reshape(-1).contiguous()
    out = _RowSoftCE.apply(student_logits, teacher_logits.detach(), c,
                           _temperature_tensor(teacher_temp, student_logits.device), float(student_temp))
    assert isinstance(out, Tensor)
    return out


class _TargetCE(torch.autograd.Function):
    """``ce [R]`` fp32 from student logits ``s [R, K]`` (with gradient) and target probabilities ``p [U, K]``,
    row ``r`` against ``p[index[r]]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, s: Tensor, p: Tensor, index: Tensor, student_temp: float
    ) -> Tensor:
        s, p, index = s.contiguous(), p.contiguous(), index.contiguous()
        r, k = s.shape
        ce = torch.empty(r, device=s.device, dtype=torch.float32)
        lse_s, psum = torch.empty_like(ce), torch.empty_like(ce)
        if r > 0:
            with _launch_guard(s):
                _kernels().target_ce_fwd[(r,)](
                    s, p, index, ce, lse_s, psum, k, s.stride(0), p.stride(0), 1.0 / student_temp,
                    BLOCK_K=_block_k(k), num_warps=8,
                )
        ctx.save_for_backward(s, p, index, lse_s, psum)
        ctx.student_temp = student_temp
        return ce

    @staticmethod
    def backward(ctx: Any, grad_ce: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        s, p, index, lse_s, psum = ctx.saved_tensors
        r, k = s.shape
        grad = torch.empty_like(s)
        if r > 0:
            coef = (grad_ce.to(torch.float32) / ctx.student_temp).contiguous()
            block = _block_k(k)
            with _launch_guard(s):
                _kernels().target_ce_bwd[(r, -(-k // block))](
                    s, p, index, lse_s, psum, coef, grad, k, s.stride(0), p.stride(0), grad.stride(0),
                    1.0 / ctx.student_temp, BLOCK_K=block, num_warps=4,
                )
        return grad, None, None, None


def cross_entropy_to_targets(student_logits: Tensor, targets: Tensor, index: Tensor, student_temp: float) -> Tensor:
    """Per-row ``-sum_k targets[index[r]]_k * log_softmax(s[r] / student_temp)_k``, with Triton row kernels.

    Args:
        student_logits: ``s [R, K]`` (any float dtype; the gradient flows back in this dtype).
        targets: ``[U, K]`` target probabilities (no gradient; a row may sum to more than 1, e.g. the sum of two
            teachers' probabilities: the result is then the sum of the cross-entropies).
        index: ``[R]`` integer row of ``targets`` for each student row.
        student_temp: student temperature (a number).

    Returns:
        ``[R]`` fp32 row cross-entropies.
    """
    if student_logits.ndim != 2 or targets.ndim != 2 or targets.shape[1] != student_logits.shape[1]:
        raise ValueError(f"student logits [R, K] and targets [U, K] expected, got {tuple(student_logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if index.shape != (student_logits.shape[0],) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an integer tensor [{student_logits.shape[0]}], got {index.dtype} "
                         f"{tuple(index.shape)}")
    if len({student_logits.device, targets.device, index.device}) != 1:
        raise ValueError(f"logits, targets and index must share a device, got {student_logits.device}, "
                         f"{targets.device}, {index.device}")
    _check_temperature("student_temp", student_temp)
    if not fused_loss_available(student_logits.device):
        raise RuntimeError(f"the fused DINO loss needs a CUDA device and Triton (got device "
                           f"{student_logits.device}, Triton importable: {_triton_importable()})")
    out = _TargetCE.apply(student_logits, targets.detach(), index, float(student_temp))
    assert isinstance(out, Tensor)
    return out


@torch.compiler.disable  # the Triton launches stay eager inside a compiled step (a graph break)
def fused_dino_loss(cls_logits: Tensor, teacher_cls: Sequence[Tensor], *, student_temp: float) -> Tensor:
    """The DINO term over every (student crop, teacher crop) pair, with fused Triton kernels.

    Args:
        cls_logits: the student's class-token logits ``[2B + nL*B, K]``: the two global crops (crop-major, as
            the teacher's), then the ``nL`` local crops (crop-major), in the heads' dtype.
        teacher_cls: the teacher's two ``[B, K]`` target probabilities, already swapped (the first is matched
            with the student's first global crop), as :meth:`MetaArch.teacher_targets` returns them.
        student_temp: student temperature.

    Returns:
        scalar fp32, equal to the reference's :meth:`DINOLoss.crop_pairs`: ``sum over the pairs of mean_b CE``,
        each global crop against its teacher crop and each local crop against both. A local crop's two targets
        are one target row ``t0 + t1`` (the cross-entropy is linear in the target), so no fp32 ``[R, K]`` tensor
        is formed: ``[3B, K]`` fp32 targets and the logits are read, the ``[R, K]`` gradient is written in the
        logits' dtype.
    """
    if len(teacher_cls) != 2 or teacher_cls[0].shape != teacher_cls[1].shape or teacher_cls[0].ndim != 2:
        raise ValueError(f"teacher_cls must be two [B, K] tensors, got {[tuple(t.shape) for t in teacher_cls]}")
    b = teacher_cls[0].shape[0]
    n_rows = cls_logits.shape[0]
    if b == 0 or n_rows < 2 * b or (n_rows - 2 * b) % b:
        raise ValueError(f"cls_logits must have 2B + nL*B rows for B = {b} teacher rows, got {n_rows}")
    t0, t1 = (t.detach().to(torch.float32) for t in teacher_cls)
    targets = torch.cat([t0, t1, t0 + t1]) if n_rows > 2 * b else torch.cat([t0, t1])  # [3B, K] / [2B, K]
    rows = torch.arange(n_rows, device=cls_logits.device)
    index = torch.where(rows < 2 * b, rows, 2 * b + rows % b)  # global rows: their own; local: t0 + t1 of the image
    return cross_entropy_to_targets(cls_logits, targets, index, student_temp).sum() / b


@torch.no_grad()
def masked_column_sum(x: Tensor, weights: Tensor) -> Tensor:
    """``sum_m weights[m] * x[m, :]`` -> ``[K]`` fp32, accumulated in fp32 from ``x [M, K]`` in its own dtype;
    rows with weight 0 are left out even when not finite (padding rows of a bucketed batch)."""
    if x.ndim != 2 or weights.shape != (x.shape[0],):
        raise ValueError(f"x [M, K] and weights [M] expected, got {tuple(x.shape)} and {tuple(weights.shape)}")
    if not fused_loss_available(x.device):
        raise RuntimeError(f"masked_column_sum needs a CUDA device and Triton (got device {x.device})")
    x = x.contiguous()
    w = weights.to(torch.float32).contiguous()
    m, k = x.shape
    out = torch.zeros(k, device=x.device, dtype=torch.float32)
    if m > 0:
        block_n = 128  # 512 programs for K = 65536, each summing [64, 128] tiles down the rows
        with _launch_guard(x):
            _kernels().col_sum[(-(-k // block_n),)](x, w, out, m, k, x.stride(0), BLOCK_M=64, BLOCK_N=block_n,
                                                    num_warps=8)
    return out


@torch.compiler.disable  # the Triton launches stay eager inside a compiled step (a graph break)
def fused_ibot_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    masks_weight: Tensor,
    *,
    teacher_temp: float | Tensor,
    student_temp: float,
    n_images: int | float,
) -> Tensor:
    """iBOT patch loss from the masked tokens' student and teacher logits, with fused Triton kernels.

    Equals :meth:`iBOTPatchLoss.forward_masked` with ``iBOTPatchLoss.softmax_center_teacher(teacher_logits)``
    targets (centre ``center [1, K]`` from before this step's update)::

        -sum_m w[m] * sum_k softmax((t[m] - center) / teacher_temp)_k * log_softmax(s[m] / student_temp)_k
        / n_images

    Rows with ``masks_weight [M]`` = 0 are padding: they contribute nothing to the loss or the gradient.
    Returns a scalar fp32.
    """
    if masks_weight.shape != (student_logits.shape[0],):
        raise ValueError(f"masks_weight must have shape [{student_logits.shape[0]}], got "
                         f"{tuple(masks_weight.shape)}")
    if not n_images > 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    ce = row_soft_cross_entropy(student_logits, teacher_logits, center, teacher_temp, student_temp)
    w = masks_weight.detach().to(torch.float32)
    return torch.where(w != 0, ce * w, 0.0).sum() / n_images
