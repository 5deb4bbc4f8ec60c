"""k-nearest-neighbour classification on frozen features (the DINOv2 protocol).

Features are the L2-normalised CLS tokens; similarity is the cosine (a dot product of unit vectors).
For each test sample the ``k`` most similar training samples vote for their class with weight
``exp(sim / T)`` (``T = 0.07``); the class with the largest summed weight is the prediction. DINOv2 applies
a softmax over the top ``max(ks)`` similarities before summing, which only rescales every vote of one test
sample by the same constant, so the ranking of classes, and hence top-1/top-5, is identical.

``k`` is capped at the number of training samples and top-5 at the number of classes; a class that got no
vote never counts as predicted (so with ``k < 5`` top-5 does not depend on how ties among unvoted classes
break). The similarity matrix
is computed in chunks of test samples so memory stays bounded for large training sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdinov2.eval.features import check_same_classes, extract_features, open_class_folder, resolve_device
from fastdinov2.eval.transforms import EvalTransformSettings, make_eval_transform

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _chunk_rows(n_train: int, max_k: int, budget_elems: int = 1 << 25) -> int:
    """Test rows per chunk so the ``[rows, n_train]`` similarity block stays within ``budget_elems``."""
    return max(1, min(4096, budget_elems // max(n_train + max_k, 1)))


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> dict:
    """Weighted kNN vote.

    Args:
        train_feats: ``[N_train, D]``; test_feats: ``[N_test, D]`` (same device); labels ``[N]`` int64 in
            ``0..num_classes-1``.
        normalize: L2-normalise both feature sets first (the protocol; pass False for pre-normalised input).
        num_classes: default ``max(label) + 1`` over both label sets.
    Returns:
        ``{"ks": {"<k>": {"top1", "top5", "k_used"}}, "top1", "top5", "best_k", "num_train", "num_test",
        "num_classes", "temperature", "top5_k"}`` with accuracies in percent. ``top1`` is the best top-1 over
        ``ks`` (first ``k`` on ties), ``top5`` the top-5 at that ``k``; ``top5_k = min(5, num_classes)``.
    """
    if not ks:
        raise ValueError("ks is empty")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"kNN needs training and test samples (got {n_train} and {n_test})")
    if train_labels.shape[0] != n_train or test_labels.shape[0] != n_test:
        raise ValueError("features and labels have different lengths")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    train_labels = train_labels.to(train_feats.device, torch.long)
    test_labels = test_labels.to(train_feats.device, torch.long)
    if normalize:
        train_feats = F.normalize(train_feats.float(), dim=1)
        test_feats = F.normalize(test_feats.float(), dim=1)

    k_used = {int(k): min(int(k), n_train) for k in ks}
    max_k = max(k_used.values())
    top5_k = min(5, num_classes)
    correct1 = {k: 0 for k in k_used}
    correct5 = {k: 0 for k in k_used}
    rows = chunk_size or _chunk_rows(n_train, max_k)
    for start in range(0, n_test, rows):
        sims = test_feats[start : start + rows] @ train_feats.T  # [c, N_train]
        top_sims, top_idx = sims.topk(max_k, dim=1)  # [c, max_k], sorted descending
        neighbour_labels = train_labels[top_idx]  # [c, max_k]
        # exp(sim/T) up to a per-row constant (the row maximum), which leaves each row's ranking unchanged.
        weights = torch.exp((top_sims - top_sims[:, :1]) / temperature)
        target = test_labels[start : start + rows].view(-1, 1)
        for k, kk in k_used.items():
            votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            score, pred = votes.topk(top5_k, dim=1)  # [c, top5_k]
            # a class without a vote is never "predicted" (with k < 5 the rest of the top-5 would be a tie)
            hit = (pred == target) & (score > 0)
            correct1[k] += int(hit[:, 0].sum())
            correct5[k] += int(hit.any(dim=1).sum())

    per_k = {
        str(k): {"top1": 100.0 * correct1[k] / n_test, "top5": 100.0 * correct5[k] / n_test, "k_used": k_used[k]}
        for k in k_used
    }
    best_k = max(k_used, key=lambda k: (correct1[k], -list(k_used).index(k)))
    return {
        "ks": per_k,
        "top1": per_k[str(best_k)]["top1"],
        "top5": per_k[str(best_k)]["top5"],
        "best_k": best_k,
        "num_train": n_train,
        "num_test": n_test,
        "num_classes": num_classes,
        "temperature": temperature,
        "top5_k": top5_k,
    }


def evaluate_knn(
    model: nn.Module,
    train_dir: str | Path,
    val_dir: str | Path,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    image_size: int = 224,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> dict:
    """kNN top-1/top-5 of ``model``'s CLS features: train on the class folders of ``train_dir``, test on
    ``val_dir`` (same class folder names, else :class:`EvalError`). Images use the eval transform at
    ``image_size``.

    ``cache_dir``: keep extracted features there (keyed by ``checkpoint`` path + mtime when given, else by the
    weights). Returns :func:`knn_classify`'s dict plus ``"image_size"``.
    """
    from fastdinov2.eval.features import feature_cache_key
    from fastdinov2.eval.results import EvalError

    # checked before the features are extracted (knn_classify would refuse them only afterwards)
    if not ks or any(int(k) < 1 for k in ks):
        raise EvalError(f"kNN: every k must be >= 1, got {list(ks)}")
    if not temperature > 0:
        raise EvalError(f"kNN: the temperature must be positive, got {temperature}")
    dev = resolve_device(device)
    transform = make_eval_transform(image_size)
    settings = EvalTransformSettings.for_size(image_size).to_dict()
    train_ds = open_class_folder(train_dir, transform)
    val_ds = open_class_folder(val_dir, transform)
    check_same_classes(train_ds.classes, val_ds.classes, val_dir, f"the training classes of {train_dir}")

    def _extract(ds: Any, name: str) -> tuple[Tensor, Tensor]:
        cache_path = key = None
        if cache_dir is not None:
            key = feature_cache_key(checkpoint, ds, settings, "cls", model=model if checkpoint is None else None)
            cache_path = Path(cache_dir) / f"knn_{name}_{key[:16]}.safetensors"
        return extract_features(
            model, ds, batch_size, num_workers=num_workers, device=dev, kind="cls", cache_path=cache_path,
            cache_key=key, progress=progress, desc=f"knn {name} features",
        )

    train_feats, train_labels = _extract(train_ds, "train")
    val_feats, val_labels = _extract(val_ds, "val")
    result = knn_classify(
        train_feats.to(dev), train_labels, val_feats.to(dev), val_labels, ks=ks, temperature=temperature,
        num_classes=len(train_ds.classes),
    )
    result["image_size"] = image_size
    return result
