"""Smoke tests of the benchmark scripts (benchmarks/*.py): each runs for one step on a tiny model, and the
pieces with a checkable result (EMA of the mirrored train step, synthetic masks, per-stage rates, the
GPU job planner) are compared with hand-computed values. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = [
    "student.embed_dim=32",
    "student.depth=1",
    "student.num_heads=2",
    "dino.head_n_prototypes=32",
    "ibot.head_n_prototypes=32",
    "dino.head_hidden_dim=32",
    "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_bottleneck_dim=16",
    "crops.local_crops_number=2",
]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """The benchmarks pin torch's thread count (and OMP_NUM_THREADS); leave both as they were."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step_mod() -> ModuleType:
    return _load("step")


def test_synthetic_batch_masks_are_crop_major_and_weighted(step_mod: ModuleType) -> None:
    from fastdinov2.config import load_config

    cfg = load_config("fastdinov2_tiny", TINY)
    spec = step_mod.StageSpec("s", 32, 16, 4)
    b = step_mod.make_batch(cfg, spec, torch.device("cpu"))
    assert b.global_crops.shape == (8, 3, 32, 32) and b.local_crops.shape == (8, 3, 16, 16)
    assert b.masks.shape == (8, 16) and b.n_masked == int(b.masks.sum())
    assert torch.equal(b.mask_indices, b.masks.flatten().nonzero().flatten())
    rows = b.mask_indices // 16  # every masked crop's weights sum to 1
    for r in rows.unique():
        assert b.masks_weight[rows == r].sum().item() == pytest.approx(1.0)


def test_step_runner_applies_update_and_ema(step_mod: ModuleType) -> None:
    from fastdinov2.config import load_config

    torch.set_num_threads(1)
    cfg = load_config("fastdinov2_tiny", TINY)
    runner = step_mod.StepRunner(cfg, torch.device("cpu"))
    batch = step_mod.make_batch(cfg, step_mod.StageSpec("s", 32, 16, 4), torch.device("cpu"))
    s0 = [p.detach().clone() for p in runner.model.student.parameters()]
    t0 = [p.detach().clone() for p in runner.model.teacher.parameters()]
    assert runner.step(batch)
    m = runner.sched["momentum"]
    s1 = list(runner.model.student.parameters())
    moved = sum(not torch.equal(a, b) for a, b in zip(s0, s1))
    assert moved > len(s0) // 2  # AdamW moved (nearly) every student tensor
    for before, after, student in zip(t0, runner.model.teacher.parameters(), s1):
        torch.testing.assert_close(after, m * before + (1 - m) * student.detach())


def test_step_benchmark_runs_both_stages(step_mod: ModuleType, tmp_path: Path) -> None:
    out = step_mod.main(
        [
            "--config",
            "fastdinov2_tiny",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--skip",
            "ema",
            "--json-out",
            str(tmp_path / "s.json"),
            *TINY,
        ]
    )
    assert [s["global_size"] for s in out["stages"]] == [32, 64]
    assert out["sdpa_cudnn"] is None  # a CUDA setting: not recorded on the CPU
    assert out["ratio"]["flops"] > 2.0  # 4x the tokens at full resolution, minus the CLS token and heads
    assert json.loads((tmp_path / "s.json").read_text())["ratio"] == out["ratio"]
    with pytest.raises(SystemExit, match="--skip"):
        step_mod.main(["--skip", "attention", *TINY])
    with pytest.raises(SystemExit, match="--cuda-graph needs --device cuda"):  # CUDA graphs: CUDA only
        step_mod.main(["--cuda-graph", *TINY])


def test_step_benchmark_compiles_blocks(step_mod: ModuleType) -> None:
    """--compile-blocks: every block and head compiled in place (aot_eager: no code generation); the step
    still trains (finite losses)."""
    out = step_mod.main(["--steps", "1", "--rounds", "1", "--warmup", "1", "--threads", "1", "--compile-blocks",
                         "--compile-backend", "aot_eager", *TINY])
    assert out["compile_blocks"] and all(s["nonfinite_steps"] == 0 for s in out["stages"])


