"""The pre-training dataset: one request ``(index, sample_key, stage)`` -> that stage's crops of one image.

Nothing here is mutated during training. The dataset holds the immutable stage list of
``cfg.curriculum.stages``; the sampler decides, per request, which stage a sample belongs to (the
curriculum is a pure function of the global step), so data-loader workers never need to be told about a
stage switch. All randomness of a sample comes from ``(seed, sample_key)`` (:func:`.augment.sample_rngs`).

Per sample: decode (reduced-scale JPEG decode for ``jpeg_draft``) -> noise patching on the whole image
(the stage's ``noise``) -> 2 global + ``crops.local_crops_number`` local crops at the stage's sizes
(uint8) -> iBOT masks of the global crops on the stage's patch grid (``ibot.mask_sampling="sample"``; with
``"batch"`` the collate function masks the whole batch) -> photometric parameters, applied
here (``photometric_on="worker"``: normalised float crops) or later on the device
(``photometric_on="device"``: uint8 crops plus :class:`.photometric.PhotometricParams`).

A file that cannot be decoded is never an exception. With ``on_bad="replace"`` (the trainer's default,
``data.on_bad_sample``) the sample is drawn again from another image, chosen from ``(seed, sample_key,
attempt)``, and the returned sample lists the bad file in ``replaced``; batches keep their size, so every
rank's micro-batch has the same shape (no desynchronised collectives, no recompiled or re-recorded CUDA
graph). With ``on_bad="drop"``, or when :data:`REPLACEMENT_TRIES` further images are bad too, a
:class:`BadSample` marker is returned and the batch shrinks. Either way the collate function lists the bad
files and the trainer counts them against ``data.max_bad_samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from fastdinov2.config import Config, CropsConfig, IbotConfig, StageConfig
from fastdinov2.data.augment import N_GLOBAL_CROPS, multicrop, sample_rngs
from fastdinov2.data.datasets import BadImageError, ImageRecord
from fastdinov2.data.lowpass import decode_image
from fastdinov2.data.masking import BatchMaskSpec, sample_ibot_masks
from fastdinov2.data.noise_patch import NoisePatchRecord, apply_noise_patch
from fastdinov2.data.photometric import (
    CropKind,
    PhotometricParams,
    apply_photometric,
    sample_crops_photometric_params,
)

PhotometricOn = Literal["worker", "device"]
OnBadSample = Literal["replace", "drop"]
Request = tuple[int, int, int]  # (index into records, sample_key, stage index)

_REPLACEMENT_STREAM = 0x5EB1AC  # keeps replacement draws apart from the augmentation streams of a sample

#: How many other images ``on_bad="replace"`` tries before it gives up and returns a :class:`BadSample`.
REPLACEMENT_TRIES = 8


@dataclass(frozen=True)
class StageShape:
    """What a batch of one stage looks like (known even when every sample of the batch is bad)."""

    stage: int
    global_size: int
    local_size: int
    n_local_crops: int
    mask_grid: tuple[int, int]
    photometric_on: PhotometricOn
    # ibot.mask_sampling="batch": the collate function draws the masks of the whole batch (samples carry none)
    batch_masks: BatchMaskSpec | None = None


@dataclass(frozen=True)
class BadSample:
    """Marker returned for an image that could not be decoded."""

    path: str
    reason: str
    index: int = -1
    sample_key: int = -1
    shape: StageShape | None = None


class PretrainSample(TypedDict):
    """One sample's crops. Float crops are ImageNet-normalised (worker) or uint8 (device)."""

    index: int
    sample_key: int
    label: int
    path: str
    shape: StageShape
    global_crops: torch.Tensor  # [2, 3, G, G] float32 | uint8
    local_crops: torch.Tensor  # [nL, 3, L, L] float32 | uint8
    masks: torch.Tensor | None  # bool [2, N], N = (G / patch)^2, row-major; None: drawn per batch (collate)
    global_params: PhotometricParams | None  # 2 crops (device mode only)
    local_params: PhotometricParams | None  # nL crops (device mode only)
    noise: NoisePatchRecord
    replaced: list[tuple[str, str]]  # (path, reason) of bad files this sample stands in for, in order tried


def stage_shape(cfg: Config, stage: int, photometric_on: PhotometricOn, seed: int = 0) -> StageShape:
    """The batch shape of ``stage``; ``seed`` (the run seed) seeds the batch masking (``ibot.mask_sampling``)."""
    st = cfg.curriculum.stages[stage]
    grid = st.global_size // cfg.student.patch_size
    batch_masks = BatchMaskSpec.from_config(cfg.ibot, seed) if cfg.ibot.mask_sampling == "batch" else None
    return StageShape(stage, st.global_size, st.local_size, cfg.crops.local_crops_number, (grid, grid),
                      photometric_on, batch_masks)


