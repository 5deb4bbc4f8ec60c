"""Per-step schedules as precomputed arrays (DINOv2 style): pure functions, indexed by the global step.

Every function returns a float64 ``np.ndarray`` of length ``total_steps``; the trainer reads
``schedule[step]``, so a resumed run sees exactly the same values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np


def _steps(name: str, value: int) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer number of steps, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _finite(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """Zeros for ``freeze_steps``, linear warm-up, then a half-cosine from ``base`` towards ``final``.

    Exactly DINOv2's ``CosineScheduler``:

    - steps ``[0, F)``: 0 (``F = freeze_steps``);
    - steps ``[F, F + W)``: ``np.linspace(start_warmup_value, base, W)`` (the last warm-up step is ``base``);
    - the remaining ``C`` steps, ``i = 0 .. C-1``: ``final + (base - final) * (1 + cos(pi * i / C)) / 2``,
      which starts at ``base`` and would reach ``final`` at ``i = C``, one step past the end.

    If ``total_steps`` is shorter than freeze + warm-up, the schedule is cut: the warm-up keeps its slope
    and simply does not finish.

    Returns:
        float64 array ``[total_steps]``.
    """
    base, final = _finite("base", base), _finite("final", final)
    start_warmup_value = _finite("start_warmup_value", start_warmup_value)
    total = _steps("total_steps", total_steps)
    warmup = _steps("warmup_steps", warmup_steps)
    freeze = _steps("freeze_steps", freeze_steps)

    frozen = np.zeros(min(freeze, total), dtype=np.float64)
    warm = np.linspace(start_warmup_value, base, warmup, dtype=np.float64)[: total - len(frozen)]
    n_cos = total - len(frozen) - len(warm)
    i = np.arange(n_cos, dtype=np.float64)
    cos = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(n_cos, 1)))
    out = np.concatenate([frozen, warm, cos])
    assert out.shape == (total,)
    return out


def linear_warmup_then_constant(
    start_value: float, final_value: float, total_steps: int, warmup_steps: int
) -> np.ndarray:
    """Linear ramp ``np.linspace(start_value, final_value, warmup_steps)``, then ``final_value``.

    DINOv2's teacher-temperature schedule (e.g. 0.04 -> 0.07 over 30 epochs, then 0.07). The ramp is
    cut if ``total_steps < warmup_steps``.

    Returns:
        float64 array ``[total_steps]``.
    """
    return cosine_schedule(
        final_value, final_value, total_steps, warmup_steps, start_warmup_value=start_value
    )


def concatenate_schedules(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Join 1-D schedules end to end (e.g. one per curriculum stage) into one float64 array."""
    arrays = []
    for n, part in enumerate(parts):
        a = np.asarray(part, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"schedule part {n} must be 1-D, got shape {a.shape}")
        arrays.append(a)
    if not arrays:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(arrays)
