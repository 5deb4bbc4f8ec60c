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
    # the config records the size and device actually used (the head's 32 px; not null / "auto")
    assert cor["config"]["image_size"] == 32 and cor["config"]["device"] == "cpu"
    assert cor["results"]["head"]["same_checkpoint"] is True
    assert (run / "eval" / "corruption.png").is_file() and (run / "eval" / "corruption.md").is_file()

    assert _run("eval", "frequency", *base, "--radii", "2", "8") == 0
    freq = _read(run / "eval" / "frequency.json", "frequency")
    assert set(freq["results"]["low_pass"]) == {"2", "8"}
    # bands grouped from the corruption result written above (the default for this run)
    assert freq["results"]["corruption_source"] == str(run / "eval" / "corruption.json")
    assert freq["results"]["bands"]["bands"]["low"]["types"] == ["fog", "brightness"]
    assert (run / "eval" / "frequency.png").is_file()
    assert freq["config"]["image_size"] == 32 and freq["config"]["device"] == "cpu"
    assert freq["config"]["checkpoint_resolved"] == str(run.resolve())
    assert freq["config"]["checkpoint_file"] == str((run / "teacher_backbone.safetensors").resolve())

    # --device auto records the device it chose
    assert _run("eval", "knn", *common[:-3], "--device", "auto", "--no-progress", "--ks", "1") == 0
    assert _read(run / "eval" / "knn.json", "knn")["config"]["device"] in ("cpu", "cuda")


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


# ------------------------------------------------------------------------------------ audit regressions
def _tiny_vit14() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_vit("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=14, img_size=28)


def test_image_size_defaults_to_a_patch_multiple_and_explicit_sizes_are_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fastdinov2.eval import commands
    from fastdinov2.interop import to_official_state_dict

    args = _parser().parse_args(["eval", "knn", "--checkpoint", "x"])
    assert image_size_for(args, 14) == 70 and image_size_for(args, 16) == 64 and image_size_for(args, 8) == 64
    args = _parser().parse_args(["eval", "knn", "--checkpoint", "x", "--data", "d"])
    assert image_size_for(args, 14) == 224 and image_size_for(args, 16) == 224

    # an official DINOv2-layout state dict with patch 14, on "the embedded data" (no --data): 64 px -> 70 px
    data = _dataset(tmp_path / "data")
    ckpt = tmp_path / "dinov2_tiny14.pth"
    torch.save(to_official_state_dict(_tiny_vit14()), ckpt)
    monkeypatch.setattr(commands, "data_root", lambda d: data if d is None else Path(d))
    out = tmp_path / "knn.json"
    base = ["--checkpoint", str(ckpt), "--device", "cpu", "--no-progress", "--output", str(out)]
    assert _run("eval", "knn", *base, "--ks", "1") == 0
    knn = _read(out, "knn")
    assert knn["results"]["image_size"] == 70 and knn["config"]["image_size"] == 70

    out.unlink()
    assert _run("eval", "knn", *base, "--ks", "1", "--image-size", "64") == 2
    err = capsys.readouterr().err
    assert "--image-size 64 is not a multiple of the patch size 14" in err and "use 56 or 70" in err
    assert not out.exists()

    # corruption / frequency: an explicit --image-size is checked too (the head itself was trained at 70)
    assert _run("eval", "linear", *base[:-2], "--output", str(tmp_path / "lin.json"), "--epochs", "1",
                "--learning-rates", "0.1", "--n-last-blocks", "1") == 0
    head = tmp_path / "lin_head.safetensors"
    assert json.loads(head.with_suffix(".json").read_text())["image_size"] == 70
    assert _run("eval", "frequency", *base[:-2], "--head", str(head), "--radii", "4", "--image-size", "60",
                "--output", str(tmp_path / "f.json")) == 2
    assert "--image-size 60 is not a multiple of the patch size 14" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["knn", "--ks", "0"], "--ks"),
    (["knn", "--ks", "10", "-3"], "--ks"),
    (["knn", "--temperature", "0"], "--temperature"),
    (["knn", "--temperature", "nan"], "--temperature"),
    (["knn", "--batch-size", "0"], "--batch-size"),
    (["knn", "--image-size", "0"], "--image-size"),
    (["knn", "--num-workers", "-1"], "--num-workers"),
    (["knn", "--batch-size", "two"], "--batch-size"),
    (["linear", "--n-last-blocks", "0"], "--n-last-blocks"),
    (["linear", "--head-batch-size", "0"], "--head-batch-size"),
    (["linear", "--epochs", "0"], "--epochs"),
    (["linear", "--iterations", "0"], "--iterations"),
    (["linear", "--learning-rates", "0.1", "-1"], "--learning-rates"),
    (["linear", "--val-fraction", "1"], "--val-fraction"),
    (["linear", "--seed", "-1"], "--seed"),
    (["corruption", "--generate", "--corruption-size", "-5"], "--corruption-size"),
    (["corruption", "--generate", "--corruption-size", "16"], "--corruption-size"),
    (["corruption", "--generate", "--severities", "6"], "--severities"),
    (["corruption", "--generate", "--max-per-class", "0"], "--max-per-class"),
    (["frequency", "--radii", "0"], "--radii"),
    (["frequency", "--seed", "-3"], "--seed"),
    (["frequency", "--image-size", "-64"], "--image-size"),
    (["retrieval", "--data", "d", "--dataset", "x", "--batch-size", "0"], "--batch-size"),
    (["retrieval", "--data", "d", "--dataset", "x", "--num-workers", "-2"], "--num-workers"),
])
def test_bad_numeric_options_are_refused_while_parsing(argv: list[str], option: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["eval", argv[0], "--checkpoint", "x", *argv[1:]])
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_good_boundary_values_parse() -> None:
    args = _parser().parse_args(["eval", "corruption", "--checkpoint", "x", "--generate", "--corruption-size", "0",
                                 "--seed", "0", "--num-workers", "0", "--severities", "1", "5"])
    assert args.corruption_size == 0 and args.severities == [1, 5]
    args = _parser().parse_args(["eval", "corruption", "--checkpoint", "x", "--generate", "--corruption-size", "32"])
    assert args.corruption_size == 32
    args = _parser().parse_args(["eval", "linear", "--checkpoint", "x", "--val-fraction", "0.5",
                                 "--learning-rates", "1e-3"])
    assert args.val_fraction == 0.5 and args.learning_rates == [1e-3]
    from fastdinov2.eval.corruption import MIN_CORRUPTION_SIZE
    from fastdinov2.eval.options import MIN_CORRUPTION_SIZE as OPTION_MIN

    assert OPTION_MIN == MIN_CORRUPTION_SIZE


