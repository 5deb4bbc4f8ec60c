"""FastDINOv2 vs its DINOv2 baseline end to end: same data, same hardware, real data loading.

Runs ``fastdinov2.train.loop.train`` in this process for ``--fast`` (default ``fastdinov2_tiny``) and
``--baseline`` (default ``dinov2_tiny``) on a subset of the embedded generated dataset (``--train-images``
images, copied into a temporary folder) for ``--epochs`` epochs (the curriculum's stage fractions are
kept: 75% low resolution, 25% full resolution for the tiny preset), and prints the wall-clock ratio
baseline / fast next to the FLOP ratio of ``fastdinov2.flops.training_flops``. It also reports, per
stage, the trainer's logged img/s and data-wait fraction, and the speed-up the measured per-stage rates
imply (``sum_s images_s / rate_base`` over ``sum_s images_s / rate_s``).

The trainer's own thread policy applies (on the CPU with ``data.num_workers`` loader workers, torch gets
``cores - workers`` threads), unless ``--threads`` sets ``compute.threads``.

Example (about 1-2 minutes per run on a 2-core CPU)::

    .venv/bin/python benchmarks/end_to_end.py
    .venv/bin/python benchmarks/end_to_end.py --epochs 8 --train-images 1280 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, non_negative_int, positive_int, run_benchmark  # noqa: E402
from fastdinov2.config import Config, load_config  # noqa: E402
from fastdinov2.data.datasets import discover_training_images  # noqa: E402
from fastdinov2.flops import training_flops  # noqa: E402
from fastdinov2.train.loop import train  # noqa: E402


def make_subset(source: Path, dest: Path, n_images: int) -> Path:
    """Copy images of ``source``, round-robin over its classes, into ``dest/train/<class>/``."""
    records, classes = discover_training_images(source)
    by_class: dict[int, list[Path]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r.path)
    picked: list[tuple[int, Path]] = []
    depth = 0
    while len(picked) < n_images and any(depth < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(picked) < n_images:
                picked.append((label, by_class[label][depth]))
        depth += 1
    for label, path in picked:
        name = classes[label] if 0 <= label < len(classes) else "unlabelled"
        target = dest / "train" / name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # a copy: the source may be rewritten while the runs go on
    return dest


def run_overrides(args: argparse.Namespace, data_root: Path) -> list[str]:
    out = [
        f"optim.epochs={args.epochs}",
        f"data.root={data_root}",
        "train.knn_at_end=false",
        "train.progress=false",
        "train.checkpoint_every=1000000",
        f"train.log_every={args.log_every}",
        f"optim.warmup_epochs={min(1.0, args.epochs / 4)}",
        f"teacher.warmup_teacher_temp_epochs={min(2.0, args.epochs / 2)}",
        f"optim.freeze_last_layer_epochs={min(0.5, args.epochs / 8)}",
    ]
    if args.num_workers is not None:
        out.append(f"data.num_workers={args.num_workers}")
    if args.threads is not None:
        out.append(f"compute.threads={args.threads}")
    return out + list(args.overrides)


def stage_rates(history: list[dict[str, Any]], warmup_steps: int = 4) -> dict[int, dict[str, float]]:
    """Mean img/s and data-wait fraction per stage over logging windows that lie inside one stage.

    A record at step s covers the steps after the previous record up to s; windows spanning a stage
    switch, the first window (loader start-up), and windows holding any of a stage's first ``warmup_steps``
    steps are left out. Those steps carry one-off costs that a 200-epoch run pays once and a run of a few
    hundred steps pays in full: a new batch shape's eager warm-up steps and CUDA-graph capture
    (``compute.cuda_graph``), compilation, cuDNN's algorithm search. A stage counts as begun at its first
    record (it began at or before it, so this leaves out at least its first ``warmup_steps`` steps).
    """
    begins: dict[int, int] = {}
    for rec in history:
        begins.setdefault(rec["stage"], rec["step"])
    acc: dict[int, list[tuple[float, float, int]]] = {}
    for prev, rec in zip(history, history[1:]):
        if prev["stage"] != rec["stage"] or prev["step"] + 1 < begins[rec["stage"]] + warmup_steps:
            continue
        acc.setdefault(rec["stage"], []).append(
            (rec["img_per_s"], rec["data_wait_frac"], rec["step"] - prev["step"])
        )
    out = {}
    for stage, rows in acc.items():
        # Time-weighted over the windows: the batch is constant within a stage, so images / time =
        # sum(n) / sum(n / rate) with n the steps of a window.
        steps = sum(n for *_, n in rows)
        total_time = sum(n / r for r, _, n in rows)
        out[stage] = {
            "img_per_s": steps / total_time,
            "data_wait_frac": sum(w * n / r for r, w, n in rows) / total_time,
            "steps": steps,
        }
    return out


def one_run(name: str, cfg: Config, out_dir: Path, warmup_steps: int = 4) -> dict[str, Any]:
    load0 = os.getloadavg()
    r0s, r0c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    summary = train(cfg, out_dir)
    wall = time.perf_counter() - t0
    r1s, r1c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the trainer process and of its (joined) data-loader workers: on a shared machine this
    # is less sensitive than wall time to other processes taking turns on the cores.
    cpu_main = (r1s.ru_utime + r1s.ru_stime) - (r0s.ru_utime + r0s.ru_stime)
    cpu_workers = (r1c.ru_utime + r1c.ru_stime) - (r0c.ru_utime + r0c.ru_stime)
    hist = summary["history"]
    rates = stage_rates(hist, warmup_steps)
    stages = []
    for i, st in enumerate(cfg.curriculum.stages):
        r = rates.get(i, {})
        stages.append(
            {
                "stage": st.name,
                "global_size": st.global_size,
                "local_size": st.local_size,
                "img_per_s": r.get("img_per_s"),
                "data_wait_frac": r.get("data_wait_frac"),
                "steps_in_windows": r.get("steps"),
            }
        )
    return {
        "config": name,
        "wall_s": wall,
        "cpu_s_main": cpu_main,
        "cpu_s_workers": cpu_workers,
        "steps": summary["step"],
        "stages": stages,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "final_loss": hist[-1]["loss"] if hist else None,
    }


def implied_speedup(fast: dict[str, Any], base: dict[str, Any], fast_cfg: Config) -> float | None:
    """Baseline time / fast time predicted from the measured per-stage img/s and each stage's epochs."""
    from fastdinov2.config import stage_epochs

    base_rate = base["stages"][-1]["img_per_s"]
    if base_rate is None or any(s["img_per_s"] is None for s in fast["stages"]):
        return None
    epochs = stage_epochs(fast_cfg)
    t_fast = sum(e / s["img_per_s"] for e, s in zip(epochs, fast["stages"]))
    return (sum(epochs) / base_rate) / t_fast


