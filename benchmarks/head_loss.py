"""Time and measure the memory of the iBOT prototype layer + loss: materialised reference vs chunked vs fused.

What one timed step does, for ``M`` masked tokens, ``K`` prototypes, bottleneck ``D`` (inputs are the heads'
normalised bottleneck features, already on the device; the MLP and backbone are not part of it):

- ``reference`` (``ibot.loss_chunk_rows=0``): teacher logits ``xt @ wt.T [M, K]`` ->
  ``iBOTPatchLoss.softmax_center_teacher`` + ``update_center``; student logits through the weight-normalised
  prototype layer ``[M, K]`` -> ``iBOTPatchLoss.forward_masked`` -> backward (to the features and to
  ``weight_g``/``weight_v``).
- ``chunked_c<N>`` (``ibot.loss_chunk_rows=N``): ``teacher_logit_sum`` + ``update_center_from_sum``, then
  ``chunked_ibot_loss`` (N rows per chunk, recomputed in backward) -> backward.
- ``fused`` (``ibot.fused_loss=true``; CUDA with Triton only): teacher logits ``[M, K]`` -> ``masked_column_sum``
  + ``update_center_from_sum``; student logits ``[M, K]`` -> ``fused_ibot_loss`` (Triton row kernels over the
  logits in the autocast dtype, no fp32 ``[M, K]`` tensor) -> backward.

Variants are run interleaved (``--steps`` timed steps each after ``--warmup``); the reported time is the
median step (CUDA: synchronised before and after). Peak memory is the largest amount of memory allocated
during one step *above* what was allocated before it (inputs, weights and grads of earlier steps are
excluded; the step's own gradients are included):

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the start of the step;
- CPU: one extra step under ``torch.profiler.profile(profile_memory=True)``; the profiler's CPU allocator
  hook records an event per allocation and free with the running total of bytes allocated since profiling
  started ("Total Allocated" in the exported trace), and its maximum is the peak. (Frees of tensors that
  existed before the step are not counted, so the figure cannot drop below the step's own allocations.)

The loss values of all variants are reported too (they must agree; the JSON has the largest relative
difference to the reference).

Examples::

    .venv/bin/python benchmarks/head_loss.py --device cpu --threads 1
    python benchmarks/head_loss.py --device cuda                       # M=3800, K=65536, D=256, bf16
    python benchmarks/head_loss.py --device cuda --chunk-rows 256,1024,4096 --precision fp32
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_timing_args,
    machine_info,
    positive_int,
    positive_int_list,
    run_benchmark,
    set_threads,
    summarize_ms,
    time_interleaved,
)
from fastdinov2.data.collate import mask_index_weights  # noqa: E402
from fastdinov2.losses import iBOTPatchLoss  # noqa: E402
from fastdinov2.losses.chunked import chunked_ibot_loss, teacher_logit_sum  # noqa: E402
from fastdinov2.losses.fused import fused_ibot_loss, fused_loss_available, masked_column_sum  # noqa: E402
from fastdinov2.models.heads import WeightNormLinear  # noqa: E402

TEACHER_TEMP, STUDENT_TEMP = 0.07, 0.1
DEFAULTS: dict[str, dict[str, Any]] = {"cuda": {"m": 3800, "k": 65536, "d": 256, "chunk_rows": [512]},
            "cpu": {"m": 1000, "k": 16384, "d": 256, "chunk_rows": [128]}}


class Problem:
    """Inputs of one iBOT head+loss step: student/teacher features ``[M, D]``, the student's prototype layer
    ``[K, D]`` (weight-normalised), the teacher's weight, the loss module (with its centre), masks/weights."""

    def __init__(self, m: int, k: int, d: int, n_images: int, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.xs = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device).requires_grad_(True)
        self.xt = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device)
        torch.manual_seed(seed)
        self.layer = WeightNormLinear(d, k).to(device)
        self.wt = self.layer.weight.detach().clone() + 0.01 * torch.randn(k, d, generator=g).to(device)
        self.loss = iBOTPatchLoss(k, student_temp=STUDENT_TEMP).to(device)
        patches = max(1, math.ceil(m / n_images))
        masks = torch.zeros(n_images, patches, dtype=torch.bool)
        masks.view(-1)[:m] = True
        _, weights = mask_index_weights(masks)
        self.masks, self.weights = masks.to(device), weights.to(device)
        self.center0 = torch.randn(1, k, generator=g).mul_(0.1).to(device)

    def reset(self) -> None:
        """Same centre and no gradients before every step, so all variants do identical work."""
        self.loss.center.copy_(self.center0)
        self.xs.grad = None
        for p in self.layer.parameters():
            p.grad = None


def reference_step(pb: Problem) -> Tensor:
    t_logits = F.linear(pb.xt, pb.wt)  # [M, K]
    t = pb.loss.softmax_center_teacher(t_logits, TEACHER_TEMP)
    pb.loss.update_center(t_logits)
    del t_logits
    loss = pb.loss.forward_masked(pb.layer(pb.xs), t, pb.masks, masks_weight=pb.weights)
    loss.backward()
    return loss.detach()


def chunked_step(pb: Problem, rows: int) -> Tensor:
    center = pb.loss.center.clone()
    pb.loss.update_center_from_sum(*teacher_logit_sum(pb.xt, pb.wt))
    loss = chunked_ibot_loss(pb.xs, pb.layer.weight, pb.xt, pb.wt, center, pb.weights, teacher_temp=TEACHER_TEMP,
                             student_temp=STUDENT_TEMP, n_images=pb.masks.shape[0], chunk_rows=rows)
    loss.backward()
    return loss.detach()


