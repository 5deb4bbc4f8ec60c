"""Feature extraction shared by the evaluation protocols (kNN, linear probe, corruption, frequency).

:func:`extract_features` runs a frozen backbone over a dataset (no grad, eval mode, batched, tqdm
progress bar) and returns ``(features [N, F], labels [N])`` on the CPU. Feature kinds:

- ``"cls"``: the normed CLS token of the last block, ``[N, D]`` (kNN, retrieval);
- ``"patch_mean"``: the mean of the last block's normed patch tokens, ``[N, D]``;
- ``"blocks"``: the DINOv2 linear-probe input of the last ``n`` blocks, ``[N, (n + 1) * D]``: the normed
  CLS tokens of blocks ``L-n+1 .. L`` (oldest first), then the mean normed patch token of block ``L``.
  :func:`select_linear_input` slices the input of a head that uses fewer blocks and/or no pooling.

In a process group (``fastdinov2.distributed.is_enabled()``) every rank extracts a strided shard
(``rank::world``) and the shards are assembled with a sum all-reduce, so every rank returns the full
result in dataset order.

Optional on-disk cache: a safetensors file holding ``features``/``labels`` and the cache key in its
metadata; it is reused only when the key matches. Keys come from :func:`feature_cache_key` (path, size and
modification time of the weights file(s) the checkpoint resolves to, the dataset's file list, transform
settings and feature kind) or, when not given, from a fingerprint of the model's weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from fastdinov2 import distributed
from fastdinov2.eval.results import EvalError, write_atomic

FeatureKind = Literal["cls", "patch_mean", "blocks"]
FEATURE_KINDS: tuple[str, ...] = ("cls", "patch_mean", "blocks")
CACHE_FORMAT_VERSION = 1


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} requested but CUDA is not available")
    return dev


def open_class_folder(root: str | Path, transform: Callable | None) -> Any:
    """A labelled class-folder dataset ``root/<class>/**/<image>`` (``ClassFolderDataset``): items are
    ``(transform(image), label)``; attributes ``records``, ``classes``, ``root``. Raises ``DataError`` naming
    the path when the folder is missing or empty."""
    from fastdinov2.data.datasets import ClassFolderDataset

    return ClassFolderDataset(root, transform)


def check_same_classes(expected: Sequence[str], found: Sequence[str], where: str | Path, expected_from: str) -> None:
    """Raise :class:`EvalError` unless ``found`` (class folders of ``where``) equals ``expected``."""
    if list(expected) == list(found):
        return
    exp, got = set(expected), set(found)
    missing, extra = sorted(exp - got), sorted(got - exp)

    def _few(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing classes: {_few(missing)}")
    if extra:
        parts.append(f"unexpected classes: {_few(extra)}")
    if not parts:
        parts.append("same class names in a different order")
    raise EvalError(
        f"the classes of {where} do not match {expected_from} ({len(found)} vs {len(expected)} classes; "
        + "; ".join(parts)
        + ")"
    )


def linear_input_dim(embed_dim: int, n_blocks: int, avgpool: bool) -> int:
    """Width of the DINOv2 linear-probe input: ``n_blocks * D`` (+ ``D`` with average pooling)."""
    return (n_blocks + int(avgpool)) * embed_dim


def select_linear_input(
    feats: Tensor, embed_dim: int, extracted_blocks: int, use_blocks: int, avgpool: bool
) -> Tensor:
    """Slice a head's input from ``"blocks"`` features.

    Args:
        feats: ``[N, (extracted_blocks + 1) * D]`` from ``extract_features(kind="blocks",
            n_last_blocks=extracted_blocks)``.
        use_blocks: how many of the last blocks' CLS tokens the head uses (``<= extracted_blocks``).
        avgpool: append the mean patch token of the last block.
    Returns:
        ``[N, (use_blocks + avgpool) * D]``: ``cat(cls_{L-use+1}, ..., cls_L[, mean patch_L])``.
    """
    d = embed_dim
    if feats.shape[1] != (extracted_blocks + 1) * d:
        raise ValueError(f"features have width {feats.shape[1]}, expected ({extracted_blocks} + 1) * {d}")
    if not 1 <= use_blocks <= extracted_blocks:
        raise ValueError(f"use_blocks={use_blocks} must be in 1..{extracted_blocks}")
    cls_part = feats[:, (extracted_blocks - use_blocks) * d : extracted_blocks * d]
    if not avgpool:
        return cls_part
    return torch.cat([cls_part, feats[:, extracted_blocks * d :]], dim=1)


def batch_features(model: Any, x: Tensor, kind: str = "cls", n_last_blocks: int = 1) -> Tensor:
    """Features of one batch ``x [B, 3, H, W]`` -> ``[B, F]`` (float32); see the module docstring."""
    if kind == "cls":
        return model.forward_features(x)["x_norm_clstoken"].float()
    if kind == "patch_mean":
        return model.forward_features(x)["x_norm_patchtokens"].mean(dim=1).float()
    if kind == "blocks":
        outs = model.get_intermediate_layers(x, n_last_blocks, return_class_token=True)
        cls_tokens = [cls for _, cls in outs]
        pooled = outs[-1][0].mean(dim=1)
        return torch.cat([*cls_tokens, pooled], dim=1).float()
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def _split_item(item: Any) -> tuple[Tensor, Tensor]:
    """A collated batch: ``(images, labels)`` or bare ``images`` (labels ``-1``)."""
    if isinstance(item, list | tuple):
        images, labels = item[0], item[1]
        return images, torch.as_tensor(labels, dtype=torch.long)
    return item, torch.full((item.shape[0],), -1, dtype=torch.long)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = torch.cuda.current_device
    return (a.index if a.index is not None else index()) == (b.index if b.index is not None else index())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes, dtypes, bytes); identifies weights for caching."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_file_list(dataset: Any) -> list[tuple[str, int]]:
    """``[(path, label), ...]`` of a dataset that exposes ``records`` (``ImageRecord``) or ``samples``."""
    if isinstance(dataset, Subset):
        inner = dataset_file_list(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if hasattr(dataset, "records"):
        return [(str(r.path), int(r.label)) for r in dataset.records]
    if hasattr(dataset, "samples"):
        return [(str(p), int(label)) for p, label in dataset.samples]
    raise EvalError(
        f"cannot build a feature-cache key for a {type(dataset).__name__}: it exposes neither `records` nor "
        "`samples`; pass cache_key explicitly"
    )


def checkpoint_weight_files(checkpoint: str | Path) -> list[Path]:
    """The file(s) :func:`fastdinov2.interop.read_backbone_weights` reads for ``checkpoint``, weights first.

    That file is :func:`fastdinov2.interop.resolve_backbone_file`'s; an export ``X.safetensors`` comes with its
    ``X.json`` when present. Everything else in a run directory (eval outputs, logs, older checkpoints) is not
    read, so it is not listed.
    """
    from fastdinov2.interop import BackboneLoadError, resolve_backbone_file

    p = Path(checkpoint)
    if not p.exists():
        raise EvalError(f"checkpoint {p} does not exist")
    try:
        p = resolve_backbone_file(p)
    except BackboneLoadError as exc:
        raise EvalError(f"checkpoint {exc}") from exc
    if p.suffix == ".safetensors":
        sidecar = p.with_suffix(".json")
        return [p, sidecar] if sidecar.is_file() else [p]
    return [p]


def checkpoint_identity(checkpoint: str | Path) -> dict[str, str | None]:
    """What a result or linear head records about its backbone besides the path given:
    ``checkpoint_resolved`` (the absolute path) and ``checkpoint_file`` (the absolute path of the weights file
    it resolves to, :func:`checkpoint_weight_files`; None when it does not resolve)."""
    p = Path(checkpoint)
    try:
        weights: str | None = str(checkpoint_weight_files(p)[0].resolve())
    except (EvalError, OSError):
        weights = None
    return {"checkpoint_resolved": str(p.resolve()), "checkpoint_file": weights}


def _path_stamp(path: Path) -> list:
    """Resolved path + size + mtime of every file the backbone is read from (:func:`checkpoint_weight_files`)."""
    out = []
    for f in checkpoint_weight_files(path):
        if not f.is_file():
            raise EvalError(f"checkpoint {path}: {f} does not exist")
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def feature_cache_key(
    checkpoint: str | Path | None,
    dataset: Any,
    transform_settings: dict,
    kind: str,
    n_last_blocks: int = 1,
    extra: dict | None = None,
    model: nn.Module | None = None,
) -> str:
    """Hex SHA-256 over (path + size + mtime of the weights file(s) ``checkpoint`` resolves to, or the model's
    weights when ``checkpoint`` is None),
    the dataset's ``(path, label)`` list, transform settings, feature kind, ``n_last_blocks`` and ``extra``."""
    if checkpoint is not None:
        source: Any = _path_stamp(Path(checkpoint))
    elif model is not None:
        source = model_fingerprint(model)
    else:
        raise ValueError("feature_cache_key needs a checkpoint path or a model")
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "source": source,
        "files": dataset_file_list(dataset),
        "transform": transform_settings,
        "kind": kind,
        "n_last_blocks": n_last_blocks if kind == "blocks" else None,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_cached_features(cache_path: str | Path, key: str) -> tuple[Tensor, Tensor] | None:
    """``(features, labels)`` from ``cache_path`` when it exists and its key matches, else ``None``."""
    from safetensors import safe_open

    path = Path(cache_path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            return f.get_tensor("features"), f.get_tensor("labels")
    except Exception as e:  # a truncated or foreign file: say so rather than silently recompute
        raise EvalError(f"feature cache {path} is unreadable ({e}); delete it to recompute") from e


def save_cached_features(cache_path: str | Path, key: str, feats: Tensor, labels: Tensor) -> Path:
    """Write ``features``/``labels`` with ``key`` in the metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {"features": feats.contiguous(), "labels": labels.contiguous()}
    return write_atomic(cache_path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": key}))


def _gather_rows(local: Tensor, local_rows: Tensor, n_total: int, device: torch.device) -> Tensor:
    """Assemble ``[n_total, F]`` from each rank's rows (``local [n_local, F]`` at ``local_rows``) with a
    sum all-reduce, in chunks of rows to bound device memory. Every rank gets the full tensor (CPU)."""
    width = local.shape[1]
    full = torch.zeros(n_total, width, dtype=local.dtype)
    full[local_rows] = local
    # NCCL reduces device tensors only; gloo reduces CPU tensors.
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    chunk = max(1, (1 << 24) // max(width, 1))
    for start in range(0, n_total, chunk):
        part = full[start : start + chunk].to(comm_device)
        distributed.all_reduce_sum(part)
        full[start : start + chunk] = part.cpu()
    return full


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 128,
    *,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    kind: str = "cls",
    n_last_blocks: int = 1,
    cache_path: str | Path | None = None,
    progress: bool = True,
    cache_key: str | None = None,
    batch_transform: Callable[[Tensor], Tensor] | None = None,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Run a frozen backbone over ``dataset``.

    Args:
        model: a backbone with ``forward_features`` / ``get_intermediate_layers`` (see ``models.vit``). It is
            put in eval mode and, if it lives elsewhere, moved to ``device``; its mode and device are restored.
        dataset: items ``(image [3, H, W], label)`` or bare ``image`` tensors (label -1).
        kind: ``"cls"`` | ``"patch_mean"`` | ``"blocks"`` (module docstring); ``n_last_blocks`` for ``"blocks"``.
        cache_path: safetensors file reused when its key matches ``cache_key`` (default key: a fingerprint of
            the weights, the dataset's file list and ``transform`` repr; not allowed with ``batch_transform``
            unless ``cache_key`` is given). Written by rank 0 only.
        batch_transform: applied on ``device`` to each image batch before the model (e.g. a Fourier filter
            followed by normalisation).
    Returns:
        ``(features [N, F] float32, labels [N] int64)`` on the CPU, in dataset order.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    depth = int(getattr(model, "n_blocks", n_last_blocks))
    if kind == "blocks" and not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks={n_last_blocks} must be in 1..{depth} (the model's depth)")
    dev = resolve_device(device)
    if cache_path is not None and cache_key is None:
        if batch_transform is not None:
            raise ValueError("extract_features: a cache with batch_transform needs an explicit cache_key")
        cache_key = feature_cache_key(
            None, dataset, {"transform": repr(getattr(dataset, "transform", None))}, kind, n_last_blocks,
            model=model,
        )
    rank, world = distributed.get_rank(), distributed.get_world_size()
    sharded = distributed.is_enabled() and world > 1
    if cache_path is not None:
        assert cache_key is not None
        cached = load_cached_features(cache_path, cache_key)
        found = cached is not None
        if sharded:  # extraction is collective: use the cache only if every rank found it
            hits = torch.tensor([float(found)], device=dev if dev.type == "cuda" else "cpu")
            found = int(distributed.all_reduce_sum(hits).item()) == world
        if found:
            assert cached is not None
            return cached

    n_total = len(dataset)
    indices = list(range(rank, n_total, world)) if sharded else list(range(n_total))
    subset = Subset(dataset, indices) if sharded else dataset
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False,
        pin_memory=dev.type == "cuda",
    )

    was_training = model.training
    home = _model_device(model)
    moved = home is not None and not _same_device(home, dev)
    if moved:
        model.to(dev)
    model.eval()
    feats_list: list[Tensor] = []
    labels_list: list[Tensor] = []
    try:
        bar = tqdm(loader, desc=desc, unit="batch", disable=not progress or rank != 0, leave=False)
        for item in bar:
            images, labels = _split_item(item)
            images = images.to(dev, non_blocking=True)
            if batch_transform is not None:
                images = batch_transform(images)
            feats_list.append(batch_features(model, images, kind, n_last_blocks).cpu())
            labels_list.append(labels)
        if not feats_list and n_total > 0:  # an empty shard (more ranks than samples): learn the width
            probe = _split_item(next(iter(DataLoader(dataset, batch_size=1))))[0].to(dev)
            if batch_transform is not None:
                probe = batch_transform(probe)
            feats_list.append(batch_features(model, probe, kind, n_last_blocks).cpu()[:0])
            labels_list.append(torch.zeros(0, dtype=torch.long))
    finally:
        model.train(was_training)
        if moved:
            model.to(home)

    if not feats_list:
        raise EvalError(f"dataset {getattr(dataset, 'root', type(dataset).__name__)} is empty")
    feats = torch.cat(feats_list)
    labels = torch.cat(labels_list)
    if sharded:
        rows = torch.tensor(indices, dtype=torch.long)
        feats = _gather_rows(feats, rows, n_total, dev)
        labels = _gather_rows(labels.view(-1, 1), rows, n_total, dev).view(-1)

    if cache_path is not None and distributed.is_main_process():
        assert cache_key is not None
        save_cached_features(cache_path, cache_key, feats, labels)
    return feats, labels
