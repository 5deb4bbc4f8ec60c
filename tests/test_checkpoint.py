"""Crash-safe checkpoints: atomic commit, retention, ENOSPC and SIGKILL in the middle of a save."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdinov2.train import checkpoint as ck


def _states(v: float) -> tuple[dict, dict]:
    return {"w": torch.full((4,), v)}, {"step": int(v)}


def test_save_commit_and_load(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 7, *_states(7.0))
    assert path.name == "step_00000007" and (path / ck.COMMITTED).is_file()
    model, optim = ck.load_checkpoint(path)
    assert torch.equal(model["w"], torch.full((4,), 7.0)) and optim["step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_keep_last_deletes_old_only_after_commit(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, s, *_states(float(s)), keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]


def test_checkpoints_are_ordered_by_data_position_not_by_step_name(tmp_path: Path) -> None:
    # One process wrote steps 12 and 16 (64 images per step); the run continued on two processes (128 per
    # step) from step 16 = step 8 there, and saves steps 10 and 12: later in the data, smaller in name.
    for step, pos in ((12, 768), (16, 1024)):
        ck.save_checkpoint(tmp_path, step, *_states(float(step)), meta={"sample_position": pos})
    ck.save_checkpoint(tmp_path, 10, *_states(10.0), meta={"sample_position": 1280})
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [16, 10]  # step 12 (768) pruned, not the new one
    assert ck.find_latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    # The same name again (step 12, now at 1536 images) replaces the old folder of that name, if any.
    ck.save_checkpoint(tmp_path, 16, *_states(99.0), meta={"sample_position": 2048})
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [10, 16]
    assert torch.equal(ck.load_checkpoint(tmp_path / "step_00000016")[0]["w"], torch.full((4,), 99.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_markers_without_a_data_position_sort_first_then_by_commit_time(tmp_path: Path) -> None:
    for step in (9, 3):  # an older version's checkpoints: no data position; the later commit is newer
        ck.save_checkpoint(tmp_path, step, *_states(float(step)), keep_last=5)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [9, 3]
    ck.save_checkpoint(tmp_path, 1, *_states(1.0), keep_last=5, meta={"sample_position": 8})
    assert ck.find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_a_checkpoint_root_that_is_a_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(ck.CheckpointError, match="could not save the checkpoint of step 1 to .*checkpoints"):
        ck.save_checkpoint(tmp_path / "checkpoints", 1, *_states(1.0))


def test_uncommitted_folders_are_ignored(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 1, *_states(1.0))
    (tmp_path / "step_00000002").mkdir()  # a folder without the marker: not a checkpoint
    (tmp_path / ".tmp-step_00000003-1").mkdir()
    assert ck.find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert ck.remove_stale_temporaries(tmp_path) == [tmp_path / ".tmp-step_00000003-1"]
    with pytest.raises(ck.CheckpointError, match="step_00000002"):
        ck.load_checkpoint(tmp_path / "step_00000002")


def test_no_space_left_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save_checkpoint(tmp_path, 1, *_states(1.0))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        if isinstance(obj, dict) and "step" in obj:  # the optimizer file: fail half way through the save
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError, match="no space left on device.*step_00000001 is intact"):
        ck.save_checkpoint(tmp_path, 2, *_states(2.0))
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    model, _ = ck.load_checkpoint(tmp_path / "step_00000001")
    assert torch.equal(model["w"], torch.full((4,), 1.0))


def test_a_full_disk_reported_by_torch_save_as_runtime_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save's zip writer turns a failed write into "RuntimeError: [enforce fail at inline_container.cc]
    # ... unexpected pos"; a nearly full disk makes that "no space left on device"
    ck.save_checkpoint(tmp_path, 1, *_states(1.0))

    def failing_save(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil_usage(free=1024))
    with pytest.raises(ck.CheckpointError, match="no space left on device.*step_00000001 is intact"):
        ck.save_checkpoint(tmp_path, 2, *_states(2.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil_usage(free=10 << 30))
    with pytest.raises(ck.CheckpointError, match="writing .*model.pt failed: .*unexpected pos"):
        ck.save_checkpoint(tmp_path, 2, *_states(2.0))
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]


def shutil_usage(free: int) -> object:
    import shutil

    return shutil._ntuple_diskusage(total=free * 4, used=free * 3, free=free)  # type: ignore[attr-defined]


_SLOW_SAVER = r"""
import sys, time, torch
from pathlib import Path
from fastdinov2.train import checkpoint as ck
root = Path(sys.argv[1])
ck.save_checkpoint(root, 1, {"w": torch.zeros(3)}, {"step": 1})
real = torch.save
def slow(obj, f, *a, **k):
    real(obj, f, *a, **k)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow
ck.save_checkpoint(root, 2, {"w": torch.ones(3)}, {"step": 2})
"""


def test_sigkill_during_save_resumes_from_previous(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"  # now inside the second save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the half-written one is there...
    latest = ck.find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step_00000001"  # ...but never counts
    model, _ = ck.load_checkpoint(latest)
    assert torch.equal(model["w"], torch.zeros(3))


def test_load_refuses_pickled_code(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 1, *_states(1.0))

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, path / "model.pt")
    with pytest.raises(ck.CheckpointError, match="model.pt") as info:
        ck.load_checkpoint(path)
    assert "not a checkpoint written by fastdinov2" in str(info.value)
    assert "weights_only" not in str(info.value)  # no advice to load it unsafely
    assert not (tmp_path / "pwned").exists()
