"""``fastdinov2 experiment compare``: statistics over seeds, the generated reading, the fairness check, and a
minuscule comparison (2 seeds, a 2-block ViT on 16 generated images) that is stopped half way, resumed, and
partly deleted and rerun."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from fastdinov2.cli import build_parser, main
from fastdinov2.config import ConfigError, load_config
from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
from fastdinov2.experiment import (
    METHODS,
    EvalSettings,
    ExperimentError,
    MetricComparison,
    ReadingContext,
    Runtime,
    Stats,
    compare_metric,
    compose_reading,
    resolve_configs,
    run_comparison,
    run_dir,
    summarize,
)

# A 2-block ViT on 32 px crops; 16 images, batch 8, 2 epochs = 4 steps. FastDINOv2: 2 steps at 16/8, then 2 at
# 32/16 with noise patching. A fast-moving teacher (momentum 0.5) so that 4 steps change the evaluated weights.
BASE_YAML = """\
base: dinov2_tiny
student: {arch: vit_custom, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}
dino: {head_n_prototypes: 32, head_hidden_dim: 32, head_bottleneck_dim: 16}
ibot: {head_n_prototypes: 32, head_hidden_dim: 32, head_bottleneck_dim: 16}
teacher: {momentum_teacher: 0.5, final_momentum_teacher: 0.5, warmup_teacher_temp_epochs: 1}
optim: {epochs: 2, warmup_epochs: 0.5, freeze_last_layer_epochs: 0}
crops: {global_crops_size: 32, local_crops_size: 16, local_crops_number: 2}
curriculum:
  stages:
    - {name: full, fraction: 1.0, global_size: 32, local_size: 16}
data: {num_workers: 0}
train: {batch_size_per_gpu: 8, log_every: 1, checkpoint_every: 1000}
"""
FAST_YAML = """\
base: {base}
curriculum:
  stages:
    - {{name: low_res, fraction: 0.5, global_size: 16, local_size: 8}}
    - {{name: full_res_noise, fraction: 0.5, global_size: 32, local_size: 16,
       noise: {{kind: gaussian, p: 1.0, max_scale: 0.5}}}}
