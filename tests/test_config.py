"""Config schema: presets load, overrides apply, and every rule rejects bad values naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdinov2.config import ConfigError, diff_configs, list_presets, load_config, to_yaml


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name: str) -> None:
    cfg = load_config(name)
    assert cfg.optim.epochs > 0
    assert len(cfg.curriculum.stages) >= 1


def test_required_presets_exist() -> None:
    assert {
        "dinov2_tiny", "fastdinov2_tiny", "dinov2_vits16_in100", "fastdinov2_vits16_in100",
        "dinov2_vitb16_in1k", "fastdinov2_vitb16_in1k",
    } <= set(list_presets())


def test_default_is_fastdinov2_tiny() -> None:
    cfg = load_config(None)
    assert [s.global_size for s in cfg.curriculum.stages] == [32, 64]
    assert cfg.curriculum.stages[1].noise.kind == "gaussian"


def test_paper_presets_match_spec() -> None:
    fast = load_config("fastdinov2_vits16_in100")
    base = load_config("dinov2_vits16_in100")
    assert [(s.epochs, s.global_size, s.local_size) for s in fast.curriculum.stages] == [
        (150, 112, 48), (50, 224, 96)]
    assert fast.curriculum.stages[1].noise.max_scale == 0.5
    assert fast.curriculum.stages[0].noise.kind == "none"
    assert base.optim.epochs == fast.optim.epochs == 200
    assert (base.optim.base_lr, base.optim.min_lr, base.optim.warmup_epochs) == (0.004, 1e-6, 10)
    assert (base.teacher.momentum_teacher, base.teacher.warmup_teacher_temp, base.teacher.teacher_temp) == (
        0.992, 0.04, 0.07)
    assert base.dino.head_n_prototypes == 65536 and base.crops.local_crops_number == 8
    assert diff_configs(base, fast) and all(k.startswith("curriculum.") for k in diff_configs(base, fast))
    assert load_config("fastdinov2_vitb16_in1k").student.arch == "vit_base"


def test_overrides_apply_including_list_items() -> None:
    cfg = load_config("fastdinov2_tiny", ["train.max_steps=3", "curriculum.stages.1.noise.max_scale=0.2"])
    assert cfg.train.max_steps == 3
    assert cfg.curriculum.stages[1].noise.max_scale == 0.2


def test_yaml_roundtrip(tmp_path: Path) -> None:
    cfg = load_config("fastdinov2_tiny")
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert diff_configs(load_config(str(f)), cfg) == []


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.unknown_key=1", "train.unknown_key"),
        ("nosuchsection.x=1", "nosuchsection.x"),
        ("train.batch_size_per_gpu=abc", "train.batch_size_per_gpu"),
        ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu"),
        ("curriculum.stages.0.global_size=20", "curriculum.stages.0.global_size"),
        ("curriculum.stages.0.local_size=48", "curriculum.stages.0.local_size"),
        ("curriculum.stages.0.lowpass=wavelet", "curriculum.stages.0.lowpass"),
        ("curriculum.stages.0.fraction=0.5", "curriculum.stages"),
        ("curriculum.stages.1.noise.kind=salt", "curriculum.stages.1.noise.kind"),
        ("curriculum.stages.1.noise.p=1.5", "curriculum.stages.1.noise.p"),
        ("curriculum.switch_mode=sometimes", "curriculum.switch_mode"),
        ("crops.global_crops_size=60", "crops.global_crops_size"),
        ("student.arch=resnet50", "student.arch"),
        ("dino.centering=none", "dino.centering"),
        ("optim.warmup_epochs=100", "optim.warmup_epochs"),
        ("train.keep_last_checkpoints=1", "train.keep_last_checkpoints"),
        ("train.nan_policy=ignore", "train.nan_policy"),
        ("ibot.mask_ratio_min=0.9", "ibot.mask_ratio_min"),
        ("compute.precision=fp8", "compute.precision"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("fastdinov2_tiny", [override])


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("base: fastdinov2_tiny\ntrain:\n  batch_sise_per_gpu: 3\n")
    with pytest.raises(ConfigError, match="batch_sise_per_gpu"):
        load_config(str(f))


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="fastdinov2_tiny"):
        load_config("no_such_preset")


def test_stage_needs_exactly_one_length(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("base: dinov2_tiny\ncurriculum:\n  stages:\n    - {fraction: 1.0, epochs: 12, global_size: 64, "
                 "local_size: 32}\n")
    with pytest.raises(ConfigError, match=r"curriculum\.stages\.0\.epochs"):
        load_config(str(f))
