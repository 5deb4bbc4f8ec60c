"""End-to-end training on a tiny generated dataset: exact resume (mid-stage and around the curriculum
switch, with loader workers), run-directory guard, bad input, non-finite losses and preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdinov2.cli import main
from fastdinov2.config import Config, ConfigError, load_config
from fastdinov2.data.datasets import DataError
from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
from fastdinov2.train.checkpoint import list_checkpoints
from fastdinov2.train.loop import EXIT_PREEMPTED, TrainingError, train
from fastdinov2.train.meta_arch import MetaArch

TINY = [
    "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32",
    "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "curriculum.stages.0.global_size=16", "curriculum.stages.0.local_size=8",
    "curriculum.stages.1.global_size=32", "curriculum.stages.1.local_size=16",
    "optim.epochs=2", "optim.warmup_epochs=0.5", "teacher.warmup_teacher_temp_epochs=1",
    "train.batch_size_per_gpu=8", "data.num_workers=0", "train.log_every=1", "train.progress=false",
    "train.knn_at_end=false", "train.checkpoint_every=1000",
]  # 32 images, batch 8: 4 steps per epoch; stage 0 = steps 0-5, stage 1 = steps 6-7


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    return root


def _cfg(data_root: Path, *extra: str) -> Config:
    return load_config("fastdinov2_tiny", [*TINY, f"data.root={data_root}", *extra])


def _losses(run: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["dino_loss"], r["ibot_loss"]) for r in rows]


@pytest.fixture(scope="module")
def straight_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    summary = train(_cfg(data_root), run)
    assert summary["finished"] and summary["step"] == 8
    return run


def test_straight_run_writes_the_contract(straight_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "teacher_backbone.safetensors", "teacher_backbone.json",
                 "summary.json"):
        assert (straight_run / name).is_file(), name
    rows = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8))
    for key in ("step", "epoch", "lr", "loss", "dino_loss", "ibot_loss", "koleo_loss", "img_per_s", "stage",
                "global_size", "local_size", "noise_max_scale", "data_wait_frac"):
        assert key in rows[0], key
    assert [r["global_size"] for r in rows] == [16] * 6 + [32] * 2
    assert [r["noise_max_scale"] for r in rows] == [0.0] * 6 + [0.5] * 2
    assert [s for s, _ in list_checkpoints(straight_run / "checkpoints")] == [8]


@pytest.mark.parametrize("stop", [3, 5, 6, 7])  # mid-stage, one before, at and after the switch (step 6)
def test_resume_reproduces_the_uninterrupted_run(data_root: Path, straight_run: Path, tmp_path: Path,
                                                  stop: int) -> None:
    first = train(_cfg(data_root, f"train.max_steps={stop}"), tmp_path)
    assert not first["finished"] and first["step"] == stop
    train(_cfg(data_root), tmp_path)  # the same command again continues the run
    assert _losses(tmp_path) == _losses(straight_run)


def test_resume_with_loader_workers(data_root: Path, straight_run: Path, tmp_path: Path) -> None:
    train(_cfg(data_root, "train.max_steps=6", "data.num_workers=2"), tmp_path)
    train(_cfg(data_root, "data.num_workers=2"), tmp_path)
    assert _losses(tmp_path) == _losses(straight_run)


def test_restart_mode_resumes_at_the_switch(data_root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(data_root, "curriculum.switch_mode=restart"), a)
    train(_cfg(data_root, "curriculum.switch_mode=restart", "train.max_steps=6"), b)
    train(_cfg(data_root, "curriculum.switch_mode=restart"), b)
    assert _losses(a) == _losses(b)
    lrs = [json.loads(line)["lr"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert lrs[6] == 0.0 and lrs[0] == 0.0  # a fresh warm-up starts at the switch


def test_other_config_in_same_dir_is_refused(data_root: Path, straight_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.base_lr"):
        train(_cfg(data_root, "optim.base_lr=0.001"), straight_run)


def test_missing_data_dir_fails_before_writing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        train(load_config("fastdinov2_tiny", [*TINY, f"data.root={tmp_path / 'nope'}"]), run)
    assert not run.exists()


def test_empty_data_dir_fails_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        train(load_config("fastdinov2_tiny", [*TINY, f"data.root={tmp_path / 'empty'}"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _copy_with_bad_file(data_root: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(data_root, dest)
    bad = sorted((dest / "train").rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    return bad


def test_unreadable_image_stops_naming_the_file(data_root: Path, tmp_path: Path) -> None:
    bad = _copy_with_bad_file(data_root, tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(DataError, match=bad.name):
        train(_cfg(tmp_path / "data"), run)
    assert not (run / "teacher_backbone.safetensors").exists() and not (run / "summary.json").exists()


@pytest.mark.parametrize("policy", ["replace", "drop"])
def test_bad_images_skipped_up_to_the_limit(policy: str, data_root: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = _copy_with_bad_file(data_root, tmp_path / "data")
    summary = train(_cfg(tmp_path / "data", "data.max_bad_samples=2", "optim.epochs=1", f"data.on_bad_sample={policy}",
                         "curriculum.stages.0.fraction=0.5", "curriculum.stages.1.fraction=0.5"), tmp_path / "run")
    assert summary["finished"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_samples"] == 1  # seen once per epoch: the run saw it exactly once
    verb = "replaced" if policy == "replace" else "skipped"
    assert f"[fastdinov2] {verb} bad image {bad}" in capsys.readouterr().err


def test_drop_policy_is_refused_under_torchrun(data_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from fastdinov2.train import loop

    monkeypatch.setattr(loop.dist_utils, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="data.on_bad_sample=drop works on one process only"):
        loop.Trainer(_cfg(data_root, "data.max_bad_samples=1", "data.on_bad_sample=drop"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_unknown_key_exits_2_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "--output-dir", str(tmp_path / "r"), "train.no_such_key=1"]) == 2
    assert "train.no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_takes_overrides_between_options(data_root: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", *TINY, f"data.root={data_root}", "--output-dir", str(tmp_path / "r"), "train.max_steps=1"]
    assert main(args) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["step"] == 1
    with pytest.raises(SystemExit):
        main(["train", "--output-dir", str(tmp_path / "r"), "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_refused(data_root: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--output-dir .*afile is a file, not a folder"):
        train(_cfg(data_root), tmp_path / "afile")


def test_a_failed_start_does_not_block_a_corrected_one(data_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingError):  # fails at step 0 after writing config.yaml: no checkpoint
        _fail_at_step_0(data_root, run)
    assert (run / "config.yaml").is_file() and not list_checkpoints(run / "checkpoints")
    summary = train(_cfg(data_root, "optim.base_lr=0.001", "train.max_steps=1"), run)
    assert summary["step"] == 1
    err = capsys.readouterr().err
    assert "committed no checkpoint; starting afresh with the new config (keys: optim.base_lr)" in err


def _fail_at_step_0(data_root: Path, run: Path) -> None:
    from fastdinov2.train.loop import Trainer

    trainer = Trainer(_cfg(data_root, "train.max_steps=1"), run)

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise TrainingError("a fault at step 0")

    trainer.train_step = boom  # type: ignore[method-assign]
    trainer.run()


def test_an_architecture_change_on_resume_names_the_checkpoint(data_root: Path, tmp_path: Path) -> None:
    from fastdinov2.train.checkpoint import CheckpointError

    train(_cfg(data_root, "train.max_steps=2"), tmp_path)
    with pytest.raises(CheckpointError, match=r"step_00000002 does not fit this run's model or optimizer .*"
                                              r"cannot change when a run is continued"):
        train(_cfg(data_root, "student.depth=3"), tmp_path, allow_config_change=True)


def test_an_unreadable_newest_checkpoint_names_the_previous_one(data_root: Path, tmp_path: Path) -> None:
    from fastdinov2.train.checkpoint import CheckpointError

    train(_cfg(data_root, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last_checkpoints=3"),
          tmp_path)
    (tmp_path / "checkpoints" / "step_00000004" / "optim.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:
        train(_cfg(data_root), tmp_path)
    msg = str(info.value)
    assert "step_00000004/optim.pt" in msg and "weights_only=False" not in msg and "weights_only" not in msg
    assert "the previous committed checkpoint is " + str(tmp_path / "checkpoints" / "step_00000002") in msg


def _nan_at(step: int, monkeypatch: pytest.MonkeyPatch, value: float = float("nan")) -> None:
    real = MetaArch.compute_losses
    calls = {"n": 0}

    def patched(self, *a, **k):  # type: ignore[no-untyped-def]
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] - 1 >= step:
            out["ibot_loss"] = out["ibot_loss"] * value
            out["loss"] = out["loss"] + out["ibot_loss"]
        return out

    monkeypatch.setattr(MetaArch, "compute_losses", patched)


def test_nan_halts_naming_step_and_term(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(_cfg(data_root, "train.max_steps=2"), tmp_path)
    _nan_at(1, monkeypatch)  # second step of the continued run = global step 3
    with pytest.raises(TrainingError, match=r"step 3: .*ibot_loss"):
        train(_cfg(data_root), tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]  # last good checkpoint intact


def test_inf_skip_policy_counts_and_stops(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(2, monkeypatch, value=float("inf"))
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        train(_cfg(data_root, "train.nan_policy=skip", "train.max_consecutive_skips=3"), tmp_path)


def test_skipped_update_leaves_weights_unchanged(data_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(1, monkeypatch)
    summary = train(_cfg(data_root, "train.nan_policy=skip", "train.max_steps=2"), tmp_path)
    assert summary["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0]  # step 1 was skipped, not logged as a normal step


def test_sigterm_saves_and_exits_75_then_continues(data_root: Path, tmp_path: Path) -> None:
    # SIGTERM to the whole process group, loader worker included, as SLURM and torchrun send it: the worker
    # must not die of it in the middle of a step (the main process saves at the next step boundary).
    args = [sys.executable, "-m", "fastdinov2", "train", "--output-dir", str(tmp_path / "run"),
            *TINY, f"data.root={data_root}", "optim.epochs=40", "curriculum.stages.0.fraction=0.9",
            "curriculum.stages.1.fraction=0.1", "data.num_workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpts, err
    saved_step = ckpts[-1][0]
    assert 2 <= saved_step < 160
    done = subprocess.run([*args, "train.max_steps=" + str(saved_step + 2)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {ckpts[-1][1]}" in done.stdout
    assert torch.load(tmp_path / "run" / "checkpoints" / f"step_{saved_step + 2:08d}" / "optim.pt",
                      weights_only=True)["step"] == saved_step + 2


def test_a_dataset_smaller_than_one_global_batch_is_refused(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds 32 training image\(s\), fewer than one global batch of stage 0 \(64"):
        train(_cfg(data_root, "train.batch_size_per_gpu=64"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_fp16_overflow_is_left_to_the_grad_scaler(data_root: Path, tmp_path: Path) -> None:
    from fastdinov2.train.loop import Trainer

    # fp16 gradients overflow at the grad scaler's initial scale (2**16): those steps must be skipped by the
    # scaler, which lowers its scale, and not be treated as a NaN fault that halts the run.
    trainer = Trainer(_cfg(data_root, "compute.precision=fp16", "train.max_steps=3"), tmp_path)
    assert trainer.scaler is not None
    scale0 = trainer.scaler.get_scale()
    summary = trainer.run()
    assert summary["step"] == 3 and trainer.state.nan_skips == 0
    assert trainer.state.scaler_skips >= 1 and trainer.scaler.get_scale() < scale0


def test_compute_compile_compiles_modules_in_place(data_root: Path, tmp_path: Path) -> None:
    from fastdinov2.train.loop import Trainer

    plain = Trainer(_cfg(data_root), tmp_path / "plain")
    compiled = Trainer(_cfg(data_root, "compute.compile=true"), tmp_path / "compiled")
    for model in (compiled.model.student, compiled.model.teacher):
        assert model.backbone._compiled_call_impl is not None and model.dino_head._compiled_call_impl is not None
    assert plain.model.student.backbone._compiled_call_impl is None
    # in place: parameter names, hence checkpoints and exports, are those of the eager model
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())


def test_compile_blocks_keeps_parameter_names_and_compiles_one_graph_per_shape() -> None:
    from fastdinov2.train.meta_arch import MetaArch

    cfg = load_config("fastdinov2_tiny", ["student.depth=3"])
    model = MetaArch(cfg)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    for m in (model.student, model.teacher):
        m.compile_blocks(backend="aot_eager")
    assert list(model.state_dict()) == keys  # in place: checkpoints and exports unchanged
    counters = torch._dynamo.utils.counters
    counters.clear()
    x = torch.randn(2, 3, 32, 32)
    model.student.backbone.forward_features(x)
    # three blocks, one code: a single graph for this shape (regional compilation), not one per block
    assert counters["stats"]["unique_graphs"] == 1


def test_compute_compile_accepts_booleans_and_names_bad_values() -> None:
    assert load_config("fastdinov2_tiny", ["compute.compile=true"]).compute.compile == "modules"
    assert load_config("fastdinov2_tiny", ["compute.compile=false"]).compute.compile == "none"
    assert load_config("fastdinov2_tiny", ["compute.compile=step"]).compute.compile == "step"
    assert load_config("fastdinov2_tiny", ["compute.compile=blocks"]).compute.compile == "blocks"
    with pytest.raises(ConfigError, match="compute.compile"):
        load_config("fastdinov2_tiny", ["compute.compile=graphs"])
    assert load_config("fastdinov2_tiny", ["compute.compile_mode=reduce-overhead"]).compute.compile_mode \
        == "reduce-overhead"
    with pytest.raises(ConfigError, match="compute.compile_mode"):
        load_config("fastdinov2_tiny", ["compute.compile_mode=fast"])
    assert load_config("fastdinov2_tiny", ["compute.compile_backend=cudagraphs"]).compute.compile_backend \
        == "cudagraphs"
    with pytest.raises(ConfigError, match="compute.compile_backend"):
        load_config("fastdinov2_tiny", ["compute.compile_backend=tensorrt"])
    # an inductor mode with another backend would be silently ignored: refused, naming both keys
    with pytest.raises(ConfigError, match="compute.compile_mode='reduce-overhead'.*compute.compile_backend"):
        load_config("fastdinov2_tiny", ["compute.compile_mode=reduce-overhead", "compute.compile_backend=cudagraphs"])


@pytest.mark.parametrize("scope", ["step", "blocks"])
def test_compute_compile_trains_like_eager_aot(data_root: Path, tmp_path: Path, scope: str) -> None:
    # aot_eager (compute.compile_backend): dynamo + AOTAutograd capture the same forward and backward graphs as
    # inductor or cudagraphs would, without code generation. "blocks": each block and head compiled in place.
    torch._dynamo.reset()
    eager = train(_cfg(data_root, "train.max_steps=3", "compute.masked_tokens_bucket=16"), tmp_path / "eager")
    compiled = train(_cfg(data_root, "train.max_steps=3", "compute.masked_tokens_bucket=16",
                          f"compute.compile={scope}", "compute.compile_backend=aot_eager"), tmp_path / "compiled")
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        for key in ("loss", "dino_loss", "ibot_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["true", "blocks", "step"])
def test_compute_compile_trains_like_eager(data_root: Path, tmp_path: Path, mode: str) -> None:
    eager = train(_cfg(data_root, "train.max_steps=2"), tmp_path / "eager")
    compiled = train(_cfg(data_root, "train.max_steps=2", f"compute.compile={mode}"), tmp_path / "compiled")
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_compiled_blocks_in_the_static_step_with_stochastic_depth_train_like_eager(data_root: Path,
                                                                                   tmp_path: Path) -> None:
    """Inductor's blocks (the layer-scale residual and split/merge autograd functions inside them) in the
    trainer's static CUDA-graph step (eager on the CPU), with stochastic depth drawn outside the compiled
    blocks: the same draws, so the same losses as the eager step."""
    torch._dynamo.reset()
    common = ["train.max_steps=3", "compute.masked_tokens_bucket=16", "student.drop_path_rate=0.3"]
    eager = train(_cfg(data_root, *common), tmp_path / "eager")
    compiled = train(_cfg(data_root, *common, "compute.compile=blocks", "compute.cuda_graph=true"),
                     tmp_path / "compiled")
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


def test_packed_crops_train_like_one_pass_per_crop_size(data_root: Path, tmp_path: Path) -> None:
    # compute.pack_crops (default): the student's global and local crops share one pass through the blocks
    common = ["train.max_steps=3", "student.drop_path_rate=0"]  # stochastic depth draws differ when packed
    packed = train(_cfg(data_root, *common), tmp_path / "packed")
    single = train(_cfg(data_root, *common, "compute.pack_crops=false"), tmp_path / "single")
    for a, b in zip(packed["history"], single["history"], strict=True):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


def test_grad_accumulation_matches_one_large_batch(data_root: Path, tmp_path: Path) -> None:
    """2 micro-batches of 4 per step train like one batch of 8: every micro-batch is centred with the centre
    from before the step, and the step updates the centres once from all rows (KoLeo, whose neighbours are
    per micro-batch, and stochastic depth, whose draws follow the batch split, are off)."""
    common = ["train.max_steps=3", "dino.koleo_loss_weight=0", "student.drop_path_rate=0",
              "ibot.mask_sampling=sample"]  # DINOv2's batch masking masks each micro-batch on its own
    big = train(_cfg(data_root, *common), tmp_path / "big")
    acc = train(_cfg(data_root, *common, "train.batch_size_per_gpu=4", "train.grad_accum_steps=2"), tmp_path / "acc")
    for a, b in zip(big["history"], acc["history"], strict=True):
        for key in ("loss", "dino_loss", "ibot_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    states = [torch.load(run / "checkpoints" / "step_00000003" / "model.pt", weights_only=True)
              for run in (tmp_path / "big", tmp_path / "acc")]
    for name in ("dino_loss", "ibot_loss"):
        torch.testing.assert_close(states[0][name]["center"], states[1][name]["center"], rtol=1e-5, atol=1e-7)


def test_photometric_on_auto_is_the_device_on_cuda_and_the_workers_on_cpu() -> None:
    from fastdinov2.train.loop import resolve_photometric_on

    auto = load_config("fastdinov2_tiny", [])
    assert auto.data.photometric_on == "auto"
    assert resolve_photometric_on(auto, torch.device("cpu")) == "worker"
    assert resolve_photometric_on(auto, torch.device("cuda", 0)) == "device"
    for mode in ("worker", "device"):
        cfg = load_config("fastdinov2_tiny", [f"data.photometric_on={mode}"])
        assert {resolve_photometric_on(cfg, torch.device(d)) for d in ("cpu", "cuda")} == {mode}
    with pytest.raises(ConfigError, match="data.photometric_on"):
        load_config("fastdinov2_tiny", ["data.photometric_on=gpu"])


def test_training_past_an_exported_end_removes_the_stale_export(data_root: Path, straight_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    assert (run / "teacher_backbone.safetensors").is_file()
    summary = train(_cfg(data_root, "optim.epochs=3", "train.max_steps=9"), run, allow_config_change=True)
    assert summary["step"] == 9 and not summary["finished"]
    assert not (run / "teacher_backbone.safetensors").exists() and not (run / "teacher_backbone.json").exists()
    assert "removed " + str(run / "teacher_backbone.safetensors") in capsys.readouterr().err
