"""``fastdinov2 experiment compare``: the paper's claim, reproduced small and honestly.

Trains the DINOv2 baseline (``dinov2_<preset>``) and FastDINOv2 (``fastdinov2_<preset>``) on the same data,
architecture and epochs, for the same seeds (``train.seed = s``; ``KEY=VALUE`` overrides go to both), evaluates
every run (kNN, linear probe, the 19 x 5 generated corruptions of the val split, frequency sensitivity), records
the wall-clock of every training run and the training FLOPs of each config, and writes a report with the mean
and spread over seeds, the FastDINOv2 / DINOv2 ratios and a written reading generated from the numbers.

Layout of the output folder ``OUT``::

    OUT/experiment.json              settings, seeds, every invocation (command line, machine)
    OUT/configs/{dinov2,fastdinov2}.yaml   the resolved configs (seed 0); a rerun must match them
    OUT/flops.json                   training FLOPs per stage and per dataset image of both configs
    OUT/runs/<method>_seed<s>/       a training run dir (the trainer's layout) + experiment_timing.json
    OUT/runs/<method>_seed<s>/eval/  knn.json, linear.json (+ linear_head), corruption.json, frequency.json
    OUT/report.md, OUT/*.png         the comparison report

Running the same command again continues: an unfinished training run resumes from its newest checkpoint (the
trainer's own resume), an evaluation whose JSON exists is not redone, and the report is rebuilt from whatever
exists. Runs are interleaved (seed 0 DINOv2, seed 0 FastDINOv2, seed 1 DINOv2, ...) so that drift in the
machine's load affects both methods alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fastdinov2 import __version__
from fastdinov2.config import Config, ConfigError, diff_configs, load_config, to_yaml
from fastdinov2.eval.results import EvalError, read_result, write_json_atomic, write_result

METHODS: tuple[str, ...] = ("dinov2", "fastdinov2")
LABELS = {"dinov2": "DINOv2", "fastdinov2": "FastDINOv2"}
NOISE_TYPES: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
EXPERIMENT_FILE = "experiment.json"
TIMING_FILE = "experiment_timing.json"
FLOPS_FILE = "flops.json"
FORMAT = "fastdinov2-experiment"
DEFAULT_PRESET = "tiny"
DEFAULT_SEEDS = 3

#: The paper's claims this experiment checks (SPEC section 2).
FLOP_CLAIM = 2.0  # ">= 2x fewer FLOPs"
CLEAN_TOLERANCE = 1.0  # clean accuracy "within about 1 point"
#: A wall-clock speed-up below this share of the FLOP speed-up is explained in the reading.
TIME_VS_FLOPS = 0.8
#: The paper's numbers (DINOv2, FastDINOv2); see SPEC.md section 2.
PAPER_GFLOPS = (493.76, 219.92)  # IN-1K ViT-B/16
PAPER_DAYS = (16.64, 10.32)  # IN-1K ViT-B/16, L40S-days
PAPER_LINEAR = (78.60, 78.40)  # IN-100 ViT-S/16
PAPER_CORRUPTION = (46.84, 52.88)  # IN-100-C mean corruption accuracy
PAPER_NOISE = {"gaussian_noise": (32.11, 57.51), "shot_noise": (31.06, 55.34),
               "impulse_noise": (26.97, 54.62), "speckle_noise": (40.87, 61.59)}


class ExperimentError(ValueError):
    """The experiment folder or its settings cannot be used; the message names the file or key."""


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Statistics over seeds
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Mean and spread of one number over seeds. ``std`` is the sample standard deviation (ddof=1), None for
    fewer than two values; every field is None when there is no value."""

    n: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    values: tuple[float, ...] = ()


def summarize(values: Sequence[float | None]) -> Stats:
    """Mean, sample std (ddof=1), min and max of the values that are not None (nor NaN)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return Stats(0, None, None, None, None)
    arr = np.asarray(vals, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return Stats(len(vals), float(arr.mean()), std, float(arr.min()), float(arr.max()), tuple(vals))


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None],
           op: Callable[[float, float], float | None]) -> dict[int, float]:
    """``op(a[s], b[s])`` for every seed ``s`` where both values exist (and the result is not None)."""
    out: dict[int, float] = {}
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        if x is None or y is None:
            continue
        r = op(x, y)
        if r is not None:
            out[s] = r
    return out


def _ratio(x: float, y: float) -> float | None:
    return x / y if y != 0 else None


@dataclass(frozen=True)
class MetricComparison:
    """One metric of both methods over seeds; ``ratio`` = FastDINOv2 / DINOv2 and ``diff`` = FastDINOv2 -
    DINOv2, each computed per seed (paired by seed) and then summarised."""

    key: str
    label: str
    base: Stats
    fast: Stats
    ratio: Stats
    diff: Stats


def compare_metric(key: str, label: str, base: Mapping[int, float | None],
                   fast: Mapping[int, float | None]) -> MetricComparison:
    """Summaries of ``base`` and ``fast`` (per-seed values) and of their per-seed ratio and difference."""
    return MetricComparison(
        key, label, summarize(list(base.values())), summarize(list(fast.values())),
        summarize(list(paired(fast, base, _ratio).values())),
        summarize(list(paired(fast, base, lambda x, y: x - y).values())),
    )


# ----------------------------------------------------------------------------------------------------------
# Settings and configs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSettings:
    """What the evaluations compute (changing any of these in an existing experiment folder is refused).

    ``image_size`` None: the configs' ``crops.global_crops_size`` (the full training resolution).
    ``corruption_per_class``: the val images per class that are corrupted (a seeded subset, the same for every
    run), for each of the 19 x 5 corruption sets. ``corruption_size``: generated corruptions are applied at this
    size, then resized to ``image_size`` (0: at ``image_size``). ``frequency_per_class`` None: the whole val split.
    ``radii`` None: the frequency protocol's default radii. ``seed``: subsampling and corruption seed.
    """

    image_size: int | None = None
    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07
    linear_epochs: int = 10
    corruption_per_class: int | None = 10
    corruption_size: int = 224
    frequency_per_class: int | None = None
    radii: tuple[float, ...] | None = None
    seed: int = 0

    def resolved(self, cfg: Config) -> EvalSettings:
        return EvalSettings(**{**asdict(self), "image_size": self.image_size or cfg.crops.global_crops_size})

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["knn_ks"] = [int(k) for k in self.knn_ks]
        d["radii"] = None if self.radii is None else [float(r) for r in self.radii]
        return d


@dataclass(frozen=True)
class Runtime:
    """How the evaluations run (free to change between invocations: results do not depend on them)."""

    batch_size: int = 128
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True


def config_names(preset: str, baseline_config: str | None = None, fast_config: str | None = None) -> dict[str, str]:
    """The config (preset name or YAML file) of each method: ``dinov2_<preset>`` and ``fastdinov2_<preset>``."""
    return {"dinov2": baseline_config or f"dinov2_{preset}", "fastdinov2": fast_config or f"fastdinov2_{preset}"}


def method_overrides(overrides: Sequence[str], data: str | Path | None, seed: int, progress: bool) -> list[str]:
    """The user's overrides, then the experiment's own: data root, seed, no kNN at the end of training (the
    experiment evaluates every run itself), progress bar."""
    out = list(overrides)
    if data is not None:
        out.append(f"data.root={Path(data).expanduser()}")
    return out + [f"train.seed={seed}", "train.knn_at_end=false", f"train.progress={str(progress).lower()}"]


def check_same_setup(base: Config, fast: Config, names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` unless the two configs differ only in the curriculum (and in settings that do
    not change what is computed: logging, checkpoints, workers, compute), so the comparison is fair."""
    from fastdinov2.train.loop import RESUMABLE_KEYS

    diffs = diff_configs(base, fast, ignore=("curriculum.", *RESUMABLE_KEYS))
    if diffs:
        names = names or {"dinov2": "baseline", "fastdinov2": "FastDINOv2"}
        raise ConfigError(
            f"the configs {names['dinov2']!r} and {names['fastdinov2']!r} differ outside the curriculum "
            f"(keys: {', '.join(diffs)}); the comparison needs the same model, data, epochs and optimisation"
        )


def resolve_configs(preset: str = DEFAULT_PRESET, overrides: Sequence[str] = (), data: str | Path | None = None,
                    seed: int = 0, baseline_config: str | None = None, fast_config: str | None = None,
                    progress: bool = False) -> dict[str, Config]:
    """The validated config of each method for ``seed``; checked to differ only in the curriculum."""
    names = config_names(preset, baseline_config, fast_config)
    ov = method_overrides(overrides, data, seed, progress)
    cfgs = {m: load_config(names[m], ov) for m in METHODS}
    check_same_setup(cfgs["dinov2"], cfgs["fastdinov2"], names)
    return cfgs


