"""Training under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 reproduce one process with the same
global batch, checkpoints move between world sizes, a killed worker is restarted from the last committed
checkpoint, and distributed feature extraction shards and gathers correctly.

The reference for every comparison is one in-process run with batch 2B; the 2-process runs use batch B per
process. KoLeo is off (it is computed per rank by design). Child processes run with one OpenMP thread and
loopback addresses only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdinov2 import distributed
from fastdinov2.config import ConfigError, load_config
from fastdinov2.curriculum import Curriculum
from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
from fastdinov2.train.checkpoint import list_checkpoints
from fastdinov2.train.loop import train
from fastdinov2.train.plan import build_schedules
from fastdinov2.train.sampler import StepBatchSampler

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

TINY = [
    "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32",
    "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "curriculum.stages.0.global_size=16", "curriculum.stages.0.local_size=8",
    "curriculum.stages.1.global_size=32", "curriculum.stages.1.local_size=16",
    "optim.epochs=2", "optim.warmup_epochs=0.5", "teacher.warmup_teacher_temp_epochs=1",
    "data.num_workers=0", "train.log_every=1", "train.progress=false", "train.knn_at_end=false",
    "dino.koleo_loss_weight=0", "train.checkpoint_every=4", "train.keep_last_checkpoints=10",
    # per-sample masks: DINOv2's batch masking (the default) masks each rank's micro-batch on its own, so, like
    # KoLeo, it differs between 2 x B and 1 x 2B; everything else must match exactly
    "ibot.mask_sampling=sample",
]  # 32 images, global batch 8: 4 steps per epoch, 8 steps; stage 0 = steps 0-5; checkpoints at 4 and 8
B = 4  # per-process batch of the 2-process runs; the reference runs one process with 2 * B
N_STEPS = 8
TIMEOUT = 55


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    return root


def _overrides(data_root: Path, batch: int, *extra: str) -> list[str]:
    return [*TINY, f"data.root={data_root}", f"train.batch_size_per_gpu={batch}", *extra]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(run: Path, reference: Path) -> None:
    got, want = _rows(run), _rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(N_STEPS))
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "dino_loss", "ibot_loss", "lr", "teacher_temp", "samples_seen"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key, g[key], w[key])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun_args(out: Path, overrides: list[str], *torchrun_opts: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", *torchrun_opts, "-m", "fastdinov2", "train",
            "--output-dir", str(out), *overrides]


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def _kill_tree(agent: subprocess.Popen[str]) -> None:
    """SIGKILL the workers of a torchrun agent, then the agent (bounded clean-up after a failure)."""
    for pid in _descendants(agent.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.kill()
    agent.communicate()


def _start(out: Path, overrides: list[str], *torchrun_opts: str, extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen([*_torchrun_args(out, overrides, *torchrun_opts), *extra], env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(agent: subprocess.Popen[str], deadline: float) -> tuple[str, str]:
    """Wait for the agent until ``deadline``; on time-out kill it with its workers and fail."""
    try:
        return agent.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        _kill_tree(agent)
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s")


def _finish(agent: subprocess.Popen[str], deadline: float) -> tuple[str, str]:
    """:func:`_wait`, then require success."""
    out, err = _wait(agent, deadline)
    assert agent.returncode == 0, err[-4000:]
    return out, err


#: How a worker died about once in 90 two-process runs on the 2-core machines (once in CI): at interpreter
#: exit a gloo thread still freeing a finished collective needed the GIL and was ended inside a C++
#: destructor (``fastdinov2.distributed.destroy`` explains it and now waits for those threads). Should it
#: come back, the run is repeated once with a warning instead of failing the suite.
GLOO_ABORT = "terminate called without an active exception"


def _torchrun(out: Path, overrides: list[str], *opts: str) -> tuple[str, str]:
    """Run ``fastdinov2 train`` on 2 processes; returns (stdout, stderr).

    A run that ends in :data:`GLOO_ABORT` is run once more from the same starting directory, with a
    warning that quotes the abort, so the flake stays visible without failing the suite.
    """
    before = out.with_name(out.name + ".before")
    if out.exists():
        shutil.copytree(out, before)
    agent = _start(out, overrides, extra=opts)
    stdout, err = _wait(agent, time.time() + TIMEOUT)
    if agent.returncode != 0 and GLOO_ABORT in err and "SIGABRT" in err:
        lines = [ln for ln in err.splitlines() if GLOO_ABORT in ln or "exitcode" in ln]
        warnings.warn(f"torchrun run {out} aborted in gloo; running it again:\n" + "\n".join(lines), stacklevel=2)
        shutil.rmtree(out, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, out)
        return _finish(_start(out, overrides, extra=opts), time.time() + TIMEOUT)
    assert agent.returncode == 0, err[-4000:]
    return stdout, err


def _copy_run_up_to(src: Path, dest: Path, step: int) -> Path:
    """A copy of run ``src`` whose newest checkpoint is ``step`` (the later ones are removed)."""
    shutil.copytree(src, dest)
    for s, path in list_checkpoints(dest / "checkpoints"):
        if s > step:
            shutil.rmtree(path)
    return dest


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 2B."""
    run = tmp_path_factory.mktemp("reference")
    assert train(load_config("fastdinov2_tiny", _overrides(data_root, 2 * B)), run)["finished"]
    return run


