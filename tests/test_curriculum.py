"""Curriculum stage boundaries, data positions, per-step schedules in both switch modes, and the sampler."""

from __future__ import annotations

import numpy as np
import pytest

from fastdinov2.config import load_config
from fastdinov2.curriculum import Curriculum
from fastdinov2.train.plan import build_schedules, lr_scale
from fastdinov2.train.sampler import EpochPermutations, StepBatchSampler


def _cfg(*overrides: str):
    return load_config("fastdinov2_tiny", list(overrides))


def test_stage_boundaries_are_a_pure_function_of_step() -> None:
    cfg = _cfg("optim.epochs=8", "train.batch_size_per_gpu=10")
    cur = Curriculum(cfg, dataset_len=100)  # 10 steps per epoch
    assert [(s.start_step, s.end_step) for s in cur.stages] == [(0, 60), (60, 80)]
    assert cur.total_steps == 80
    assert cur.stage_at(0).index == 0 and cur.stage_at(59).index == 0
    assert cur.stage_at(60).index == 1 and cur.stage_at(79).index == 1
    assert cur.stage_at(60).global_size == 64 and cur.stage_at(59).global_size == 32
    assert cur.epoch_at(60) == pytest.approx(6.0)
    assert cur.sample_position(61) == 610


def test_per_stage_batch_size_changes_steps_and_positions() -> None:
    cfg = _cfg("optim.epochs=8", "train.batch_size_per_gpu=10", "curriculum.stages.0.batch_size_per_gpu=20")
    cur = Curriculum(cfg, dataset_len=100, world_size=2)  # stage 0: global 40 -> 2.5 steps/ep; stage 1: 20 -> 5
    assert [(s.start_step, s.end_step) for s in cur.stages] == [(0, 15), (15, 25)]
    assert cur.sample_position(15) == 15 * 40 == 6 * 100  # 6 epochs are 6 x 100 images, none dropped
    assert cur.sample_position(16) == 15 * 40 + 20
    assert cur.steps_for_epochs(7) == 15 + 5
    assert cur.epoch_at(5) == pytest.approx(2.0)


def test_a_stage_of_e_epochs_takes_e_times_the_dataset() -> None:
    # a global batch that does not divide the dataset: no image of an epoch is dropped (within one step)
    cfg = _cfg("optim.epochs=8", "curriculum.stages.0.batch_size_per_gpu=1024")
    cur = Curriculum(cfg, dataset_len=3000)
    for st in cur.stages:
        assert abs(st.num_steps * st.global_batch - st.epochs * 3000) <= st.global_batch / 2


def test_continuous_schedule_spans_the_run() -> None:
    cfg = _cfg("optim.epochs=8", "train.batch_size_per_gpu=10", "optim.warmup_epochs=1",
               "optim.freeze_last_layer_epochs=0.5")
    cur = Curriculum(cfg, dataset_len=100)
    s = build_schedules(cfg, cur)
    peak = cfg.optim.base_lr * lr_scale(cfg, 10)
    assert len(s.lr) == 80
    assert s.lr[0] == 0.0 and s.lr[9] == pytest.approx(peak)  # warm-up over 10 steps
    assert np.all(np.diff(s.lr[10:]) <= 1e-15)  # then monotone cosine decay through the switch
    assert s.lr[-1] == pytest.approx(cfg.optim.min_lr, abs=peak * 1e-2)
    assert np.all(s.last_layer_lr[:5] == 0) and s.last_layer_lr[5] == s.lr[5]
    assert s.momentum[0] == pytest.approx(cfg.teacher.momentum_teacher)
    assert s.teacher_temp[0] == pytest.approx(cfg.teacher.warmup_teacher_temp)
    assert s.teacher_temp[-1] == pytest.approx(cfg.teacher.teacher_temp)


def test_restart_schedule_warms_up_again_at_the_switch() -> None:
    cfg = _cfg("optim.epochs=8", "train.batch_size_per_gpu=10", "optim.warmup_epochs=1",
               "curriculum.switch_mode=restart")
    cur = Curriculum(cfg, dataset_len=100)
    s = build_schedules(cfg, cur)
    cont = build_schedules(_cfg("optim.epochs=8", "train.batch_size_per_gpu=10", "optim.warmup_epochs=1"), cur)
    peak = cfg.optim.base_lr * lr_scale(cfg, 10)
    assert s.lr[60] == 0.0 and s.lr[69] == pytest.approx(peak)  # fresh warm-up at the switch
    assert s.lr[59] < 0.01 * peak  # stage 1 cosine ended
    assert cont.lr[60] > 0.05 * peak and cont.lr[60] < cont.lr[59]
    assert s.momentum[60] == pytest.approx(cfg.teacher.momentum_teacher)
    assert s.teacher_temp[60] == pytest.approx(cfg.teacher.warmup_teacher_temp)
    assert np.array_equal(s.lr[:10], cont.lr[:10])  # the same warm-up in stage 0


def test_sampler_shards_are_disjoint_and_cover_the_global_batch() -> None:
    cfg = _cfg("optim.epochs=8", "train.batch_size_per_gpu=6", "train.grad_accum_steps=2")
    cur2 = Curriculum(cfg, dataset_len=50, world_size=2)
    shards = [list(StepBatchSampler(cur2, seed=3, start_step=0, end_step=5, rank=r, world_size=2)) for r in (0, 1)]
    for step in range(5):
        keys = [k for r in (0, 1) for mb in shards[r][2 * step: 2 * step + 2] for (_, k, _) in mb]
        assert sorted(keys) == list(range(step * 24, (step + 1) * 24))
    # One process with the whole per-step batch sees the same samples in the same global order.
    cfg1 = _cfg("optim.epochs=8", "train.batch_size_per_gpu=12", "train.grad_accum_steps=2")
    one = list(StepBatchSampler(Curriculum(cfg1, 50, 1), seed=3, start_step=0, end_step=1))
    two_keys = sorted(k for r in (0, 1) for mb in shards[r][:2] for (_, k, _) in mb)
    assert sorted(k for mb in one for (_, k, _) in mb) == two_keys


def test_epoch_permutations_cover_the_dataset() -> None:
    perms = EpochPermutations(17, seed=1)
    first = [perms.index_at(p) for p in range(17)]
    second = [perms.index_at(p) for p in range(17, 34)]
    assert sorted(first) == sorted(second) == list(range(17))
    assert first != second


def test_sampler_resumes_mid_run_with_identical_requests() -> None:
    cfg = _cfg("optim.epochs=8", "train.batch_size_per_gpu=7")
    cur = Curriculum(cfg, dataset_len=40)
    full = list(StepBatchSampler(cur, seed=0, start_step=0, end_step=cur.total_steps))
    k = cur.stages[1].start_step
    for start in (k - 1, k, k + 1):
        resumed = list(StepBatchSampler(cur, seed=0, start_step=start, end_step=cur.total_steps))
        assert resumed == full[start:]
    assert {r[2] for r in full[k]} == {1} and {r[2] for r in full[k - 1]} == {0}


def test_describe_and_logged_noise_name_what_each_kind_uses() -> None:
    cfg = _cfg("curriculum.stages.0.noise.kind=blur", "curriculum.stages.1.noise.p=0.5")
    text = Curriculum(cfg, dataset_len=100).describe()
    assert "noise blur sigma 0.1-2" in text and "gaussian max 0.5 (p 0.5)" in text
