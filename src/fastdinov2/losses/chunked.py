"""iBOT patch loss fused with the prototype layer, computed over chunks of rows.

The reference path materialises, for the ``M`` masked tokens and ``K`` prototypes, the student logits
``[M, K]`` (fp32 after the upcast in the loss), their log-softmax, the teacher probabilities ``[M, K]``,
their product and the gradient ``[M, K]``: with ``K = 65536`` and ``M ~ 3,800`` (ViT-B/16, batch 64,
224 px) each is ~1 GB. Here the loss is computed from the *bottleneck features* instead of the logits:

- ``xs [M, D]``: the student's L2-normalised bottleneck features of the masked tokens (with gradient);
- ``ws [K, D]``: the student's effective prototype weight (``head.last_layer.weight``, with gradient:
  pass the computed tensor, so autograd carries the gradient on to ``weight_g``/``weight_v``);
- ``xt [M, D]``, ``wt [K, D]``, ``center [1, K]``: the teacher's features, prototype weight and the iBOT
  centre, from which the teacher targets ``softmax((xt @ wt.T - center) / teacher_temp)`` are computed
  lazily, one chunk at a time (no gradient);
- ``weights [M]``: per-token weights (``masks_weight``); rows with weight 0 are padding and contribute
  nothing to the loss or the gradients (their features are zeroed before use, so even non-finite
  padding rows are harmless).

Forward and backward loop over chunks of ``chunk_rows`` rows; each chunk holds a handful of ``[c, K]``
fp32 tensors, and the backward *recomputes* the chunk's student and teacher logits rather than saving
anything of size ``[M, K]``. The result equals :meth:`iBOTPatchLoss.forward_masked` on
``iBOTPatchLoss.softmax_center_teacher`` targets::

    loss = -sum_m w[m] * sum_k t[m, k] * log_softmax(xs[m] @ ws.T / student_temp)[k] / n_images

Gradient: with ``z = xs @ ws.T`` (one row ``m``), ``p = softmax(z / student_temp)``, and
``d log_softmax(z / T)[k] / d z[j] = (delta_jk - p[j]) / T``::

    dL/dz[m, j] = -w[m] / n_images / T * (t[m, j] - p[m, j] * sum_k t[m, k])
                = w[m] / n_images / T * (p[m, j] * sum_k t[m, k] - t[m, j])

(``sum_k t = 1`` up to rounding; the exact form is kept so the gradient matches autograd of the
reference). Then ``grad_xs = G @ ws`` and ``grad_ws = G.T @ xs`` with ``G = dL/dz`` per chunk.

Matmuls run in the autocast dtype when autocast is on for the inputs' device (as ``F.linear`` in the
head would), the softmax math in fp32 (as the reference loss, which upcasts the logits). ``grad_ws`` is
accumulated over chunks in fp32.

Sinkhorn-Knopp targets need the whole ``[M, K]`` teacher matrix at once (column and row normalisation
across all tokens and ranks), so they cannot be produced chunk by chunk; the meta-architecture falls
back to the reference path for ``dino.centering = sinkhorn_knopp``.

The centre update needs only the per-prototype sum of the teacher logits over the valid rows and their
count: by linearity ``sum_m xt[m] @ wt.T = (sum_m xt[m]) @ wt.T``, so :func:`teacher_logit_sum` gets it
from one ``[D] x [D, K]`` product; :meth:`iBOTPatchLoss.update_center_from_sum` reduces it across ranks
exactly as :meth:`iBOTPatchLoss.update_center` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdinov2.losses.common import autocast_off
from fastdinov2.losses.dino import _check_temperature


def _compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for ``x``'s device, else the inputs' promoted dtype."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, w.dtype)


def _rows(x: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """``x [c, D]`` in ``dtype`` with the rows where ``valid [c]`` is False set to 0."""
    return x.to(dtype).masked_fill(~valid.unsqueeze(1), 0)


def _teacher_probs(
    xt: Tensor, wt: Tensor, center: Tensor, teacher_temp: float | Tensor, valid: Tensor, dtype: torch.dtype
) -> Tensor:
    """``softmax((xt @ wt.T - center) / teacher_temp)`` for one chunk: ``[c, D] x [K, D] -> [c, K]`` in
    ``center``'s dtype (fp32, or fp64 for fp64 inputs)."""
    logits = (_rows(xt, valid, dtype) @ wt.t()).to(center.dtype)
    return F.softmax(logits.sub_(center).div_(teacher_temp), dim=-1)


