"""Config schema: presets load, overrides apply, and every rule rejects bad values naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastdinov2.config import MAX_SEED, ConfigError, diff_configs, list_presets, load_config, to_yaml


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


@pytest.mark.parametrize(
    ("override", "key", "shown"),
    [
        ("student.num_heads=0", "student.num_heads", "0"),
        ("student.embed_dim=0", "student.embed_dim", "0"),
        ("student.embed_dim=130", "student.embed_dim", "130"),  # the tiny presets have 4 heads
        ("student.depth=0", "student.depth", "0"),
        ("student.mlp_ratio=0", "student.mlp_ratio", "0.0"),
        ("student.patch_size=-8", "student.patch_size", "-8"),
        ("student.drop_path_rate=1", "student.drop_path_rate", "1.0"),
        ("student.head_warmup_epochs=-1", "student.head_warmup_epochs", "-1.0"),
        ("student.num_register_tokens=-1", "student.num_register_tokens", "-1"),
        ("dino.loss_weight=-1", "dino.loss_weight", "-1.0"),
        ("dino.koleo_loss_weight=-0.1", "dino.koleo_loss_weight", "-0.1"),
        ("dino.head_n_prototypes=0", "dino.head_n_prototypes", "0"),
        ("dino.head_bottleneck_dim=0", "dino.head_bottleneck_dim", "0"),
        ("dino.head_hidden_dim=0", "dino.head_hidden_dim", "0"),
        ("dino.head_nlayers=0", "dino.head_nlayers", "0"),
        ("ibot.loss_weight=-1", "ibot.loss_weight", "-1.0"),
        ("ibot.head_n_prototypes=0", "ibot.head_n_prototypes", "0"),
        ("ibot.head_bottleneck_dim=0", "ibot.head_bottleneck_dim", "0"),
        ("ibot.head_hidden_dim=-5", "ibot.head_hidden_dim", "-5"),
        ("ibot.head_nlayers=0", "ibot.head_nlayers", "0"),
        ("ibot.mask_sample_probability=1.5", "ibot.mask_sample_probability", "1.5"),
        ("ibot.mask_ratio_max=2", "ibot.mask_ratio_max", "2.0"),
        ("ibot.loss_chunk_rows=-1", "ibot.loss_chunk_rows", "-1"),
        ("teacher.momentum_teacher=-0.1", "teacher.momentum_teacher", "-0.1"),
        ("teacher.final_momentum_teacher=1.5", "teacher.final_momentum_teacher", "1.5"),
        ("teacher.warmup_teacher_temp=0", "teacher.warmup_teacher_temp", "0.0"),
        ("teacher.teacher_temp=-0.04", "teacher.teacher_temp", "-0.04"),
        ("teacher.warmup_teacher_temp_epochs=-5", "teacher.warmup_teacher_temp_epochs", "-5.0"),
        ("optim.epochs=0", "optim.epochs", "0"),
        ("optim.base_lr=-0.004", "optim.base_lr", "-0.004"),
        ("optim.base_lr=inf", "optim.base_lr", "inf"),
        ("optim.min_lr=-1", "optim.min_lr", "-1.0"),
        ("optim.min_lr=nan", "optim.min_lr", "nan"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs", "-1.0"),
        ("optim.lr_reference_batch=0", "optim.lr_reference_batch", "0"),
        ("optim.weight_decay=-1", "optim.weight_decay", "-1.0"),
        ("optim.weight_decay_end=-0.4", "optim.weight_decay_end", "-0.4"),
        ("optim.clip_grad=-3", "optim.clip_grad", "-3.0"),
        ("optim.layerwise_decay=0", "optim.layerwise_decay", "0.0"),
        ("optim.patch_embed_lr_mult=-0.2", "optim.patch_embed_lr_mult", "-0.2"),
        ("optim.freeze_last_layer_epochs=-1", "optim.freeze_last_layer_epochs", "-1.0"),
        ("optim.adamw_beta1=1.5", "optim.adamw_beta1", "1.5"),
        ("optim.adamw_beta1=-0.1", "optim.adamw_beta1", "-0.1"),
        ("optim.adamw_beta2=1", "optim.adamw_beta2", "1.0"),
        ("crops.global_crops_scale_min=0", "crops.global_crops_scale_min", "0.0"),
        ("crops.global_crops_scale_max=1.5", "crops.global_crops_scale_max", "1.5"),
        ("crops.local_crops_scale_min=0.5", "crops.local_crops_scale_min", "0.5"),  # above local max 0.32
        ("crops.local_crops_number=-1", "crops.local_crops_number", "-1"),
        ("curriculum.stages.1.noise.max_scale=-0.5", "curriculum.stages.1.noise.max_scale", "-0.5"),
        ("curriculum.stages.1.noise.max_scale=nan", "curriculum.stages.1.noise.max_scale", "nan"),
        ("curriculum.stages.1.noise.blur_sigma_min=0", "curriculum.stages.1.noise.blur_sigma_min", "0.0"),
        ("curriculum.stages.1.noise.blur_sigma_max=0.05", "curriculum.stages.1.noise.blur_sigma_max", "0.05"),
        ("curriculum.stages.0.batch_size_per_gpu=0", "curriculum.stages.0.batch_size_per_gpu", "0"),
        ("data.num_workers=-1", "data.num_workers", "-1"),
        ("data.max_bad_samples=-1", "data.max_bad_samples", "-1"),
        ("train.seed=-1", "train.seed", "-1"),
        (f"train.seed={MAX_SEED + 1}", "train.seed", str(MAX_SEED + 1)),
        ("train.max_steps=0", "train.max_steps", "0"),
        ("train.log_every=0", "train.log_every", "0"),
        ("train.checkpoint_every=-1", "train.checkpoint_every", "-1"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps", "0"),
        ("train.max_consecutive_skips=0", "train.max_consecutive_skips", "0"),
        ("compute.threads=-1", "compute.threads", "-1"),
        ("compute.masked_tokens_bucket=-1", "compute.masked_tokens_bucket", "-1"),
    ],
)
def test_impossible_values_name_the_key_and_value(override: str, key: str, shown: str) -> None:
    value = re.escape(shown)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ({value} |.*, got {value}$)"):
        load_config("fastdinov2_tiny", [override])


@pytest.mark.parametrize(
    "override",
    ["train.seed=0", f"train.seed={MAX_SEED}", "compute.threads=0", "compute.threads=null", "compute.threads=2",
     "optim.min_lr=0", "optim.weight_decay=0", "optim.weight_decay_end=0", "optim.clip_grad=0",
     "optim.freeze_last_layer_epochs=0", "optim.patch_embed_lr_mult=0", "optim.adamw_beta1=0",
     "teacher.warmup_teacher_temp_epochs=0", "teacher.warmup_teacher_temp_epochs=100",
     "teacher.final_momentum_teacher=1", "dino.koleo_loss_weight=0", "ibot.loss_weight=0",
     "ibot.mask_sample_probability=0", "student.layerscale=0", "student.layerscale=null",
     "student.drop_path_rate=0", "crops.local_crops_number=0", "curriculum.stages.1.noise.max_scale=0",
     "data.root=null", "student.pretrained=null", "data.cache_dir=null"],
)
def test_boundary_values_that_mean_something_are_accepted(override: str) -> None:
    load_config("fastdinov2_tiny", [override])


@pytest.mark.parametrize("override", ["data.root=", "data.root=  ", "train.max_steps=", "student.pretrained="])
def test_empty_override_is_refused_not_read_as_null(override: str) -> None:
    # A script's `data.root="$DATA"` with DATA unset must not silently train on the embedded dataset.
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: the value is empty.*{re.escape(key)}=null"):
        load_config("fastdinov2_tiny", [override])


@pytest.mark.parametrize("key", ["data.root", "data.cache_dir", "student.pretrained"])
def test_blank_path_is_refused(key: str, tmp_path: Path) -> None:
    # '' reaches the config from a YAML file or a quoted override; as a path it would be the current folder.
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: is empty \(''\).*{re.escape(key)}=null"):
        load_config("fastdinov2_tiny", [f'{key}=""'])
    section, name = key.split(".")
    f = tmp_path / "c.yaml"
    f.write_text(f"base: fastdinov2_tiny\n{section}:\n  {name}: ' '\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: is empty"):
        load_config(str(f))


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("base: fastdinov2_tiny\ntrain:\n  batch_sise_per_gpu: 3\n")
    with pytest.raises(ConfigError, match="batch_sise_per_gpu"):
        load_config(str(f))


def test_unknown_key_in_a_stage_names_its_full_path(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("base: fastdinov2_tiny\ncurriculum:\n  stages:\n    - {name: a, fraction: 1.0, global_size: 64, "
                 "local_size: 32, noise: {maxscale: 1}}\n")
    with pytest.raises(ConfigError, match=r"'curriculum\.stages\.0\.noise\.maxscale'"):
        load_config(str(f))


def test_base_file_is_found_next_to_the_file_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "common.yaml").write_text("base: fastdinov2_tiny\ntrain:\n  seed: 3\n")
    (tmp_path / "cfg" / "exp.yaml").write_text("base: common.yaml\ntrain:\n  log_every: 7\n")
    (tmp_path / "cfg" / "broken.yaml").write_text("base: missing.yaml\n")
    monkeypatch.chdir(tmp_path)  # not the folder of the files
    cfg = load_config("cfg/exp.yaml")
    assert (cfg.train.seed, cfg.train.log_every) == (3, 7)
    with pytest.raises(ConfigError, match=r"config .*broken\.yaml: base: config file not found: missing\.yaml"):
        load_config("cfg/broken.yaml")


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="fastdinov2_tiny"):
        load_config("no_such_preset")


def test_stage_needs_exactly_one_length(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("base: dinov2_tiny\ncurriculum:\n  stages:\n    - {fraction: 1.0, epochs: 12, global_size: 64, "
                 "local_size: 32}\n")
    with pytest.raises(ConfigError, match=r"curriculum\.stages\.0\.epochs"):
        load_config(str(f))


def test_an_override_past_the_end_of_the_stage_list_says_how_many_there_are() -> None:
    with pytest.raises(ConfigError, match=r"curriculum\.stages has 2 entries \(0-1\); an override cannot add one"):
        load_config("fastdinov2_tiny", ["curriculum.stages.2.global_size=64"])