class PretrainDataset(Dataset):
    """Multi-crop pre-training samples of ``records`` for the curriculum stages of ``cfg``.

    ``dataset[(index, sample_key, stage)]`` -> :class:`PretrainSample` or :class:`BadSample`.
    ``sample_key`` is any non-negative int unique per draw of a sample (e.g. its position in the data
    stream); ``stage`` indexes ``cfg.curriculum.stages``. ``on_bad`` says what an undecodable file gives
    (module docstring).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        cfg: Config,
        seed: int,
        photometric_on: PhotometricOn = "worker",
        on_bad: OnBadSample = "drop",
    ) -> None:
        if photometric_on not in ("worker", "device"):
            raise ValueError(f"photometric_on must be 'worker' or 'device', got {photometric_on!r}")
        if on_bad not in ("replace", "drop"):
            raise ValueError(f"on_bad must be 'replace' or 'drop', got {on_bad!r}")
        self.on_bad: OnBadSample = on_bad
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.records: tuple[ImageRecord, ...] = tuple(records)
        self.stages: tuple[StageConfig, ...] = tuple(cfg.curriculum.stages)
        self.crops: CropsConfig = cfg.crops
        self.ibot: IbotConfig = cfg.ibot
        self.seed = int(seed)
        self.photometric_on: PhotometricOn = photometric_on
        self.shapes = tuple(stage_shape(cfg, i, photometric_on, self.seed) for i in range(len(self.stages)))
        n_local = self.crops.local_crops_number
        kinds: list[CropKind] = ["global1", "global2", *(["local"] * n_local)]
        self._crop_kinds = tuple(kinds)  # photometric parameters: all crops of a sample in one draw
        self._crop_scales = tuple(
            (st.global_size / self.crops.global_crops_size,) * N_GLOBAL_CROPS
            + (st.local_size / self.crops.local_crops_size,) * n_local
            for st in self.stages
        )

    def __len__(self) -> int:
        return len(self.records)

    def _parse(self, request: Request) -> tuple[int, int, int]:
        try:
            index, key, stage = (int(v) for v in request)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"PretrainDataset expects (index, sample_key, stage) requests, got {request!r}") from exc
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} images")
        if not 0 <= stage < len(self.stages):
            raise IndexError(f"stage {stage} out of range: the curriculum has {len(self.stages)} stages")
        if key < 0:
            raise ValueError(f"sample_key must be non-negative, got {key}")
        return index, key, stage

    def replacement_index(self, index: int, sample_key: int, attempt: int) -> int:
        """The image tried instead of a bad one: any image but ``index``, drawn from ``(seed, sample_key,
        attempt)`` (so the same in every worker, rank and resumed run)."""
        n = len(self.records)
        if n < 2:
            return index
        draw = int(np.random.default_rng([self.seed, sample_key, _REPLACEMENT_STREAM, attempt]).integers(n - 1))
        return draw + int(draw >= index)  # uniform over the other n - 1 images

    def __getitem__(self, request: Request) -> PretrainSample | BadSample:  # type: ignore[override]
        requested, key, stage = self._parse(request)
        index = requested
        st, shape, crops = self.stages[stage], self.shapes[stage], self.crops
        ratio = max(st.global_size / crops.global_crops_size, st.local_size / crops.local_crops_size)
        replaced: list[tuple[str, str]] = []
        tries = REPLACEMENT_TRIES if self.on_bad == "replace" else 0
        for attempt in range(tries + 1):
            record = self.records[index]
            try:
                decoded = decode_image(record.path, st.lowpass, ratio)
                break
            except BadImageError as exc:
                replaced.append((str(record.path), str(getattr(exc, "reason", None) or exc)))
                if attempt == tries or len(self.records) < 2:
                    first_path, first_reason = replaced[0]
                    more = f" (and {len(replaced) - 1} replacement(s) tried, all bad)" if len(replaced) > 1 else ""
                    return BadSample(first_path, first_reason + more, requested, key, shape)
                index = self.replacement_index(requested, key, attempt)
        rngs = sample_rngs(self.seed, key)

        noise = NoisePatchRecord("none", False)
        if st.noise.kind != "none":
            decoded = decoded.with_pixels()  # one writable copy, patched in place
            assert decoded.pixels is not None
            _, noise = apply_noise_patch(decoded.pixels, st.noise, rngs.noise, inplace=True)

        views = multicrop(decoded, crops, st, rngs.geometry)
        masks = (None if shape.batch_masks is not None  # drawn for the whole batch by collate_train
                 else torch.from_numpy(sample_ibot_masks(rngs.masks, shape.mask_grid, self.ibot, N_GLOBAL_CROPS)))

        n_local = crops.local_crops_number
        params = sample_crops_photometric_params(
            rngs.photometric, self._crop_kinds, self._crop_scales[stage]
        )
        gparams = params.select(slice(0, N_GLOBAL_CROPS))
        lparams = params.select(slice(N_GLOBAL_CROPS, N_GLOBAL_CROPS + n_local))
        gcrops, lcrops = views.global_crops, views.local_crops
        if self.photometric_on == "worker":
            gcrops = apply_photometric(gcrops, gparams)
            lcrops = apply_photometric(lcrops, lparams)
            keep_g, keep_l = None, None
        else:
            keep_g, keep_l = gparams, lparams
        return PretrainSample(
            index=index,
            sample_key=key,
            label=int(record.label),
            path=str(record.path),
            shape=shape,
            global_crops=gcrops,
            local_crops=lcrops,
            masks=masks,
            global_params=keep_g,
            local_params=keep_l,
            noise=noise,
            replaced=replaced,
        )
