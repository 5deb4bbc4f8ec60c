"""Time one full training step per curriculum stage, side by side in one process.

A step is what ``Trainer.train_step`` does for one micro-batch (mirrored here, not imported, so the
benchmark needs no data and no run directory): schedules -> zero_grad -> teacher targets (teacher
forward, heads, centring) -> student forward -> DINO + iBOT + KoLeo losses -> backward -> grad clip ->
finiteness check kept on the device (as the trainer: no host sync) -> fused AdamW step gated by it
(``found_inf``) -> EMA teacher gated by it.
It reuses ``MetaArch``, ``train.optim`` and the loss modules; inputs are synthetic tensors already on the
device (random normalised crops, real iBOT block masks of the stage's grid), so no data loading is timed.

Stages are measured interleaved (``--rounds`` rounds of ``--steps`` steps per stage after ``--warmup``
steps each), so a change of machine load hits every stage alike; the reported time is the median step.
FLOPs per step come from ``fastdinov2.flops.count_step_flops`` (FlopCounterMode on the meta device, with
the expected number of masked tokens). MFU = FLOPs per step / step time / peak (GPU: dense bf16 peak
by name, or ``--peak-tflops``).

Examples::

    .venv/bin/python benchmarks/step.py --config fastdinov2_tiny --device cpu --threads 2
    python benchmarks/step.py --config fastdinov2_vits16_in100 --device cuda --batch-size 64 --compile
    python benchmarks/step.py --config fastdinov2_tiny --device cpu --breakdown --profile 3
    python benchmarks/step.py --config dinov2_tiny --sizes 32/16,64/32 dino.head_n_prototypes=256

Extra options: ``--compile`` (torch.compile of the student and of the teacher's backbone/heads, as
modules), ``--compile-blocks`` (each transformer block and head compiled in place, as the trainer's
``compute.compile=blocks``; with ``--cuda-graph`` the fused kernels are captured too), ``--compile-step``
(one compiled function for teacher targets + student + losses, so AOTAutograd
also compiles the backward, and a second one for clip + optimizer + EMA; ``--compile-mode reduce-overhead``
adds CUDA graphs), ``--skip optimizer,ema,clip,finite_check`` (drop a part to measure its marginal cost),
``--cuda-graph`` (the eager step captured as one CUDA graph per stage and replayed: launch overhead
removed, kernels unchanged, no compilation), ``--sdpa flash|efficient|cudnn|math`` (one attention backend
only), ``--host-sync`` (add the three host reads of the trainer's
earlier finiteness check, to measure their cost),
``--breakdown`` (per-phase times, synchronised between phases), ``--profile N`` (torch.profiler over N
steps per stage: time per phase, top operators, and the share of wall time not spent inside operators),
``--count-ops`` (one eager step per stage under a ``TorchDispatchMode``: every ATen call of the forward and
backward that launches a kernel on a GPU, i.e. not a view, an allocation or a profiler marker, counted by
name; the same on any device, so a CPU run shows what a change does to the GPU's kernel count).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    VIEW_OPS,
    KernelOpCounter,
    machine_info,
    non_negative_int,
    peak_tflops,
    positive_float,
    positive_int,
    run_benchmark,
    set_threads,
    summarize_ms,
)
from fastdinov2.config import Config, load_config  # noqa: E402
from fastdinov2.data.collate import mask_index_weights, pad_masked_tokens  # noqa: E402
from fastdinov2.data.masking import BatchMaskSpec, sample_ibot_masks  # noqa: E402
from fastdinov2.flops import count_step_flops  # noqa: E402
from fastdinov2.train.half_weights import HalfWeights  # noqa: E402
from fastdinov2.train.meta_arch import MetaArch  # noqa: E402
from fastdinov2.train.optim import apply_optim_schedules, build_adamw, get_param_groups  # noqa: E402

PHASES = (
    "schedules",
    "teacher",
    "student_fwd",
    "losses",
    "backward",
    "clip",
    "finite_check",
    "optimizer",
    "ema",
)
SKIPPABLE = ("clip", "finite_check", "optimizer", "ema")


@dataclass(frozen=True)
class StageSpec:
    name: str
    global_size: int
    local_size: int
    batch_size: int


@dataclass
class SyntheticBatch:
    """One stage's inputs on the device (crop-major, as ``collate_train``)."""

    global_crops: Tensor  # [2B, 3, G, G] float32, ~N(0, 1) (normalised pixels)
    local_crops: Tensor  # [nL*B, 3, L, L]
    masks: Tensor  # bool [2B, N]
    mask_indices: Tensor  # int64 [M]
    masks_weight: Tensor  # float32 [M]
    n_masked: int
    batch_size: int
    n_local: int