def test_step_count_ops_counts_kernel_launching_calls(step_mod: ModuleType) -> None:
    out = step_mod.main(["--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1", "--stages", "0",
                         "--count-ops", *TINY])
    oc = out["stages"][0]["op_count"]
    assert oc["kernel_ops_per_step"] == sum(oc["top_kernel_ops"].values()) or len(oc["top_kernel_ops"]) == 15
    assert "aten::addmm" in oc["top_kernel_ops"] and not {"aten::view", "aten::new_empty"} & set(oc["top_kernel_ops"])
    # one step of a 1-block model: forward + backward of every part, fewer than a thousand calls
    assert 100 < oc["kernel_ops_per_step"] < 1000
    assert sum(oc["kernel_ops_by_phase"].values()) == oc["kernel_ops_per_step"]
    assert {"teacher", "student_fwd", "backward", "optimizer", "ema"} <= set(oc["kernel_ops_by_phase"])
    # the memory traffic of the non-matmul calls: the optimizer reads and writes at least 7 fp32 words per
    # parameter (param, grad, two moments), the EMA at least 3 (teacher, student)
    n_params = out["model"]["student_params_m"] * 1e6
    gb = oc["non_matmul_gb_by_phase"]
    assert gb["optimizer"] >= 7 * 4 * n_params / 1e9 * 0.99 and gb["ema"] >= 3 * 4 * n_params / 1e9 * 0.99
    assert oc["non_matmul_gb_per_step"] == pytest.approx(sum(gb.values()))
    with pytest.raises(SystemExit, match="--count-ops"):
        step_mod.main(["--count-ops", "--compile-blocks", *TINY])
    # under CPU autocast (--dtype bf16) the weight casts appear; bf16 weight copies remove most of them
    casts = []
    for extra in ([], ["compute.half_weights=true"]):
        out = step_mod.main(["--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1", "--stages", "0",
                             "--count-ops", "--dtype", "bf16", *TINY, *extra])
        assert out["dtype"] == "bfloat16"
        casts.append(out["stages"][0]["op_count"]["top_kernel_ops"].get("aten::_to_copy", 0))
    assert casts[1] < casts[0] * 0.55, casts  # the rest: the activations' casts (97 -> 49 for this model)