class ChunkedPrototypeCE(torch.autograd.Function):
    """Autograd function of :func:`chunked_ibot_loss` (arguments as there, positional)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xs: Tensor,
        ws: Tensor,
        xt: Tensor,
        wt: Tensor,
        center: Tensor,
        weights: Tensor,
        teacher_temp: float | Tensor,
        student_temp: float,
        n_images: float,
        chunk_rows: int,
        dtype: torch.dtype,
    ) -> Tensor:
        acc = torch.promote_types(dtype, torch.float32)  # softmax math: fp32 (fp64 for fp64 inputs)
        with autocast_off(xs):
            ws_c, wt_c = ws.to(dtype), wt.to(dtype)
            center_a = center.to(acc)
            w_all = weights.to(acc)
            loss = xs.new_zeros((), dtype=acc)
            for start in range(0, xs.shape[0], chunk_rows):
                sl = slice(start, start + chunk_rows)
                w = w_all[sl]
                valid = w != 0
                z = (_rows(xs[sl], valid, dtype) @ ws_c.t()).to(acc)  # [c, K]
                log_p = F.log_softmax(z.div_(student_temp), dim=-1)
                t = _teacher_probs(xt[sl], wt_c, center_a, teacher_temp, valid, dtype)
                per_token = (t.mul_(log_p)).sum(dim=-1)  # [c]
                loss = loss - (per_token * w).sum()
            loss = loss / n_images
        ctx.save_for_backward(xs, ws, xt, wt, center, weights)
        ctx.hparams = (teacher_temp, student_temp, n_images, chunk_rows, dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xs, ws, xt, wt, center, weights = ctx.saved_tensors
        teacher_temp, student_temp, n_images, chunk_rows, dtype = ctx.hparams
        need_xs, need_ws = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.no_grad(), autocast_off(xs):
            ws_c, wt_c = ws.to(dtype), wt.to(dtype)
            center_a = center.to(acc)
            scale = grad_out.to(acc) / (n_images * student_temp)
            w_all = weights.to(acc)
            grad_xs = torch.zeros_like(xs) if need_xs else None
            grad_ws = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_ws else None
            for start in range(0, xs.shape[0], chunk_rows):
                sl = slice(start, start + chunk_rows)
                w = w_all[sl]
                valid = w != 0
                x = _rows(xs[sl], valid, dtype)  # [c, D]
                p = F.softmax((x @ ws_c.t()).to(acc).div_(student_temp), dim=-1)  # [c, K]
                t = _teacher_probs(xt[sl], wt_c, center_a, teacher_temp, valid, dtype)
                # G = w / (n_images * T) * (p * sum_k t - t), computed in place in p
                g = p.mul_(t.sum(dim=-1, keepdim=True)).sub_(t).mul_((w * scale).unsqueeze(1)).to(dtype)
                if grad_xs is not None:
                    grad_xs[sl] = (g @ ws_c).to(xs.dtype)
                if grad_ws is not None:
                    if dtype == acc:
                        grad_ws.addmm_(g.t(), x)
                    else:  # bf16/fp16 matmul, fp32 accumulation over chunks
                        grad_ws += (g.t() @ x).to(acc)
        return (
            grad_xs,
            grad_ws.to(ws.dtype) if grad_ws is not None else None,
            None, None, None, None, None, None, None, None, None,
        )


def chunked_ibot_loss(
    xs: Tensor,
    ws: Tensor,
    xt: Tensor,
    wt: Tensor,
    center: Tensor,
    weights: Tensor,
    *,
    teacher_temp: float | Tensor,
    student_temp: float,
    n_images: int | float,
    chunk_rows: int,
) -> Tensor:
    """iBOT patch loss from bottleneck features, never materialising ``[M, K]`` tensors.

    Args:
        xs: ``[M, D]`` student L2-normalised bottleneck features of the masked tokens (with gradient).
        ws: ``[K, D]`` student effective prototype weight (``last_layer.weight``; with gradient).
        xt: ``[M, D]`` teacher bottleneck features of the same tokens (no gradient reaches them).
        wt: ``[K, D]`` teacher prototype weight (no gradient).
        center: ``[1, K]`` iBOT centre subtracted from the teacher logits (the value *before* this
            step's centre update, as with :meth:`iBOTPatchLoss.softmax_center_teacher`).
        weights: ``[M]`` per-token weights; 0 marks a padding row (ignored entirely).
        teacher_temp: teacher softmax temperature.
        student_temp: student softmax temperature.
        n_images: divisor of the loss: the number ``B`` of global crops (``student_masks_flat.shape[0]``).
        chunk_rows: rows per chunk (``> 0``); each chunk holds a few ``[chunk_rows, K]`` fp32 tensors.

    Returns:
        scalar fp32 (fp64 for fp64 inputs)
        ``-sum_m w[m] * sum_k t[m, k] * log_softmax(xs[m] @ ws.T / student_temp)[k] / n_images``
        with ``t = softmax((xt @ wt.T - center) / teacher_temp)``; 0 for ``M = 0``.
    """
    if xs.ndim != 2 or ws.ndim != 2 or xs.shape[1] != ws.shape[1]:
        raise ValueError(f"xs [M, D] and ws [K, D] expected, got {tuple(xs.shape)} and {tuple(ws.shape)}")
    if xt.shape != xs.shape or wt.shape != ws.shape:
        raise ValueError(
            f"teacher shapes xt {tuple(xt.shape)} / wt {tuple(wt.shape)} differ from the student's "
            f"{tuple(xs.shape)} / {tuple(ws.shape)}"
        )
    if center.shape != (1, ws.shape[0]):
        raise ValueError(f"center must have shape [1, {ws.shape[0]}], got {tuple(center.shape)}")
    if weights.shape != (xs.shape[0],):
        raise ValueError(f"weights must have shape [{xs.shape[0]}], got {tuple(weights.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if not n_images > 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    _check_temperature("teacher_temp", teacher_temp)
    _check_temperature("student_temp", student_temp)
    dtype = _compute_dtype(xs, ws)
    out = ChunkedPrototypeCE.apply(
        xs, ws, xt.detach(), wt.detach(), center.detach(), weights.detach(),
        teacher_temp if isinstance(teacher_temp, Tensor) else float(teacher_temp), float(student_temp),
        float(n_images), int(chunk_rows), dtype,
    )
    assert isinstance(out, Tensor)
    return out


@torch.no_grad()
def teacher_logit_sum(xt: Tensor, wt: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-prototype sum of the teacher logits ``xt @ wt.T`` over the valid rows, and the row count.

    Args:
        xt: ``[M, D]`` teacher bottleneck features; wt: ``[K, D]`` teacher prototype weight.
        valid: bool ``[M]`` (default: all rows valid).

    Returns:
        ``(sum [K] fp32, count [] fp32)``, what :meth:`iBOTPatchLoss.update_center_from_sum` takes. Uses
        ``sum_m xt[m] @ wt.T = (sum_m xt[m]) @ wt.T``, in fp32 (no ``[M, K]`` tensor).
    """
    if xt.ndim != 2 or wt.ndim != 2 or xt.shape[1] != wt.shape[1]:
        raise ValueError(f"xt [M, D] and wt [K, D] expected, got {tuple(xt.shape)} and {tuple(wt.shape)}")
    with autocast_off(xt):
        x = xt.float()
        if valid is None:
            count = x.new_full((), float(x.shape[0]))
        else:
            if valid.shape != (x.shape[0],):
                raise ValueError(f"valid must have shape [{x.shape[0]}], got {tuple(valid.shape)}")
            x = x.masked_fill(~valid.unsqueeze(1), 0)
            count = valid.sum().float()
        return wt.float() @ x.sum(dim=0), count
