"""Shared helpers of the benchmark scripts: thread settings, machine description, peak FLOP/s, output.

Every benchmark prints one JSON object (the last line of stdout) after its readable lines, and writes the
same object to ``--json-out`` when given. Benchmarks are never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

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


def set_threads(threads: int | None) -> int:
    """Pin the intra-op thread count (also exported as OMP_NUM_THREADS for child processes); returns it."""
    n = threads if threads and threads > 0 else (os.cpu_count() or 1)
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
    """Median / min / mean / max of per-step times, in milliseconds."""
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
    JSON line (and ``--json-out``). Returns the result."""
    args = parser.parse_args(argv)
    out = run(args)
    print_readable(out)
    emit(out, args.json_out)
    return out
