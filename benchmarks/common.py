"""Shared helpers of the benchmark scripts: option types, thread settings, machine description, peak FLOP/s,
output.

Every benchmark prints one JSON object (the last line of stdout) after its readable lines, and writes the
same object to ``--json-out`` when given. Benchmarks are never part of the test suite.

Bad input is refused while parsing (argparse ``type=`` functions: :func:`positive_int`, :func:`non_negative_int`,
:func:`positive_float`, :func:`positive_int_list`, :func:`size_pairs`; ``error: argument --steps: 0 is not a
positive integer (must be >= 1)``, exit code 2), and a configuration or data error met while running
(:class:`~fastdinov2.config.ConfigError`, :class:`~fastdinov2.data.datasets.DataError`) ends the script with
``<script>: error: <message>`` and exit code 2 (:func:`run_benchmark`), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastdinov2.config import ConfigError
from fastdinov2.data.datasets import DataError

# the benchmarks' option types (re-exported): a bad value is refused while parsing, naming option and value
from fastdinov2.eval.options import non_negative_int as non_negative_int
from fastdinov2.eval.options import positive_float as positive_float
from fastdinov2.eval.options import positive_int as positive_int

#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
)


# aten ops that only make views or metadata (no kernel on a GPU); everything else counts as a launch.
VIEW_OPS = frozenset(
    f"aten::{n}"
    for n in (
        "view",
        "_unsafe_view",
        "reshape",
        "t",
        "transpose",
        "permute",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "as_strided",
        "detach",
        "detach_",
        "alias",
        "unbind",
        "chunk",
        "split",
        "flatten",
        "unflatten",
        "empty",
        "empty_like",
        "empty_strided",
        "numpy_T",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "narrow",
        "view_as",
        "split_with_sizes",
        "_reshape_alias",
        "set_",
        "is_nonzero",
    )
)
# ... and the calls that launch no kernel either: allocations, profiler markers, dtype no-ops
NO_KERNEL_OPS = VIEW_OPS | frozenset(
    f"aten::{n}" for n in ("new_empty", "new_empty_strided", "alias", "_to_copy_", "to", "_record_function_enter_new",
                            "_record_function_exit", "scalar_tensor")
)


class KernelOpCounter(TorchDispatchMode):
    """Counts the ATen calls made under it that launch a kernel (not in :data:`NO_KERNEL_OPS`), by name and by
    phase (``phase()`` names the current one), and the memory traffic of those that are not matrix products,
    attention or convolutions: the bytes of each call's tensor inputs, of the arguments it writes in place and
    of its new outputs (an estimate: a kernel may read a broadcast input once, or fuse nothing away). Foreach and
    fused optimizer ops count once (on a GPU they launch one kernel per chunk of tensors). Works on any device,
    the meta device included. ``matmul_bytes=True`` counts the bytes of the matrix products too (for work where
    they are memory-bound, e.g. a contraction to a scalar)."""

    def __init__(self, phase: Callable[[], str] = lambda: "all", matmul_bytes: bool = False) -> None:
        super().__init__()
        self.phase = phase
        self.matmul_bytes = matmul_bytes
        self.counts: Counter[str] = Counter()
        self.by_phase: Counter[str] = Counter()
        self.bytes_by_phase: Counter[str] = Counter()
        self.bytes_by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = "aten::" + func.__name__.split(".")[0]
        if name in NO_KERNEL_OPS:
            return out
        phase = self.phase()
        self.counts[name] += 1
        self.by_phase[phase] += 1
        if self.matmul_bytes or not any(k in name for k in ("mm", "attention", "convolution", "linear")):
            ins = _tensors((args, kwargs))
            seen = {id(t) for t in ins}
            # in-place and out= arguments are written as well as read
            kw = kwargs or {}
            written = [a for i, arg in enumerate(func._schema.arguments)
                       if arg.alias_info is not None and arg.alias_info.is_write
                       for a in _tensors(args[i] if i < len(args) else kw.get(arg.name))]
            moved = sum(t.numel() * t.element_size() for t in ins + written)
            moved += sum(t.numel() * t.element_size() for t in _tensors(out) if id(t) not in seen)
            self.bytes_by_phase[phase] += moved
            self.bytes_by_op[name] += moved
        return out

    def summary(self, top: int = 15) -> dict[str, Any]:
        return {
            "kernel_ops_per_step": sum(self.counts.values()),
            "top_kernel_ops": dict(self.counts.most_common(top)),
            "kernel_ops_by_phase": dict(self.by_phase),
            "non_matmul_gb_per_step": sum(self.bytes_by_phase.values()) / 1e9,
            "non_matmul_gb_by_phase": {k: v / 1e9 for k, v in self.bytes_by_phase.most_common()},
        }


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]



def time_interleaved(calls: dict[str, Callable[[], Any]], steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``steps`` timed rounds, the variants
    interleaved within each round (a change of machine load hits all alike); on CUDA synchronised before and
    after each timed call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _int_list(text: str, item: Callable[[str], int], what: str) -> list[int]:
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
    try:
        return [item(v) for v in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what} ({exc})") from None


def positive_int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (``7,64``), as an argparse ``type=``."""
    return _int_list(text, positive_int, "positive integers")


