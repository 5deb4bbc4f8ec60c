"""compute.half_weights: bf16 copies of the linear/conv weights instead of autocast's per-use casts. Same
arithmetic as autocast (checked under CPU autocast), far fewer cast kernels, fp32 parameters and checkpoints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastdinov2.config import ConfigError, load_config
from fastdinov2.train.half_weights import HalfWeights


def _cfg(data_root: Path, *extra: str):  # type: ignore[no-untyped-def]
    from .test_train_e2e import TINY

    return load_config("fastdinov2_tiny", [*TINY, f"data.root={data_root}", "compute.precision=bf16",
                                           "compute.masked_tokens_bucket=16", *extra])


class _Casts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def test_module_swap_copy_and_gradients() -> None:
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3, bias=False), nn.LayerNorm(3))
    frozen = nn.Sequential(nn.Linear(4, 6)).requires_grad_(False)
    hw = HalfWeights(trained, frozen, torch.bfloat16)
    assert [(type(m).__name__, n) for m, n, _, _ in hw.slots] == [("Linear", "weight"), ("Linear", "bias"),
                                                                 ("Linear", "weight"), ("Linear", "weight"),
                                                                 ("Linear", "bias")]  # LayerNorm is not cast
    assert hw.n_trained == 3 and all(h.requires_grad for *_, h in hw.trained)
    assert not any(h.requires_grad for *_, h in hw.slots[3:])
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = trained(x)
        ref.float().square().sum().backward()
    ref_grads = [p.grad.clone() for p in trained.parameters()]  # type: ignore[union-attr]
    trained.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), hw.swapped():
        assert trained[0].weight.dtype == torch.bfloat16
        out = trained(x)
        out.float().square().sum().backward()
    assert trained[0].weight.dtype == torch.float32 and isinstance(trained[0].weight, nn.Parameter)
    assert [k for k, v in trained.state_dict().items() if v.dtype != torch.float32] == []
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same bf16 weights in the same bf16 matmuls
    assert trained[0].weight.grad is None  # not yet collected
    hw.collect_grads(accumulate=False)
    for p, g in zip(trained.parameters(), ref_grads, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert all(h.grad is None for *_, h in hw.trained)
    with torch.autocast("cpu", dtype=torch.bfloat16), hw.swapped():  # a second micro-batch adds
        trained(x).float().square().sum().backward()
    hw.collect_grads(accumulate=True)
    torch.testing.assert_close(trained[0].weight.grad, 2 * ref_grads[0], rtol=0, atol=0)
    with torch.no_grad():  # an update of the fp32 weights reaches the copies at the next refresh
        trained[0].weight.add_(1.0)
    hw.refresh()
    torch.testing.assert_close(hw.slots[0][3], trained[0].weight.bfloat16())
    with pytest.raises(RuntimeError), hw.swapped():  # the fp32 parameters come back even after an error
        raise RuntimeError
    assert isinstance(trained[0].weight, nn.Parameter)
    with pytest.raises(ValueError, match="half-precision dtype"):
        HalfWeights(trained, None, torch.float32)


def test_config_needs_bf16_autocast() -> None:
    assert load_config("fastdinov2_tiny").compute.half_weights is False
    for precision in ("fp32", "fp16"):
        with pytest.raises(ConfigError, match="compute.half_weights.*bf16"):
            load_config("fastdinov2_tiny", ["compute.half_weights=true", f"compute.precision={precision}"])


def test_trainer_trains_like_autocast_with_a_fraction_of_the_casts(synthetic_root: Path, tmp_path: Path) -> None:
    data_root = synthetic_root
    from fastdinov2.train.loop import Trainer, train

    trainer = Trainer(_cfg(data_root, "compute.half_weights=true"), tmp_path / "t")
    assert trainer._half is not None
    n_linear = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in trainer.model.modules())
    assert len(trainer._half.slots) > n_linear  # weights and biases of the student's and teacher's layers
    casts = {}
    for name, extra in (("autocast", []), ("half", ["compute.half_weights=true"])):
        tr = Trainer(_cfg(data_root, *extra), tmp_path / f"count_{name}")
        batch = next(iter(tr.make_loader(0, 1)))
        with _Casts() as mode:
            tr._forward_backward([batch], tr._teacher_temp.fill_(0.04))
        casts[name] = mode.counts["_to_copy"]
    # autocast casts every weight and bias at each use and each of their gradients back; the copies leave the
    # activations' casts and one copy per step
    assert casts["half"] < casts["autocast"] / 2, casts
    runs = {name: train(_cfg(data_root, "train.max_steps=4", *extra), tmp_path / name)
            for name, extra in (("autocast", []), ("half", ["compute.half_weights=true"]),
                                ("half_graph", ["compute.half_weights=true", "compute.cuda_graph=true"]))}
    for name in ("half", "half_graph"):
        for a, b in zip(runs["autocast"]["history"], runs[name]["history"], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (name, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (name, a["step"])
    ckpt = torch.load(tmp_path / "half" / "checkpoints" / "step_00000004" / "model.pt", weights_only=True)
    assert {v.dtype for part in ("student", "teacher") for v in ckpt[part].values()} == {torch.float32}


@pytest.mark.parametrize("scope", ["blocks", "step"])
def test_compiled_steps_use_the_copies_alike(synthetic_root: Path, tmp_path: Path, scope: str) -> None:
    # the swap happens outside the compiled regions (aot_eager: dynamo and AOTAutograd, no code generation)
    from fastdinov2.train.loop import train

    torch._dynamo.reset()
    common = ["train.max_steps=2", "compute.half_weights=true"]
    eager = train(_cfg(synthetic_root, *common), tmp_path / "eager")["history"]
    compiled = train(_cfg(synthetic_root, *common, f"compute.compile={scope}", "compute.compile_backend=aot_eager"),
                     tmp_path / "compiled")["history"]
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_weights_train_like_autocast_on_the_gpu(tmp_path: Path) -> None:
    from .test_fused_loss import assert_like_reference

    assert_like_reference(tmp_path, "compute.half_weights=true", ("loss",), rel=1e-3)


def test_layer_scale_copies_only_when_asked() -> None:
    from fastdinov2.models.vit import Block

    block = Block(8, 2, layerscale_init=0.5)
    plain = HalfWeights(block, None, torch.bfloat16)
    assert not any(name == "gamma" for _, name, _, _ in plain.slots)
    hw = HalfWeights(block, None, torch.bfloat16, layer_scale=True)
    assert [name for _, name, _, _ in hw.slots].count("gamma") == 2
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)  # the half residual stream
    with torch.autocast("cpu", dtype=torch.bfloat16), _Casts() as mode, hw.swapped():
        assert block.ls1.gamma.dtype == torch.bfloat16
        block(x).float().sum().backward()
    assert mode.counts["_to_copy"] <= 2  # no cast of the gammas or their gradients, forward or backward
    hw.collect_grads(accumulate=False)
    grad = block.ls1.gamma.grad
    assert grad is not None and grad.dtype == torch.float32 and bool(grad.abs().sum() > 0)
