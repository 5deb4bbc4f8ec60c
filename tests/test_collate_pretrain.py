"""Collation into crop-major TrainBatches, mask index/weight arithmetic, bad samples, DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastdinov2.config import Config, NoiseConfig, StageConfig, validate
from fastdinov2.data.collate import TrainBatch, collate_train, mask_index_weights
from fastdinov2.data.datasets import ImageRecord
from fastdinov2.data.noise_patch import NoisePatchRecord
from fastdinov2.data.photometric import identity_params
from fastdinov2.data.pretrain import BadSample, PretrainDataset, PretrainSample, StageShape


def _cfg() -> Config:
    cfg = Config()
    cfg.student.patch_size = 8
    cfg.crops.global_crops_size, cfg.crops.local_crops_size = 64, 32
    cfg.crops.local_crops_number = 2
    cfg.curriculum.stages = [
        StageConfig(name="low", fraction=0.75, global_size=32, local_size=16),
        StageConfig(name="full", fraction=0.25, global_size=64, local_size=32,
                    noise=NoiseConfig(kind="gaussian", max_scale=0.5)),
    ]
    validate(cfg)
    return cfg


def _records(root: Path, n: int) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
        path = root / f"{i}.jpg"
        Image.fromarray(arr).resize((96, 80), Image.Resampling.BICUBIC).save(path, quality=90)
        out.append(ImageRecord(path, i % 3))
    return out


SHAPE = StageShape(0, 4, 2, 1, (2, 2), "worker")


def _fake(i: int, masks: list[list[int]], shape: StageShape = SHAPE) -> PretrainSample:
    """A hand-made sample whose pixel values encode (sample, crop)."""
    g = torch.stack([torch.full((3, 4, 4), 10.0 * i + c) for c in range(2)])
    loc = torch.full((1, 3, 2, 2), 10.0 * i + 5)
    return PretrainSample(index=i, sample_key=100 + i, label=i, path=f"img{i}.jpg", shape=shape,
                          global_crops=g, local_crops=loc, masks=torch.tensor(masks, dtype=torch.bool),
                          global_params=None, local_params=None, noise=NoisePatchRecord("none", False),
                          replaced=[])


def test_collate_crop_major_order_and_mask_arithmetic_by_hand():
    s0 = _fake(0, [[1, 0, 0, 1], [0, 0, 0, 0]])
    s1 = _fake(1, [[0, 1, 0, 0], [1, 1, 1, 0]])
    b = collate_train([s0, s1])
    assert b.batch_size == 2 and b.stage == 0 and b.global_size == 4 and b.local_size == 2
    # global rows: [s0 c1, s1 c1, s0 c2, s1 c2]
    assert b.global_crops[:, 0, 0, 0].tolist() == [0.0, 10.0, 1.0, 11.0]
    assert b.local_crops[:, 0, 0, 0].tolist() == [5.0, 15.0]
    assert b.masks.int().tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert b.mask_indices.tolist() == [0, 3, 5, 12, 13, 14]
    torch.testing.assert_close(b.masks_weight, torch.tensor([0.5, 0.5, 1.0, 1 / 3, 1 / 3, 1 / 3]))
    assert b.n_masked_patches == 6
    assert b.labels.tolist() == [0, 1] and b.sample_keys.tolist() == [100, 101] and b.indices.tolist() == [0, 1]
    assert b.bad_samples == [] and b.mask_grid == (2, 2)
    # each masked image carries total weight 1
    rows = b.mask_indices // 4
    assert torch.bincount(rows, weights=b.masks_weight, minlength=4).tolist() == pytest.approx([1, 1, 0, 1])


def test_mask_index_weights_empty():
    idx, w = mask_index_weights(torch.zeros(3, 4, dtype=torch.bool))
    assert idx.numel() == 0 and w.numel() == 0


def test_bad_samples_are_dropped_and_recorded():
    b = collate_train([_fake(0, [[1, 0, 0, 0], [0, 0, 0, 0]]), BadSample("x.jpg", "truncated", 3, 9, SHAPE)])
    assert b.batch_size == 1 and b.global_crops.shape == (2, 3, 4, 4)
    assert b.bad_samples == [("x.jpg", "truncated")]
    empty = collate_train([BadSample("x.jpg", "zero-byte file", 3, 9, SHAPE), BadSample("y.jpg", "bad", 4, 1)])
    assert empty.batch_size == 0 and empty.global_crops.shape == (0, 3, 4, 4)
    assert empty.local_crops.shape == (0, 3, 2, 2) and empty.masks.shape == (0, 4)
    assert empty.n_masked_patches == 0 and empty.stage == 0
    assert [p for p, _ in empty.bad_samples] == ["x.jpg", "y.jpg"]


def test_replaced_bad_files_are_recorded_and_the_sample_kept():
    stand_in = {**_fake(1, [[0, 1, 0, 0], [0, 0, 0, 0]]), "replaced": [("x.jpg", "truncated")]}
    b = collate_train([_fake(0, [[1, 0, 0, 0], [0, 0, 0, 0]]), stand_in, BadSample("y.jpg", "bad", 4, 1, SHAPE)])
    assert b.batch_size == 2 and b.indices.tolist() == [0, 1]
    assert b.bad_samples == [("x.jpg", "truncated"), ("y.jpg", "bad")]


def test_mixed_stages_are_rejected():
    other = StageShape(1, 8, 4, 1, (4, 4), "worker")
    s1 = _fake(1, [[0] * 16, [0] * 16], other)
    with pytest.raises(ValueError, match="stage 0.*stage 1"):
        collate_train([_fake(0, [[0] * 4, [0] * 4]), s1])


def test_device_mode_params_follow_crop_major_order(tmp_path):
    cfg = _cfg()
    recs = _records(tmp_path, 3)
    dev = PretrainDataset(recs, cfg, seed=1, photometric_on="device")
    wrk = PretrainDataset(recs, cfg, seed=1, photometric_on="worker")
    reqs = [(0, 10, 1), (1, 11, 1), (2, 12, 1)]
    bd = collate_train([dev[r] for r in reqs])
    bw = collate_train([wrk[r] for r in reqs])
    assert bd.global_crops.dtype == torch.uint8 and bd.photometric_pending
    assert len(bd.global_params) == 6 and len(bd.local_params) == 6
    applied = bd.to("cpu").with_photometric()
    assert not applied.photometric_pending and applied.global_crops.dtype == torch.float32
    torch.testing.assert_close(applied.global_crops, bw.global_crops)
    torch.testing.assert_close(applied.local_crops, bw.local_crops)
    assert torch.equal(bd.masks, bw.masks)


def test_batch_masking_masks_exactly_half_of_the_global_crops(tmp_path):
    cfg = _cfg()
    assert cfg.ibot.mask_sampling == "batch"  # the default: DINOv2's masking of the whole micro-batch
    recs = _records(tmp_path, 4)
    ds = PretrainDataset(recs, cfg, seed=2)
    reqs = [(i, 20 + i, 1) for i in range(4)]
    b = collate_train([ds[r] for r in reqs])
    assert b.masks.shape == (8, 64) and int((b.masks.sum(dim=1) > 0).sum()) == 4  # int(8 * 0.5)
    assert b.n_masked_patches == int(b.masks.sum())
    again = collate_train([ds[r] for r in reqs])
    assert torch.equal(again.masks, b.masks)  # from the run seed and the batch's sample keys
    other = collate_train([ds[(i, 30 + i, 1)] for i in range(4)])
    assert not torch.equal(other.masks, b.masks)


def test_to_moves_every_tensor():
    s = _fake(0, [[1, 0, 0, 0], [0, 0, 0, 0]], StageShape(0, 4, 2, 1, (2, 2), "device"))
    s["global_params"], s["local_params"] = identity_params(2), identity_params(1)
    b = collate_train([s])
    moved = b.to("meta")
    for name in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "labels"):
        assert getattr(moved, name).device.type == "meta"
    assert moved.global_params is not None and moved.global_params.blur_sigma.device.type == "meta"
    # the blur kernel sizes set the blur's shape on the host: they stay on the CPU (no read-back from a GPU)
    assert moved.global_params.blur_kernel_size.device.type == "cpu"
    assert moved.local_params is not None and moved.local_params.blur_kernel_size.device.type == "cpu"
    assert b.global_crops.device.type == "cpu"  # the original is untouched


def test_dataloader_workers_switch_stage_mid_stream(tmp_path):
    cfg = _cfg()
    recs = _records(tmp_path, 6)
    bad = tmp_path / "zero.jpg"
    bad.write_bytes(b"")
    recs.append(ImageRecord(bad, 0))
    ds = PretrainDataset(recs, cfg, seed=5)
    batches = [
        [(0, 0, 0), (1, 1, 0), (2, 2, 0)],
        [(3, 3, 0), (4, 4, 0), (5, 5, 0)],
        [(0, 6, 1), (1, 7, 1), (6, 8, 1)],  # the switch; one bad file
        [(2, 9, 1), (3, 10, 1), (4, 11, 1)],
    ]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2, collate_fn=collate_train)
    got: list[TrainBatch] = list(loader)
    assert [b.global_crops.shape[-1] for b in got] == [32, 32, 64, 64]
    assert [b.local_crops.shape[-1] for b in got] == [16, 16, 32, 32]
    assert [b.stage for b in got] == [0, 0, 1, 1]
    assert [b.masks.shape[1] for b in got] == [16, 16, 64, 64]
    assert got[2].batch_size == 2 and [p for p, _ in got[2].bad_samples] == [str(bad)]
    assert got[2].bad_samples[0][1]  # a reason is given
    assert got[2].global_crops.shape == (4, 3, 64, 64) and got[2].local_crops.shape == (4, 3, 32, 32)
    # workers produce bit-identical batches to the main process
    for b, reqs in zip(got, batches, strict=True):
        ref = collate_train([ds[r] for r in reqs])
        assert torch.equal(b.global_crops, ref.global_crops) and torch.equal(b.local_crops, ref.local_crops)
        assert torch.equal(b.masks, ref.masks) and torch.equal(b.mask_indices, ref.mask_indices)


@pytest.mark.parametrize("mode", ["worker", "device"])
def test_no_local_crops(tmp_path, mode):
    cfg = _cfg()
    cfg.crops.local_crops_number = 0
    ds = PretrainDataset(_records(tmp_path, 2), cfg, seed=0, photometric_on=mode)
    b = collate_train([ds[(0, 1, 0)], ds[(1, 2, 0)]]).with_photometric()
    assert b.global_crops.shape == (4, 3, 32, 32) and b.local_crops.shape == (0, 3, 16, 16)