def test_default_head_or_corruption_result_of_another_checkpoint_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    ckpt_a = export_backbone(_tiny_vit(), tmp_path / "exports" / "a")
    torch.manual_seed(5)
    ckpt_b = export_backbone(build_vit("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32),
                             tmp_path / "exports" / "b")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    common = ["--data", str(data), "--device", "cpu", "--no-progress"]
    assert _run("eval", "linear", "--checkpoint", str(ckpt_a), *common, "--image-size", "32", "--epochs", "1",
                "--learning-rates", "0.1", "--n-last-blocks", "1") == 0
    head = work / "eval_linear_head.safetensors"
    info = json.loads(head.with_suffix(".json").read_text())
    assert info["checkpoint"] == str(ckpt_a) and info["checkpoint_file"] == str(ckpt_a.resolve())
    gen = ["--generate", "--corruptions", "fog", "--severities", "1", "--corruption-size", "0",
           "--max-per-class", "1"]
    capsys.readouterr()

    # B with A's default head: refused before any work, naming both checkpoints, the head and the way out
    assert _run("eval", "corruption", "--checkpoint", str(ckpt_b), *common, *gen) == 2
    err = capsys.readouterr().err
    assert "eval_linear_head.safetensors" in err and str(ckpt_a) in err and str(ckpt_b) in err
    assert f"fastdinov2 eval linear --checkpoint {ckpt_b}" in err and "--head" in err
    assert not (work / "eval_corruption.json").exists()
    # the same checkpoint under another name (the export's .json) is the same backbone
    assert _run("eval", "corruption", "--checkpoint", str(ckpt_a.with_suffix(".json")), *common, *gen) == 0
    cor = _read(work / "eval_corruption.json", "corruption")
    assert cor["results"]["head"]["same_checkpoint"] is True and cor["results"]["warnings"] == []
    assert cor["config"]["checkpoint_file"] == str(ckpt_a.resolve())

    # frequency for B: A's corruption result is not picked up silently either
    capsys.readouterr()
    freq_out = ["--output", str(work / "freq_b.json"), "--radii", "4"]
    assert _run("eval", "frequency", "--checkpoint", str(ckpt_b), *common, "--head", str(head), *freq_out) == 2
    err = capsys.readouterr().err
    assert "corruption result eval_corruption.json was computed on" in err and str(ckpt_a) in err
    assert "--corruption-result" in err and not (work / "freq_b.json").exists()

    # explicitly given: used, with warnings on stderr and in the result
    assert _run("eval", "frequency", "--checkpoint", str(ckpt_b), *common, "--head", str(head), *freq_out,
                "--corruption-result", "eval_corruption.json") == 0
    err = capsys.readouterr().err
    assert err.count("fastdinov2: warning:") == 2
    freq = _read(work / "freq_b.json", "frequency")
    assert freq["results"]["head"] == {**freq["results"]["head"], "checkpoint": str(ckpt_a), "same_checkpoint": False}
    assert len(freq["results"]["warnings"]) == 2 and "--head names it" in freq["results"]["warnings"][1]
    assert freq["results"]["corruption_source"] == "eval_corruption.json"
    # --corruption-result with --generate is a contradiction
    assert _run("eval", "frequency", "--checkpoint", str(ckpt_a), *common, "--generate",
                "--corruption-result", "eval_corruption.json") == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_run_dir_that_trained_on_no_longer_matches_its_head(tmp_path: Path) -> None:
    from fastdinov2.eval.commands import provenance
    from fastdinov2.eval.features import checkpoint_identity

    run = tmp_path / "run"
    for step in (100, 200):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"w")
    (run / "checkpoints" / "step_00000100" / "COMMITTED").write_text(json.dumps({"sample_position": 10}))
    old = checkpoint_identity(run)
    assert old["checkpoint_file"] == str((run / "checkpoints" / "step_00000100" / "model.pt").resolve())
    assert provenance({"checkpoint": str(run), **old}, run) == (True, f"checkpoint {run}")
    (run / "checkpoints" / "step_00000200" / "COMMITTED").write_text(json.dumps({"sample_position": 20}))
    same, desc = provenance({"checkpoint": str(run), **old}, run)
    assert same is False and "step_00000100" in desc and "step_00000200" in desc
    assert provenance({"checkpoint": None}, run)[0] is None
    # legacy heads without the resolved paths: the recorded path, resolved
    assert provenance({"checkpoint": str(run)}, run)[0] is True
    assert provenance({"checkpoint": str(tmp_path / "other")}, run)[0] is False


