"""``fastdinov2 report``: a markdown report with plots for one run, or several runs side by side.

For each run directory it reads ``config.yaml`` (the run's resolved config), ``metrics.jsonl`` (one JSON
object per logged step; missing keys are tolerated and a last line cut short by a crash is ignored) and
every ``eval/*.json`` result file (the common envelope of :mod:`fastdinov2.eval.results`), and writes::

    OUT/report.md          summary, per-stage throughput, every evaluation found
    OUT/losses.png         total / DINO / iBOT / KoLeo loss vs step, curriculum stages marked
    OUT/schedules.png      learning rate, teacher temperature, weight decay, teacher momentum vs step
    OUT/throughput.png     img/s vs step and median img/s per stage
    OUT/data_wait.png      share of step time spent waiting for data, vs step and per stage
    OUT/frequency.png      accuracy vs filter radius (only when frequency results exist)

Every table has one column per run; with exactly two runs it adds ``A - B`` and ``A / B`` columns (e.g.
FastDINOv2 vs its DINOv2 baseline). Plots are drawn with matplotlib's Agg canvas without touching the global
pyplot state.
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from fastdinov2 import __version__
from fastdinov2.eval.results import EvalError, read_result
from fastdinov2.train.logging import METRICS_FILE, MetricsFileError, read_metrics

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn (start-up time of the command line)
    from matplotlib.figure import Figure

LOSS_KEYS = (("loss", "total loss"), ("dino_loss", "DINO loss"), ("ibot_loss", "iBOT loss"),
             ("koleo_loss", "KoLeo loss"))
SCHEDULE_KEYS = (("lr", "learning rate"), ("teacher_temp", "teacher temperature"), ("wd", "weight decay"),
                 ("momentum", "teacher EMA momentum"))
MAX_GENERIC_ROWS = 80


class ReportError(ValueError):
    """A run directory or one of its files cannot be read; the message names the path."""


# ----------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StageSpan:
    """Consecutive logged steps of one curriculum stage."""

    key: Any  # the logged ``stage`` value (an index), or (global_size, local_size) when it is missing
    name: str
    records: list[dict[str, Any]]

    @property
    def first_step(self) -> int:
        return int(self.records[0]["step"])

    @property
    def last_step(self) -> int:
        return int(self.records[-1]["step"])

    @property
    def sizes(self) -> str:
        g, l_ = self.records[0].get("global_size"), self.records[0].get("local_size")
        return f"{g}/{l_}" if g is not None and l_ is not None else "?"

    def values(self, key: str) -> np.ndarray:
        return np.array([v for r in self.records if (v := _num(r.get(key))) is not None and math.isfinite(v)])


@dataclass
class EvalEntry:
    protocol: str
    label: str  # distinguishes several results of one protocol (dataset, file name)
    path: Path
    config: dict[str, Any]
    results: dict[str, Any]


@dataclass
class RunData:
    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    stages: list[StageSpan]
    evals: list[EvalEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        in_dict = isinstance(d, dict) and k in d
        in_list = isinstance(d, list) and isinstance(k, int) and 0 <= k < len(d)
        if not (in_dict or in_list):
            return None
        d = d[k]
    return d


def stage_spans(metrics: Sequence[dict[str, Any]], config: dict[str, Any]) -> list[StageSpan]:
    """Split the logged records into runs of consecutive records of the same stage.

    The stage is the record's ``stage`` value (the curriculum stage index, named from ``config``), or its
    ``(global_size, local_size)`` when ``stage`` was not logged.
    """
    spans: list[StageSpan] = []
    for rec in metrics:
        key = rec.get("stage", (rec.get("global_size"), rec.get("local_size")))
        if not spans or spans[-1].key != key:
            spans.append(StageSpan(key, _stage_name(key, config), []))
        spans[-1].records.append(rec)
    return spans


def _stage_name(key: Any, config: dict[str, Any]) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        name = _get(config, "curriculum", "stages", key, "name")
        return f"{key}: {name}" if name else f"stage {key}"
    if isinstance(key, tuple):
        return "stage" if key == (None, None) else f"{key[0]}/{key[1]}"
    return str(key)


def _eval_label(protocol: str, path: Path, results: dict[str, Any]) -> str:
    if protocol == "retrieval" and isinstance(results.get("dataset"), str):
        scales = results.get("scales")
        return results["dataset"] + (" multi-scale" if isinstance(scales, list) and len(scales) > 1 else "")
    return "" if path.stem == protocol else path.stem


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read one run directory (config, metrics, evaluation results); missing parts become notes."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory not found: {path}")
    results = sorted((path / "eval").glob("*.json"))
    if not (path / "config.yaml").is_file() and not (path / METRICS_FILE).is_file() and not results:
        raise ReportError(f"{path} is not a run directory: it has no config.yaml, no {METRICS_FILE} and no "
                          "eval/*.json result files")
    notes: list[str] = []
    config: dict[str, Any] = {}
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        try:
            loaded = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ReportError(f"cannot parse {cfg_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ReportError(f"{cfg_file} does not hold a mapping")
        config = loaded
    else:
        notes.append(f"no {cfg_file.name}")
    metrics: list[dict[str, Any]] = []
    if (path / METRICS_FILE).is_file():
        metrics = read_metrics(path / METRICS_FILE)
        metrics.sort(key=lambda r: r["step"])
    else:
        notes.append(f"no {METRICS_FILE}")
    evals: list[EvalEntry] = []
    for f in results:
        if f.with_suffix(".safetensors").is_file():
            continue  # the metadata of a saved head (e.g. linear_head.json), not a result
        obj = read_result(f)
        protocol, results = str(obj["protocol"]), obj["results"]
        if not isinstance(results, dict):
            raise ReportError(f"{f}: 'results' must be a JSON object")
        cfg = obj["config"] if isinstance(obj["config"], dict) else {}
        label = _eval_label(protocol, f, results)
        if any((e.protocol, e.label) == (protocol, label) for e in evals):
            label = f"{label} ({f.stem})" if label else f.stem  # two files of one kind: keep both apart
        evals.append(EvalEntry(protocol, label, f, cfg, results))
    return RunData(name or path.resolve().name, path, config, metrics, stage_spans(metrics, config), evals, notes)


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, made unique with parent folders when two runs share a name (``a/run``, ``b/run``),
    else (the same folder given twice) numbered: ``run (1)``, ``run (2)``."""
    resolved = [p.resolve() for p in paths]
    names = [r.name for r in resolved]
    if len(set(resolved)) == len(resolved):
        depth = 1
        while len(set(names)) < len(names) and depth < 6:
            depth += 1
            names = [Path(*r.parts[-depth:]).as_posix() for r in resolved]  # parts[0] of an absolute path is "/"
    if len(set(names)) < len(names):
        names = [f"{r.name} ({i + 1})" for i, r in enumerate(resolved)]
    return names


