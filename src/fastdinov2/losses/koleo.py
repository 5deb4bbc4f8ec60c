"""KoLeo regulariser: spread the student's class tokens by maximising the log nearest-neighbour distance.

Reference: Sablayrolles et al., "Spreading vectors for similarity search" (ICLR 2019), the
Kozachenko-Leonenko differential entropy estimator; used in Oquab et al., "DINOv2" (TMLR 2024).

Shapes: ``x [B, D]`` (features of one crop of ``B >= 2`` images on this rank) -> scalar
``-mean_i log(||x_i - x_nn(i)|| + eps)`` with ``x`` L2-normalised and ``nn(i)`` the other row of
largest dot product. Per rank, as DINOv2: nothing is gathered across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdinov2.losses.common import autocast_off


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser on L2-normalised features ``[B, D]`` -> scalar (fp32)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    @torch.no_grad()
    def nearest_neighbours(x: Tensor) -> Tensor:
        """Index ``[B]`` of each row's nearest other row of L2-normalised ``x [B, D]`` (max dot product)."""
        dots = x @ x.t()
        dots.fill_diagonal_(float("-inf"))  # a point is not its own neighbour
        return dots.argmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """``-mean_i log(dist(x_i, x_nn(i)) + eps)`` for ``x [B, D]``, ``B >= 2``; computed in fp32."""
        if x.ndim != 2:
            raise ValueError(f"KoLeoLoss expects features [B, D], got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs at least 2 samples per rank to find a nearest neighbour, got {x.shape[0]} "
                "(raise the per-GPU batch size or set dino.koleo_loss_weight=0)"
            )
        with autocast_off(x):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            nn_index = self.nearest_neighbours(x)
            distances = F.pairwise_distance(x, x[nn_index], p=2, eps=self.eps)  # [B]
            return -torch.log(distances + self.eps).mean()
