"""``fastdinov2 eval ...`` end to end on a tiny class-folder dataset and a tiny exported backbone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdinov2.eval.commands import add_eval_commands, default_output, head_path_for, image_size_for, is_run_dir
from fastdinov2.interop import export_backbone
from fastdinov2.models.vit import build_vit

ENVELOPE = {"protocol", "checkpoint", "created", "fastdinov2_version", "config", "results"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdinov2")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for name, color in (("n001", (220, 40, 40)), ("n002", (40, 220, 40)), ("n003", (40, 40, 220))):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.array(color)[None, None, :] + rng.normal(0, 25, (40, 48, 3))
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{split}_{i}.jpg")
    return root


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)


def _read(path: Path, protocol: str) -> dict:
    obj = json.loads(path.read_text())
    assert set(obj) == ENVELOPE and obj["protocol"] == protocol
    return obj


def test_all_protocols_on_a_run_dir(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    run = tmp_path / "run"
    export_backbone(_tiny_vit(), run / "teacher_backbone")
    assert is_run_dir(run) and default_output(run, "knn") == run / "eval" / "knn.json"
    common = ["--checkpoint", str(run), "--data", str(data), "--image-size", "32", "--device", "cpu",
              "--no-progress"]

    assert _run("eval", "knn", *common, "--ks", "1", "3") == 0
    knn = _read(run / "eval" / "knn.json", "knn")
    assert knn["checkpoint"] == str(run) and knn["config"]["ks"] == [1, 3]
    assert set(knn["results"]["ks"]) == {"1", "3"} and knn["results"]["num_test"] == 6

    assert _run("eval", "linear", *common, "--epochs", "2", "--learning-rates", "0.01", "0.1") == 0
    lin = _read(run / "eval" / "linear.json", "linear")
    assert len(lin["results"]["heads"]) == 2 * 2 * 2
    head = head_path_for(run / "eval" / "linear.json")
    assert head == run / "eval" / "linear_head.safetensors" and head.is_file()
    assert lin["results"]["head_file"] == str(head) and head.with_suffix(".json").is_file()

    base = ["--checkpoint", str(run), "--data", str(data), "--device", "cpu", "--no-progress"]
    assert _run("eval", "corruption", *base, "--generate", "--corruptions", "fog", "brightness",
                "--severities", "1", "5", "--corruption-size", "0", "--max-per-class", "1") == 0
    cor = _read(run / "eval" / "corruption.json", "corruption")
    assert cor["results"]["types"] == ["fog", "brightness"] and cor["results"]["image_size"] == 32
    assert cor["results"]["head"]["file"] == str(head)
    assert (run / "eval" / "corruption.png").is_file() and (run / "eval" / "corruption.md").is_file()

    assert _run("eval", "frequency", *base, "--radii", "2", "8") == 0
    freq = _read(run / "eval" / "frequency.json", "frequency")
    assert set(freq["results"]["low_pass"]) == {"2", "8"}
    # bands grouped from the corruption result written above (the default for this run)
    assert freq["results"]["corruption_source"] == str(run / "eval" / "corruption.json")
    assert freq["results"]["bands"]["bands"]["low"]["types"] == ["fog", "brightness"]
    assert (run / "eval" / "frequency.png").is_file()


def test_file_checkpoint_writes_to_cwd_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    ckpt = export_backbone(_tiny_vit(), tmp_path / "exports" / "vit")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert not is_run_dir(ckpt) and default_output(ckpt, "knn") == Path("eval_knn.json")
    assert _run("eval", "knn", "--checkpoint", str(ckpt), "--data", str(data), "--image-size", "32",
                "--no-progress", "--ks", "2") == 0
    assert _read(work / "eval_knn.json", "knn")["results"]["ks"]["2"]["k_used"] == 2
    # no linear head yet: a one-line error naming where it was looked for, exit code 2
    assert _run("eval", "corruption", "--checkpoint", str(ckpt), "--data", str(data), "--generate",
                "--no-progress") == 2
    assert "no linear head at eval_linear_head.safetensors" in capsys.readouterr().err
    # a data root without val/
    (tmp_path / "noval" / "train" / "x").mkdir(parents=True)
    assert _run("eval", "knn", "--checkpoint", str(ckpt), "--data", str(tmp_path / "noval"), "--no-progress") == 2
    assert "has no val/ folder" in capsys.readouterr().err


def test_parser_requires_a_corruption_source_and_registers_retrieval() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "corruption", "--checkpoint", "x"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "corruption", "--checkpoint", "x", "--generate", "--corrupted-root", "y"])
    args = _parser().parse_args(["eval", "frequency", "--checkpoint", "x"])
    assert args.generate is False and args.corrupted_root is None and args.image_size is None
    args = _parser().parse_args(["eval", "knn", "--checkpoint", "x"])
    assert args.batch_size == 128 and args.device == "auto" and args.data is None
    assert image_size_for(args) == 64  # the embedded synthetic data is evaluated at 64 px
    assert image_size_for(_parser().parse_args(["eval", "knn", "--checkpoint", "x", "--data", "d"])) == 224
    args = _parser().parse_args(["eval", "linear", "--checkpoint", "x", "--data", "d", "--image-size", "96"])
    assert image_size_for(args) == 96
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    eval_sub = next(a for a in sub.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction))
    assert set(eval_sub.choices) == {"knn", "linear", "corruption", "frequency", "retrieval"}
