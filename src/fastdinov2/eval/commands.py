"""``fastdinov2 eval knn|linear|corruption|frequency|retrieval``: parse, call the protocol, write JSON, print.

Common options: ``--checkpoint PATH`` (anything :func:`fastdinov2.interop.load_backbone` accepts), ``--data DIR``
(a root with ``train/`` and ``val/`` class folders; default: the embedded synthetic dataset), ``--output FILE``
(default ``RUN/eval/<protocol>.json`` when the checkpoint is a run directory, else ``./eval_<protocol>.json``),
``--image-size`` (224, or 64 on the embedded data, rounded to the nearest multiple of the model's patch size;
``corruption``/``frequency``: the linear head's), ``--batch-size``, ``--num-workers``, ``--device``.

Every command checks its input before loading the model: numeric options while parsing
(:mod:`fastdinov2.eval.options`), output paths, data folders, the linear head and, for ``corruption`` /
``frequency``, that a *default* head or corruption result belongs to ``--checkpoint`` (an explicitly given one
for another checkpoint is used with a warning, recorded in the result). Under torchrun with more than one
process the commands refuse to run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastdinov2.eval import options as opt
from fastdinov2.eval.results import EvalError, write_result

RUN_DIR_MARKERS = ("config.yaml", "metrics.jsonl", "teacher_backbone.safetensors", "checkpoints")
DEFAULT_IMAGE_SIZE = 224
EMBEDDED_IMAGE_SIZE = 64  # the embedded synthetic dataset (96 px images) is evaluated at 64 px, like the tiny preset


def is_run_dir(path: str | Path) -> bool:
    """A training run directory (not a single checkpoint directory): holds config.yaml, metrics.jsonl,
    teacher_backbone.safetensors or checkpoints/."""
    p = Path(path)
    return p.is_dir() and not (p / "model.pt").exists() and any((p / m).exists() for m in RUN_DIR_MARKERS)


def default_output(checkpoint: str | Path, protocol: str) -> Path:
    """``RUN/eval/<protocol>.json`` for a run directory, else ``./eval_<protocol>.json``."""
    if is_run_dir(checkpoint):
        return Path(checkpoint) / "eval" / f"{protocol}.json"
    return Path(f"eval_{protocol}.json")


def head_path_for(linear_output: str | Path) -> Path:
    """Where the linear probe saves its best head: ``<output stem>_head.safetensors`` beside its JSON."""
    p = Path(linear_output)
    return p.with_name(p.stem + "_head.safetensors")


def data_root(data: str | Path | None) -> Path:
    """``--data`` or, when not given, the embedded synthetic dataset (written once to the cache)."""
    if data is not None:
        return Path(data)
    from fastdinov2.data.synthetic import default_dataset_root

    return Path(default_dataset_root())


def split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise EvalError(f"{root} has no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    return path


def _add_common(p: argparse.ArgumentParser, protocol: str, head_size: bool = False) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="backbone: our export (.safetensors + .json), a run dir, a checkpoint dir, the seed's "
                        "teacher_checkpoint.pth, an official DINOv2 or a timm file")
    p.add_argument("--data", default=None,
                   help="dataset root with train/ and val/ class folders (default: the embedded synthetic data)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"result JSON, must end in .json (default: RUN/eval/{protocol}.json for a run dir, else "
                        f"./eval_{protocol}.json)")
    size_help = "eval resolution, a multiple of the model's patch size: resize to round(S*256/224), centre-crop S " \
        "(default: " + ("the head's)" if head_size else f"{DEFAULT_IMAGE_SIZE}, or {EMBEDDED_IMAGE_SIZE} on the "
                        "embedded data, rounded to the nearest multiple of the patch size)")
    p.add_argument("--image-size", type=opt.positive_int, default=None, help=size_help)
    p.add_argument("--batch-size", type=opt.positive_int, default=128, help="images per forward pass (default: 128)")
    p.add_argument("--num-workers", type=opt.non_negative_int, default=0,
                   help="data-loader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_head_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", type=Path, default=None,
                   help="linear head (.safetensors + .json) from `fastdinov2 eval linear` (default: the linear "
                        "probe's head next to its default output for this checkpoint; refused when it was trained "
                        "on another checkpoint)")
    p.add_argument("--max-per-class", type=opt.positive_int, default=None,
                   help="evaluate at most N images per class")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed for subsampling and generated corruptions")


def _add_corruption_source(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--corrupted-root", type=Path, default=None,
                   help="ImageNet-C style ROOT/<type>/<severity>/<wnid>/* or the seed's "
                        "ROOT/<type>/<severity>/val/<wnid>/*")
    g.add_argument("--generate", action="store_true",
                   help="corrupt the val folder of --data on the fly with imagecorruptions")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="TYPE",
                   help="corruption types to evaluate (default: all found / all 19 when generating)")
    p.add_argument("--severities", nargs="+", type=opt.severity, default=[1, 2, 3, 4, 5],
                   help="default: 1 2 3 4 5")
    p.add_argument("--corruption-size", type=opt.corruption_size, default=224,
                   help="generated corruptions are applied at this size, then resized to --image-size "
                        f"(default 224, ImageNet-C's calibration; 0: at --image-size; else >= "
                        f"{opt.MIN_CORRUPTION_SIZE})")


def add_eval_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` and its protocols on the top-level sub-parsers."""
    p = subparsers.add_parser(
        "eval", help="evaluate a backbone: knn, linear, corruption, frequency, retrieval",
        description="Evaluation protocols on a frozen backbone; each writes a JSON result (see docs/evaluation.md).",
    )
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="PROTOCOL")

    k = sub.add_parser("knn", help="weighted kNN on CLS features (DINOv2 protocol)",
                       description="kNN top-1/top-5 with L2-normalised CLS features, cosine similarity and "
                                   "exp(sim/T) weighted votes.")
    _add_common(k, "knn")
    k.add_argument("--ks", nargs="+", type=opt.positive_int, default=[10, 20, 100, 200],
                   help="default: 10 20 100 200")
    k.add_argument("--temperature", type=opt.positive_float, default=0.07, help="default: 0.07")
    k.add_argument("--cache-dir", type=Path, default=None, help="keep extracted features here for reuse")
    k.set_defaults(func=_guard(run_knn_command))

    lin = sub.add_parser("linear", help="linear probe grid on frozen features (DINOv2 protocol)",
                         description="Trains 13 learning rates x {last 1, last 4 blocks} x {CLS, CLS+avgpool} "
                                     "linear heads on precomputed eval-transform features, keeps the best.")
    _add_common(lin, "linear")
    lin.add_argument("--epochs", type=opt.positive_int, default=10,
                     help="passes over the training features (default: 10)")
    lin.add_argument("--iterations", type=opt.positive_int, default=None,
                     help="train this many iterations instead of --epochs")
    lin.add_argument("--head-batch-size", type=opt.positive_int, default=128,
                     help="mini-batch of the linear heads; learning rates are scaled by it / 256 (default: 128)")
    lin.add_argument("--learning-rates", nargs="+", type=opt.positive_float, default=None,
                     help="default: 1e-5 ... 0.1 (13)")
    lin.add_argument("--n-last-blocks", nargs="+", type=opt.positive_int, default=[1, 4], help="default: 1 4")
    lin.add_argument("--val-from-train", action="store_true",
                     help="select the best head on a stratified hold-out of train instead of val")
    lin.add_argument("--val-fraction", type=opt.fraction, default=0.1,
                     help="hold-out fraction, in (0, 1) (default: 0.1)")
    lin.add_argument("--seed", type=opt.seed, default=0)
    lin.add_argument("--head-output", type=Path, default=None,
                     help="where to save the best head, must end in .safetensors (default: <output "
                          "stem>_head.safetensors)")
    lin.add_argument("--cache-dir", type=Path, default=None, help="keep extracted features here for reuse")
    lin.set_defaults(func=_guard(run_linear_command))

    c = sub.add_parser("corruption", help="ImageNet-C style robustness of the linear head",
                       description="Top-1 of the saved linear head per corruption type and severity, mean over "
                                   "the 15 standard and all 19 types, mCE against --reference.")
    _add_common(c, "corruption", head_size=True)
    _add_head_args(c)
    _add_corruption_source(c, required=True)
    c.add_argument("--reference", type=Path, default=None, help="corruption result JSON of a reference model (mCE)")
    c.set_defaults(func=_guard(run_corruption_command))

    f = sub.add_parser("frequency", help="accuracy under low/high-pass Fourier filtering; corruptions by band",
                       description="Top-1 of the saved linear head on low- and high-pass filtered val images, and "
                                   "corruption accuracy grouped by frequency band.")
    _add_common(f, "frequency", head_size=True)
    _add_head_args(f)
    f.add_argument("--radii", nargs="+", type=opt.positive_float, default=None,
                   help="filter radii in cycles per image (default: 2 4 8 ... up to image_size/2)")
    f.add_argument("--corruption-result", type=Path, default=None,
                   help="corruption result JSON to group by band (default: the corruption protocol's default "
                        "output for this checkpoint, if it exists; refused when it is another checkpoint's)")
    _add_corruption_source(f, required=False)
    f.set_defaults(func=_guard(run_frequency_command))

    from fastdinov2.eval.retrieval import add_retrieval_command

    add_retrieval_command(sub)
    return p


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn an :class:`EvalError` into a one-line message and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except EvalError as exc:
            print(f"fastdinov2: error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _warn(message: str, warnings: list[str]) -> None:
    """Print a warning on stderr and keep it for the result's ``warnings`` list."""
    print(f"fastdinov2: warning: {message}", file=sys.stderr)
    warnings.append(message)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from fastdinov2.eval.features import resolve_device
    from fastdinov2.interop import load_backbone

    if not Path(args.checkpoint).exists():
        raise EvalError(f"checkpoint {args.checkpoint} does not exist")
    dev = resolve_device(args.device)
    return load_backbone(args.checkpoint, device=dev), dev


def _output(args: argparse.Namespace, protocol: str) -> Path:
    return Path(args.output) if args.output is not None else default_output(args.checkpoint, protocol)


def check_output(args: argparse.Namespace, protocol: str, companions: tuple[str, ...] = ()) -> Path:
    """The result path of ``protocol``, checked before any work (:func:`fastdinov2.eval.options.check_output_file`);
    ``companions``: suffixes of files written beside it (``.png``, ``.md``), which must not be directories."""
    out = _output(args, protocol)
    what = "--output" if args.output is not None else "output file (the default of --output)"
    opt.check_output_file(out, what, ".json")
    for suffix in companions:
        side = out.with_suffix(suffix)
        if side.is_dir():
            raise EvalError(f"{side}, written beside {what} {out}, is a directory")
    return out


def _head(args: argparse.Namespace) -> tuple[Path, bool]:
    """The linear head file and whether ``--head`` named it."""
    if args.head is not None:
        return Path(args.head), True
    path = head_path_for(default_output(args.checkpoint, "linear"))
    if not path.is_file():
        raise EvalError(f"no linear head at {path}: run `fastdinov2 eval linear --checkpoint {args.checkpoint}` "
                        "first or pass --head")
    return path, False


def provenance(recorded: Mapping[str, Any], checkpoint: str | Path) -> tuple[bool | None, str]:
    """Whether a head or result that records ``checkpoint`` (as given) and, optionally, ``checkpoint_resolved``
    and ``checkpoint_file`` (:func:`fastdinov2.eval.features.checkpoint_identity`) was made from ``checkpoint``.

    When both weights files are known they decide (``RUN`` and ``RUN/teacher_backbone.safetensors`` are the
    same backbone; a run directory that trained on since resolves to a newer checkpoint, another backbone);
    otherwise the resolved paths are compared. ``None`` when nothing is recorded. The string describes the
    recorded checkpoint for messages."""
    from fastdinov2.eval.features import checkpoint_identity

    given, resolved = recorded.get("checkpoint"), recorded.get("checkpoint_resolved")
    if not given and not resolved:
        return None, "an unrecorded checkpoint"
    here = checkpoint_identity(checkpoint)
    there = str(resolved) if resolved else str(Path(str(given)).resolve())
    desc = f"checkpoint {given if given else there}" + (f" ({there})" if given and str(given) != there else "")
    file = recorded.get("checkpoint_file")
    if file and here["checkpoint_file"]:
        if file == here["checkpoint_file"]:
            return True, desc
        return False, f"{desc}, read from {file} (--checkpoint now reads {here['checkpoint_file']})"
    return there == here["checkpoint_resolved"], desc


def _check_head(args: argparse.Namespace, head_file: Path, explicit: bool, warnings: list[str]) -> tuple[Any, dict]:
    """Load the head and check that it was trained on ``--checkpoint``: a default head for another checkpoint
    is refused, an explicit one is used with a warning. Returns the head and what the result records."""
    from fastdinov2.eval.linear import LinearHead

    head = LinearHead.load(head_file)
    same, desc = provenance(head.meta, args.checkpoint)
    info = {"checkpoint": head.meta.get("checkpoint"), "same_checkpoint": same}
    if same is True:
        return head, info
    problem = (f"linear head {head_file} was trained on {desc}, not on --checkpoint {args.checkpoint}" if same is False
               else f"linear head {head_file} records no checkpoint, so it cannot be matched to --checkpoint "
                    f"{args.checkpoint}")
    if not explicit:
        raise EvalError(f"{problem}; its accuracies would mean nothing for this backbone. Run `fastdinov2 eval "
                        f"linear --checkpoint {args.checkpoint}` first (it writes this default head), or pass a "
                        "head explicitly with --head FILE")
    _warn(f"{problem}; using it because --head names it", warnings)
    return head, info


def _corruption_result(args: argparse.Namespace, warnings: list[str]) -> Path | None:
    """``--corruption-result``, else the corruption protocol's default output for this checkpoint when it
    exists; a default one made from another checkpoint is refused, an explicit one used with a warning."""
    from fastdinov2.eval.results import read_result

    explicit = args.corruption_result is not None
    path = Path(args.corruption_result) if explicit else default_output(args.checkpoint, "corruption")
    if not explicit and not path.is_file():
        return None
    obj = read_result(path, "corruption")
    config = obj["config"] if isinstance(obj.get("config"), dict) else {}
    same, desc = provenance({"checkpoint": obj.get("checkpoint"), **{
        k: config.get(k) for k in ("checkpoint_resolved", "checkpoint_file")}}, args.checkpoint)
    if same is not True:
        problem = (f"corruption result {path} was computed on {desc}, not on --checkpoint {args.checkpoint}"
                   if same is False else f"corruption result {path} records no checkpoint, so it cannot be matched "
                                         f"to --checkpoint {args.checkpoint}")
        if not explicit:
            raise EvalError(f"{problem}. Run `fastdinov2 eval corruption --checkpoint {args.checkpoint} --generate` "
                            "(or --corrupted-root DIR) first, compute the corruptions in this run with --generate / "
                            "--corrupted-root DIR, or pass a result explicitly with --corruption-result FILE")
        _warn(f"{problem}; using it because --corruption-result names it", warnings)
    if not explicit:
        print(f"grouping corruption accuracy by band from {path}")
    return path


def _patch_size(model: Any) -> int:
    return int(getattr(model, "patch_size", 0) or 0)


def image_size_for(args: argparse.Namespace, patch_size: int | None = None) -> int:
    """``--image-size``, else 64 on the embedded synthetic data (no ``--data``), else 224; a default is rounded
    to the nearest multiple of ``patch_size`` when given (64 -> 70 for patch 14; 224 stays 224)."""
    if args.image_size is not None:
        return int(args.image_size)
    size = EMBEDDED_IMAGE_SIZE if args.data is None else DEFAULT_IMAGE_SIZE
    return opt.patch_multiple(size, patch_size) if patch_size else size


def _model_image_size(args: argparse.Namespace, model: Any) -> int:
    """The eval size for ``knn``/``linear``: an explicit ``--image-size`` must be a multiple of the patch size."""
    patch = _patch_size(model)
    if args.image_size is not None:
        opt.check_patch_multiple(args.image_size, patch, "--image-size", args.checkpoint)
    return image_size_for(args, patch)


def _head_image_size(args: argparse.Namespace, model: Any, head: Any, head_file: Path) -> int:
    """The eval size for ``corruption``/``frequency``: ``--image-size`` or the head's, a multiple of the patch."""
    patch = _patch_size(model)
    if args.image_size is not None:
        opt.check_patch_multiple(args.image_size, patch, "--image-size", args.checkpoint)
        return int(args.image_size)
    size = int(head.image_size)
    if patch > 0 and size % patch:
        near = " or ".join(str(s) for s in opt.valid_sizes_near(size, patch))
        raise EvalError(f"linear head {head_file} was trained at image size {size}, which is not a multiple of the "
                        f"patch size {patch} of {args.checkpoint}; pass --image-size {near}")
    return size


def _common_config(args: argparse.Namespace, root: Path | None, image_size: int, device: Any) -> dict:
    """The options every result records: the size and device actually used, the resolved checkpoint."""
    from fastdinov2.eval.features import checkpoint_identity

    return {"data": None if root is None else str(root), "image_size": image_size,
            "batch_size": args.batch_size, "device": str(device), **checkpoint_identity(args.checkpoint)}


def run_knn_command(args: argparse.Namespace) -> int:
    """``fastdinov2 eval knn``."""
    from fastdinov2.eval.knn import evaluate_knn

    opt.refuse_torchrun("knn")
    out_path = check_output(args, "knn")
    opt.check_cache_dir(args.cache_dir)
    root = data_root(args.data)
    train, val = split_dir(root, "train"), split_dir(root, "val")
    model, dev = _load(args)
    size = _model_image_size(args, model)
    res = evaluate_knn(model, train, val, ks=args.ks, temperature=args.temperature, image_size=size,
                       batch_size=args.batch_size, num_workers=args.num_workers, device=dev,
                       progress=not args.no_progress, cache_dir=args.cache_dir, checkpoint=args.checkpoint)
    config = {**_common_config(args, root, size, dev), "ks": list(args.ks), "temperature": args.temperature}
    out = write_result(out_path, "knn", args.checkpoint, config, res)
    print(f"kNN (T={args.temperature}) on {res['num_test']} val images, {res['num_classes']} classes, "
          f"{res['num_train']} train images")
    print(f"{'k':>5s} {'top-1':>7s} {'top-5':>7s}")
    for k, v in res["ks"].items():
        print(f"{k:>5s} {v['top1']:7.2f} {v['top5']:7.2f}")
    print(f"best: k={res['best_k']} top-1 {res['top1']:.2f} top-5 {res['top5']:.2f}")
    print(f"wrote {out}")
    return 0


def _check_head_output(args: argparse.Namespace, out_path: Path) -> Path:
    """``--head-output`` (or its default beside ``--output``): a ``.safetensors`` file that can be written and
    whose ``.json`` description does not overwrite the result JSON."""
    explicit = args.head_output is not None
    head_path = Path(args.head_output) if explicit else head_path_for(out_path)
    what = "--head-output" if explicit else "head file (the default of --head-output)"
    opt.check_output_file(head_path, what, ".safetensors")
    sidecar = head_path.with_suffix(".json")
    if sidecar.is_dir():
        raise EvalError(f"{sidecar}, the description written beside {what} {head_path}, is a directory")
    if sidecar.resolve() == out_path.resolve():
        raise EvalError(f"{what} {head_path} would write its description to {sidecar}, the result file (--output); "
                        "choose another --head-output or --output")
    return head_path


def run_linear_command(args: argparse.Namespace) -> int:
    """``fastdinov2 eval linear``."""
    from fastdinov2.eval.linear import LEARNING_RATES, evaluate_linear

    opt.refuse_torchrun("linear")
    out_path = check_output(args, "linear")
    head_path = _check_head_output(args, out_path)
    opt.check_cache_dir(args.cache_dir)
    root = data_root(args.data)
    train = split_dir(root, "train")
    val = split_dir(root, "val") if not args.val_from_train or (root / "val").is_dir() else None
    lrs = args.learning_rates or list(LEARNING_RATES)
    model, dev = _load(args)
    size = _model_image_size(args, model)
    res = evaluate_linear(
        model, train, val, image_size=size, batch_size=args.batch_size, num_workers=args.num_workers,
        device=dev, learning_rates=lrs, n_last_blocks_list=args.n_last_blocks, epochs=args.epochs,
        iterations=args.iterations, head_batch_size=args.head_batch_size, val_from_train=args.val_from_train,
        val_fraction=args.val_fraction, seed=args.seed, head_path=head_path, checkpoint=args.checkpoint,
        cache_dir=args.cache_dir, progress=not args.no_progress,
    )
    config = {**_common_config(args, root, size, dev), "epochs": args.epochs, "iterations": args.iterations,
              "head_batch_size": args.head_batch_size, "learning_rates": lrs, "n_last_blocks": args.n_last_blocks,
              "poolings": ["cls", "cls+avgpool"], "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0,
              "schedule": "cosine", "augment": False, "val_from_train": args.val_from_train,
              "val_fraction": args.val_fraction if args.val_from_train else None, "seed": args.seed}
    out = write_result(out_path, "linear", args.checkpoint, config, res)
    b = res["best"]
    print(f"linear probe: {len(res['heads'])} heads, {res['num_train']} train images, selected on "
          f"{res['selection_split']} ({res['num_selection']} images)")
    top = sorted(res["heads"], key=lambda h: -h["selection_top1"])[:5]
    print(f"{'head':<32s} {'select':>7s} {'top-1':>7s} {'top-5':>7s}")
    for h in top:
        print(f"{h['name']:<32s} {h['selection_top1']:7.2f} {h['top1']:7.2f} {h['top5']:7.2f}")
    print(f"best: {b['name']} top-1 {b['top1']:.2f} ({res['evaluation_split']})")
    print(f"wrote {out} and {res['head_file']}")
    return 0


def _corruption_dirs(args: argparse.Namespace, root: Path | None) -> tuple[Path | None, Path | None]:
    """(val folder to corrupt with ``--generate``, clean val folder beside ``--corrupted-root``), checked now."""
    if args.corrupted_root is not None and not Path(args.corrupted_root).is_dir():
        raise EvalError(f"--corrupted-root {args.corrupted_root} is not a folder")
    generate_from = split_dir(root, "val") if args.generate and root is not None else None
    clean = split_dir(root, "val") if args.corrupted_root is not None and root is not None else None
    return generate_from, clean


def _run_corruption(args: argparse.Namespace, model: Any, dev: Any, head: Path, size: int,
                    dirs: tuple[Path | None, Path | None]) -> dict:
    from fastdinov2.eval.corruption import evaluate_corruption

    return evaluate_corruption(
        model, head, corrupted_root=args.corrupted_root, generate_from=dirs[0], clean_val_dir=dirs[1],
        corruptions=args.corruptions, severities=args.severities, image_size=size,
        corruption_size=args.corruption_size, max_per_class=args.max_per_class, batch_size=args.batch_size,
        num_workers=args.num_workers, device=dev, seed=args.seed, reference=getattr(args, "reference", None),
        progress=not args.no_progress,
    )


def run_corruption_command(args: argparse.Namespace) -> int:
    """``fastdinov2 eval corruption``."""
    from fastdinov2.eval.corruption import corruption_markdown, plot_corruption_heatmap, reference_accuracy

    opt.refuse_torchrun("corruption")
    out_path = check_output(args, "corruption", (".png", ".md"))
    # the clean val set comes from --data when generating, or when --data is given explicitly
    root = data_root(args.data) if args.generate or args.data is not None else None
    dirs = _corruption_dirs(args, root)
    if args.reference is not None:
        reference_accuracy(args.reference)  # a missing or malformed reference fails now, not after the work
    warnings: list[str] = []
    head_file, explicit = _head(args)
    head, head_info = _check_head(args, head_file, explicit, warnings)
    model, dev = _load(args)
    size = _head_image_size(args, model, head, head_file)
    res = _run_corruption(args, model, dev, head_file, size, dirs)
    res["head"].update(head_info)
    res["warnings"] = warnings
    res["heatmap"] = str(plot_corruption_heatmap(res, out_path.with_suffix(".png")))
    table = corruption_markdown(res)
    md = out_path.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    res["table"] = str(md)
    config = {**_common_config(args, root, size, dev), "head": str(head_file),
              "corrupted_root": args.corrupted_root, "generate": args.generate, "corruptions": args.corruptions,
              "severities": args.severities, "corruption_size": args.corruption_size if args.generate else None,
              "max_per_class": args.max_per_class, "seed": args.seed, "reference": args.reference}
    out = write_result(out_path, "corruption", args.checkpoint, config, res)
    print(table, end="")
    print(f"wrote {out}, {res['heatmap']} and {md}")
    return 0


def run_frequency_command(args: argparse.Namespace) -> int:
    """``fastdinov2 eval frequency``."""
    from fastdinov2.eval.frequency import evaluate_frequency, frequency_table, group_by_band, plot_frequency_curves

    opt.refuse_torchrun("frequency")
    out_path = check_output(args, "frequency", (".png",))
    root = data_root(args.data)
    val = split_dir(root, "val")
    computing = args.corrupted_root is not None or args.generate
    if computing and args.corruption_result is not None:
        raise EvalError("--corruption-result cannot be combined with --generate or --corrupted-root (they compute "
                        "the corruption accuracy in this run)")
    warnings: list[str] = []
    dirs = _corruption_dirs(args, root) if computing else (None, None)
    corruption_path = None if computing else _corruption_result(args, warnings)
    head_file, explicit = _head(args)
    head, head_info = _check_head(args, head_file, explicit, warnings)
    model, dev = _load(args)
    size = _head_image_size(args, model, head, head_file)
    res = evaluate_frequency(model, head_file, val, radii=args.radii, image_size=size,
                             max_per_class=args.max_per_class, batch_size=args.batch_size,
                             num_workers=args.num_workers, device=dev, seed=args.seed,
                             progress=not args.no_progress)
    source: str | None = None
    if computing:
        res["bands"] = group_by_band({"results": _run_corruption(args, model, dev, head_file, size, dirs)})
        source = str(args.corrupted_root) if args.corrupted_root is not None else "generated"
    else:
        res["bands"] = group_by_band(corruption_path) if corruption_path is not None else None
        source = None if corruption_path is None else str(corruption_path)
    res["corruption_source"] = source
    res["head"].update(head_info)
    res["warnings"] = warnings
    res["curves"] = str(plot_frequency_curves(res, out_path.with_suffix(".png")))
    config = {**_common_config(args, root, size, dev), "head": str(head_file), "radii": args.radii,
              "max_per_class": args.max_per_class, "seed": args.seed, "corruption_source": source}
    out = write_result(out_path, "frequency", args.checkpoint, config, res)
    print(frequency_table(res))
    print(f"wrote {out} and {res['curves']}")
    return 0
