"""compute.cuda_graph: the static step (schedules on the device, decoupled weight decay in the step, in-place
state) trains like the ordinary step. On a CPU nothing is captured, so these tests check everything but the
capture itself; the ``gpu`` test at the end replays real graphs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastdinov2.config import ConfigError, load_config
from fastdinov2.data.photometric import blur_kernel_size
from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
from fastdinov2.train.cuda_graph import DeviceSchedules, GraphedStep, batch_key, describe_key, step_inputs
from fastdinov2.train.loop import Trainer, train
from fastdinov2.train.optim import apply_optim_schedules

from .test_train_e2e import TINY
from .test_train_sync_free import SyncRecorder

GRAPH = ["compute.cuda_graph=true", "compute.masked_tokens_bucket=16"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    return root


def _cfg(data_root: Path, *extra: str):  # type: ignore[no-untyped-def]
    # a weight decay and a frozen last layer at the start, so both schedule paths are exercised
    return load_config("fastdinov2_tiny", [*TINY, f"data.root={data_root}", "optim.weight_decay=0.1",
                                           "optim.weight_decay_end=0.3", "optim.freeze_last_layer_epochs=0.5",
                                           *extra])


def _history(summary: dict) -> list[dict]:  # type: ignore[type-arg]
    return summary["history"]


def test_device_schedules_give_every_group_the_scheduled_lr(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data_root, *GRAPH), tmp_path)
    ds = trainer._dsched
    assert ds is not None
    groups = trainer.optimizer.param_groups
    assert {g["wd_multiplier"] for g in groups} == {0.0, 1.0} and any(g["is_last_layer"] for g in groups)
    reference = [dict(g) for g in groups]  # plain dicts: apply_optim_schedules writes floats into them
    for step in (0, 1, 5, 7, 100):  # 100: past the end, clamped like Schedules.at
        sched = trainer.schedules.at(step)
        values = ds.row(torch.tensor(step))
        for name, key in (("momentum", "momentum"), ("teacher_temp", "teacher_temp"), ("wd", "wd")):
            assert float(values[name]) == pytest.approx(sched[key], rel=1e-6)
        opt = torch.optim.SGD([torch.zeros(1)])
        opt.param_groups = reference
        apply_optim_schedules(opt, sched["lr"], sched["wd"], sched["last_layer_lr"], sched["backbone_lr_scale"])
        for i, g in enumerate(reference):
            assert float(groups[i]["lr"]) == pytest.approx(g["lr"], rel=1e-6, abs=1e-12), (step, g["name"])
            assert groups[i]["weight_decay"] == 0.0  # decay is applied by the step itself
    assert float(trainer.schedules.at(0)["last_layer_lr"]) == 0.0  # the frozen last layer is covered


def test_static_step_trains_like_the_ordinary_step(data_root: Path, tmp_path: Path) -> None:
    # 8 steps over both curriculum stages: lr warm-up, the frozen last layer, weight decay, drop path, the EMA
    eager = train(_cfg(data_root, "compute.masked_tokens_bucket=16"), tmp_path / "eager")
    graph = train(_cfg(data_root, *GRAPH), tmp_path / "graph")
    for a, b in zip(_history(eager), _history(graph), strict=True):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "grad_norm", "lr", "wd"):
            assert a[key] == pytest.approx(b[key], rel=2e-5), (a["step"], key)
    states = [torch.load(tmp_path / run / "checkpoints" / "step_00000008" / "model.pt", weights_only=True)
              for run in ("eager", "graph")]
    for part in ("student", "teacher"):
        for name, value in states[0][part].items():
            torch.testing.assert_close(states[1][part][name], value, rtol=1e-4, atol=1e-6, msg=f"{part}.{name}")
    # the checkpoint has one format: the learning rates are numbers, as an eager run writes them
    optim = torch.load(tmp_path / "graph" / "checkpoints" / "step_00000008" / "optim.pt", weights_only=False)
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in optim["optimizer"]["param_groups"])


def test_a_graph_run_resumes_without_graphs_and_back(data_root: Path, tmp_path: Path) -> None:
    straight = train(_cfg(data_root, *GRAPH), tmp_path / "straight")
    run = tmp_path / "mixed"
    train(_cfg(data_root, *GRAPH, "train.max_steps=3", "train.checkpoint_every=3"), run)
    train(_cfg(data_root, "compute.masked_tokens_bucket=16", "train.max_steps=6"), run, allow_config_change=True)
    train(_cfg(data_root, *GRAPH), run, allow_config_change=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8))
    for a, b in zip(_history(straight), rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5), a["step"]


def test_static_step_issues_no_host_sync(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data_root, *GRAPH), tmp_path)
    batches = iter(trainer.make_loader(0, 2))
    trainer.train_step([next(batches)], 0)
    batch = next(batches)
    with SyncRecorder() as rec:
        totals = trainer.train_step([batch], 1)
    assert rec.calls == []
    assert totals is not None and set(totals) >= {"loss", "grad_norm"}
    assert trainer.sync_health(1) is True


def test_nonfinite_static_step_skips_the_update_and_the_decay(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data_root, *GRAPH, "train.nan_policy=skip"), tmp_path)
    batches = iter(trainer.make_loader(0, 2))
    trainer.train_step([next(batches)], 0)
    student = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    batch = next(batches)
    batch.global_crops[0, 0, 0, 0] = float("nan")
    trainer.train_step([batch], 1)
    for k, v in trainer.model.student.state_dict().items():
        assert torch.equal(v, student[k]), k  # neither AdamW nor the weight decay touched it
    for k, v in trainer.model.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    assert trainer.sync_health(1) is False and trainer.state.nan_skips == 1


def test_graphed_step_keeps_one_set_of_static_buffers_per_shape(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data_root, *GRAPH), tmp_path)
    graphed = trainer._graphed
    assert isinstance(graphed, GraphedStep) and not graphed.capture  # no CUDA: eager on the static buffers
    loader = iter(trainer.make_loader(0, 8))
    keys = set()
    for step in range(8):
        batch = next(loader)
        keys.add(batch_key(batch))
        trainer.train_step([batch], step)
    assert len(graphed.entries) == len(keys) >= 2  # both curriculum stages; masked rows padded to 16
    assert graphed.names == ["loss", "dino_loss", "ibot_loss", "koleo_loss", "grad_norm"]


def test_the_colour_augmentation_runs_inside_the_static_step(data_root: Path, tmp_path: Path) -> None:
    """data.photometric_on=device: the graph's buffers hold the uint8 crops and the per-crop parameters, the
    step applies the augmentation (inside the graph on a GPU), and the run trains like the ordinary step."""
    device_mode = ["data.photometric_on=device"]
    eager = train(_cfg(data_root, *device_mode, "compute.masked_tokens_bucket=16"), tmp_path / "eager")
    graph = train(_cfg(data_root, *device_mode, *GRAPH), tmp_path / "graph")
    for a, b in zip(_history(eager), _history(graph), strict=True):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5), (a["step"], key)

    trainer = Trainer(_cfg(data_root, *device_mode, *GRAPH), tmp_path / "t")
    assert trainer._graphed is not None
    applied: list[int] = []
    on_device = trainer._on_device
    trainer._on_device = lambda b: (applied.append(int(b.photometric_pending)), on_device(b))[1]  # type: ignore
    loader = iter(trainer.make_loader(0, 2))
    for step in range(2):
        batch = next(loader)
        assert batch.photometric_pending and batch.global_crops.dtype == torch.uint8
        trainer.train_step([batch], step)
    assert applied == [1, 1]  # the step itself received the batch with the augmentation still to apply
    (entry,) = trainer._graphed.entries.values()
    assert entry.batch.photometric_pending and entry.batch.local_crops.dtype == torch.uint8
    for name, buffer in step_inputs(entry.batch).items():  # the second batch was copied into the buffers
        source = step_inputs(batch)[name]
        assert buffer is not source and torch.equal(buffer, source), name


def test_batch_key_names_the_inputs_and_the_blur_kernel_size(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data_root, "data.photometric_on=device", *GRAPH), tmp_path)
    batch = next(iter(trainer.make_loader(0, 1)))
    key = batch_key(batch)
    names = [k[0] for k in key]
    assert names[:5] == ["global_crops", "local_crops", "masks", "mask_indices", "masks_weight"]
    assert "global_params.hue" in names and "local_params.jitter_order" in names
    assert "global_params.blur_kernel_size" in names and "global_params.blur_kernel_size" not in step_inputs(batch)
    ksize = blur_kernel_size(8 / 16)  # stage 0 renders the 16 px local crops at 8 px
    assert params_key(key, "local_params.blur_kernel_size") == (ksize,)
    other = replace(batch, local_params=replace(batch.local_params, blur_kernel_size=torch.full_like(
        batch.local_params.blur_kernel_size, ksize + 2)))
    assert batch_key(other) != key  # another blur kernel is another graph
    worker = Trainer(_cfg(data_root, "data.photometric_on=worker", *GRAPH), tmp_path / "w")
    wbatch = next(iter(worker.make_loader(0, 1)))
    assert [k[0] for k in batch_key(wbatch)] == names[:5] and wbatch.global_crops.dtype == torch.float32
    assert f"local_params.blur_kernel_size [{ksize}]" in describe_key(key) and "hue" not in describe_key(key)


def params_key(key: tuple, name: str) -> tuple:  # type: ignore[type-arg]
    return next(shape for n, shape, _ in key if n == name)


def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A capture that fails (e.g. an operation that synchronises) runs nothing; the step then runs eagerly,
    now and for the rest of the run, with a warning naming the cause."""
    calls: list[int] = []

    def step_fn(batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        return {"loss": batch.global_crops.sum(), "grad_norm": batch.masks_weight.sum()}

    class FailingCapture:
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            pass

        def __enter__(self) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    graphed = GraphedStep(step_fn, torch.device("cpu"), warmup_steps=2, capture=False)
    graphed.capture, graphed.warmup_steps = True, 2  # as on a GPU, the side stream replaced by the current one
    monkeypatch.setattr(graphed, "_eager_on_side_stream", graphed._eager)
    loader_batch = _tiny_batch()
    outs = [graphed(loader_batch) for _ in range(2)]  # the 2 warm-up steps
    assert len(calls) == 2 and graphed.capture
    outs += [graphed(loader_batch) for _ in range(2)]  # the failed capture (run eagerly instead), one more step
    assert len(calls) == 4 and all(float(o["loss"]) == float(loader_batch.global_crops.sum()) for o in outs)
    assert not graphed.capture and "operation not permitted" in (graphed.capture_failure or "")
    assert "runs eagerly from now on" in capsys.readouterr().err


def _tiny_batch():  # type: ignore[no-untyped-def]
    from fastdinov2.data.collate import TrainBatch

    long = torch.zeros(2, dtype=torch.int64)
    return TrainBatch(global_crops=torch.ones(4, 3, 2, 2), local_crops=torch.ones(4, 3, 1, 1),
                      masks=torch.zeros(4, 1, dtype=torch.bool), mask_indices=long, masks_weight=torch.ones(2),
                      n_masked_patches=2, labels=long, sample_keys=long, indices=long, stage=0, global_size=2,
                      local_size=1, mask_grid=(1, 1))


@pytest.mark.parametrize(("extra", "key"), [
    (["compute.masked_tokens_bucket=0"], "compute.masked_tokens_bucket"),
    (["train.grad_accum_steps=2"], "train.grad_accum_steps"),
    (["dino.centering=sinkhorn_knopp"], "dino.centering"),
    (["compute.precision=fp16"], "compute.precision"),
    (["compute.compile_backend=cudagraphs"], "compute.cuda_graph"),
    (["compute.compile_mode=reduce-overhead"], "compute.cuda_graph"),
])
def test_cuda_graph_refuses_what_a_graph_cannot_hold(extra: list[str], key: str) -> None:
    overrides = ["compute.cuda_graph=true", "compute.masked_tokens_bucket=256", *extra]
    with pytest.raises(ConfigError, match=key):
        load_config("fastdinov2_tiny", overrides)


def test_auto_options_are_decided_per_device() -> None:
    # compute.cuda_graph=auto and ibot.fused_loss=auto (the defaults): off on the CPU, config unchanged
    from fastdinov2.train import meta_arch
    from fastdinov2.train.loop import resolve_auto_options

    cfg = load_config("fastdinov2_tiny")
    assert (cfg.compute.cuda_graph, cfg.ibot.fused_loss, cfg.compute.masked_tokens_bucket) == ("auto", "auto", 0)
    cpu, notes = resolve_auto_options(cfg, torch.device("cpu"), 1)
    assert (cpu.compute.cuda_graph, cpu.ibot.fused_loss, cpu.compute.masked_tokens_bucket) == ("false", "false", 0)
    assert notes == [] and cfg.compute.cuda_graph == "auto"  # a copy: the given config stays as it was
    auto_dino = load_config("fastdinov2_tiny", ["dino.fused_loss=auto"])
    assert resolve_auto_options(auto_dino, torch.device("cpu"), 1)[0].dino.fused_loss == "false"
    # on CUDA (decided without one: a pure function of the config and the device), with Triton
    cuda = torch.device("cuda", 0)
    real = meta_arch.fused_loss_available
    meta_arch.fused_loss_available = lambda device: True  # type: ignore[assignment]
    try:
        on, notes = resolve_auto_options(cfg, cuda, 1)
        assert (on.compute.cuda_graph, on.ibot.fused_loss, on.compute.masked_tokens_bucket) == ("true", "true", 64)
        assert "one CUDA graph" in notes[0] and "Triton" in notes[1]
        kept, _ = resolve_auto_options(load_config("fastdinov2_tiny", ["compute.masked_tokens_bucket=16"]), cuda, 1)
        assert kept.compute.masked_tokens_bucket == 16
        for extra, why in ((["train.grad_accum_steps=2"], "grad_accum_steps"), (["compute.precision=fp16"], "fp16"),
                           (["dino.centering=sinkhorn_knopp"], "sinkhorn_knopp"),
                           (["compute.compile=blocks", "compute.compile_mode=reduce-overhead"], "CUDA graphs")):
            off, notes = resolve_auto_options(load_config("fastdinov2_tiny", extra), cuda, 1)
            assert off.compute.cuda_graph == "false" and off.compute.masked_tokens_bucket == 0, extra
            assert why in notes[0], (extra, notes)
        many, notes = resolve_auto_options(cfg, cuda, 2)  # under torchrun: only when asked for
        assert many.compute.cuda_graph == "false" and "2 processes" in notes[0]
        off, _ = resolve_auto_options(load_config("fastdinov2_tiny", ["ibot.loss_chunk_rows=64"]), cuda, 1)
        assert off.ibot.fused_loss == "false"
        explicit, notes = resolve_auto_options(
            load_config("fastdinov2_tiny", ["compute.cuda_graph=false", "ibot.fused_loss=false"]), cuda, 1)
        assert (explicit.compute.cuda_graph, explicit.ibot.fused_loss, notes) == ("false", "false", [])
        # dino.fused_loss (default false) when set to auto: on with CUDA and Triton, whatever the centring
        for extra in ([], ["dino.centering=sinkhorn_knopp"]):
            dino_cfg = load_config("fastdinov2_tiny", ["dino.fused_loss=auto", *extra])
            dino, notes = resolve_auto_options(dino_cfg, cuda, 1)
            assert dino.dino.fused_loss == "true" and "dino.fused_loss=auto: the DINO loss as Triton" in notes[-1]
        assert resolve_auto_options(cfg, cuda, 1)[0].dino.fused_loss == "false"
    finally:
        meta_arch.fused_loss_available = real  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="compute.cuda_graph: 'maybe'"):
        load_config("fastdinov2_tiny", ["compute.cuda_graph=maybe"])


