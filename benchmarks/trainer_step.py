"""The trainer's own step per curriculum stage, split between the loader, the host and the device.

``benchmarks/step.py`` times the training step on synthetic tensors already on the device. The trainer
does more per step: it takes the next batch from the loader, moves it to the device, applies the colour
augmentation there (``data.photometric_on=device``, the CUDA default), and only then runs the step (as
one CUDA graph with ``compute.cuda_graph``). On an H100 the trainer's step was 14-28 ms slower than
``step.py``'s (docs/benchmarks.md, session 6); this script says where that time goes. For each stage of
``--config`` (a :class:`~fastdinov2.train.loop.Trainer` on the embedded dataset, or ``--data-root``):

- ``loader``: ``--steps`` steps as the training loop runs them (``next(loader)`` then ``train_step``), with
  no host sync until the end: ms per step, and the host's time per step in ``next`` (waiting for data), in
  moving the batch and its colour augmentation (``Trainer._on_device``) and in the rest of ``train_step``;
- ``same_batch``: the same number of ``train_step`` calls on one batch already taken from the loader (no
  loader work; the move and the colour augmentation still run);
- ``on_device``: the batch moved and augmented once; ``train_step`` on it (what ``step.py`` times; with
  the CUDA graph a graph of its own, warmed up first).

With ``compute.cuda_graph`` the colour augmentation is part of the replayed graph (``GraphedStep`` copies
the uint8 crops and the parameters into its buffers): the host's ``move + colour`` time is then ~0, and
``loader`` minus ``on_device`` is the augmentation's device time plus the host's copies.
- with ``--profile N``: ``torch.profiler`` over N loader steps: the device's busy time per step (kernels
  summed), by kind of kernel, and the wall time it is busy (1 - busy / wall is the device idling).

``--warmup`` steps before each measurement (eager warm-up and capture of the CUDA graph, compilation).

Example::

    .venv/bin/python benchmarks/trainer_step.py --config fastdinov2_tiny --steps 4
    python3 benchmarks/trainer_step.py --config fastdinov2_vits16_in100 --steps 20 --profile 5 \\
        data.num_workers=12                                    # on a GPU machine
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    machine_info,
    non_negative_int,
    non_negative_int_list,
    positive_int,
    run_benchmark,
)
from fastdinov2.config import load_config  # noqa: E402
from fastdinov2.curriculum import StagePlan  # noqa: E402
from fastdinov2.data.collate import TrainBatch  # noqa: E402
from fastdinov2.train.loop import Trainer  # noqa: E402
from step import kernel_categories, split_device_events  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Batches:
    """The loader's batches, with :meth:`close` shutting its worker processes down.

    The loader iterator is referenced from here only, while the benchmark's functions hold this object. An
    exception escaping them keeps their frames, and so this object, alive in its traceback (until the
    interpreter exits); had they held the iterator itself, its workers would never be told to stop, and since
    they ignore the first SIGTERM (the trainer's ``worker_init_fn``) the process would hang at exit, joining
    them. :meth:`close` drops the only reference: the iterator's finaliser stops and joins the workers."""

    def __init__(self, loader: Iterable[TrainBatch]) -> None:
        self._it: Iterator[TrainBatch] | None = iter(loader)

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> TrainBatch:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        it, self._it = self._it, None
        # An exception raised inside the iterator keeps its own frames (and so the iterator) in the traceback:
        # stop its workers directly then (DataLoader's iterator has no public close; _shutdown_workers is what
        # its finaliser calls, and a second call does nothing).
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        del it
        gc.collect()  # in case a reference cycle holds the iterator


class _HostClock:
    """Host seconds spent inside a wrapped callable, summed."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t0

        return timed


def _loader_steps(trainer: Trainer, batches: Iterator[TrainBatch], first_step: int, n: int,
                  on_device: _HostClock) -> dict[str, float]:
    """``n`` steps as the loop runs them; host seconds per step in ``next``, ``_on_device`` and the rest."""
    wait = 0.0
    on_device.total = 0.0
    _sync(trainer.device)
    t0 = time.perf_counter()
    for i in range(n):
        tw = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tw
        trainer.train_step([batch], first_step + i)
    host = time.perf_counter() - t0
    _sync(trainer.device)
    wall = time.perf_counter() - t0
    return {
        "ms_per_step": wall * 1e3 / n,
        "host_ms_per_step": host * 1e3 / n,
        "host_data_wait_ms": wait * 1e3 / n,
        "host_on_device_ms": on_device.total * 1e3 / n,
        "host_rest_ms": (host - wait - on_device.total) * 1e3 / n,
    }


def _repeat(trainer: Trainer, batch: TrainBatch, first_step: int, n: int, warmup: int = 0) -> float:
    """ms per ``train_step`` on the same batch, synchronised at the end only, after ``warmup`` untimed steps (a
    batch of another kind, e.g. already augmented, is another CUDA graph: its eager steps and capture)."""
    for i in range(warmup):
        trainer.train_step([batch], first_step + i)
    first_step += warmup
    _sync(trainer.device)
    t0 = time.perf_counter()
    for i in range(n):
        trainer.train_step([batch], first_step + i)
    _sync(trainer.device)
    return (time.perf_counter() - t0) * 1e3 / n


def _profile(trainer: Trainer, batches: Iterator[TrainBatch], first_step: int, n: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    _sync(trainer.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            trainer.train_step([next(batches)], first_step + i)
        _sync(trainer.device)
        wall = time.perf_counter() - t0
    _, kernels = split_device_events(list(prof.key_averages()))
    busy = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels) / 1e3 / n
    wall_ms = wall * 1e3 / n
    return {
        "steps": n,
        "wall_ms_per_step": wall_ms,
        "device_busy_ms_per_step": busy,
        "device_idle_frac": max(0.0, 1.0 - busy / wall_ms) if kernels else None,
        "kernels_per_step": sum(e.count for e in kernels) / n,
        "kernel_categories": kernel_categories(kernels, n),
        "top_kernels": [
            {"kernel": e.key[:160], "device_ms_per_step": getattr(e, "self_device_time_total", 0.0) / 1e3 / n,
             "calls_per_step": e.count / n}
            for e in sorted(kernels, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True)[:20]
        ],
    }


def _measure_stage(trainer: Trainer, st: StagePlan, batches: _Batches, on_device: _HostClock,
                   args: argparse.Namespace) -> dict[str, Any]:
    """One stage's measurements (see the module's docstring), on the loader's ``batches``."""
    step = st.start_step
    for _ in range(args.warmup):  # eager warm-up, CUDA-graph capture, compilation
        trainer.train_step([next(batches)], step)
        step += 1
    res: dict[str, Any] = {"stage": st.name, "global_size": st.global_size, "local_size": st.local_size,
                           "batch_size": st.batch_size_per_gpu}
    res["loader"] = _loader_steps(trainer, batches, step, args.steps, on_device)
    step += args.steps
    if args.profile:
        for _ in range(args.warmup):  # the profiler's own start-up outside the profiled steps
            trainer.train_step([next(batches)], step)
            step += 1
        res["profile"] = _profile(trainer, batches, step, args.profile)
        step += args.profile
    held = next(batches)
    res["same_batch_ms_per_step"] = _repeat(trainer, held, step, args.steps)
    ready = trainer._on_device(held)
    res["on_device_ms_per_step"] = _repeat(trainer, ready, step, args.steps, warmup=args.warmup)
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fastdinov2_trainer_step_") as tmp:
        overrides = [*([f"data.root={args.data_root}"] if args.data_root else []),
                     "train.progress=false", "train.knn_at_end=false", *args.overrides]
        cfg = load_config(args.config, overrides)
        n_stages = len(cfg.curriculum.stages)
        for w in args.stages or ():
            if w >= n_stages:
                raise SystemExit(f"--stages: stage {w} does not exist ({args.config} has {n_stages} stages)")
        trainer = Trainer(cfg, Path(tmp) / "run")
        on_device = _HostClock()
        trainer._on_device = on_device.wrap(trainer._on_device)  # type: ignore[method-assign]
        # per stage: warm-up + timed loader steps [+ warm-up + profiled steps] + the held batch
        per = args.warmup + args.steps + ((args.warmup + args.profile) if args.profile else 0) + 1
        stages = []
        for st in trainer.curriculum.stages:
            if args.stages and st.index not in args.stages:
                continue
            if st.num_steps < per:
                raise SystemExit(f"stage {st.index} '{st.name}' has {st.num_steps} steps, fewer than the {per} "
                                 f"this needs (--warmup {args.warmup}, --steps {args.steps}, --profile "
                                 f"{args.profile}); lower them or train on more images")
            batches = _Batches(trainer.make_loader(st.start_step, st.start_step + per))
            try:
                stages.append(_measure_stage(trainer, st, batches, on_device, args))
            finally:  # also when a step fails: stop the loader's workers, or the process never exits
                batches.close()
        return {
            "benchmark": "trainer_step",
            "config": args.config,
            "overrides": overrides,
            "device": str(trainer.device),
            "cuda_graph": trainer._graphed is not None,
            "photometric_on": trainer.photometric_on,
            "num_workers": trainer.cfg.data.num_workers,
            "warmup": args.warmup,
            "steps": args.steps,
            "stages": stages,
            "machine": machine_info(trainer.device),
        }