# ----------------------------------------------------------------------------------------------------------
# Markdown helpers
# ----------------------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(v)
    if isinstance(v, numbers.Real):
        x = float(v)
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e6):
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _compare_table(first: str, names: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]]) -> str:
    """Rows of per-run values; with two runs adds difference and ratio columns (first run vs second)."""
    header = [first, *names]
    two = len(names) == 2
    if two:
        header += [f"{names[0]} − {names[1]}", f"{names[0]} / {names[1]}"]
    body = []
    for label, values in rows:
        row: list[Any] = [label, *values]
        if two:
            a, b = (_num(v) for v in values)
            both_int = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
            row.append(None if a is None or b is None else (int(a - b) if both_int else a - b))
            row.append(None if a is None or b is None or b == 0 else f"{a / b:.3f}x")
        body.append(row)
    return _md_table(header, body)


# ----------------------------------------------------------------------------------------------------------
# Evaluation tables: each renderer turns one protocol's ``results`` into (row label, number) pairs
# ----------------------------------------------------------------------------------------------------------
Rows = list[tuple[str, Any]]  # (row label, number, text or None)


def _knn_block(res: dict[str, Any], prefix: str) -> Rows:
    rows: Rows = []
    ks = _dict(res.get("ks"))
    for k in sorted(ks, key=lambda s: int(s) if str(s).isdigit() else 0):
        for metric in ("top1", "top5"):
            rows.append((f"{prefix}k={k} top-{metric[3:]}", _num(_get(ks, k, metric))))
    rows += [(f"{prefix}best top-1", _num(res.get("top1"))), (f"{prefix}best top-5", _num(res.get("top5")))]
    return rows


def _knn_rows(results: dict[str, Any]) -> Rows:
    if "ks" in results:
        return _knn_block(results, "")
    # several results in one file, e.g. {"trained": {...}, "random_init": {...}}
    rows: Rows = []
    for name, sub in results.items():
        if isinstance(sub, dict) and "ks" in sub:
            rows += _knn_block(sub, f"{name}: ")
    return rows or _generic_rows(results)


