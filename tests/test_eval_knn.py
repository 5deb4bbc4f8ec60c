"""kNN protocol and the shared feature extraction (fastdinov2.eval.knn, fastdinov2.eval.features)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdinov2.eval.features import (
    extract_features,
    feature_cache_key,
    open_class_folder,
    select_linear_input,
)
from fastdinov2.eval.knn import evaluate_knn, knn_classify
from fastdinov2.eval.results import EvalError
from fastdinov2.eval.transforms import make_eval_geometry, make_eval_transform, resize_size_for
from fastdinov2.models.vit import build_vit


def _tiny_vit(seed: int = 0, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vit("vit_custom", embed_dim=32, depth=depth, num_heads=2, patch_size=8, img_size=32).eval()


def _class_folders(root: Path, n_per_class: int, classes: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Path:
    """Class folders of small noisy single-colour images (the colour identifies the class)."""
    rng = np.random.default_rng(seed)
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.array(colors[ci % len(colors)])[None, None, :] + rng.normal(0, 25, (36, 44, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"im{i}.png")
    return root


# ------------------------------------------------------------------------------------------ kNN voting
def _hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    # unit vectors; cosine with the test point (1, 0) is 1.0, 0.8, 0.6, 0.0
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    return train, labels


def test_knn_votes_match_hand_computation() -> None:
    train, labels = _hand_example()
    test, test_label = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # T = 1, k = 3: class 0 gets e^1 = 2.718, class 1 gets e^0.8 + e^0.6 = 4.048 -> class 1 (correct)
    assert math.exp(0.8) + math.exp(0.6) > math.exp(1.0)
    res = knn_classify(train, labels, test, test_label, ks=(1, 3, 10), temperature=1.0, num_classes=3)
    assert res["ks"]["1"]["top1"] == 0.0  # the single nearest neighbour is class 0
    assert res["ks"]["3"]["top1"] == 100.0
    # k = 10 is capped at the 4 training samples: class 2 adds e^0 = 1 and still loses to class 1
    assert res["ks"]["10"]["k_used"] == 4 and res["ks"]["10"]["top1"] == 100.0
    assert res["top1"] == 100.0 and res["best_k"] == 3  # first k reaching the best top-1
    # top-5 is capped at the 3 classes; a class without a vote is never predicted: with k = 1 only class 0
    # has a vote, with k >= 3 the true class 1 has one
    assert res["top5_k"] == 3
    assert [res["ks"][k]["top5"] for k in ("1", "3", "10")] == [0.0, 100.0, 100.0]
    # T = 0.07: e^(1/0.07) dwarfs e^(0.8/0.07) + e^(0.6/0.07), so class 0 wins at k = 3
    assert math.exp(1 / 0.07) > math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)
    res = knn_classify(train, labels, test, test_label, ks=(3,), temperature=0.07, num_classes=3)
    assert res["ks"]["3"]["top1"] == 0.0


def _reference_knn(train, train_labels, test, test_labels, k, temperature, num_classes):
    """Independent per-sample reference (DINOv2's softmax over the top-k similarities)."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    c1 = c5 = 0
    for x, y in zip(test, test_labels):
        sims = (train @ x).tolist()
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        z = sum(math.exp(sims[i] / temperature) for i in order)
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += math.exp(sims[i] / temperature) / z
        ranked = sorted((c for c in range(num_classes) if votes[c] > 0), key=lambda c: -votes[c])
        c1 += ranked[0] == int(y)
        c5 += int(y) in ranked[: min(5, num_classes)]
    n = len(test_labels)
    return 100.0 * c1 / n, 100.0 * c5 / n


def test_knn_matches_reference_implementation_and_is_chunk_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    num_classes = 7
    train, test = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_labels = torch.randint(0, num_classes, (60,), generator=g)
    test_labels = torch.randint(0, num_classes, (25,), generator=g)
    res = knn_classify(train, train_labels, test, test_labels, ks=(1, 5, 20), temperature=0.5,
                       num_classes=num_classes)
    chunked = knn_classify(train, train_labels, test, test_labels, ks=(1, 5, 20), temperature=0.5,
                           num_classes=num_classes, chunk_size=4)
    for k in (1, 5, 20):
        ref1, ref5 = _reference_knn(train, train_labels, test, test_labels, k, 0.5, num_classes)
        assert res["ks"][str(k)]["top1"] == pytest.approx(ref1)
        assert res["ks"][str(k)]["top5"] == pytest.approx(ref5)
        assert chunked["ks"][str(k)] == res["ks"][str(k)]


def _clusters(n: int, centers: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, centers.shape[0], (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, centers.shape[1], generator=g), y


def test_knn_on_gaussian_clusters_and_random_labels() -> None:
    g = torch.Generator().manual_seed(3)
    centers = 4.0 * torch.randn(5, 16, generator=g)
    xtr, ytr = _clusters(500, centers, g)
    xte, yte = _clusters(400, centers, g)
    res = knn_classify(xtr, ytr, xte, yte, num_classes=5)
    assert set(res["ks"]) == {"10", "20", "100", "200"}
    assert res["top1"] >= 99.0
    # labels unrelated to the features: chance level (20 %) within a generous margin
    rand = knn_classify(xtr, torch.randint(0, 5, (500,), generator=g), xte, torch.randint(0, 5, (400,), generator=g),
                        num_classes=5)
    assert 10.0 <= rand["ks"]["20"]["top1"] <= 30.0


def test_knn_rejects_bad_arguments() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, y, ks=(0,))
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, temperature=0.0)


