"""Every GPU benchmark in one go, in under 8 minutes, with JSON results for docs/results/gpu/<card>.json.

Run from the repository root on a machine with one CUDA GPU::

    python benchmarks/gpu_all.py                      # writes docs/results/gpu/<card>.json (+ <card>/ logs)
    python benchmarks/gpu_all.py --out /tmp/res --budget-s 420
    python benchmarks/gpu_all.py --dry-run            # print the plan only

Jobs run one after another, most informative and cheapest first; each gets a timeout of at most what is
left of ``--budget-s`` (default 450 s, leaving margin under 8 minutes for process start-up), and a job
that cannot get its minimum time is skipped and listed as such. Every job writes
``OUT/<card>/<job>.json`` and ``OUT/<card>/<job>.log``; at the end they are merged into ``OUT/<card>.json``.

Jobs (the order of :func:`plan`): the ``gpu``-marked tests (no host sync in a step; the trainer's CUDA-graph
step, ``compute.cuda_graph``, trains like the eager one; the fused iBOT loss matches the reference and replays in
a graph); the step benchmark (``benchmarks/step.py``) for ViT-S/16 and ViT-B/16 at batch 64, both curriculum
stages (112/48 and 224/96), as one CUDA graph with and without the fused iBOT loss (``ibot.fused_loss``); the
end-to-end benchmark (``benchmarks/end_to_end.py``, ViT-S/16 pair, real data loading) with
``compute.cuda_graph``; regional compilation inside the graph; the eager step with a profile (GPU time per
kernel); unpacked crops; end to end eager and with
regional compilation inside the graph; then torch.compile's own CUDA graphs, the 4096-prototype step, the
iBOT head + loss alone (``benchmarks/head_loss.py``), the data pipeline (``benchmarks/data_pipeline.py``), the
batched photometric augmentation, ours vs kornia (``benchmarks/photometric_libs.py``), a
``torchrun --nproc_per_node=1`` smoke of ``fastdinov2 train`` on the tiny preset, and further torch.compile
variants while time remains.

The Python interpreter is ``$PYTHON`` if set, else ``.venv/bin/python`` if present, else ``python3``;
``src`` is put on ``PYTHONPATH`` so an uninstalled checkout works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
S16, B16 = "fastdinov2_vits16_in100", "fastdinov2_vitb16_in1k"


@dataclass
class Job:
    name: str
    argv: list[str]  # after the interpreter
    cap_s: int  # timeout when enough budget is left
    min_s: int  # skip the job when less than this is left
    env: dict[str, str] = field(default_factory=dict)
    json_out: bool = True  # the job takes --json-out


def python_exe() -> str:
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else (shutil.which("python3") or sys.executable)


def plan(cache_dir: Path, smoke: bool = False) -> list[Job]:
    """The jobs, in order. ``smoke``: the same plan on the CPU with the tiny preset and 1 step each (to test
    this script without a GPU)."""
    dev = "cpu" if smoke else "cuda"
    s16, b16 = ("fastdinov2_tiny", "fastdinov2_tiny") if smoke else (S16, B16)
    steps = (
        ["--steps", "1", "--rounds", "1", "--warmup", "1"]
        if smoke
        else ["--steps", "10", "--rounds", "3", "--warmup", "3"]
    )
    tiny_model = ["student.depth=1", "student.embed_dim=48", "student.num_heads=2"] if smoke else []

    def step(name: str, cfg: str, *extra: str, batch: int = 64, cap: int = 90, min_s: int = 30) -> Job:
        b = str(batch // 8 if smoke else batch)
        return Job(
            name,
            [
                "benchmarks/step.py",
                "--config",
                cfg,
                "--device",
                dev,
                "--batch-size",
                b,
                *steps,
                *extra,
                *tiny_model,
            ],
            cap,
            min_s,
        )

    smoke_steps = "4" if smoke else "30"

    def e2e(name: str, *extra: str, epochs: int = 1, cap: int = 150, min_s: int = 60) -> Job:
        """benchmarks/end_to_end.py: the trainer with data loading, the ViT-S/16 pair on ``2048 x epochs`` embedded
        images (one epoch = 24 + 8 vs 32 steps of 64)."""
        return Job(
            name,
            ["benchmarks/end_to_end.py", "--fast", s16, "--baseline", "dinov2_tiny" if smoke else "dinov2_vits16_in100",
             "--train-images", "64" if smoke else "2048", "--epochs", "1" if smoke else str(epochs),
             "--repeats", "1" if smoke else "2", "--num-workers", "2" if smoke else "12",
             # a log step reads the device (a host sync): every 2 steps, as end_to_end.py's default, it would
             # expose the host's per-step work; the trainer's own default is 10
             "--log-every", "2" if smoke else "8",
             "--cache-dir", str(cache_dir / "data"), f"compute.device={dev}", "data.photometric_on=device", *extra,
             *(["train.batch_size_per_gpu=8", *tiny_model] if smoke else [])],
            cap,
            min_s,
        )

    # the trainer's CUDA-graph step; with DINOv2's batch masking (ibot.mask_sampling=batch, the default) the
    # masked-token count of a batch moves by a few tokens, so a bucket of 64 gives one shape per stage
    graph = ["compute.cuda_graph=true", "compute.masked_tokens_bucket=64"]
    # bf16 weight copies only: the bf16 residual stream (compute.half_residual) cost kNN accuracy on the CPU
    # (docs/benchmarks.md) and stays off whatever its speed
    half = ["compute.half_weights=true"]
    # the teacher's forward on a second CUDA stream (no effect on the CPU of a smoke run)
    overlap = ["compute.overlap_teacher=true"]
    # the DINO cross-entropy as Triton row kernels (reference path with a warning on the CPU of a smoke run)
    dino_fused = ["dino.fused_loss=true"]
    aot = ["compute.compile_backend=aot_eager"] if smoke else []
    return [
        Job(
            # the training step issues no host sync on CUDA (torch.cuda.set_sync_debug_mode), and the trainer's
            # CUDA-graph step (compute.cuda_graph) trains like the eager one
            "pytest_gpu",
            ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_train_sync_free.py",
             "tests/test_train_cuda_graph.py", "tests/test_fused_loss.py", "tests/test_half_residual.py",
             "tests/test_half_weights.py",
             "tests/test_distributed.py::test_flat_gradients_all_reduce_is_captured_in_a_cuda_graph"],
            180,
            30,
            json_out=False,
        ),
        # the eager step captured as one CUDA graph per stage (no compilation: launch overhead removed), ViT-S/16
        # and ViT-B/16 with the defaults (the Triton iBOT loss: ibot.fused_loss=auto on CUDA), next to the same
        # step with the teacher's forward on a second stream (compute.overlap_teacher: two branches of the graph,
        # new in session 7) and with the DINO term as Triton row kernels (dino.fused_loss, session 8); ~20 s each
        *(
            []
            if smoke
            else [step(f"step_{m}_b64_cuda_graph{suffix}", cfg, "--cuda-graph", *extra, cap=60, min_s=20)
                  for m, cfg in (("vits16", s16), ("vitb16", b16))
                  for suffix, extra in (("", []), ("_overlap", overlap), ("_dino_fused", dino_fused))]
        ),
        # the trainer's step with its defaults, split between the loader, the host and the device, with a
        # profile: why it was slower than step.py's (since session 7 the colour augmentation is inside the graph)
        Job(
            "trainer_step_vits16",
            ["benchmarks/trainer_step.py", "--config", s16, "--steps", "1" if smoke else "20",
             "--warmup", "1" if smoke else "3", "--profile", "1" if smoke else "5",
             f"data.cache_dir={cache_dir / 'data'}", f"compute.device={dev}",
             "data.num_workers=0" if smoke else "data.num_workers=12",
             *(["train.batch_size_per_gpu=8", *tiny_model] if smoke else [])],
            150,
            45,
        ),
        # the trainer with compute.cuda_graph: 4 epochs, so that the eager warm-up steps and the capture of each
        # stage's batch shape are a small part of the run
        e2e("end_to_end_vits16_graph", *graph, epochs=4, cap=200, min_s=80),
        # regional compilation (compute.compile=blocks: each block and head compiled, one graph per shape serves
        # all blocks) with the step captured as one CUDA graph: fused elementwise work and no launch overhead;
        # then with the unmeasured options of sessions 7 and 8 on as well (`_new`: the teacher on its own stream,
        # where the fused kernels leave the most gaps, and the fused DINO term): the candidates for the stage-ratio
        # target (the plain graph jobs above tell each option's own effect)
        step("step_vits16_b64_compile_blocks_cuda_graph", s16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else ["--cuda-graph"]), cap=180, min_s=60),
        step("step_vits16_b64_compile_blocks_cuda_graph_new", s16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else ["--cuda-graph"]), *overlap, *dino_fused,
             cap=180, min_s=60),
        # ViT-B/16 with every option that shortened its step (fused iBOT loss, bf16 weight copies), and with the
        # new ones as well: the MFU candidates
        step("step_vitb16_b64_compile_blocks_cuda_graph_best", b16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else ["--cuda-graph"]), "ibot.fused_loss=true", *half,
             cap=180, min_s=60),
        step("step_vitb16_b64_compile_blocks_cuda_graph_best_new", b16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else ["--cuda-graph"]), "ibot.fused_loss=true", *half,
             *overlap, *dino_fused, cap=180, min_s=60),
        # the MFU candidate's GPU time by kernel (regional compilation without the graph, so the profiler sees
        # each kernel): what is left around the matmuls once the elementwise work is fused
        step("step_vitb16_b64_compile_blocks_best_profile", b16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else []), "--profile", "3", "ibot.fused_loss=true", *half,
             cap=180, min_s=60),
        # the graph step with one attention backend instead of PyTorch's choice (cuDNN on an H100): the 10-token
        # local crops at 112/48 fill few of a fused kernel's row tiles
        *(
            []
            if smoke
            else [step(f"step_vits16_b64_cuda_graph_sdpa_{b}", s16, "--cuda-graph", "--sdpa", b, cap=60, min_s=20)
                  for b in ("flash", "efficient")]
        ),
        # the DINO term alone, reference vs dino.fused_loss: ms, peak memory and the traffic count (session 8)
        Job(
            "dino_loss_b64_k65536",
            ["benchmarks/dino_loss.py", "--device", dev,
             *(["--b", "4", "--k", "512", "--traffic-b", "4", "--traffic-k", "512", "--steps", "1", "--warmup", "0"]
               if smoke else ["--steps", "10", "--warmup", "2"])],
            60,
            15,
        ),
        # eager, with a profile: GPU time per kernel (top_kernels) and per kind of kernel (kernel_categories) is
        # the GPU's own time, which the CUDA-graph step replays without launch gaps
        step("step_vits16_b64", s16, "--profile", "3", "--count-ops"),
        step("step_vitb16_b64", b16, "--profile", "3"),
        # the graph step with the reference iBOT loss, and with bf16 weight copies (compute.half_weights: no
        # per-use weight casts); measured in session 6
        *(
            []
            if smoke
            else [step(f"step_{m}_b64_cuda_graph{suffix}", cfg, "--cuda-graph", *extra, cap=60, min_s=20)
                  for m, cfg in (("vits16", s16), ("vitb16", b16))
                  for suffix, extra in (("_unfused", ["ibot.fused_loss=false"]), ("_half", half))]
        ),
        # batched photometric augmentation: ours (dense, subset) vs kornia; ours only if kornia is missing (early:
        # the dense path, which the trainer runs before its graph, changed after the session-6 run)
        Job(
            "photometric_libs",
            ["benchmarks/photometric_libs.py", "--device", dev,
             *(["--batch-size", "2", "--sizes", "32/16", "--rounds", "1", "--warmup", "0", "--check-batch", "2",
                 "--check-repeats", "2"] if smoke else ["--rounds", "10", "--warmup", "3"])],
            60,
            20,
        ),
        # the trainer's graph step with the fused iBOT loss and the bf16 weight copies
        e2e("end_to_end_vits16_graph_fused_half", *graph, "ibot.fused_loss=true", *half, epochs=4, cap=200,
            min_s=80),
        # the student's crops in two passes through the blocks, as before compute.pack_crops
        *(
            []
            if smoke
            else [step("step_vits16_b64_cuda_graph_unpacked", s16, "--cuda-graph", "compute.pack_crops=false",
                       cap=60, min_s=20)]
        ),
        step("step_vitb16_b64_compile_blocks_cuda_graph", b16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else ["--cuda-graph"]), cap=180, min_s=60),
        # the same run without graphs and with the reference iBOT loss (the eager trainer)
        e2e("end_to_end_vits16", "compute.cuda_graph=false", "ibot.fused_loss=false", epochs=4, cap=200, min_s=80),
        # the trainer's best candidate: regional compilation inside the CUDA-graph step
        e2e("end_to_end_vits16_blocks_graph", "compute.compile=blocks", *aot, *graph, epochs=4, cap=300,
            min_s=150),
        # the same regions with torch.compile's own CUDA graphs (cudagraph trees): what the trainer can run
        # (compute.compile=blocks compute.compile_mode=reduce-overhead)
        step("step_vits16_b64_compile_blocks_reduce_overhead", s16, "--compile-blocks",
             *(["--compile-backend", "aot_eager"] if smoke else ["--compile-mode", "reduce-overhead"]), cap=180,
             min_s=60),
        # the step compiled with the cudagraphs backend (torch.compile's capture, no code generation)
        e2e("end_to_end_vits16_cudagraphs", "compute.compile=step",
            "compute.compile_backend=" + ("aot_eager" if smoke else "cudagraphs"), "compute.masked_tokens_bucket=256"),
        e2e("end_to_end_vits16_blocks", "compute.compile=blocks", "compute.cuda_graph=false", *aot, cap=200,
            min_s=90),
        step("step_vits16_b64_compile_step_cgbackend", s16, "--compile-step", "--compile-backend",
             "cudagraphs" if not smoke else "aot_eager", cap=120, min_s=40),
        # GPU time of the prototype layer: 4096 prototypes, the step captured as a CUDA graph (eager is launch-bound)
        step("step_vits16_b64_proto4096", s16, *([] if smoke else ["--cuda-graph"]), "dino.head_n_prototypes=4096",
             "ibot.head_n_prototypes=4096"),
        Job(  # iBOT prototype layer + loss: materialised vs chunked (ibot.loss_chunk_rows) vs fused (Triton)
            "head_loss_m3800_k65536",
            ["benchmarks/head_loss.py", "--device", dev, "--chunk-rows", "256,1024",
             *(["--m", "64", "--k", "512", "--d", "32", "--steps", "1", "--warmup", "0"] if smoke
               else ["--steps", "5", "--warmup", "2"])],
            60,
            20,
        ),
        Job(
            "data_pipeline",
            [
                "benchmarks/data_pipeline.py",
                "--config",
                s16,
                "--rounds",
                "2",
                *(["--n-images", "2", "--lowpass", "resize", "--no-cuda"] if smoke else []),
            ],
            90,
            40,
        ),
        Job(
            "torchrun_smoke_tiny",
            [
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=1",
                "-m",
                "fastdinov2",
                "train",
                "--config",
                "fastdinov2_tiny",
                "--output-dir",
                str(cache_dir / "torchrun_run"),
                f"compute.device={dev}",
                f"data.cache_dir={cache_dir / 'data'}",
                f"train.max_steps={smoke_steps}",
                "train.knn_at_end=false",
                "train.progress=false",
                "train.log_every=5",
                "data.num_workers=4",
                *tiny_model,
            ],
            120,
            45,
            json_out=False,
        ),
        step("step_vits16_b64_hostsync", s16, "--host-sync"),
        step(
            "step_vits16_b64_compile_step_cudagraphs",
            s16,
            "--compile-step",
            "--compile-mode",
            "reduce-overhead",
            cap=200,
            min_s=100,
        ),
        step("step_vits16_b64_compile_step", s16, "--compile-step", cap=180, min_s=100),
        Job(  # the dense photometric path compiled, as the trainer runs it with compute.compile on CUDA
            "photometric_compiled",
            ["benchmarks/photometric_libs.py", "--device", dev, "--no-kornia", "--compile", "--check-repeats", "0",
             *(["--batch-size", "2", "--sizes", "32/16", "--rounds", "1", "--warmup", "1"] if smoke
               else ["--rounds", "10", "--warmup", "3"])],
            150,
            60,
        ),
        # with the compiled step and CUDA graphs (compilation included in the wall time)
        e2e("end_to_end_vits16_compiled", "compute.compile=step", "compute.compile_mode=reduce-overhead",
            "compute.masked_tokens_bucket=256", cap=300, min_s=150),
        step("step_vits16_b128", s16, batch=128),
        step("step_vitb16_b128", b16, batch=128),
        step("step_vits16_b64_compile", s16, "--compile", cap=120, min_s=80),
        step("step_vitb16_b64_compile_step", b16, "--compile-step", cap=180, min_s=100),
    ]


def card_slug(smoke: bool) -> str:
    if smoke:
        return "cpu-smoke"
    try:
        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        name = "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


PREFLIGHT = """
import importlib, sys
missing = []
for name in ("torch", "numpy", "PIL", "omegaconf", "yaml", "safetensors", "tqdm", "fastdinov2.train.loop"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing Python modules: " + "; ".join(missing))
import torch
if NEED_CUDA and not torch.cuda.is_available():
    sys.exit("torch " + torch.__version__ + " sees no CUDA device")
try:  # the command line (torchrun job) also imports the evaluation and report modules
    from fastdinov2.cli import build_parser
    build_parser()
except Exception as exc:
    print(f"WARNING: the fastdinov2 command line cannot load ({type(exc).__name__}: {exc}); "
          "the torchrun job will fail", file=sys.stderr)
"""


def preflight(py: str, need_cuda: bool) -> str | None:
    """None when ``py`` can import fastdinov2 and its dependencies (and sees a GPU), else the reason."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = PREFLIGHT.replace("NEED_CUDA", str(need_cuda))
    try:
        res = subprocess.run([py, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{py}: {exc}"
    if res.returncode != 0:
        return f"{py}: {(res.stderr.strip().splitlines() or ['exit code ' + str(res.returncode)])[-1]}"
    for line in res.stderr.splitlines():
        if line.startswith("WARNING:"):
            print(f"[gpu_all] {line}", flush=True)
    return None


def run_job(job: Job, py: str, out: Path, timeout_s: float) -> dict[str, Any]:
    """Run one job in its own process group (killed as a whole on timeout); returns its status."""
    argv = [py, *job.argv] + (["--json-out", str(out / f"{job.name}.json")] if job.json_out else [])
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
        **job.env,
    }
    t0 = time.perf_counter()
    with open(out / f"{job.name}.log", "w") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return {
        "job": job.name,
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "timeout_s": round(timeout_s),
    }


def merge(out_dir: Path, card: str, statuses: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for st in statuses:
        path = out_dir / card / f"{st['job']}.json"
        if path.is_file():
            results[st["job"]] = json.loads(path.read_text())
        log = out_dir / card / f"{st['job']}.log"
        if log.is_file():
            st["log_tail"] = log.read_text()[-1500:]
    return {"card": card, "elapsed_s": round(elapsed, 1), "jobs": statuses, "results": results}


def summary_lines(merged: dict[str, Any]) -> list[str]:
    lines = []
    for name, res in merged["results"].items():
        if res.get("benchmark") == "step":
            parts = ", ".join(
                f"{s['global_size']}/{s['local_size']} {s['median_ms']:.1f} ms"
                + (f" MFU {100 * s['mfu']:.0f}%" if s.get("mfu") else "")
                for s in res["stages"]
            )
            ratio = res.get("ratio")
            tail = (
                f"; step ratio {ratio['step_time']:.2f}x vs FLOP ratio {ratio['flops']:.2f}x" if ratio else ""
            )
            lines.append(f"{name}: {parts}{tail}")
        elif res.get("benchmark") == "data_pipeline":
            best: dict[str, float] = {}
            for r in res["samples"]:
                key = f"{r['global_size']}/{r['local_size']}"
                if r["photometric_on"] == "worker":
                    best[key] = max(best.get(key, 0.0), r["img_per_s_per_core"])
            lines.append(f"{name}: " + ", ".join(f"{k} {v:.0f} img/s/core (worker)" for k, v in best.items()))
        elif res.get("benchmark") == "photometric_libs":
            parts = [
                f"{s['global_size']}/{s['local_size']} "
                + " ".join(f"{r['variant']} {r['ms_per_sample']:.3f}" for r in s["rows"])
                for s in res["sizes"]
            ]
            missing = f" ({res['kornia_missing']})" if res.get("kornia_missing") else ""
            lines.append(f"{name}: ms/sample " + "; ".join(parts) + missing)
        elif res.get("benchmark") == "trainer_step":
            lines.append(f"{name}: " + "; ".join(
                f"{s['global_size']}/{s['local_size']} {s['loader']['ms_per_step']:.1f} ms from the loader, "
                f"{s['on_device_ms_per_step']:.1f} on a ready batch"
                + (f", device idle {100 * s['profile']['device_idle_frac']:.0f}%"
                   if s.get("profile", {}).get("device_idle_frac") is not None else "")
                for s in res["stages"]))
        elif res.get("benchmark") in ("head_loss", "dino_loss"):
            lines.append(f"{name}: " + ", ".join(f"{r['variant']} {r['median_ms']:.2f} ms (+{r['peak_mib']:.0f} MiB)"
                                                 for r in res["variants"]))
        elif res.get("benchmark") == "end_to_end":
            lines.append(f"{name}: wall ratio {res.get('wall_clock_ratio') or float('nan'):.2f}x, per-stage rates "
                         f"{res.get('implied_speedup_from_stage_rates') or float('nan'):.2f}x")
    for st in merged["jobs"]:
        if st["rc"] != 0:
            lines.append(f"{st['job']}: rc={st['rc']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "gpu"), help="results folder")
    p.add_argument("--budget-s", type=float, default=450.0, help="total seconds for all jobs")
    p.add_argument("--only", default="", help="comma-separated job names to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 1 step: test this script")
    p.add_argument("--no-preflight", action="store_true", help="skip the import / CUDA check")
    args = p.parse_args(argv)

    card = card_slug(args.smoke)
    out_dir = Path(args.out)
    job_dir = out_dir / card
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastdinov2_gpu_all_{card}"
    jobs = plan(cache, smoke=args.smoke)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {j.name for j in jobs}
        if unknown:
            raise SystemExit(f"--only: unknown job(s) {', '.join(sorted(unknown))}")
        jobs = [j for j in jobs if j.name in wanted]
    if args.dry_run:
        for j in jobs:
            print(f"{j.name:<42} cap {j.cap_s:>4}s min {j.min_s:>3}s  {' '.join(j.argv)}")
        return 0
    job_dir.mkdir(parents=True, exist_ok=True)
    py = python_exe()
    problem = None if args.no_preflight else preflight(py, need_cuda=not args.smoke)
    if problem:
        print(f"[gpu_all] cannot run: {problem}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    statuses: list[dict[str, Any]] = []
    for job in jobs:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < job.min_s:
            statuses.append(
                {"job": job.name, "rc": "skipped", "reason": f"{left:.0f}s left < {job.min_s}s minimum"}
            )
            print(f"[gpu_all] skip {job.name}: {left:.0f}s left", flush=True)
            continue
        timeout = min(job.cap_s, left)
        print(f"[gpu_all] {job.name} (timeout {timeout:.0f}s) ...", flush=True)
        st = run_job(job, py, job_dir, timeout)
        statuses.append(st)
        print(f"[gpu_all]   rc={st['rc']} in {st['wall_s']}s", flush=True)
    elapsed = time.perf_counter() - t_start
    merged = merge(out_dir, card, statuses, elapsed)
    (out_dir / f"{card}.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    for line in summary_lines(merged):
        print(line)
    print(f"[gpu_all] {elapsed:.0f}s; results in {out_dir / f'{card}.json'} (logs in {job_dir})")
    return 0 if all(s["rc"] == 0 for s in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
