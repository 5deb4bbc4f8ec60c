"""Revisited Oxford/Paris retrieval: the revisitop metric on hand-built rankings; a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastdinov2.eval.retrieval import (
    RetrievalDataError,
    add_retrieval_command,
    compute_ap,
    compute_map,
    evaluate_ranks,
    evaluate_retrieval,
    format_table,
    load_revisitop,
    rank_database,
    resized_size,
    setup_ground_truth,
)
from fastdinov2.models.vit import build_vit
from fastdinov2.safe_pickle import UnsafePickleError


def _col(*cols):
    """Columns (one per query) -> ranks [n_db, n_queries]."""
    return np.stack([np.asarray(c) for c in cols], axis=1)


# ---------------------------------------------------------------------------------------------- metric
def test_compute_ap_trapezoids_by_hand():
    # positives at ranks 0 and 2 of 2: (1+1)/2 + (1/2+2/3)/2, over 2 positives
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx((1 + 7 / 12) / 2)
    # one positive at rank 1: (0 + 1/2)/2
    assert compute_ap(np.array([1]), 1) == pytest.approx(0.25)
    # a positive missing from the ranking still counts in the recall denominator
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5)


def test_compute_map_with_junk_and_an_empty_query_by_hand():
    ranks = _col([2, 0, 4, 1, 3, 5], [1, 5, 0, 3, 2, 4], [0, 1, 2, 3, 4, 5])
    gnd = [
        {"ok": [2, 4], "junk": []},  # positives at ranks 0 and 2 -> AP 19/24; P@1 1, P@5 = P@10 = 2/3
        {"ok": [3], "junk": [1, 5]},  # positive at 3, two junk before it -> rank 1 -> AP 1/4; P@1 0, P@5 1/2
        {"ok": [], "junk": [0]},  # no positive: NaN, excluded from the means
    ]
    m, aps, pr, prs = compute_map(ranks, gnd, (1, 5, 10))
    assert aps[:2] == pytest.approx([19 / 24, 1 / 4])
    assert math.isnan(aps[2]) and np.isnan(prs[2]).all()
    assert prs[0] == pytest.approx([1, 2 / 3, 2 / 3])
    assert prs[1] == pytest.approx([0, 1 / 2, 1 / 2])
    assert m == pytest.approx((19 / 24 + 1 / 4) / 2)
    assert pr == pytest.approx([1 / 2, 7 / 12, 7 / 12])


def test_precision_at_k_is_taken_at_the_last_positive_when_earlier():
    # revisitop: P@k uses k' = min(k, rank of the last positive); one positive at rank 0 gives P@10 = 1
    _, _, pr, _ = compute_map(_col([7, 0, 1, 2, 3, 4, 5, 6, 8, 9, 10]), [{"ok": [7]}], (1, 5, 10))
    assert pr == pytest.approx([1, 1, 1])


def test_all_queries_empty_gives_nan():
    m, aps, pr, _ = compute_map(_col([0, 1]), [{"ok": [], "junk": []}], (1,))
    assert math.isnan(m) and np.isnan(aps).all() and np.isnan(pr).all()


def test_easy_medium_hard_setups_by_hand():
    gnd = [
        {"easy": [0], "hard": [3], "junk": [1], "bbx": [0, 0, 1, 1]},
        {"easy": [4], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]},
    ]
    ranks = _col([2, 3, 1, 0, 4], [4, 0, 1, 2, 3])
    assert [list(g["ok"]) for g in setup_ground_truth(gnd, "hard")] == [[3], []]
    assert sorted(setup_ground_truth(gnd, "hard")[0]["junk"]) == [0, 1]
    r = evaluate_ranks(ranks, gnd)
    # query 0, Easy: positive 0 at rank 3, junk 3 and 1 before it -> rank 1 -> AP 1/4, P@1 0, P@5 1/2
    # query 0, Medium: positives at 1 and 3, junk 1 (at 2) -> ranks 1, 2
    #                  -> AP ((0+1/2)/2 + (1/2+2/3)/2)/2 = 5/12, P@1 0, P@5 = P@10 = 2/3
    # query 0, Hard: positive 3 at rank 1, junk (0, 1) after it -> AP 1/4, P@1 0, P@5 1/2
    # query 1: Easy and Medium perfect (AP 1, P@k 1); Hard has no positive -> excluded
    assert r["easy"]["map"] == pytest.approx(100 * (1 / 4 + 1) / 2)
    assert r["medium"]["map"] == pytest.approx(100 * (5 / 12 + 1) / 2, abs=1e-3)
    assert r["hard"]["map"] == pytest.approx(25.0)
    assert (r["easy"]["num_queries"], r["medium"]["num_queries"], r["hard"]["num_queries"]) == (2, 2, 1)
    assert r["hard"]["aps"] == [pytest.approx(25.0), None]
    assert [r["easy"][f"mp@{k}"] for k in (1, 5, 10)] == pytest.approx([50, 75, 75])
    medium_pk = [r["medium"][f"mp@{k}"] for k in (1, 5, 10)]
    assert medium_pk == pytest.approx([50, 100 * 5 / 6, 100 * 5 / 6], abs=1e-3)
    assert [r["hard"][f"mp@{k}"] for k in (1, 5, 10)] == pytest.approx([0, 50, 50])


def _reference_map(ranks, gnd, kappas):
    """Independent reference: delete junk from each ranked list, then integrate precision over recall."""
    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok, junk = set(g["ok"]), set(g["junk"])
        if not ok:
            continue
        kept = [i for i in ranks[:, q] if i not in junk]  # ok and junk are disjoint here
        hits = [n for n, i in enumerate(kept) if i in ok]
        ap = 0.0
        for found, n in enumerate(hits, start=1):
            prec_before = 1.0 if n == 0 else (found - 1) / n
            ap += (prec_before + found / (n + 1)) / 2 / len(g["ok"])
        aps.append(ap)
        last = hits[-1] + 1
        prs.append([sum(h < min(k, last) for h in hits) / min(k, last) for k in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def test_compute_map_matches_an_independent_reference_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, n_q = 40, 12
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for _ in range(n_q):
        perm = rng.permutation(n_db)
        n_ok, n_junk = rng.integers(1, 8), rng.integers(0, 8)
        gnd.append({"ok": perm[:n_ok].tolist(), "junk": perm[n_ok : n_ok + n_junk].tolist()})
    m, _, pr, _ = compute_map(ranks, gnd, (1, 5, 10))
    ref_m, ref_pr = _reference_map(ranks, gnd, (1, 5, 10))
    assert m == pytest.approx(ref_m)
    assert pr == pytest.approx(ref_pr)


def test_resized_size_keeps_aspect_and_rounds_to_patches():
    assert resized_size(500, 375, 224, 16) == (224, 176)  # 168 = 10.5 patches rounds up
    assert resized_size(375, 500, 224, 16) == (176, 224)
    assert resized_size(100, 10, 224, 16) == (224, 16)  # never below one patch
    assert resized_size(1024, 768, 224 / math.sqrt(2), 14) == (154, 112)


def test_rank_database_orders_by_cosine():
    db = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert rank_database(db, q).T.tolist() == [[2, 1, 0], [0, 1, 2]]


# ------------------------------------------------------------------------------------------- dataset
def _texture(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
    return Image.fromarray(big)


def _make_revisitop(root, name="rtoy"):
    """3 landmarks x 3 database images; each query is db image 3*l padded with a border, bbx = the copy."""
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    for landmark in range(3):
        for v in range(3):
            w, h = (96, 64) if v != 1 else (64, 80)
            imlist.append(f"db_{landmark}_{v}")
            _texture(100 * landmark + v, w, h).save(jpg / f"db_{landmark}_{v}.png")
    for landmark in range(3):
        src = Image.open(jpg / f"db_{landmark}_0.png")
        canvas = _texture(999 + landmark, 140, 100)
        canvas.paste(src, (20, 10))
        qimlist.append(f"q_{landmark}")
        canvas.save(jpg / f"q_{landmark}.png")
        gnd.append({"bbx": [20.0, 10.0, 116.0, 74.0], "easy": [3 * landmark], "hard": [3 * landmark + 1],
                    "junk": [3 * landmark + 2]})
    # the benchmark's files are .jpg; PNG bytes under .jpg names keep the copies lossless for the test
    for p in jpg.glob("*.png"):
        os.replace(p, p.with_suffix(".jpg"))
    with open(root / name / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh)
    return name


def _tiny_vit():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_vit(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, layerscale_init=None)


def test_load_revisitop_validates_the_ground_truth(tmp_path):
    name = _make_revisitop(tmp_path)
    data = load_revisitop(tmp_path, name)
    assert len(data.imlist) == 9 and data.qimlist == ["q_0", "q_1", "q_2"]
    assert data.gnd[1]["bbx"] == (20.0, 10.0, 116.0, 74.0)
    with pytest.raises(RetrievalDataError, match=r"gnd_nope\.pkl.*rtoy"):
        load_revisitop(tmp_path, "nope")
    bad = tmp_path / "bad"
    (bad / "jpg").mkdir(parents=True)
    with open(bad / "gnd_bad.pkl", "wb") as fh:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [5], "hard": [],
                                                                 "junk": []}]}, fh)
    with pytest.raises(RetrievalDataError, match=r"gnd\[0\]\['easy'\]"):
        load_revisitop(tmp_path, "bad")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_revisitop_refuses_code_in_the_pickle(tmp_path):
    (tmp_path / "evil" / "jpg").mkdir(parents=True)
    with open(tmp_path / "evil" / "gnd_evil.pkl", "wb") as fh:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [], "x": _Evil()}, fh)
    with pytest.raises(UnsafePickleError, match="system"):
        load_revisitop(tmp_path, "evil")


def test_evaluate_retrieval_end_to_end(tmp_path):
    name = _make_revisitop(tmp_path)
    model = _tiny_vit()
    res = evaluate_retrieval(model, tmp_path, name, image_size=64, batch_size=4)
    assert (res["num_db"], res["num_queries"], res["scales"]) == (9, 3, [1.0])
    # the cropped query is pixel-identical to its single Easy positive, so it ranks first
    assert res["easy"]["map"] == pytest.approx(100.0)
    assert res["easy"]["mp@1"] == pytest.approx(100.0)
    for setup in ("medium", "hard"):
        assert 0.0 <= res[setup]["map"] <= 100.0 and res[setup]["num_queries"] == 3
    ms = evaluate_retrieval(model, tmp_path, name, image_size=64, multiscale=True, batch_size=4)
    assert ms["scales"] == pytest.approx([1.0, 1 / math.sqrt(2), 0.5], abs=1e-6)
    assert ms["easy"]["map"] == pytest.approx(100.0)
    assert "Easy" in format_table(res) and "mP@10" in format_table(res)


def test_retrieval_command_writes_the_result_envelope(tmp_path, capsys, monkeypatch):
    from fastdinov2.interop import export_backbone

    name = _make_revisitop(tmp_path / "data")
    stem = export_backbone(_tiny_vit(), tmp_path / "tiny")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    eval_sub = sub.add_parser("eval").add_subparsers(dest="protocol")
    add_retrieval_command(eval_sub)
    common = ["eval", "retrieval", "--checkpoint", str(stem), "--data", str(tmp_path / "data"),
              "--image-size", "64", "--device", "cpu", "--no-progress"]
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args([*common, "--dataset", name])
    assert args.func(args) == 0
    assert "Medium" in capsys.readouterr().out
    doc = json.loads((tmp_path / f"eval_retrieval_{name}.json").read_text())  # default output: ./eval_...
    assert {"protocol", "checkpoint", "created", "fastdinov2_version", "config", "results"} <= doc.keys()
    assert doc["protocol"] == "retrieval"
    assert doc["results"]["easy"]["map"] == pytest.approx(100.0)
    args = parser.parse_args([*common, "--dataset", "missing", "--output", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    assert "gnd_missing.pkl" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