def stage_epoch_overrides(preset: str, epochs: float, overrides: list[str]) -> list[str]:
    """Curriculum stages given in epochs (the paper presets: 150 + 50) rescaled to ``epochs`` in total, their
    proportions kept; stages given as fractions need nothing."""
    stages = load_config(preset, list(overrides)).curriculum.stages
    if all(st.epochs is None for st in stages):
        return []
    total = sum(st.epochs or 0.0 for st in stages)
    return [f"curriculum.stages.{i}.epochs={(st.epochs or 0.0) * epochs / total!r}" for i, st in enumerate(stages)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    # both presets and the overrides are loaded (and so checked) before any image is written or copied
    stage_ov = {name: stage_epoch_overrides(name, args.epochs, list(args.overrides))
                for name in (args.fast, args.baseline)}
    if args.data_root:
        source = Path(args.data_root)
    else:
        from fastdinov2.data.synthetic import default_dataset_root

        source = default_dataset_root(args.cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix="fastdinov2_e2e_"))
    try:
        data_root = make_subset(source, tmp / "data", args.train_images)
        ov = run_overrides(args, data_root)
        fast_cfg, base_cfg = (load_config(name, ov + stage_ov[name]) for name in (args.fast, args.baseline))
        flops_fast, flops_base = training_flops(fast_cfg), training_flops(base_cfg)
        runs: dict[str, list[dict[str, Any]]] = {args.fast: [], args.baseline: []}
        for rep in range(args.repeats):
            order = [(args.fast, fast_cfg), (args.baseline, base_cfg)]
            if rep % 2 == 1:
                order.reverse()  # alternate the order so drifting machine load hits both alike
            for name, cfg in order:
                r = one_run(name, cfg, tmp / f"run_{name}_{rep}", args.rate_warmup_steps)
                print(
                    f"  {name}: {r['wall_s']:.1f} s, {r['steps']} steps, load {r['loadavg_before']} -> "
                    f"{r['loadavg_after']}",
                    flush=True,
                )
                runs[name].append(r)
    finally:
        if args.keep:
            print(f"kept runs and data in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    best_fast = min(runs[args.fast], key=lambda r: r["wall_s"])
    best_base = min(runs[args.baseline], key=lambda r: r["wall_s"])
    flop_ratio = flops_base["total_gflops_per_dataset_image"] / flops_fast["total_gflops_per_dataset_image"]
    return {
        "benchmark": "end_to_end",
        "fast": args.fast,
        "baseline": args.baseline,
        "overrides": ov,
        "train_images": args.train_images,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "rate_warmup_steps": args.rate_warmup_steps,
        "runs": runs,
        "wall_s": {args.fast: best_fast["wall_s"], args.baseline: best_base["wall_s"]},
        "wall_clock_ratio": best_base["wall_s"] / best_fast["wall_s"],
        "main_process_cpu_ratio": best_base["cpu_s_main"] / best_fast["cpu_s_main"],
        "flop_ratio": flop_ratio,
        "implied_speedup_from_stage_rates": implied_speedup(best_fast, best_base, fast_cfg),
        "flops": {args.fast: flops_fast, args.baseline: flops_base},
        "machine": machine_info(torch.device("cuda") if torch.cuda.is_available() else None),
    }


def print_readable(out: dict[str, Any]) -> None:
    f, b = out["fast"], out["baseline"]
    print(
        f"end to end: {f} vs {b}, {out['train_images']} images x {out['epochs']} epochs, "
        f"{out['machine']['cpu_model']}"
    )
    for name in (f, b):
        best = min(out["runs"][name], key=lambda r: r["wall_s"])
        parts = ", ".join(
            f"{s['stage']} {s['global_size']}/{s['local_size']}: "
            + (
                f"{s['img_per_s']:.1f} img/s (data wait {100 * s['data_wait_frac']:.0f}%)"
                if s["img_per_s"]
                else "n/a"
            )
            for s in best["stages"]
        )
        print(f"  {name:<20} {best['wall_s']:7.1f} s (trainer CPU {best['cpu_s_main']:.0f} s)  {parts}")
    imp = out["implied_speedup_from_stage_rates"]
    print(
        f"  wall-clock ratio {b}/{f}: {out['wall_clock_ratio']:.2f}x (trainer-process CPU time: "
        f"{out['main_process_cpu_ratio']:.2f}x); FLOP ratio {out['flop_ratio']:.2f}x"
        + (f"; implied by per-stage rates {imp:.2f}x" if imp else "")
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", default="fastdinov2_tiny", help="the FastDINOv2 preset")
    p.add_argument("--baseline", default="dinov2_tiny", help="its DINOv2 baseline preset")
    p.add_argument("--data-root", default=None, help="dataset (default: the embedded generated one)")
    p.add_argument("--cache-dir", default=None, help="where the embedded dataset is written (data.cache_dir)")
    p.add_argument("--train-images", type=positive_int, default=640, help="images of the subset trained on")
    p.add_argument("--epochs", type=positive_int, default=4,
                   help="optim.epochs of both runs (stage fractions kept)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run both this many times (alternating order)")
    p.add_argument("--rate-warmup-steps", type=non_negative_int, default=4,
                   help="per-stage rates leave out the logging windows holding a stage's first N steps (graph "
                        "capture, compilation: one-off costs); the wall-clock ratio includes everything")
    p.add_argument("--log-every", type=positive_int, default=2, help="train.log_every (steps per logged rate)")
    p.add_argument("--num-workers", type=non_negative_int, default=None,
                   help="data.num_workers (default: the preset's; 0: load in the trainer's process)")
    p.add_argument(
        "--threads", type=non_negative_int, default=None,
        help="compute.threads (default or 0: the trainer's policy)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary runs and data")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both runs")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