def machine_info(device: str | None = None) -> dict[str, Any]:
    """CPU model, core count, torch/python versions and the training device of this machine."""
    import torch

    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device is not None and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _machine_line(m: Mapping[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('usable_cores')} usable), device {m.get('device')}"
            f"{gpu}, torch {m.get('torch')}, Python {m.get('python')}, {m.get('platform')}")


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ExperimentError(f"{path} must hold a JSON object")
    return obj


def run_dir(out: Path, method: str, seed: int) -> Path:
    """``OUT/runs/<method>_seed<seed>``."""
    return Path(out) / "runs" / f"{method}_seed{seed}"


def _latest_step(path: Path) -> int:
    from fastdinov2.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(path / "checkpoints")
    return ckpts[-1][0] if ckpts else 0


def training_finished(path: Path) -> bool:
    """The trainer wrote ``summary.json`` with ``finished: true`` and exported the teacher backbone."""
    summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else None
    return bool(summary and summary.get("finished")) and (path / "teacher_backbone.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------
# Training with wall-clock
# ----------------------------------------------------------------------------------------------------------
def _close_open_segments(timing: dict[str, Any], path: Path) -> None:
    """A segment that never recorded its end (the process was killed): estimate its length from the last write
    to ``metrics.jsonl`` and mark it interrupted."""
    for seg in timing["segments"]:
        if seg.get("seconds") is None:
            metrics = path / "metrics.jsonl"
            last = metrics.stat().st_mtime if metrics.is_file() else seg["started"]
            seg.update(seconds=max(0.0, last - seg["started"]), end_step=_latest_step(path), interrupted=True,
                       estimated=True)


def train_timed(cfg: Config, path: Path, machine: Mapping[str, Any]) -> dict[str, Any]:
    """Run (or continue) training in ``path`` and append its wall-clock to ``path/experiment_timing.json``.

    Each call is one segment ``{started, start_step, end_step, seconds, finished, interrupted, machine}``; a
    segment cut short by an exception is stored as interrupted before the exception propagates. Returns the
    trainer's summary.
    """
    from fastdinov2.train.loop import train

    timing_path = path / TIMING_FILE
    timing = _read_json(timing_path) or {"segments": []}
    _close_open_segments(timing, path)
    seg: dict[str, Any] = {"started": time.time(), "start_step": _latest_step(path), "end_step": None,
                           "seconds": None, "finished": False, "interrupted": False, "machine": dict(machine)}
    timing["segments"].append(seg)
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(timing_path, timing)
    t0 = time.perf_counter()
    try:
        summary = train(cfg, path)
    except BaseException as exc:
        seg.update(seconds=time.perf_counter() - t0, end_step=_latest_step(path), interrupted=True,
                   error=type(exc).__name__)
        write_json_atomic(timing_path, timing)
        raise
    seg.update(seconds=time.perf_counter() - t0, end_step=int(summary["step"]), finished=bool(summary["finished"]),
               total_steps=int(summary["total_steps"]))
    write_json_atomic(timing_path, timing)
    return summary


def read_timing(path: Path) -> dict[str, Any]:
    """Total training wall-clock of a run dir: ``{"seconds", "segments" (that trained at least one step),
    "interrupted", "estimated", "machines"}``; ``seconds`` is None without a finished segment."""
    timing = _read_json(path / TIMING_FILE) or {"segments": []}
    segs = [s for s in timing.get("segments", []) if isinstance(s, dict)]
    done = [s for s in segs if s.get("seconds") is not None]
    working = [s for s in done if s.get("end_step") is None or s.get("end_step") != s.get("start_step")]
    finished = any(s.get("finished") for s in done)
    machines = sorted({_machine_line(s["machine"]) for s in segs if isinstance(s.get("machine"), dict)})
    return {
        "seconds": float(sum(float(s["seconds"]) for s in done)) if finished else None,
        "segments": len(working),
        "interrupted": any(s.get("interrupted") for s in done),
        "estimated": any(s.get("estimated") for s in done),
        "machines": machines,
    }


# ----------------------------------------------------------------------------------------------------------
# Evaluation of one run
# ----------------------------------------------------------------------------------------------------------
def evaluate_run(path: Path, data_root: Path, settings: EvalSettings, runtime: Runtime) -> list[str]:
    """Run every evaluation of a finished run whose result JSON is missing; returns the protocols run.

    kNN -> ``eval/knn.json``; linear probe -> ``eval/linear.json`` + ``eval/linear_head.safetensors``;
    generated corruptions (19 x 5, ``settings.corruption_per_class`` val images per class) ->
    ``eval/corruption.json``; frequency sensitivity (bands from the corruption result) -> ``eval/frequency.json``.
    """
    from fastdinov2.eval.commands import default_output, head_path_for

    assert settings.image_size is not None, "resolve the eval settings first"
    out = {p: default_output(path, p) for p in ("knn", "linear", "corruption", "frequency")}
    head = head_path_for(out["linear"])
    todo = [p for p in ("knn", "linear", "corruption", "frequency") if not out[p].is_file()]
    if out["linear"].is_file() and not head.is_file():
        todo.insert(0, "linear")  # the head is needed by the corruption and frequency protocols
    if not todo:
        return []
    from fastdinov2.eval.features import resolve_device
    from fastdinov2.interop import load_backbone

    dev = resolve_device(runtime.device)
    model = load_backbone(path, device=dev)
    train_dir, val_dir = data_root / "train", data_root / "val"
    size = settings.image_size
    common = {"data": str(data_root), "image_size": size, "batch_size": runtime.batch_size, "device": str(dev)}
    kw: dict[str, Any] = {"batch_size": runtime.batch_size, "num_workers": runtime.num_workers, "device": dev,
                          "progress": runtime.progress}
    done: list[str] = []
    if "knn" in todo:
        from fastdinov2.eval.knn import evaluate_knn

        res = evaluate_knn(model, train_dir, val_dir, ks=settings.knn_ks, temperature=settings.knn_temperature,
                           image_size=size, **kw)
        write_result(out["knn"], "knn", str(path), {**common, "ks": list(settings.knn_ks),
                                                     "temperature": settings.knn_temperature}, res)
        done.append("knn")
    if "linear" in todo:
        from fastdinov2.eval.linear import LEARNING_RATES, evaluate_linear

        res = evaluate_linear(model, train_dir, val_dir, image_size=size, epochs=settings.linear_epochs,
                              seed=settings.seed, head_path=head, checkpoint=str(path), **kw)
        config = {**common, "epochs": settings.linear_epochs, "iterations": None, "head_batch_size": 128,
                  "learning_rates": list(LEARNING_RATES), "n_last_blocks": [1, 4], "poolings": ["cls", "cls+avgpool"],
                  "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine", "augment": False,
                  "val_from_train": False, "val_fraction": None, "seed": settings.seed}
        write_result(out["linear"], "linear", str(path), config, res)
        done.append("linear")
    if "corruption" in todo:
        from fastdinov2.eval.corruption import corruption_markdown, evaluate_corruption, plot_corruption_heatmap

        res = evaluate_corruption(model, head, generate_from=val_dir, image_size=size,
                                  corruption_size=settings.corruption_size,
                                  max_per_class=settings.corruption_per_class, seed=settings.seed, **kw)
        res["heatmap"] = str(plot_corruption_heatmap(res, out["corruption"].with_suffix(".png")))
        md = out["corruption"].with_suffix(".md")
        md.write_text(corruption_markdown(res), encoding="utf-8")
        res["table"] = str(md)
        config = {**common, "head": str(head), "corrupted_root": None, "generate": True, "corruptions": None,
                  "severities": [1, 2, 3, 4, 5], "corruption_size": settings.corruption_size,
                  "max_per_class": settings.corruption_per_class, "seed": settings.seed, "reference": None}
        write_result(out["corruption"], "corruption", str(path), config, res)
        done.append("corruption")
    if "frequency" in todo:
        from fastdinov2.eval.frequency import evaluate_frequency, group_by_band, plot_frequency_curves

        res = evaluate_frequency(model, head, val_dir, radii=settings.radii, image_size=size,
                                 max_per_class=settings.frequency_per_class, seed=settings.seed, **kw)
        res["bands"] = group_by_band(out["corruption"])
        res["corruption_source"] = str(out["corruption"])
        res["curves"] = str(plot_frequency_curves(res, out["frequency"].with_suffix(".png")))
        config = {**common, "head": str(head), "radii": None if settings.radii is None else list(settings.radii),
                  "max_per_class": settings.frequency_per_class, "seed": settings.seed,
                  "corruption_source": str(out["corruption"])}
        write_result(out["frequency"], "frequency", str(path), config, res)
        done.append("frequency")
    return done


# ----------------------------------------------------------------------------------------------------------
# Reading results back
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one (method, seed) run has produced so far; missing parts are None."""

    method: str
    seed: int
    path: Path
    exists: bool = False
    finished: bool = False
    step: int | None = None
    total_steps: int | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # protocol -> results object
    throughput: dict[str, float] = field(default_factory=dict)  # "global/local" -> median img/s

    def metric(self, key: str) -> float | None:
        """A headline number of this run (see :data:`HEADLINE`), or a ``type:<corruption>`` mean."""
        corr = self.evals.get("corruption", {})
        if key == "train_seconds":
            return self.timing.get("seconds")
        if key == "knn_top1":
            return _num(self.evals.get("knn", {}).get("top1"))
        if key == "linear_top1":
            return _num(_get(self.evals.get("linear"), "best", "top1"))
        if key == "corruption_mean_15":
            return _num(corr.get("mean_common"))
        if key == "corruption_mean_19":
            return _num(corr.get("mean_all"))
        if key == "corruption_clean_top1":
            return _num(corr.get("clean_top1"))
        if key == "noise_mean":
            vals = [v for c in NOISE_TYPES if (v := self.metric(f"type:{c}")) is not None]
            return float(np.mean(vals)) if len(vals) == len(NOISE_TYPES) else None
        if key.startswith("type:"):
            return _num(_get(corr, "type_mean", key[5:]))
        raise KeyError(key)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        return None
    return float(v)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _stage_throughput(path: Path) -> dict[str, float]:
    from fastdinov2.train.logging import read_metrics

    if not (path / "metrics.jsonl").is_file():
        return {}
    pooled: dict[str, list[float]] = {}
    for rec in read_metrics(path):
        v = _num(rec.get("img_per_s"))
        if v is not None and rec.get("global_size") is not None:
            pooled.setdefault(f"{rec['global_size']}/{rec.get('local_size')}", []).append(v)
    return {k: float(np.median(v)) for k, v in pooled.items()}


def load_run_result(out: Path, method: str, seed: int) -> RunResult:
    """Read what exists of one run (training progress, timing, evaluation results)."""
    path = run_dir(out, method, seed)
    r = RunResult(method, seed, path, exists=path.is_dir())
    if not r.exists:
        return r
    r.finished = training_finished(path)
    r.step = _latest_step(path)
    summary = _read_json(path / "summary.json")
    if summary:
        r.total_steps = summary.get("total_steps")
        r.step = max(r.step, int(summary.get("step", 0)))
    r.timing = read_timing(path)
    for protocol in ("knn", "linear", "corruption", "frequency"):
        f = path / "eval" / f"{protocol}.json"
        if f.is_file():
            r.evals[protocol] = read_result(f, protocol)["results"]
    r.throughput = _stage_throughput(path)
    return r


#: (key, label, is an accuracy in percent) of the headline table, after the FLOP row.
HEADLINE: tuple[tuple[str, str, bool], ...] = (
    ("train_seconds", "training wall-clock (s)", False),
    ("knn_top1", "clean kNN top-1 (%)", True),
    ("linear_top1", "clean linear top-1 (%)", True),
    ("corruption_mean_15", "corruption accuracy, mean of 15 types (%)", True),
    ("corruption_mean_19", "corruption accuracy, mean of 19 types (%)", True),
    ("noise_mean", "noise corruptions, mean of gaussian/shot/impulse/speckle (%)", True),
    *((f"type:{c}", f"{c.replace('_', ' ')} (%)", True) for c in NOISE_TYPES),
)


def comparisons(runs: Mapping[tuple[str, int], RunResult], seeds: Sequence[int]) -> dict[str, MetricComparison]:
    """Every headline metric compared over ``seeds`` (paired by seed)."""
    out: dict[str, MetricComparison] = {}
    for key, label, _ in HEADLINE:
        per = {m: {s: runs[(m, s)].metric(key) for s in seeds if (m, s) in runs} for m in METHODS}
        out[key] = compare_metric(key, label, per["dinov2"], per["fastdinov2"])
    return out


# ----------------------------------------------------------------------------------------------------------
# The written reading
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ReadingContext:
    """Facts the explanatory text refers to (all computed, none typed by hand)."""

    seeds: int = 0
    flop_speedup: float | None = None  # DINOv2 / FastDINOv2 training FLOPs
    stage_flop_speedup: float | None = None  # full-res / first-stage FLOPs per image
    stage_speedup: float | None = None  # first-stage / full-res median img/s of the FastDINOv2 runs
    first_stage: str | None = None  # e.g. "32/16 px for 9 of 12 epochs"
    last_stage_epochs: float | None = None
    epochs: float | None = None
    full_size: str | None = None  # "64/32"
    noise: str | None = None  # "gaussian noise patching (max scale 0.5) in the last 3 epochs" or None
    model: str | None = None
    train_images: int | None = None
    val_images: int | None = None
    classes: int | None = None
    corruption_images: int | None = None  # images per corruption set
    image_size: int | None = None
    corruption_size: int | None = None
    synthetic: bool = False


def _diff_text(d: Stats) -> str:
    """``+1.23 points (± 0.45; per seed +0.80 to +1.70)``."""
    txt = f"{d.mean:+.2f} points"
    if d.n > 1:
        txt += f" (± {d.std:.2f}; per seed {d.min:+.2f} to {d.max:+.2f})"
    return txt


def _sign_unresolved(s: Stats) -> bool:
    return s.n > 1 and s.min is not None and s.max is not None and s.min < 0 < s.max


def compose_reading(comp: Mapping[str, MetricComparison], ctx: ReadingContext) -> list[str]:
    """The report's reading as markdown lines: which of the paper's directions hold here, which do not, and
    possible reasons, chosen by fixed rules from the compared numbers."""
    agree: list[str] = []
    disagree: list[str] = []
    missing: list[str] = []
    failed: set[str] = set()

    def put(key: str, holds: bool | None, text: str) -> None:
        if holds is None:
            missing.append(text)
        elif holds:
            agree.append(text)
        else:
            disagree.append(text)
            failed.add(key)

    # FLOPs (deterministic: counted from one training step per stage, not measured)
    if ctx.flop_speedup is None:
        put("flops", None, "Training FLOPs: not counted yet.")
    else:
        holds = ctx.flop_speedup >= FLOP_CLAIM
        put("flops", holds, f"Training FLOPs: FastDINOv2 needs {ctx.flop_speedup:.2f}x fewer than DINOv2 "
            f"({'at least' if holds else 'less than'} the claimed {FLOP_CLAIM:g}x; the paper reports "
            f"{PAPER_GFLOPS[0] / PAPER_GFLOPS[1]:.2f}x for ViT-B/16 on ImageNet-1K).")

    # Wall-clock: per-seed DINOv2 / FastDINOv2
    t = comp["train_seconds"]
    if t.ratio.n == 0:
        put("time", None, "Training wall-clock: no pair of finished runs yet.")
    else:
        speed = summarize([1.0 / r for r in t.ratio.values if r > 0])
        holds = speed.mean is not None and speed.mean > 1.0
        spread = f" (per seed {speed.min:.2f}x to {speed.max:.2f}x)" if speed.n > 1 else ""
        put("time", holds, f"Training wall-clock: FastDINOv2 was {speed.mean:.2f}x "
            f"{'faster than' if holds else 'as fast as'} DINOv2{spread}; the paper reports "
            f"{PAPER_DAYS[0] / PAPER_DAYS[1]:.2f}x faster on GPUs.")
        if holds and ctx.flop_speedup and speed.mean is not None and speed.mean < TIME_VS_FLOPS * ctx.flop_speedup:
            failed.add("time_vs_flops")
            disagree.append(f"The wall-clock speed-up ({speed.mean:.2f}x) is well below the FLOP ratio "
                            f"({ctx.flop_speedup:.2f}x): fewer FLOPs did not turn into proportionally less time.")

    def accuracy(key: str, what: str, rule: str, threshold: float, paper: str) -> None:
        c = comp[key]
        if c.diff.n == 0:
            put(key, None, f"{what}: no pair of evaluated runs yet.")
            return
        holds = c.diff.mean is not None and c.diff.mean >= threshold
        text = (f"{what}: FastDINOv2 {c.fast.mean:.2f} vs DINOv2 {c.base.mean:.2f}, a difference of "
                f"{_diff_text(c.diff)}; {rule}: {'holds' if holds else 'does not hold'} ({paper}).")
        if _sign_unresolved(c.diff):
            text += f" The sign of the difference changes across seeds, so {c.diff.n} seeds do not resolve it."
        put(key, holds, text)

    accuracy("linear_top1", "Clean linear-probe top-1", f"within about {CLEAN_TOLERANCE:g} point",
             -CLEAN_TOLERANCE, f"paper {PAPER_LINEAR[1]:.2f} vs {PAPER_LINEAR[0]:.2f} on ImageNet-100")
    accuracy("knn_top1", "Clean kNN top-1", f"within about {CLEAN_TOLERANCE:g} point", -CLEAN_TOLERANCE,
             "the paper gives no kNN number")
    accuracy("corruption_mean_15", "Mean corruption accuracy over the 15 standard types",
             "at or above the baseline", 0.0,
             f"paper {PAPER_CORRUPTION[1]:.2f} vs {PAPER_CORRUPTION[0]:.2f} on ImageNet-100-C")
    accuracy("corruption_mean_19", "Mean corruption accuracy over all 19 types", "at or above the baseline", 0.0,
             "the paper's ImageNet-C numbers are over the standard set")
    pn = [np.mean([PAPER_NOISE[c][i] for c in NOISE_TYPES]) for i in (0, 1)]
    accuracy("noise_mean", "Noise corruptions (mean of gaussian, shot, impulse, speckle)",
             "at or above the baseline", 0.0, f"paper {pn[1]:.2f} vs {pn[0]:.2f}, the paper's largest gain")

    lines = ["_Generated from the numbers in this report by fixed rules; no result in it is typed by hand._", ""]
    lines.append(f"Compared over {ctx.seeds} seed{'s' if ctx.seeds != 1 else ''}; differences and ratios are "
                 "computed per seed (FastDINOv2 against the DINOv2 run of the same seed), then averaged.")
    lines.append("")
    if agree:
        lines += ["**Where the results agree with the paper's direction**", ""] + [f"- {a}" for a in agree] + [""]
    if disagree:
        lines += ["**Where they do not**", ""] + [f"- {d}" for d in disagree] + [""]
    if missing:
        lines += ["**Not measured yet**", ""] + [f"- {m}" for m in missing] + [""]
    reasons = _reasons(failed, comp, ctx)
    if reasons:
        lines += ["**Possible reasons**", ""] + [f"- {r}" for r in reasons] + [""]
    lines.append(_scale_caveat(ctx, bool(disagree)))
    return lines


def _reasons(failed: set[str], comp: Mapping[str, MetricComparison], ctx: ReadingContext) -> list[str]:
    """Fixed explanatory texts, one per kind of failed comparison, filled with the run's own facts."""
    out: list[str] = []
    stage = f" ({ctx.first_stage})" if ctx.first_stage else ""
    if "flops" in failed:
        per = (f" Per image, the first stage costs {ctx.stage_flop_speedup:.2f}x fewer FLOPs than full resolution."
               if ctx.stage_flop_speedup else "")
        out.append("FLOPs (scale, schedule): only the low-resolution stage saves compute" + stage + "." + per +
                   " In a model this small, the parts whose cost does not shrink with the number of tokens (the "
                   "DINO and iBOT heads on class tokens and masked patches, the prototype layers) are a larger share "
                   "of a step than in a ViT-B/16, and a shorter low-resolution stage saves less.")
    if failed & {"time", "time_vs_flops"}:
        measured = ""
        if ctx.stage_speedup is not None:
            measured = (f" Measured here, the first stage ran at {ctx.stage_speedup:.2f}x the images per second of "
                        "the full-resolution stage" +
                        (f", against {ctx.stage_flop_speedup:.2f}x fewer FLOPs per image." if ctx.stage_flop_speedup
                         else "."))
        out.append("Wall-clock (scale, machine): step time is not proportional to FLOPs at this size." + measured +
                   " Fixed per-step costs (Python and data-loader overhead, optimizer and EMA updates) and the data "
                   "pipeline (decoding, multi-crop augmentation) do not shrink with the crop size; the paper's "
                   f"{PAPER_GFLOPS[0] / PAPER_GFLOPS[1]:.2f}x fewer FLOPs likewise gave only "
                   f"{PAPER_DAYS[0] / PAPER_DAYS[1]:.2f}x less time. Other load on a shared machine adds noise; the "
                   "runs were interleaved so that it affects both methods alike.")
    if failed & {"linear_top1", "knn_top1"}:
        sched = (f" Here the full-resolution stage lasts {ctx.last_stage_epochs:g} of {ctx.epochs:g} epochs"
                 if ctx.last_stage_epochs is not None and ctx.epochs is not None else " Here the schedule is short")
        out.append("Clean accuracy (schedule, scale):" + sched +
                   (f" on {ctx.train_images} training images" if ctx.train_images else "") +
                   "; the paper's second stage is 50 of 200 epochs of a ViT-S/16 on ImageNet-100. A small model "
                   "trained briefly may not finish adapting from the low-resolution token grid to the full one, and "
                   f"the evaluations run at the full resolution ({ctx.image_size} px).")
    if failed & {"corruption_mean_15", "corruption_mean_19", "noise_mean"}:
        data = ("the embedded generated dataset" if ctx.synthetic else "this dataset")
        n = ctx.corruption_images
        acc = comp["corruption_mean_15"].base.mean or comp["corruption_mean_19"].base.mean
        se = ""
        if n and acc is not None:
            p = min(max(acc / 100.0, 0.0), 1.0)
            se = (f" Each (type, severity) accuracy comes from {n} images, a sampling error of about "
                  f"{100 * math.sqrt(p * (1 - p) / n):.1f} points per set (less for the means over sets).")
        noise = (f" Noise patching acts only during {ctx.noise}." if ctx.noise else
                 " The FastDINOv2 config has no noise patching, which the paper credits for the noise robustness.")
        out.append(f"Robustness (data, schedule): {data}" +
                   (f" ({ctx.classes} classes, {ctx.val_images} val images)" if ctx.classes else "") +
                   " is not ImageNet, so which frequencies its classes depend on, and hence which corruptions hurt, "
                   "can differ from ImageNet-C." +
                   (f" The corruptions are generated at {ctx.corruption_size} px and resized to {ctx.image_size} px."
                    if ctx.corruption_size and ctx.image_size and ctx.corruption_size != ctx.image_size else "") +
                   noise + se)
    diffs = [c.diff for k, c in comp.items() if k != "train_seconds" and c.diff.n > 0]
    if ctx.seeds < 2:
        out.append("Seeds: with a single seed there is no spread; differences of a point or two can be noise. Run "
                   "more seeds (--seeds).")
    elif any(_sign_unresolved(d) for d in diffs):
        out.append(f"Seeds: some differences change sign across the {ctx.seeds} seeds; they are within the "
                   "seed-to-seed spread and need more seeds (--seeds) to be resolved.")
    return out


def _scale_caveat(ctx: ReadingContext, any_fail: bool) -> str:
    what = ctx.model or "a small ViT"
    data = "generated images" if ctx.synthetic else "images"
    size = f" of {ctx.train_images} {data}" if ctx.train_images else ""
    verdict = ("Agreement or disagreement at this scale" if any_fail else "Agreement at this scale")
    return (f"_Scale: {what}, {ctx.epochs:g} epochs on a training set{size}. {verdict} says whether the paper's "
            "direction reproduces in a small setting; it does not test the paper's ImageNet numbers._"
            if ctx.epochs is not None else f"_Scale: {what}; this is a small setting, not the paper's ImageNet runs._")


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no global pyplot state)
# ----------------------------------------------------------------------------------------------------------
COLORS = {"dinov2": "C0", "fastdinov2": "C1"}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _errbar(s: Stats) -> tuple[float, float]:
    if s.mean is None or s.min is None or s.max is None:
        return 0.0, 0.0
    return s.mean - s.min, s.max - s.mean