"""
# imagecorruptions' spatter divides by zero on 32 px images (a third-party edge case at this tiny size)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
EVAL = EvalSettings(knn_ks=(2,), linear_epochs=2, corruption_per_class=1, corruption_size=0, radii=(4.0, 8.0))
PROTOCOLS = ("knn", "linear", "corruption", "frequency")


# --------------------------------------------------------------------------------------------- statistics
def test_summarize_known_numbers() -> None:
    s = summarize([1.0, 2.0, None, 3.0, 4.0, float("nan")])
    assert s.n == 4 and s.values == (1.0, 2.0, 3.0, 4.0)
    assert s.mean == pytest.approx(2.5)
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # sample std: sum of squares 5 over n - 1 = 3
    assert (s.min, s.max) == (1.0, 4.0)
    one = summarize([7.0])
    assert (one.n, one.mean, one.std, one.min, one.max) == (1, 7.0, None, 7.0, 7.0)
    assert summarize([None]) == Stats(0, None, None, None, None)


def test_compare_metric_pairs_by_seed() -> None:
    c = compare_metric("x", "x", {0: 50.0, 1: 60.0, 2: 70.0}, {0: 55.0, 1: 57.0, 3: 99.0})
    assert c.base.mean == pytest.approx(60.0) and c.base.std == pytest.approx(10.0)
    assert c.fast.n == 3 and c.fast.mean == pytest.approx((55 + 57 + 99) / 3)
    # seeds 0 and 1 only: differences +5 and -3, ratios 1.1 and 0.95
    assert c.diff.values == (5.0, -3.0)
    assert c.diff.mean == pytest.approx(1.0) and c.diff.std == pytest.approx(math.sqrt(32))
    assert c.ratio.mean == pytest.approx((1.1 + 0.95) / 2) and (c.ratio.min, c.ratio.max) == pytest.approx((0.95, 1.1))


# ------------------------------------------------------------------------------------------------ reading
def _mc(key: str, base: list[float], fast: list[float]) -> MetricComparison:
    return compare_metric(key, key, dict(enumerate(base)), dict(enumerate(fast)))


def _comparisons(**overrides: tuple[list[float], list[float]]) -> dict[str, MetricComparison]:
    keys = ("train_seconds", "knn_top1", "linear_top1", "corruption_mean_15", "corruption_mean_19", "noise_mean")
    values = {k: ([50.0, 52.0], [50.5, 52.5]) for k in keys}
    values["train_seconds"] = ([100.0, 110.0], [50.0, 55.0])
    values.update(overrides)
    return {k: _mc(k, *v) for k, v in values.items()}


def test_reading_when_everything_holds() -> None:
    text = "\n".join(compose_reading(_comparisons(), ReadingContext(seeds=2, flop_speedup=2.4, epochs=12)))
    assert "Training FLOPs: FastDINOv2 needs 2.40x fewer" in text
    assert "FastDINOv2 was 2.00x faster" in text
    assert "Where they do not" not in text and "Possible reasons" not in text
    assert "within about 1 point: holds" in text and "at or above the baseline: holds" in text


def test_reading_states_failures_and_picks_reasons() -> None:
    comp = _comparisons(
        linear_top1=([80.0, 81.0], [77.0, 78.5]),  # -2.75 points: clean accuracy claim fails
        noise_mean=([30.0, 30.0], [31.0, 28.0]),  # -0.5, sign changes across seeds
        train_seconds=([100.0, 100.0], [90.0, 95.0]),  # 1.08x faster, far below the FLOP ratio
    )
    ctx = ReadingContext(seeds=2, flop_speedup=1.6, stage_flop_speedup=3.5, stage_speedup=1.2, epochs=12,
                         last_stage_epochs=3, first_stage="32/16 px for 9 of 12 epochs", corruption_images=100,
                         noise="3 of 12 epochs (Gaussian noise patching (max scale 0.5))")
    text = "\n".join(compose_reading(comp, ctx))
    agree, rest = text.split("**Where they do not**")
    disagree, reasons = rest.split("**Possible reasons**")
    assert "Training FLOPs" in disagree and "less than the claimed 2x" in disagree
    assert "Clean linear-probe top-1: FastDINOv2 77.75 vs DINOv2 80.50, a difference of -2.75 points" in disagree
    assert "does not hold" in disagree and "Noise corruptions" in disagree
    assert "do not resolve it" in disagree  # the noise difference changes sign
    assert "Clean kNN top-1" in agree and "Mean corruption accuracy over the 15" in agree
    assert "well below the FLOP ratio (1.60x)" in disagree
    for reason in ("FLOPs (scale, schedule)", "Wall-clock (scale, machine)", "1.20x the images per second",
                   "Clean accuracy (schedule, scale): Here the full-resolution stage lasts 3 of 12 epochs",
                   "Robustness (data, schedule)", "Seeds: some differences change sign"):
        assert reason in reasons, reason
    assert "from 100 images" in reasons  # the sampling error of one corruption set


def test_reading_without_results_says_so() -> None:
    empty = {k: MetricComparison(k, k, *(Stats(0, None, None, None, None),) * 4) for k in _comparisons()}
    text = "\n".join(compose_reading(empty, ReadingContext(seeds=1)))
    assert "**Not measured yet**" in text and "Where they do not" not in text


# ------------------------------------------------------------------------------------------------ configs
def test_shipped_presets_form_a_fair_comparison() -> None:
    cfgs = resolve_configs("tiny", seed=3)
    assert cfgs["dinov2"].train.seed == cfgs["fastdinov2"].train.seed == 3
    assert cfgs["dinov2"].optim.epochs == cfgs["fastdinov2"].optim.epochs
    assert len(cfgs["fastdinov2"].curriculum.stages) > len(cfgs["dinov2"].curriculum.stages)


def test_configs_differing_outside_the_curriculum_are_refused(configs: tuple[Path, Path]) -> None:
    base, _ = configs
    wider = base.with_name("wider.yaml")
    wider.write_text(f"base: {base}\nstudent: {{embed_dim: 64}}\n")
    with pytest.raises(ConfigError, match=r"student\.embed_dim"):
        resolve_configs("tiny", baseline_config=str(base), fast_config=str(wider))


# ------------------------------------------------------------------------------------ end to end, resume
@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=4, val_per_class=2, image_size=40))
    return root


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("configs")
    (d / "base.yaml").write_text(BASE_YAML)
    (d / "fast.yaml").write_text(FAST_YAML.format(base=d / "base.yaml"))
    return d / "base.yaml", d / "fast.yaml"


def _compare(data_root: Path, configs: tuple[Path, Path], out: Path, *overrides: str,
             settings: EvalSettings = EVAL) -> Path:
    return run_comparison("tiny", 2, data_root, out, list(overrides), baseline_config=str(configs[0]),
                          fast_config=str(configs[1]), eval_settings=settings, runtime=Runtime(progress=False))


def _eval_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/eval/*.json"))}


@pytest.fixture(scope="module")
def experiment(data_root: Path, configs: tuple[Path, Path],
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The comparison stopped half way (train.max_steps=2 of 4), then the same call again; returns the folder and
    what the first call left behind."""
    out = tmp_path_factory.mktemp("compare")
    report = _compare(data_root, configs, out, "train.max_steps=2")
    first = {"report": report.read_text(), "eval_files": _eval_files(out),
             "timing": json.loads((run_dir(out, "fastdinov2", 1) / "experiment_timing.json").read_text())}
    _compare(data_root, configs, out)
    return out, first


def test_half_way_comparison_reports_what_is_missing(experiment: tuple[Path, dict[str, Any]]) -> None:
    _, first = experiment
    assert first["eval_files"] == {}  # unfinished runs are not evaluated
    assert first["report"].count("step 2 of 4") == 4
    assert "**Not measured yet**" in first["report"]
    seg = first["timing"]["segments"]
    assert len(seg) == 1 and seg[0]["start_step"] == 0 and seg[0]["end_step"] == 2 and not seg[0]["finished"]


def test_resumed_comparison_is_complete(experiment: tuple[Path, dict[str, Any]]) -> None:
    out, _ = experiment
    for s in (0, 1):
        for m in METHODS:
            run = run_dir(out, m, s)
            assert {p.stem for p in (run / "eval").glob("*.json")} >= set(PROTOCOLS)
            segs = json.loads((run / "experiment_timing.json").read_text())["segments"]
            assert [(g["start_step"], g["end_step"]) for g in segs] == [(0, 2), (2, 4)]  # resumed, not restarted
            steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert steps == [0, 1, 2, 3]
            assert load_config(str(run / "config.yaml")).train.seed == s
    report = (out / "report.md").read_text()
    assert report.count("resumed (2 segments)") == 4
    assert "complete (both methods trained and evaluated): 0, 1." in report


def test_report_has_every_section_and_the_right_numbers(experiment: tuple[Path, dict[str, Any]]) -> None:
    out, _ = experiment
    report = (out / "report.md").read_text()
    for heading in ("## Reading", "## Headline numbers", "## Cost", "## Accuracy per seed", "## Corruptions per type",
                    "## Frequency sensitivity", "## Setup"):
        assert heading in report, heading
    for png in ("headline.png", "cost.png", "corruptions.png", "frequency.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    assert "Intel" in report or "cores" in report  # the machine
    assert "run_comparison(preset='tiny', seeds=[0, 1]" in report  # the call that produced it
    # the headline row of the linear probe, recomputed here from the result files
    for m, col in (("dinov2", 1), ("fastdinov2", 2)):
        vals = [json.loads((run_dir(out, m, s) / "eval" / "linear.json").read_text())["results"]["best"]["top1"]
                for s in (0, 1)]
        expected = (f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} "
                    f"[{min(vals):.2f}, {max(vals):.2f}]")
        row = next(line for line in report.splitlines() if line.startswith("| clean linear top-1 (%) |"))
        assert row.split(" | ")[col] == expected
    flops = json.loads((out / "flops.json").read_text())
    assert flops["speedup"] == pytest.approx(flops["dinov2"]["total_gflops_per_dataset_image"]
                                             / flops["fastdinov2"]["total_gflops_per_dataset_image"])
    assert f"FLOPs {flops['speedup']:.2f}x" in report


def test_rerun_redoes_only_what_is_missing(experiment: tuple[Path, dict[str, Any]], data_root: Path,
                                           configs: tuple[Path, Path]) -> None:
    out, _ = experiment
    missing = run_dir(out, "fastdinov2", 1) / "eval" / "frequency.json"
    missing.unlink()
    before = _eval_files(out)
    timing = {m: (run_dir(out, m, 1) / "experiment_timing.json").read_text() for m in METHODS}
    _compare(data_root, configs, out)
    after = _eval_files(out)
    assert missing.is_file()
    assert {k: v for k, v in after.items() if k != str(missing.relative_to(out))} == before
    assert timing == {m: (run_dir(out, m, 1) / "experiment_timing.json").read_text() for m in METHODS}


def test_rerun_with_other_settings_is_refused(experiment: tuple[Path, dict[str, Any]], data_root: Path,
                                              configs: tuple[Path, Path]) -> None:
    out, _ = experiment
    saved = (out / "experiment.json").read_text()
    with pytest.raises(ExperimentError, match="corruption_per_class: 1 -> 2"):
        _compare(data_root, configs, out, settings=dataclasses.replace(EVAL, corruption_per_class=2))
    with pytest.raises(ConfigError, match=r"optim\.base_lr"):
        _compare(data_root, configs, out, "optim.base_lr=0.001")
    assert (out / "experiment.json").read_text() == saved


def test_cli(experiment: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["experiment", "compare", "--seeds", "2", "--corruption-per-class", "all",
                                      "--out", "x", "optim.epochs=4"])
    assert (args.seeds, args.corruption_per_class, args.overrides, args.preset) == (2, None, ["optim.epochs=4"], "tiny")
    out, _ = experiment
    assert main(["experiment", "compare", "--report-only", "--out", str(out)]) == 0
    invocations = json.loads((out / "experiment.json").read_text())["invocations"]
    assert invocations[-1]["report_only"] and invocations[-1]["command"].startswith("fastdinov2 experiment compare")
    assert main(["experiment", "compare", "--report-only", "--out", str(tmp_path / "nothing")]) == 2
    assert "nothing to report" in capsys.readouterr().err
