"""iBOT masked-patch loss: the student predicts the teacher's prototype scores of the patches it saw masked.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022); as used in
Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024).

Shapes (K = prototypes, M = masked patch tokens of all global crops on this rank, B = global crops on
this rank, N = patches per crop):

- teacher logits of the masked tokens ``[M, K]`` -> :meth:`iBOTPatchLoss.softmax_center_teacher` /
  :meth:`iBOTPatchLoss.sinkhorn_knopp_teacher` -> probabilities ``[M, K]`` (fp32, no gradient).
- :meth:`iBOTPatchLoss.forward_masked`: student logits ``[M, K]``, teacher probabilities ``[M, K]``,
  ``student_masks_flat`` bool ``[B, N]`` -> scalar
  ``sum_m w[m] * CE(t[m], softmax(s[m] / student_temp)) / B`` with ``w[m] = 1 / (masked tokens of the
  image that token m belongs to)`` by default, so every masked image counts once.

Cross-rank reductions go through :mod:`fastdinov2.distributed` (no-ops in one process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdinov2.distributed import all_reduce_sum
from fastdinov2.losses.common import CenterEMA, autocast_off
from fastdinov2.losses.dino import _check_temperature, sinkhorn_knopp


class iBOTPatchLoss(CenterEMA, nn.Module):
    """iBOT patch loss with softmax centring (EMA ``center``) or Sinkhorn-Knopp targets.

    Args:
        patch_out_dim: number of prototypes ``K`` of the patch head.
        student_temp: temperature of the student softmax.
        center_momentum: EMA momentum of the centre.

    The centre is a buffer ``[1, K]`` (saved in ``state_dict``; DINOv2's ``[1, 1, K]`` loads too). Unlike
    DINOv2, which averages per-rank token means, :meth:`update_center` uses the mean over all masked
    tokens of all ranks, so ranks with different token counts (or none) are weighted correctly.
    """

    center: Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if patch_out_dim < 1:
            raise ValueError(f"patch_out_dim must be positive, got {patch_out_dim}")
        _check_temperature("student_temp", student_temp)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "center"
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.shape == (1, 1, self.patch_out_dim):
            state_dict[key] = value.reshape(1, self.patch_out_dim)  # DINOv2 stores [1, 1, K]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_logits(self, name: str, t: Tensor) -> None:
        if t.ndim != 2 or t.shape[1] != self.patch_out_dim:
            raise ValueError(f"{name} must have shape [M, {self.patch_out_dim}], got {tuple(t.shape)}")

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float | Tensor) -> Tensor:
        """``softmax((teacher_logits [M, K] - center) / teacher_temp)`` -> ``[M, K]`` fp32 probabilities."""
        self._check_logits("teacher_logits", teacher_logits)
        _check_temperature("teacher_temp", teacher_temp)
        with autocast_off(teacher_logits):
            return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: Tensor,
        teacher_temp: float | Tensor,
        n_masked_patches_tensor: Tensor | int,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets ``[M, K]`` for the masked tokens' ``teacher_logits [M, K]``.

        ``n_masked_patches_tensor`` is this rank's count of valid masked tokens (``M``; a tensor or an
        int); summed across ranks it is the global batch of the assignment. Ranks may hold different
        ``M`` (including 0), but all must call this.
        """
        self._check_logits("teacher_logits", teacher_logits)
        if isinstance(n_masked_patches_tensor, int) and n_masked_patches_tensor != teacher_logits.shape[0]:
            raise ValueError(
                f"n_masked_patches_tensor={n_masked_patches_tensor} but teacher_logits has "
                f"{teacher_logits.shape[0]} rows"
            )
        if isinstance(n_masked_patches_tensor, Tensor):
            count = n_masked_patches_tensor.to(device=teacher_logits.device, dtype=torch.float32).reshape(1).clone()
        else:  # a fill kernel, not a host-to-device copy (which would wait for the GPU's queue)
            count = torch.full((1,), float(n_masked_patches_tensor), device=teacher_logits.device)
        global_rows = all_reduce_sum(count)
        return sinkhorn_knopp(teacher_logits, teacher_temp, global_rows, n_iterations)

    def forward_masked(
        self,
        student_logits: Tensor,
        teacher_probs: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Weighted cross-entropy over the masked tokens.

        Args:
            student_logits: ``[M, K]`` student logits of the masked tokens (image-major order, as
                ``student_masks_flat[student_masks_flat]``).
            teacher_probs: ``[M, K]`` teacher probabilities of the same tokens (no gradient reaches them).
            student_masks_flat: bool ``[B, N]`` masks of the ``B`` global crops on this rank.
            n_masked_patches: keep only the first ``n`` tokens (and weights), e.g. to drop padding rows.
            masks_weight: ``[M]`` per-token weights; default ``1 / (masked tokens of the token's image)``.

        Returns:
            scalar fp32 ``-sum_m w[m] * sum_k t[m, k] * log_softmax(s[m] / student_temp)[k] / B``.
        """
        self._check_logits("student_logits", student_logits)
        if teacher_probs.shape != student_logits.shape:
            raise ValueError(
                f"teacher_probs has shape {tuple(teacher_probs.shape)}, student_logits has "
                f"{tuple(student_logits.shape)}"
            )
        if student_masks_flat.ndim != 2 or student_masks_flat.dtype != torch.bool:
            raise ValueError(
                f"student_masks_flat must be a bool [B, N] tensor, got {student_masks_flat.dtype} "
                f"{tuple(student_masks_flat.shape)}"
            )
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(dim=-1).clamp(min=1).float()  # [B]
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if masks_weight.ndim != 1:
            raise ValueError(f"masks_weight must be [M], got shape {tuple(masks_weight.shape)}")
        with autocast_off(student_logits):
            log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            per_token = (teacher_probs.detach().float() * log_p).sum(dim=-1)  # [M]
            if n_masked_patches is not None:
                if not 0 <= n_masked_patches <= per_token.shape[0]:
                    raise ValueError(
                        f"n_masked_patches={n_masked_patches} is outside [0, {per_token.shape[0]}] "
                        "(rows of student_logits)"
                    )
                per_token = per_token[:n_masked_patches]
                masks_weight = masks_weight[:n_masked_patches]
            if masks_weight.shape[0] != per_token.shape[0]:
                raise ValueError(
                    f"masks_weight has {masks_weight.shape[0]} entries for {per_token.shape[0]} masked tokens"
                )
            return -(per_token * masks_weight.float()).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor, valid: Tensor | None = None) -> None:
        """EMA update of ``center [1, K]`` with the mean of the masked tokens' ``teacher_logits [M, K]``.

        ``valid`` (bool ``[M]``, optional) marks the real rows when the batch was padded to a fixed number
        of rows (``compute.masked_tokens_bucket``); padding rows are left out of the mean. The mean runs
        over all valid masked tokens of all ranks (sum and count reduced together). Every rank must call
        it, also with ``M = 0``; when no rank has a masked token the centre is left unchanged (decided on
        device, without a host sync).
        """
        self._check_logits("teacher_logits", teacher_logits)
        with autocast_off(teacher_logits):
            t = teacher_logits.float()
            if valid is None:
                self.update_center_from_sum(t.sum(dim=0), float(t.shape[0]))
            else:
                if valid.shape != (t.shape[0],):
                    raise ValueError(f"valid must have shape [{t.shape[0]}], got {tuple(valid.shape)}")
                # a [M] x [M, K] product: no masked copy of the [M, K] logits (padding rows are finite copies
                # of real tokens, so weighting them by 0 leaves them out)
                self.update_center_from_sum(valid.to(t.dtype) @ t, valid.sum())

    @torch.no_grad()
    def update_center_from_sum(self, logit_sum: Tensor, count: Tensor | float) -> None:
        """:meth:`update_center` from this rank's per-prototype sum of the teacher logits over its valid
        masked tokens, ``logit_sum [K]``, and their number ``count`` (a scalar tensor or a number).

        Used by the chunked iBOT loss (:mod:`fastdinov2.losses.chunked`), which never forms the ``[M, K]``
        logits. Same reduction as :meth:`update_center` (sum and count reduced together; every rank must
        call it; a global count of 0 leaves the centre unchanged).
        """
        if logit_sum.shape != (self.patch_out_dim,):
            raise ValueError(f"logit_sum must have shape [{self.patch_out_dim}], got {tuple(logit_sum.shape)}")
        with autocast_off(logit_sum):
            s = logit_sum.float()
            if isinstance(count, Tensor):
                n = count.to(device=s.device, dtype=torch.float32).reshape(1)
            else:  # a fill kernel, not a host-to-device copy (which would wait for the GPU's queue)
                n = torch.full((1,), float(count), device=s.device)
            self._add_center_stats(torch.cat([s, n]))  # [K + 1]; reduced across ranks (CenterEMA)