def test_evaluate_knn_checks_its_settings_before_extracting(tmp_path: Path) -> None:
    # the folders do not even exist: the settings are refused first, before any feature is extracted
    nowhere = tmp_path / "nowhere"
    with pytest.raises(EvalError, match="temperature must be positive, got 0"):
        evaluate_knn(_tiny_vit(), nowhere, nowhere, temperature=0.0, progress=False)
    with pytest.raises(EvalError, match=r"every k must be >= 1, got \[10, 0\]"):
        evaluate_knn(_tiny_vit(), nowhere, nowhere, ks=(10, 0), progress=False)


# --------------------------------------------------------------------------------------- transforms
def test_eval_transform_sizes() -> None:
    assert resize_size_for(224) == 256 and resize_size_for(64) == 73
    img = Image.new("RGB", (120, 90), (255, 0, 0))
    assert make_eval_geometry(64)(img).size == (64, 64)
    x = make_eval_transform(64)(img)
    assert x.shape == (3, 64, 64)
    # pure red normalises to ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225)
    assert torch.allclose(x[:, 32, 32], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]),
                          atol=1e-5)


# --------------------------------------------------------------------------------- feature extraction
def test_extract_features_kinds_and_order(tmp_path: Path) -> None:
    model = _tiny_vit()
    ds = open_class_folder(_class_folders(tmp_path / "d", 3), make_eval_transform(32))
    feats, labels = extract_features(model, ds, 4, kind="cls", progress=False)
    assert feats.shape == (9, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        ref = model.forward_features(x)
        blocks = model.get_intermediate_layers(x, 2, return_class_token=True)
    assert torch.allclose(feats, ref["x_norm_clstoken"], atol=1e-5)
    bf, _ = extract_features(model, ds, 5, kind="blocks", n_last_blocks=2, progress=False)
    expected = torch.cat([blocks[0][1], blocks[1][1], blocks[1][0].mean(1)], dim=1)
    assert bf.shape == (9, 96) and torch.allclose(bf, expected, atol=1e-5)
    # the last block's CLS from "blocks" equals forward_features' CLS token
    assert torch.allclose(select_linear_input(bf, 32, 2, 1, False), feats, atol=1e-5)
    pm, _ = extract_features(model, ds, 9, kind="patch_mean", progress=False)
    assert torch.allclose(pm, ref["x_norm_patchtokens"].mean(1), atol=1e-5)
    assert model.training is False
    model.train()  # the caller's mode is restored (the trainer passes its teacher)
    again, _ = extract_features(model, ds, 4, kind="cls", progress=False)
    assert model.training is True and torch.allclose(again, feats, atol=1e-6)


def test_select_linear_input_slices_by_hand() -> None:
    d = 2
    feats = torch.arange(8.0).view(1, 8)  # cls_{L-2} = [0,1], cls_{L-1} = [2,3], cls_L = [4,5], avgpool = [6,7]
    assert select_linear_input(feats, d, 3, 1, False).tolist() == [[4.0, 5.0]]
    assert select_linear_input(feats, d, 3, 1, True).tolist() == [[4.0, 5.0, 6.0, 7.0]]
    assert select_linear_input(feats, d, 3, 2, True).tolist() == [[2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]


class _Counting(torch.nn.Module):
    """Wraps a backbone and counts forward_features calls (to see whether a cache was used)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0
        self.embed_dim, self.n_blocks = inner.embed_dim, inner.n_blocks

    def forward_features(self, x):
        self.calls += 1
        return self.inner.forward_features(x)


def test_feature_cache_is_reused_only_when_key_matches(tmp_path: Path) -> None:
    model = _Counting(_tiny_vit())
    ds = open_class_folder(_class_folders(tmp_path / "d", 2), make_eval_transform(32))
    cache = tmp_path / "cache" / "f.safetensors"
    key = feature_cache_key(None, ds, {"image_size": 32}, "cls", model=model)
    f1, l1 = extract_features(model, ds, 4, cache_path=cache, cache_key=key, progress=False)
    calls = model.calls
    assert cache.is_file() and calls > 0
    f2, l2 = extract_features(model, ds, 4, cache_path=cache, cache_key=key, progress=False)
    assert model.calls == calls and torch.equal(f1, f2) and torch.equal(l1, l2)
    # another transform setting -> another key -> recomputed
    key2 = feature_cache_key(None, ds, {"image_size": 48}, "cls", model=model)
    assert key2 != key
    extract_features(model, ds, 4, cache_path=cache, cache_key=key2, progress=False)
    assert model.calls > calls
    # the checkpoint's mtime is part of the key
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"x")
    k1 = feature_cache_key(ckpt, ds, {}, "cls")
    import os

    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert feature_cache_key(ckpt, ds, {}, "cls") != k1


def test_evaluate_knn_on_folders(tmp_path: Path) -> None:
    train = _class_folders(tmp_path / "train", 6, seed=1)
    val = _class_folders(tmp_path / "val", 3, seed=2)
    model = _tiny_vit()
    res = evaluate_knn(model, train, val, ks=(1, 3, 100), image_size=32, batch_size=8, progress=False)
    assert res["num_train"] == 18 and res["num_test"] == 9 and res["num_classes"] == 3
    assert res["ks"]["100"]["k_used"] == 18
    # same numbers as extracting by hand and calling knn_classify
    tr = extract_features(model, open_class_folder(train, make_eval_transform(32)), 8, progress=False)
    va = extract_features(model, open_class_folder(val, make_eval_transform(32)), 8, progress=False)
    ref = knn_classify(*tr, *va, ks=(1, 3, 100), num_classes=3)
    assert res["ks"] == ref["ks"]


def test_evaluate_knn_class_mismatch_names_the_folder(tmp_path: Path) -> None:
    train = _class_folders(tmp_path / "train", 2)
    val = _class_folders(tmp_path / "val", 2, classes=("a", "b", "zebra"))
    with pytest.raises(EvalError, match=r"val.*missing classes: c.*unexpected classes: zebra"):
        evaluate_knn(_tiny_vit(), train, val, image_size=32, progress=False)


# ------------------------------------------------------------------ weights files and file permissions
def _write_checkpoint(d: Path, model: torch.nn.Module, position: int) -> None:
    import json

    d.mkdir(parents=True)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": sd, "student": sd, "backbone_config": model.config}, d / "model.pt")
    (d / "COMMITTED").write_text(json.dumps({"sample_position": position}))


def test_checkpoint_weight_files_follow_interop(tmp_path: Path) -> None:
    from fastdinov2.eval.features import checkpoint_weight_files
    from fastdinov2.interop import export_backbone, read_backbone_weights

    def first(p: Path) -> Path:
        files = checkpoint_weight_files(p)
        assert files[0].resolve() == Path(read_backbone_weights(p)[2]).resolve()  # the file interop reads
        return files[0]

    model = _tiny_vit()
    run = tmp_path / "run"
    # a run continued on more processes: the later checkpoint (by data position) has the smaller step
    _write_checkpoint(run / "checkpoints" / "step_00000200", model, position=100)
    _write_checkpoint(run / "checkpoints" / "step_00000150", model, position=300)
    (run / "checkpoints" / "step_00000900").mkdir()  # not committed: ignored
    (run / "eval").mkdir()
    (run / "eval" / "knn.json").write_text("{}")  # eval outputs are not weights
    assert checkpoint_weight_files(run) == [run / "checkpoints" / "step_00000150" / "model.pt"]
    first(run)
    assert first(run / "checkpoints" / "step_00000200") == run / "checkpoints" / "step_00000200" / "model.pt"
    stem = export_backbone(model, run / "teacher_backbone")  # the final export wins
    assert checkpoint_weight_files(run) == [stem, stem.with_suffix(".json")]
    first(run)
    assert checkpoint_weight_files(stem.with_suffix(".json")) == [stem, stem.with_suffix(".json")]
    pth = tmp_path / "official.pth"
    torch.save(model.state_dict(), pth)
    assert checkpoint_weight_files(pth) == [pth]
    with pytest.raises(EvalError, match="not a run or checkpoint directory"):
        checkpoint_weight_files(tmp_path / "run" / "eval")
    # the cache key of a run dir ignores everything but the weights read
    ds = open_class_folder(_class_folders(tmp_path / "d", 1), make_eval_transform(32))
    key = feature_cache_key(run, ds, {}, "cls")
    (run / "eval" / "knn.json").write_text('{"changed": true}')
    (run / "metrics.jsonl").write_text("{}\n")
    assert feature_cache_key(run, ds, {}, "cls") == key
    stem.with_suffix(".json").write_text(stem.with_suffix(".json").read_text() + " ")
    assert feature_cache_key(run, ds, {}, "cls") != key


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_eval_files_get_the_permissions_of_a_new_file(tmp_path: Path, umask: int, mode: int) -> None:
    import os

    from fastdinov2.eval.features import save_cached_features
    from fastdinov2.eval.linear import LinearHead
    from fastdinov2.eval.results import current_umask, write_result

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        written = [
            write_result(tmp_path / "r" / "knn.json", "knn", None, {}, {"top1": 1.0}),
            save_cached_features(tmp_path / "c" / "f.safetensors", "k", torch.zeros(2, 3), torch.zeros(2)),
        ]
        head = LinearHead(torch.zeros(2, 4), torch.zeros(2), 1, False, 4, ["a", "b"], 32, {})
        written += [head.save(tmp_path / "h" / "head.safetensors"), tmp_path / "h" / "head.json"]
    finally:
        os.umask(old)
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, path
    # no temp files are left behind
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []
