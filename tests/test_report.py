"""``fastdinov2 report`` on fabricated run directories."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from fastdinov2.config import load_config, to_yaml
from fastdinov2.eval.results import write_result
from fastdinov2.report import ReportError, _run_names, add_report_command, build_report, load_run

KNN = {"ks": {"10": {"top1": 41.5, "top5": 80.0}, "20": {"top1": 40.0, "top5": 81.25}}, "top1": 41.5,
       "top5": 81.25}
RETRIEVAL = {"dataset": "roxford5k", "num_db": 10, "num_queries": 2, "image_size": 224, "scales": [1.0],
             "easy": {"map": 30.0, "mp@1": 50.0, "mp@5": 40.0, "mp@10": 30.0, "num_queries": 2, "aps": [20.0, 40.0]},
             "medium": {"map": 20.0, "mp@1": 50.0, "mp@5": 30.0, "mp@10": 20.0, "num_queries": 2, "aps": [10, 30]},
             "hard": {"map": 5.0, "mp@1": 0.0, "mp@5": 10.0, "mp@10": 10.0, "num_queries": 1, "aps": [5.0, None]}}

CORRUPTION = {"types": ["gaussian_noise", "fog"], "severities": [1, 2],
              "accuracy": {"gaussian_noise": {"1": 50.0, "2": 30.0}, "fog": {"1": 70.0, "2": 60.0}},
              "type_mean": {"gaussian_noise": 40.0, "fog": 65.0}, "clean_top1": 80.0, "mean_common": None,
              "mean_all": None, "mean_present": 52.5, "mce": None}
FREQUENCY = {"image_size": 64, "radii": [2.0, 4.0], "clean_top1": 80.0, "low_pass": {"2": 10.0, "4": 30.0},
             "high_pass": {"2": 60.0, "4": 40.0},
             "bands": {"bands": {"high": {"types": ["gaussian_noise"], "mean": 40.0},
                                 "low": {"types": ["fog"], "mean": 65.0}}}}


def _record(step, stage, g, l_, img_per_s, wait):
    return {"step": step, "epoch": step / 10, "stage": stage, "global_size": g, "local_size": l_,
            "noise_max_scale": 0.5 * stage, "lr": 1e-3 * (1 + step), "wd": 0.04, "momentum": 0.992,
            "teacher_temp": 0.04 + step * 1e-4, "loss": 10.0 - step / 100, "dino_loss": 6.0, "ibot_loss": 3.0,
            "koleo_loss": -0.1, "img_per_s": img_per_s, "data_wait_frac": wait}


def _make_run(path, preset, stages, knn_scale=1.0):
    """``stages``: list of (n records, stage index, global, local, img/s values, data-wait share)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(load_config(preset)))
    lines, step = [], 0
    for n, idx, g, l_, speeds, wait in stages:
        for i in range(n):
            lines.append(json.dumps(_record(step, idx, g, l_, speeds[i], wait)))
            step += 10
    rec = json.loads(lines[1])
    del rec["ibot_loss"], rec["img_per_s"]  # tolerated: missing keys
    lines[1] = json.dumps(rec)
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99999, "loss"')  # crash mid-write
    knn = json.loads(json.dumps(KNN))
    knn["ks"]["10"]["top1"] *= knn_scale
    write_result(path / "eval" / "knn.json", "knn", str(path), {"ks": [10, 20]}, knn)
    write_result(path / "eval" / "retrieval_roxford5k.json", "retrieval", str(path), {}, RETRIEVAL)
    return path


def _table_row(md, label):
    m = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", md, flags=re.M)
    assert m, f"no row {label!r} in report"
    return [c.strip() for c in m.group(1).split("|")]


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 100


@pytest.fixture
def fast_run(tmp_path):
    # stage 0: 4 records (one lacks img/s) at 32/16; stage 1: 3 records at 64/32
    return _make_run(tmp_path / "fast", "fastdinov2_tiny",
                     [(4, 0, 32, 16, [100.0, 0.0, 300.0, 500.0], 0.2), (3, 1, 64, 32, [40.0, 60.0, 50.0], 0.1)])


def test_single_run_report(fast_run):
    write_result(fast_run / "eval" / "corruption.json", "corruption", None, {}, CORRUPTION)
    write_result(fast_run / "eval" / "frequency.json", "frequency", None, {}, FREQUENCY)
    report = build_report([fast_run])
    assert report == fast_run / "report" / "report.md"
    md = report.read_text()
    for png in ("losses.png", "schedules.png", "throughput.png", "data_wait.png"):
        _assert_png(fast_run / "report" / png)
        assert f"]({png})" in md
    # stages named from config.yaml; medians by hand: stage 0 {100, 300, 500} -> 300; stage 1 -> 50
    row0 = _table_row(md, "0: low_res")
    assert row0[:3] == ["0–30", "32/16", "4"] and row0[3] == "300.00" and row0[4] == "20.00"
    row1 = _table_row(md, "1: full_res_noise")
    assert row1[:4] == ["40–60", "64/32", "3", "50.00"] and row1[4] == "10.00"
    assert _table_row(md, "last logged step") == ["60"]  # the truncated last line is ignored
    assert _table_row(md, "logged records") == ["7"]
    # evaluations
    assert _table_row(md, "k=10 top-1") == ["41.50"]
    assert _table_row(md, "best top-5") == ["81.25"]
    assert "— roxford5k" in md
    assert _table_row(md, "Easy mAP") == ["30.00"] and _table_row(md, "Hard mP@5") == ["10.00"]
    assert _table_row(md, "mean, types evaluated") == ["52.50"]
    assert _table_row(md, "mean, 15 standard types") == ["–"]
    assert _table_row(md, "gaussian_noise (mean over severities)") == ["40.00"]
    assert _table_row(md, "high-pass r=2") == ["60.00"] and _table_row(md, "corruptions, low band (mean)") == ["65.00"]
    _assert_png(fast_run / "report" / "frequency.png")
    # protocols in a fixed order: kNN, linear, corruption, retrieval, frequency
    positions = [md.index(t) for t in ("### kNN", "### Corruption", "### Instance retrieval", "### Frequency")]
    assert positions == sorted(positions)


