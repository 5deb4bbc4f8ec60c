"""The ``fastdinov2`` command line. It only parses arguments and calls into the modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fastdinov2 import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from fastdinov2 import distributed
    from fastdinov2.config import load_config
    from fastdinov2.train.loop import EXIT_PREEMPTED, Preempted, resolve_device, train

    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / (Path(args.config).stem if args.config
                                                                              else "fastdinov2_tiny")
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA); a no-op for a single process.
    try:
        rank, _, _ = distributed.init_distributed(resolve_device(cfg).type)
    except RuntimeError as exc:
        print(f"fastdinov2: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, output_dir, allow_config_change=args.allow_config_change)
        # Leave together: no rank tears its connections down while rank 0 still writes the run's files.
        distributed.barrier()
    except Preempted as exc:
        if rank == 0:
            print(f"[fastdinov2] preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        distributed.destroy()
    state = "finished" if summary["finished"] else f"stopped at step {summary['step']} of {summary['total_steps']}"
    if rank == 0:
        print(f"[fastdinov2] run {state}; outputs in {output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdinov2", description="Fast, robust DINOv2 pre-training with a frequency curriculum."
    )
    parser.add_argument("--version", action="version", version=f"fastdinov2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="pre-train (or continue a run in --output-dir)")
    p.add_argument("--config", default=None, help="preset name (configs/<name>.yaml) or YAML file; "
                   "default: fastdinov2_tiny")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a run in --output-dir even though its saved config differs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=10")
    p.set_defaults(func=_cmd_train)

    from fastdinov2 import experiment, flops
    from fastdinov2.data.commands import add_data_commands
    from fastdinov2.eval.commands import add_eval_commands
    from fastdinov2.report import add_report_command

    add_eval_commands(sub)
    add_data_commands(sub)
    add_report_command(sub)
    flops.add_command(sub)
    experiment.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fastdinov2.config import ConfigError
    from fastdinov2.data.datasets import DataError
    from fastdinov2.eval.results import EvalError
    from fastdinov2.interop import BackboneLoadError
    from fastdinov2.safe_pickle import UnsafePickleError
    from fastdinov2.train.checkpoint import CheckpointError
    from fastdinov2.train.loop import TrainingError

    parser = build_parser()
    # KEY=VALUE overrides may come between options (`train a=1 --output-dir X b=2`); argparse would stop the
    # overrides list at the first option and refuse the rest, so those are appended here, in order.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, EvalError, BackboneLoadError, UnsafePickleError, CheckpointError,
            TrainingError) as exc:
        print(f"fastdinov2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdinov2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
