"""Collate pre-training samples of one curriculum stage into a crop-major :class:`TrainBatch`.

Crop-major ordering (as DINOv2): ``global_crops = [crop 1 of samples 0..B-1; crop 2 of samples 0..B-1]``,
``local_crops = [local 1 of all samples; local 2 of all samples; ...]``; ``masks`` rows follow
``global_crops``. ``mask_indices`` are the flat indices (into ``masks.flatten()``, i.e. [2B * N]) of the
masked tokens, ``masks_weight[m] = 1 / (number of masked tokens in the image of token m)``, so every
masked image has the same total weight in the iBOT loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fastdinov2.data.augment import N_GLOBAL_CROPS
from fastdinov2.data.photometric import DenseFn, PhotometricParams, apply_photometric
from fastdinov2.data.pretrain import BadSample, PhotometricOn, PretrainSample, StageShape


@dataclass
class TrainBatch:
    """A batch of B samples of one stage (B may be 0 when every sample was bad)."""

    global_crops: torch.Tensor  # [2B, 3, G, G] float32 (normalised) | uint8 (photometric pending)
    local_crops: torch.Tensor  # [nL*B, 3, L, L]
    masks: torch.Tensor  # bool [2B, N], N = grid_h * grid_w
    mask_indices: torch.Tensor  # int64 [M'] (M' >= M when padded to compute.masked_tokens_bucket)
    masks_weight: torch.Tensor  # float32 [M'], 0 for padding rows
    n_masked_patches: int  # M, the real masked tokens (the first M rows)
    labels: torch.Tensor  # int64 [B]
    sample_keys: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B] dataset indices
    stage: int
    global_size: int
    local_size: int
    mask_grid: tuple[int, int]
    photometric_on: PhotometricOn = "worker"
    global_params: PhotometricParams | None = None  # [2B] crops, crop-major (device mode)
    local_params: PhotometricParams | None = None  # [nL*B] crops, crop-major (device mode)
    bad_samples: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): dropped or replaced

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def photometric_pending(self) -> bool:
        """True while the crops are uint8 and :meth:`with_photometric` still has to run."""
        return self.global_params is not None

    def _map_tensors(self, fn, params_fn=None) -> TrainBatch:  # type: ignore[no-untyped-def]
        """``fn`` applied to every tensor; the photometric parameters go through ``params_fn`` (default:
        ``fn`` on each of their tensors)."""
        changes: dict[str, Any] = {}
        for name in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "labels",
                     "sample_keys", "indices"):
            changes[name] = fn(getattr(self, name))
        for name in ("global_params", "local_params"):
            p = getattr(self, name)
            changes[name] = None if p is None else (params_fn(p) if params_fn is not None else p._map(fn))
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TrainBatch:
        """A copy with every tensor (and the photometric parameters) on ``device``. The blur kernel sizes stay
        on the CPU (:meth:`PhotometricParams.to`): the host sets the blur's shape from them, and reading them
        back from a GPU would be a host synchronisation in every step (seen on an H100 by the ``gpu`` test)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking),
                                 lambda p: p.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TrainBatch:
        """Pinned copy (DataLoader(pin_memory=True) calls this)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def with_photometric(self, dense_fn: DenseFn | None = None) -> TrainBatch:
        """Apply the pending photometric augmentation where the crops are (e.g. on the GPU).

        Returns a batch with normalised float32 crops; a batch without pending parameters is returned as is.
        ``dense_fn``: see :func:`~fastdinov2.data.photometric.apply_photometric`.
        """
        if self.global_params is None or self.local_params is None:
            return self
        return replace(
            self,
            global_crops=apply_photometric(self.global_crops, self.global_params, dense_fn=dense_fn),
            local_crops=apply_photometric(self.local_crops, self.local_params, dense_fn=dense_fn),
            global_params=None,
            local_params=None,
        )


def mask_index_weights(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """masks bool [R, N] -> (flat indices [M] of True entries, weights [M] = 1 / True-count of their row)."""
    flat = masks.flatten().nonzero().flatten()
    per_row = masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    weight = (1.0 / per_row).unsqueeze(-1).expand_as(masks)[masks]
    return flat, weight


def pad_masked_tokens(
    mask_indices: torch.Tensor, masks_weight: torch.Tensor, bucket: int, at_least: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``mask_indices [M]`` / ``masks_weight [M]`` with rows (index 0, weight 0) up to the next multiple
    of ``bucket`` (at least one bucket) at or above ``max(M, at_least)``, so a compiled step sees few distinct
    shapes (with ``at_least`` the batch masking's upper bound: one). ``bucket <= 0``: as is.

    Padding rows carry weight 0, so they add nothing to the iBOT loss or its gradients, and the centre
    update leaves them out (``masks_weight > 0`` marks the real rows).
    """
    if bucket <= 0:
        return mask_indices, masks_weight
    m = int(mask_indices.numel())
    pad = max(1, -(-max(m, at_least) // bucket)) * bucket - m
    return (torch.cat([mask_indices, mask_indices.new_zeros(pad)]),
            torch.cat([masks_weight, masks_weight.new_zeros(pad)]))


def _crop_major(per_sample: list[torch.Tensor]) -> torch.Tensor:
    """B tensors [k, ...] -> [k*B, ...] ordered crop-major."""
    t = torch.stack(per_sample)  # [B, k, ...]
    return t.transpose(0, 1).reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _empty_batch(shape: StageShape | None, bad: list[tuple[str, str]]) -> TrainBatch:
    if shape is None:
        shape = StageShape(-1, 0, 0, 0, (0, 0), "worker")
    dtype = torch.float32 if shape.photometric_on == "worker" else torch.uint8
    n = shape.mask_grid[0] * shape.mask_grid[1]
    empty_long = torch.zeros(0, dtype=torch.int64)
    return TrainBatch(
        global_crops=torch.zeros(0, 3, shape.global_size, shape.global_size, dtype=dtype),
        local_crops=torch.zeros(0, 3, shape.local_size, shape.local_size, dtype=dtype),
        masks=torch.zeros(0, n, dtype=torch.bool),
        mask_indices=empty_long,
        masks_weight=torch.zeros(0),
        n_masked_patches=0,
        labels=empty_long,
        sample_keys=empty_long.clone(),
        indices=empty_long.clone(),
        stage=shape.stage,
        global_size=shape.global_size,
        local_size=shape.local_size,
        mask_grid=shape.mask_grid,
        photometric_on=shape.photometric_on,
        bad_samples=bad,
    )


def collate_train(samples: list[PretrainSample | BadSample], masked_bucket: int = 0) -> TrainBatch:
    """Collate one stage's samples; :class:`BadSample` markers are dropped and listed in ``bad_samples``,
    and so are the bad files a sample was drawn again for (its ``replaced`` list).

    ``masked_bucket > 0`` pads the masked-token rows to a multiple of it (:func:`pad_masked_tokens`), with batch
    masks at or above their upper bound (:meth:`BatchMaskSpec.upper_bound`, DINOv2's ``upperbound``), so every
    batch of a stage has one shape; ``n_masked_patches`` stays the number of real masked tokens. When the stage
    masks per batch (``StageShape.batch_masks``, ``ibot.mask_sampling="batch"``) the masks of the good samples'
    global crops are drawn here, from the run seed and their sample keys.

    Raises ValueError if the samples come from different stages (naming them).
    """
    good: list[PretrainSample] = []
    bad: list[tuple[str, str]] = []
    shapes: set[StageShape] = set()
    for s in samples:
        if isinstance(s, BadSample):
            bad.append((s.path, s.reason))
            if s.shape is not None:
                shapes.add(s.shape)
        else:
            good.append(s)
            shapes.add(s["shape"])
            bad.extend(s.get("replaced", ()))  # bad files this sample was drawn again for
    if len(shapes) > 1:
        desc = ", ".join(sorted(f"stage {sh.stage} ({sh.global_size}/{sh.local_size}, {sh.photometric_on})"
                                for sh in shapes))
        raise ValueError(f"collate_train: a batch must hold samples of one stage, got {desc}")
    shape = next(iter(shapes)) if shapes else None
    if not good:
        return _empty_batch(shape, bad)
    assert shape is not None
    bound = 0
    if shape.batch_masks is not None:  # ibot.mask_sampling="batch": DINOv2's masking of the whole micro-batch
        keys = [s["sample_key"] for s in good]
        masks = torch.from_numpy(shape.batch_masks.draw(shape.mask_grid, keys, N_GLOBAL_CROPS * len(good)))
        # padded to the stage's upper bound: one shape per stage and batch size, the same on every rank
        bound = shape.batch_masks.upper_bound(shape.mask_grid, N_GLOBAL_CROPS * len(good))
    else:
        masks = _crop_major([s["masks"] for s in good])  # type: ignore[misc]
    mask_indices, masks_weight = mask_index_weights(masks)
    n_masked = int(mask_indices.numel())
    mask_indices, masks_weight = pad_masked_tokens(mask_indices, masks_weight, masked_bucket, at_least=bound)
    device_mode = shape.photometric_on == "device"
    gparams = lparams = None
    if device_mode:
        gparams = PhotometricParams.stack_crop_major([s["global_params"] for s in good])  # type: ignore[misc]
        lparams = PhotometricParams.stack_crop_major([s["local_params"] for s in good])  # type: ignore[misc]
    return TrainBatch(
        global_crops=_crop_major([s["global_crops"] for s in good]),
        local_crops=_crop_major([s["local_crops"] for s in good]),
        masks=masks,
        mask_indices=mask_indices,
        masks_weight=masks_weight,
        n_masked_patches=n_masked,
        labels=torch.tensor([s["label"] for s in good], dtype=torch.int64),
        sample_keys=torch.tensor([s["sample_key"] for s in good], dtype=torch.int64),
        indices=torch.tensor([s["index"] for s in good], dtype=torch.int64),
        stage=shape.stage,
        global_size=shape.global_size,
        local_size=shape.local_size,
        mask_grid=shape.mask_grid,
        photometric_on=shape.photometric_on,
        global_params=gparams,
        local_params=lparams,
        bad_samples=bad,
    )
