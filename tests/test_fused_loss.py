"""ibot.fused_loss and dino.fused_loss: the iBOT and DINO cross-entropies as Triton row kernels
(losses/fused.py).

The kernels run on CUDA; on this CPU they are checked under Triton's interpreter in a subprocess
(``tests/_fused_interpret.py``: values, gradients, padding rows, the centre, the meta-architecture and the
trainer's static step against the reference path). The ``gpu`` tests compare them with the reference at
the real prototype count and replay them in a CUDA graph.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastdinov2.config import ConfigError, load_config
from fastdinov2.losses.fused import (
    _triton_importable,
    cross_entropy_to_targets,
    fused_dino_loss,
    fused_loss_available,
    row_soft_cross_entropy,
)

from .test_chunked_loss import _close, _meta_step

ROOT = Path(__file__).resolve().parent.parent


def test_config_key_defaults_to_auto_and_refuses_the_other_loss_paths() -> None:
    assert load_config("fastdinov2_tiny").ibot.fused_loss == "auto"
    assert load_config("fastdinov2_tiny", ["ibot.fused_loss=true"]).ibot.fused_loss == "true"
    assert load_config("fastdinov2_tiny", ["ibot.fused_loss=False"]).ibot.fused_loss == "false"
    with pytest.raises(ConfigError, match="ibot.fused_loss: 'maybe' is not one of auto, true, false"):
        load_config("fastdinov2_tiny", ["ibot.fused_loss=maybe"])
    # auto: the reference path where the fused one cannot run or does not apply (no error, no warning)
    load_config("fastdinov2_tiny", ["ibot.loss_chunk_rows=8"])
    load_config("fastdinov2_tiny", ["dino.centering=sinkhorn_knopp"])
    with pytest.raises(ConfigError, match="ibot.fused_loss.*loss_chunk_rows"):
        load_config("fastdinov2_tiny", ["ibot.fused_loss=true", "ibot.loss_chunk_rows=8"])
    with pytest.raises(ConfigError, match="ibot.fused_loss.*dino.centering=softmax"):
        load_config("fastdinov2_tiny", ["ibot.fused_loss=true", "dino.centering=sinkhorn_knopp"])


def test_dino_key_defaults_to_false_and_takes_auto() -> None:
    assert load_config("fastdinov2_tiny").dino.fused_loss == "false"
    assert load_config("fastdinov2_tiny", ["dino.fused_loss=auto"]).dino.fused_loss == "auto"
    assert load_config("fastdinov2_tiny", ["dino.fused_loss=True"]).dino.fused_loss == "true"
    # its targets are probabilities: Sinkhorn-Knopp and the chunked iBOT loss are fine
    load_config("fastdinov2_tiny", ["dino.fused_loss=true", "dino.centering=sinkhorn_knopp", "ibot.loss_chunk_rows=8"])
    with pytest.raises(ConfigError, match="dino.fused_loss: 'maybe' is not one of auto, true, false"):
        load_config("fastdinov2_tiny", ["dino.fused_loss=maybe"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs the kernels on CPU")
def test_without_cuda_the_reference_dino_loss_runs_with_one_warning() -> None:
    with pytest.raises(RuntimeError, match="fused DINO loss needs a CUDA device and Triton.*cpu"):
        cross_entropy_to_targets(torch.zeros(2, 4), torch.zeros(1, 4), torch.zeros(2, dtype=torch.long), 0.1)
    ref = _meta_step([], 9)
    with pytest.warns(UserWarning, match="dino.fused_loss=true needs a CUDA device.*DINO loss uses the reference"):
        got = _meta_step(["dino.fused_loss=true"], 9)
    for key in ref[0]:
        assert got[0][key].item() == ref[0][key].item(), key


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs the kernels on CPU")
def test_without_cuda_the_reference_path_runs_with_one_warning() -> None:
    assert not fused_loss_available(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA device and Triton.*cpu"):
        row_soft_cross_entropy(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(4), 0.07, 0.1)
    ref = _meta_step([], 9)
    with pytest.warns(UserWarning, match="ibot.fused_loss=true needs a CUDA device"):
        got = _meta_step(["ibot.fused_loss=true"], 9)
    for key in ref[0]:
        assert got[0][key].item() == ref[0][key].item(), key


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"\[M, K\] of one shape"):
        row_soft_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(4), 0.07, 0.1)
    with pytest.raises(ValueError, match="center must have K = 4"):
        row_soft_cross_entropy(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(5), 0.07, 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        row_soft_cross_entropy(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(4), 0.0, 0.1)


def test_bad_dino_shapes_are_named() -> None:
    idx = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"student logits \[R, K\] and targets \[U, K\]"):
        cross_entropy_to_targets(torch.zeros(2, 4), torch.zeros(1, 5), idx, 0.1)
    with pytest.raises(ValueError, match=r"index must be an integer tensor \[2\]"):
        cross_entropy_to_targets(torch.zeros(2, 4), torch.zeros(1, 4), idx.float(), 0.1)
    with pytest.raises(ValueError, match="student_temp"):
        cross_entropy_to_targets(torch.zeros(2, 4), torch.zeros(1, 4), idx, -1.0)
    with pytest.raises(ValueError, match=r"teacher_cls must be two \[B, K\] tensors"):
        fused_dino_loss(torch.zeros(6, 4), [torch.zeros(2, 4)], student_temp=0.1)
    with pytest.raises(ValueError, match="2B \\+ nL\\*B rows for B = 2 teacher rows, got 5"):
        fused_dino_loss(torch.zeros(5, 4), [torch.zeros(2, 4), torch.zeros(2, 4)], student_temp=0.1)


def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())


@pytest.mark.skipif(not _triton_importable(), reason="needs Triton")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_without_a_gpu(dtype: str) -> None:
    # Triton compiles to a cubin for a named target with its bundled ptxas: a kernel that the interpreter runs
    # but the compiler rejects (or that needs an unsupported op on sm_90) fails here, not on the GPU machine
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdinov2.losses.fused import _kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreted kernels cannot be compiled")
    kernels = _kernels()
    p = f"*{dtype}"
    sigs = {
        "row_ce_fwd": (["S", "T", "C", "TT", "CE", "LSE_T", "LSE_S", "K", "stride_s", "stride_t", "inv_ts", "BLOCK_K"],
                       [p, p, "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "fp32"], [2048], 8),
        "row_ce_bwd": (["S", "T", "C", "TT", "LSE_T", "LSE_S", "COEF", "G", "K", "stride_s", "stride_t", "stride_g",
                        "inv_ts", "BLOCK_K"],
                       [p, p, "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", p, "i32", "i32", "i32", "i32", "fp32"],
                       [2048], 4),
        "col_sum": (["T", "W", "OUT", "M", "K", "stride_t", "BLOCK_M", "BLOCK_N"],
                    [p, "*fp32", "*fp32", "i32", "i32", "i32"], [64, 128], 8),
        "target_ce_fwd": (["S", "P", "IDX", "CE", "LSE_S", "PSUM", "K", "stride_s", "stride_p", "inv_ts", "BLOCK_K"],
                          [p, "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "fp32"], [2048], 8),
        "target_ce_bwd": (["S", "P", "IDX", "LSE_S", "PSUM", "COEF", "G", "K", "stride_s", "stride_p", "stride_g",
                           "inv_ts", "BLOCK_K"],
                          [p, "*fp32", "*i64", "*fp32", "*fp32", "*fp32", p, "i32", "i32", "i32", "i32", "fp32"],
                          [2048], 4),
    }
    for name, (args, types, consts, warps) in sigs.items():
        n_rt = len(types)
        signature = {**dict(zip(args[:n_rt], types, strict=True)), **{a: "constexpr" for a in args[n_rt:]}}
        constexprs = {(n_rt + i,): v for i, v in enumerate(consts)}
        src = ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm.get("cubin"), name


@pytest.mark.skipif(not _triton_importable(), reason="needs Triton (its interpreter runs the kernels on CPU)")
def test_kernels_match_the_reference_under_the_triton_interpreter() -> None:
    if _triton_version() < (3, 8):  # 3.6's interpreter cannot loop to a runtime bound with numpy 2.4
        pytest.skip(f"Triton {_triton_version()} interpreter: loops over a runtime bound fail (checked with 3.8)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_fused_interpret.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "fused loss: all checks passed" in proc.stdout


def _captured(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], s0: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """``loss_fn(s)`` and its backward captured in a CUDA graph (after a warm-up on a side stream, which compiles
    the kernels) and replayed once: ``(graph, loss output, s)``, with ``s`` a copy of ``s0`` holding the gradient."""
    static_s = s0.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss_fn(static_s).backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_s.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loss_fn(static_s)
        out.backward()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out, static_s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_loss_matches_the_reference_and_replays_in_a_cuda_graph_on_the_gpu() -> None:
    from fastdinov2.losses import iBOTPatchLoss
    from fastdinov2.losses.fused import fused_ibot_loss, masked_column_sum

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    m, k, n = 600, 65536, 128
    s0 = (torch.randn(m, k, device=dev, generator=g) * 4).bfloat16()
    t = (torch.randn(m, k, device=dev, generator=g) * 4).bfloat16()
    center = torch.randn(1, k, device=dev, generator=g) * 0.1
    w = torch.rand(m, device=dev, generator=g) + 0.1
    w[-50:] = 0
    ref_mod = iBOTPatchLoss(k).to(dev)
    ref_mod.center.copy_(center)
    masks = torch.ones(n, 8, dtype=torch.bool, device=dev)
    s_ref = s0.clone().requires_grad_(True)
    ref = ref_mod.forward_masked(s_ref, ref_mod.softmax_center_teacher(t, 0.07), masks, masks_weight=w)
    ref.backward()
    s = s0.clone().requires_grad_(True)
    temp = torch.full((), 0.07, device=dev)
    loss = fused_ibot_loss(s, t, center, w, teacher_temp=temp, student_temp=0.1, n_images=n)
    loss.backward()
    _close(loss, ref)
    assert s.grad is not None and s_ref.grad is not None
    torch.testing.assert_close(s.grad.float(), s_ref.grad.float(), rtol=2e-2, atol=1e-2 * float(s_ref.grad.abs().max()))
    valid = (w > 0).float()
    _close(masked_column_sum(t, valid), valid @ t.float())
    # captured and replayed: same loss and gradient, new inputs are read
    graph, out, static_s = _captured(
        lambda x: fused_ibot_loss(x, t, center, w, teacher_temp=temp, student_temp=0.1, n_images=n), s0)
    _close(out, loss)
    assert static_s.grad is not None
    torch.testing.assert_close(static_s.grad, s.grad)
    temp.fill_(0.05)  # a device-side schedule value changes the replayed result
    graph.replay()
    torch.cuda.synchronize()
    assert abs(out.item() - loss.item()) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_dino_loss_matches_the_reference_and_replays_in_a_cuda_graph_on_the_gpu() -> None:
    from fastdinov2.losses import DINOLoss

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    b, n_local, k = 64, 8, 65536
    s0 = (torch.randn((2 + n_local) * b, k, device=dev, generator=g) * 4).bfloat16()
    ref_mod = DINOLoss(k).to(dev)
    teacher = list(ref_mod.softmax_center_teacher(torch.randn(2 * b, k, device=dev, generator=g) * 4, 0.07).chunk(2))
    s_ref = s0.clone().requires_grad_(True)
    ref = ref_mod.crop_pairs(*s_ref.split([2 * b, n_local * b]), teacher)
    ref.backward()
    s = s0.clone().requires_grad_(True)
    loss = fused_dino_loss(s, teacher, student_temp=0.1)
    loss.backward()
    _close(loss, ref)
    assert s.grad is not None and s_ref.grad is not None and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s.grad.float(), s_ref.grad.float(), rtol=2e-2, atol=1e-2 * float(s_ref.grad.abs().max()))
    # captured and replayed: same loss and gradient; new targets are read
    graph, out, static_s = _captured(lambda x: fused_dino_loss(x, teacher, student_temp=0.1), s0)
    _close(out, loss)
    assert static_s.grad is not None
    torch.testing.assert_close(static_s.grad, s.grad)
    teacher[0].copy_(teacher[0].roll(1, dims=1))
    graph.replay()
    torch.cuda.synchronize()
    assert abs(out.item() - loss.item()) > 1e-3


def gpu_train_variants(tmp_path: Path, variants: dict[str, list[str]]) -> dict[str, list[dict]]:  # type: ignore[type-arg]
    """Train the tiny preset on CUDA (8 steps over both stages, photometric on the device, no stochastic depth,
    bucketed masked rows) once per named list of overrides; returns each run's history."""
    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from fastdinov2.train.loop import train

    from .test_train_e2e import TINY as TRAIN_TINY

    root = tmp_path / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    # the reference: eager, the reference iBOT loss (both "auto" options would be on on CUDA)
    common = [*TRAIN_TINY, f"data.root={root}", "compute.device=cuda", "data.photometric_on=device",
              "compute.cuda_graph=false", "ibot.fused_loss=false",
              "student.drop_path_rate=0", "compute.masked_tokens_bucket=16"]
    return {name: train(load_config("fastdinov2_tiny", [*common, *extra]), tmp_path / name)["history"]
            for name, extra in variants.items()}


def assert_like_reference(tmp_path: Path, option: str, keys: tuple[str, ...], rel: float) -> None:
    """Train on CUDA without ``option``, with it, and with it inside the CUDA-graph step (tiny preset, 8 steps);
    each logged ``keys`` of the two runs with it equals the reference's to ``rel``."""
    runs = gpu_train_variants(tmp_path, {"reference": [], "option": [option],
                                         "option_graph": [option, "compute.cuda_graph=true"]})
    for name in ("option", "option_graph"):
        for a, b in zip(runs["reference"], runs[name], strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=rel), (option, name, a["step"], key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_with_the_fused_loss_trains_like_the_reference_on_the_gpu(tmp_path: Path) -> None:
    assert_like_reference(tmp_path, "ibot.fused_loss=true", ("ibot_loss", "loss"), rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_with_the_fused_dino_loss_trains_like_the_reference_on_the_gpu(tmp_path: Path) -> None:
    assert_like_reference(tmp_path, "dino.fused_loss=true", ("dino_loss", "loss"), rel=2e-2)
