"""Checks shared by the ``fastdinov2 eval`` commands, run before any model is loaded or feature extracted.

- argparse ``type=`` functions for numeric options (:func:`positive_int`, :func:`non_negative_int`,
  :func:`positive_float`, :func:`fraction`, :func:`seed`, :func:`severity`, :func:`corruption_size`): a bad value
  is refused while parsing with ``error: argument --ks: 0 is not a positive integer`` and exit code 2;
- :func:`check_output_file` / :func:`check_cache_dir`: output paths that cannot be written are refused up front
  (an existing directory, a wrong suffix, a parent that is a file or not writable) instead of after all compute;
- :func:`refuse_torchrun`: the eval commands run in one process;
- :func:`patch_multiple` / :func:`check_patch_multiple`: eval sizes must be multiples of the patch size.

This module imports nothing heavy (no torch), so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from fastdinov2.eval.results import EvalError

MIN_CORRUPTION_SIZE = 32  # imagecorruptions refuses smaller images (fastdinov2.eval.corruption checks it too)
SEED_MAX = 2**32 - 1


# ----------------------------------------------------------------------------------------- argparse types
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (must be >= 1)")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative (must be >= 0)")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number (must be > 0)")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1")
    return value


def seed(text: str) -> int:
    """An integer in ``0 .. 2**32 - 1``."""
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is not in 0..{SEED_MAX}")
    return value


def severity(text: str) -> int:
    """An ImageNet-C severity, 1..5."""
    value = _int(text)
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"{text} is not a severity 1..5")
    return value


def corruption_size(text: str) -> int:
    """0 (corrupt at the eval size) or at least :data:`MIN_CORRUPTION_SIZE` pixels."""
    value = _int(text)
    if value != 0 and value < MIN_CORRUPTION_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text} must be 0 (corrupt at --image-size) or at least {MIN_CORRUPTION_SIZE} (imagecorruptions' "
            "smallest image)")
    return value


# ------------------------------------------------------------------------------------------- output paths
def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory (missing folders are created
    when the file is written)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EvalError(f"{what} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EvalError(f"{what} {path}: cannot write in {ancestor} (permission denied)")


def check_output_file(path: str | Path, what: str, suffix: str) -> Path:
    """Refuse an output file that cannot be written, before any work: ``path`` must end in ``suffix``, must
    not be an existing directory and its parent must be (or be creatable in) a writable directory. ``what``
    names the option in messages (``"--output"``)."""
    path = Path(path)
    if path.is_dir():
        raise EvalError(f"{what} {path} is a directory; give a file path such as {path / ('result' + suffix)}")
    if path.suffix != suffix:
        raise EvalError(f"{what} {path} must end in {suffix}")
    _check_parent(path, what)
    return path


def check_cache_dir(path: str | Path | None) -> None:
    """``--cache-dir`` must be a directory or not exist yet (it is created)."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EvalError(f"--cache-dir {path} exists and is not a directory")
    if not path.exists():
        _check_parent(path / "x", "--cache-dir")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise EvalError(f"--cache-dir {path}: permission denied")


# ------------------------------------------------------------------------------------------------ torchrun
def refuse_torchrun(command: str) -> None:
    """Refuse to run under torchrun with more than one process: every rank would run the whole evaluation
    and write the same output files."""
    from fastdinov2.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 2  # a malformed WORLD_SIZE: do not guess that this process is alone
    if world > 1:
        raise EvalError(
            f"`fastdinov2 eval {command}` runs in one process, but it was launched by torchrun with "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}: every rank would run the whole evaluation and write the "
            "same files. Run it without torchrun (use --device cuda for a GPU); the end-of-training kNN of "
            "`fastdinov2 train` is the distributed one")


# ------------------------------------------------------------------------------------------------ patches
def patch_multiple(size: int, patch_size: int) -> int:
    """The multiple of ``patch_size`` nearest to ``size`` (halves round up), at least one patch."""
    if patch_size <= 0:
        return size
    return max(1, math.floor(size / patch_size + 0.5)) * patch_size


def valid_sizes_near(size: int, patch_size: int) -> list[int]:
    """The multiples of ``patch_size`` just below and above ``size`` (only the positive ones)."""
    lo = size // patch_size * patch_size
    return [s for s in (lo, lo + patch_size) if s >= patch_size]


def check_patch_multiple(size: int, patch_size: int, what: str, checkpoint: str | Path) -> None:
    """Raise :class:`EvalError` unless ``size`` is a multiple of the model's ``patch_size``."""
    if patch_size > 0 and size % patch_size:
        near = " or ".join(str(s) for s in valid_sizes_near(size, patch_size))
        raise EvalError(f"{what} {size} is not a multiple of the patch size {patch_size} of {checkpoint}; "
                        f"use {near}")
