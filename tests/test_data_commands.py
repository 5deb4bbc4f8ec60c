"""``fastdinov2 data synth|verify|imagenet100``."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
from PIL import Image

from fastdinov2.data.commands import IMAGENET100_WNIDS, add_data_commands, build_imagenet100
from fastdinov2.data.datasets import DataError, discover_training_images, scan_class_folders
from fastdinov2.data.synthetic import class_names


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastdinov2")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ verify


def test_verify_lists_bad_files_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "a" / "ok1.png")
    _png(tmp_path / "b" / "ok2.png")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "text.jpg").write_text("plain text")
    assert _run(["data", "verify", str(tmp_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a' / 'empty.jpg'}: zero-byte file" in out
    assert re.search(re.escape(str(tmp_path / "b" / "text.jpg")) + r": not an image", out)
    assert "ok1.png" not in out
    assert "2 bad of 4 image files" in out


def test_verify_clean_tree_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "x.png")
    assert _run(["data", "verify", str(tmp_path)]) == 0
    assert "0 bad of 1 image files" in capsys.readouterr().out


def test_verify_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["data", "verify", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ synth


def test_synth_writes_everything_and_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    argv = ["data", "synth", "--out", str(out), "--classes", "2", "--train-per-class", "3",
            "--val-per-class", "2", "--size", "40", "--seed", "1", "--corrupted-per-class", "1",
            "--workers", "0"]
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "corrupted" in text and "gnd_synth5k.pkl" in text
    recs, classes = discover_training_images(out)
    assert classes == class_names(2) and len(recs) == 6
    assert len(scan_class_folders(out / "val")[0]) == 4
    kinds = sorted(p.name for p in (out / "corrupted").iterdir() if p.is_dir())
    assert len(kinds) == 19
    assert len(scan_class_folders(out / "corrupted" / "fog" / "5")[0]) == 2
    with open(out / "retrieval" / "synth5k" / "gnd_synth5k.pkl", "rb") as fh:
        gt = pickle.load(fh)
    jpg = out / "retrieval" / "synth5k" / "jpg"
    assert all((jpg / f"{n}.jpg").is_file() for n in gt["imlist"] + gt["qimlist"])
    # again: nothing regenerated
    assert _run(argv) == 0
    assert "reusing" in capsys.readouterr().out


def test_synth_without_extras_and_conflict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    base = ["data", "synth", "--out", str(out), "--classes", "2", "--train-per-class", "2",
            "--val-per-class", "1", "--size", "32", "--no-corrupted", "--no-retrieval", "--workers", "0"]
    assert _run(base) == 0
    assert not (out / "corrupted").exists() and not (out / "retrieval").exists()
    capsys.readouterr()
    bigger = base[:-6] + ["--size", "48", "--no-corrupted", "--no-retrieval", "--workers", "0"]
    assert _run(bigger) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "image_size: 32 != 48" in err
    assert "pass --overwrite" in err  # names the flag, which exists and replaces the dataset:
    assert _run(bigger + ["--overwrite"]) == 0
    with Image.open(next((out / "train").rglob("*.jpg"))) as img:
        assert img.size == (48, 48)
    assert _run(base + ["--classes", "0"]) == 2
    assert "num_classes=0" in capsys.readouterr().err


def test_synth_default_out_uses_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastdinov2.data.commands as cmds

    seen: list[Path] = []
    monkeypatch.setattr(cmds, "write_synthetic_dataset", lambda root, spec, **kw: seen.append(Path(root)))
    monkeypatch.setenv("FASTDINOV2_CACHE", str(tmp_path / "cache"))
    assert _run(["data", "synth", "--no-corrupted", "--no-retrieval"]) == 0
    assert seen == [tmp_path / "cache" / "synthetic-v2"]


# ------------------------------------------------------------------------------------------------ imagenet100


def test_imagenet100_class_list() -> None:
    assert len(IMAGENET100_WNIDS) == 100 and len(set(IMAGENET100_WNIDS)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in IMAGENET100_WNIDS)
    # md5 of HobbitLong/CMC imagenet100.txt (one wnid per line, file order), computed from that file
    text = "".join(f"{w}\n" for w in IMAGENET100_WNIDS)
    assert hashlib.md5(text.encode()).hexdigest() == "9974508e5d4cc0098b70e8b6a0fe6067"


def _fake_imagenet(root: Path, wnids: list[str], extra: tuple[str, ...] = ("n99999999",)) -> None:
    for split in ("train", "val"):
        for w in list(wnids) + list(extra):
            d = root / split / w
            d.mkdir(parents=True)
            (d / f"{w}_0.JPEG").write_bytes(b"x")  # contents are never read


def test_imagenet100_links_full_list(tmp_path: Path) -> None:
    src, out = tmp_path / "in1k", tmp_path / "in100"
    _fake_imagenet(src, list(IMAGENET100_WNIDS))
    assert _run(["data", "imagenet100", "--imagenet", str(src), "--out", str(out)]) == 0
    for split in ("train", "val"):
        names = sorted(os.listdir(out / split))
        assert names == sorted(IMAGENET100_WNIDS)
        for w in names:
            assert (out / split / w).is_symlink()
            assert (out / split / w).resolve() == (src / split / w).resolve()
    assert (out / "classes.txt").read_text().split() == list(IMAGENET100_WNIDS)
    recs, classes = discover_training_images(out)
    assert classes == sorted(IMAGENET100_WNIDS) and len(recs) == 100
    # idempotent
    assert build_imagenet100(src, out, log=lambda _: None) == {"created": 0, "existing": 200}


def test_imagenet100_copy(tmp_path: Path) -> None:
    wnids = ["n00000001", "n00000002", "n00000003"]
    src, out = tmp_path / "in1k", tmp_path / "copy"
    _fake_imagenet(src, wnids)
    counts = build_imagenet100(src, out, copy=True, wnids=wnids, log=lambda _: None)
    assert counts == {"created": 6, "existing": 0}
    for split in ("train", "val"):
        assert sorted(os.listdir(out / split)) == wnids  # no temporary folders left
        for w in wnids:
            assert not (out / split / w).is_symlink()
            assert (out / split / w / f"{w}_0.JPEG").read_bytes() == b"x"
    assert build_imagenet100(src, out, copy=True, wnids=wnids, log=lambda _: None)["existing"] == 6
    linked = tmp_path / "linked"
    build_imagenet100(src, linked, wnids=wnids, log=lambda _: None)
    with pytest.raises(DataError, match="symbolic link but --copy"):
        build_imagenet100(src, linked, copy=True, wnids=wnids, log=lambda _: None)


def test_imagenet100_out_inside_imagenet_or_uncreatable_is_refused(tmp_path: Path) -> None:
    wnids = ["n00000001"]
    src = tmp_path / "in1k"
    _fake_imagenet(src, wnids)
    for out in (src / "train" / "in100", src):  # ImageNet-1K's train/ would then hold the subset's val images
        with pytest.raises(DataError, match="is inside the ImageNet folder"):
            build_imagenet100(src, out, wnids=wnids, log=lambda _: None)
    assert sorted(os.listdir(src / "train")) == ["n00000001", "n99999999"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="cannot build ImageNet-100 at .*afile: .*Not a directory"):
        build_imagenet100(src, tmp_path / "afile", wnids=wnids, log=lambda _: None)


def test_imagenet100_missing_class_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wnids = list(IMAGENET100_WNIDS)
    src, out = tmp_path / "in1k", tmp_path / "in100"
    _fake_imagenet(src, wnids)
    gone = src / "val" / wnids[17]
    (gone / f"{wnids[17]}_0.JPEG").unlink()
    gone.rmdir()
    with pytest.raises(DataError) as exc:
        build_imagenet100(src, out, log=lambda _: None)
    assert str(gone) in str(exc.value) and "1 ImageNet class folder" in str(exc.value)
    assert not out.exists()  # nothing written before the check
    assert _run(["data", "imagenet100", "--imagenet", str(src), "--out", str(out)]) == 2
    assert wnids[17] in capsys.readouterr().err


def test_imagenet100_link_elsewhere_is_an_error(tmp_path: Path) -> None:
    wnids = ["n00000001"]
    src, out = tmp_path / "in1k", tmp_path / "in100"
    _fake_imagenet(src, wnids)
    (out / "train").mkdir(parents=True)
    (out / "train" / "n00000001").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DataError, match="links to"):
        build_imagenet100(src, out, wnids=wnids, log=lambda _: None)


def test_imagenet100_without_train_folder(tmp_path: Path) -> None:
    (tmp_path / "in1k").mkdir()
    with pytest.raises(DataError, match=r"no 'train' folder"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "out", log=lambda _: None)
    with pytest.raises(DataError, match="not found"):
        build_imagenet100(tmp_path / "missing", tmp_path / "out", log=lambda _: None)