def plot_headline(comp: Mapping[str, MetricComparison], path: Path) -> Path | None:
    """Grouped bars (mean over seeds, whiskers min-max, dots per seed) of the accuracy metrics."""
    from matplotlib.figure import Figure

    keys = ["knn_top1", "linear_top1", "corruption_mean_15", "corruption_mean_19", "noise_mean"]
    if not any(comp[k].base.n or comp[k].fast.n for k in keys):
        return None
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(keys))
    for i, m in enumerate(METHODS):
        stats = [comp[k].base if m == "dinov2" else comp[k].fast for k in keys]
        xs = x + (i - 0.5) * 0.38
        means = [s.mean or 0.0 for s in stats]
        err = np.array([_errbar(s) for s in stats]).T
        bars = ax.bar(xs, means, width=0.38, color=COLORS[m], label=LABELS[m], yerr=err, capsize=3)
        for xx, s in zip(xs, stats):
            ax.plot([xx] * len(s.values), s.values, "k.", ms=4, alpha=0.7)
        for b, s in zip(bars, stats):
            if s.mean is not None:
                ax.annotate(f"{s.mean:.1f}", (b.get_x() + b.get_width() / 2, s.max or s.mean), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, ["kNN", "linear", "corruptions\n(15 types)", "corruptions\n(19 types)", "noise\ncorruptions"])
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("clean and corrupted accuracy (bars: mean over seeds, whiskers: min-max, dots: seeds)", fontsize=10)
    return _save(fig, path)


