"""Training metrics: one JSON line per logged step in ``RUN/metrics.jsonl``, optionally also TensorBoard.

The JSONL file is the record of a run (``fastdinov2 report`` reads it); TensorBoard is a convenience for
watching a run live and is only used when the optional ``tensorboard`` package is installed
(``pip install fastdinov2[tensorboard]``).

Only rank 0 should write: the caller decides that by passing ``enabled=get_rank() == 0``.

On resume the caller calls :meth:`MetricsLogger.truncate_from` with the resume step, which drops every
line logged at or after that step (they belong to the part of the run that is being replayed), so the
file never holds a step twice.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsFileError(ValueError):
    """``metrics.jsonl`` holds a line that is not a JSON object with an integer ``step``."""


def _parse_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise MetricsFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    step = obj.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise MetricsFileError(f"{path}:{lineno}: missing or non-integer 'step' ({step!r})")
    return obj


def _read_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(raw line, parsed record) pairs. A last line cut short by a crash is dropped; others must parse."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out: list[tuple[str, dict[str, Any]]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1
        try:
            out.append((line, _parse_line(line, path, i + 1)))
        except json.JSONDecodeError as exc:
            if last and not text.endswith("\n"):
                break  # the write of the final line was interrupted
            raise MetricsFileError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (or of ``RUN/metrics.jsonl`` when given a run dir).

    A truncated last line (a crash mid-write) is ignored; any other malformed line raises
    :class:`MetricsFileError` naming the file and line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    return [rec for _, rec in _read_lines(p)]


def _scalar(value: Any) -> float | None:
    """A plain float for numbers (python, numpy, 0-d tensors); None for everything else (strings, bools)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        v = item()
        return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | bool | int) or value is None:
        return value
    s = _scalar(value)
    if s is not None:
        return s
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    raise TypeError(f"metrics value of type {type(value).__name__} cannot be logged: {value!r}")


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package is installed)."""
    return importlib.util.find_spec("tensorboard") is not None


class MetricsLogger:
    """Appends one JSON line per :meth:`log` call to ``RUN_DIR/metrics.jsonl`` (flushed each time).

    Args:
        run_dir: the run directory; created if missing (when enabled).
        enabled: False on non-zero ranks; every method is then a no-op.
        tensorboard: True requires the ``tensorboard`` package (raises ``ModuleNotFoundError`` naming it
            when missing), False never uses it, None uses it when installed. Scalars go to
            ``RUN_DIR/tensorboard`` with tag ``train/<key>``.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        if tensorboard and not tensorboard_available():
            # Raised on every rank so that all ranks stop together rather than rank 0 alone.
            raise ModuleNotFoundError(
                "TensorBoard logging was requested but the 'tensorboard' package is not installed; "
                "install it with `pip install tensorboard` (or `pip install fastdinov2[tensorboard]`), "
                "or turn TensorBoard logging off",
                name="tensorboard",
            )
        self.use_tensorboard = bool(tensorboard if tensorboard is not None else tensorboard_available())
        self._file: TextIO | None = None
        self._writer: Any = None
        self._purge_step: int | None = None

    # -- file handling -------------------------------------------------------------------------------
    def _open(self) -> TextIO:
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                self._drop_partial_last_line()
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def _drop_partial_last_line(self) -> None:
        """A crash mid-write leaves a last line without its newline; cut it off before appending."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def _tb(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = str(self.run_dir / TENSORBOARD_DIR)
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=self._purge_step)
        return self._writer

    def truncate_from(self, step: int) -> int:
        """Drop every record with ``step >= step`` (and a truncated last line); returns how many remain.

        Call once on resume, before the first :meth:`log`. The rewrite is atomic (temp file + rename).
        TensorBoard events from those steps are purged when the writer opens.
        """
        if not self.enabled:
            return 0
        self._purge_step = step
        if self._writer is not None:
            raise RuntimeError("MetricsLogger.truncate_from must be called before the first log() call")
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.path.is_file():
            return 0
        kept = [line for line, rec in _read_lines(self.path) if rec["step"] < step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(line + "\n" for line in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return len(kept)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (must hold an integer ``step``); numbers may be python, numpy or 0-d tensors.

        Non-finite values are written as JSON ``NaN``/``Infinity`` (Python's json reads them back).
        """
        if not self.enabled:
            return
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"metrics record needs an integer 'step', got {step!r}")
        clean = {str(k): _jsonable(v) for k, v in record.items()}
        fh = self._open()
        fh.write(json.dumps(clean) + "\n")
        fh.flush()
        if self.use_tensorboard:
            writer = self._tb()
            for key, value in clean.items():
                s = _scalar(value)
                if key != "step" and s is not None and math.isfinite(s):
                    writer.add_scalar(f"train/{key}", s, global_step=step)
            writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
