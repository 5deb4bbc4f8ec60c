"""Checks of :mod:`fastdinov2.losses.fused` on CPU tensors under Triton's interpreter.

Run by ``tests/test_fused_loss.py`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when it
decorates the kernels, so it must be set before they are first used). Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastdinov2.config import load_config  # noqa: E402
from fastdinov2.losses import DINOLoss, iBOTPatchLoss  # noqa: E402
from fastdinov2.losses.fused import (  # noqa: E402
    cross_entropy_to_targets,
    fused_dino_loss,
    fused_ibot_loss,
    fused_loss_available,
    masked_column_sum,
)
from tests.test_chunked_loss import TINY, _close, _meta_step  # noqa: E402


def reference(s: torch.Tensor, t: torch.Tensor, center: torch.Tensor, w: torch.Tensor, temp: float, n: int):
    loss_mod = iBOTPatchLoss(s.shape[1])
    loss_mod.center.copy_(center.reshape(1, -1))
    masks = torch.zeros(n, s.shape[0], dtype=torch.bool)
    masks[0] = True  # only its shape matters when masks_weight is given
    return loss_mod.forward_masked(s, loss_mod.softmax_center_teacher(t, temp), masks, masks_weight=w)


def check_function() -> None:
    assert fused_loss_available(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    m, k, n = 37, 5000, 6  # three blocks of 2048 columns, the last one partly masked
    # the kernels compute in fp32 whatever the input dtype; bf16 gradients are rounded to bf16
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-5), (torch.bfloat16, 1e-2)):
        s0 = (torch.randn(m, k, generator=g) * 3).to(dtype)
        t = (torch.randn(m, k, generator=g) * 3).to(dtype)
        center = torch.randn(1, k, generator=g) * 0.1
        w = torch.rand(m, generator=g) + 0.1
        w[-4:] = 0  # padding rows
        for temp in (0.07, torch.tensor(0.07)):
            s_ref, s_fused = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
            ref = reference(s_ref, t, center, w, 0.07, n)
            ref.backward()
            got = fused_ibot_loss(s_fused, t, center, w, teacher_temp=temp, student_temp=0.1, n_images=n)
            got.backward()
            assert got.dtype == torch.float32 and got.ndim == 0
            torch.testing.assert_close(got, ref.float(), rtol=tol, atol=tol)
            assert s_fused.grad is not None and s_fused.grad.dtype == dtype
            torch.testing.assert_close(s_fused.grad.float(), s_ref.grad.float(), rtol=max(tol, 1e-4), atol=tol)
            assert s_fused.grad[-4:].abs().sum() == 0
        valid = (w > 0).float()
        torch.testing.assert_close(masked_column_sum(t, valid), valid @ t.float(), rtol=1e-5, atol=1e-4)
    # padding rows that are not finite change nothing; a non-finite real row makes the loss non-finite
    s = torch.randn(m, k, generator=g).requires_grad_(True)
    t = torch.randn(m, k, generator=g)
    w = torch.ones(m)
    w[-2:] = 0
    with torch.no_grad():
        s[-2] = float("inf")
    t[-1] = float("nan")
    loss = fused_ibot_loss(s, t, torch.zeros(k), w, teacher_temp=0.07, student_temp=0.1, n_images=n)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad[-2:].abs().sum() == 0
    assert torch.isfinite(masked_column_sum(t, w)).all()
    t[0, 5] = float("nan")
    assert not torch.isfinite(fused_ibot_loss(s, t, torch.zeros(k), w, teacher_temp=0.07, student_temp=0.1,
                                              n_images=n))
    # no rows
    s = torch.zeros(0, k, requires_grad=True)
    loss = fused_ibot_loss(s, torch.zeros(0, k), torch.zeros(k), torch.zeros(0), teacher_temp=0.07,
                           student_temp=0.1, n_images=n)
    loss.backward()
    assert loss.item() == 0 and s.grad is not None and s.grad.shape == (0, k)
    assert masked_column_sum(torch.zeros(0, k), torch.zeros(0)).abs().sum() == 0


def dino_reference(s: torch.Tensor, teacher: list[torch.Tensor], n_local: int) -> torch.Tensor:
    """The crop pairs' DINO term as ``MetaArch.compute_losses`` forms it on the reference path."""
    b, k = teacher[0].shape
    return DINOLoss(k).crop_pairs(*s.split([2 * b, n_local * b]), teacher)