def _retrieval_rows(results: dict[str, Any]) -> Rows:
    rows: Rows = []
    for setup in ("easy", "medium", "hard"):
        block = results.get(setup)
        if not isinstance(block, dict):
            continue
        rows.append((f"{setup.capitalize()} mAP", _num(block.get("map"))))
        rows += [(f"{setup.capitalize()} {k.replace('mp', 'mP')}", _num(v)) for k, v in block.items()
                 if k.startswith("mp@")]
    return rows or _generic_rows(results)


def _linear_rows(results: dict[str, Any]) -> Rows:
    best = results.get("best")
    if not isinstance(best, dict):
        return _generic_rows(results)
    return [
        ("best head", best.get("name")),
        ("best top-1", _num(best.get("top1"))),
        ("best top-5", _num(best.get("top5"))),
        (f"selection top-1 ({results.get('selection_split', '?')})", _num(best.get("selection_top1"))),
        ("heads in the grid", len(results["heads"]) if isinstance(results.get("heads"), list) else None),
    ]


def _corruption_rows(results: dict[str, Any]) -> Rows:
    if not isinstance(results.get("accuracy"), dict):
        return _generic_rows(results)
    mce = _dict(results.get("mce"))
    rows: Rows = [
        ("clean top-1", _num(results.get("clean_top1"))),
        ("mean, 15 standard types", _num(results.get("mean_common"))),
        ("mean, all 19 types", _num(results.get("mean_all"))),
        ("mean, types evaluated", _num(results.get("mean_present"))),
    ]
    if mce:
        rows.append((f"mCE vs {mce.get('reference') or 'reference'}", _num(mce.get("mce"))))
    type_mean = _dict(results.get("type_mean"))
    for c, sev in results["accuracy"].items():
        mean = _num(type_mean.get(c))
        if mean is None and isinstance(sev, dict) and sev:
            vals = [v for v in map(_num, sev.values()) if v is not None]
            mean = float(np.mean(vals)) if vals else None
        rows.append((f"{c} (mean over severities)", mean))
    return rows


def _frequency_rows(results: dict[str, Any]) -> Rows:
    low, high = results.get("low_pass"), results.get("high_pass")
    if not isinstance(low, dict) or not isinstance(high, dict):
        return _generic_rows(results)
    rows: Rows = [("unfiltered top-1", _num(results.get("clean_top1")))]
    rows += [(f"low-pass r={r}", _num(v)) for r, v in low.items()]
    rows += [(f"high-pass r={r}", _num(v)) for r, v in high.items()]
    bands = _get(results, "bands", "bands")
    if isinstance(bands, dict):
        rows += [(f"corruptions, {band} band (mean)", _num(_get(info, "mean"))) for band, info in bands.items()]
    return rows


def _generic_rows(results: dict[str, Any], prefix: str = "") -> Rows:
    """Every numeric leaf of a nested dict as ``a.b.c`` (lists are skipped), at most MAX_GENERIC_ROWS."""
    rows: Rows = []
    for k, v in results.items():
        label = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _generic_rows(v, f"{label}.")
        elif _num(v) is not None:
            rows.append((label, v))
        if len(rows) >= MAX_GENERIC_ROWS:
            break
    return rows[:MAX_GENERIC_ROWS]


RENDERERS: dict[str, Callable[[dict[str, Any]], Rows]] = {
    "knn": _knn_rows,
    "linear": _linear_rows,
    "corruption": _corruption_rows,
    "retrieval": _retrieval_rows,
    "frequency": _frequency_rows,
}
PROTOCOL_TITLES = {
    "knn": "kNN classification (top-k accuracy, %)",
    "linear": "Linear probe (accuracy, %)",
    "corruption": "Corruption robustness (accuracy, %)",
    "retrieval": "Instance retrieval (revisited Oxford/Paris, %)",
    "frequency": "Frequency sensitivity (accuracy, %)",
}
PROTOCOL_ORDER = ("knn", "linear", "corruption", "retrieval", "frequency")


