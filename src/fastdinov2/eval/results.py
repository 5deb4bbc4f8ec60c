"""Result files of the evaluation protocols: one JSON object per run with a common envelope.

Every protocol writes::

    {"protocol": "knn" | "linear" | "corruption" | "frequency" | ...,
     "checkpoint": "<path given to --checkpoint>",
     "created": "<ISO-8601 UTC time>",
     "fastdinov2_version": "<package version>",
     "config": {... the settings that produced the numbers ...},
     "results": {... protocol-specific, documented in docs/evaluation.md ...}}

Numbers must be finite: NaN/inf are rejected when writing (they would make the JSON invalid).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ENVELOPE_KEYS = ("protocol", "checkpoint", "created", "fastdinov2_version", "config", "results")


class EvalError(ValueError):
    """Bad evaluation input (missing folder, class mismatch, malformed result file, ...); the message
    names the offending path, key or value."""


def _jsonable(value: Any, where: str) -> Any:
    """Convert tensors / numpy scalars / paths / tuples to plain JSON values; reject NaN and inf."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise EvalError(f"result value {where} is {value}; results must be finite numbers")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise EvalError(f"result value {where} has type {type(value).__name__}, which is not JSON-serialisable")


def make_envelope(protocol: str, checkpoint: str | Path | None, config: dict, results: dict) -> dict:
    """Build the common result envelope (see module docstring)."""
    from fastdinov2 import __version__

    return {
        "protocol": protocol,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fastdinov2_version": __version__,
        "config": _jsonable(config, "config"),
        "results": _jsonable(results, "results"),
    }


def current_umask() -> int:
    """The process umask. Read from ``/proc/self/status`` (Linux) where possible; elsewhere set and restored
    with ``os.umask``, which is racy against threads creating files at the same instant (acceptable here)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def share_like_a_new_file(path: str | Path) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would: ``0o666 & ~umask``.

    ``tempfile.mkstemp`` creates files with mode 0600, so a result written through a temp file and renamed
    would be unreadable by colleagues on a shared cluster."""
    os.chmod(path, 0o666 & ~current_umask())


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file beside it, which gets the permissions of a
    freshly created file (:func:`share_like_a_new_file`) and is renamed over ``path``. Creates parent dirs;
    the temp file is removed when ``write`` fails. Every eval writer (results, linear heads, feature cache)
    goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        share_like_a_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file + rename, mode ``0o666 & ~umask``);
    creates parent dirs."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"

    def _write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write_atomic(path, _write)


def write_result(
    path: str | Path, protocol: str, checkpoint: str | Path | None, config: dict, results: dict
) -> Path:
    """Write a protocol result (common envelope) to ``path``; returns the path."""
    return write_json_atomic(path, make_envelope(protocol, checkpoint, config, results))


def read_result(path: str | Path, protocol: str | None = None) -> dict:
    """Read a result JSON written by :func:`write_result`; checks the envelope and, if given, the protocol."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"result file {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"result file {path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise EvalError(f"result file {path} must hold a JSON object, found {type(obj).__name__}")
    missing = [k for k in ENVELOPE_KEYS if k not in obj]
    if missing:
        raise EvalError(f"result file {path} lacks envelope key(s) {missing}")
    if protocol is not None and obj["protocol"] != protocol:
        raise EvalError(f"result file {path} holds protocol {obj['protocol']!r}, expected {protocol!r}")
    return obj
