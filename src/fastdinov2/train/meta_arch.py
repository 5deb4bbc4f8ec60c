"""Student and EMA teacher, and the DINO + iBOT + KoLeo objective of one training step.

The student is one ``nn.Module`` whose ``forward`` runs every student computation of a step, so DDP or
FSDP2 can wrap it from outside (``distributed`` module). The teacher is a copy of it that is never
trained: its weights follow the student by EMA (:meth:`MetaArch.update_teacher`).

Loss bookkeeping follows DINOv2: the teacher's two global-crop outputs are swapped so student crop 1 is
matched with teacher crop 2; the DINO loss is averaged over its ``2 + 2 * n_local`` crop pairs; the iBOT
loss weights every masked token by 1 / (masked tokens of its image); KoLeo acts on the student's
backbone CLS tokens of each global crop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from fastdinov2.config import Config
from fastdinov2.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from fastdinov2.models.heads import DINOHead
from fastdinov2.models.vit import build_backbone


def _head(cfg_head: Any, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim,
        cfg_head.head_n_prototypes,
        nlayers=cfg_head.head_nlayers,
        hidden_dim=cfg_head.head_hidden_dim,
        bottleneck_dim=cfg_head.head_bottleneck_dim,
    )


class StudentTeacherModel(nn.Module):
    """Backbone + DINO head (+ a separate iBOT head when configured). ``forward`` is the student pass."""

    def __init__(self, cfg: Config, teacher: bool = False) -> None:
        super().__init__()
        student_cfg = dataclasses.replace(cfg.student, drop_path_rate=0.0) if teacher else cfg.student
        self.backbone = build_backbone(student_cfg, img_size=cfg.crops.global_crops_size)
        dim = self.backbone.embed_dim
        self.dino_head = _head(cfg.dino, dim)
        self.ibot_head = _head(cfg.ibot, dim) if cfg.ibot.separate_head else None

    def heads(self, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Project CLS tokens [N,D] and masked patch tokens [M,D] to prototype logits ([N,K], [M,K'])."""
        if self.ibot_head is None:  # one shared head: one call on the concatenation
            out = self.dino_head(torch.cat([cls_tokens, patch_tokens]))
            return out[: cls_tokens.shape[0]], out[cls_tokens.shape[0] :]
        return self.dino_head(cls_tokens), self.ibot_head(patch_tokens)

    def forward(
        self, global_crops: Tensor, local_crops: Tensor, masks: Tensor, mask_indices: Tensor
    ) -> dict[str, Tensor]:
        """Student pass.

        Args:
            global_crops: [2B,3,G,G]; local_crops: [nL*B,3,L,L] (nL may be 0);
            masks: bool [2B,N] iBOT masks of the global crops; mask_indices: [M] flat indices into [2B*N].
        Returns:
            ``global_cls`` [2B,D] backbone CLS tokens, ``global_logits`` [2B,K], ``local_logits`` [nL*B,K],
            ``masked_patch_logits`` [M,K'].
        """
        g = self.backbone.forward_features(global_crops, masks=masks)
        cls_g = g["x_norm_clstoken"]
        patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        if local_crops.shape[0] > 0:
            cls_l = self.backbone.forward_features(local_crops)["x_norm_clstoken"]
        else:
            cls_l = cls_g.new_zeros((0, cls_g.shape[1]))
        cls_logits, patch_logits = self.heads(torch.cat([cls_g, cls_l]), patches)
        n_g = cls_g.shape[0]
        return {
            "global_cls": cls_g,
            "global_logits": cls_logits[:n_g],
            "local_logits": cls_logits[n_g:],
            "masked_patch_logits": patch_logits,
        }


class MetaArch(nn.Module):
    """Student, teacher and the three losses (with their centres)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = StudentTeacherModel(cfg)
        self.teacher = StudentTeacherModel(cfg, teacher=True)  # same weights, no stochastic depth
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self.ibot_loss = iBOTPatchLoss(ibot_k)
        self.koleo_loss = KoLeoLoss()

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, mask_indices: Tensor, n_masked: int, teacher_temp: float
    ) -> tuple[list[Tensor], Tensor]:
        """Teacher probabilities: per global crop ``[B,K]`` (swapped: crop 2 first) and masked patches ``[M,K']``.

        Also updates the softmax-centring centres (a no-op for Sinkhorn-Knopp).
        """
        t = self.teacher
        out = t.backbone.forward_features(global_crops)
        cls = out["x_norm_clstoken"]
        b = cls.shape[0] // 2
        cls = torch.cat([cls[b:], cls[:b]])  # match student crop 1 with teacher crop 2 and vice versa
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        cls_logits, patch_logits = t.heads(cls, patches)
        if self.cfg.dino.centering == "sinkhorn_knopp":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            n_masked_t = torch.tensor(n_masked, device=patch_logits.device, dtype=torch.long)
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, n_masked_t)
        else:
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.ibot_loss.update_center(patch_logits)  # every rank calls it: it is a cross-rank reduction
        return list(cls_probs.chunk(2)), patch_probs

    def compute_losses(
        self, student_out: dict[str, Tensor], teacher_cls: list[Tensor], teacher_patch: Tensor,
        masks: Tensor, masks_weight: Tensor, n_local: int,
    ) -> dict[str, Tensor]:
        """All loss terms (scalars) from the student outputs and teacher targets."""
        cfg = self.cfg
        n_terms = 2 + 2 * n_local  # DINO crop pairs: 2 global-global + 2 per local crop
        local = student_out["local_logits"]
        dino_local = (
            self.dino_loss(list(local.chunk(n_local)), teacher_cls) if n_local > 0 else local.new_zeros(())
        )
        dino_global = self.dino_loss([student_out["global_logits"]], [torch.cat(teacher_cls)]) * 2
        dino = (dino_local + dino_global) / n_terms
        n_masked = student_out["masked_patch_logits"].shape[0]
        if n_masked > 0:
            ibot = self.ibot_loss.forward_masked(
                student_out["masked_patch_logits"], teacher_patch, masks, n_masked_patches=n_masked,
                masks_weight=masks_weight,
            )
        else:
            ibot = dino.new_zeros(())
        koleo = sum(self.koleo_loss(p) for p in student_out["global_cls"].chunk(2))
        assert isinstance(koleo, Tensor)
        total = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_loss_weight * koleo
        return {"loss": total, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo}

    @torch.no_grad()
    def update_teacher(self, momentum: float, student: nn.Module | None = None) -> None:
        """EMA: teacher = momentum * teacher + (1 - momentum) * student (one foreach kernel per call)."""
        src = student if student is not None else self.student
        t_params = [p for p in self.teacher.parameters()]
        s_params = [p.detach() for p in src.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
