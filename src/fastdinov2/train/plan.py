"""The run's per-step plan: every scheduled value as a precomputed array indexed by global step.

``build_schedules`` turns a config and its :class:`~fastdinov2.curriculum.Curriculum` into arrays for the
learning rate, weight decay, teacher momentum, teacher temperature and the prototype-layer learning rate
(zero while the last layer is frozen). They are pure functions of the step, so resuming at any step,
before, at or after a curriculum switch, reproduces the same values.

Switch modes (``curriculum.switch_mode``):

- ``continuous`` (default): one warm-up + cosine over the whole run, whatever the stages.
- ``restart`` (the paper's scripts, which ran each stage as a separate job): each stage gets its own
  schedules over its own epochs — lr warm-up + cosine, weight-decay cosine, momentum cosine, teacher
  temperature warm-up and last-layer freeze start again — and the trainer resets the optimizer state at
  the switch.

The learning rate is scaled per stage by that stage's global batch (``optim.scaling_rule``), so a stage
with a larger per-GPU batch gets the matching larger lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastdinov2.config import Config
from fastdinov2.curriculum import Curriculum, StagePlan
from fastdinov2.train.schedules import cosine_schedule, linear_warmup_then_constant


@dataclass(frozen=True)
class Schedules:
    """Arrays of length ``total_steps``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray
    backbone_lr_scale: np.ndarray  # 0 during a head-only warm-up (continued pre-training), else 1

    def at(self, step: int) -> dict[str, float]:
        i = min(step, len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "wd": float(self.weight_decay[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
            "last_layer_lr": float(self.last_layer_lr[i]),
            "backbone_lr_scale": float(self.backbone_lr_scale[i]),
        }


def lr_scale(cfg: Config, global_batch: int) -> float:
    """Multiplier turning ``optim.base_lr`` into the lr for ``global_batch`` images per step."""
    ratio = global_batch / cfg.optim.lr_reference_batch
    if cfg.optim.scaling_rule == "sqrt":
        return math.sqrt(ratio)
    if cfg.optim.scaling_rule == "linear":
        return ratio
    return 1.0


def _segment(cfg: Config, cur: Curriculum, stages: list[StagePlan]) -> dict[str, np.ndarray]:
    """Schedules (lr in units of base_lr) spanning ``stages`` as one warm-up + cosine."""
    o, t = cfg.optim, cfg.teacher
    first = stages[0].index
    n = sum(st.num_steps for st in stages)
    warmup = min(n, cur.steps_for_epochs(o.warmup_epochs, first))
    freeze = min(n, cur.steps_for_epochs(o.freeze_last_layer_epochs, first))
    temp_warmup = min(n, cur.steps_for_epochs(t.warmup_teacher_temp_epochs, first))
    # Progress in [0, 1]: linear warm-up 0 -> 1, then half-cosine 1 -> 0; turned into lr by the caller.
    progress = cosine_schedule(1.0, 0.0, n, warmup_steps=warmup)
    in_warmup = np.arange(n) < warmup
    frozen = np.arange(n) < freeze
    return {
        "lr": progress,
        "in_warmup": in_warmup.astype(np.float64),
        "frozen": frozen.astype(np.float64),
        "weight_decay": cosine_schedule(o.weight_decay, o.weight_decay_end, n),
        "momentum": cosine_schedule(t.momentum_teacher, t.final_momentum_teacher, n),
        "teacher_temp": linear_warmup_then_constant(t.warmup_teacher_temp, t.teacher_temp, n, temp_warmup),
    }


def build_schedules(cfg: Config, cur: Curriculum) -> Schedules:
    """Per-step schedules for the whole run (see the module docstring for the switch modes)."""
    if cfg.curriculum.switch_mode == "restart":
        parts = [_segment(cfg, cur, [st]) for st in cur.stages]
    else:
        parts = [_segment(cfg, cur, cur.stages)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # Peak lr of each step: base_lr scaled by its stage's global batch. Warm-up rises from 0 to the peak,
    # the cosine then falls from the peak to optim.min_lr (unscaled, as in DINOv2).
    peak = np.concatenate(
        [np.full(st.num_steps, cfg.optim.base_lr * lr_scale(cfg, st.global_batch)) for st in cur.stages]
    )
    progress, in_warmup = out.pop("lr"), out.pop("in_warmup").astype(bool)
    min_lr = min(cfg.optim.min_lr, float(peak.min()))
    lr = np.where(in_warmup, peak * progress, min_lr + (peak - min_lr) * progress)
    out["lr"] = lr
    out["last_layer_lr"] = np.where(out.pop("frozen").astype(bool), 0.0, lr)
    head_only = min(cur.total_steps, cur.steps_for_epochs(cfg.student.head_warmup_epochs))
    out["backbone_lr_scale"] = (np.arange(cur.total_steps) >= head_only).astype(np.float64)
    for k, v in out.items():
        assert len(v) == cur.total_steps, (k, len(v), cur.total_steps)
    return Schedules(**out)