def non_negative_int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 0 (indices: ``0,1``), as an argparse ``type=``."""
    return _int_list(text, non_negative_int, "integers >= 0")


def size_pair(text: str) -> tuple[int, int]:
    """``GLOBAL/LOCAL`` crop sizes in pixels, both >= 1 (``224/96``), as an argparse ``type=``."""
    parts = text.split("/")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not GLOBAL/LOCAL sizes, e.g. 224/96")
    try:
        g, loc = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not GLOBAL/LOCAL sizes, e.g. 224/96") from None
    if g < 1 or loc < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: crop sizes must be positive")
    return g, loc


def size_pairs(text: str) -> list[tuple[int, int]]:
    """A comma-separated list of :func:`size_pair` (``224/96,112/48``), as an argparse ``type=``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("no sizes given; e.g. 224/96,112/48")
    return [size_pair(v.strip()) for v in text.split(",")]


def add_timing_args(p: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    """``--steps``, ``--warmup``, ``--threads`` and ``--json-out``, as the timing benchmarks take them."""
    p.add_argument("--steps", type=positive_int, default=steps, help="timed steps per variant (>= 1)")
    p.add_argument("--warmup", type=non_negative_int, default=warmup,
                   help="untimed steps per variant first (after one check; 0: none)")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch intra-op threads (default or 0: all cores)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")


def set_threads(threads: int | None) -> int:
    """Pin the intra-op thread count (also exported as OMP_NUM_THREADS for child processes); returns it.
    ``None`` or 0: all cores."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads: {threads} is negative (0 or None: all cores)")
    n = threads if threads else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    """CPU model name (``lscpu``'s "Model name", else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, load averages, torch, threads, GPU."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak of the device in TFLOP/s: ``override`` if given, else looked up by GPU name."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, value in PEAK_BF16_TFLOPS:
        if fragment in name:
            return value
    return None


def summarize_ms(times_s: Sequence[float]) -> dict[str, float]:
    """Median / min / mean / max of per-step times, in milliseconds (at least one time)."""
    if not times_s:
        raise ValueError("summarize_ms: no times (a count of timed steps was 0)")
    ms = [t * 1e3 for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "mean_ms": statistics.fmean(ms),
        "max_ms": max(ms),
        "n": len(ms),
    }


def emit(result: dict[str, Any], json_out: str | None) -> None:
    """Print ``result`` as one JSON line and write it to ``json_out`` (parent dirs created)."""
    text = json.dumps(result, default=str)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(text, flush=True)


def run_benchmark(
    parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[Any], dict[str, Any]],
    print_readable: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The common ``main`` of a benchmark: parse ``argv``, ``run(args)``, print the readable lines, then the
    JSON line (and ``--json-out``). Returns the result.

    A configuration or data error raised by ``run`` (an unknown ``--config`` preset, a bad ``KEY=VALUE``
    override, a missing dataset) ends the script with ``<prog>: error: <message>`` on stderr and exit code 2,
    as argparse does for a bad option, instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except (ConfigError, DataError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    print_readable(out)
    emit(out, args.json_out)
    return out
