"""Padding the masked-token rows to a bucket (``compute.masked_tokens_bucket``) changes nothing but shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdinov2.config import load_config
from fastdinov2.data.collate import mask_index_weights, pad_masked_tokens
from fastdinov2.data.masking import sample_ibot_masks
from fastdinov2.train.meta_arch import MetaArch

SMALL = [
    "student.embed_dim=32", "student.depth=2", "student.num_heads=2", "dino.head_n_prototypes=32",
    "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "crops.global_crops_size=32",
    "crops.local_crops_size=16", "crops.local_crops_number=2", "curriculum.stages.0.global_size=16",
    "curriculum.stages.0.local_size=8", "curriculum.stages.1.global_size=32", "curriculum.stages.1.local_size=16",
]


def test_pad_masked_tokens_rounds_up_with_zero_weight_rows() -> None:
    idx, w = torch.arange(5), torch.full((5,), 0.2)
    pidx, pw = pad_masked_tokens(idx, w, 4)
    assert pidx.tolist() == [0, 1, 2, 3, 4, 0, 0, 0] and pw[5:].tolist() == [0.0, 0.0, 0.0]
    assert pad_masked_tokens(idx, w, 0)[0] is idx  # 0: no padding
    assert pad_masked_tokens(idx[:0], w[:0], 4)[0].shape == (4,)  # an empty batch still gets one bucket
    assert pad_masked_tokens(idx[:4], w[:4], 4)[0].shape == (4,)
    padded, pw = pad_masked_tokens(idx, w, 4, at_least=10)  # up to a bound, rounded up to the bucket
    assert padded.shape == (12,) and pw[5:].sum() == 0 and pad_masked_tokens(idx, w, 4, at_least=3)[0].shape == (8,)


def test_collate_pads_batch_masks_to_one_shape_per_stage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from fastdinov2.train.loop import Trainer

    from .test_train_e2e import TINY

    root = tmp_path / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={root}", "compute.masked_tokens_bucket=4",
                                          "ibot.mask_sampling=batch"])
    trainer = Trainer(cfg, tmp_path / "run")
    for start, end in ((0, 6), (6, 8)):  # the two stages
        batches = list(trainer.make_loader(start, end))
        shapes = {tuple(b.mask_indices.shape) for b in batches}
        counts = {b.n_masked_patches for b in batches}
        assert len(shapes) == 1, shapes  # one shape although the masked counts differ
        assert len(counts) > 1 or end == 8  # stage 1 has two steps here
        assert max(counts) <= next(iter(shapes))[0]


def _step(model: MetaArch, batch: dict[str, torch.Tensor], n_masked: int) -> tuple[dict[str, float], dict]:
    model.zero_grad(set_to_none=True)
    t_cls, t_patch = model.teacher_targets(batch["g"], batch["idx"], n_masked, 0.04)
    out = model.student(batch["g"], batch["l"], batch["masks"], batch["idx"])
    losses = model.compute_losses(out, t_cls, t_patch, batch["masks"], batch["w"], n_local=2)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


@pytest.mark.parametrize("extra", [[], ["ibot.loss_chunk_rows=7"], ["dino.centering=sinkhorn_knopp"],
                                   ["ibot.separate_head=true"]])
def test_padded_batch_gives_the_same_losses_gradients_and_centres(extra: list[str]) -> None:
    cfg = load_config("fastdinov2_tiny", [*SMALL, *extra])
    torch.manual_seed(0)
    b, grid = 4, 32 // cfg.student.patch_size
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.concatenate([sample_ibot_masks(rng, (grid, grid), cfg.ibot, 2) for _ in range(b)]))
    masks[0, :3] = True  # at least a few masked tokens
    idx, w = mask_index_weights(masks)
    batch = {"g": torch.randn(2 * b, 3, 32, 32), "l": torch.randn(2 * b, 3, 16, 16), "masks": masks}
    pidx, pw = pad_masked_tokens(idx, w, 16)
    assert pidx.numel() > idx.numel()
    results = []
    for i, w_ in ((idx, w), (pidx, pw)):
        torch.manual_seed(1)
        model = MetaArch(cfg)
        results.append((*_step(model, {**batch, "idx": i, "w": w_}, int(idx.numel())),
                        model.dino_loss.center.clone(), model.ibot_loss.center.clone()))
    (l0, g0, dc0, ic0), (l1, g1, dc1, ic1) = results
    assert l0 == pytest.approx(l1, rel=1e-5, abs=1e-7)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-7, msg=k)
    torch.testing.assert_close(dc0, dc1)
    torch.testing.assert_close(ic0, ic1, rtol=1e-5, atol=1e-7)


def test_training_with_a_bucket_matches_training_without(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from fastdinov2.train.loop import train

    from .test_train_e2e import TINY

    root = tmp_path / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    runs = []
    for bucket in (0, 64):
        cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={root}", "train.max_steps=3",
                                              f"compute.masked_tokens_bucket={bucket}"])
        runs.append(train(cfg, tmp_path / f"run{bucket}")["history"])
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "ibot_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