def check_dino_function() -> None:
    g = torch.Generator().manual_seed(2)
    b, k = 3, 5000  # three blocks of 2048 columns, the last one partly masked
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-5), (torch.bfloat16, 1e-2)):
        for n_local, centering in ((4, "softmax"), (0, "softmax"), (2, "sinkhorn_knopp")):
            s0 = (torch.randn((2 + n_local) * b, k, generator=g) * 3).to(dtype)
            # (Sinkhorn-Knopp: logits of a unit-norm head's range; 3 / 0.07 would leave prototypes without mass)
            t_logits = torch.randn(2 * b, k, generator=g) * (3 if centering == "softmax" else 0.3)
            mod = DINOLoss(k)
            probs = (mod.softmax_center_teacher(t_logits, 0.07) if centering == "softmax"
                     else mod.sinkhorn_knopp_teacher(t_logits, 0.07))
            teacher = list(probs.chunk(2))
            s_ref, s_fused = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
            ref = dino_reference(s_ref, teacher, n_local)
            ref.backward()
            got = fused_dino_loss(s_fused, teacher, student_temp=0.1)
            got.backward()
            assert got.dtype == torch.float32 and got.ndim == 0
            torch.testing.assert_close(got, ref.float(), rtol=tol, atol=tol)
            assert s_fused.grad is not None and s_fused.grad.dtype == dtype
            torch.testing.assert_close(s_fused.grad.float(), s_ref.grad.float(), rtol=max(tol, 1e-4), atol=tol)
    # rows against any target row: a row equals its log-softmax cross-entropy
    s = torch.randn(5, 7, generator=g)
    targets = torch.rand(3, 7, generator=g)
    index = torch.tensor([2, 0, 0, 1, 2])
    expected = -(targets[index] * torch.log_softmax(s / 0.2, dim=-1)).sum(-1)
    torch.testing.assert_close(cross_entropy_to_targets(s, targets, index, 0.2), expected)
    # a non-finite student logit makes the loss non-finite (the trainer's finiteness check sees it)
    s = torch.randn(4 * b, k, generator=g)
    s[5, 3] = float("nan")
    teacher = list(torch.softmax(torch.randn(2 * b, k, generator=g), -1).chunk(2))
    assert not torch.isfinite(fused_dino_loss(s, teacher, student_temp=0.1))


def check_meta_arch() -> None:
    # the whole step's losses, gradients and centres with ibot.fused_loss match the reference path
    for extra in ([], ["ibot.separate_head=true"]):
        for n_masked in (9, 0):
            ref = _meta_step(extra, n_masked)
            got = _meta_step([*extra, "ibot.fused_loss=true"], n_masked)
            for key in ref[0]:
                _close(got[0][key], ref[0][key])
            if n_masked > 0:
                assert ref[0]["ibot_loss"].item() > 0
            _close(got[2], ref[2])  # iBOT centre after the update
            torch.testing.assert_close(got[3], ref[3])
            assert got[1].keys() == ref[1].keys()
            for name, grad in ref[1].items():
                if grad is None:
                    assert got[1][name] is None, name
                else:
                    _close(got[1][name], grad)
    cfg = load_config("fastdinov2_tiny", [*TINY, "ibot.fused_loss=true"])
    assert cfg.ibot.fused_loss
    # dino.fused_loss, alone, with the fused iBOT loss, and with Sinkhorn-Knopp targets: the same step
    for base, extra in (([], ["dino.fused_loss=true"]), ([], ["dino.fused_loss=true", "ibot.fused_loss=true"]),
                        (["dino.centering=sinkhorn_knopp"], ["dino.fused_loss=true"])):
        ref = _meta_step(base, 9)
        got = _meta_step([*base, *extra], 9)
        for key in ref[0]:
            _close(got[0][key], ref[0][key])
        assert ref[0]["dino_loss"].item() > 0
        torch.testing.assert_close(got[3], ref[3])  # DINO centre
        for name, grad in ref[1].items():
            if grad is None:
                assert got[1][name] is None, name
            else:
                _close(got[1][name], grad)


