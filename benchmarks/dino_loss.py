"""Time, measure the memory of, and count the memory traffic of the DINO class-token term: reference vs fused.

What one timed step does, for ``B`` images, ``nL`` local crops and ``K`` prototypes: the student's class-token
logits ``[(2 + nL) * B, K]`` (in the autocast dtype, as the heads give them; with gradient) and the teacher's
two swapped ``[B, K]`` target probabilities go through the DINO term as ``MetaArch.compute_losses`` forms it,
then its backward to the logits:

- ``reference`` (``dino.fused_loss=false``): :meth:`DINOLoss.crop_pairs`: fp32 log-softmax over all crops and
  one contraction with the summed targets;
- ``fused`` (``dino.fused_loss=true``; CUDA with Triton only): :func:`fastdinov2.losses.fused.fused_dino_loss`,
  Triton row kernels over the logits in their dtype against a ``[3B, K]`` fp32 target table.

Variants run interleaved (``--steps`` timed steps each after ``--warmup``); the time is the median step (CUDA:
synchronised before and after). Peak memory is as in ``head_loss.py`` (above what was allocated before the
step). On any device the reference's memory traffic is also counted on the meta device, in the dtype of a GPU
run (``--traffic-precision``; default bf16), with ``common.KernelOpCounter``: the input, in-place and output
bytes of each ATen call, as ``step.py --count-ops``, with the contraction's ``bmm`` (memory-bound here)
included. The fused kernels are not ATen calls; their traffic is given from their access pattern: the forward
reads each logit row and its target row, the backward reads both again and writes the gradient, and the table
is built from the teacher's rows.

Examples::

    .venv/bin/python benchmarks/dino_loss.py --device cpu --threads 2      # B=16, K=16384; traffic at B=64, K=65536
    python benchmarks/dino_loss.py --device cuda                            # B=64, nL=8, K=65536, bf16
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    KernelOpCounter,
    add_timing_args,
    machine_info,
    non_negative_int,
    positive_int,
    run_benchmark,
    set_threads,
)
from fastdinov2.losses import DINOLoss  # noqa: E402
from fastdinov2.losses.fused import fused_dino_loss, fused_loss_available  # noqa: E402
from head_loss import measure_variants, print_variants  # noqa: E402

TEACHER_TEMP, STUDENT_TEMP = 0.07, 0.1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULTS: dict[str, dict[str, int]] = {"cuda": {"b": 64, "k": 65536}, "cpu": {"b": 16, "k": 16384}}


class Problem:
    """Student logits ``[(2 + nL) * B, K]`` with gradient and the teacher's two ``[B, K]`` probabilities."""

    def __init__(self, b: int, n_local: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.b, self.n_local = b, n_local
        self.logits = (torch.randn((2 + n_local) * b, k, generator=g) * 4).to(device, dtype).requires_grad_(True)
        self.loss = DINOLoss(k, student_temp=STUDENT_TEMP).to(device)
        t_logits = (torch.randn(2 * b, k, generator=g) * 4).to(device)
        self.teacher = list(self.loss.softmax_center_teacher(t_logits, TEACHER_TEMP).chunk(2))

    def reset(self) -> None:
        self.logits.grad = None


def reference_step(pb: Problem) -> Tensor:
    loss = pb.loss.crop_pairs(*pb.logits.split([2 * pb.b, pb.n_local * pb.b]), pb.teacher)
    loss.backward()
    return loss.detach()


def fused_step(pb: Problem) -> Tensor:
    loss = fused_dino_loss(pb.logits, pb.teacher, student_temp=STUDENT_TEMP)
    loss.backward()
    return loss.detach()


def reference_traffic(b: int, n_local: int, k: int, dtype: torch.dtype) -> dict[str, Any]:
    """The reference step's ATen calls and bytes on meta tensors: ``{"gb", "kernel_ops", "gb_by_op"}``."""
    with torch.device("meta"):
        logits = torch.empty((2 + n_local) * b, k, dtype=dtype).requires_grad_(True)
        teacher = list(torch.empty(2 * b, k).softmax(-1).chunk(2))
        mod = DINOLoss(k, student_temp=STUDENT_TEMP)
    with KernelOpCounter(matmul_bytes=True) as counter:
        mod.crop_pairs(*logits.split([2 * b, n_local * b]), teacher).backward()
    return {"gb": sum(counter.bytes_by_op.values()) / 1e9, "kernel_ops": sum(counter.counts.values()),
            "gb_by_op": {n: v / 1e9 for n, v in counter.bytes_by_op.most_common(8)}}


def fused_traffic(b: int, n_local: int, k: int, dtype: torch.dtype) -> float:
    """GB the fused path moves: the fp32 table (with local crops: ``t0 + t1`` reads two ``[B, K]`` and writes one,
    the concatenation reads three and writes three; without: two and two), the forward (each logit row and its
    target row read) and the backward (both read again, the gradient written). Target rows read again by other
    student rows count each time (an upper bound: the table may stay in a GPU's L2)."""
    rows, item = (2 + n_local) * b, torch.empty((), dtype=dtype).element_size()
    table = (9 if n_local else 4) * b * k * 4
    forward = rows * k * (item + 4)
    backward = rows * k * (item + 4) + rows * k * item
    return (table + forward + backward) / 1e9


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    threads = set_threads(args.threads)
    d = DEFAULTS[device.type]
    b = args.b if args.b is not None else d["b"]
    k = args.k if args.k is not None else d["k"]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    pb = Problem(b, args.n_local, k, DTYPES[precision], device)
    variants: dict[str, Callable[[], Tensor]] = {"reference": functools.partial(reference_step, pb)}
    if fused_loss_available(device) and not args.no_fused:
        variants["fused"] = functools.partial(fused_step, pb)

    def call(name: str) -> Tensor:
        pb.reset()
        return variants[name]()

    loadavg_start = machine_info()["loadavg_1_5_15"]
    measured = measure_variants({name: functools.partial(call, name) for name in variants}, args, device)
    tb = args.traffic_b if args.traffic_b is not None else b
    tk = args.traffic_k if args.traffic_k is not None else k
    traffic_dtype = DTYPES[args.traffic_precision]
    ref_traffic = reference_traffic(tb, args.n_local, tk, traffic_dtype)
    return {
        "benchmark": "dino_loss",
        "device": device.type,
        "threads": threads,
        "precision": precision,
        "b": b, "n_local": args.n_local, "k": k,
        "fused": "fused" in variants,
        **measured,
        "traffic": {"b": tb, "n_local": args.n_local, "k": tk, "precision": args.traffic_precision,
                    "reference_gb": ref_traffic["gb"], "reference_kernel_ops": ref_traffic["kernel_ops"],
                    "reference_gb_by_op": ref_traffic["gb_by_op"],
                    "fused_gb": fused_traffic(tb, args.n_local, tk, traffic_dtype)},
        "loadavg_start": loadavg_start,
        "machine": machine_info(device),
    }


def print_readable(out: dict[str, Any]) -> None:
    m = out["machine"]
    dev = m.get("gpu_name") or f"{m['cpu_model']} ({out['threads']} threads)"
    print(f"DINO term: B={out['b']} local crops={out['n_local']} K={out['k']} {out['precision']} on {dev}, "
          f"load {out['loadavg_start']} -> {m['loadavg_1_5_15']}")
    print_variants(out, width=10, digits=2)
    t = out["traffic"]
    # the fused kernels need CUDA with Triton: where they did not run, their figure is what they would move
    fused = ("fused" if out["fused"] else "fused kernels (not run here) would move on a GPU")
    print(f"  memory traffic at B={t['b']}, K={t['k']}, {t['precision']} logits: reference {t['reference_gb']:.2f} GB "
          f"in {t['reference_kernel_ops']} ATen calls (counted on meta tensors), {fused} {t['fused_gb']:.2f} GB "
          f"(from the kernels' access pattern)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--b", type=positive_int, default=None, help="images per step (default: 64 cuda, 16 cpu)")
    p.add_argument("--n-local", type=non_negative_int, default=8, help="local crops per image (default 8; 0: none)")
    p.add_argument("--k", type=positive_int, default=None, help="prototypes (default: 65536 cuda, 16384 cpu)")
    p.add_argument("--precision", default=None, choices=tuple(DTYPES),
                   help="the logits' dtype (default: bf16 on cuda, as under autocast; fp32 on cpu)")
    p.add_argument("--traffic-b", type=positive_int, default=64, help="B of the traffic count (default 64)")
    p.add_argument("--traffic-k", type=positive_int, default=65536, help="K of the traffic count (default 65536)")
    p.add_argument("--traffic-precision", default="bf16", choices=tuple(DTYPES),
                   help="the logits' dtype of the traffic count (default bf16, a GPU run's)")
    p.add_argument("--no-fused", action="store_true",
                   help="leave out the fused Triton variant (run by default where it can: CUDA with Triton)")
    add_timing_args(p, steps=10, warmup=2)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