def test_feature_cache_hits_for_a_run_dir(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    run = tmp_path / "run"
    export_backbone(_tiny_vit(), run / "teacher_backbone")
    cache = tmp_path / "cache"
    argv = ["eval", "knn", "--checkpoint", str(run), "--data", str(data), "--image-size", "32", "--device", "cpu",
            "--no-progress", "--ks", "1", "--cache-dir", str(cache)]
    assert _run(*argv) == 0
    files = sorted(cache.iterdir())
    assert len(files) == 2 and (run / "eval" / "knn.json").is_file()
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # the eval output written into the run dir does not change the key: the second call reuses both files
    assert _run(*argv, "--output", str(tmp_path / "new" / "sub" / "knn.json")) == 0  # missing parents are made
    assert sorted(cache.iterdir()) == files and {f: f.stat().st_mtime_ns for f in files} == stamps
    assert (tmp_path / "new" / "sub" / "knn.json").is_file()


def test_output_paths_are_checked_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "res.png").mkdir()
    # the checkpoint does not exist: each refusal below comes before the model would be loaded
    base = ["--checkpoint", str(tmp_path / "nothere"), "--data", str(data), "--no-progress"]
    cases = [
        (["knn", "--output", str(tmp_path / "adir")], "--output {}/adir is a directory"),
        (["knn", "--output", str(tmp_path / "k.txt")], "--output {}/k.txt must end in .json"),
        (["knn", "--output", str(tmp_path / "afile" / "k.json")], "{}/afile is not a directory"),
        (["knn", "--cache-dir", str(tmp_path / "afile")], "--cache-dir {}/afile exists and is not a directory"),
        (["linear", "--head-output", str(tmp_path / "heads" / "myhead")], "must end in .safetensors"),
        (["linear", "--head-output", str(tmp_path / "adir")], "--head-output {}/adir is a directory"),
        (["linear", "--output", str(tmp_path / "x.json"), "--head-output", str(tmp_path / "x.safetensors")],
         "the result file (--output)"),
        (["corruption", "--generate", "--head", "h.safetensors", "--output", str(tmp_path / "res.json")],
         "{}/res.png, written beside --output"),
        (["frequency", "--output", str(tmp_path / "adir")], "is a directory"),
        (["retrieval", "--dataset", "x", "--output", str(tmp_path / "adir")], "is a directory"),
    ]
    for argv, message in cases:
        assert _run("eval", argv[0], *base, *argv[1:]) == 2, argv
        err = capsys.readouterr().err
        assert message.format(tmp_path) in err and "does not exist" not in err, (argv, err)
    assert not (tmp_path / "heads").exists()


def test_eval_refuses_to_run_under_torchrun(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    for var, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    for protocol, extra in (("knn", []), ("linear", []), ("corruption", ["--generate"]), ("frequency", []),
                            ("retrieval", ["--data", "d", "--dataset", "x"])):
        assert _run("eval", protocol, "--checkpoint", "nothere", *extra) == 2
        err = capsys.readouterr().err
        assert f"`fastdinov2 eval {protocol}` runs in one process" in err and "WORLD_SIZE=2" in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single-process torchrun is fine: on to the next check
    assert _run("eval", "knn", "--checkpoint", "nothere", "--data", "nodata") == 2
    assert "runs in one process" not in capsys.readouterr().err
