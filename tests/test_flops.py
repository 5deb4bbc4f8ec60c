"""`fastdinov2 flops`: per-stage FLOPs counted from a real step; the paper's pair lands near 2.25x."""

from __future__ import annotations

import json

import pytest

from fastdinov2.cli import main
from fastdinov2.config import load_config
from fastdinov2.flops import count_step_flops


def test_paper_vitb16_pair_ratio_is_near_2_25(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--config", "fastdinov2_vitb16_in1k", "--baseline", "dinov2_vitb16_in1k", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["ratio"] - 2.25) / 2.25 < 0.10
    assert result["differs_outside_curriculum"] == []  # a fair pair: the ratio is the curriculum's
    low, full = result["stages"]
    assert (low["global_size"], full["global_size"]) == (112, 224)
    assert 3.5 < full["gflops_per_image"] / low["gflops_per_image"] < 4.2  # ~4x fewer tokens


def test_flops_scale_with_tokens() -> None:
    cfg = load_config("dinov2_tiny", ["crops.local_crops_number=0"])
    small = count_step_flops(cfg, 32, 16)
    large = count_step_flops(cfg, 64, 32)
    assert 3.0 < large / small < 4.5  # 17 vs 65 tokens per global crop; heads add a fixed part


def test_text_output_names_stages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--config", "fastdinov2_tiny", "--baseline", "dinov2_tiny"]) == 0
    out = capsys.readouterr().out
    assert "low_res" in out and "full_res_noise" in out and "ratio" in out


def test_a_pair_that_differs_outside_the_curriculum_is_flagged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--config", "fastdinov2_tiny", "--baseline", "dinov2_vits16_in100", "--json"]) == 0
    captured = capsys.readouterr()
    assert "optim.epochs" in json.loads(captured.out)["differs_outside_curriculum"]
    assert "differ outside the curriculum" in captured.err
