"""Small helpers shared by the loss modules."""

from __future__ import annotations

import contextlib

import torch

from fastdinov2.distributed import all_reduce_sum


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Disable autocast for ``t``'s device (losses are computed in fp32). A no-op on the ``meta`` device,
    where autocast does not exist (``fastdinov2 flops`` counts FLOPs there)."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


class CenterEMA:
    """Softmax-centring EMA shared by the DINO and iBOT losses (a mixin for a module with a ``center [1, K]``
    buffer and a ``center_momentum``).

    A batch contributes its rows' per-prototype logit sum and its row count, packed ``[K + 1]``; the sums and
    counts of all ranks are reduced together (one collective), so ranks may hold different row counts, and
    ``center = m * center + (1 - m) * (sum / count)`` (left unchanged when no rank has a row).

    Between :meth:`begin_center_accumulation` and :meth:`end_center_accumulation` the contributions are only
    summed, then applied once: with gradient accumulation every micro-batch of a step is centred with the
    centre from before the step and the step makes one update from all its rows — what one large batch does.
    """

    center: torch.Tensor
    center_momentum: float
    _pending_center: torch.Tensor | None = None

    def begin_center_accumulation(self) -> None:
        self._pending_center = torch.zeros(self.center.shape[-1] + 1, device=self.center.device)

    def end_center_accumulation(self) -> None:
        packed, self._pending_center = self._pending_center, None
        if packed is not None:
            self._apply_center_stats(packed)

    def _add_center_stats(self, local_packed: torch.Tensor) -> None:
        """``local_packed [K + 1]`` fp32: this rank's per-prototype logit sum and its row count."""
        if self._pending_center is not None:
            self._pending_center.add_(local_packed)
        else:
            self._apply_center_stats(local_packed)

    def _apply_center_stats(self, local_packed: torch.Tensor) -> None:
        packed = all_reduce_sum(local_packed)  # every rank calls it: a cross-rank reduction
        count = packed[-1:]
        batch_center = (packed[:-1] / count.clamp(min=1.0)).unsqueeze(0)  # [1, K]
        m = torch.where(count > 0, self.center_momentum, 1.0)
        self.center.mul_(m).add_(batch_center * (1.0 - m))