def test_the_run_saves_the_config_as_given(data_root: Path, tmp_path: Path) -> None:
    # config.yaml keeps "auto" (a resume on another machine decides again); the trainer runs on decided values
    trainer = Trainer(_cfg(data_root), tmp_path)
    assert trainer.user_cfg.compute.cuda_graph == "auto" and trainer.cfg.compute.cuda_graph == "false"
    trainer.run()
    assert "cuda_graph: auto" in (tmp_path / "config.yaml").read_text()


def test_device_schedules_need_the_fused_optimizer(data_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(data_root), tmp_path)
    params = [p for g in trainer.param_groups for p in g["params"]]
    foreach = torch.optim.AdamW(params, foreach=True)
    with pytest.raises(ValueError, match="fused"):
        DeviceSchedules(trainer.schedules, foreach, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_run_matches_eager_on_the_gpu(data_root: Path, tmp_path: Path) -> None:
    """Replayed graphs train like eager steps (bf16: loose tolerance), and a replayed step issues no sync."""
    # no stochastic depth: a replayed graph draws its random numbers from other generator offsets than eager
    common = ["compute.device=cuda", "data.photometric_on=device", "student.drop_path_rate=0"]
    eager = train(_cfg(data_root, *common, "compute.masked_tokens_bucket=16", "compute.cuda_graph=false"),
                  tmp_path / "eager")
    graph = train(_cfg(data_root, *common, *GRAPH), tmp_path / "graph")
    for a, b in zip(_history(eager), _history(graph), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), a["step"]
    _replays_one_graph_without_sync(Trainer(_cfg(data_root, *common, *GRAPH), tmp_path / "sync"))


def _replays_one_graph_without_sync(trainer: Trainer) -> None:
    """2 eager warm-up steps on one batch, then the capture and its first replay: one graph (the capture held);
    a further replay issues no host sync."""
    first = next(iter(trainer.make_loader(0, 1)))
    for step in range(3):
        trainer.train_step([first], step)
    assert trainer._graphed is not None and trainer._graphed.n_graphs == 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step([first], 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.sync_health(3) is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_defaults_on_one_gpu_replay_the_step_with_the_fused_loss(data_root: Path, tmp_path: Path) -> None:
    # compute.cuda_graph=auto and ibot.fused_loss=auto on one CUDA device: the graph step and the Triton loss
    from fastdinov2.losses.fused import fused_loss_available

    trainer = Trainer(_cfg(data_root, "compute.device=cuda"), tmp_path / "t")
    assert trainer._graphed is not None and trainer.cfg.compute.masked_tokens_bucket == 64
    assert trainer.cfg.ibot.fused_loss == ("true" if fused_loss_available(trainer.device) else "false")
    history = _history(train(_cfg(data_root, "compute.device=cuda"), tmp_path / "run"))
    assert history and all(math.isfinite(r["loss"]) for r in history)


def test_runs_saved_before_the_auto_defaults_continue(data_root: Path, tmp_path: Path) -> None:
    # a config.yaml written when both options were booleans (false) continues under the "auto" defaults
    from fastdinov2.config import to_yaml
    from fastdinov2.train.checkpoint import save_checkpoint
    from fastdinov2.train.loop import check_run_dir

    save_checkpoint(tmp_path / "checkpoints", 1, {}, {"step": 1})  # a run with progress to continue
    old = _cfg(data_root, "compute.cuda_graph=false", "ibot.fused_loss=false")
    (tmp_path / "config.yaml").write_text(to_yaml(old).replace("cuda_graph: 'false'", "cuda_graph: false")
                                          .replace("fused_loss: 'false'", "fused_loss: false"))
    assert check_run_dir(tmp_path, _cfg(data_root), allow_config_change=False)
    with pytest.raises(ConfigError, match="different config"):
        check_run_dir(tmp_path, _cfg(data_root, "optim.weight_decay=0.2"), allow_config_change=False)


def test_overlap_teacher_is_refused_with_a_compiled_step_and_a_no_op_on_a_cpu(
        data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"compute\.overlap_teacher"):
        load_config("fastdinov2_tiny", ["compute.overlap_teacher=true", "compute.compile=step"])
    trainer = Trainer(_cfg(data_root, "compute.overlap_teacher=true"), tmp_path)
    assert trainer._teacher_stream is None and "no effect" in capsys.readouterr().err
    # MetaArch.targets_and_student without a stream: the teacher's targets, then the student's outputs
    batch = trainer._on_device(next(iter(trainer.make_loader(0, 1))))
    model, temp = trainer.model, torch.tensor(0.04)
    args = (batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices, batch.n_masked_patches, temp,
            batch.masks_weight)
    centers = [c.clone() for c in trainer._centers()]
    with torch.no_grad():
        torch.manual_seed(0)  # the same stochastic-depth draws in both student calls
        (t_cls, t_patch), s_out = model.targets_and_student(trainer.student, *args)
        for c, saved in zip(trainer._centers(), centers, strict=True):
            c.copy_(saved)  # the teacher's targets moved the centres: the reference starts where it started
        ref_cls, ref_patch = model.teacher_targets(batch.global_crops, batch.mask_indices, batch.n_masked_patches,
                                                   temp, batch.masks_weight)
        torch.manual_seed(0)
        ref_out = trainer.student(batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices)
    for a, b in zip([*t_cls, t_patch, *s_out.values()], [*ref_cls, ref_patch, *ref_out.values()], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overlapped_teacher_trains_like_the_serial_step_eager_and_as_a_graph(data_root: Path, tmp_path: Path) -> None:
    """compute.overlap_teacher: the same kernels on two streams, eager and captured as two graph branches."""
    common = ["compute.device=cuda", "data.photometric_on=device", "student.drop_path_rate=0",
              "compute.masked_tokens_bucket=16"]
    runs = {}
    for name, extra in {"serial": ["compute.cuda_graph=false"],
                        "overlap": ["compute.cuda_graph=false", "compute.overlap_teacher=true"],
                        "overlap_graph": ["compute.cuda_graph=true", "compute.overlap_teacher=true"]}.items():
        runs[name] = _history(train(_cfg(data_root, *common, *extra), tmp_path / name))
    for a, b, c in zip(runs["serial"], runs["overlap"], runs["overlap_graph"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]
        assert c["loss"] == pytest.approx(a["loss"], rel=2e-2), a["step"]
    trainer = Trainer(_cfg(data_root, *common, "compute.cuda_graph=true", "compute.overlap_teacher=true"),
                      tmp_path / "sync")
    assert trainer._teacher_stream is not None
    _replays_one_graph_without_sync(trainer)  # the two-stream capture held
