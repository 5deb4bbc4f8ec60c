"""Linear probe (fastdinov2.eval.linear)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdinov2.eval.features import extract_features, open_class_folder, select_linear_input
from fastdinov2.eval.linear import (
    LEARNING_RATES,
    HeadSpec,
    LinearHead,
    apply_linear_head,
    evaluate_linear,
    head_grid,
    stratified_holdout,
    train_linear_heads,
    train_linear_probe,
)
from fastdinov2.eval.results import EvalError
from fastdinov2.eval.transforms import make_eval_transform
from fastdinov2.models.vit import build_vit


def _tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vit("vit_custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32).eval()


def _class_folders(root: Path, n_per_class: int, classes: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.array(colors[ci % len(colors)])[None, None, :] + rng.normal(0, 25, (36, 44, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"im{i}.png")
    return root


def _cluster_feats(n: int, centers: torch.Tensor, g: torch.Generator, noise: float = 1.0):
    """``"blocks"`` features with one block: [cls | avgpool], both carrying the class signal."""
    y = torch.randint(0, centers.shape[0], (n,), generator=g)
    cls = centers[y] + noise * torch.randn(n, centers.shape[1], generator=g)
    pooled = centers[y] + noise * torch.randn(n, centers.shape[1], generator=g)
    return torch.cat([cls, pooled], dim=1), y


def test_head_grid_is_the_dinov2_grid() -> None:
    specs = head_grid(12)
    assert len(specs) == 13 * 2 * 2
    assert {s.n_blocks for s in specs} == {1, 4} and {s.pooling for s in specs} == {"cls", "cls+avgpool"}
    assert sorted({s.lr for s in specs}) == sorted(LEARNING_RATES)
    # lr scaled by batch / 256
    assert all(s.lr_scaled == pytest.approx(s.lr * 512 / 256) for s in head_grid(12, head_batch_size=512))
    # a 2-block model caps "last 4 blocks" at 2
    assert {s.n_blocks for s in head_grid(2)} == {1, 2}
    with pytest.raises(EvalError, match="pooling"):
        head_grid(12, poolings=("max",))


def test_probe_separates_gaussian_clusters_and_not_random_labels() -> None:
    g = torch.Generator().manual_seed(11)
    centers = 3.0 * torch.randn(6, 16, generator=g)
    xtr, ytr = _cluster_feats(600, centers, g)
    xva, yva = _cluster_feats(300, centers, g)
    res, best, specs, heads = train_linear_probe(xtr, ytr, xva, yva, embed_dim=16, extracted_blocks=1,
                                                 num_classes=6, n_last_blocks_list=(1,), epochs=10, seed=5)
    assert len(res["heads"]) == 26 and res["best"] == res["heads"][best]
    assert res["best"]["top1"] >= 98.0
    assert res["best"]["selection_top1"] == max(h["selection_top1"] for h in res["heads"])
    # random labels: the best head on a fresh test set is at chance (1/6 = 16.7 %)
    y_rand = torch.randint(0, 6, (600,), generator=g)
    res_r, best_r, specs_r, heads_r = train_linear_probe(xtr, y_rand, xtr[:300], y_rand[:300], embed_dim=16,
                                                         extracted_blocks=1, num_classes=6,
                                                         n_last_blocks_list=(1,), learning_rates=(0.01, 0.1),
                                                         epochs=5, seed=5)
    w, b = heads_r[best_r]
    x_new = select_linear_input(xva, 16, 1, specs_r[best_r].n_blocks, specs_r[best_r].avgpool)
    acc = 100.0 * ((x_new @ w.T + b).argmax(1) == torch.randint(0, 6, (300,), generator=g)).float().mean()
    assert 5.0 <= float(acc) <= 30.0


def test_grid_training_matches_torch_sgd_with_cosine() -> None:
    """Two heads trained together == two nn.Linear trained separately with torch SGD + CosineAnnealingLR."""
    g = torch.Generator().manual_seed(2)
    feats, y = torch.randn(40, 2 * 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    specs = [HeadSpec(1, False, 0.1, 0.1), HeadSpec(1, True, 0.5, 0.5)]
    init = [(0.01 * torch.randn(3, 5, generator=g), torch.zeros(3)),
            (0.01 * torch.randn(3, 10, generator=g), torch.zeros(3))]
    steps = 7
    ours = train_linear_heads(feats, y, specs, embed_dim=5, extracted_blocks=1, num_classes=3, iterations=steps,
                              batch_size=40, init=init)  # full batch: the sample order does not matter
    for (w, b), spec, (w0, b0) in zip(ours, specs, init):
        lin = torch.nn.Linear(w0.shape[1], 3)
        with torch.no_grad():
            lin.weight.copy_(w0)
            lin.bias.copy_(b0)
        opt = torch.optim.SGD(lin.parameters(), lr=spec.lr_scaled, momentum=0.9, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
        x = select_linear_input(feats, 5, 1, 1, spec.avgpool)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(lin(x), y).backward()
            opt.step()
            sched.step()
        assert torch.allclose(w, lin.weight, atol=1e-5) and torch.allclose(b, lin.bias, atol=1e-5)


def test_stratified_holdout() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    tr, ho = stratified_holdout(labels, 0.2, seed=0)
    assert sorted(tr.tolist() + ho.tolist()) == list(range(16))
    assert (labels[ho] == 0).sum() == 2 and (labels[ho] == 1).sum() == math.ceil(0.2 * 5)
    assert (labels[ho] == 2).sum() == 0  # a single-sample class stays in train
    tr2, ho2 = stratified_holdout(labels, 0.2, seed=0)
    assert torch.equal(ho, ho2)
    with pytest.raises(EvalError, match="fraction"):
        stratified_holdout(labels, 1.5, seed=0)


def test_val_from_train_selects_on_holdout() -> None:
    g = torch.Generator().manual_seed(4)
    centers = 3.0 * torch.randn(3, 8, generator=g)
    xtr, ytr = _cluster_feats(200, centers, g)
    xva, yva = _cluster_feats(60, centers, g)
    res, *_ = train_linear_probe(xtr, ytr, xva, yva, embed_dim=8, extracted_blocks=1, num_classes=3,
                                 n_last_blocks_list=(1,), learning_rates=(0.01, 0.1), epochs=3,
                                 val_from_train=True, val_fraction=0.25)
    assert res["selection_split"] == "train_holdout" and res["evaluation_split"] == "val"
    assert res["num_selection"] == sum(math.ceil(0.25 * int((ytr == c).sum())) for c in range(3))
    assert res["num_train"] == 200 - res["num_selection"] and res["num_eval"] == 60


def test_evaluate_linear_saves_a_reusable_head(tmp_path: Path) -> None:
    train = _class_folders(tmp_path / "train", 6, seed=1)
    val = _class_folders(tmp_path / "val", 3, seed=2)
    model = _tiny_vit()
    head_file = tmp_path / "out" / "linear_head.safetensors"
    res = evaluate_linear(model, train, val, image_size=32, batch_size=8, epochs=3, learning_rates=(1e-3, 0.1),
                          n_last_blocks_list=(1, 4), head_path=head_file, progress=False)
    assert len(res["heads"]) == 2 * 2 * 2 and res["extracted_blocks"] == 2 and res["classes"] == ["a", "b", "c"]
    info = json.loads(head_file.with_suffix(".json").read_text())
    best = res["best"]
    assert info["n_last_blocks"] == best["n_last_blocks"] and info["pooling"] == best["pooling"]
    assert info["lr"] == best["lr"] and info["classes"] == ["a", "b", "c"] and info["image_size"] == 32
    assert info["feature_dim"] == res["feature_dim"] == 32 * (best["n_last_blocks"] + (best["pooling"] != "cls"))
    head = LinearHead.load(head_file)
    assert head.weight.shape == (3, info["feature_dim"])
    # applying the saved head to the val folder reproduces the best head's val accuracy
    assert apply_linear_head(model, head_file, val, progress=False) == pytest.approx(best["top1"])
    # ... and by hand from features
    feats, labels = extract_features(model, open_class_folder(val, make_eval_transform(32)), 4, kind="blocks",
                                     n_last_blocks=head.n_blocks, progress=False)
    manual = 100.0 * (head.logits(feats, head.n_blocks).argmax(1) == labels).float().mean()
    assert float(manual) == pytest.approx(best["top1"])


def test_apply_linear_head_rejects_other_classes(tmp_path: Path) -> None:
    head = LinearHead(torch.zeros(3, 32), torch.zeros(3), 1, False, 32, ["a", "b", "c"], 32, {})
    head_file = head.save(tmp_path / "h.safetensors")
    other = _class_folders(tmp_path / "other", 1, classes=("a", "b", "d"))
    with pytest.raises(EvalError, match=r"other.*missing classes: c; unexpected classes: d"):
        apply_linear_head(_tiny_vit(), head_file, other, progress=False)
    wide = build_vit("vit_custom", embed_dim=48, depth=1, num_heads=2, patch_size=8, img_size=32)
    with pytest.raises(EvalError, match="embed_dim 32"):
        apply_linear_head(wide, head_file, other, progress=False)


def test_head_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="nothere.safetensors"):
        LinearHead.load(tmp_path / "nothere.safetensors")
    head = LinearHead(torch.zeros(2, 16), torch.zeros(2), 1, False, 16, ["x", "y"], 32, {})
    path = head.save(tmp_path / "h.safetensors")
    info = json.loads(path.with_suffix(".json").read_text())
    info["classes"] = ["x", "y", "z"]
    path.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(EvalError, match=r"h\.safetensors.*3 classes"):
        LinearHead.load(path)


def test_evaluate_linear_checks_its_settings_before_extracting(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(EvalError, match="batch size must be >= 1, got 0"):
        evaluate_linear(_tiny_vit(), nowhere, nowhere, head_batch_size=0, progress=False)
    with pytest.raises(EvalError, match="at least one iteration"):
        evaluate_linear(_tiny_vit(), nowhere, nowhere, epochs=0, progress=False)
    with pytest.raises(EvalError, match="block counts must be >= 1"):
        evaluate_linear(_tiny_vit(), nowhere, nowhere, n_last_blocks_list=(0,), progress=False)
    with pytest.raises(EvalError, match="learning rates must be positive"):
        evaluate_linear(_tiny_vit(), nowhere, nowhere, learning_rates=(0.1, -1.0), progress=False)