def check_padding_and_trainer() -> None:
    import tempfile

    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from fastdinov2.train.loop import train
    from tests.test_masked_padding import test_padded_batch_gives_the_same_losses_gradients_and_centres
    from tests.test_train_e2e import TINY as TRAIN_TINY

    # padding rows (weight 0) of a bucketed batch change nothing on the fused path either
    test_padded_batch_gives_the_same_losses_gradients_and_centres(["ibot.fused_loss=true"])
    # the trainer's static step (compute.cuda_graph: teacher temperature as a device tensor, bucketed rows)
    # over both curriculum stages, fused vs reference
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
        import fastdinov2.train.meta_arch as meta_arch

        calls = []
        real = meta_arch.fused_ibot_loss
        meta_arch.fused_ibot_loss = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[assignment]
        runs = []
        for fused in (False, True):
            cfg = load_config("fastdinov2_tiny", [*TRAIN_TINY, f"data.root={root}", "compute.cuda_graph=true",
                                                  "compute.masked_tokens_bucket=16", f"ibot.fused_loss={fused}"])
            runs.append(train(cfg, Path(tmp) / f"run_{fused}")["history"])
        # both fused terms in the static step
        cfg = load_config("fastdinov2_tiny", [*TRAIN_TINY, f"data.root={root}", "compute.cuda_graph=true",
                                              "compute.masked_tokens_bucket=16", "ibot.fused_loss=true",
                                              "dino.fused_loss=true"])
        dino_calls = []
        real_dino = meta_arch.fused_dino_loss
        meta_arch.fused_dino_loss = lambda *a, **k: dino_calls.append(1) or real_dino(*a, **k)  # type: ignore[assignment]
        both = train(cfg, Path(tmp) / "run_both")["history"]
        assert len(dino_calls) == 8, dino_calls
        # compute.compile=blocks compiles compute_losses: the fused losses are left out of the graph (graph breaks)
        for fused in (False, True):
            cfg = load_config("fastdinov2_tiny", [*TRAIN_TINY, f"data.root={root}", "train.max_steps=3",
                                                  "compute.masked_tokens_bucket=16", "compute.compile=blocks",
                                                  "compute.compile_backend=aot_eager", f"ibot.fused_loss={fused}",
                                                  f"dino.fused_loss={fused}"])
            runs.append(train(cfg, Path(tmp) / f"compiled_{fused}")["history"])
        meta_arch.fused_ibot_loss = real
        meta_arch.fused_dino_loss = real_dino
        assert len(calls) == 8 + 8 + 3, calls
        assert len(dino_calls) == 8 + 3, dino_calls
        for a, b in zip(runs[2], runs[3], strict=True):
            for key in ("loss", "ibot_loss", "dino_loss"):
                assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) + 1e-6, ("compiled", a["step"], key)
        runs = runs[:2]
        # (the fused runs took the fused path at every step)
        assert len(runs[0]) == len(runs[1]) > 2
        for a, b, c in zip(*runs, both, strict=True):
            for key in ("loss", "ibot_loss", "dino_loss", "grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) + 1e-6, (a["step"], key, a[key], b[key])
                assert abs(a[key] - c[key]) <= 1e-4 * abs(a[key]) + 1e-6, ("both", a["step"], key, a[key], c[key])


if __name__ == "__main__":
    check_function()
    check_dino_function()
    check_meta_arch()
    check_padding_and_trainer()
    print("fused loss: all checks passed")
