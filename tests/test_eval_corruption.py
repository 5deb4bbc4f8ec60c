"""Corruption robustness (fastdinov2.eval.corruption)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from imagecorruptions import get_corruption_names
from PIL import Image

from fastdinov2.eval.corruption import (
    CORRUPTIONS_ALL,
    CORRUPTIONS_COMMON,
    GeneratedCorruptionDataset,
    compute_mce,
    corrupt_array,
    corruption_markdown,
    discover_corrupted_root,
    evaluate_corruption,
    per_class_indices,
    plot_corruption_heatmap,
    summarize_accuracy,
)
from fastdinov2.eval.linear import LinearHead, apply_linear_head
from fastdinov2.eval.results import EvalError
from fastdinov2.models.vit import build_vit


def _tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vit("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32).eval()


def _class_folders(root: Path, n_per_class: int, classes: tuple[str, ...] = ("n01", "n02"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.array(colors[ci % len(colors)])[None, None, :] + rng.normal(0, 25, (36, 44, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"im{i}.png")
    return root


def _random_head(tmp_path: Path, classes: list[str], seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(torch.randn(len(classes), 64, generator=g), torch.zeros(len(classes)), 1, True, 32,
                      classes, 32, {})
    return head.save(tmp_path / "head" / "linear_head.safetensors")


def test_corruption_lists_match_imagecorruptions() -> None:
    assert list(CORRUPTIONS_ALL) == get_corruption_names("all")
    assert list(CORRUPTIONS_COMMON) == get_corruption_names("common")
    assert len(CORRUPTIONS_ALL) == 19 and len(CORRUPTIONS_COMMON) == 15


def _make_tree(root: Path, types: list[str], severities: list[int], seed_layout: bool, val_src: Path) -> Path:
    for c in types:
        for s in severities:
            dst = root / c / str(s) / ("val" if seed_layout else "")
            shutil.copytree(val_src, dst)
            if seed_layout:
                (root / c / str(s) / "labels.txt").write_text("n01,first class\nn02,second class\n")
    return root


def test_discovers_hendrycks_and_seed_layouts(tmp_path: Path) -> None:
    val = _class_folders(tmp_path / "val", 1)
    hend = _make_tree(tmp_path / "hend", ["fog", "gaussian_noise"], [1, 2, 3, 4, 5], False, val)
    found = discover_corrupted_root(hend)
    assert found.layout == "hendrycks"
    assert found.corruptions == ["gaussian_noise", "fog"]  # imagecorruptions' order
    assert len(found.sets) == 10 and found.sets[0].root == hend / "gaussian_noise" / "1"
    seed = _make_tree(tmp_path / "seed", ["snow"], [1, 2, 3, 4, 5], True, val)
    found = discover_corrupted_root(seed)
    assert found.layout == "seed" and found.sets[2].root == seed / "snow" / "3" / "val"
    assert found.labels == {"n01": "first class", "n02": "second class"}
    # an explicit subset of severities
    assert len(discover_corrupted_root(seed, severities=[2]).sets) == 1


def test_discovery_errors_name_the_path(tmp_path: Path) -> None:
    val = _class_folders(tmp_path / "val", 1)
    root = _make_tree(tmp_path / "c", ["fog"], [1, 2, 4, 5], False, val)
    with pytest.raises(EvalError, match=r"severity folder .*fog/3 is missing \(found severities: 1, 2, 4, 5\)"):
        discover_corrupted_root(root)
    root2 = _make_tree(tmp_path / "c2", ["fog"], [1, 2, 3, 4, 5], False, val)
    (root2 / "not_a_corruption").mkdir()
    with pytest.raises(EvalError, match="not_a_corruption"):
        discover_corrupted_root(root2)
    with pytest.raises(EvalError, match=r"c2/snow is missing"):
        discover_corrupted_root(root2, corruptions=["snow"])
    # mixed layouts
    root3 = _make_tree(tmp_path / "c3", ["fog"], [1, 2, 3, 4, 5], False, val)
    shutil.rmtree(root3 / "fog" / "5")
    _make_tree(root3 / "tmp", ["fog"], [5], True, val)
    shutil.move(root3 / "tmp" / "fog" / "5", root3 / "fog" / "5")
    shutil.rmtree(root3 / "tmp")
    with pytest.raises(EvalError, match=r"fog/5 uses the seed layout"):
        discover_corrupted_root(root3)
    # a class folder missing from labels.txt
    root4 = _make_tree(tmp_path / "c4", ["fog"], [1, 2, 3, 4, 5], True, val)
    (root4 / "fog" / "1" / "labels.txt").write_text("n01,first class\n")
    for s in range(2, 6):
        (root4 / "fog" / str(s) / "labels.txt").unlink()
    with pytest.raises(EvalError, match=r"\['n02'\] of .*fog/1/val are not listed in labels.txt"):
        discover_corrupted_root(root4)


def test_mce_by_hand() -> None:
    model = {"gaussian_noise": {"1": 80.0, "2": 60.0}, "fog": {"1": 50.0}, "snow": {"1": 10.0}}
    ref = {"gaussian_noise": {"1": 60.0, "2": 40.0}, "fog": {"1": 75.0, "3": 1.0}}
    res = compute_mce(model, ref)
    # gaussian: (20 + 40) / (40 + 60) = 60 %; fog (severity 1 only, shared): 50 / 25 = 200 %
    assert res["ce"] == pytest.approx({"gaussian_noise": 60.0, "fog": 200.0})
    assert res["mce"] == pytest.approx(130.0)
    assert res["types_skipped"] == ["snow"]
    with pytest.raises(EvalError, match="zero error"):
        compute_mce({"fog": {"1": 50.0}}, {"fog": {"1": 100.0}})
    with pytest.raises(EvalError, match="shares no corruption"):
        compute_mce({"fog": {"1": 50.0}}, {"snow": {"1": 50.0}})


def test_summary_means() -> None:
    acc = {c: {str(s): float(i) for s in range(1, 6)} for i, c in enumerate(CORRUPTIONS_ALL)}
    summ = summarize_accuracy(acc)
    assert summ["mean_common"] == pytest.approx(sum(range(15)) / 15)
    assert summ["mean_all"] == pytest.approx(sum(range(19)) / 19)
    partial = summarize_accuracy({"fog": {"1": 10.0, "2": 30.0}, "snow": {"1": 50.0}})
    assert partial["mean_common"] is None and partial["mean_all"] is None
    assert partial["mean_present"] == pytest.approx((20.0 + 50.0) / 2)
    assert "gaussian_noise" in partial["common_types_missing"]


def test_every_corruption_runs_on_small_images_deterministically() -> None:
    img = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    state = np.random.get_state()
    for c in CORRUPTIONS_ALL:
        a = corrupt_array(img, c, 3, seed=7)
        b = corrupt_array(img, c, 3, seed=7)
        assert a.shape == img.shape and a.dtype == np.uint8, c
        assert np.array_equal(a, b), c
    # the global NumPy generator is left as it was
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert not np.array_equal(corrupt_array(img, "gaussian_noise", 3, 1), corrupt_array(img, "gaussian_noise", 3, 2))
    with pytest.raises(EvalError, match="below the 32 px"):
        corrupt_array(img[:20], "fog", 1, 0)


def test_generated_dataset_upscales_then_resizes(tmp_path: Path) -> None:
    from fastdinov2.data.datasets import scan_class_folders

    val = _class_folders(tmp_path / "val", 1)
    records, classes = scan_class_folders(val)
    ds = GeneratedCorruptionDataset(records, classes, val, "gaussian_noise", 5, image_size=32, corruption_size=224)
    x, label = ds[0]
    assert x.shape == (3, 32, 32) and label == 0
    assert torch.equal(ds[0][0], x)  # deterministic per image
    clean = GeneratedCorruptionDataset(records, classes, val, None, 1, image_size=32, corruption_size=224)[0][0]
    assert not torch.equal(clean, x)
    with pytest.raises(EvalError, match="corruption size 16"):
        GeneratedCorruptionDataset(records, classes, val, "fog", 1, image_size=16, corruption_size=0)


def test_per_class_subsampling() -> None:
    from fastdinov2.data.datasets import ImageRecord

    recs = [ImageRecord(Path(f"{i}.png"), i % 3) for i in range(30)]
    keep = per_class_indices(recs, 4, seed=0)
    assert len(keep) == 12 and all(sum(recs[i].label == c for i in keep) == 4 for c in range(3))
    assert keep == per_class_indices(recs, 4, seed=0) and keep == sorted(keep)
    assert per_class_indices(recs, None, 0) == list(range(30))


def test_on_disk_copies_of_clean_val_give_clean_accuracy(tmp_path: Path) -> None:
    val = _class_folders(tmp_path / "val", 3, seed=3)
    root = _make_tree(tmp_path / "c", ["gaussian_noise", "fog"], [1, 2, 3, 4, 5], True, val)
    head_file = _random_head(tmp_path, ["n01", "n02"])
    model = _tiny_vit()
    clean = apply_linear_head(model, head_file, val, progress=False)
    res = evaluate_corruption(model, head_file, corrupted_root=root, clean_val_dir=val, batch_size=16,
                              progress=False)
    assert res["layout"] == "seed" and res["types"] == ["gaussian_noise", "fog"]
    assert res["clean_top1"] == pytest.approx(clean)
    for c in res["types"]:
        assert res["accuracy"][c] == pytest.approx({str(s): clean for s in range(1, 6)})
        assert res["num_images"][c]["1"] == 6
    assert res["mean_present"] == pytest.approx(clean) and res["mean_common"] is None
    # mCE against itself is 100 % (when the error is not zero)
    if clean < 100.0:
        res2 = evaluate_corruption(model, head_file, corrupted_root=root, corruptions=["fog"], severities=[1, 2],
                                   reference={"results": res}, progress=False)
        assert res2["mce"]["mce"] == pytest.approx(100.0)
    md = corruption_markdown(res)
    assert "| gaussian_noise |" in md and "mean over the 15 standard types: –" in md
    png = plot_corruption_heatmap(res, tmp_path / "out" / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generated_corruptions_end_to_end(tmp_path: Path) -> None:
    val = _class_folders(tmp_path / "val", 3, seed=4)
    head_file = _random_head(tmp_path, ["n01", "n02"])
    model = _tiny_vit()
    kw = dict(generate_from=val, corruptions=["brightness", "contrast"], severities=[1, 5], corruption_size=0,
              max_per_class=2, progress=False)
    res = evaluate_corruption(model, head_file, **kw)
    assert res["layout"] == "generated" and res["corruption_size"] == 32 and res["image_size"] == 32
    assert res["severities"] == [1, 5] and res["num_images"]["contrast"]["5"] == 4
    assert 0.0 <= res["accuracy"]["contrast"]["5"] <= 100.0 and res["clean_top1"] is not None
    assert evaluate_corruption(model, head_file, **kw)["accuracy"] == res["accuracy"]  # deterministic
    with pytest.raises(EvalError, match="exactly one"):
        evaluate_corruption(model, head_file, progress=False)
    with pytest.raises(EvalError, match="unknown corruption"):
        evaluate_corruption(model, head_file, generate_from=val, corruptions=["rain"], progress=False)
    # a negative corruption size was silently taken for 0 (corrupt at the eval size)
    with pytest.raises(EvalError, match="corruption size must be 0 .* got -5"):
        evaluate_corruption(model, head_file, generate_from=val, corruption_size=-5, progress=False)