def plot_cost(comp: Mapping[str, MetricComparison], flops: Mapping[str, Any] | None, path: Path) -> Path | None:
    """Left: training GFLOPs per dataset image, stacked by curriculum stage; right: training wall-clock."""
    from matplotlib.figure import Figure

    t = comp["train_seconds"]
    if not flops and not (t.base.n or t.fast.n):
        return None
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    if flops:
        for i, m in enumerate(METHODS):
            bottom = 0.0
            for n, st in enumerate(flops[m]["stages"]):
                h = st["gflops_per_image"] * st["epochs"]
                ax.bar(i, h, bottom=bottom, color=COLORS[m], alpha=1.0 - 0.35 * n, edgecolor="k", lw=0.5)
                ax.annotate(f"{st['global_size']}/{st['local_size']}", (i, bottom + h / 2), ha="center", va="center",
                            fontsize=7)
                bottom += h
            ax.annotate(f"{bottom:.3g}", (i, bottom), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS])
        ax.set_ylabel("GFLOPs per dataset image (all epochs)")
        ax.set_title(f"training FLOPs ({flops['speedup']:.2f}x fewer)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    bx = fig.add_subplot(1, 2, 2)
    for i, m in enumerate(METHODS):
        s = t.base if m == "dinov2" else t.fast
        if s.mean is None:
            continue
        bx.bar(i, s.mean, color=COLORS[m], yerr=np.array([_errbar(s)]).T, capsize=4)
        bx.plot([i] * len(s.values), s.values, "k.", ms=5)
    bx.set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS])
    bx.set_ylabel("seconds")
    bx.set_title("training wall-clock per run (whiskers: min-max)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_corruption_diffs(runs: Mapping[tuple[str, int], RunResult], seeds: Sequence[int], path: Path) -> Path | None:
    """Per corruption type: FastDINOv2 - DINOv2 top-1 (mean over severities), mean over seeds, min-max whiskers,
    coloured by frequency band."""
    from matplotlib.figure import Figure

    from fastdinov2.eval.frequency import FREQUENCY_BANDS

    rows = []
    for band, types in FREQUENCY_BANDS.items():
        for c in types:
            d = _type_comparison(runs, seeds, c).diff
            if d.n:
                rows.append((band, c, d))
    if not rows:
        return None
    fig = Figure(figsize=(10, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    band_color = {b: f"C{i + 2}" for i, b in enumerate(FREQUENCY_BANDS)}
    for i, (band, _, d) in enumerate(rows):
        ax.bar(i, d.mean or 0.0, color=band_color[band], yerr=np.array([_errbar(d)]).T, capsize=2,
               label=band if all(r[0] != band for r in rows[:i]) else None)
        ax.plot([i] * len(d.values), d.values, "k.", ms=3, alpha=0.6)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [c.replace("_", " ") for _, c, _ in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("FastDINOv2 − DINOv2 (top-1 points)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="frequency band", fontsize=7, title_fontsize=8)
    ax.set_title("corruption accuracy difference per type (mean over severities and seeds)", fontsize=10)
    return _save(fig, path)


def _freq_curves(runs: Mapping[tuple[str, int], RunResult], seeds: Sequence[int], method: str,
                 kind: str) -> dict[float, Stats]:
    per: dict[float, list[float]] = {}
    for s in seeds:
        r = runs.get((method, s))
        res = r.evals.get("frequency") if r else None
        for rad, v in (_get(res, kind) or {}).items():
            if _num(v) is not None:
                per.setdefault(float(rad), []).append(float(v))
    return {rad: summarize(v) for rad, v in sorted(per.items())}


def plot_frequency(runs: Mapping[tuple[str, int], RunResult], seeds: Sequence[int], path: Path) -> Path | None:
    """Low-pass and high-pass top-1 against the filter radius: mean over seeds, min-max shaded."""
    from matplotlib.figure import Figure

    curves = {(m, k): _freq_curves(runs, seeds, m, k) for m in METHODS for k in ("low_pass", "high_pass")}
    if not any(curves.values()):
        return None
    fig = Figure(figsize=(10, 4))
    for n, kind in enumerate(("low_pass", "high_pass")):
        ax = fig.add_subplot(1, 2, n + 1)
        for m in METHODS:
            c = curves[(m, kind)]
            if not c:
                continue
            xs = list(c)  # every Stats here has at least one value
            ys = np.array([[c[x].mean, c[x].min, c[x].max] for x in xs], dtype=float)
            ax.plot(xs, ys[:, 0], "o-" if m == "dinov2" else "s--", color=COLORS[m], ms=4, label=LABELS[m])
            ax.fill_between(xs, ys[:, 1], ys[:, 2], color=COLORS[m], alpha=0.2, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("filter radius (cycles per image)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(("low-pass (keeps |f| <= r)" if kind == "low_pass" else "high-pass (keeps |f| > r)"),
                     fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _cell(s: Stats, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std [min, max] (n=..)``; a single value alone."""
    if s.mean is None:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if s.n == 1:
        return f.format(s.mean)
    return f"{f.format(s.mean)} ± {s.std:.{digits}f} [{f.format(s.min)}, {f.format(s.max)}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _type_comparison(runs: Mapping[tuple[str, int], RunResult], seeds: Sequence[int], c: str) -> MetricComparison:
    per = {m: {s: runs[(m, s)].metric(f"type:{c}") for s in seeds if (m, s) in runs} for m in METHODS}
    return compare_metric(f"type:{c}", c, per["dinov2"], per["fastdinov2"])


def _paper_cell(key: str) -> str:
    if key == "train_seconds":
        return f"{PAPER_DAYS[0]} → {PAPER_DAYS[1]} L40S-days (ratio {PAPER_DAYS[1] / PAPER_DAYS[0]:.3f})"
    if key == "linear_top1":
        return f"{PAPER_LINEAR[0]} → {PAPER_LINEAR[1]} ({PAPER_LINEAR[1] - PAPER_LINEAR[0]:+.2f})"
    if key == "corruption_mean_15":
        return f"{PAPER_CORRUPTION[0]} → {PAPER_CORRUPTION[1]} ({PAPER_CORRUPTION[1] - PAPER_CORRUPTION[0]:+.2f})"
    if key == "noise_mean":
        a, b = (float(np.mean([PAPER_NOISE[c][i] for c in NOISE_TYPES])) for i in (0, 1))
        return f"{a:.2f} → {b:.2f} ({b - a:+.2f})"
    if key.startswith("type:") and key[5:] in PAPER_NOISE:
        a, b = PAPER_NOISE[key[5:]]
        return f"{a} → {b} ({b - a:+.2f})"
    return "–"


def _reading_context(exp: Mapping[str, Any], flops: Mapping[str, Any] | None,
                     runs: Mapping[tuple[str, int], RunResult], seeds: Sequence[int]) -> ReadingContext:
    fast_cfg = _get(exp, "configs", "fastdinov2") or {}
    ctx = ReadingContext(seeds=len(seeds), synthetic=_get(fast_cfg, "data", "root") is None)
    ev = exp.get("eval", {})
    ctx.image_size = ev.get("image_size")
    ctx.corruption_size = ev.get("corruption_size") or ev.get("image_size")
    stages = _get(fast_cfg, "curriculum", "stages") or []
    epochs = _num(_get(fast_cfg, "optim", "epochs"))
    ctx.epochs = epochs
    s = _get(fast_cfg, "student") or {}
    if s:
        ctx.model = (f"a ViT ({s.get('arch')}, width {s.get('embed_dim')}, depth {s.get('depth')}, patch "
                     f"{s.get('patch_size')})" if s.get("arch") == "vit_custom" else f"a {s.get('arch')}/"
                     f"{s.get('patch_size')}")
    lengths = [(_num(st.get("epochs")) if st.get("epochs") is not None else (_num(st.get("fraction")) or 0.0) *
                (epochs or 0.0)) for st in stages]
    if len(stages) > 1 and epochs:
        st0, last = stages[0], stages[-1]
        ctx.first_stage = (f"{st0.get('global_size')}/{st0.get('local_size')} px for {lengths[0]:g} of "
                           f"{epochs:g} epochs")
        ctx.last_stage_epochs = lengths[-1]
        ctx.full_size = f"{last.get('global_size')}/{last.get('local_size')}"
    noisy = [(st, n) for st, n in zip(stages, lengths) if _get(st, "noise", "kind") not in (None, "none")]
    if noisy:
        st, n = noisy[0]
        what = "Gaussian noise patching" if _get(st, "noise", "kind") == "gaussian" else "blur patching"
        scale = f" (max scale {_get(st, 'noise', 'max_scale')})" if _get(st, "noise", "kind") == "gaussian" else ""
        ctx.noise = f"{n:g} of {epochs:g} epochs ({what}{scale})" if epochs else None
    if flops:
        ctx.flop_speedup = _num(flops.get("speedup"))
        fs = flops["fastdinov2"]["stages"]
        if len(fs) > 1 and fs[0]["gflops_per_image"] > 0:
            ctx.stage_flop_speedup = fs[-1]["gflops_per_image"] / fs[0]["gflops_per_image"]
        ctx.train_images = flops.get("train_images")
    # per-image speed of the first stage against the last, from the FastDINOv2 runs' logged img/s
    if len(stages) > 1:
        first = f"{stages[0].get('global_size')}/{stages[0].get('local_size')}"
        last_sz = f"{stages[-1].get('global_size')}/{stages[-1].get('local_size')}"
        ratios = [r.throughput[first] / r.throughput[last_sz] for s_ in seeds
                  if (r := runs.get(("fastdinov2", s_))) and first in r.throughput and last_sz in r.throughput
                  and r.throughput[last_sz] > 0]
        ctx.stage_speedup = float(np.mean(ratios)) if ratios else None
    for r in runs.values():
        knn = r.evals.get("knn")
        if knn:
            ctx.val_images, ctx.classes = knn.get("num_test"), knn.get("num_classes")
            ctx.train_images = ctx.train_images or knn.get("num_train")
        corr = r.evals.get("corruption")
        if corr and not ctx.corruption_images:
            counts = [v for sev in (corr.get("num_images") or {}).values() for v in sev.values()]
            ctx.corruption_images = int(min(counts)) if counts else None
    return ctx


def build_comparison_report(out: str | Path) -> Path:
    """Write ``OUT/report.md`` and its plots from whatever the experiment folder holds; returns the path."""
    out = Path(out)
    exp = _read_json(out / EXPERIMENT_FILE)
    if exp is None or exp.get("format") != FORMAT:
        raise ExperimentError(f"{out} is not an experiment folder (no {EXPERIMENT_FILE} of format {FORMAT!r})")
    seeds = [int(s) for s in exp.get("seeds", [])]
    flops = _read_json(out / FLOPS_FILE)
    runs = {(m, s): load_run_result(out, m, s) for s in seeds for m in METHODS}
    comp = comparisons(runs, seeds)
    ctx = _reading_context(exp, flops, runs, seeds)
    complete = [s for s in seeds if all(runs[(m, s)].finished and len(runs[(m, s)].evals) == 4 for m in METHODS)]

    plots = [("Accuracy", plot_headline(comp, out / "headline.png")),
             ("Cost", plot_cost(comp, flops, out / "cost.png")),
             ("Corruptions per type", plot_corruption_diffs(runs, seeds, out / "corruptions.png")),
             ("Frequency sensitivity", plot_frequency(runs, seeds, out / "frequency.png"))]
    md: list[str] = [
        "# FastDINOv2 vs DINOv2: the paper's claim, reproduced small",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by fastdinov2 {__version__} from `{out}`. "
        f"Seeds: {', '.join(map(str, seeds)) or 'none'}; complete (both methods trained and evaluated): "
        f"{', '.join(map(str, complete)) or 'none'}.",
        "",
        "## Reading",
        "",
        *compose_reading(comp, ctx),
        "",
        "## Headline numbers",
        "",
        "Mean ± sample std [min, max] over seeds. Ratio and difference are FastDINOv2 against DINOv2, per seed. "
        "The paper column is DINOv2 → FastDINOv2 (SPEC section 2: FLOPs and time for ViT-B/16 on ImageNet-1K, "
        "accuracies for ViT-S/16 on ImageNet-100 / -100-C).",
        "",
    ]
    rows: list[list[str]] = []
    if flops:
        b, f = (flops[m]["total_gflops_per_dataset_image"] for m in METHODS)
        rows.append(["training GFLOPs per dataset image (counted)", f"{b:.4g}", f"{f:.4g}", f"{f / b:.3f}", "–",
                     f"{PAPER_GFLOPS[0]} → {PAPER_GFLOPS[1]} GFLOPs (ratio {PAPER_GFLOPS[1] / PAPER_GFLOPS[0]:.3f})"])
    for key, label, is_acc in HEADLINE:
        c = comp[key]
        rows.append([label, _cell(c.base), _cell(c.fast), _cell(c.ratio, 3), _cell(c.diff, signed=True) if is_acc
                     else "–", _paper_cell(key)])
    md += [_md_table(["metric", "DINOv2", "FastDINOv2", "FastDINOv2 / DINOv2", "FastDINOv2 − DINOv2 (points)",
                      "paper"], rows), ""]
    speed = summarize([1.0 / r for r in comp["train_seconds"].ratio.values if r > 0])
    if flops or speed.n:
        md.append(f"Speed-ups (DINOv2 / FastDINOv2): FLOPs {_fmt(_num(flops.get('speedup')) if flops else None)}x, "
                  f"wall-clock {_cell(speed)}x.")
        md.append("")
    md += [f"![{t}]({p.name})\n" for t, p in plots[:1] if p is not None]

    md += ["## Cost", ""]
    if flops:
        frows = []
        for m in METHODS:
            for st in flops[m]["stages"]:
                frows.append([LABELS[m], st["name"], f"{st['global_size']}/{st['local_size']}", f"{st['epochs']:g}",
                              f"{st['gflops_per_image']:.4g}", f"{st['gflops_per_image'] * st['epochs']:.4g}"])
            frows.append([LABELS[m], "**total**", "", "", "", f"**{flops[m]['total_gflops_per_dataset_image']:.4g}**"])
        md += ["Training FLOPs, counted from one real training step per stage (teacher forward, student forward and "
               "backward; `fastdinov2 flops`). They do not depend on the seed.", "",
               _md_table(["method", "stage", "crops (global/local)", "epochs", "GFLOPs per image per epoch",
                          "GFLOPs per dataset image"], frows), ""]
        if flops.get("train_images"):
            n_img = flops["train_images"]
            tot = {m: flops[m]["total_gflops_per_dataset_image"] * n_img / 1e3 for m in METHODS}
            md += [f"With {n_img} training images: DINOv2 {tot['dinov2']:.4g} TFLOPs, FastDINOv2 "
                   f"{tot['fastdinov2']:.4g} TFLOPs in total.", ""]
    trows = []
    for s in seeds:
        for m in METHODS:
            r = runs[(m, s)]
            tm = r.timing
            note = []
            if tm.get("segments", 0) > 1:
                note.append(f"resumed ({tm['segments']} segments)")
            if tm.get("interrupted"):
                note.append("includes interrupted work" + (" (estimated)" if tm.get("estimated") else ""))
            tp = ", ".join(f"{k}: {v:.0f}" for k, v in r.throughput.items()) or "–"
            prog = ("finished" if r.finished else f"step {r.step} of {r.total_steps or '?'}") if r.exists else \
                "not started"
            trows.append([str(s), LABELS[m], prog, _fmt(tm.get("seconds"), 1), tp, "; ".join(note) or "–"])
    md += ["Training wall-clock per run (the trainer's set-up, loop, checkpoints and export; measured around "
           "`train()`), and the median logged img/s per crop size (global/local):", "",
           _md_table(["seed", "method", "training", "wall-clock (s)", "median img/s per crop size", "notes"], trows),
           ""]
    md += [f"![{t}]({p.name})\n" for t, p in plots[1:2] if p is not None]

    md += ["## Accuracy per seed", ""]
    arows = []
    for s in seeds:
        for m in METHODS:
            r = runs[(m, s)]
            arows.append([str(s), LABELS[m], *(_fmt(r.metric(k)) for k in (
                "knn_top1", "linear_top1", "corruption_clean_top1", "corruption_mean_15", "corruption_mean_19",
                "noise_mean"))])
    md += [_md_table(["seed", "method", "kNN top-1", "linear top-1", "clean top-1 (corruption pipeline)",
                      "corruptions (15)", "corruptions (19)", "noise (4)"], arows), ""]

    md += ["## Corruptions per type", ""]
    from fastdinov2.eval.corruption import CORRUPTIONS_ALL
    from fastdinov2.eval.frequency import FREQUENCY_BANDS

    band_of = {c: b for b, cs in FREQUENCY_BANDS.items() for c in cs}
    crows = []
    for name in CORRUPTIONS_ALL:
        tc = _type_comparison(runs, seeds, name)
        if tc.base.n or tc.fast.n:
            crows.append([name, band_of.get(name, "?"), _cell(tc.base), _cell(tc.fast), _cell(tc.diff, signed=True)])
    if crows:
        md += ["Top-1 of the clean-trained linear head, mean over the 5 severities; mean ± std [min, max] over seeds.",
               "", _md_table(["corruption", "frequency band", "DINOv2", "FastDINOv2", "FastDINOv2 − DINOv2"], crows),
               ""]
        md += [f"![{t}]({p.name})\n" for t, p in plots[2:3] if p is not None]
    else:
        md += ["No corruption results yet.", ""]

    md += ["## Frequency sensitivity", ""]
    frq = [(kind, {m: _freq_curves(runs, seeds, m, kind) for m in METHODS}) for kind in ("low_pass", "high_pass")]
    if any(c for _, per in frq for c in per.values()):
        qrows = []
        for kind, per in frq:
            for rad in sorted(set(per["dinov2"]) | set(per["fastdinov2"])):
                b, f = per["dinov2"].get(rad), per["fastdinov2"].get(rad)
                qrows.append([kind.replace("_", "-"), f"{rad:g}", _cell(b) if b else "–", _cell(f) if f else "–"])
        md += ["Top-1 on val images filtered in the Fourier domain (low-pass keeps frequencies up to the radius, "
               "high-pass the rest); mean ± std [min, max] over seeds.", "",
               _md_table(["filter", "radius", "DINOv2", "FastDINOv2"], qrows), ""]
        brows = []
        for band in FREQUENCY_BANDS:
            by_seed = {m: {s: _num(_get(runs[(m, s)].evals.get("frequency"), "bands", "bands", band, "mean"))
                           for s in seeds} for m in METHODS}
            bc = compare_metric(band, band, by_seed["dinov2"], by_seed["fastdinov2"])
            if bc.base.n or bc.fast.n:
                brows.append([band, ", ".join(FREQUENCY_BANDS[band]), _cell(bc.base), _cell(bc.fast),
                              _cell(bc.diff, signed=True)])
        if brows:
            md += ["Corruption accuracy grouped by the frequency band the corruption lives in:", "",
                   _md_table(["band", "corruptions", "DINOv2", "FastDINOv2", "FastDINOv2 − DINOv2"], brows), ""]
        md += [f"![{t}]({p.name})\n" for t, p in plots[3:4] if p is not None]
    else:
        md += ["No frequency results yet.", ""]

    md += _setup_section(out, exp, seeds, runs)
    report = out / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return report


def _setup_section(out: Path, exp: Mapping[str, Any], seeds: Sequence[int],
                   runs: Mapping[tuple[str, int], RunResult]) -> list[str]:
    md = ["## Setup", ""]
    names = exp.get("config_names", {})
    md += [f"- Configs: DINOv2 `{names.get('dinov2')}`, FastDINOv2 `{names.get('fastdinov2')}` (resolved copies in "
           f"`{out / 'configs'}`); overrides for both: "
           f"{' '.join(f'`{o}`' for o in exp.get('overrides', [])) or 'none'}; each run adds `train.seed=<seed>`.",
           f"- Data: {exp.get('data') or 'the embedded generated dataset'} (`{exp.get('data_root')}`).",
           "- Evaluation settings: " + ", ".join(f"{k}={v}" for k, v in exp.get("eval", {}).items()) + ".",
           "- Curricula: " + "; ".join(f"{LABELS[m]}: {_stages_text(_get(exp, 'configs', m))}" for m in METHODS) + ".",
           "- Training curves: `fastdinov2 report " + (" ".join(str(run_dir(out, m, seeds[0])) for m in METHODS[::-1])
                                                        if seeds else "RUN_A RUN_B") + "` (one seed, side by side).",
           ""]
    md += ["Invocations (command line and machine):", ""]
    for inv in exp.get("invocations", []):
        md.append(f"- {inv.get('started')}: `{inv.get('command')}`{' (report only)' if inv.get('report_only') else ''}"
                  f" — {_machine_line(inv.get('machine', {}))}")
    timed = sorted({m for r in runs.values() for m in r.timing.get("machines", [])})
    if len(timed) > 1:
        md += ["", f"**Note:** the training runs were timed on {len(timed)} different machine setups; wall-clock "
               "ratios mix them:", ""] + [f"- {m}" for m in timed]
    md.append("")
    return md


def _stages_text(cfg: Any) -> str:
    stages = _get(cfg, "curriculum", "stages") or []
    epochs = _num(_get(cfg, "optim", "epochs")) or 0.0
    parts = []
    for st in stages:
        n = st.get("epochs") if st.get("epochs") is not None else (st.get("fraction") or 0.0) * epochs
        noise = _get(st, "noise", "kind")
        extra = f", {noise} noise max {_get(st, 'noise', 'max_scale')}" if noise not in (None, "none") else ""
        parts.append(f"{n:g} ep @ {st.get('global_size')}/{st.get('local_size')}{extra}")
    return " then ".join(parts) or "?"


# ----------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------
def _cfg_dict(cfg: Config) -> dict[str, Any]:
    from fastdinov2.config import to_dict

    return to_dict(cfg)


def _check_previous(out: Path, prev: Mapping[str, Any], cfgs: Mapping[str, Config], ev: EvalSettings) -> None:
    """A rerun in ``out`` must use the same configs (up to resumable keys) and evaluation settings."""
    from fastdinov2.train.loop import RESUMABLE_KEYS

    if prev.get("format") != FORMAT:
        raise ExperimentError(f"{out / EXPERIMENT_FILE} is not a {FORMAT} file")
    for m in METHODS:
        saved = out / "configs" / f"{m}.yaml"
        if not saved.is_file():
            continue
        diffs = diff_configs(load_config(str(saved)), cfgs[m], ignore=(*RESUMABLE_KEYS, "train.seed"))
        if diffs:
            raise ConfigError(f"{out} holds a comparison with a different {LABELS[m]} config (keys: "
                              f"{', '.join(diffs)}); use another --out")
    old = prev.get("eval", {})
    new = ev.as_dict()
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        what = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed)
        raise ExperimentError(f"{out} was evaluated with other settings ({what}); use another --out")


def _ensure_flops(out: Path, cfgs: Mapping[str, Config], data_root: Path) -> dict[str, Any]:
    path = out / FLOPS_FILE
    existing = _read_json(path)
    if existing is not None:
        return existing
    from fastdinov2.data.datasets import discover_training_images
    from fastdinov2.flops import training_flops

    _log("counting training FLOPs of both configs")
    res: dict[str, Any] = {m: training_flops(cfgs[m]) for m in METHODS}
    res["speedup"] = (res["dinov2"]["total_gflops_per_dataset_image"]
                      / res["fastdinov2"]["total_gflops_per_dataset_image"])
    res["train_images"] = len(discover_training_images(data_root)[0])
    write_json_atomic(path, res)
    return res


def default_out(preset: str) -> Path:
    """``runs/compare_<preset>``."""
    return Path("runs") / f"compare_{preset}"


def run_comparison(
    preset: str = DEFAULT_PRESET,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    data: str | Path | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    baseline_config: str | None = None,
    fast_config: str | None = None,
    eval_settings: EvalSettings | None = None,
    runtime: Runtime | None = None,
    report_only: bool = False,
    command: str | None = None,
) -> Path:
    """Train, evaluate and compare DINOv2 and FastDINOv2 for ``seeds`` (an int N means seeds 0..N-1); returns
    the path of ``report.md``. Running it again on the same ``out`` continues where it stopped.

    ``overrides`` (``KEY=VALUE``) apply to both configs; ``data`` is a root with ``train/`` and ``val/`` class
    folders (None: the embedded generated dataset). ``baseline_config``/``fast_config`` replace the presets
    ``dinov2_<preset>``/``fastdinov2_<preset>`` (the two must differ only in the curriculum). ``report_only``
    rebuilds the report from what exists. ``command`` is recorded in the report (default: a Python call).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list):
        raise ExperimentError(f"seeds must be a positive count or a list of seeds >= 0, got {seeds!r}")
    out = Path(out) if out is not None else default_out(preset)
    runtime = runtime or Runtime()
    if report_only:
        saved = _read_json(out / EXPERIMENT_FILE)
        if saved is None:
            raise ExperimentError(f"{out} has no {EXPERIMENT_FILE}: nothing to report")
        saved.setdefault("invocations", []).append(
            {"command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"),
             "machine": machine_info(None), "report_only": True})
        write_json_atomic(out / EXPERIMENT_FILE, saved)
        return build_comparison_report(out)

    from fastdinov2.train.loop import resolve_data_root, resolve_device

    names = config_names(preset, baseline_config, fast_config)
    cfgs0 = resolve_configs(preset, overrides, data, 0, baseline_config, fast_config, runtime.progress)
    data_root = resolve_data_root(cfgs0["dinov2"])
    for split in ("train", "val"):
        if not (data_root / split).is_dir():
            raise EvalError(f"{data_root} has no {split}/ folder; the comparison needs {data_root}/train/<class>/* "
                            f"and {data_root}/val/<class>/*")
    ev = (eval_settings or EvalSettings()).resolved(cfgs0["dinov2"])
    train_device = str(resolve_device(cfgs0["dinov2"]))
    machine = machine_info(train_device)
    exp_path = out / EXPERIMENT_FILE
    prev = _read_json(exp_path)
    if prev is not None:
        _check_previous(out, prev, cfgs0, ev)
    exp: dict[str, Any] = dict(prev or {"format": FORMAT, "version": 1, "invocations": []})
    exp.update(preset=preset, config_names=names, overrides=list(overrides),
               data=None if data is None else str(data), data_root=str(data_root), eval=ev.as_dict(),
               seeds=sorted(set(exp.get("seeds", [])) | set(seed_list)),
               configs={m: _cfg_dict(cfgs0[m]) for m in METHODS})
    exp["invocations"].append({"command": command or _python_call(preset, seed_list, data, out, overrides),
                               "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
                               "seeds": seed_list, "report_only": False})
    out.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    for m in METHODS:
        (out / "configs" / f"{m}.yaml").write_text(to_yaml(cfgs0[m]), encoding="utf-8")
    write_json_atomic(exp_path, exp)
    _ensure_flops(out, cfgs0, data_root)
    _warm_up(train_device)

    try:
        for i, s in enumerate(seed_list):
            cfgs = resolve_configs(preset, overrides, data, s, baseline_config, fast_config, runtime.progress)
            for m in METHODS:  # interleaved: both methods of one seed, then the next seed
                path = run_dir(out, m, s)
                finished = _train_if_needed(cfgs[m], path, machine, f"{LABELS[m]} seed {s}")
                if finished:
                    done = evaluate_run(path, data_root, ev, runtime)
                    if done:
                        _log(f"{LABELS[m]} seed {s}: evaluated {', '.join(done)}")
                else:
                    _log(f"{LABELS[m]} seed {s}: training stopped before the end; evaluations wait for it")
            if i + 1 < len(seed_list):
                build_comparison_report(out)  # partial results are readable while the next seed trains
    except BaseException:
        with contextlib.suppress(Exception):
            build_comparison_report(out)
        raise
    report = build_comparison_report(out)
    _log(f"wrote {report}")
    return report


def _warm_up(device: str) -> None:
    """Create the CUDA context before the first timed run, so that its one-off cost (seconds) is not charged to
    the first run's wall-clock."""
    if device.startswith("cuda"):
        import torch

        torch.zeros(1, device=device).add_(1).cpu()
        torch.cuda.synchronize(device)


def _train_if_needed(cfg: Config, path: Path, machine: Mapping[str, Any], what: str) -> bool:
    from fastdinov2.train.loop import check_run_dir

    check_run_dir(path, cfg, allow_config_change=False)  # a finished run must still match the config
    if training_finished(path):
        return True
    step = _latest_step(path)
    _log(f"{what}: {'resuming at step ' + str(step) if step else 'training'} in {path}")
    summary = train_timed(cfg, path, machine)
    return bool(summary["finished"]) and training_finished(path)


def _python_call(preset: str, seeds: Sequence[int], data: Any, out: Path, overrides: Sequence[str]) -> str:
    return (f"run_comparison(preset={preset!r}, seeds={list(seeds)!r}, data={None if data is None else str(data)!r}, "
            f"out={str(out)!r}, overrides={list(overrides)!r})")


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def _command_line(args: argparse.Namespace) -> str:
    """The command as typed when this process was started as ``fastdinov2 experiment compare ...``; otherwise
    the equivalent command rebuilt from the parsed arguments."""
    argv = sys.argv[1:]
    if argv[:2] == ["experiment", "compare"]:
        return shlex.join(["fastdinov2", *argv])
    parts = ["fastdinov2", "experiment", "compare", "--preset", args.preset, "--seeds", str(args.seeds)]
    for flag, value in (("--data", args.data), ("--out", args.out), ("--baseline-config", args.baseline_config),
                        ("--fast-config", args.fast_config)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join([*parts, *args.overrides])


def _cmd_compare(args: argparse.Namespace) -> int:
    from fastdinov2.train.loop import EXIT_PREEMPTED, Preempted

    settings = EvalSettings(
        image_size=args.image_size, linear_epochs=args.linear_epochs, corruption_per_class=args.corruption_per_class,
        corruption_size=args.corruption_size, frequency_per_class=args.frequency_per_class,
        radii=tuple(args.radii) if args.radii else None, seed=args.eval_seed,
    )
    runtime = Runtime(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                      progress=not args.no_progress)
    try:
        report = run_comparison(args.preset, args.seeds, args.data, args.out, args.overrides,
                                baseline_config=args.baseline_config, fast_config=args.fast_config,
                                eval_settings=settings, runtime=runtime, report_only=args.report_only,
                                command=_command_line(args))
    except ExperimentError as exc:
        print(f"fastdinov2: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"[fastdinov2] preempted: {exc}; run the same command again to continue", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"wrote {report}")
    return 0


def _per_class(value: str) -> int | None:
    if value.lower() in ("all", "none"):
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or 'all', got {value}")
    return n


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fastdinov2 experiment compare``."""
    p = subparsers.add_parser("experiment", help="experiments: compare DINOv2 and FastDINOv2",
                              description="Reproducible experiments built from training and evaluation.")
    sub = p.add_subparsers(dest="experiment_command", required=True, metavar="EXPERIMENT")
    c = sub.add_parser(
        "compare", help="train and evaluate DINOv2 and FastDINOv2 over seeds; write a comparison report",
        description="Trains dinov2_<preset> and fastdinov2_<preset> with the same data, model, epochs and seeds "
                    "(interleaved), evaluates each run (kNN, linear probe, 19x5 generated corruptions, frequency "
                    "sensitivity), records wall-clock and FLOPs, and writes OUT/report.md with mean and spread over "
                    "seeds. Running the same command again continues where it stopped (see docs/experiment.md).",
    )
    c.add_argument("--preset", default=DEFAULT_PRESET, help="compares dinov2_<preset> and fastdinov2_<preset> "
                   f"(default: {DEFAULT_PRESET})")
    c.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds 0..N-1 (default: {DEFAULT_SEEDS})")
    c.add_argument("--data", default=None, help="root with train/ and val/ class folders (default: the embedded "
                   "generated dataset)")
    c.add_argument("--out", type=Path, default=None, help="experiment folder (default: runs/compare_<preset>)")
    c.add_argument("--baseline-config", default=None, help="use this config instead of dinov2_<preset>")
    c.add_argument("--fast-config", default=None, help="use this config instead of fastdinov2_<preset>")
    c.add_argument("--image-size", type=int, default=None,
                   help="evaluation resolution (default: the configs' crops.global_crops_size)")
    c.add_argument("--linear-epochs", type=int, default=10, help="linear-probe epochs (default: 10)")
    c.add_argument("--corruption-per-class", type=_per_class, default=10,
                   help="val images per class for each of the 19x5 corruption sets, or 'all' (default: 10)")
    c.add_argument("--corruption-size", type=int, default=224,
                   help="generate corruptions at this size, then resize to the eval size (default: 224, "
                        "ImageNet-C's calibration; 0: at the eval size)")
    c.add_argument("--frequency-per-class", type=_per_class, default=None,
                   help="val images per class for frequency sensitivity, or 'all' (default: all)")
    c.add_argument("--radii", nargs="+", type=float, default=None, help="frequency filter radii (default: powers "
                   "of two up to image_size/2)")
    c.add_argument("--eval-seed", type=int, default=0, help="seed of the corruption subsample and generation "
                   "(the same for every run; default: 0)")
    c.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    c.add_argument("--num-workers", type=int, default=0, help="evaluation data-loader workers (default: 0)")
    c.add_argument("--device", default="auto", help="evaluation device: auto | cpu | cuda (training: "
                   "compute.device)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--report-only", action="store_true", help="only rebuild OUT/report.md from what exists")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides applied to both methods")
    c.set_defaults(func=_cmd_compare)
    return p
