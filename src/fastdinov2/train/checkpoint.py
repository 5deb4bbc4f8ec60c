"""Crash-safe checkpoints: write to a temporary folder, flush, rename, and only then count as committed.

Layout: ``RUN/checkpoints/step_XXXXXXXX/`` holding ``model.pt`` (student, teacher, loss centres, the
backbone config), ``optim.pt`` (optimizer, grad scaler, RNG states, data position, counters) and a
``COMMITTED`` marker (JSON metadata). A checkpoint is written as ``.tmp-step_XXXXXXXX-<pid>/``, each file
fsynced, the marker written last, then the folder is renamed into place (an atomic rename on POSIX)
and the parent directory fsynced. Loaders only ever see folders that carry the final name *and* the
marker, so a process killed mid-save leaves the previous checkpoint as the newest. Old checkpoints are
deleted only after the new one is committed, keeping the newest ``keep_last``.

"Newest" means furthest along the data stream: the marker records the data position (``sample_position``,
images consumed) next to the step. The step number in a folder's name depends on the global batch, hence on
the world size: a run continued on more processes writes smaller step numbers for later positions, so names
are never used to order checkpoints.

All loading goes through ``torch.load(weights_only=True)``: no arbitrary code runs from a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

COMMITTED = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Free bytes below which a failed write is reported as a full disk.
_FULL_DISK_BYTES = 64 << 20


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            # torch.save's zip writer reports a failed write as a RuntimeError ("unexpected pos ..."), not as
            # the OSError behind it: tell a full disk from other failures by the space left.
            full = shutil.disk_usage(path.parent).free < _FULL_DISK_BYTES
            raise OSError(errno.ENOSPC if full else errno.EIO, f"writing {path} failed: {exc}") from exc
        f.flush()
        os.fsync(f.fileno())


def _progress_key(path: Path, step: int) -> tuple[int, float, int]:
    """Sort key of a committed checkpoint: (data position, commit time, step).

    A marker without a data position (written before it was recorded, or by :func:`save_checkpoint` without
    one) sorts before every marker with one, then by commit time: a run continued by a newer version wrote
    the later ones.
    """
    try:
        info = json.loads((path / COMMITTED).read_text())
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    position = info.get("sample_position")
    stamp = info.get("time")
    return (int(position) if isinstance(position, int) else -1,
            float(stamp) if isinstance(stamp, int | float) else 0.0, step)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``root`` as (step, path), oldest first: ordered by data position, then
    commit time (module docstring), not by the step in the name."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / COMMITTED).is_file():
                step = int(m.group(1))
                found.append((_progress_key(p, step), step, p))
    return [(step, p) for _, step, p in sorted(found)]


def find_latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete ``.tmp-*`` folders left by an interrupted save; returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
    keep_last: int = 2,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the checkpoint of ``step`` under ``root`` and prune older ones.

    ``meta`` goes into the ``COMMITTED`` marker; its ``sample_position`` (the data position) orders the
    checkpoints (module docstring). The one just written is never pruned.

    On any failure (for example "no space left on device") the temporary folder is removed, the
    previously committed checkpoints stay untouched, and :class:`CheckpointError` explains what happened.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save_file(model_state, tmp / "model.pt")
        _save_file(optim_state, tmp / "optim.pt")
        info = {"step": step, "time": time.time(), **(meta or {})}
        with open(tmp / COMMITTED, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        replaced = None
        if final.exists():  # the same step name again (a resume on another world size): set the old one aside
            replaced = root / f".tmp-replaced-{step_dir_name(step)}-{os.getpid()}"
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = find_latest_checkpoint(root)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        reason = "no space left on device" if exc.errno == errno.ENOSPC else str(exc)
        raise CheckpointError(f"could not save the checkpoint of step {step} to {final}: {reason}; {kept}") from exc
    for _, old in list_checkpoints(root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``(model_state, optim_state)`` from a committed checkpoint folder."""
    if not (path / COMMITTED).is_file():
        raise CheckpointError(f"{path} is not a committed checkpoint (no {COMMITTED} marker)")
    states = []
    for name in ("model.pt", "optim.pt"):
        f = path / name
        try:
            states.append(torch.load(f, map_location=map_location, weights_only=True))
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint file missing: {f}") from exc
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint file {f}: {_load_failure(exc)}") from exc
    return states[0], states[1]


def _load_failure(exc: Exception) -> str:
    """The reason a ``torch.load(weights_only=True)`` failed, without PyTorch's advice to load the file with
    ``weights_only=False`` (which would run whatever code a tampered file holds)."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        text = text.replace("WeightsUnpickler error:", "\n")
        kept = [ln.strip() for ln in text.splitlines()
                if ln.strip() and not any(w in ln for w in ("weights_only", "Weights only", "file an issue"))]
        return "not a checkpoint written by fastdinov2" + (f" ({' '.join(kept)})" if kept else "")
    return text.splitlines()[0] if text else type(exc).__name__
