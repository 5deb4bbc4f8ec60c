"""DINO loss on the class token: cross-entropy between sharpened teacher and student prototype scores.

Reference: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, ICCV 2021);
Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024), which adds the
Sinkhorn-Knopp centring of SwAV (Caron et al., NeurIPS 2020) as an alternative to softmax centring.

Shapes (K = number of prototypes, B = crops of one view on this rank, N = teacher rows on this rank):

- teacher logits ``[N, K]`` -> :meth:`DINOLoss.softmax_center_teacher` /
  :meth:`DINOLoss.sinkhorn_knopp_teacher` -> teacher probabilities ``[N, K]`` (rows sum to 1, fp32,
  no gradient).
- :meth:`DINOLoss.forward`: ``student_list`` of ``[B, K]`` logits, ``teacher_list`` of ``[B, K]``
  probabilities -> scalar ``-sum_{s, t} mean_b sum_k t[b, k] * log_softmax(s[b] / student_temp)[k]``.

Cross-rank reductions go through :mod:`fastdinov2.distributed` (no-ops in one process), so the results
on ``W`` ranks holding ``N`` rows each equal the single-process results on the ``W * N`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdinov2.distributed import all_reduce_max, all_reduce_sum, get_world_size
from fastdinov2.losses.common import CenterEMA, autocast_off


def _check_temperature(name: str, value: float | Tensor) -> None:
    """Numbers are checked here; a 0-d tensor (the trainer's on-device teacher temperature, so that compiled
    graphs and CUDA graphs see one input instead of a new constant per step) is not read back."""
    if not isinstance(value, Tensor) and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


@torch.no_grad()
def sinkhorn_knopp(
    logits: Tensor, teacher_temp: float | Tensor, global_rows: Tensor | float, n_iterations: int = 3
) -> Tensor:
    """Sinkhorn-Knopp assignment of ``logits [N, K]`` to ``K`` prototypes, as in DINOv2 / SwAV.

    Computes ``Q = exp(logits / teacher_temp)`` (K x rows over all ranks), normalises it to total mass 1,
    then ``n_iterations`` times scales every prototype (row of ``Q``) to mass ``1/K`` — row sums are
    reduced across ranks — and every sample (column) to mass ``1/global_rows``. The returned ``[N, K]``
    rows each sum to 1. ``global_rows`` is the number of samples on all ranks together.

    The logits are shifted by their global maximum before ``exp`` (an exact no-op after the first
    normalisation) so that small temperatures cannot overflow fp32. Runs in float32, without gradient.
    """
    _check_temperature("teacher_temp", teacher_temp)
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects logits [N, K], got shape {tuple(logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    with autocast_off(logits):
        x = logits.float()
        local_max = x.max() if x.numel() > 0 else x.new_full((), float("-inf"))
        shift = all_reduce_max(local_max.reshape(1).clone())
        q = torch.exp((x - shift) / teacher_temp).t()  # [K, N]: prototypes x samples, as in the paper
        n_prototypes = q.shape[0]

        total = all_reduce_sum(q.sum().reshape(1))
        q /= total
        for _ in range(n_iterations):
            # every prototype receives mass 1/K over the global batch
            row_sums = all_reduce_sum(q.sum(dim=1, keepdim=True))
            q /= row_sums
            q /= n_prototypes
            # every sample carries mass 1/B (columns are local to this rank)
            q /= q.sum(dim=0, keepdim=True)
            q /= global_rows
        q *= global_rows  # columns sum to 1: an assignment per sample
        return q.t()


class DINOLoss(CenterEMA, nn.Module):
    """DINO class-token loss with softmax centring (EMA ``center``) or Sinkhorn-Knopp targets.

    Args:
        out_dim: number of prototypes ``K``.
        student_temp: temperature of the student softmax.
        center_momentum: EMA momentum of the centre (``center = m * center + (1 - m) * batch_mean``).

    The centre is a buffer ``[1, K]`` (saved in ``state_dict``). Call order per step, as in DINOv2:
    :meth:`softmax_center_teacher` with this step's teacher logits (centred by the centre of the
    previous steps), then :meth:`update_center` with the same logits.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        _check_temperature("student_temp", student_temp)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _check_logits(self, name: str, t: Tensor) -> None:
        if t.ndim != 2 or t.shape[1] != self.out_dim:
            raise ValueError(f"{name} must have shape [N, {self.out_dim}], got {tuple(t.shape)}")

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float | Tensor) -> Tensor:
        """``softmax((teacher_logits [N, K] - center) / teacher_temp)`` -> ``[N, K]`` fp32 probabilities."""
        self._check_logits("teacher_logits", teacher_logits)
        _check_temperature("teacher_temp", teacher_temp)
        with autocast_off(teacher_logits):
            return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: Tensor, teacher_temp: float | Tensor, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets ``[N, K]`` for ``teacher_logits [N, K]``; global batch = ``N * world_size``.

        Every rank must hold the same ``N`` (the DINOv2 convention for class tokens).
        """
        self._check_logits("teacher_logits", teacher_logits)
        global_rows = float(teacher_logits.shape[0] * get_world_size())
        return sinkhorn_knopp(teacher_logits, teacher_temp, global_rows, n_iterations)

    def forward(self, student_list: Sequence[Tensor], teacher_list: Sequence[Tensor]) -> Tensor:
        """Sum over all (student, teacher) pairs of the batch-mean cross-entropy.

        Args:
            student_list: student logits, each ``[B, K]`` (one entry per student crop).
            teacher_list: teacher probabilities, each ``[B, K]`` (one entry per teacher crop); treated
                as constants (no gradient reaches them).

        Returns:
            scalar fp32 ``-sum_s sum_t mean_b sum_k t * log_softmax(s / student_temp)``.
        """
        if len(student_list) == 0 or len(teacher_list) == 0:
            raise ValueError(
                f"DINOLoss needs at least one student and one teacher tensor, got {len(student_list)} "
                f"and {len(teacher_list)}"
            )
        for i, s in enumerate(student_list):
            self._check_logits(f"student_list[{i}]", s)
        shape = student_list[0].shape
        for i, t in enumerate(teacher_list):
            if t.shape != shape:
                raise ValueError(
                    f"teacher_list[{i}] has shape {tuple(t.shape)}, student_list[0] has {tuple(shape)}"
                )
        for i, s in enumerate(student_list):
            if s.shape != shape:
                raise ValueError(f"student_list[{i}] has shape {tuple(s.shape)}, expected {tuple(shape)}")
        return self.cross_entropy_all_pairs(
            torch.stack(list(student_list)) if len(student_list) > 1 else student_list[0].unsqueeze(0),
            torch.stack([t.detach() for t in teacher_list]) if len(teacher_list) > 1
            else teacher_list[0].detach().unsqueeze(0),
        )

    def cross_entropy_all_pairs(self, student: Tensor, teacher: Tensor) -> Tensor:
        """:meth:`forward` on stacked crops: ``student [S, B, K]`` logits, ``teacher [T, B, K]`` probabilities.

        Every (student crop, teacher crop) pair counts, so the sum over pairs is
        ``-sum_{s,b,k} log_softmax(student / student_temp)[s, b, k] * (sum_t teacher[t, b, k]) / B``:
        one log-softmax over all student crops and one contraction, a handful of kernels instead of
        ~5 per pair (the GPU step is launch-bound). A crop-major ``[S*B, K]`` tensor can be passed as
        ``x.view(S, B, K)`` without a copy.
        """
        if student.ndim != 3 or teacher.ndim != 3 or student.shape[1:] != teacher.shape[1:]:
            raise ValueError(f"student [S, B, K] and teacher [T, B, K] must agree in B and K, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.shape[-1] != self.out_dim:
            raise ValueError(f"student must have K = {self.out_dim} prototypes, got shape {tuple(student.shape)}")
        with autocast_off(student):
            log_p = F.log_softmax(student.float() / self.student_temp, dim=-1)  # [S, B, K]
            t_sum = teacher.detach().float().sum(dim=0)  # [B, K]
            return -torch.einsum("sbk,bk->", log_p, t_sum) / student.shape[1]

    def crop_pairs(self, global_logits: Tensor, local_logits: Tensor, teacher: Sequence[Tensor]) -> Tensor:
        """DINOv2's pairing of one step's crops: ``sum over the pairs of mean_b CE``.

        Args:
            global_logits: the student's ``[2B, K]`` logits of the two global crops (crop-major).
            local_logits: ``[nL*B, K]`` logits of the ``nL`` local crops (crop-major; ``nL`` may be 0).
            teacher: the teacher's two ``[B, K]`` probabilities, already swapped (the first is matched with the
                student's first global crop).

        Returns:
            scalar fp32: each global crop against its teacher crop, each local crop against both (the caller
            divides by the number of pairs, ``2 + 2 * nL``).
        """
        b, k = teacher[0].shape
        n_local = local_logits.shape[0] // b if b else 0
        local = (  # every local crop against both teacher crops
            self.cross_entropy_all_pairs(local_logits.view(n_local, b, k), torch.stack(list(teacher)))
            if n_local > 0 else local_logits.new_zeros((), dtype=torch.float32)
        )
        return local + self([global_logits], [torch.cat(list(teacher))]) * 2

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA update of ``center [1, K]`` with the mean of ``teacher_logits [N, K]`` over all ranks.

        Synchronous: ``batch_center = all_reduce_sum(sum_n t[n]) / all_reduce_sum(N)`` (:class:`CenterEMA`;
        deferred to the end of a step while accumulating); every rank must call it.
        """
        self._check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[0] == 0:
            raise ValueError("update_center needs at least one teacher row, got shape [0, K]")
        with autocast_off(teacher_logits):
            t = teacher_logits.float()
            self._add_center_stats(torch.cat([t.sum(dim=0), t.new_full((1,), float(t.shape[0]))]))