def make_batch(cfg: Config, spec: StageSpec, device: torch.device, seed: int = 0) -> SyntheticBatch:
    """Random crops and real iBOT block masks for ``spec``'s sizes and batch, drawn as the trainer draws them
    (``ibot.mask_sampling``: DINOv2's batch masking by default, else per sample)."""
    b, n_local, p = spec.batch_size, cfg.crops.local_crops_number, cfg.student.patch_size
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2 * b, 3, spec.global_size, spec.global_size, generator=gen)
    loc = torch.randn(n_local * b, 3, spec.local_size, spec.local_size, generator=gen)
    rng = np.random.default_rng([seed, spec.global_size])
    grid = (spec.global_size // p, spec.global_size // p)
    if cfg.ibot.mask_sampling == "batch":
        masks = torch.from_numpy(BatchMaskSpec.from_config(cfg.ibot, seed).draw(grid, range(b), 2 * b))
    else:
        per_sample = torch.stack([torch.from_numpy(sample_ibot_masks(rng, grid, cfg.ibot, 2)) for _ in range(b)])
        masks = per_sample.transpose(0, 1).reshape(2 * b, grid[0] * grid[1])  # crop-major
    idx, weight = mask_index_weights(masks)
    n_masked = int(idx.numel())
    idx, weight = pad_masked_tokens(idx, weight, cfg.compute.masked_tokens_bucket)  # as the trainer's loader
    return SyntheticBatch(
        g.to(device),
        loc.to(device),
        masks.to(device),
        idx.to(device),
        weight.to(device),
        n_masked,
        b,
        n_local,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """``with timer("name"):`` labels a phase for torch.profiler; when enabled, also times it (synced)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = False
        self.totals: dict[str, list[float]] = defaultdict(list)
        self.current = "other"  # the innermost phase being run (read by count_kernel_ops)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        outer, self.current = self.current, name
        try:
            with self._phase(name):
                yield
        finally:
            self.current = outer

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"phase::{name}"):
            if not self.enabled:
                yield
                return
            _sync(self.device)
            t0 = time.perf_counter()
            yield
            _sync(self.device)
            self.totals[name].append(time.perf_counter() - t0)


class StepRunner:
    """Student/teacher, optimizer and one training step, as ``Trainer.train_step`` (one micro-batch)."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        *,
        compile_modules: bool = False,
        compile_blocks: bool = False,
        compile_step: bool = False,
        compile_update: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        skip: tuple[str, ...] = (),
        host_sync: bool = False,
        cuda_graph: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.cfg, self.device, self.skip, self.host_sync = cfg, device, set(skip), host_sync
        if cuda_graph and (device.type != "cuda" or compile_step or host_sync):
            raise SystemExit("--cuda-graph needs --device cuda, and no --compile-step/--host-sync")
        self.cuda_graph = cuda_graph
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s: dict[int, float] = {}
        self.capture_failures: list[str] = []
        # as the trainer's compute.precision=auto: bf16 autocast on CUDA, fp32 on the CPU (unless given)
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        torch.manual_seed(cfg.train.seed)
        self.model = MetaArch(cfg).to(device)
        self.model.flatten_parameters()  # as the trainer on one process: the EMA is one lerp kernel
        groups = get_param_groups(
            self.model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult
        )
        # A compiled update gets the foreach optimizer (inductor fuses it); eager gets the fused kernel.
        compile_update = compile_step and compile_update
        fused = not compile_update
        self.optimizer = build_adamw(
            groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=fused
        )
        self.params = [p for p in self.model.student.parameters() if p.requires_grad]
        lr = cfg.optim.base_lr * math.sqrt(cfg.train.batch_size_per_gpu / cfg.optim.lr_reference_batch)
        # Mid-run values; the last layer is trained (not frozen), so its update is timed too.
        self.sched = {
            "lr": lr,
            "wd": cfg.optim.weight_decay,
            "last_layer_lr": lr,
            "momentum": cfg.teacher.momentum_teacher,
            "teacher_temp": cfg.teacher.teacher_temp,
        }
        # compute.half_weights, as the trainer: bf16 copies of the matmul weights (refreshed each step)
        self.half = (HalfWeights(self.model.student, self.model.teacher, self.dtype,
                                 layer_scale=cfg.compute.half_residual)
                     if cfg.compute.half_weights and self.dtype != torch.float32 else None)
        # as the trainer: the teacher temperature is a 0-d device tensor, validity comes from masks_weight
        self.teacher_temp = torch.full((), self.sched["teacher_temp"], device=device)
        # compute.overlap_teacher, as the trainer: the teacher's forward on a second CUDA stream
        self.teacher_stream = (torch.cuda.Stream(device) if cfg.compute.overlap_teacher and device.type == "cuda"
                               and not compile_step else None)
        self.timer = PhaseTimer(device)
        self.student: Callable[..., dict[str, Tensor]] = self.model.student
        self.compile_step = compile_step
        kw: dict[str, Any] = {"dynamic": False, "backend": compile_backend}
        if compile_mode:
            kw["mode"] = compile_mode
        if compile_blocks and not compile_step:  # as the trainer's compute.compile=blocks
            self.model.compile_regions(**kw)
        elif compile_modules and not compile_step:
            self.student = torch.compile(self.model.student, **kw)
            t = self.model.teacher
            t.backbone.forward_features = torch.compile(t.backbone.forward_features, **kw)  # type: ignore[method-assign]
            t.heads = torch.compile(t.heads, **kw)  # type: ignore[method-assign]
        self._forward_loss = (
            torch.compile(self._forward_loss_eager, **kw) if compile_step else self._forward_loss_eager
        )
        # As the trainer's compute.compile=step, the update (clip, fused AdamW, EMA) stays eager unless asked:
        # compiling a foreach AdamW over every parameter is the slowest part of the compilation.
        self._update = torch.compile(self._update_eager, **kw) if compile_update else self._update_eager

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def swapped(self) -> contextlib.AbstractContextManager[Any]:
        """The half weight copies in use (``compute.half_weights``), else nothing."""
        return self.half.swapped() if self.half is not None else contextlib.nullcontext()

    def _forward_loss_eager(self, batch: SyntheticBatch) -> dict[str, Tensor]:
        with self.autocast():
            t_cls, t_patch = self.model.teacher_targets(
                batch.global_crops, batch.mask_indices, batch.n_masked, self.teacher_temp, batch.masks_weight
            )
            s_out = self.model.student(batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices)
            return self.model.compute_losses(
                s_out, t_cls, t_patch, batch.masks, batch.masks_weight, batch.n_local
            )

    def _update_eager(self) -> Tensor:
        clip = self.cfg.optim.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.model.update_teacher(self.sched["momentum"])
        return grad_norm

    def step(self, batch: SyntheticBatch) -> bool:
        """One training step; returns whether loss and grad norm were finite (no update if not)."""
        if self.compile_step:
            return self._step_compiled(batch)
        if self.cuda_graph:
            return self._step_graphed(batch)
        return self._step_eager(batch)

    def _step_graphed(self, batch: SyntheticBatch) -> bool:
        """The eager step captured once per batch (= per stage: fixed shapes) as one CUDA graph, then replayed:
        one launch per step instead of ~3,000, the kernels unchanged (no compilation, no fusion).

        PyTorch's whole-network capture recipe: three eager steps on a side stream first (cuBLAS/cuDNN
        handles, AdamW state, autograd), ``capturable`` AdamW (its step counters already live on the device:
        fused), gradients set to None before the capture so the captured backward writes them rather than
        accumulating. Every graph gets its own memory pool; gradients, temporaries and the saved centres live
        there, the parameters, AdamW moments, centres and teacher weights are the same tensors in every graph.
        Schedules are constants of the benchmark, so the values baked into a graph are the ones eager uses.
        """
        key = id(batch)
        graph = self._graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            try:
                graph = self._capture(batch)
            except RuntimeError as exc:  # e.g. a kernel that cannot be captured: retry once without cuDNN attention
                if not torch.backends.cuda.cudnn_sdp_enabled():
                    raise
                print(f"[step] CUDA graph capture failed ({exc}); retrying with cuDNN attention off", flush=True)
                self.capture_failures.append(str(exc)[:500])
                if hasattr(self.optimizer, "found_inf"):
                    del self.optimizer.found_inf  # type: ignore[attr-defined]
                torch.backends.cuda.enable_cudnn_sdp(False)
                graph = self._capture(batch)
            self._graphs[key] = graph
            self.capture_s[key] = time.perf_counter() - t0
        graph.replay()
        return True

    def _capture(self, batch: SyntheticBatch) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step_eager(batch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for group in self.optimizer.param_groups:
            group["capturable"] = True
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_eager(batch)
        torch.cuda.synchronize(self.device)
        return graph

    def _step_eager(self, batch: SyntheticBatch) -> bool:
        cfg, timer, s = self.cfg, self.timer, self.sched
        centers = [self.model.dino_loss.center, self.model.ibot_loss.center]
        with timer("schedules"):
            apply_optim_schedules(self.optimizer, s["lr"], s["wd"], s["last_layer_lr"])
            self.optimizer.zero_grad(set_to_none=True)
            saved_centers = [c.clone() for c in centers]
            if self.half is not None:
                self.half.refresh()
        with self.autocast():
            with self.swapped():
                temp = self.teacher_temp.fill_(s["teacher_temp"])
                if self.teacher_stream is not None:  # compute.overlap_teacher: both forwards, timed as "teacher"
                    with timer("teacher"):
                        (t_cls, t_patch), s_out = self.model.targets_and_student(
                            self.student, batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices,
                            batch.n_masked, temp, batch.masks_weight, teacher_stream=self.teacher_stream)
                else:
                    with timer("teacher"):
                        t_cls, t_patch = self.model.teacher_targets(
                            batch.global_crops, batch.mask_indices, batch.n_masked, temp, batch.masks_weight)
                    with timer("student_fwd"):
                        s_out = self.student(batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices)
                with timer("losses"):
                    losses = self.model.compute_losses(
                        s_out, t_cls, t_patch, batch.masks, batch.masks_weight, batch.n_local
                    )
            with timer("backward"):
                losses["loss"].backward()
                if self.half is not None:
                    self.half.collect_grads(accumulate=False)
        totals = {k: v.detach().float() for k, v in losses.items()}
        with timer("clip"):
            if "clip" in self.skip or cfg.optim.clip_grad <= 0:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack(
                        [
                            p.grad.norm()
                            for p in self.params  # type: ignore[union-attr]
                            if p.grad is not None
                        ]
                    )
                )
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.clip_grad)
        ok: Tensor | None = None
        with timer("finite_check"):
            if "finite_check" not in self.skip:  # as Trainer.train_step: on the device, centres restored
                ok = torch.isfinite(totals["loss"]) & torch.isfinite(grad_norm)
                for c, saved in zip(centers, saved_centers, strict=True):
                    c.copy_(torch.where(ok, c, saved))
            if self.host_sync:  # the trainer's earlier check: two reads and a cross-rank flag read back
                finite = bool(torch.isfinite(totals["loss"]).item() and torch.isfinite(grad_norm).item())
                finite = not bool(torch.tensor([0.0 if finite else 1.0], device=self.device).item() > 0)
        with timer("optimizer"):
            if "optimizer" not in self.skip:
                if ok is not None:
                    self.optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
                self.optimizer.step()
                if ok is not None:
                    del self.optimizer.found_inf  # type: ignore[attr-defined]
        with timer("ema"):
            if "ema" not in self.skip:
                self.model.update_teacher(s["momentum"], apply=ok)
        return True

    def _step_compiled(self, batch: SyntheticBatch) -> bool:
        s, timer = self.sched, self.timer
        with timer("schedules"):
            apply_optim_schedules(self.optimizer, s["lr"], s["wd"], s["last_layer_lr"])
            self.optimizer.zero_grad(set_to_none=True)
            if self.half is not None:
                self.half.refresh()
        with timer("forward_loss"), self.swapped():  # outside the compiled function, as the trainer does
            losses = self._forward_loss(batch)
        with timer("backward"):
            losses["loss"].backward()
            if self.half is not None:
                self.half.collect_grads(accumulate=False)
        with timer("update"):
            grad_norm = self._update()
        finite = True
        with timer("finite_check"):
            if self.host_sync:  # checked after the update here (a benchmark: no skip logic)
                finite = bool(torch.isfinite(losses["loss"]).item() and torch.isfinite(grad_norm).item())
        return finite


def stage_specs(cfg: Config, args: argparse.Namespace) -> list[StageSpec]:
    """The stages to time: the preset's curriculum (``--stages``), or explicit ``--sizes G/L,...``."""
    default_b = args.batch_size if args.batch_size is not None else cfg.train.batch_size_per_gpu
    if args.sizes:
        specs = []
        p = cfg.student.patch_size
        for i, item in enumerate(args.sizes.split(",")):
            try:
                g, loc = (int(v) for v in item.split("/"))
            except ValueError:
                raise SystemExit(f"--sizes: {item!r} is not GLOBAL/LOCAL, e.g. 112/48") from None
            for size in (g, loc):  # the ViT cuts crops into whole patches
                if size < p or size % p:
                    near = " or ".join(str(v) for v in (size // p * p, size // p * p + p) if v >= p) or str(p)
                    raise SystemExit(f"--sizes: {item!r}: {size} is not a positive multiple of the patch size "
                                     f"{p} of {args.config} (student.patch_size); use {near}")
            specs.append(StageSpec(f"sizes{i}", g, loc, default_b))
        return specs
    stages = list(enumerate(cfg.curriculum.stages))
    if args.stages != "all":
        try:
            wanted = [int(v) for v in args.stages.split(",")]
        except ValueError:
            raise SystemExit(f"--stages: {args.stages!r} is not 'all' or a list of stage indices") from None
        for w in wanted:
            if not 0 <= w < len(stages):
                raise SystemExit(
                    f"--stages: stage {w} does not exist ({args.config} has {len(stages)} stages)"
                )
        stages = [stages[w] for w in wanted]
    return [
        StageSpec(
            st.name,
            st.global_size,
            st.local_size,
            args.batch_size if args.batch_size is not None
            else st.batch_size_per_gpu or cfg.train.batch_size_per_gpu,
        )
        for _, st in stages
    ]


def count_kernel_ops(runner: StepRunner, batch: SyntheticBatch, top: int = 15) -> dict[str, Any]:
    """One eager step under :class:`~common.KernelOpCounter`: ATen calls that launch a kernel, in total, per
    phase and the most frequent by name, and the memory traffic of the calls that are not matrix products,
    attention or convolutions (the elementwise, reduction, copy, optimizer and EMA work whose time on a GPU
    follows the bytes it moves), per step and per phase."""
    timer = runner.timer
    with KernelOpCounter(lambda: timer.current) as mode:
        runner._step_eager(batch)
    return mode.summary(top)


def top_level_ops(events: Any) -> dict[str, dict[str, int]]:
    """Per phase: aten ops called from Python / autograd (not from inside another aten op), and those of
    them that are not views: a proxy for kernel launches on a GPU, where each costs CPU time."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"ops": 0, "non_view_ops": 0})
    for e in events:
        if not e.name.startswith("aten::") or str(getattr(e, "device_type", "CPU")).split(".")[-1] != "CPU":
            continue
        phase, nested, parent = "other", False, e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            if parent.name.startswith("phase::") and phase == "other":
                phase = parent.name.removeprefix("phase::")
            parent = parent.cpu_parent
        if nested:
            continue
        counts[phase]["ops"] += 1
        counts[phase]["non_view_ops"] += int(e.name not in VIEW_OPS)
    return dict(counts)


# kernel names -> what they do, first match wins (cuBLAS/cuBLASLt/CUTLASS GEMMs, flash/cuDNN attention, Triton
# kernels of torch.compile or of our fused loss, ATen's elementwise/reduction/norm/softmax/copy kernels, and the
# multi-tensor kernels of fused AdamW and the _foreach_ ops)
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|cudnn"),
    ("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitk"),
    ("triton", r"^triton"),
    ("multi_tensor", r"multi_tensor|foreach"),
    ("norm", r"layer_norm|LayerNorm|rms_norm|batch_norm"),
    ("softmax", r"softmax|Softmax"),
    ("reduce", r"reduce|Reduce|sum_|cub::"),
    ("copy_cat", r"[Cc]opy|CatArray|cat_|index|gather|scatter|masked"),
    ("elementwise", r"elementwise|Elementwise"),
)


def split_device_events(events: list[Any]) -> tuple[list[Any], list[Any]]:
    """Profiler ``key_averages()`` entries -> (host operators, device kernels). Device events named like a host
    event are user annotations spanning kernels (e.g. the optimizer's "Optimizer.step#AdamW.step"): left out
    of the kernels, which would count those kernels twice."""
    def on_device(e: Any) -> bool:
        return str(getattr(e, "device_type", "")).split(".")[-1] == "CUDA"

    host = [e for e in events if not on_device(e)]
    host_keys = {e.key for e in host}
    return host, [e for e in events if on_device(e) and e.key not in host_keys]


def kernel_categories(kernels: list[Any], n_steps: int) -> dict[str, dict[str, float]]:
    """GPU time and launches per step of profiler kernel events, grouped by :data:`KERNEL_CATEGORIES`."""
    out: dict[str, dict[str, float]] = {}
    for e in kernels:
        cat = next((c for c, rx in KERNEL_CATEGORIES if re.search(rx, e.key)), "other")
        d = out.setdefault(cat, {"device_ms_per_step": 0.0, "calls_per_step": 0.0})
        d["device_ms_per_step"] += getattr(e, "self_device_time_total", 0.0) / 1e3 / n_steps
        d["calls_per_step"] += e.count / n_steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["device_ms_per_step"]))


def profile_stage(runner: StepRunner, batch: SyntheticBatch, n_steps: int, top: int = 15) -> dict[str, Any]:
    """torch.profiler over ``n_steps`` steps: per-phase time, top operators by self time, and the share of
    wall time spent outside operators (Python, dispatch, allocator; on CPU everything is synchronous)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    _sync(runner.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            runner.step(batch)
        _sync(runner.device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    phases = {
        e.key.removeprefix("phase::"): e.cpu_time_total / 1e3 / n_steps
        for e in events
        if e.key.startswith("phase::")
    }
    ops = [e for e in events if not e.key.startswith("phase::") and not e.key.startswith("ProfilerStep")]
    self_cpu_ms = sum(e.self_cpu_time_total for e in ops) / 1e3 / n_steps
    top_ops = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out: dict[str, Any] = {
        "steps": n_steps,
        "wall_ms_per_step": wall * 1e3 / n_steps,
        "op_self_cpu_ms_per_step": self_cpu_ms,
        "outside_ops_ms_per_step": wall * 1e3 / n_steps - self_cpu_ms,
        "phase_cpu_ms_per_step": phases,
        "top_ops": [
            {
                "op": e.key,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n_steps,
                "calls_per_step": e.count / n_steps,
            }
            for e in top_ops
        ],
        "op_calls_per_step": sum(e.count for e in ops) / n_steps,
        "top_level_ops_per_step": {
            k: {kk: vv / n_steps for kk, vv in v.items()} for k, v in top_level_ops(prof.events()).items()
        },
    }
    # where the device's time goes (zeros on the CPU). key_averages() lists the operators (CPU events, whose
    # self device time is that of the kernels they launched) and the kernels themselves (device events): the
    # two are reported apart, and only the kernels are summed (summing both counts every kernel twice).
    def device_ms(e: Any) -> float:
        return getattr(e, "self_device_time_total", 0.0) / 1e3 / n_steps

    host_ops, kernels = split_device_events(ops)
    out["top_device_ops"] = [
        {"op": e.key[:160], "self_device_ms_per_step": device_ms(e), "calls_per_step": e.count / n_steps}
        for e in sorted(host_ops, key=device_ms, reverse=True)[: 2 * top]
    ]
    out["top_kernels"] = [
        {"kernel": e.key[:160], "device_ms_per_step": device_ms(e), "calls_per_step": e.count / n_steps}
        for e in sorted(kernels, key=device_ms, reverse=True)[: 2 * top]
    ]
    out["phase_device_ms_per_step"] = {
        e.key.removeprefix("phase::"): getattr(e, "device_time_total", 0.0) / 1e3 / n_steps
        for e in events
        if e.key.startswith("phase::")
    }
    if runner.device.type == "cuda":
        out["kernel_categories"] = kernel_categories(kernels, n_steps)
        out["device_kernels_per_step"] = sum(e.count for e in kernels) / n_steps
        out["kernel_device_ms_per_step"] = sum(device_ms(e) for e in kernels)  # GPU busy time per step
    return out


def trainer_threads(cfg: Config, device: torch.device) -> int:
    """The intra-op threads ``Trainer`` would use: ``compute.threads``, else on the CPU the cores left to
    the compute process by ``data.num_workers`` loader workers (at least 1), else all cores."""
    cores = os.cpu_count() or 1
    if cfg.compute.threads:
        return cfg.compute.threads
    if device.type == "cpu" and cfg.data.num_workers > 0:
        return max(1, cores - cfg.data.num_workers)
    return cores


SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def select_sdpa_backend(name: str) -> None:
    """``--sdpa``: leave only one of ``F.scaled_dot_product_attention``'s backends enabled (process-wide), or
    all ("auto": PyTorch's choice, cuDNN first on an H100). The 10-token local crops at 112/48 fill few of a
    flash kernel's 64- or 128-row tiles; which backend does best there is a GPU question."""
    if name not in SDPA_BACKENDS:
        raise SystemExit(f"--sdpa: {name!r} is not one of {', '.join(SDPA_BACKENDS)}")
    on = {b: name in ("auto", b) for b in SDPA_BACKENDS[1:]}
    torch.backends.cuda.enable_cudnn_sdp(on["cudnn"])
    torch.backends.cuda.enable_flash_sdp(on["flash"])
    torch.backends.cuda.enable_mem_efficient_sdp(on["efficient"])
    torch.backends.cuda.enable_math_sdp(on["math"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.count_ops and (args.compile or args.compile_blocks or args.compile_step):
        raise SystemExit("--count-ops counts the eager step's calls: "
                         "not with --compile/--compile-blocks/--compile-step")
    cfg = load_config(args.config, args.overrides)
    threads = set_threads(args.threads or trainer_threads(cfg, device))  # 0 or None: the trainer's policy
    specs = stage_specs(cfg, args)
    skip = tuple(s for s in args.skip.split(",") if s) if args.skip else ()
    for s in skip:
        if s not in SKIPPABLE:
            raise SystemExit(f"--skip: {s!r} is not one of {', '.join(SKIPPABLE)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    select_sdpa_backend(args.sdpa)
    runner = StepRunner(
        cfg,
        device,
        compile_modules=args.compile,
        compile_blocks=args.compile_blocks,
        compile_step=args.compile_step,
        compile_update=args.compile_update,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        skip=skip,
        host_sync=args.host_sync,
        cuda_graph=args.cuda_graph,
        dtype={"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
    )
    if args.cuda_graph and args.breakdown:
        raise SystemExit("--breakdown cannot time phases inside a CUDA graph; leave it out with --cuda-graph")
    batches = [make_batch(cfg, s, device, seed=i) for i, s in enumerate(specs)]
    peak = peak_tflops(device, args.peak_tflops)

    results: list[dict[str, Any]] = []
    times: list[list[float]] = [[] for _ in specs]
    cpu_times: list[list[float]] = [[] for _ in specs]  # process CPU time: robust to time-slicing
    nonfinite = [0 for _ in specs]
    for batch in batches:  # warm-up (and compilation) per stage
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            runner.step(batch)
        _sync(device)
        warm = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results.append({"warmup_s": warm, "peak_mem_gib": mem})
        if args.cuda_graph:
            results[-1]["capture_s"] = runner.capture_s.get(id(batch))
    for _ in range(args.rounds):  # interleaved measurement
        for i, batch in enumerate(batches):
            for _ in range(args.steps):
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                ok = runner.step(batch)
                _sync(device)
                times[i].append(time.perf_counter() - t0)
                cpu_times[i].append(time.process_time() - c0)
                nonfinite[i] += int(not ok)

    for i, (spec, batch) in enumerate(zip(specs, batches)):
        flops = (
            count_step_flops(cfg, spec.global_size, spec.local_size, batch_size=spec.batch_size)
            * spec.batch_size
        )
        stats = summarize_ms(times[i])
        sec = stats["median_ms"] / 1e3
        p = cfg.student.patch_size
        r = results[i]
        r.update(
            {
                "stage": spec.name,
                "global_size": spec.global_size,
                "local_size": spec.local_size,
                "batch_size": spec.batch_size,
                "n_local_crops": batch.n_local,
                "tokens_global_crop": (spec.global_size // p) ** 2 + 1,
                "tokens_local_crop": (spec.local_size // p) ** 2 + 1,
                "n_masked": batch.n_masked,
                **stats,
                "cpu_median_ms": float(np.median(cpu_times[i])) * 1e3,
                "img_per_s": spec.batch_size / sec,
                "gflops_per_step": flops / 1e9,
                "achieved_tflops": flops / sec / 1e12,
                "mfu": (flops / sec / (peak * 1e12)) if peak else None,
                "nonfinite_steps": nonfinite[i],
            }
        )
    if args.breakdown:
        for i, batch in enumerate(batches):
            runner.timer.enabled, runner.timer.totals = True, defaultdict(list)
            for _ in range(args.steps):
                runner.step(batch)
            runner.timer.enabled = False
            phases = {k: float(np.median(v)) * 1e3 for k, v in runner.timer.totals.items()}
            results[i]["breakdown_ms"] = phases
            results[i]["breakdown_sum_ms"] = sum(phases.values())
    if args.profile:
        for i, batch in enumerate(batches):
            results[i]["profile"] = profile_stage(runner, batch, args.profile)
    if args.count_ops:
        for i, batch in enumerate(batches):
            results[i]["op_count"] = count_kernel_ops(runner, batch)

    out: dict[str, Any] = {
        "benchmark": "step",
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "threads": threads,
        "compile": args.compile,
        "compile_blocks": args.compile_blocks,
        "compile_step": args.compile_step,
        "compile_update": args.compile_update,
        "compile_mode": args.compile_mode,
        "compile_backend": args.compile_backend,
        "skip": list(skip),
        "host_sync": args.host_sync,
        "cuda_graph": args.cuda_graph,
        "overlap_teacher": runner.teacher_stream is not None,
        "cuda_graph_capture_failures": runner.capture_failures,
        "sdpa": args.sdpa,
        # whether cuDNN attention was enabled (after a capture failure it is turned off); null on the CPU
        "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled() if device.type == "cuda" else None,
        "peak_tflops": peak,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "model": {
            "embed_dim": runner.model.student.backbone.embed_dim,
            "depth": runner.model.student.backbone.n_blocks,
            "patch_size": cfg.student.patch_size,
            "prototypes": cfg.dino.head_n_prototypes,
            "student_params_m": sum(p.numel() for p in runner.params) / 1e6,
        },
        "stages": results,
        "loadavg_start": load_start,
        "machine": machine_info(device),
    }
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        out["ratio"] = {
            "between": [lo["stage"], hi["stage"]],
            "step_time": hi["median_ms"] / lo["median_ms"],
            "step_cpu_time": hi["cpu_median_ms"] / lo["cpu_median_ms"],
            "flops": hi["gflops_per_step"] / lo["gflops_per_step"],
        }
    return out


def print_readable(out: dict[str, Any]) -> None:
    m = out["machine"]
    dev = m.get("gpu_name") or f"{m['cpu_model']} ({out['threads']} threads)"
    print(
        f"step benchmark: {out['config']} on {dev}, {out['dtype']}, compile={out['compile']}, "
        f"compile_step={out['compile_step']}, cuda_graph={out.get('cuda_graph', False)}, "
        f"load {out['loadavg_start']} -> {m['loadavg_1_5_15']}"
    )
    for r in out["stages"]:
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(
            f"  {r['stage']:<16} {r['global_size']:>4}/{r['local_size']:<4} B={r['batch_size']:<4} "
            f"{r['median_ms']:8.1f} ms/step (min {r['min_ms']:.1f}, CPU time {r['cpu_median_ms']:.1f})  "
            f"{r['img_per_s']:8.1f} img/s  "
            f"{r['gflops_per_step']:9.1f} GFLOP/step  {r['achieved_tflops'] * 1e3:8.1f} GFLOP/s{mfu}"
        )
        if "breakdown_ms" in r:
            parts = "  ".join(f"{k} {v:.1f}" for k, v in r["breakdown_ms"].items())
            print(f"    breakdown (ms, synchronised): {parts}")
        if "op_count" in r:
            oc = r["op_count"]
            print(f"    kernel-launching ATen calls per eager step: {oc['kernel_ops_per_step']} (top: "
                  + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in list(oc["top_kernel_ops"].items())[:8])
                  + "); by phase: " + ", ".join(f"{k} {v}" for k, v in oc["kernel_ops_by_phase"].items()))
            print(f"    memory traffic of the other calls (not matmul/attention/conv): "
                  f"{oc['non_matmul_gb_per_step']:.2f} GB/step; by phase: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in oc["non_matmul_gb_by_phase"].items()))
        if "profile" in r:
            pr = r["profile"]
            print(
                f"    profile: wall {pr['wall_ms_per_step']:.1f} ms/step, inside ops "
                f"{pr['op_self_cpu_ms_per_step']:.1f}, outside ops {pr['outside_ops_ms_per_step']:.1f}, "
                f"{pr['op_calls_per_step']:.0f} op calls/step"
            )
            tl = pr["top_level_ops_per_step"]
            print(
                f"      top-level ops/step {sum(v['ops'] for v in tl.values()):.0f} (not views: "
                f"{sum(v['non_view_ops'] for v in tl.values()):.0f}): "
                + ", ".join(f"{k} {v['non_view_ops']:.0f}" for k, v in tl.items())
                + (
                    f"; device kernels/step {pr['device_kernels_per_step']:.0f}"
                    if "device_kernels_per_step" in pr
                    else ""
                )
            )
            print(
                "      top ops: "
                + ", ".join(f"{o['op']} {o['self_cpu_ms_per_step']:.1f}" for o in pr["top_ops"][:8])
            )
            if "top_device_ops" in pr and out["device"].startswith("cuda"):
                print(
                    "      GPU time by phase (ms): "
                    + ", ".join(f"{k} {v:.1f}" for k, v in pr["phase_device_ms_per_step"].items())
                )
                print(
                    "      top by GPU time (ms): "
                    + ", ".join(f"{o['op'][:60]} {o['self_device_ms_per_step']:.2f}" for o in pr["top_device_ops"][:12])
                )
                kernels = pr.get("top_kernels", [])[:8]
                print(
                    f"      GPU busy {pr.get('kernel_device_ms_per_step', 0.0):.1f} ms/step in "
                    f"{pr.get('device_kernels_per_step', 0):.0f} kernels; top kernels (ms): "
                    + ", ".join(f"{k['kernel'][:50]} {k['device_ms_per_step']:.2f}" for k in kernels)
                )
                print(
                    "      GPU time by kernel kind (ms, launches): "
                    + ", ".join(f"{c} {v['device_ms_per_step']:.1f} ({v['calls_per_step']:.0f})"
                                for c, v in pr.get("kernel_categories", {}).items())
                )
    if "ratio" in out:
        r = out["ratio"]
        print(
            f"  {r['between'][1]} / {r['between'][0]}: step-time ratio {r['step_time']:.2f}x "
            f"(process CPU time: {r['step_cpu_time']:.2f}x), FLOP ratio {r['flops']:.2f}x"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="fastdinov2_tiny", help="preset name or YAML file")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="per-step batch (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per stage per round (>= 1)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds over the stages (>= 1)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per stage first (0: none)")
    p.add_argument("--stages", default="all", help="'all' or comma-separated stage indices of the preset")
    p.add_argument("--sizes", default=None, help="time these GLOBAL/LOCAL sizes instead, e.g. 112/48,224/96")
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        help="torch intra-op threads (default or 0: as the trainer: compute.threads, else cores - "
             "data.num_workers on a CPU, else all cores)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher modules")
    p.add_argument(
        "--compile-blocks",
        action="store_true",
        help="torch.compile each transformer block and head (regional; as compute.compile=blocks); "
        "combines with --cuda-graph",
    )
    p.add_argument(
        "--compile-step",
        action="store_true",
        help="torch.compile the whole forward+loss (and backward via AOTAutograd) and the update",
    )
    p.add_argument(
        "--compile-update",
        action="store_true",
        help="with --compile-step: also compile clip + AdamW (foreach) + EMA (slow to compile)",
    )
    p.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)"
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)"
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the eager step as one CUDA graph per stage and replay it (CUDA only; no compilation)",
    )
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(SKIPPABLE)}")
    p.add_argument("--sdpa", default="auto",
                   help=f"attention backend, one of {', '.join(SDPA_BACKENDS)} (a CPU has flash and math only)")
    p.add_argument(
        "--host-sync",
        action="store_true",
        help="add the host reads of the trainer's earlier finiteness check (2 .item() + a flag), to time them",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="also time each phase (synchronised) for --steps steps"
    )
    p.add_argument(
        "--profile", type=non_negative_int, default=0, metavar="N",
        help="torch.profiler over N steps per stage (0: no profile)"
    )
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "bf16"),
        help="autocast dtype of the step (auto: bf16 on CUDA, fp32 on the CPU, as the trainer); bf16 on the CPU "
             "runs CPU autocast, e.g. with --count-ops to count the casts CUDA autocast would add",
    )
    p.add_argument(
        "--count-ops", action="store_true",
        help="count the kernel-launching ATen calls of one eager step per stage (any device; not with compile)"
    )
    p.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="peak for MFU (default: by GPU name)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