@pytest.fixture(scope="module")
def reference_accum(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, 2 micro-batches of B per step (the same global batch as ``reference``)."""
    run = tmp_path_factory.mktemp("reference_accum")
    assert train(load_config("fastdinov2_tiny", _overrides(data_root, B, "train.grad_accum_steps=2")), run)["finished"]
    return run


@pytest.fixture(scope="module")
def ddp_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("ddp")
    return run, _torchrun(run, _overrides(data_root, B))[0]


def _worker_pid(agent: subprocess.Popen[str], rank: int, restart: int) -> int | None:
    """PID of the torchrun worker with ``RANK=rank`` in restart round ``restart``, if it is running."""
    for pid in _descendants(agent.pid):
        try:
            env = dict(
                item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
            )
        except OSError:
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(restart):
            return pid
    return None


@pytest.fixture(scope="module")
def fsdp_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """FSDP2 on 2 processes under ``torchrun``; rank 1 is SIGKILLed as soon as the first checkpoint is
    committed, so torchrun restarts both workers and they resume from the checkpoint.

    Two restarts are allowed, not one: on the 2-core CI machine a restarted worker once aborted at exit
    (:data:`GLOO_ABORT`, fixed since in ``distributed.destroy``). A second restart resumes again from the
    last committed checkpoint, which is what this fixture tests; it is reported as a warning with the
    agent's log so that a recurring abort stays visible.
    """
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to find the worker processes")
    run = tmp_path_factory.mktemp("fsdp2")
    overrides = _overrides(data_root, B, "compute.strategy=fsdp2", "train.checkpoint_every=2")
    agent = _start(run, overrides, "--max-restarts=2")
    deadline, victim = time.time() + TIMEOUT, None
    while time.time() < deadline and agent.poll() is None and victim is None:
        if list_checkpoints(run / "checkpoints"):  # the first checkpoint is committed: kill rank 1 now
            victim = _worker_pid(agent, rank=1, restart=0)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    if victim is None:
        _kill_tree(agent)
        pytest.fail("rank 1 was not found running after the first checkpoint")
    out, err = _finish(agent, deadline)
    if out.count("resuming from") > 1:
        lines = [ln for ln in err.splitlines() if "exitcode" in ln or "terminate" in ln or "Error" in ln]
        warnings.warn("torchrun restarted the FSDP2 workers more than once:\n" + "\n".join(lines[-20:]),
                      stacklevel=1)
    return run, out


# ---- cheap, single-process checks -----------------------------------------------------------------------
def test_init_distributed_reads_the_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed("cpu") == (0, 1, 0) and not distributed.is_enabled()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        distributed.init_distributed("cpu")
    for var, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        distributed.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(RuntimeError, match="RANK=2 must be < WORLD_SIZE=2"):
        distributed.init_distributed("cpu")
    assert not distributed.is_enabled()


def test_single_process_wraps_nothing() -> None:
    module = torch.nn.Linear(2, 2)
    for strategy in ("ddp", "fsdp2"):
        assert distributed.wrap_student(module, strategy, torch.device("cpu")) is module
    with pytest.raises(ValueError, match="'zero3'"):
        distributed.wrap_student(module, "zero3", torch.device("cpu"))


def test_strategy_is_validated() -> None:
    with pytest.raises(ConfigError, match="compute.strategy"):
        load_config("fastdinov2_tiny", ["compute.strategy=zero3"])
    with pytest.raises(ConfigError, match="compute.precision.*fsdp2"):
        load_config("fastdinov2_tiny", ["compute.strategy=fsdp2", "compute.precision=fp16"])
    assert load_config("fastdinov2_tiny", ["compute.strategy=fsdp2"]).compute.strategy == "fsdp2"


def test_resume_step_carries_the_data_position_over(data_root: Path) -> None:
    # 32 images: world 1 x batch 4 -> 8 steps/epoch (16 steps); world 2 x batch 4 -> 4 steps/epoch (8 steps).
    cfg = load_config("fastdinov2_tiny", _overrides(data_root, B))
    one, two = Curriculum(cfg, 32, world_size=1), Curriculum(cfg, 32, world_size=2)
    assert (one.total_steps, two.total_steps) == (16, 8)
    for step in range(two.total_steps + 1):  # shrinking the world: exact, step doubles
        assert one.resume_step(two.sample_position(step)) == 2 * step
    # growing the world: the first step at or after the position (an odd step skips B images)
    assert [two.resume_step(one.sample_position(s)) for s in range(7)] == [0, 1, 1, 2, 2, 3, 3]
    assert two.resume_step(10**6) == two.total_steps  # past the end: the run is finished
    assert [two.step_covering(p) for p in (0, 7, 8, 47, 48, 63)] == [0, 0, 1, 5, 6, 7]


def test_metrics_follow_the_data_position_through_world_size_changes(data_root: Path, tmp_path: Path) -> None:
    from fastdinov2.train.logging import MetricsLogger, read_metrics
    from fastdinov2.train.loop import reconcile_metrics

    cfg = load_config("fastdinov2_tiny", _overrides(data_root, B))
    one, two = Curriculum(cfg, 32, world_size=1), Curriculum(cfg, 32, world_size=2)
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as log:  # a 2-process run, steps 0-5 logged
        for step in range(6):
            log.log({"step": step, "samples_seen": two.sample_position(step), "loss": float(step)})

    def steps_and_losses() -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path)]

    # Continued on one process from the 2-process checkpoint at step 4 (32 images): step 8 there. It stops
    # before its first checkpoint, so the file is left in the 1-process numbering...
    assert reconcile_metrics(MetricsLogger(tmp_path, enabled=True, tensorboard=False), 32, 8, one) == 4
    assert steps_and_losses() == [(0, 0.0), (2, 1.0), (4, 2.0), (6, 3.0)]
    # ...and the same checkpoint continued on two processes again keeps all four records, in its numbering.
    assert reconcile_metrics(MetricsLogger(tmp_path, enabled=True, tensorboard=False), 32, 4, two) == 4
    assert steps_and_losses() == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    # A fresh start (no checkpoint) clears the file.
    assert reconcile_metrics(MetricsLogger(tmp_path, enabled=True, tensorboard=False), 0, 0, two) == 0


def _flag_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=50))
    try:
        agreement = distributed.FlagAgreement()
        # rank 1 raises its flag at the third boundary (index 2) only; rank 0 never does
        seen = [agreement.poll(rank == 1 and i == 2) for i in range(5)]
        agreement.close()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_flag_agreement_reaches_every_rank_one_boundary_late(tmp_path: Path) -> None:
    assert distributed.FlagAgreement().poll(True) is True  # one process: no lag, no collective
    mp.spawn(_flag_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, False, False, True, False]


def test_sampler_shards_cover_each_epoch_once(data_root: Path) -> None:
    cfg = load_config("fastdinov2_tiny", _overrides(data_root, B))
    cur = Curriculum(cfg, 32, world_size=2)
    shards = [[req for mb in StepBatchSampler(cur, 0, 0, 4, rank=r, world_size=2) for req in mb] for r in (0, 1)]
    indices = [i for shard in shards for (i, _, _) in shard]
    assert sorted(indices) == list(range(32))  # steps 0-3 are epoch 0: every image once, on one rank
    assert not {k for _, k, _ in shards[0]} & {k for _, k, _ in shards[1]}


# ---- two processes against one ------------------------------------------------------------------------
def test_ddp_two_processes_match_one_process(ddp_run: tuple[Path, str], reference: Path) -> None:
    run, stdout = ddp_run
    _assert_same_losses(run, reference)
    assert stdout.count("[fastdinov2] starting") == 1  # only rank 0 reports
    assert all(r["world_size"] == 2 for r in _rows(run))
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    ckpt = torch.load(run / "checkpoints" / "step_00000008" / "optim.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["sample_position"] == 64


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"step_{N_STEPS:08d}" / "model.pt", weights_only=True)["student"]


def test_ddp_with_the_graph_step_reduces_flat_gradients_like_ddp(data_root: Path, tmp_path: Path) -> None:
    """``compute.cuda_graph=true`` under torchrun (``compute.strategy=ddp``): no DDP wrapper; the gradients sit in
    one flat buffer averaged by one all-reduce (``distributed.FlatGradients``), which a CUDA graph captures too.
    On the CPU the same static step runs eagerly: it trains like DDP's eager step, step by step."""
    common = ["ibot.mask_sampling=batch", "compute.masked_tokens_bucket=4"]  # the graph step's requirements
    runs = {name: tmp_path / name for name in ("ddp", "graph")}
    _torchrun(runs["ddp"], _overrides(data_root, B, *common))
    _, err = _torchrun(runs["graph"], _overrides(data_root, B, *common, "compute.cuda_graph=true"))
    assert "the same static step runs eagerly" in err and "one all-reduce of a flat buffer per step" in err
    got, want = _rows(runs["graph"]), _rows(runs["ddp"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(N_STEPS))
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "dino_loss", "ibot_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key, g[key], w[key])
    graph, ddp = _final_weights(runs["graph"]), _final_weights(runs["ddp"])
    assert graph.keys() == ddp.keys()  # the same checkpoint layout (no "module." prefix)
    for k in ddp:
        torch.testing.assert_close(graph[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)


def test_ddp_with_half_weights_reduces_flat_gradients_like_ddp(data_root: Path, tmp_path: Path) -> None:
    """``compute.half_weights=true`` under torchrun: the bf16 copies' gradients are collected into the flat buffer
    and averaged there; the same steps as DDP under autocast."""
    common = ["compute.precision=bf16", "compute.masked_tokens_bucket=4"]
    runs = {name: tmp_path / name for name in ("ddp", "half")}
    _torchrun(runs["ddp"], _overrides(data_root, B, *common))
    _, err = _torchrun(runs["half"], _overrides(data_root, B, *common, "compute.half_weights=true"))
    assert "one all-reduce of a flat buffer per step" in err
    for g, w in zip(_rows(runs["half"]), _rows(runs["ddp"]), strict=True):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-3), (g["step"], key, g[key], w[key])


def test_graph_step_and_half_weights_refusals_on_several_processes(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastdinov2.train.loop import Trainer

    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)  # the checks run before any collective
    for key in ("cuda_graph", "half_weights"):
        cfg = load_config("fastdinov2_tiny", _overrides(data_root, B, "compute.strategy=fsdp2",
                                                        "compute.precision=bf16", f"compute.{key}=true",
                                                        "compute.masked_tokens_bucket=4"))
        with pytest.raises(ConfigError, match=f"compute.{key}=true does not combine with compute.strategy=fsdp2"):
            Trainer(cfg, tmp_path / key)
    cfg = load_config("fastdinov2_tiny", _overrides(data_root, B, "compute.cuda_graph=true",
                                                    "compute.masked_tokens_bucket=4"))  # TINY masks per sample
    with pytest.raises(ConfigError, match="needs ibot.mask_sampling=batch"):
        Trainer(cfg, tmp_path / "sample")


def test_fsdp2_matches_and_writes_full_state_dicts(fsdp_run: tuple[Path, str], reference: Path) -> None:
    run = fsdp_run[0]
    _assert_same_losses(run, reference)
    for name in ("model.pt", "optim.pt"):
        got = torch.load(run / "checkpoints" / "step_00000008" / name, weights_only=True)
        want = torch.load(reference / "checkpoints" / "step_00000008" / name, weights_only=True)
        if name == "model.pt":
            for part in ("student", "teacher"):
                assert {k: v.shape for k, v in got[part].items()} == {k: v.shape for k, v in want[part].items()}
                for k, v in want[part].items():
                    torch.testing.assert_close(got[part][k], v, rtol=1e-3, atol=1e-5)
        else:
            g, w = got["optimizer"]["state"], want["optimizer"]["state"]
            assert g.keys() == w.keys()
            for i in w:
                assert g[i]["exp_avg_sq"].shape == w[i]["exp_avg_sq"].shape
                torch.testing.assert_close(g[i]["exp_avg_sq"], w[i]["exp_avg_sq"], rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_checkpoint_resumes_on_one(strategy: str, data_root: Path, reference: Path, tmp_path: Path,
                                               request: pytest.FixtureRequest,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    two_process_run = request.getfixturevalue(f"{strategy.replace('fsdp2', 'fsdp')}_run")[0]
    run = _copy_run_up_to(two_process_run, tmp_path / "run", 4)
    # Same global batch (2 x B -> 1 x 2B): the step is unchanged and the run continues exactly.
    train(load_config("fastdinov2_tiny", _overrides(data_root, 2 * B)), run, allow_config_change=True)
    err = capsys.readouterr().err
    assert "written by 2 process(es) at step 4 after 32 images" in err and "at step 4," in err
    _assert_same_losses(run, reference)


def test_one_process_checkpoint_resumes_on_two_with_accumulation(data_root: Path, reference_accum: Path,
                                                                  tmp_path: Path) -> None:
    # 1 process x 2 micro-batches of 4 -> 2 processes x 2 micro-batches of 2: each micro-batch holds the same
    # images (and the centres see the same rows), so the run continues exactly, with DDP's no_sync on the
    # first micro-batch of every step.
    run = _copy_run_up_to(reference_accum, tmp_path / "run", 4)
    _, err = _torchrun(run, _overrides(data_root, B // 2, "train.grad_accum_steps=2"), "--allow-config-change")
    assert "written by 1 process(es) at step 4 after 32 images" in err
    _assert_same_losses(run, reference_accum)


def test_world_change_with_fixed_per_process_batch_converts_the_step(
    data_root: Path, ddp_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run_up_to(ddp_run[0], tmp_path / "run", 4)
    summary = train(load_config("fastdinov2_tiny", _overrides(data_root, B)), run)  # same config, world 1
    err = capsys.readouterr().err
    assert "at step 4 after 32 images; resuming on 1 process(es) (global batch 4) at step 8" in err
    assert "0 image(s) of the stream skipped" in err and "renumbered" in err
    assert summary["step"] == 16 and summary["finished"]
    rows = _rows(run)
    # The 2-process records of steps 0-3 (8 images each) become steps 0, 2, 4, 6 of the 4-image steps.
    assert [r["step"] for r in rows] == [0, 2, 4, 6, *range(8, 16)]
    assert [r["samples_seen"] for r in rows] == [0, 8, 16, 24, *range(32, 64, 4)]
    assert [r["world_size"] for r in rows] == [2] * 4 + [1] * 8
    # From the resume on, the schedules are those of the new global batch (lr scaled for 4 images, not 8).
    cfg = load_config("fastdinov2_tiny", _overrides(data_root, B))
    new = build_schedules(cfg, Curriculum(cfg, 32, world_size=1))
    assert [r["lr"] for r in rows[4:]] == pytest.approx([float(new.lr[s]) for s in range(8, 16)], abs=1e-8)
    # At the same point of training (epoch 1), the lr is the 2-process one scaled by sqrt(4 / 8).
    assert rows[4]["lr"] == pytest.approx(_rows(ddp_run[0])[4]["lr"] / 2**0.5, rel=0.02)


# ---- fault tolerance ----------------------------------------------------------------------------------
def test_sigterm_to_torchrun_saves_between_log_steps_with_loader_workers(data_root: Path, tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to each worker's whole process group, loader workers included (SLURM signals
    every process of the step): the ranks agree at the next step boundary, not at the next log step
    (``train.log_every`` is larger than the run), and save."""
    run = tmp_path / "run"
    overrides = _overrides(data_root, B, "optim.epochs=50", "curriculum.stages.0.fraction=0.9",
                           "curriculum.stages.1.fraction=0.1", "train.log_every=1000",
                           "train.checkpoint_every=1000", "data.num_workers=1")
    agent = _start(run, overrides)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():  # step 0 is logged
        time.sleep(0.2)
    time.sleep(1.0)
    agent.send_signal(signal.SIGTERM)
    _, err = _wait(agent, deadline)
    # torchrun itself exits 1 (it raises SignalException); the ranks' own exit is the "preempted" line
    assert "[fastdinov2] preempted: received signal 15; saved" in err, err[-4000:]
    assert "is killed by signal" not in err, err[-4000:]
    ckpts = list_checkpoints(run / "checkpoints")
    assert len(ckpts) == 1 and 1 <= ckpts[0][0] < 200, err[-4000:]


def test_killed_worker_is_restarted_from_the_last_checkpoint(fsdp_run: tuple[Path, str], reference: Path) -> None:
    run, stdout = fsdp_run
    # The first workers started from scratch; after the kill, torchrun's restart resumed from a checkpoint
    # (a second restart may also have, see ``fsdp_run``) and the finished run is the uninterrupted one.
    assert stdout.count("[fastdinov2] starting") == 1 and stdout.count("resuming from") in (1, 2), stdout
    _assert_same_losses(run, reference)


# ---- distributed feature extraction ---------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(n)
        self.images = torch.rand(n, 3, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i % 3


def _feature_model() -> torch.nn.Module:
    from fastdinov2.models.vit import DinoVisionTransformer

    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2).eval()


def _features_worker(rank: int, port: int, out_dir: str) -> None:
    from fastdinov2.eval.features import extract_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=50))
    try:
        model, out = _feature_model(), {}
        for n in (7, 1):  # uneven shards, and an empty one
            out[f"cls{n}"] = extract_features(model, _Images(n), batch_size=2, progress=False)
        out["blocks"] = extract_features(model, _Images(7), batch_size=3, kind="blocks", n_last_blocks=2,
                                         progress=False)
        # A cache only rank 0 can see (rank 1's path does not exist): both ranks must recompute together.
        cache = Path(out_dir) / ("cache.safetensors" if rank == 0 else f"missing-{rank}.safetensors")
        out["cached"] = extract_features(model, _Images(7), batch_size=2, progress=False, cache_path=cache,
                                         cache_key="k")
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_feature_extraction_shards_and_gathers(tmp_path: Path) -> None:
    from fastdinov2.eval.features import extract_features, save_cached_features

    model = _feature_model()
    want = {f"cls{n}": extract_features(model, _Images(n), batch_size=4, progress=False) for n in (7, 1)}
    want["blocks"] = extract_features(model, _Images(7), batch_size=4, kind="blocks", n_last_blocks=2,
                                      progress=False)
    want["cached"] = want["cls7"]
    stale = (torch.zeros(7, 16), torch.zeros(7, dtype=torch.long))
    save_cached_features(tmp_path / "cache.safetensors", "k", *stale)  # would be wrong if used by rank 0 alone
    mp.spawn(_features_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, (feats, labels) in want.items():
            torch.testing.assert_close(got[key][0], feats, rtol=1e-5, atol=1e-6)
            assert torch.equal(got[key][1], labels), key
    assert want["cls7"][1].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_bad_image_limit_counts_all_processes(data_root: Path, tmp_path: Path) -> None:
    """``data.max_bad_samples`` limits the run, not each rank: two bad files allowed one stop the run on
    every rank, wherever the sampler sent them."""
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    for bad in sorted((data / "train").rglob("*.jpg"))[:2]:
        bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEGs
    agent = _start(tmp_path / "run", _overrides(data, B, "data.max_bad_samples=1", "train.log_every=1",
                                                "train.max_steps=4"))  # one epoch: each file seen once
    _, err = _wait(agent, time.time() + TIMEOUT)
    assert agent.returncode != 0
    assert "bad image(s) across 2 processes (data.max_bad_samples=1)" in err, err[-3000:]


def test_a_micro_batch_of_only_bad_files_on_one_rank_is_replaced(data_root: Path, tmp_path: Path) -> None:
    """With ``data.on_bad_sample=replace`` (the default) a rank whose whole micro-batch is bad still runs the
    step with a full batch drawn from other images, so both ranks run the same collectives and finish."""
    from fastdinov2.data.datasets import discover_training_images

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    cfg = load_config("fastdinov2_tiny", _overrides(data, B))
    records, _ = discover_training_images(data)
    (step0,) = StepBatchSampler(Curriculum(cfg, len(records), world_size=2), 0, 0, 1, rank=1, world_size=2)
    for index, _, _ in step0:  # every file of rank 1's first micro-batch
        records[index].path.write_bytes(records[index].path.read_bytes()[:100])
    _, err = _torchrun(tmp_path / "run", _overrides(data, B, "data.max_bad_samples=10", "train.max_steps=4"))
    assert err.count("rank 1: replaced bad image") >= B, err[-3000:]
    counts = [int(x.split("/")[0]) for x in err.split("bad images so far: ")[1:]]
    assert counts and counts[-1] >= B, err[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL")
def test_flat_gradients_all_reduce_is_captured_in_a_cuda_graph(tmp_path: Path) -> None:
    """The collective of ``FlatGradients`` inside a CUDA graph (a one-rank NCCL group: the all-reduce still runs
    as an NCCL kernel): replays give the eager gradients and follow new inputs."""
    assert not dist.is_initialized()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda()
        flat = distributed.FlatGradients(list(model.parameters()))
        x = torch.randn(8, 16, device="cuda")

        def step() -> None:
            flat.zero_()
            model(x).square().sum().backward()
            flat.all_reduce()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(2):
            x.copy_(torch.randn(8, 16, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            want = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
            for p, w in zip(model.parameters(), want, strict=True):
                torch.testing.assert_close(p.grad, w)
    finally:
        dist.destroy_process_group()


def test_flat_gradients_keep_views_and_recover_replaced_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    flat = distributed.FlatGradients(list(model.parameters()))  # no process group: all_reduce only re-attaches
    assert len(flat.buffers) == 1 and flat.buffers[0].numel() == sum(p.numel() for p in model.parameters())
    x = torch.randn(5, 4)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    assert all(p.grad is v for p, v in zip(model.parameters(), flat.views, strict=True))  # accumulated in place
    model[0].weight.grad = want[0] * 2  # replaced by someone: copied into the view, not lost
    model[1].bias.grad = None
    flat.all_reduce()
    torch.testing.assert_close(model[0].weight.grad, want[0] * 2)
    assert model[0].weight.grad is flat.views[0] and float(model[1].bias.grad.abs().sum()) == 0.0  # type: ignore[union-attr]
    flat.zero_()
    assert float(flat.buffers[0].abs().sum()) == 0.0
    model(x).sum().backward()  # the next backward writes into the zeroed views
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)