def test_step_profile_reports_device_time_tables(step_mod: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    out = step_mod.main(["--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1", "--stages", "0",
                         "--profile", "1", *TINY])
    prof = out["stages"][0]["profile"]
    top = prof["top_device_ops"]
    assert top and {"op", "self_device_ms_per_step", "calls_per_step"} <= set(top[0])
    assert "teacher" in prof["phase_device_ms_per_step"]
    capsys.readouterr()
    step_mod.print_readable({**out, "device": "cuda"})  # the GPU-only lines: what a CUDA run prints
    assert "top by GPU time" in capsys.readouterr().out


def test_trainer_step_benchmark_splits_host_and_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ts = _load("trainer_step")
    out = ts.main(["--steps", "2", "--warmup", "1", "--profile", "1", "--stages", "1",
                   "--json-out", str(tmp_path / "t.json"), "train.batch_size_per_gpu=4", "data.num_workers=0",
                   "compute.threads=1"])
    (stage,) = out["stages"]
    assert stage["stage"] == "full_res_noise" and stage["batch_size"] == 4
    ld = stage["loader"]
    assert ld["ms_per_step"] > 0 and ld["host_rest_ms"] > 0 and ld["host_data_wait_ms"] > 0
    # the host's parts add up to its time per step; on the CPU (synchronous) that is the step
    assert ld["host_data_wait_ms"] + ld["host_on_device_ms"] + ld["host_rest_ms"] == pytest.approx(
        ld["host_ms_per_step"])
    assert stage["same_batch_ms_per_step"] > 0 and stage["on_device_ms_per_step"] > 0
    assert stage["profile"]["steps"] == 1 and stage["profile"]["wall_ms_per_step"] > 0
    printed = capsys.readouterr().out
    assert "full_res_noise" in printed
    assert "kernels: CUDA only" in printed and "by kind" not in printed  # no GPU figures on the CPU
    assert json.loads((tmp_path / "t.json").read_text())["stages"][0]["loader"] == ld
    with pytest.raises(SystemExit, match="fewer than"):
        ts.main(["--steps", "100000", "--stages", "0", "train.batch_size_per_gpu=4", "data.num_workers=0"])


def test_head_loss_benchmark(tmp_path: Path) -> None:
    hl = _load("head_loss")
    out = hl.main(["--device", "cpu", "--threads", "1", "--m", "40", "--k", "256", "--d", "16", "--chunk-rows",
                   "7,64", "--steps", "1", "--warmup", "0", "--json-out", str(tmp_path / "h.json")])
    assert [r["variant"] for r in out["variants"]] == ["reference", "chunked_c7", "chunked_c64"]
    assert out["max_rel_loss_diff"] < 1e-5  # same loss
    peaks = {r["variant"]: r["peak_mib"] for r in out["variants"]}
    assert peaks["reference"] > 0 and peaks["chunked_c7"] < peaks["reference"]  # measured, and smaller
    assert json.loads((tmp_path / "h.json").read_text())["variants"] == out["variants"]


def test_dino_loss_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dl = _load("dino_loss")
    out = dl.main(["--device", "cpu", "--threads", "1", "--b", "3", "--n-local", "2", "--k", "64", "--traffic-b", "4",
                   "--traffic-k", "1024", "--steps", "1", "--warmup", "0", "--json-out", str(tmp_path / "d.json")])
    assert [r["variant"] for r in out["variants"]] == ["reference"]  # (the fused variant needs CUDA)
    assert out["variants"][0]["peak_mib"] > 0 and out["variants"][0]["loss"] > 0
    t = out["traffic"]
    # the reference moves the fp32 [rows, K] log-probabilities several times; the fused kernels far less
    rows_fp32_gb = (2 + 2) * 4 * 1024 * 4 / 1e9
    assert t["reference_gb"] > 5 * rows_fp32_gb and 0 < t["fused_gb"] < t["reference_gb"] / 2
    assert "aten::_log_softmax" in t["reference_gb_by_op"]
    assert json.loads((tmp_path / "d.json").read_text())["traffic"] == t
    assert "fused kernels (not run here) would move on a GPU" in capsys.readouterr().out


def test_data_pipeline_benchmark(tmp_path: Path) -> None:
    dp = _load("data_pipeline")
    a = dp.write_jpegs(tmp_path / "a", 2, 64, 48)
    b = dp.write_jpegs(tmp_path / "b", 2, 64, 48)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # deterministic
    out = dp.main(
        [
            "--config",
            "fastdinov2_tiny",
            "--n-images",
            "2",
            "--rounds",
            "1",
            "--lowpass",
            "resize",
            "--batch-size",
            "2",
            "--no-cuda",
            *TINY,
        ]
    )
    keys = {(r["global_size"], r["photometric_on"]) for r in out["samples"]}
    assert keys == {(32, "worker"), (32, "device"), (64, "worker"), (64, "device")}
    assert all(r["img_per_s_per_core"] > 0 for r in out["samples"])
    assert [p["global_size"] for p in out["photometric_batched"]] == [32, 64]


PHOTOMETRIC_TINY = ["--device", "cpu", "--threads", "1", "--batch-size", "2", "--local-crops", "2", "--sizes",
                    "32/16", "--rounds", "1", "--warmup", "0", "--check-batch", "2", "--check-repeats", "2"]


def test_photometric_libs_benchmark(tmp_path: Path) -> None:
    pytest.importorskip("kornia")
    pl = _load("photometric_libs")
    out = pl.main([*PHOTOMETRIC_TINY, "--json-out", str(tmp_path / "p.json")])
    assert out["kornia_missing"] is None
    (size,) = out["sizes"]
    rows = {r["variant"]: r for r in size["rows"]}
    assert set(rows) == {"ours_dense", "ours_subset", "kornia"}
    assert all(r["ms_per_batch"] > 0 and r["aten_ops"] > 0 for r in rows.values())
    # the dense path and kornia read no device value back; the subset path reads its selections
    assert rows["ours_dense"]["device_reads"] == 0 and rows["kornia"]["device_reads"] == 0
    assert rows["ours_subset"]["device_reads"] > 0
    f = size["formula"]
    assert max(max(v.values()) for v in f.values()) < 1e-3  # same formulas (luma weights differ by 1e-4)
    assert set(size["stats"]) >= {"ours", "kornia", "max_abs_z"}
    assert json.loads((tmp_path / "p.json").read_text())["sizes"][0]["rows"][0]["variant"] == "ours_dense"


def test_photometric_libs_benchmark_without_kornia(monkeypatch: pytest.MonkeyPatch) -> None:
    pl = _load("photometric_libs")
    monkeypatch.setattr(pl, "kornia_or_reason", lambda: (None, "kornia is not usable here (ImportError: test)"))
    out = pl.main(PHOTOMETRIC_TINY)
    assert "ImportError" in out["kornia_missing"]
    assert [r["variant"] for r in out["sizes"][0]["rows"]] == ["ours_dense", "ours_subset"]
    assert "formula" not in out["sizes"][0] and "kornia" not in out["sizes"][0]["stats"]


def test_end_to_end_stage_rates_and_implied_speedup(tmp_path: Path) -> None:
    e2e = _load("end_to_end")
    history = [  # windows of 2 steps; the first and the one spanning the switch are left out
        {"step": 0, "stage": 0, "img_per_s": 1.0, "data_wait_frac": 0.9},
        {"step": 2, "stage": 0, "img_per_s": 100.0, "data_wait_frac": 0.0},
        {"step": 4, "stage": 0, "img_per_s": 50.0, "data_wait_frac": 0.5},
        {"step": 6, "stage": 1, "img_per_s": 7.0, "data_wait_frac": 0.0},
        {"step": 8, "stage": 1, "img_per_s": 20.0, "data_wait_frac": 0.25},
    ]
    rates = e2e.stage_rates(history, warmup_steps=0)
    # stage 0: 4 steps over 2/100 + 2/50 = 0.06 -> 66.67; wait (0 * 0.02 + 0.5 * 0.04) / 0.06
    assert rates[0]["img_per_s"] == pytest.approx(4 / 0.06)
    assert rates[0]["data_wait_frac"] == pytest.approx(0.02 / 0.06)
    assert rates[1] == pytest.approx({"img_per_s": 20.0, "data_wait_frac": 0.25, "steps": 2})
    # by default a stage's first 4 steps (graph warm-up and capture, compilation) are left out too: stage 0
    # keeps the window of steps 5-6 only; stage 1 counts as begun at its first record (step 8), so the windows
    # starting before step 12 are left out
    history = [
        {"step": 0, "stage": 0, "img_per_s": 1.0, "data_wait_frac": 0.9},
        {"step": 2, "stage": 0, "img_per_s": 5.0, "data_wait_frac": 0.0},  # steps 1-2
        {"step": 4, "stage": 0, "img_per_s": 50.0, "data_wait_frac": 0.5},  # steps 3-4
        {"step": 6, "stage": 0, "img_per_s": 60.0, "data_wait_frac": 0.0},  # steps 5-6
        {"step": 8, "stage": 1, "img_per_s": 7.0, "data_wait_frac": 0.0},  # the switch
        {"step": 10, "stage": 1, "img_per_s": 8.0, "data_wait_frac": 0.0},  # steps 9-10
        {"step": 12, "stage": 1, "img_per_s": 9.0, "data_wait_frac": 0.0},  # steps 11-12
        {"step": 14, "stage": 1, "img_per_s": 30.0, "data_wait_frac": 0.0},  # steps 13-14
    ]
    rates = e2e.stage_rates(history)
    assert rates[0] == pytest.approx({"img_per_s": 60.0, "data_wait_frac": 0.0, "steps": 2})
    assert rates[1] == pytest.approx({"img_per_s": 30.0, "data_wait_frac": 0.0, "steps": 2})

    from fastdinov2.config import load_config

    cfg = load_config("fastdinov2_tiny", ["optim.epochs=4"])  # 3 epochs low-res, 1 full-res
    fast = {"stages": [{"img_per_s": 40.0}, {"img_per_s": 10.0}]}
    base = {"stages": [{"img_per_s": 10.0}]}
    assert e2e.implied_speedup(fast, base, cfg) == pytest.approx((4 / 10) / (3 / 40 + 1 / 10))

    src = tmp_path / "src" / "train"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            from PIL import Image

            Image.new("RGB", (8, 8)).save(src / c / f"{i}.png")
    dest = e2e.make_subset(tmp_path / "src", tmp_path / "dst", 3)
    files = sorted(p.relative_to(dest).as_posix() for p in (dest / "train").rglob("*.png"))
    assert files == ["train/a/0.png", "train/a/1.png", "train/b/0.png"]


def test_gpu_all_plan_and_budget(tmp_path: Path) -> None:
    ga = _load("gpu_all")
    names = [j.name for j in ga.plan(tmp_path)]
    # the GPU tests first, then the graph step of both models without and with the teacher on its own stream and
    # with the fused DINO loss, then the trainer's step split up, the trainer end to end, and regional compilation
    # without and with both (`_new`)
    graphs = [f"step_{m}_b64_cuda_graph{v}" for m in ("vits16", "vitb16") for v in ("", "_overlap", "_dino_fused")]
    blocks = [f"step_{m}_b64_compile_blocks_cuda_graph{v}" for m, v in (
        ("vits16", ""), ("vits16", "_new"), ("vitb16", "_best"), ("vitb16", "_best_new"))]
    assert names[:13] == ["pytest_gpu", *graphs, "trainer_step_vits16", "end_to_end_vits16_graph", *blocks]
    later = [f"step_{m}_b64_cuda_graph{v}" for m in ("vits16", "vitb16") for v in ("_unfused", "_half")]
    sdpa = ["step_vits16_b64_cuda_graph_sdpa_flash", "step_vits16_b64_cuda_graph_sdpa_efficient"]
    assert names[13:23] == ["step_vitb16_b64_compile_blocks_best_profile", *sdpa, "dino_loss_b64_k65536",
                            "step_vits16_b64", "step_vitb16_b64", *later]
    assert "torchrun_smoke_tiny" in names
    assert len(set(names)) == len(names)
    smoke_names = [j.name for j in ga.plan(tmp_path, smoke=True)]
    assert set(smoke_names) == set(names) - {*graphs, *later, *sdpa, "step_vits16_b64_cuda_graph_unpacked"}
    assert all("--device" not in j.argv or "cuda" in j.argv for j in ga.plan(tmp_path))
    assert all(
        "cuda" not in j.argv and "compute.device=cuda" not in j.argv for j in ga.plan(tmp_path, smoke=True)
    )
    # every benchmark job's command line parses (argparse takes no option after the KEY=VALUE overrides when more
    # overrides follow it, as the smoke plan's tiny-model ones do)
    parsers: dict[str, Any] = {}
    for job in [*ga.plan(tmp_path), *ga.plan(tmp_path, smoke=True)]:
        script = Path(job.argv[0])
        if script.parent.name == "benchmarks" and script.suffix == ".py":
            if script.stem not in parsers:
                parsers[script.stem] = _load(script.stem).build_parser()
            parsers[script.stem].parse_args(job.argv[1:])
    assert {"step", "end_to_end", "trainer_step", "dino_loss", "head_loss"} <= set(parsers)
    # no budget: every job is skipped, and the merged file says so
    rc = ga.main(["--smoke", "--no-preflight", "--out", str(tmp_path / "res"), "--budget-s", "0"])
    merged = json.loads((tmp_path / "res" / "cpu-smoke.json").read_text())
    assert rc == 1 and {j["rc"] for j in merged["jobs"]} == {"skipped"} and len(merged["jobs"]) == len(smoke_names)


@pytest.mark.slow
@pytest.mark.parametrize("backend,compile_update", [("eager", True), ("aot_eager", True), ("aot_eager", False)])
def test_compile_step_matches_eager_step(step_mod: ModuleType, backend: str, compile_update: bool) -> None:
    """``--compile-step`` (one compiled forward+loss; the update compiled too with ``--compile-update``)
    gives the eager step's weights.

    Uses backends without code generation (graph capture and, for aot_eager, the AOTAutograd backward);
    about 10-20 s on a 2-core CPU, hence ``slow`` (run with ``-m slow``)."""
    from fastdinov2.config import load_config

    torch.set_num_threads(1)
    cfg = load_config("fastdinov2_tiny", TINY)
    batch = step_mod.make_batch(cfg, step_mod.StageSpec("s", 32, 16, 4), torch.device("cpu"))
    eager = step_mod.StepRunner(cfg, torch.device("cpu"))
    compiled = step_mod.StepRunner(cfg, torch.device("cpu"), compile_step=True, compile_backend=backend,
                                   compile_update=compile_update)
    for _ in range(2):
        assert eager.step(batch) and compiled.step(batch)
    for a, b in zip(eager.model.student.parameters(), compiled.model.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.model.teacher.parameters(), compiled.model.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(eager.model.dino_loss.center, compiled.model.dino_loss.center)
    torch.testing.assert_close(eager.model.ibot_loss.center, compiled.model.ibot_loss.center)


# ------------------------------------------------------------------------------ refusals of bad input
_MODULES: dict[str, ModuleType] = {}


def _cached(name: str) -> ModuleType:
    if name not in _MODULES:
        _MODULES[name] = _load(name)
    return _MODULES[name]


@pytest.mark.parametrize("script,argv,message", [
    ("trainer_step", ["--steps", "0"], "argument --steps: 0 is not a positive integer"),
    ("trainer_step", ["--warmup", "-1"], "argument --warmup: -1 is negative"),
    ("trainer_step", ["--profile", "-1"], "argument --profile: -1 is negative"),
    ("trainer_step", ["--stages", "x"], "argument --stages: 'x' is not a comma-separated list"),
    ("step", ["--steps", "0"], "argument --steps: 0 is not a positive integer"),
    ("step", ["--rounds", "0"], "argument --rounds: 0 is not a positive integer"),
    ("step", ["--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    ("step", ["--threads", "-1"], "argument --threads: -1 is negative"),
    ("step", ["--profile", "-2"], "argument --profile: -2 is negative"),
    ("step", ["--peak-tflops", "0"], "argument --peak-tflops: 0 is not a positive number"),
    ("dino_loss", ["--steps", "0"], "argument --steps: 0 is not a positive integer"),
    ("dino_loss", ["--b", "0"], "argument --b: 0 is not a positive integer"),
    ("dino_loss", ["--k", "0"], "argument --k: 0 is not a positive integer"),
    ("dino_loss", ["--n-local", "-1"], "argument --n-local: -1 is negative"),
    ("dino_loss", ["--traffic-b", "0"], "argument --traffic-b: 0 is not a positive integer"),
    ("dino_loss", ["--threads", "-1"], "argument --threads: -1 is negative"),
    ("head_loss", ["--steps", "0"], "argument --steps: 0 is not a positive integer"),
    ("head_loss", ["--m", "0"], "argument --m: 0 is not a positive integer"),
    ("head_loss", ["--n-images", "0"], "argument --n-images: 0 is not a positive integer"),
    ("head_loss", ["--chunk-rows", "abc"], "argument --chunk-rows: 'abc' is not a comma-separated list"),
    ("head_loss", ["--chunk-rows", "7,0"], "argument --chunk-rows: '7,0' is not a comma-separated list"),
    ("data_pipeline", ["--n-images", "0"], "argument --n-images: 0 is not a positive integer"),
    ("data_pipeline", ["--rounds", "0"], "argument --rounds: 0 is not a positive integer"),
    ("data_pipeline", ["--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    ("data_pipeline", ["--photometric-threads", "-1"], "argument --photometric-threads: -1 is negative"),
    ("data_pipeline", ["--image-size", "16x16"], "argument --image-size: 16x16: each side must be at least 18"),
    ("data_pipeline", ["--image-size", "big"], "argument --image-size: 'big' is not WIDTHxHEIGHT"),
    ("end_to_end", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("end_to_end", ["--train-images", "0"], "argument --train-images: 0 is not a positive integer"),
    ("end_to_end", ["--epochs", "0"], "argument --epochs: 0 is not a positive integer"),
    ("end_to_end", ["--num-workers", "-1"], "argument --num-workers: -1 is negative"),
    ("end_to_end", ["--threads", "-1"], "argument --threads: -1 is negative"),
    ("photometric_libs", ["--rounds", "0"], "argument --rounds: 0 is not a positive integer"),
    ("photometric_libs", ["--local-crops", "0"], "argument --local-crops: 0 is not a positive integer"),
    ("photometric_libs", ["--sizes", "32"], "argument --sizes: '32' is not GLOBAL/LOCAL"),
    ("photometric_libs", ["--full", "0/16"], "argument --full: '0/16': crop sizes must be positive"),
])
def test_benchmark_options_refuse_bad_values(script: str, argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Counts and sizes are checked while parsing: exit code 2 and a message naming the option and value."""
    with pytest.raises(SystemExit) as exc:
        _cached(script).build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_options_keep_zero_where_documented() -> None:
    """0 stays valid where it means something: no warm-up, no profile, all cores / the trainer's threads, no
    local crops, no checks; the defaults are the documented ones."""
    args = _cached("step").build_parser().parse_args(["--warmup", "0", "--profile", "0", "--threads", "0"])
    assert (args.warmup, args.profile, args.threads, args.batch_size) == (0, 0, 0, None)
    args = _cached("dino_loss").build_parser().parse_args(["--n-local", "0", "--warmup", "0"])
    assert (args.n_local, args.warmup, args.b, args.k) == (0, 0, None, None)
    assert _cached("head_loss").build_parser().parse_args(["--chunk-rows", "7, 64"]).chunk_rows == [7, 64]
    assert _cached("trainer_step").build_parser().parse_args(["--stages", "0,1"]).stages == [0, 1]
    args = _cached("photometric_libs").build_parser().parse_args(["--check-repeats", "0"])
    assert (args.check_repeats, args.sizes, args.full) == (0, [(224, 96), (112, 48)], (224, 96))
    args = _cached("data_pipeline").build_parser().parse_args(["--image-size", "18X20"])
    assert args.image_size == (18, 20) and _cached("data_pipeline").build_parser().parse_args([]).image_size == "auto"


def test_benchmark_common_refuses_empty_and_negative() -> None:
    common = _cached("common")
    with pytest.raises(ValueError, match="no times"):
        common.summarize_ms([])
    with pytest.raises(ValueError, match="negative"):
        common.set_threads(-1)
    with pytest.raises(ValueError, match="smaller than 18 px"):
        _cached("data_pipeline").write_jpegs(Path("unused"), 1, 16, 16)


@pytest.mark.parametrize("script,argv,message", [
    ("step", ["--config", "nope"], "error: unknown preset 'nope'"),
    ("step", ["foo.bar=1"], "error: override foo.bar: unknown key"),
    ("data_pipeline", ["--config", "nope"], "error: unknown preset 'nope'"),
    ("data_pipeline", ["foo.bar=1"], "error: override foo.bar: unknown key"),
    ("end_to_end", ["--fast", "nope"], "error: unknown preset 'nope'"),  # before any image is written or copied
    ("end_to_end", ["foo.bar=1"], "error: override foo.bar: unknown key"),
    ("trainer_step", ["--config", "nope"], "error: unknown preset 'nope'"),
])
def test_benchmark_config_errors_exit_2(script: str, argv: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad preset or override ends the script with one ``error:`` line and exit code 2, not a traceback."""
    with pytest.raises(SystemExit) as exc:
        _cached(script).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_benchmark_stage_and_size_checks(step_mod: ModuleType) -> None:
    """Stages that do not exist and crop sizes that are not whole patches are refused before any model is
    built (the tiny preset: 2 stages, patch size 8)."""
    with pytest.raises(SystemExit, match=r"--stages: stage 7 does not exist \(fastdinov2_tiny has 2 stages\)"):
        _cached("trainer_step").main(["--stages", "7"])
    with pytest.raises(SystemExit, match=r"--stages: stage 7 does not exist"):
        step_mod.main(["--stages", "7", *TINY])
    with pytest.raises(SystemExit, match="60 is not a positive multiple of the patch size 8.*use 56 or 64"):
        step_mod.main(["--sizes", "60/30", *TINY])
    with pytest.raises(SystemExit, match="30 is not a positive multiple of the patch size 8.*use 24 or 32"):
        step_mod.main(["--sizes", "64/30", *TINY])


def test_data_pipeline_decode_has_an_untimed_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_decode calls the decoder once before timing (its one-off start-up is not in the figure)."""
    from fastdinov2.config import load_config

    dp = _cached("data_pipeline")
    calls: list[Path] = []
    monkeypatch.setattr(dp, "decode_image", lambda path, *_: calls.append(path))
    dp.bench_decode(load_config("fastdinov2_tiny", TINY), [Path("a.jpg"), Path("b.jpg")], 0, rounds=2)
    assert calls == [Path("a.jpg")] + [Path("a.jpg"), Path("b.jpg")] * 2


def test_trainer_step_stops_loader_workers_when_a_step_fails(tmp_path: Path) -> None:
    """An exception escaping the measurement (here a division by zero: --steps 0, which parsing refuses, forced
    into the arguments) must not leave the loader's worker running: they ignore the first SIGTERM, so the
    process used to hang at exit joining them. Run in a subprocess, which has to end promptly."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import trainer_step as ts\n"
        "args = ts.build_parser().parse_args(['--stages', '0', '--warmup', '0', 'data.num_workers=1',\n"
        "                                     'train.batch_size_per_gpu=4', 'compute.threads=1'])\n"
        "args.steps = 0\n"
        "ts.run(args)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr, proc.stderr[-2000:]
