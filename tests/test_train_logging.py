"""MetricsLogger: JSONL writing, truncation on resume, optional TensorBoard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastdinov2.train.logging import MetricsFileError, MetricsLogger, read_metrics, tensorboard_available


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_one_flushed_json_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=True, tensorboard=False)
    logger.log({"step": 0, "loss": torch.tensor(1.5), "lr": np.float32(0.25), "stage": "low"})
    # flushed before close: another reader sees it now
    expected = [{"step": 0, "loss": 1.5, "lr": 0.25, "stage": "low"}]
    assert _lines(tmp_path / "run" / "metrics.jsonl") == expected
    logger.log({"step": 10, "loss": 1.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 10]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.log({"step": 0, "loss": 1.0})
    assert logger.truncate_from(0) == 0
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_log_rejects_missing_step(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    with pytest.raises(ValueError, match="step"):
        logger.log({"loss": 1.0})


def test_truncate_from_drops_replayed_steps_and_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in (0, 10, 20, 30):
        first.log({"step": step, "loss": float(step)})
    first.close()
    with path.open("a") as fh:  # a crash in the middle of writing step 40
        fh.write('{"step": 40, "lo')

    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    assert resumed.truncate_from(20) == 2
    assert [r["step"] for r in _lines(path)] == [0, 10]
    for step in (20, 30):
        resumed.log({"step": step, "loss": -1.0})
    resumed.close()
    steps = [r["step"] for r in _lines(path)]
    assert steps == [0, 10, 20, 30]
    assert len(set(steps)) == len(steps)
    assert [r["loss"] for r in _lines(path)] == [0.0, 10.0, -1.0, -1.0]


def test_append_after_partial_line_drops_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 10, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0]
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        logger.log({"step": 20, "loss": 2.0})
    assert [r["step"] for r in read_metrics(path)] == [0, 20]


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    path.write_text('{"step": 0}\n{"loss": 1.0}\n')
    with pytest.raises(MetricsFileError, match="step"):
        read_metrics(path)


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_tensorboard_requested_but_missing_raises_naming_the_package(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="tensorboard"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=True)


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_tensorboard_auto_mode_skips_silently_when_missing(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=None) as logger:
        assert not logger.use_tensorboard
        logger.log({"step": 1, "loss": 0.5})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert not (tmp_path / "tensorboard").exists()


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional extra)."""

    instances: list[_FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_scalars_are_mirrored_to_tensorboard_with_purge_on_resume(tmp_path, monkeypatch):
    import sys
    import types

    import fastdinov2.train.logging as mlog

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(mlog, "tensorboard_available", lambda: True)
    _FakeWriter.instances.clear()

    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.truncate_from(20)
    logger.log({"step": 20, "loss": 1.25, "stage": 1, "note": "text", "nan": float("nan"), "flag": True})
    logger.close()
    (writer,) = _FakeWriter.instances
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.purge_step == 20 and writer.closed
    # numbers only (strings, bools and non-finite values are not scalars), tagged train/<key>, at the step
    assert writer.scalars == [("train/loss", 1.25, 20), ("train/stage", 1.0, 20)]


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard (optional extra) is not installed")
def test_real_tensorboard_events_can_be_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, enabled=True, tensorboard=None) as logger:
        assert logger.use_tensorboard
        for step in (0, 10):
            logger.log({"step": step, "loss": 2.0 - step / 10, "stage": "x"})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 2.0), (10, 1.0)]
    assert "train/stage" not in acc.Tags()["scalars"]