def print_readable(out: dict[str, Any]) -> None:
    print(f"trainer step: {out['config']} on {out['device']}, cuda_graph={out['cuda_graph']}, colour augmentation "
          f"on the {out['photometric_on']}, {out['num_workers']} loader workers")
    for s in out["stages"]:
        ld = s["loader"]
        print(f"  {s['stage']:16s} {s['global_size']}/{s['local_size']} B={s['batch_size']}: "
              f"{ld['ms_per_step']:.1f} ms/step from the loader (host: data wait {ld['host_data_wait_ms']:.1f}, "
              f"move + colour {ld['host_on_device_ms']:.1f}, rest {ld['host_rest_ms']:.1f}); same batch "
              f"{s['same_batch_ms_per_step']:.1f}; batch already on the device {s['on_device_ms_per_step']:.1f}")
        if "profile" in s and not out["device"].startswith("cuda"):  # no device kernels to time on the CPU
            print(f"    profile: wall {s['profile']['wall_ms_per_step']:.1f} ms/step (device busy time and "
                  "kernels: CUDA only)")
        elif "profile" in s:
            pr = s["profile"]
            idle = pr["device_idle_frac"]
            print(f"    profile: wall {pr['wall_ms_per_step']:.1f} ms/step, device busy "
                  f"{pr['device_busy_ms_per_step']:.1f} ms"
                  + (f" (idle {100 * idle:.0f}%)" if idle is not None else "")
                  + f", {pr['kernels_per_step']:.0f} kernels; by kind (ms): "
                  + ", ".join(f"{c} {v['device_ms_per_step']:.1f}" for c, v in pr["kernel_categories"].items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fastdinov2_tiny")
    p.add_argument("--data-root", default=None, help="training images (default: the embedded dataset)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per measurement (>= 1)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="steps before each measurement (0: none)")
    p.add_argument("--profile", type=non_negative_int, default=0, metavar="N",
                   help="torch.profiler over N loader steps (0: no profile)")
    p.add_argument("--stages", type=non_negative_int_list, default=None,
                   help="comma-separated stage indices, e.g. 0,1 (default: all)")
    p.add_argument("--json-out", default=None)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
