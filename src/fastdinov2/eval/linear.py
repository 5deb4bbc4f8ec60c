"""Linear probe on a frozen backbone (the DINOv2 protocol), and reuse of the best head.

A grid of linear heads is trained together in one pass over the same mini-batches:

- learning rates ``1e-5 ... 0.1`` (13 values), each scaled by ``head_batch_size / 256``;
- the CLS tokens of the last 1 or the last 4 blocks (capped at the model's depth), concatenated;
- with or without the average-pooled patch tokens of the last block appended.

Every head is ``nn.Linear``-shaped (weight ``N(0, 0.01)``, bias 0), trained with SGD (momentum 0.9,
weight decay 0) and a cosine learning-rate schedule (no warmup, down to 0), cross-entropy summed over the
heads. The best head on the validation split (the ``val`` folder, or a stratified hold-out of ``train`` with
``val_from_train``) is saved (safetensors + JSON) for :func:`apply_linear_head`, the corruption and the
frequency protocols.

Deviation from DINOv2: features are computed once on the eval transform (resize + centre crop) instead of
on randomly augmented crops every iteration; this makes the probe minutes instead of hours, at the cost of
some accuracy on large datasets. DINOv2 trains 12500 iterations; here ``epochs`` (default 10) or
``iterations`` set the length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastdinov2.eval.features import (
    check_same_classes,
    checkpoint_identity,
    extract_features,
    feature_cache_key,
    linear_input_dim,
    open_class_folder,
    resolve_device,
    select_linear_input,
)
from fastdinov2.eval.results import EvalError, write_atomic, write_json_atomic
from fastdinov2.eval.transforms import EvalTransformSettings, make_eval_transform

LEARNING_RATES: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
N_LAST_BLOCKS: tuple[int, ...] = (1, 4)
POOLINGS: tuple[str, ...] = ("cls", "cls+avgpool")
HEAD_FORMAT = "fastdinov2-linear-head"
HEAD_FORMAT_VERSION = 1


@dataclass(frozen=True)
class HeadSpec:
    """One head of the grid: which features it reads and its learning rate."""

    n_blocks: int
    avgpool: bool
    lr: float  # base learning rate (per 256 images)
    lr_scaled: float  # lr * head_batch_size / 256

    @property
    def pooling(self) -> str:
        return "cls+avgpool" if self.avgpool else "cls"

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_{self.pooling}_lr{self.lr:g}"


def head_grid(
    depth: int,
    learning_rates: Sequence[float] = LEARNING_RATES,
    n_last_blocks_list: Sequence[int] = N_LAST_BLOCKS,
    poolings: Sequence[str] = POOLINGS,
    head_batch_size: int = 128,
) -> list[HeadSpec]:
    """The grid of heads; block counts above ``depth`` are capped at ``depth`` (duplicates dropped)."""
    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        raise EvalError(f"unknown pooling(s) {bad}; expected {list(POOLINGS)}")
    if not learning_rates or any(lr <= 0 for lr in learning_rates):
        raise EvalError(f"learning rates must be positive and non-empty, got {list(learning_rates)}")
    if not n_last_blocks_list or any(n < 1 for n in n_last_blocks_list):
        raise EvalError(f"block counts must be >= 1, got {list(n_last_blocks_list)}")
    blocks = list(dict.fromkeys(min(int(n), depth) for n in n_last_blocks_list))
    return [
        HeadSpec(n, pool == "cls+avgpool", float(lr), float(lr) * head_batch_size / 256.0)
        for n in blocks
        for pool in poolings
        for lr in learning_rates
    ]


@dataclass
class LinearHead:
    """A trained linear head: ``logits = select_linear_input(feats) @ weight.T + bias``.

    ``weight [C, (n_blocks + avgpool) * embed_dim]``, ``bias [C]``; ``classes[i]`` names logit ``i``.
    """

    weight: Tensor
    bias: Tensor
    n_blocks: int
    avgpool: bool
    embed_dim: int
    classes: list[str]
    image_size: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pooling(self) -> str:
        return "cls+avgpool" if self.avgpool else "cls"

    def logits(self, feats: Tensor, extracted_blocks: int) -> Tensor:
        """``feats [N, (extracted_blocks + 1) * D]`` (``kind="blocks"``) -> logits ``[N, C]``."""
        x = select_linear_input(feats, self.embed_dim, extracted_blocks, self.n_blocks, self.avgpool)
        return x @ self.weight.to(x).T + self.bias.to(x)

    def check_model(self, model: nn.Module, head_file: str | Path) -> None:
        """Raise :class:`EvalError` when ``model`` cannot feed this head."""
        d = int(getattr(model, "embed_dim", -1))
        depth = _depth(model)
        if d != self.embed_dim:
            raise EvalError(f"head {head_file} expects embed_dim {self.embed_dim}, the backbone has {d}")
        if depth < self.n_blocks:
            raise EvalError(f"head {head_file} reads the last {self.n_blocks} blocks, the backbone has {depth}")

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``: weight, bias) and its ``.json`` sidecar; returns the safetensors path."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise EvalError(f"head file {path} must end in .safetensors")
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
        info = {
            "format": HEAD_FORMAT,
            "version": HEAD_FORMAT_VERSION,
            "n_last_blocks": self.n_blocks,
            "pooling": self.pooling,
            "embed_dim": self.embed_dim,
            "feature_dim": int(self.weight.shape[1]),
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "image_size": self.image_size,
            **self.meta,
        }
        write_json_atomic(path.with_suffix(".json"), info)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        """Read a head written by :meth:`save`; errors name the file and the bad key."""
        from safetensors.torch import load_file

        path = Path(path)
        if path.suffix == ".json":
            path = path.with_suffix(".safetensors")
        info_path = path.with_suffix(".json")
        for p in (path, info_path):
            if not p.is_file():
                raise EvalError(f"linear head file {p} does not exist (run `fastdinov2 eval linear` first)")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"linear head description {info_path} is not valid JSON: {e}") from e
        if info.get("format") != HEAD_FORMAT:
            raise EvalError(f"{info_path} is not a linear head description (format={info.get('format')!r})")
        for key in ("n_last_blocks", "pooling", "embed_dim", "classes", "image_size"):
            if key not in info:
                raise EvalError(f"linear head description {info_path} lacks key {key!r}")
        if info["pooling"] not in POOLINGS:
            raise EvalError(f"{info_path}: pooling {info['pooling']!r} is not one of {list(POOLINGS)}")
        tensors = load_file(str(path))
        if set(tensors) != {"weight", "bias"}:
            raise EvalError(f"linear head {path} must hold exactly 'weight' and 'bias', found {sorted(tensors)}")
        weight, bias = tensors["weight"].float(), tensors["bias"].float()
        avgpool = info["pooling"] == "cls+avgpool"
        in_dim = linear_input_dim(int(info["embed_dim"]), int(info["n_last_blocks"]), avgpool)
        n_cls = len(info["classes"])
        if tuple(weight.shape) != (n_cls, in_dim) or tuple(bias.shape) != (n_cls,):
            raise EvalError(
                f"linear head {path}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match "
                f"{n_cls} classes and input width {in_dim} from {info_path}"
            )
        meta = {k: v for k, v in info.items() if k not in
                ("format", "version", "n_last_blocks", "pooling", "embed_dim", "feature_dim", "num_classes",
                 "classes", "image_size")}
        return cls(weight, bias, int(info["n_last_blocks"]), avgpool, int(info["embed_dim"]),
                   list(info["classes"]), int(info["image_size"]), meta)


def _depth(model: Any) -> int:
    """Number of transformer blocks of a backbone (``n_blocks``, else ``len(blocks)``)."""
    return int(model.n_blocks) if hasattr(model, "n_blocks") else len(model.blocks)


def _topk_correct(logits: Tensor, labels: Tensor, k: int) -> tuple[int, int]:
    """(# top-1 correct, # top-k correct) for ``logits [..., N, C]`` (leading dims summed)."""
    k = min(k, logits.shape[-1])
    pred = logits.topk(k, dim=-1).indices
    target = labels.view(*([1] * (logits.dim() - 2)), -1, 1)
    return int((pred[..., :1] == target).sum()), int((pred == target).any(dim=-1).sum())


def _group_specs(specs: Sequence[HeadSpec]) -> dict[tuple[int, bool], list[int]]:
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((s.n_blocks, s.avgpool), []).append(i)
    return groups


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into (train, holdout): per class, ``ceil(fraction * n_c)`` random samples are held out
    (none when the class has a single sample). Deterministic in ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise EvalError(f"val fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    train_idx, hold_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).view(-1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_hold = math.ceil(fraction * len(idx)) if len(idx) > 1 else 0
        hold_idx.append(idx[:n_hold])
        train_idx.append(idx[n_hold:])
    return torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(hold_idx)).values


def train_linear_heads(
    feats: Tensor,
    labels: Tensor,
    specs: Sequence[HeadSpec],
    *,
    embed_dim: int,
    extracted_blocks: int,
    num_classes: int,
    epochs: int = 10,
    iterations: int | None = None,
    batch_size: int = 128,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool = False,
    init: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Train every head of ``specs`` on ``feats [N, (extracted_blocks + 1) * D]`` / ``labels [N]``.

    All heads see the same mini-batches (a fresh seeded permutation per epoch, last batch smaller). Heads
    reading the same input are stacked into one ``[H, C, F]`` weight; plain SGD with momentum (PyTorch
    semantics, weight decay 0) and a cosine schedule ``lr_h * 0.5 * (1 + cos(pi * t / T))``.
    ``init``: starting ``(weight, bias)`` per head (default ``N(0, 0.01)`` weights from ``seed``, zero bias).
    Returns ``[(weight [C, F], bias [C]), ...]`` in ``specs`` order, on ``feats.device``.
    """
    n = feats.shape[0]
    if n == 0:
        raise EvalError("no training samples for the linear probe")
    if batch_size < 1:
        raise EvalError(f"the linear heads' batch size must be >= 1, got {batch_size}")
    steps_per_epoch = math.ceil(n / batch_size)
    total = iterations if iterations is not None else epochs * steps_per_epoch
    if total < 1:
        raise EvalError(f"the linear probe needs at least one iteration (epochs={epochs}, iterations={iterations})")
    dev = feats.device
    if init is not None and len(init) != len(specs):
        raise ValueError(f"init has {len(init)} heads, specs {len(specs)}")
    gen = torch.Generator().manual_seed(seed)
    groups = _group_specs(specs)
    params: dict[tuple[int, bool], tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = {}
    for (nb, avg), idx in groups.items():
        width = linear_input_dim(embed_dim, nb, avg)
        w0 = torch.randn(len(idx), num_classes, width, generator=gen) * 0.01
        b0 = torch.zeros(len(idx), num_classes)
        if init is not None:
            w0 = torch.stack([init[i][0].detach().float().cpu() for i in idx])
            b0 = torch.stack([init[i][1].detach().float().cpu() for i in idx])
        w = w0.to(dev).requires_grad_()
        b = b0.to(dev).requires_grad_()
        lrs = torch.tensor([specs[i].lr_scaled for i in idx], device=dev)
        params[(nb, avg)] = (w, b, torch.zeros_like(w), torch.zeros_like(b), lrs)
    labels = labels.to(dev)

    step = 0
    bar = tqdm(total=total, desc="linear heads", unit="it", disable=not progress, leave=False)
    epoch = 0
    while step < total:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)).to(dev)
        for start in range(0, n, batch_size):
            if step >= total:
                break
            bidx = perm[start : start + batch_size]
            x_all, y = feats[bidx], labels[bidx]
            factor = 0.5 * (1.0 + math.cos(math.pi * step / total))
            for (nb, avg), (w, b, w_buf, b_buf, lrs) in params.items():
                x = select_linear_input(x_all, embed_dim, extracted_blocks, nb, avg)
                logits = torch.einsum("bf,hcf->hbc", x, w) + b[:, None, :]  # [H, B, C]
                # mean CE per head, summed over heads: each head gets exactly its own gradient
                loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(w.shape[0]), reduction="sum")
                loss = loss / y.shape[0]
                gw, gb = torch.autograd.grad(loss, (w, b))
                with torch.no_grad():
                    w_buf.mul_(momentum).add_(gw)
                    b_buf.mul_(momentum).add_(gb)
                    w.sub_(w_buf * (lrs * factor).view(-1, 1, 1))
                    b.sub_(b_buf * (lrs * factor).view(-1, 1))
            step += 1
            bar.update(1)
        epoch += 1
    bar.close()

    out: list[tuple[Tensor, Tensor] | None] = [None] * len(specs)
    for key, idx in groups.items():
        w, b = params[key][0].detach(), params[key][1].detach()
        for j, i in enumerate(idx):
            out[i] = (w[j].clone(), b[j].clone())
    return [o for o in out if o is not None]


@torch.no_grad()
def evaluate_heads(
    heads: Sequence[tuple[Tensor, Tensor]],
    specs: Sequence[HeadSpec],
    feats: Tensor,
    labels: Tensor,
    *,
    embed_dim: int,
    extracted_blocks: int,
    chunk: int = 4096,
) -> list[tuple[float, float]]:
    """Top-1 / top-5 accuracy (percent; top-5 capped at the class count) of every head on ``feats``."""
    n = feats.shape[0]
    if n == 0:
        raise EvalError("no evaluation samples for the linear probe")
    labels = labels.to(feats.device)
    out = []
    for (w, b), s in zip(heads, specs, strict=True):
        c1 = c5 = 0
        for start in range(0, n, chunk):
            x = select_linear_input(feats[start : start + chunk], embed_dim, extracted_blocks, s.n_blocks, s.avgpool)
            a, b5 = _topk_correct(x @ w.T + b, labels[start : start + chunk], 5)
            c1, c5 = c1 + a, c5 + b5
        out.append((100.0 * c1 / n, 100.0 * c5 / n))
    return out


def train_linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor | None,
    val_labels: Tensor | None,
    *,
    embed_dim: int,
    extracted_blocks: int,
    num_classes: int,
    learning_rates: Sequence[float] = LEARNING_RATES,
    n_last_blocks_list: Sequence[int] = N_LAST_BLOCKS,
    poolings: Sequence[str] = POOLINGS,
    epochs: int = 10,
    iterations: int | None = None,
    head_batch_size: int = 128,
    val_from_train: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict, int, list[HeadSpec], list[tuple[Tensor, Tensor]]]:
    """Train the grid on precomputed ``"blocks"`` features and pick the best head.

    Selection uses ``val`` (default) or a stratified hold-out of ``train`` (``val_from_train``; the heads are
    then trained on the rest). Reported ``top1``/``top5`` are on ``val`` when given, else on the hold-out.
    Returns ``(results, best_index, specs, heads)``; ``results`` has ``heads`` (one entry per head: name,
    n_last_blocks, pooling, lr, lr_scaled, selection_top1, top1, top5), ``best`` (one of those entries),
    ``selection_split``, ``evaluation_split``, ``num_train``, ``num_selection``, ``num_eval``.
    """
    specs = head_grid(extracted_blocks, learning_rates, n_last_blocks_list, poolings, head_batch_size)
    if val_from_train:
        tr_idx, ho_idx = stratified_holdout(train_labels.cpu(), val_fraction, seed)
        if len(ho_idx) == 0:
            raise EvalError("val_from_train: no class has two or more training samples to hold out")
        fit_x, fit_y = train_feats[tr_idx.to(train_feats.device)], train_labels[tr_idx.to(train_labels.device)]
        sel_x, sel_y = train_feats[ho_idx.to(train_feats.device)], train_labels[ho_idx.to(train_labels.device)]
    else:
        if val_feats is None or val_labels is None:
            raise EvalError("the linear probe needs a val split (or val_from_train)")
        fit_x, fit_y, sel_x, sel_y = train_feats, train_labels, val_feats, val_labels
    heads = train_linear_heads(
        fit_x, fit_y, specs, embed_dim=embed_dim, extracted_blocks=extracted_blocks, num_classes=num_classes,
        epochs=epochs, iterations=iterations, batch_size=head_batch_size, seed=seed, progress=progress,
    )
    kw = {"embed_dim": embed_dim, "extracted_blocks": extracted_blocks}
    sel = evaluate_heads(heads, specs, sel_x, sel_y, **kw)
    if val_from_train and val_feats is not None and val_labels is not None:
        ev, eval_split, n_eval = evaluate_heads(heads, specs, val_feats, val_labels, **kw), "val", len(val_labels)
    else:
        ev, eval_split, n_eval = sel, ("train_holdout" if val_from_train else "val"), len(sel_y)
    entries = [
        {
            "name": s.name, "n_last_blocks": s.n_blocks, "pooling": s.pooling, "lr": s.lr,
            "lr_scaled": s.lr_scaled, "selection_top1": sel_acc[0], "top1": ev_acc[0], "top5": ev_acc[1],
        }
        for s, sel_acc, ev_acc in zip(specs, sel, ev, strict=True)
    ]
    best = max(range(len(specs)), key=lambda i: (sel[i][0], -i))  # first head of the grid on ties
    results = {
        "best": entries[best],
        "heads": entries,
        "selection_split": "train_holdout" if val_from_train else "val",
        "evaluation_split": eval_split,
        "num_train": int(fit_x.shape[0]),
        "num_selection": int(sel_x.shape[0]),
        "num_eval": int(n_eval),
        "num_classes": num_classes,
    }
    return results, best, specs, heads


def evaluate_linear(
    model: nn.Module,
    train_dir: str | Path,
    val_dir: str | Path | None,
    *,
    image_size: int = 224,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    learning_rates: Sequence[float] = LEARNING_RATES,
    n_last_blocks_list: Sequence[int] = N_LAST_BLOCKS,
    poolings: Sequence[str] = POOLINGS,
    epochs: int = 10,
    iterations: int | None = None,
    head_batch_size: int = 128,
    val_from_train: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    head_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Full linear probe from class folders: extract ``"blocks"`` features (eval transform at ``image_size``)
    for ``train_dir`` and ``val_dir``, train the grid, pick the best head and save it to ``head_path``
    (``.safetensors`` + ``.json``) when given. ``val_dir`` may be None only with ``val_from_train``.
    Returns :func:`train_linear_probe`'s results plus ``head_file``, ``feature_dim``, ``embed_dim``,
    ``extracted_blocks``, ``classes``."""
    dev = resolve_device(device)
    depth = _depth(model)
    embed_dim = int(getattr(model, "embed_dim", 0))
    # bad settings fail here, not after the features are extracted
    if head_batch_size < 1:
        raise EvalError(f"the linear heads' batch size must be >= 1, got {head_batch_size}")
    if (epochs if iterations is None else iterations) < 1:
        raise EvalError(f"the linear probe needs at least one iteration (epochs={epochs}, iterations={iterations})")
    if val_from_train and not 0.0 < val_fraction < 1.0:
        raise EvalError(f"val fraction must be in (0, 1), got {val_fraction}")
    head_grid(depth, learning_rates, n_last_blocks_list, poolings, head_batch_size)
    extracted = min(max(int(n) for n in n_last_blocks_list), depth)
    transform = make_eval_transform(image_size)
    settings = EvalTransformSettings.for_size(image_size).to_dict()
    train_ds = open_class_folder(train_dir, transform)
    val_ds = None
    if val_dir is not None:
        val_ds = open_class_folder(val_dir, transform)
        check_same_classes(train_ds.classes, val_ds.classes, val_dir, f"the training classes of {train_dir}")
    elif not val_from_train:
        raise EvalError("evaluate_linear: val_dir is None; pass a val folder or use val_from_train")

    def _extract(ds: Any, name: str) -> tuple[Tensor, Tensor]:
        cache_path = key = None
        if cache_dir is not None:
            key = feature_cache_key(checkpoint, ds, settings, "blocks", extracted,
                                    model=model if checkpoint is None else None)
            cache_path = Path(cache_dir) / f"linear_{name}_{key[:16]}.safetensors"
        return extract_features(
            model, ds, batch_size, num_workers=num_workers, device=dev, kind="blocks", n_last_blocks=extracted,
            cache_path=cache_path, cache_key=key, progress=progress, desc=f"linear {name} features",
        )

    tr_x, tr_y = _extract(train_ds, "train")
    va_x = va_y = None
    if val_ds is not None:
        va_x, va_y = _extract(val_ds, "val")
        va_x, va_y = va_x.to(dev), va_y.to(dev)
    results, best, specs, heads = train_linear_probe(
        tr_x.to(dev), tr_y.to(dev), va_x, va_y, embed_dim=embed_dim, extracted_blocks=extracted,
        num_classes=len(train_ds.classes), learning_rates=learning_rates, n_last_blocks_list=n_last_blocks_list,
        poolings=poolings, epochs=epochs, iterations=iterations, head_batch_size=head_batch_size,
        val_from_train=val_from_train, val_fraction=val_fraction, seed=seed, progress=progress,
    )
    spec = specs[best]
    head = LinearHead(
        heads[best][0].cpu(), heads[best][1].cpu(), spec.n_blocks, spec.avgpool, embed_dim, list(train_ds.classes),
        image_size,
        meta={
            "lr": spec.lr, "lr_scaled": spec.lr_scaled, "name": spec.name,
            "selection_top1": results["best"]["selection_top1"], "top1": results["best"]["top1"],
            "selection_split": results["selection_split"], "transform": settings,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            **(checkpoint_identity(checkpoint) if checkpoint is not None else {}),
            "train_dir": str(train_dir),
        },
    )
    results["head_file"] = str(head.save(head_path)) if head_path is not None else None
    results["feature_dim"] = linear_input_dim(embed_dim, spec.n_blocks, spec.avgpool)
    results["embed_dim"] = embed_dim
    results["extracted_blocks"] = extracted
    results["classes"] = list(train_ds.classes)
    results["image_size"] = image_size
    return results


@torch.no_grad()
def evaluate_head(
    model: nn.Module,
    head: LinearHead,
    dataset: Any,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    batch_transform: Any = None,
    progress: bool = True,
    desc: str = "linear head",
    head_file: str | Path = "<head>",
) -> dict:
    """Top-1/top-5 (percent) of ``head`` on a labelled dataset whose ``classes`` equal the head's.

    ``dataset`` items are ``(image tensor, label)``; labels index ``dataset.classes``. Returns
    ``{"top1", "top5", "num_images"}``.
    """
    head.check_model(model, head_file)
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise EvalError(f"dataset {type(dataset).__name__} has no `classes`; cannot match it to head {head_file}")
    where = getattr(dataset, "root", type(dataset).__name__)
    check_same_classes(head.classes, classes, where, f"the classes of head {head_file}")
    feats, labels = extract_features(
        model, dataset, batch_size, num_workers=num_workers, device=device, kind="blocks",
        n_last_blocks=head.n_blocks, progress=progress, batch_transform=batch_transform, desc=desc,
    )
    if feats.shape[0] == 0:
        raise EvalError(f"dataset {where} is empty")
    top1, top5 = _topk_correct(head.logits(feats, head.n_blocks), labels, 5)
    n = feats.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "num_images": n}


def apply_linear_head(
    model: nn.Module,
    head_file: str | Path,
    dataset: Any,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """Top-1 accuracy (percent) of a saved head on ``dataset``: a class-folder path (read with the head's eval
    transform) or a dataset with ``classes``. :class:`EvalError` names the path when its classes differ."""
    head = LinearHead.load(head_file)
    if isinstance(dataset, str | Path):
        dataset = open_class_folder(dataset, make_eval_transform(head.image_size))
    res = evaluate_head(model, head, dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                        progress=progress, head_file=head_file)
    return float(res["top1"])
