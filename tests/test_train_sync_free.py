"""The training step issues no host synchronisation: device values are read only at the loop's sync points.

On a GPU every host read (``.item()``, ``bool(tensor)``, ``nonzero``, boolean indexing, ...) drains the
launch queue, which makes a launch-bound step slower still. On the CPU nothing is asynchronous, so these
tests record the Python-level calls that *would* synchronise on a GPU with a ``TorchFunctionMode``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastdinov2.config import load_config
from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
from fastdinov2.train.loop import DeviceHealth, Trainer

from .test_train_e2e import TINY

SYNCING = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero", "numpy", "unique",
           "masked_select", "_local_scalar_dense", "argwhere", "nonzero_static",
           # tensors made from host data: a blocking host-to-device copy on a GPU
           "tensor", "as_tensor", "new_tensor", "from_numpy"}
# Foreach ops whose scalar argument, if given a tensor, is read back to the host as a Python number.
SCALAR_ONLY = {"_foreach_lerp_", "_foreach_lerp", "_foreach_add_", "_foreach_add", "_foreach_sub_", "_foreach_sub"}


class SyncRecorder(TorchFunctionMode):
    """Records tensor calls that read a device value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.calls.append(name)
        elif name in SCALAR_ONLY and any(isinstance(a, torch.Tensor) for a in [*args[2:], *(kwargs or {}).values()]):
            self.calls.append(f"{name}(tensor scalar)")
        elif name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append("__getitem__[bool mask]")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    return root


@pytest.mark.parametrize("extra", [[], ["dino.centering=sinkhorn_knopp"]])
def test_train_step_has_no_host_sync(data_root: Path, tmp_path: Path, extra: list[str]) -> None:
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data_root}", *extra])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.sync_free  # the fused AdamW kernel is used on the CPU as well
    batches = iter(trainer.make_loader(0, 2))
    trainer.train_step([next(batches)], 0)  # first step: optimizer state is created
    batch = next(batches)
    with SyncRecorder() as rec:
        totals = trainer.train_step([batch], 1)
    assert rec.calls == []
    assert totals is not None and set(totals) >= {"loss", "grad_norm"}
    assert trainer.sync_health(1) is True and trainer.state.nan_skips == 0


def test_nonfinite_step_is_skipped_on_device_and_counted_at_the_sync_point(data_root: Path, tmp_path: Path) -> None:
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data_root}", "train.nan_policy=skip"])
    trainer = Trainer(cfg, tmp_path)
    batches = iter(trainer.make_loader(0, 3))
    trainer.train_step([next(batches)], 0)
    student = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    centers = {id(m): m.center.clone() for m in (trainer.model.dino_loss, trainer.model.ibot_loss)}
    steps = {k: int(s["step"]) for k, s in enumerate(trainer.optimizer.state.values())}
    batch = next(batches)
    batch.global_crops[0, 0, 0, 0] = float("nan")  # poisons the loss and every gradient
    with SyncRecorder() as rec:
        trainer.train_step([batch], 1)
    assert rec.calls == []
    for k, v in trainer.model.student.state_dict().items():
        assert torch.equal(v, student[k]), k  # AdamW skipped on the device (found_inf)
    for k, v in trainer.model.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k  # the EMA was gated too
    for loss in (trainer.model.dino_loss, trainer.model.ibot_loss):
        assert torch.equal(loss.center, centers[id(loss)])  # the non-finite teacher logits were not kept
    assert {k: int(s["step"]) for k, s in enumerate(trainer.optimizer.state.values())} == steps
    assert trainer.state.nan_skips == 0  # not read yet
    assert trainer.sync_health(1) is False
    assert trainer.state.nan_skips == 1 and trainer.state.consecutive_skips == 1
    trainer.train_step([next(batches)], 2)
    assert trainer.sync_health(2) is True and trainer.state.consecutive_skips == 0


def test_device_health_tracks_runs_between_reads() -> None:
    h = DeviceHealth(torch.device("cpu"), consecutive=1)
    vals = {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(2.0)}
    bad = {"loss": torch.tensor(float("nan")), "grad_norm": torch.tensor(2.0)}
    for step, ok in enumerate([False, False, True, False, True, True]):
        h.record(torch.tensor(ok), step, vals if ok else bad)
    snap = h.read()
    # the run carried in (1) + steps 0, 1 = 3; then one more at step 3; it ended at step 3
    assert (snap.n_skipped, snap.run, snap.longest, snap.first_bad, snap.last_ok) == (3, 0, 3, 0, True)
    assert snap.first_values["grad_norm"] == 2.0 and snap.first_values["loss"] != snap.first_values["loss"]
    h.record(torch.tensor(False), 6, bad)
    snap = h.read()
    assert (snap.n_skipped, snap.run, snap.longest, snap.first_bad, snap.last_ok) == (1, 1, 1, 6, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("photometric_on", ["worker", "device"])
def test_cuda_train_step_has_no_host_sync(data_root: Path, tmp_path: Path, photometric_on: str) -> None:
    # the eager step (compute.cuda_graph=auto would replay it as a graph; that test is in test_train_cuda_graph)
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data_root}", "compute.device=cuda",
                                          f"data.photometric_on={photometric_on}", "compute.cuda_graph=false"])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.sync_free
    batches = iter(trainer.make_loader(0, 2))
    trainer.train_step([next(batches)], 0)
    batch = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        trainer.train_step([batch], 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.sync_health(1) is True