def test_two_runs_side_by_side_with_difference_and_ratio(fast_run, tmp_path):
    base = _make_run(tmp_path / "base", "dinov2_tiny", [(5, 0, 64, 32, [50.0, 50.0, 50.0, 60.0, 40.0], 0.3)],
                     knn_scale=0.5)
    out = tmp_path / "cmp"
    md = build_report([fast_run, base], out).read_text()
    assert "| metric | fast | base | fast − base | fast / base |" in md
    assert _table_row(md, "k=10 top-1") == ["41.50", "20.75", "20.75", "2.000x"]
    assert _table_row(md, "k=20 top-1") == ["40.00", "40.00", "0.00", "1.000x"]
    # throughput per crop resolution: only fast ran at 32/16; both ran at 64/32 (medians 50 and 50)
    assert _table_row(md, "32/16: median img/s") == ["300.00", "–", "–", "–"]
    assert _table_row(md, "64/32: median img/s") == ["50.00", "50.00", "0.00", "1.000x"]
    assert _table_row(md, "64/32: data wait (%)") == ["10.00", "30.00", "-20.00", "0.333x"]
    assert _table_row(md, "arch") == ["vit_custom", "vit_custom"]  # configuration: no difference columns
    for png in ("losses.png", "schedules.png", "throughput.png", "data_wait.png"):
        _assert_png(out / png)


def test_run_without_metrics_or_evals(tmp_path):
    run = tmp_path / "configured"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config("fastdinov2_tiny")))
    md = build_report([run], tmp_path / "out").read_text()
    assert "no metrics.jsonl" in md and "no config.yaml" not in md
    assert "No `eval/*.json` result files found." in md
    assert not list((tmp_path / "out").glob("*.png"))
    only_evals = tmp_path / "evals"  # evaluation results alone (e.g. of an official backbone) are a report
    write_result(only_evals / "eval" / "knn.json", "knn", None, {}, KNN)
    md = build_report([only_evals], tmp_path / "out2").read_text()
    assert "no config.yaml" in md and "no metrics.jsonl" in md and _table_row(md, "k=10 top-1") == ["41.50"]


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "eval").mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(b"")
    with pytest.raises(ReportError, match=r"photos is not a run directory: .*no config.yaml, no metrics.jsonl"):
        build_report([folder])
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(folder)])
    assert args.func(args) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (folder / "report").exists()


def test_run_names(fast_run, tmp_path):
    assert _run_names([Path("/a/run"), Path("/run")]) == ["a/run", "/run"]  # no "//run"
    assert _run_names([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    md = build_report([fast_run, fast_run], tmp_path / "same").read_text()  # the same run twice
    assert "| metric | fast (1) | fast (2) | fast (1) − fast (2) | fast (1) / fast (2) |" in md
    assert "//" not in md.split("## Runs")[1].split("\n")[2]


def test_unknown_protocol_falls_back_to_numeric_leaves(fast_run):
    write_result(fast_run / "eval" / "mystery.json", "mystery", None, {}, {"a": {"b": 1.5, "c": "x"}, "d": 2})
    md = build_report([fast_run], fast_run / "r").read_text()
    assert _table_row(md, "a.b") == ["1.50"] and _table_row(md, "d") == ["2"]


def test_errors_name_the_file(tmp_path, fast_run):
    with pytest.raises(ReportError, match="nope"):
        build_report([tmp_path / "nope"])
    (fast_run / "eval" / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_run(fast_run)


def test_report_command(fast_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(fast_run), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out


def test_end_of_training_knn_and_linear_results(fast_run):
    # the trainer writes {"trained": knn, "random_init": knn}; the linear probe {"best": {...}, "heads": [...]}
    write_result(fast_run / "eval" / "knn_end_of_training.json", "knn", None, {},
                 {"trained": KNN, "random_init": {**KNN, "top1": 5.0}})
    best = {"name": "blocks1_cls_lr0.01", "top1": 62.0, "top5": 90.0, "selection_top1": 61.0}
    write_result(fast_run / "eval" / "linear.json", "linear", None, {},
                 {"best": best, "heads": [best, best], "selection_split": "val"})
    # the saved best head (weights + metadata JSON beside them) is not a result and is skipped
    (fast_run / "eval" / "linear_head.json").write_text('{"classes": ["a", "b"], "lr": 0.1}')
    (fast_run / "eval" / "linear_head.safetensors").write_bytes(b"")
    md = build_report([fast_run], fast_run / "r").read_text()
    assert "— knn_end_of_training" in md
    assert _table_row(md, "random_init: best top-1") == ["5.00"]
    assert _table_row(md, "trained: k=20 top-5") == ["81.25"]
    assert _table_row(md, "best head") == ["blocks1_cls_lr0.01"]
    assert _table_row(md, "selection top-1 (val)") == ["61.00"]