def fused_step(pb: Problem) -> Tensor:
    t_logits = F.linear(pb.xt, pb.wt)  # [M, K] in the autocast dtype
    center = pb.loss.center.clone()
    pb.loss.update_center_from_sum(masked_column_sum(t_logits, torch.ones_like(pb.weights)), float(t_logits.shape[0]))
    loss = fused_ibot_loss(pb.layer(pb.xs), t_logits, center, pb.weights, teacher_temp=TEACHER_TEMP,
                           student_temp=STUDENT_TEMP, n_images=pb.masks.shape[0])
    loss.backward()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated on the CPU while ``fn`` runs, above the start (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max([0, *totals])


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_variants(calls: dict[str, Callable[[], Tensor]], args: argparse.Namespace,
                     device: torch.device) -> dict[str, Any]:
    """Each variant's loss (the first call, also a check), median time over ``args.steps`` interleaved steps
    after ``args.warmup``, and peak memory; the first variant is the reference the others are compared with:
    ``{"variants": [rows], "ratio_vs_reference": {...}, "max_rel_loss_diff": float}``."""
    losses = {name: float(call()) for name, call in calls.items()}
    times = time_interleaved(calls, args.steps, args.warmup, device)
    peaks = {name: cuda_peak_bytes(call, device) if device.type == "cuda" else cpu_peak_bytes(call)
             for name, call in calls.items()}
    rows: list[dict[str, Any]] = [
        {"variant": name, **summarize_ms(times[name]), "peak_mib": peaks[name] / 2**20, "loss": losses[name]}
        for name in calls]
    ref, ref_loss = rows[0], rows[0]["loss"]
    return {
        "variants": rows,
        "ratio_vs_reference": {
            r["variant"]: {"ms": r["median_ms"] / ref["median_ms"],
                           "peak": r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None}
            for r in rows[1:]
        },
        "max_rel_loss_diff": max(abs(v - ref_loss) / max(abs(ref_loss), 1e-30) for v in losses.values()),
    }


def print_variants(out: dict[str, Any], width: int, digits: int) -> None:
    """The readable lines of :func:`measure_variants`' result."""
    for r in out["variants"]:
        print(f"  {r['variant']:<{width}} {r['median_ms']:9.{digits}f} ms (min {r['min_ms']:.{digits}f}, n={r['n']})  "
              f"peak +{r['peak_mib']:9.1f} MiB  loss {r['loss']:.6f}")
    print(f"  largest relative loss difference to the reference: {out['max_rel_loss_diff']:.2e}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    threads = set_threads(args.threads)
    d = DEFAULTS[device.type]
    m = args.m if args.m is not None else d["m"]
    k = args.k if args.k is not None else d["k"]
    dim = args.d if args.d is not None else d["d"]
    chunk_rows: list[int] = args.chunk_rows if args.chunk_rows is not None else d["chunk_rows"]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    pb = Problem(m, k, dim, args.n_images, device)

    variants: dict[str, Callable[[], Tensor]] = {"reference": functools.partial(reference_step, pb)}
    for c in chunk_rows:
        variants[f"chunked_c{c}"] = functools.partial(chunked_step, pb, c)
    if fused_loss_available(device) and not args.no_fused:
        variants["fused"] = functools.partial(fused_step, pb)

    def call(name: str) -> Tensor:
        pb.reset()
        if amp_dtype is None:
            return variants[name]()
        with torch.autocast(device.type, dtype=amp_dtype):
            return variants[name]()

    loadavg_start = machine_info()["loadavg_1_5_15"]
    return {
        "benchmark": "head_loss",
        "device": device.type,
        "threads": threads,
        "precision": precision,
        "m": m, "k": k, "d": dim, "n_images": args.n_images,
        "peak_method": "cuda.max_memory_allocated" if device.type == "cuda" else "profiler Total Allocated",
        "fused": "fused" in variants,
        **measure_variants({name: functools.partial(call, name) for name in variants}, args, device),
        "loadavg_start": loadavg_start,
        "machine": machine_info(device),
    }


def print_readable(out: dict[str, Any]) -> None:
    m = out["machine"]
    dev = m.get("gpu_name") or f"{m['cpu_model']} ({out['threads']} threads)"
    print(f"iBOT head+loss: M={out['m']} K={out['k']} D={out['d']} {out['precision']} on {dev}, "
          f"load {out['loadavg_start']} -> {m['loadavg_1_5_15']}")
    print_variants(out, width=16, digits=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--m", type=positive_int, default=None, help="masked-token rows (default: 3800 cuda, 1000 cpu)")
    p.add_argument("--k", type=positive_int, default=None, help="prototypes (default: 65536 cuda, 16384 cpu)")
    p.add_argument("--d", type=positive_int, default=None, help="bottleneck dim (default 256)")
    p.add_argument("--n-images", type=positive_int, default=128, help="global crops B (the loss divisor)")
    p.add_argument("--chunk-rows", type=positive_int_list, default=None,
                   help="comma-separated chunk sizes (default: 512 cuda, 128 cpu)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype (default: bf16 on cuda, fp32 on cpu, as the trainer)")
    p.add_argument("--no-fused", action="store_true",
                   help="leave out the fused Triton variant (run by default where it can: CUDA with Triton)")
    add_timing_args(p, steps=5, warmup=1)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
