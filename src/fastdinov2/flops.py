"""``fastdinov2 flops``: training FLOPs per curriculum stage and in total, counted from a real step.

For each stage, one training step (teacher forward, student forward, backward) of the configured
model runs under :class:`torch.utils.flop_counter.FlopCounterMode` on the ``meta`` device: every
operator is dispatched with real shapes (so the count includes what the code actually does: both crop
resolutions, the heads on CLS and masked patch tokens, attention) but no arithmetic is executed, so
even ViT-g at 224 px is counted in seconds on a laptop. Masked tokens are set to their expected number
(``mask_sample_probability * mean(mask_ratio)`` of the global-crop patches).

Training FLOPs = sum over stages of (FLOPs per image of that stage) x (images the stage processes), and
the images per stage are ``stage epochs x dataset size``, so the ratio between two configs does not
depend on the dataset size.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdinov2.config import Config, load_config, stage_epochs
from fastdinov2.train.meta_arch import MetaArch


@dataclass(frozen=True)
class StageFlops:
    index: int
    name: str
    global_size: int
    local_size: int
    epochs: float
    flops_per_image: float  # forward + backward of the student, forward of the teacher

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.index, "name": self.name, "global_size": self.global_size,
            "local_size": self.local_size, "epochs": self.epochs, "gflops_per_image": self.flops_per_image / 1e9,
        }


def count_step_flops(cfg: Config, global_size: int, local_size: int, batch_size: int = 2,
                     device: str = "meta") -> float:
    """FLOPs of one training step on ``batch_size`` images, divided by ``batch_size``."""
    with torch.device(device):
        model = MetaArch(cfg)
    b, n_local = batch_size, cfg.crops.local_crops_number
    p = cfg.student.patch_size
    n_patches = (global_size // p) ** 2
    frac = cfg.ibot.mask_sample_probability * (cfg.ibot.mask_ratio_min + cfg.ibot.mask_ratio_max) / 2
    n_masked = max(1, round(2 * b * n_patches * frac))
    g = torch.zeros(2 * b, 3, global_size, global_size, device=device)
    loc = torch.zeros(n_local * b, 3, local_size, local_size, device=device)
    masks = torch.zeros(2 * b, n_patches, dtype=torch.bool, device=device)
    masks.view(-1)[:n_masked] = True
    idx = torch.arange(n_masked, device=device)
    weights = torch.ones(n_masked, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        t_cls, t_patch = model.teacher_targets(g, idx, n_masked, teacher_temp=0.07)
        out = model.student(g, loc, masks, idx)
        losses = model.compute_losses(out, t_cls, t_patch, masks, weights, n_local)
        losses["loss"].backward()
    return counter.get_total_flops() / b


def training_flops(cfg: Config) -> dict[str, Any]:
    """Per-stage FLOPs per image and the total per dataset image over the whole run."""
    stages = []
    for i, (st, ep) in enumerate(zip(cfg.curriculum.stages, stage_epochs(cfg), strict=True)):
        stages.append(StageFlops(i, st.name, st.global_size, st.local_size, ep,
                                 count_step_flops(cfg, st.global_size, st.local_size)))
    total = sum(s.flops_per_image * s.epochs for s in stages)
    return {"stages": [s.as_dict() for s in stages], "total_gflops_per_dataset_image": total / 1e9}


def _cmd_flops(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result: dict[str, Any] = {"config": args.config, **training_flops(cfg)}
    if args.baseline:
        from fastdinov2.config import diff_configs
        from fastdinov2.train.loop import RESUMABLE_KEYS

        base_cfg = load_config(args.baseline, args.overrides)
        base = training_flops(base_cfg)
        result["baseline"] = {"config": args.baseline, **base}
        result["ratio"] = base["total_gflops_per_dataset_image"] / result["total_gflops_per_dataset_image"]
        # the ratio is the curriculum's saving only when nothing else differs (as `experiment compare` requires)
        result["differs_outside_curriculum"] = diff_configs(base_cfg, cfg, ignore=("curriculum.", *RESUMABLE_KEYS))
        if result["differs_outside_curriculum"]:
            print(f"warning: {args.baseline} and {args.config} differ outside the curriculum (keys: "
                  f"{', '.join(result['differs_outside_curriculum'])}); the ratio is not the curriculum's alone",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'stage':<20} {'crops':>9} {'epochs':>7} {'GFLOPs/img/step':>16}")
    for name, res in [(args.config, result)] + ([(args.baseline, result["baseline"])] if args.baseline else []):
        print(f"-- {name}")
        for s in res["stages"]:
            print(f"{s['name']:<20} {s['global_size']:>4}/{s['local_size']:<4} {s['epochs']:>7g} "
                  f"{s['gflops_per_image']:>16.2f}")
        print(f"{'total per image':<20} {'':>9} {'':>7} {res['total_gflops_per_dataset_image']:>16.1f} "
              "(GFLOPs per dataset image over all epochs)")
    if args.baseline:
        print(f"ratio {args.baseline} / {args.config}: {result['ratio']:.3f}x fewer FLOPs")
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("flops", help="training FLOPs per stage and in total, counted from a real step")
    p.add_argument("--config", required=True, help="preset name or YAML file")
    p.add_argument("--baseline", default=None, help="a second config; prints the FLOP ratio baseline/config")
    p.add_argument("--json", action="store_true", help="print one JSON object (field 'ratio' with --baseline)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to both configs")
    p.set_defaults(func=_cmd_flops)
