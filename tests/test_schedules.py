"""Schedules: lengths, endpoints, monotonicity and values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastdinov2.train.schedules import concatenate_schedules, cosine_schedule, linear_warmup_then_constant


def test_cosine_without_warmup_hand_values() -> None:
    s = cosine_schedule(1.0, 0.0, 5)
    assert s.dtype == np.float64 and s.shape == (5,)
    # 0.5 * (1 + cos(pi * i / 5)), i = 0..4; the final value would be reached at i = 5
    np.testing.assert_allclose(s, [1.0, 0.9045084972, 0.6545084972, 0.3454915028, 0.0954915028], atol=1e-9)


def test_cosine_with_warmup_hand_values() -> None:
    s = cosine_schedule(1.0, 0.0, 6, warmup_steps=3)
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0, 1.0, 0.75, 0.25], atol=1e-12)


def test_freeze_then_warmup_then_cosine() -> None:
    s = cosine_schedule(2.0, 1.0, 6, warmup_steps=2, start_warmup_value=0.5, freeze_steps=2)
    np.testing.assert_allclose(s, [0.0, 0.0, 0.5, 2.0, 2.0, 1.5], atol=1e-12)


def test_total_shorter_than_warmup_cuts_the_ramp() -> None:
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 3, warmup_steps=5), [0.0, 0.25, 0.5])
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 3, warmup_steps=2, freeze_steps=2), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 1, freeze_steps=4), [0.0])
    assert cosine_schedule(1.0, 0.0, 0, warmup_steps=3).shape == (0,)


def test_constant_when_final_equals_base() -> None:
    np.testing.assert_array_equal(cosine_schedule(0.3, 0.3, 7), np.full(7, 0.3))


def test_monotone_and_endpoints_on_realistic_lengths() -> None:
    lr = cosine_schedule(4e-3, 1e-6, 1000, warmup_steps=100)
    assert lr[0] == 0.0 and lr[99] == 4e-3 and lr[100] == 4e-3
    assert np.all(np.diff(lr[:100]) > 0) and np.all(np.diff(lr[100:]) < 0)
    assert lr[-1] == pytest.approx(1e-6 + (4e-3 - 1e-6) * (1 + math.cos(math.pi * 899 / 900)) / 2)
    assert lr[-1] - 1e-6 < 1e-7
    momentum = cosine_schedule(0.992, 1.0, 500)  # rising cosine (teacher EMA momentum)
    assert momentum[0] == 0.992 and np.all(np.diff(momentum) > 0) and momentum[-1] < 1.0
    assert momentum[250] == pytest.approx(0.996)


def test_linear_warmup_then_constant() -> None:
    s = linear_warmup_then_constant(0.04, 0.07, total_steps=6, warmup_steps=4)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07], atol=1e-12)
    np.testing.assert_allclose(linear_warmup_then_constant(0.04, 0.07, 2, 4), [0.04, 0.05], atol=1e-12)
    np.testing.assert_allclose(linear_warmup_then_constant(0.04, 0.07, 3, 0), [0.07] * 3)


def test_concatenate_schedules() -> None:
    a, b = cosine_schedule(1.0, 0.0, 3), linear_warmup_then_constant(0.0, 1.0, 2, 2)
    out = concatenate_schedules([a, b])
    assert out.dtype == np.float64 and out.shape == (5,)
    np.testing.assert_array_equal(out, np.concatenate([a, b]))
    assert concatenate_schedules([]).shape == (0,)
    with pytest.raises(ValueError, match="part 1"):
        concatenate_schedules([a, np.zeros((2, 2))])


def test_argument_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, -1)
    with pytest.raises(TypeError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="final"):
        cosine_schedule(1.0, float("nan"), 10)
    assert cosine_schedule(1.0, 0.0, np.int64(4)).shape == (4,)  # type: ignore[arg-type]
