"""Student and EMA teacher, and the DINO + iBOT + KoLeo objective of one training step.

The student is one ``nn.Module`` whose ``forward`` runs every student computation of a step, so DDP or
FSDP2 can wrap it from outside (``distributed`` module). The teacher is a copy of it that is never
trained: its weights follow the student by EMA (:meth:`MetaArch.update_teacher`).

Loss bookkeeping follows DINOv2: the teacher's two global-crop outputs are swapped so student crop 1 is
matched with teacher crop 2; the DINO loss is averaged over its ``2 + 2 * n_local`` crop pairs; the iBOT
loss weights every masked token by 1 / (masked tokens of its image); KoLeo acts on the student's
backbone CLS tokens of each global crop.

With ``ibot.loss_chunk_rows > 0`` (and softmax centring) the iBOT term is computed by
:func:`fastdinov2.losses.chunked.chunked_ibot_loss` from the heads' normalised bottleneck features of the
masked tokens and the prototype weights, chunk by chunk, so no ``[M, K]`` logits or probabilities are
formed; the student forward then returns ``masked_patch_features`` and ``ibot_prototypes`` instead of
``masked_patch_logits``, and the teacher targets are an :class:`IbotChunkTargets`.

With ``ibot.fused_loss=true`` on a CUDA device (with Triton) the iBOT term and its centre statistic come from
the Triton row kernels of :mod:`fastdinov2.losses.fused`, which read the ``[M, K]`` logits in the heads' dtype;
the teacher targets are then an :class:`IbotLogitTargets` (teacher logits + centre), not probabilities. With
``dino.fused_loss=true`` the DINO term is :func:`fastdinov2.losses.fused.fused_dino_loss` over the student's
class-token logits of all crops at once (``cls_logits``), in the heads' dtype.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastdinov2.config import Config, tristate
from fastdinov2.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from fastdinov2.losses.chunked import chunked_ibot_loss, teacher_logit_sum
from fastdinov2.losses.fused import fused_dino_loss, fused_ibot_loss, fused_loss_available, masked_column_sum
from fastdinov2.models.heads import DINOHead
from fastdinov2.models.vit import build_backbone
from fastdinov2.train.flat_params import FlatParameters, flatten_pair


def _head(cfg_head: Any, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim,
        cfg_head.head_n_prototypes,
        nlayers=cfg_head.head_nlayers,
        hidden_dim=cfg_head.head_hidden_dim,
        bottleneck_dim=cfg_head.head_bottleneck_dim,
    )


def ibot_chunk_rows(cfg: Config) -> int:
    """Rows per chunk of the chunked iBOT loss, or 0 for the reference path (always with Sinkhorn-Knopp,
    whose targets need all ``[M, K]`` teacher logits at once)."""
    return 0 if cfg.dino.centering == "sinkhorn_knopp" else cfg.ibot.loss_chunk_rows


@dataclasses.dataclass
class IbotChunkTargets:
    """Teacher side of the chunked iBOT loss: the targets ``softmax((features @ weight.T - center) /
    teacher_temp)`` are formed chunk by chunk inside the loss.

    ``features [M, D]`` normalised bottleneck of the masked tokens, ``weight [K, D]`` prototype weight,
    ``center [1, K]`` the iBOT centre before this step's update (all without gradient).
    """

    features: Tensor
    weight: Tensor
    center: Tensor
    teacher_temp: float | Tensor


@dataclasses.dataclass
class IbotLogitTargets:
    """Teacher side of the fused iBOT loss (``ibot.fused_loss``): the targets
    ``softmax((logits - center) / teacher_temp)`` are recomputed inside the loss's kernels.

    ``logits [M, K]`` the masked tokens' teacher logits (heads' dtype), ``center [1, K]`` the iBOT centre
    before this step's update (a copy), ``teacher_temp`` a number or a 0-d device tensor.
    """

    logits: Tensor
    center: Tensor
    teacher_temp: float | Tensor


class StudentTeacherModel(nn.Module):
    """Backbone + DINO head (+ a separate iBOT head when configured). ``forward`` is the student pass."""

    def __init__(self, cfg: Config, teacher: bool = False) -> None:
        super().__init__()
        student_cfg = dataclasses.replace(cfg.student, drop_path_rate=0.0) if teacher else cfg.student
        self.backbone = build_backbone(student_cfg, img_size=cfg.crops.global_crops_size)
        self.backbone.half_residual = cfg.compute.half_residual  # a compute option, not part of the weights
        dim = self.backbone.embed_dim
        self.dino_head = _head(cfg.dino, dim)
        self.ibot_head = _head(cfg.ibot, dim) if cfg.ibot.separate_head else None
        self.ibot_chunk_rows = ibot_chunk_rows(cfg)
        # compute.pack_crops: the student's global and local crops share one pass through the blocks
        self.pack_crops = cfg.compute.pack_crops

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """Regional compilation, in place (``nn.Module.compile``: parameter names and checkpoints unchanged):
        every transformer block and each head. The blocks run the same code, so one compilation per input
        shape serves all of them (compiling the whole backbone instead traces every block), and within a
        block the elementwise work around the matmuls (LayerNorm, casts, GELU, layer scale, residual) is
        fused into a few kernels."""
        # one cache entry per (input shape, train/eval, grad mode) and module kind: more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # blocks see a few token counts per stage (global, local): static kernels for each; the heads see a
        # masked-token count that changes every batch, so theirs become dynamic after the first change
        block_kw = {"dynamic": False, **compile_kwargs}
        for blk in self.backbone.blocks:
            blk.compile(**block_kw)
        self.dino_head.compile(**compile_kwargs)
        if self.ibot_head is not None:
            self.ibot_head.compile(**compile_kwargs)

    def heads(self, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Project CLS tokens [N,D] and masked patch tokens [M,D] to prototype logits ([N,K], [M,K'])."""
        if self.ibot_head is None:  # one shared head: one call on the concatenation
            out = self.dino_head(torch.cat([cls_tokens, patch_tokens]))
            cls_out, patch_out = out.split([cls_tokens.shape[0], patch_tokens.shape[0]])  # backward: one cat
            return cls_out, patch_out
        return self.dino_head(cls_tokens), self.ibot_head(patch_tokens)

    def heads_features(self, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For the chunked iBOT loss: CLS logits ``[N,K]``, the masked patches' normalised bottleneck
        features ``[M,D']`` and the effective iBOT prototype weight ``[K',D']`` (each head called once,
        through ``forward``, so DDP/FSDP2 hooks see the weight's use)."""
        if self.ibot_head is None:
            out = self.dino_head(torch.cat([cls_tokens, patch_tokens]), features_from=cls_tokens.shape[0])
        else:
            _, feats, weight = self.ibot_head(patch_tokens, features_from=0)
            out = (self.dino_head(cls_tokens), feats, weight)
        return out[0], out[1], out[2]

    def forward(
        self, global_crops: Tensor, local_crops: Tensor, masks: Tensor, mask_indices: Tensor
    ) -> dict[str, Tensor]:
        """Student pass.

        Args:
            global_crops: [2B,3,G,G]; local_crops: [nL*B,3,L,L] (nL may be 0);
            masks: bool [2B,N] iBOT masks of the global crops; mask_indices: [M] flat indices into [2B*N].
        Returns:
            ``global_cls`` [2B,D] backbone CLS tokens, ``cls_logits`` [2B+nL*B,K] (global crops, then local), the
            same split into ``global_logits`` [2B,K] and ``local_logits`` [nL*B,K],
            ``masked_patch_logits`` [M,K']; with the chunked iBOT loss (``ibot.loss_chunk_rows > 0``)
            instead of the last: ``masked_patch_features`` [M,D'] (normalised bottleneck) and
            ``ibot_prototypes`` [K',D'] (the effective prototype weight, with gradient).
        """
        if local_crops.shape[0] > 0 and self.pack_crops:  # one pass through the blocks for both crop sizes
            g, loc = self.backbone.forward_features([global_crops, local_crops], masks=[masks, None])
            cls_l = loc["x_norm_clstoken"]
        else:
            g = self.backbone.forward_features(global_crops, masks=masks)
            cls_l = (self.backbone.forward_features(local_crops)["x_norm_clstoken"] if local_crops.shape[0] > 0
                     else g["x_norm_clstoken"].new_zeros((0, g["x_norm_clstoken"].shape[1])))
        cls_g = g["x_norm_clstoken"]
        patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        n_g = cls_g.shape[0]
        n_l = cls_l.shape[0]
        # split, not slices: the backward of a split is one concatenation (slices zero-fill full-size gradients)
        if self.ibot_chunk_rows > 0:
            cls_logits, feats, prototypes = self.heads_features(torch.cat([cls_g, cls_l]), patches)
            global_logits, local_logits = cls_logits.split([n_g, n_l])
            return {
                "global_cls": cls_g,
                "cls_logits": cls_logits,
                "global_logits": global_logits,
                "local_logits": local_logits,
                "masked_patch_features": feats,
                "ibot_prototypes": prototypes,
            }
        cls_logits, patch_logits = self.heads(torch.cat([cls_g, cls_l]), patches)
        global_logits, local_logits = cls_logits.split([n_g, n_l])
        return {
            "global_cls": cls_g,
            "cls_logits": cls_logits,
            "global_logits": global_logits,
            "local_logits": local_logits,
            "masked_patch_logits": patch_logits,
        }


#: the "auto" / true / false keys that put a loss term on the Triton kernels, and the term's name
FUSED_LOSS_TERMS = {"ibot.fused_loss": "iBOT", "dino.fused_loss": "DINO"}


def fused_loss_auto(cfg: Config, device: torch.device, key: str = "ibot.fused_loss") -> bool:
    """What ``ibot.fused_loss=auto`` means on ``device``: the fused Triton loss on CUDA with Triton installed,
    softmax centring and no chunked iBOT loss (``ibot.loss_chunk_rows=0``); the reference path elsewhere.
    ``key="dino.fused_loss"``: CUDA with Triton (its targets are probabilities, whatever the centring)."""
    if key == "dino.fused_loss":
        return device.type == "cuda" and fused_loss_available(device)
    return (device.type == "cuda" and cfg.dino.centering == "softmax" and cfg.ibot.loss_chunk_rows == 0
            and fused_loss_available(device))


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
        self._warned_fused_fallback: set[str] = set()  # keys warned about (fused loss asked, not possible)
        self._flat: tuple[FlatParameters, FlatParameters] | None = None  # (student, teacher): flatten_parameters
        if cfg.ibot.loss_chunk_rows > 0 and ibot_chunk_rows(cfg) == 0:
            warnings.warn("ibot.loss_chunk_rows is ignored with dino.centering=sinkhorn_knopp (its targets need "
                          "all [M, K] teacher logits); the iBOT loss uses the reference path", stacklevel=2)

    def flatten_parameters(self) -> None:
        """Lay the student's and the teacher's parameters out in one buffer each (same layout), so that
        :meth:`update_teacher` is one kernel moving 12 bytes per parameter instead of three multi-tensor passes
        moving 32 (:mod:`fastdinov2.train.flat_params`). Call it after the model reached its device and before
        anything that replaces parameters (FSDP); if something does, the EMA notices and uses the passes."""
        self._flat = flatten_pair(self.student, self.teacher)

    def compile_regions(self, **compile_kwargs: Any) -> None:
        """``compute.compile=blocks``: regional compilation in place. Every block and head of the student and
        the teacher (:meth:`StudentTeacherModel.compile_blocks`), the loss terms (:meth:`compute_losses`:
        cast, temperature, log-softmax and cross-entropy over the ``[M, K]`` logits fused into a few passes,
        its backward compiled by AOTAutograd) and the teachers' softmax centring. The centre updates and
        everything with a cross-rank reduction stay eager."""
        for model in (self.student, self.teacher):
            model.compile_blocks(**compile_kwargs)
        self.compute_losses = torch.compile(self.compute_losses, **compile_kwargs)  # type: ignore[method-assign]
        for loss in (self.dino_loss, self.ibot_loss):
            loss.softmax_center_teacher = torch.compile(  # type: ignore[method-assign]
                loss.softmax_center_teacher, **compile_kwargs
            )

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, mask_indices: Tensor, n_masked: int, teacher_temp: float | Tensor,
        masks_weight: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor | IbotChunkTargets | IbotLogitTargets]:
        """Teacher probabilities: per global crop ``[B,K]`` (swapped: crop 2 first) and masked patches ``[M,K']``
        (with ``ibot.loss_chunk_rows > 0``: an :class:`IbotChunkTargets` instead of the ``[M,K']`` tensor; with
        ``ibot.fused_loss`` on CUDA: an :class:`IbotLogitTargets`).

        Also updates the softmax-centring centres (a no-op for Sinkhorn-Knopp). The real masked rows are the
        first ``n_masked``; with ``masks_weight [M]`` given they are read from it instead (``> 0``; padding rows
        weigh 0), so the softmax-centring path depends on no per-batch Python number — what a compiled step
        or a CUDA graph needs. ``teacher_temp`` may be a 0-d tensor on the device for the same reason.
        """
        t = self.teacher
        out = t.backbone.forward_features(global_crops)
        cls = out["x_norm_clstoken"]
        b = cls.shape[0] // 2
        cls = torch.cat([cls[b:], cls[:b]])  # match student crop 1 with teacher crop 2 and vice versa
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        if masks_weight is not None:
            valid: Tensor | None = masks_weight > 0
        elif patches.shape[0] != n_masked:  # rows after the first n_masked are padding (weight 0)
            valid = torch.arange(patches.shape[0], device=patches.device) < n_masked
        else:
            valid = None
        if t.ibot_chunk_rows > 0:
            if valid is None:
                valid = torch.ones(patches.shape[0], dtype=torch.bool, device=patches.device)
            return self._chunked_teacher_targets(cls, patches, valid, teacher_temp)
        cls_logits, patch_logits = t.heads(cls, patches)
        if self.cfg.dino.centering == "sinkhorn_knopp":
            padded = patch_logits.shape[0] != n_masked
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits[:n_masked], teacher_temp, n_masked)
            if padded:
                patch_probs = torch.nn.functional.pad(patch_probs, (0, 0, 0, patch_logits.shape[0] - n_masked))
        else:
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            if self._use_fused("ibot.fused_loss", patch_logits.device):
                return list(cls_probs.chunk(2)), self._fused_teacher_targets(patch_logits, valid, teacher_temp)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.ibot_loss.update_center(patch_logits, valid)  # every rank calls it: a cross-rank reduction
        return list(cls_probs.chunk(2)), patch_probs

    def targets_and_student(
        self, student: Callable[..., dict[str, Tensor]], global_crops: Tensor, local_crops: Tensor, masks: Tensor,
        mask_indices: Tensor, n_masked: int, teacher_temp: float | Tensor, masks_weight: Tensor | None = None,
        teacher_stream: torch.cuda.Stream | None = None,
    ) -> tuple[tuple[list[Tensor], Tensor | IbotChunkTargets | IbotLogitTargets], dict[str, Tensor]]:
        """:meth:`teacher_targets` and ``student(global_crops, local_crops, masks, mask_indices)`` of one
        micro-batch (shapes as there): ``((teacher cls, teacher patches), student outputs)``.

        With ``teacher_stream`` (``compute.overlap_teacher``) the teacher's work is queued on that CUDA stream
        after everything already queued on the current one (the EMA update, the colour augmentation, the
        schedules), the student's on the current stream, which then waits for the teacher before the losses.
        Nothing else touches the teacher's tensors in between: its inputs live until the step ends, and its
        outputs are only read after the wait, so no allocation of one stream can overwrite the other's data.
        Under CUDA-graph capture the two streams become two branches of the graph.
        """
        if teacher_stream is None:
            targets = self.teacher_targets(global_crops, mask_indices, n_masked, teacher_temp, masks_weight)
            return targets, student(global_crops, local_crops, masks, mask_indices)
        main = torch.cuda.current_stream(global_crops.device)
        teacher_stream.wait_stream(main)
        with torch.cuda.stream(teacher_stream):
            targets = self.teacher_targets(global_crops, mask_indices, n_masked, teacher_temp, masks_weight)
        out = student(global_crops, local_crops, masks, mask_indices)
        main.wait_stream(teacher_stream)
        return targets, out

    def _use_fused(self, key: str, device: torch.device) -> bool:
        """Whether ``key`` (``ibot.fused_loss`` or ``dino.fused_loss``) puts its loss term on the Triton kernels
        for tensors on ``device``: "auto" decides by :func:`fused_loss_auto`; true needs the kernels to run on
        ``device`` (else, once per key, a warning and the reference path)."""
        section, _, field = key.partition(".")
        mode = tristate(getattr(getattr(self.cfg, section), field), key)
        if mode is None:
            return fused_loss_auto(self.cfg, device, key)
        if not mode:
            return False
        if fused_loss_available(device):
            return True
        if key not in self._warned_fused_fallback and device.type != "meta":
            self._warned_fused_fallback.add(key)
            warnings.warn(f"{key}=true needs a CUDA device and Triton (logits on {device}); the "
                          f"{FUSED_LOSS_TERMS[key]} loss uses the reference path", stacklevel=4)
        return False

    @torch.no_grad()
    def _fused_teacher_targets(
        self, patch_logits: Tensor, valid: Tensor | None, teacher_temp: float | Tensor
    ) -> IbotLogitTargets:
        """:meth:`teacher_targets`' iBOT side for the fused loss: a copy of the centre before its update, then
        the update from the valid rows' fp32 column sum of the ``[M, K]`` logits (one Triton pass)."""
        center = self.ibot_loss.center.clone()
        if valid is None:
            weights = torch.ones(patch_logits.shape[0], device=patch_logits.device)
            count: Tensor | float = float(patch_logits.shape[0])
        else:
            weights = valid.to(torch.float32)
            count = weights.sum()
        self.ibot_loss.update_center_from_sum(masked_column_sum(patch_logits, weights), count)  # cross-rank
        return IbotLogitTargets(patch_logits, center, teacher_temp)

    @torch.no_grad()
    def _chunked_teacher_targets(
        self, cls: Tensor, patches: Tensor, valid: Tensor, teacher_temp: float | Tensor
    ) -> tuple[list[Tensor], IbotChunkTargets]:
        """:meth:`teacher_targets` for the chunked iBOT loss, from the (swapped) CLS tokens ``[2B,D]`` and
        masked patch tokens ``[M,D]``; ``valid`` (bool ``[M]``) marks the real rows (the rest is padding)."""
        cls_logits, feats, weight = self.teacher.heads_features(cls, patches)
        cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
        self.dino_loss.update_center(cls_logits)
        targets = IbotChunkTargets(feats, weight, self.ibot_loss.center.clone(), teacher_temp)
        self.ibot_loss.update_center_from_sum(*teacher_logit_sum(feats, weight, valid))  # cross-rank
        return list(cls_probs.chunk(2)), targets

    def compute_losses(
        self, student_out: dict[str, Tensor], teacher_cls: list[Tensor],
        teacher_patch: Tensor | IbotChunkTargets | IbotLogitTargets,
        masks: Tensor, masks_weight: Tensor, n_local: int,
    ) -> dict[str, Tensor]:
        """All loss terms (scalars) from the student outputs and teacher targets."""
        cfg = self.cfg
        n_terms = 2 + 2 * n_local  # DINO crop pairs: 2 global-global + 2 per local crop
        local = student_out["local_logits"]
        if self._use_fused("dino.fused_loss", local.device):
            pairs = fused_dino_loss(student_out["cls_logits"], teacher_cls, student_temp=self.dino_loss.student_temp)
        else:
            pairs = self.dino_loss.crop_pairs(student_out["global_logits"], local, teacher_cls)
        dino = pairs / n_terms
        patch_logits = student_out.get("masked_patch_logits")
        if isinstance(teacher_patch, IbotChunkTargets):
            ibot = self._chunked_ibot(student_out, teacher_patch, masks, masks_weight)
        elif patch_logits is None or patch_logits.shape[0] == 0:  # no masked token: the iBOT head gets no gradient
            ibot = dino.new_zeros(())
        elif isinstance(teacher_patch, IbotLogitTargets):
            ibot = fused_ibot_loss(
                patch_logits, teacher_patch.logits, teacher_patch.center, masks_weight,
                teacher_temp=teacher_patch.teacher_temp, student_temp=self.ibot_loss.student_temp,
                n_images=masks.shape[0],
            )
        else:
            ibot = self.ibot_loss.forward_masked(
                patch_logits, teacher_patch, masks, n_masked_patches=patch_logits.shape[0], masks_weight=masks_weight,
            )
        koleo = sum(self.koleo_loss(p) for p in student_out["global_cls"].chunk(2))
        assert isinstance(koleo, Tensor)
        total = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_loss_weight * koleo
        return {"loss": total, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo}

    def _chunked_ibot(
        self, student_out: dict[str, Tensor], targets: IbotChunkTargets, masks: Tensor, masks_weight: Tensor
    ) -> Tensor:
        """The iBOT term from bottleneck features (``ibot.loss_chunk_rows`` rows per chunk); equals
        :meth:`iBOTPatchLoss.forward_masked` on the materialised logits and softmax-centred targets."""
        if "masked_patch_features" not in student_out:
            raise ValueError("chunked iBOT teacher targets need the student's masked_patch_features "
                             "(student and teacher built from configs with different ibot.loss_chunk_rows?)")
        feats = student_out["masked_patch_features"]
        if feats.shape[0] == 0:
            return feats.new_zeros((), dtype=torch.float32)
        return chunked_ibot_loss(
            feats, student_out["ibot_prototypes"], targets.features, targets.weight, targets.center,
            masks_weight, teacher_temp=targets.teacher_temp, student_temp=self.ibot_loss.student_temp,
            n_images=masks.shape[0], chunk_rows=self.cfg.ibot.loss_chunk_rows,
        )

    @torch.no_grad()
    def update_teacher(
        self, momentum: float | Tensor, student: nn.Module | None = None, apply: Tensor | None = None
    ) -> None:
        """EMA: ``teacher = momentum * teacher + (1 - momentum) * student``: one lerp kernel over the flat
        buffers after :meth:`flatten_parameters`, else one foreach lerp (Python momentum) or three multi-tensor
        passes (a device momentum or ``apply``).

        ``apply`` (optional bool scalar tensor on the parameters' device): when False the teacher is left
        unchanged. The trainer passes its on-device finiteness flag, so a skipped step needs no host sync.
        ``momentum`` may be a 0-d device tensor (the CUDA-graph step reads its schedules from the device).
        """
        src = student if student is not None else self.student
        # a number, or a device tensor (0 when the step is skipped)
        weight = (1.0 - momentum) if apply is None else apply.to(torch.float32) * (1.0 - momentum)
        if src is self.student and self._flat is not None and all(f.intact() for f in self._flat):
            s_flat, t_flat = self._flat  # one kernel over the two flat buffers (flatten_parameters)
            t_flat.flat.lerp_(s_flat.flat, weight)
            return
        t_params = [p for p in self.teacher.parameters()]
        s_params = [p.detach() for p in src.parameters()]
        if not isinstance(weight, Tensor):
            torch._foreach_lerp_(t_params, s_params, weight)
        else:
            # _foreach_lerp_ has no tensor-weight overload (a tensor would be read back as a Python number):
            # teacher += weight * (student - teacher)
            delta = torch._foreach_sub(s_params, t_params)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(t_params, delta)
