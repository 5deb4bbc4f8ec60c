"""Flat parameter buffers (train/flat_params.py): the EMA as one lerp kernel, equal to the multi-tensor passes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from fastdinov2.config import load_config
from fastdinov2.train.flat_params import FlatParameters, flatten_pair
from fastdinov2.train.loop import Trainer
from fastdinov2.train.meta_arch import MetaArch

from .test_train_e2e import TINY


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_parameters_become_views_of_one_buffer_with_their_values() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    flat = FlatParameters(net)
    assert list(net.parameters()) == params  # the same Parameter objects (optimizers keep working)
    assert flat.flat.numel() == sum(p.numel() for p in params) and flat.intact()
    offset = 0
    for p in params:
        assert p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
        assert p.data_ptr() == flat.flat.data_ptr() + offset * p.element_size() and p.is_contiguous()
        offset += p.numel()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # training through the views: the optimizer updates the buffer
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert flat.intact() and not torch.equal(flat.flat[: params[0].numel()].view_as(params[0]), before["0.weight"])
    # a state dict of views is saved once: about the size of the parameters, as without the buffer
    sizes = []
    for module in (net, _net()):
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        sizes.append(buf.tell())
    assert sizes[0] < 1.2 * sizes[1]


def test_intact_notices_a_replaced_parameter_or_data() -> None:
    net = _net()
    flat = FlatParameters(net)
    net[0].weight.data = net[0].weight.data.clone()  # e.g. module.to(), load_state_dict(assign=True)
    assert not flat.intact()
    net = _net()
    flat = FlatParameters(net)
    net[2].bias = nn.Parameter(torch.zeros(3))  # e.g. FSDP replacing the parameters
    assert not flat.intact()
    with pytest.raises(ValueError, match="one dtype"):
        FlatParameters(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()))


@pytest.mark.parametrize("momentum_on_device", [False, True])
@pytest.mark.parametrize("apply", [None, True, False])
def test_flat_ema_equals_the_multi_tensor_passes(momentum_on_device: bool, apply: bool | None) -> None:
    cfg = load_config("fastdinov2_tiny", TINY)
    models = [MetaArch(cfg), MetaArch(cfg)]
    state = {k: v.clone() for k, v in models[0].student.state_dict().items()}
    for m in models:  # the same student, a teacher that differs from it
        m.student.load_state_dict(state)
        m.teacher.load_state_dict(state)
        with torch.no_grad():
            for i, p in enumerate(m.student.parameters()):
                p.add_(0.01 * (i + 1))
    models[1].flatten_parameters()
    assert models[1]._flat is not None and models[0]._flat is None
    momentum = torch.tensor(0.9) if momentum_on_device else 0.9
    gate = None if apply is None else torch.tensor(apply)
    for m in models:
        m.update_teacher(momentum, apply=gate)
    for (name, a), b in zip(models[0].teacher.state_dict().items(), models[1].teacher.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    if apply is False:
        for a, b in zip(models[1].teacher.parameters(), models[0].student.parameters(), strict=True):
            assert not torch.equal(a, b)  # left unchanged (the teacher differed from the student)


def test_the_trainer_lays_out_both_models_flat_and_keeps_them_so(tmp_path: Path) -> None:
    root = tmp_path / "data"
    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset

    write_synthetic_dataset(root, SyntheticSpec(num_classes=2, train_per_class=8, val_per_class=2, image_size=40))
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={root}", "train.max_steps=3",
                                          "train.checkpoint_every=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.model._flat is not None
    trainer.run()
    assert all(f.intact() for f in trainer.model._flat)
    resumed = Trainer(cfg, tmp_path / "run")  # the checkpoint loads into the flat layout in place
    assert resumed.restore() is not None and all(f.intact() for f in resumed.model._flat)
    for a, b in zip(resumed.model.teacher.parameters(), trainer.model.teacher.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="differ"):
        flatten_pair(nn.Linear(2, 3), nn.Linear(3, 2))


def test_the_ddp_wrapper_keeps_the_layout() -> None:
    """DDP keeps the parameters (it broadcasts into them and reduces their gradients): the layout survives."""
    import torch.distributed as dist

    from .test_distributed import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        net = _net()
        flat = FlatParameters(net)
        ddp = nn.parallel.DistributedDataParallel(net)
        ddp(torch.randn(3, 4)).sum().backward()
        torch.optim.AdamW(net.parameters(), fused=True).step()
        assert flat.intact() and all(p.grad is not None for p in net.parameters())
    finally:
        dist.destroy_process_group()