def _eval_sections(runs: Sequence[RunData]) -> list[str]:
    groups: dict[tuple[str, str], list[EvalEntry | None]] = {}
    for i, run in enumerate(runs):
        for e in run.evals:
            slot = groups.setdefault((e.protocol, e.label), [None] * len(runs))
            if slot[i] is None:
                slot[i] = e
    order = {p: n for n, p in enumerate(PROTOCOL_ORDER)}
    names = [r.name for r in runs]
    out: list[str] = []
    for (protocol, label), entries in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        render = RENDERERS.get(protocol, _generic_rows)
        per_run = [dict(render(e.results)) if e is not None else {} for e in entries]
        labels: list[str] = []
        for rows in per_run:
            labels += [lbl for lbl in rows if lbl not in labels]
        title = PROTOCOL_TITLES.get(protocol, f"{protocol} results")
        out.append(f"### {title}{f' — {label}' if label else ''}\n")
        files = ", ".join(f"`{e.path}`" for e in entries if e is not None)
        out.append(f"Source: {files}\n")
        out.append(_compare_table("metric", names, [(lbl, [r.get(lbl) for r in per_run]) for lbl in labels]))
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------
def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], v) for r in records if (v := _num(r.get(key))) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def _mark_stages(ax: Any, runs: Sequence[RunData], colors: Sequence[str], label: bool) -> None:
    """Shade the first run's stages (alternating) and draw every run's stage switches as dashed lines."""
    if runs and runs[0].stages:
        for n, span in enumerate(runs[0].stages):
            nxt = runs[0].stages[n + 1].first_step if n + 1 < len(runs[0].stages) else span.last_step
            if n % 2 == 1:
                ax.axvspan(span.first_step, nxt, color="0.5", alpha=0.12, lw=0)
            if label and len(runs[0].stages) > 1:
                ax.text(span.first_step, 1.0, f" {span.name} ({span.sizes})", transform=ax.get_xaxis_transform(),
                        va="top", ha="left", fontsize=7, color="0.3")
    for run, c in zip(runs, colors):
        for span in run.stages[1:]:
            ax.axvline(span.first_step, color=c, ls="--", lw=0.8, alpha=0.7)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_grid(runs: Sequence[RunData], keys: Sequence[tuple[str, str]], path: Path, title: str) -> Path | None:
    """One panel per metric key, every run overlaid, curriculum stages marked."""
    if not any(_series(r.metrics, k)[0].size for r in runs for k, _ in keys):
        return None
    cols = 2 if len(keys) > 1 else 1
    rows = math.ceil(len(keys) / cols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * cols, 3.4 * rows))
    colors = _colors(len(runs))
    for n, (key, label) in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        plotted = False
        for run, c in zip(runs, colors):
            x, y = _series(run.metrics, key)
            if x.size:
                ax.plot(x, y, color=c, lw=1.2, label=run.name)
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, f"{key} not logged", transform=ax.transAxes, ha="center", va="center")
            continue
        _mark_stages(ax, runs, colors, label=n < cols)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _plot_by_resolution(runs: Sequence[RunData], key: str, path: Path, ylabel: str, title: str,
                    scale: float = 1.0, stat: str = "median") -> Path | None:
    """Left: ``key`` vs step; right: its median/mean per crop resolution, grouped bars (one colour per run)."""
    if not any(_series(r.metrics, key)[0].size for r in runs):
        return None
    colors = _colors(len(runs))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    for run, c in zip(runs, colors):
        x, y = _series(run.metrics, key)
        ax.plot(x, y * scale, color=c, lw=1.0, label=run.name)
    _mark_stages(ax, runs, colors, label=True)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    bx = fig.add_subplot(1, 2, 2)
    sizes = _resolutions(runs)
    width = 0.8 / len(runs)
    for i, (run, c) in enumerate(zip(runs, colors)):
        pooled = _values_by_resolution(run, key)
        vals = [_stat(pooled[sz], stat) if sz in pooled else None for sz in sizes]
        xs = np.arange(len(sizes)) + (i - (len(runs) - 1) / 2) * width
        bars = bx.bar(xs, [scale * v if v is not None else 0.0 for v in vals], width=width, color=c, label=run.name)
        for bar, v in zip(bars, vals):
            if v is not None:
                bx.annotate(f"{scale * v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    bx.set_xticks(np.arange(len(sizes)), [f"global/local {sz}" for sz in sizes], fontsize=8)
    bx.set_ylabel(f"{stat} {ylabel}")
    bx.grid(alpha=0.3, axis="y")
    if len(runs) > 1:
        bx.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _plot_frequency(runs: Sequence[RunData], path: Path) -> Path | None:
    """Top-1 vs filter radius for every frequency result: low-pass solid, high-pass dashed."""
    curves = [(run.name + (f" ({e.label})" if e.label else ""), e.results)
              for run in runs for e in run.evals
              if e.protocol == "frequency" and isinstance(e.results.get("low_pass"), dict)]
    if not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for (name, res), c in zip(curves, _colors(len(curves))):
        for kind, style in (("low_pass", "o-"), ("high_pass", "s--")):
            pts = sorted((float(r), v) for r, val in res[kind].items() if (v := _num(val)) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=c, ms=4, label=f"{name} {kind.replace('_', '-')}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("filter radius (frequency units)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("frequency sensitivity (low-pass keeps |f| <= r, high-pass the rest)", fontsize=10)
    return _save(fig, path)


def _stat(values: np.ndarray, stat: str) -> float | None:
    if values.size == 0:
        return None
    return float(np.median(values) if stat == "median" else np.mean(values))


# ----------------------------------------------------------------------------------------------------------
# Summary tables
# ----------------------------------------------------------------------------------------------------------
def _describe_stages(config: dict[str, Any]) -> str | None:
    stages = _get(config, "curriculum", "stages")
    if not isinstance(stages, list) or not stages:
        return None
    epochs = _num(_get(config, "optim", "epochs"))
    parts = []
    for st in stages:
        if not isinstance(st, dict):
            continue
        length = _num(st.get("epochs"))
        if length is None and _num(st.get("fraction")) is not None and epochs is not None:
            length = float(st["fraction"]) * epochs
        noise = _get(st, "noise", "kind")
        noise_txt = f", noise {noise} {_get(st, 'noise', 'max_scale')}" if noise not in (None, "none") else ""
        ep = f"{length:g} ep " if length is not None else ""
        parts.append(f"{st.get('name', '?')}: {ep}@{st.get('global_size', '?')}/{st.get('local_size', '?')}"
                     f"{noise_txt}")
    return "; ".join(parts)


def _config_rows(runs: Sequence[RunData]) -> list[tuple[str, list[Any]]]:
    """What each run was configured to do (from its config.yaml)."""
    return [
        ("path", [str(r.path) for r in runs]),
        ("arch", [_get(r.config, "student", "arch") for r in runs]),
        ("patch size", [_get(r.config, "student", "patch_size") for r in runs]),
        ("epochs", [_get(r.config, "optim", "epochs") for r in runs]),
        ("batch size per GPU", [_get(r.config, "train", "batch_size_per_gpu") for r in runs]),
        ("curriculum", [_describe_stages(r.config) for r in runs]),
        ("stage switch", [_get(r.config, "curriculum", "switch_mode") for r in runs]),
    ]


def _training_rows(runs: Sequence[RunData]) -> list[tuple[str, list[Any]]]:
    """What each run logged (from its metrics.jsonl)."""

    def last(run: RunData, key: str) -> float | None:
        _, y = _series(run.metrics, key)
        return float(y[-1]) if y.size else None

    def overall(run: RunData, key: str, fn: Callable[[np.ndarray], Any]) -> float | None:
        _, y = _series(run.metrics, key)
        y = y[np.isfinite(y)]
        return float(fn(y)) if y.size else None

    return [
        ("logged records", [len(r.metrics) for r in runs]),
        ("last logged step", [r.metrics[-1]["step"] if r.metrics else None for r in runs]),
        ("last logged epoch", [last(r, "epoch") for r in runs]),
        ("final loss", [last(r, "loss") for r in runs]),
        ("median img/s (all steps)", [overall(r, "img_per_s", np.median) for r in runs]),
        ("mean data-wait share (%)", [_pct(overall(r, "data_wait_frac", np.mean)) for r in runs]),
    ]


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _stage_table(run: RunData) -> str:
    rows = []
    for s in run.stages:
        rows.append([s.name, f"{s.first_step}–{s.last_step}", s.sizes, len(s.records),
                     _stat(s.values("img_per_s"), "median"), _pct(_stat(s.values("data_wait_frac"), "mean")),
                     _stat(s.values("noise_max_scale"), "mean"), _stat(s.values("loss"), "mean")])
    header = ["stage", "logged steps", "global/local", "records", "median img/s", "data wait (%)",
              "noise max scale", "mean loss"]
    return _md_table(header, rows)


def _resolutions(runs: Sequence[RunData]) -> list[str]:
    """The crop sizes ("global/local") of every run's stages, in order of first appearance."""
    out: list[str] = []
    for run in runs:
        out += [s.sizes for s in run.stages if s.sizes not in out]
    return out


def _values_by_resolution(run: RunData, key: str) -> dict[str, np.ndarray]:
    """Finite logged values of ``key`` pooled over the stages that share one crop-size pair."""
    pooled: dict[str, np.ndarray] = {}
    for s in run.stages:
        pooled[s.sizes] = np.concatenate([pooled.get(s.sizes, np.zeros(0)), s.values(key)])
    return pooled


def _resolution_rows(runs: Sequence[RunData]) -> list[tuple[str, list[Any]]]:
    """Median img/s and mean data-wait share per crop resolution, one column per run."""
    pooled_speed = [_values_by_resolution(r, "img_per_s") for r in runs]
    pooled_wait = [_values_by_resolution(r, "data_wait_frac") for r in runs]
    rows: list[tuple[str, list[Any]]] = []
    for sz in _resolutions(runs):
        rows.append((f"{sz}: median img/s", [_stat(p[sz], "median") if sz in p else None for p in pooled_speed]))
        rows.append((f"{sz}: data wait (%)",
                     [_pct(_stat(p[sz], "mean")) if sz in p else None for p in pooled_wait]))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------
def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """``RUN_DIR/report`` for one run, ``./report`` for several."""
    return Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report")


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNG plots for the given runs into ``out_dir``; returns the markdown path."""
    if not run_dirs:
        raise ReportError("no run directory given")
    paths = [Path(p) for p in run_dirs]
    names = _run_names(paths)
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    out.mkdir(parents=True, exist_ok=True)

    plots: list[tuple[str, Path | None]] = [
        ("Losses", _plot_grid(runs, LOSS_KEYS, out / "losses.png", "training losses (dashed: stage switch)")),
        ("Schedules", _plot_grid(runs, SCHEDULE_KEYS, out / "schedules.png", "schedules")),
        ("Throughput", _plot_by_resolution(runs, "img_per_s", out / "throughput.png", "img/s",
                                       "training throughput")),
        ("Data-wait share", _plot_by_resolution(runs, "data_wait_frac", out / "data_wait.png", "% of step time",
                                            "time spent waiting for data", scale=100.0, stat="mean")),
    ]
    names = [r.name for r in runs]
    md: list[str] = [
        "# fastdinov2 training report",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by fastdinov2 {__version__} "
        f"for {len(runs)} run{'s' if len(runs) > 1 else ''}.",
    ]
    notes = [f"- `{run.name}`: {', '.join(run.notes)}" for run in runs if run.notes]
    md += [*notes, "", "## Runs", "", _md_table(["", *names], [[k, *v] for k, v in _config_rows(runs)]), "",
           _compare_table("", names, _training_rows(runs)), ""]

    md += ["## Curriculum stages", ""]
    if len(runs) > 1 and any(r.stages for r in runs):
        md += ["Per crop resolution (global/local), pooled over stages:", "",
               _compare_table("", names, _resolution_rows(runs)), ""]
    for run in runs:
        if run.stages:
            md += [f"**{run.name}**", "", _stage_table(run), ""]
        else:
            md += [f"**{run.name}**: no metrics logged.", ""]

    md += ["## Training curves", ""]
    drawn = [(title, p) for title, p in plots if p is not None]
    if drawn:
        md += [f"![{title}]({p.name})\n" for title, p in drawn]
    else:
        md += ["No metrics to plot.", ""]

    md += ["## Evaluations", ""]
    sections = _eval_sections(runs)
    md += sections if sections else ["No `eval/*.json` result files found.", ""]
    freq_plot = _plot_frequency(runs, out / "frequency.png")
    if freq_plot is not None:
        md += [f"![Frequency sensitivity]({freq_plot.name})", ""]

    report = out / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return report


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fastdinov2 report RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    p = subparsers.add_parser(
        "report",
        help="markdown report with plots for one or more runs",
        description="Write report.md and PNG plots (losses, schedules, throughput, data wait) plus tables of "
        "every eval/*.json result; several runs are compared side by side.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: RUN_DIR/report for one run, ./report for several)")
    p.set_defaults(func=_cmd_report)
    return p


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        path = build_report(args.run_dirs, args.out)
    except (ReportError, EvalError, MetricsFileError) as exc:
        print(f"fastdinov2: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
