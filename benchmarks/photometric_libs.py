"""Batched DINOv2 photometric augmentation: our torch ops (dense and subset paths) vs the closest kornia pipeline.

One timed call augments one DINOv2 batch of ``B`` samples: ``2B`` global crops at ``G`` px and ``nL*B`` local
crops at ``L`` px, uint8 in, ImageNet-normalised float32 out, every crop with its own random parameters:

- ``ours_dense``: :func:`fastdinov2.data.photometric.apply_photometric` with ``dense=True`` (every op for every
  crop, selected per crop with ``torch.where``; the default off the CPU), one call per crop size;
- ``ours_subset``: the same with ``dense=False`` (each op on the crops that drew it; the CPU default);
- ``kornia``: ``kornia.augmentation.AugmentationSequential`` of ``ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)``
  (torchvision's formulas), ``RandomGrayscale(p=0.2)``, ``RandomGaussianBlur`` (the kernel size and sigma range
  ours uses at this resolution, reflect padding), ``RandomSolarize`` (threshold 128/255, no addition; global
  crop 2 only), ``Normalize``; built once per crop kind (kornia's ``p`` is one number per transform, and the blur
  and solarize probabilities differ between global crop 1, global crop 2 and the local crops), so a batch is
  three calls plus the concatenation of the two global halves, after ``uint8 -> float / 255`` (kornia takes
  float images only). Parameters are drawn per sample (``same_on_batch=False``) on the host by kornia, inside
  the timed call; ours are drawn in the loader workers, so their cost is reported apart (``ours_param_draw``).

Per size and variant: ms per batch and per sample (median of ``--rounds`` after ``--warmup``; process CPU time
and wall time on the CPU, wall time with CUDA synchronisation around each call on a GPU), the number of ATen
operators one call dispatches (a proxy for kernel launches on a GPU) and the number of host reads of device
values in one call. On the CPU these are counted with a ``TorchFunctionMode`` recorder
(the calls of ``tests/test_train_sync_free.py``'s ``SyncRecorder``) that also follows which tensors derive from
the crops (and, for ours, from the per-crop parameters, which live on the device there): reads of such tensors
would synchronise on a GPU (``device_reads``); reads of host-only tensors (kornia's CPU-drawn parameters, our
blur kernel size) would not (``host_reads``). On a GPU they are counted by ``torch.cuda.set_sync_debug_mode``.

Two checks that the kornia pipeline is a fair equivalent (per size, on the same device): ``formula``: each op
of ours and kornia's functional op on the same crops with the same per-crop factors (largest absolute
difference, [0, 1] scale); ``stats``: per crop kind and channel, the mean and std of the normalised output
pixels and the std over crops of the per-crop mean, each over ``--check-repeats`` independent draws on the same
input crops, for both libraries (randomness differs, so statistics are compared, not pixels).

Input crops are synthetic but image-like (a smooth random colour field plus fine texture), the same for all
variants. Without kornia installed the script reports ours only and says kornia is missing.

Examples::

    .venv/bin/python benchmarks/photometric_libs.py --device cpu --threads 1
    python benchmarks/photometric_libs.py --device cuda --rounds 10
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    machine_info,
    non_negative_int,
    positive_int,
    run_benchmark,
    set_threads,
    size_pair,
    size_pairs,
)
from fastdinov2.data import photometric as ph  # noqa: E402
from fastdinov2.data.photometric import PhotometricParams, apply_photometric  # noqa: E402

VARIANTS = ("ours_dense", "ours_subset", "kornia", "ours_dense_compiled")
KINDS = ("global1", "global2", "local")

# The calls of tests/test_train_sync_free.py's SyncRecorder that read a tensor back to the host.
SYNCING = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero", "numpy", "unique",
           "masked_select", "_local_scalar_dense", "argwhere", "nonzero_static"}
FACTORIES = {"tensor", "as_tensor", "new_tensor", "from_numpy"}  # host data -> a blocking copy on a GPU


def kornia_or_reason() -> tuple[Any, str | None]:
    """(``kornia.augmentation``, None), or (None, why it cannot be used)."""
    try:
        import kornia.augmentation as ka
    except Exception as exc:  # ImportError, or a kornia_rs wheel built for another Python
        return None, f"kornia is not usable here ({type(exc).__name__}: {exc})"
    return ka, None


# ---------------------------------------------------------------------------------------------------
# inputs


def synthetic_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` image-like uint8 crops ``[n,3,size,size]``: a smooth random colour field plus luma and colour grain."""
    g = torch.Generator().manual_seed(seed)
    cells = max(2, size // 24)
    coarse = torch.rand(n, 3, cells, cells, generator=g)
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.05 * torch.randn(n, 1, size, size, generator=g) + 0.025 * torch.randn(n, 3, size, size, generator=g)
    return img.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def draw_params(batch: int, n_local: int, g_scale: float, l_scale: float, seed: int) -> tuple[PhotometricParams, ...]:
    """Crop-major per-crop parameters of one batch, drawn as the dataset draws them (one generator per sample)."""
    gp, lp = [], []
    for k in range(batch):
        rng = np.random.default_rng([seed, k])
        gp.append(ph.sample_crops_photometric_params(rng, ["global1", "global2"], [g_scale, g_scale]))
        lp.append(ph.sample_photometric_params(rng, n_local, "local", l_scale))
    return PhotometricParams.stack_crop_major(gp), PhotometricParams.stack_crop_major(lp)


def kornia_pipelines(ka: Any, g_scale: float, l_scale: float) -> dict[str, Any]:
    """One ``AugmentationSequential`` per crop kind, with DINOv2's probabilities and our blur size/sigma."""
    gray_w = torch.tensor(ph._GRAY_WEIGHTS)  # torchvision's luma weights (kornia's default is 0.299, 0.587, 0.114)

    def build(kind: str, scale: float) -> Any:
        ops = [ka.ColorJitter(ph.BRIGHTNESS, ph.CONTRAST, ph.SATURATION, ph.HUE, p=ph.P_JITTER),
               ka.RandomGrayscale(rgb_weights=gray_w, p=ph.P_GRAYSCALE)]
        k = ph.blur_kernel_size(scale)
        lo, hi = ph.BLUR_SIGMA
        if ph.P_BLUR[kind] > 0:
            ops.append(ka.RandomGaussianBlur((k, k), (lo * scale, hi * scale), border_type="reflect",
                                             p=ph.P_BLUR[kind]))
        if ph.P_SOLARIZE[kind] > 0:
            t = ph.SOLARIZE_THRESHOLD
            ops.append(ka.RandomSolarize(thresholds=(t, t), additions=(0.0, 0.0), p=ph.P_SOLARIZE[kind]))
        ops.append(ka.Normalize(mean=torch.tensor(ph.IMAGENET_MEAN), std=torch.tensor(ph.IMAGENET_STD)))
        return ka.AugmentationSequential(*ops, data_keys=["input"])

    return {"global1": build("global1", g_scale), "global2": build("global2", g_scale),
            "local": build("local", l_scale)}


def kornia_batch(pipes: dict[str, Any], g: torch.Tensor, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kornia pipeline on one batch: uint8 -> float, three calls, global halves concatenated."""
    b = g.shape[0] // 2
    gf = g.float().div_(255.0)
    out_g = torch.cat([pipes["global1"](gf[:b]), pipes["global2"](gf[b:])])
    return out_g, pipes["local"](loc.float().div_(255.0))


# ---------------------------------------------------------------------------------------------------
# host-read counting


class SyncTracer(TorchFunctionMode):
    """Records calls that read a tensor back to the host, split by whether the tensor derives from a seeded
    ("device") tensor: outputs of any call with a device input are device tensors too."""

    def __init__(self, seeds: list[torch.Tensor]) -> None:
        super().__init__()
        self._dev: dict[int, weakref.ref] = {}
        for t in seeds:
            self._mark(t)
        self.device_reads: list[str] = []
        self.host_reads: list[str] = []

    def _mark(self, t: torch.Tensor) -> None:
        self._dev[id(t)] = weakref.ref(t)

    def _is_dev(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._dev.get(id(t))
        return ref is not None and ref() is t

    def _tensors(self, obj: Any) -> list[Any]:
        if isinstance(obj, (list, tuple)):
            return [x for o in obj for x in self._tensors(o)]
        if isinstance(obj, dict):
            return [x for o in obj.values() for x in self._tensors(o)]
        return [obj] if isinstance(obj, torch.Tensor) else []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = self._tensors(list(args)) + self._tensors(kwargs)
        dev = any(self._is_dev(t) for t in inputs)
        label = None
        if name in SYNCING:
            label = name
        elif name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                label = "__getitem__[bool mask]"
                dev = any(self._is_dev(i) for i in index)  # the mask's size is what the host must read
        elif name in FACTORIES and "device" in kwargs:
            label, dev = f"{name}(device=...)", True  # host data copied to the (device) image's device
        if label is not None:
            (self.device_reads if dev else self.host_reads).append(label)
        out = func(*args, **kwargs)
        if dev or any(self._is_dev(t) for t in inputs):
            for t in self._tensors(out):
                self._mark(t)
        return out


def count_reads_cpu(fn: Callable[[], Any], seeds: list[torch.Tensor]) -> dict[str, Any]:
    with SyncTracer(seeds) as rec:
        fn()
    return {"method": "TorchFunctionMode", "device_reads": len(rec.device_reads),
            "host_reads": len(rec.host_reads), "device_read_calls": summarize_calls(rec.device_reads),
            "host_read_calls": summarize_calls(rec.host_reads)}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators one call dispatches (views included): a proxy for kernel launches on a GPU;
    and the bytes of the tensors they take and return, views left out (memory traffic, an estimate of what
    the kernels stream: a broadcast input counts at its own size)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, tuple | list) else [out])]
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


def count_ops(fn: Callable[[], Any]) -> tuple[int, int]:
    """(ATen operators, bytes of their non-view inputs and outputs) of one call of ``fn``."""
    with OpCounter() as c:
        fn()
    return c.n, c.bytes


def count_syncs_cuda(fn: Callable[[], Any]) -> dict[str, Any]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the first switch to debug mode warns that the mode is a prototype ("Synchronization debug mode is a
    # prototype feature"): not a sync (the H100 JSON counted it as one device read at the first size)
    msgs = [str(w.message).splitlines()[0] for w in caught
            if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)]
    return {"method": "torch.cuda.set_sync_debug_mode", "device_reads": len(msgs),
            "device_read_calls": summarize_calls(msgs)}


def summarize_calls(calls: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in calls:
        out[c] = out.get(c, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------------
# timing


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, rounds: int) -> dict[str, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(rounds):
        sync()
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_ms": statistics.median(cpu) * 1e3, "wall_ms": statistics.median(wall) * 1e3}


# ---------------------------------------------------------------------------------------------------
# equivalence checks


def formula_check(ka: Any, x8: torch.Tensor, scale: float, seed: int) -> dict[str, float]:
    """Largest |ours - kornia| per op on the same crops with the same per-crop factors ([0, 1] scale)."""
    import kornia.enhance as ke
    import kornia.filters as kf

    n = x8.shape[0]
    x = x8.float() / 255.0
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=g)).to(x.device)

    b, c, s, h = u(0.6, 1.4), u(0.6, 1.4), u(0.8, 1.2), u(-0.1, 0.1)
    k = ph.blur_kernel_size(scale)
    sig = u(0.1 * scale, 2.0 * scale)
    gw = torch.tensor(ph._GRAY_WEIGHTS, device=x.device)
    pairs = {
        "brightness": (ph.adjust_brightness(x, b), ke.adjust_brightness_accumulative(x, b)),
        "contrast": (ph.adjust_contrast(x, c), ke.adjust_contrast_with_mean_subtraction(x, c)),
        "saturation": (ph.adjust_saturation(x, s), ke.adjust_saturation_with_gray_subtraction(x, s)),
        "hue": (ph.adjust_hue(x, h), ke.adjust_hue(x, h * 2 * math.pi)),
        "grayscale": (ph._grayscale(x), ka.RandomGrayscale(rgb_weights=gw.cpu(), p=1.0)(x)),
        "blur": (ph.gaussian_blur(x, sig, k), kf.gaussian_blur2d(x, (k, k), sig.view(-1, 1).expand(-1, 2),
                                                                  border_type="reflect")),
        "solarize": (ph._solarize(x), ke.solarize(x, ph.SOLARIZE_THRESHOLD)),
    }
    return {name: float((a - bb).abs().max()) for name, (a, bb) in pairs.items()}


def output_stats(out: torch.Tensor) -> dict[str, list[float]]:
    """Per channel: mean and std of all pixels, and the std over crops of the per-crop mean."""
    x = out.double()
    per_crop = x.mean(dim=(2, 3))  # [n, 3]
    return {"mean": x.mean(dim=(0, 2, 3)).tolist(), "std": x.std(dim=(0, 2, 3)).tolist(),
            "crop_mean_std": per_crop.std(dim=0).tolist()}


def stats_check(
    ka: Any, g: torch.Tensor, loc: torch.Tensor, n_local: int, g_scale: float, l_scale: float,
    repeats: int, device: torch.device,
) -> dict[str, Any]:
    """Output statistics per library, crop kind and channel: mean over ``repeats`` draws and their spread."""
    b = g.shape[0] // 2
    runs: dict[str, list[dict[str, dict[str, list[float]]]]] = {"ours": [], "kornia": []}
    pipes = kornia_pipelines(ka, g_scale, l_scale) if ka is not None else None
    for r in range(repeats):
        gp, lp = draw_params(b, n_local, g_scale, l_scale, seed=1000 + r)
        og = apply_photometric(g, gp.to(device))
        ol = apply_photometric(loc, lp.to(device))
        runs["ours"].append({"global1": output_stats(og[:b]), "global2": output_stats(og[b:]),
                             "local": output_stats(ol)})
        if pipes is not None:
            torch.manual_seed(2000 + r)
            kg, kl = kornia_batch(pipes, g, loc)
            runs["kornia"].append({"global1": output_stats(kg[:b]), "global2": output_stats(kg[b:]),
                                   "local": output_stats(kl)})
    out: dict[str, Any] = {"repeats": repeats}
    for lib, rs in runs.items():
        if not rs:
            continue
        out[lib] = {
            kind: {
                stat: {
                    "mean": [statistics.fmean(r[kind][stat][c] for r in rs) for c in range(3)],
                    "sd": [statistics.stdev([r[kind][stat][c] for r in rs]) if len(rs) > 1 else 0.0
                           for c in range(3)],
                }
                for stat in ("mean", "std", "crop_mean_std")
            }
            for kind in KINDS
        }
    if "kornia" in out:  # largest |ours - kornia| in units of the standard error of the difference
        z = 0.0
        for kind in KINDS:
            for stat in ("mean", "std", "crop_mean_std"):
                for c in range(3):
                    a, k = out["ours"][kind][stat], out["kornia"][kind][stat]
                    se = math.sqrt((a["sd"][c] ** 2 + k["sd"][c] ** 2) / repeats) or 1e-12
                    z = max(z, abs(a["mean"][c] - k["mean"][c]) / se)
        out["max_abs_z"] = z
    return out


# ---------------------------------------------------------------------------------------------------


def bench_size(args: argparse.Namespace, gsz: int, lsz: int, device: torch.device, ka: Any) -> dict[str, Any]:
    fg, fl = args.full
    g_scale, l_scale = gsz / fg, lsz / fl
    b, n_local = args.batch_size, args.local_crops
    g = synthetic_crops(2 * b, gsz, seed=1).to(device)
    loc = synthetic_crops(n_local * b, lsz, seed=2).to(device)
    gp_h, lp_h = draw_params(b, n_local, g_scale, l_scale, seed=0)
    gp, lp = gp_h.to(device), lp_h.to(device)
    fns: dict[str, Callable[[], Any]] = {
        "ours_dense": lambda: (apply_photometric(g, gp, dense=True), apply_photometric(loc, lp, dense=True)),
        "ours_subset": lambda: (apply_photometric(g, gp, dense=False), apply_photometric(loc, lp, dense=False)),
    }
    if args.compile:  # the dense path as the trainer runs it with compute.compile on CUDA (compiled in warm-up)
        dense_fn = ph.compiled_dense_fn()
        fns["ours_dense_compiled"] = lambda: (apply_photometric(g, gp, dense=True, dense_fn=dense_fn),
                                              apply_photometric(loc, lp, dense=True, dense_fn=dense_fn))
    if ka is not None:
        pipes = kornia_pipelines(ka, g_scale, l_scale)
        fns["kornia"] = lambda: kornia_batch(pipes, g, loc)
    rows = []
    for name, fn in fns.items():
        t = time_calls(fn, device, args.warmup, args.rounds)
        ms = t["cpu_ms"] if device.type == "cpu" else t["wall_ms"]
        compiled = name.endswith("_compiled")
        if device.type == "cuda":
            reads = count_syncs_cuda(fn)
        elif compiled:  # a torch function mode around a compiled call makes dynamo trace the mode itself
            reads = {"method": None, "device_reads": None}
        else:
            seeds = [g, loc] + ([] if name == "kornia" else
                                [v for p in (gp, lp) for f, v in vars(p).items() if f != "blur_kernel_size"])
            reads = count_reads_cpu(fn, seeds)
        # operators are counted by a function mode too: not for the compiled call (its kernels are fused anyway)
        ops, traffic = (None, None) if compiled else count_ops(fn)
        rows.append({"variant": name, **t, "ms_per_batch": ms, "ms_per_sample": ms / b,
                     "aten_ops": ops, "aten_gb": None if traffic is None else traffic / 1e9, **reads})

    def draw() -> None:  # what the loader workers do for ours (B samples' draws, collation, transfer)
        a, c = draw_params(b, n_local, g_scale, l_scale, seed=5)
        a.to(device, non_blocking=True), c.to(device, non_blocking=True)

    t = time_calls(draw, device, 1, args.rounds)
    res: dict[str, Any] = {
        "global_size": gsz, "local_size": lsz, "resolution_scale": [g_scale, l_scale],
        "blur_kernel": [ph.blur_kernel_size(g_scale), ph.blur_kernel_size(l_scale)], "rows": rows,
        "ours_param_draw": {"ms_per_batch": t["cpu_ms"], "ms_per_sample": t["cpu_ms"] / b},
    }
    if ka is not None and args.check_repeats > 0:
        cb = args.check_batch
        res["formula"] = {"global": formula_check(ka, g[: 2 * cb], g_scale, 7),
                          "local": formula_check(ka, loc[: n_local * cb], l_scale, 8)}
    if args.check_repeats > 0:
        cb = args.check_batch
        res["stats"] = stats_check(ka, torch.cat([g[:cb], g[b: b + cb]]), loc[: n_local * cb], n_local,
                                   g_scale, l_scale, args.check_repeats, device)
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.check_batch = min(args.check_batch, args.batch_size)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    threads = set_threads(args.threads)
    ka, missing = (None, "--no-kornia") if args.no_kornia else kornia_or_reason()
    results = [bench_size(args, gs, ls, device, ka) for gs, ls in args.sizes]
    versions: dict[str, str | None] = {"torch": str(torch.__version__)}
    for pkg in ("kornia", "kornia_rs"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "benchmark": "photometric_libs",
        "device": str(device),
        "threads": threads,
        "batch": args.batch_size,
        "local_crops": args.local_crops,
        "full_sizes": list(args.full),
        "rounds": args.rounds,
        "kornia_missing": missing,
        "versions": versions,
        "sizes": results,
        "machine": machine_info(device),
    }


def print_readable(out: dict[str, Any]) -> None:
    m = out["machine"]
    clock = "process CPU time" if out["device"] == "cpu" else "wall time, synchronised"
    print(f"photometric libs on {out['device']} ({m.get('gpu_name') or m['cpu_model']}), {out['threads']} thread(s), "
          f"B={out['batch']} (2B global + {out['local_crops']}B local crops), median of {out['rounds']}, {clock}, "
          f"load {m['loadavg_1_5_15']}; kornia {out['versions']['kornia']}")
    if out["kornia_missing"]:
        print(f"  kornia not timed: {out['kornia_missing']}")
    for s in out["sizes"]:
        print(f"  {s['global_size']}/{s['local_size']} (blur kernel {s['blur_kernel'][0]}/{s['blur_kernel'][1]}):")
        for r in s["rows"]:
            host = f", {r['host_reads']} host-only" if "host_reads" in r else ""
            print(f"    {r['variant']:<12} {r['ms_per_batch']:9.2f} ms/batch {r['ms_per_sample']:8.3f} ms/sample "
                  f"(wall {r['wall_ms']:.2f} ms), {r['aten_ops']} aten ops"
                  + (f" moving {r['aten_gb']:.2f} GB" if r.get("aten_gb") is not None else "")
                  + ", host reads of device values: "
                  f"{r['device_reads']}{host}")
        d = s["ours_param_draw"]
        print(f"    ours: parameter draw in the workers {d['ms_per_batch']:.2f} ms/batch "
              f"({d['ms_per_sample']:.3f} ms/sample, host CPU)")
        if "formula" in s:
            f = {k: max(s["formula"]["global"][k], s["formula"]["local"][k]) for k in s["formula"]["global"]}
            print("    same factors, max |ours - kornia|: " + ", ".join(f"{k} {v:.1e}" for k, v in f.items()))
        if "stats" in s:
            st = s["stats"]
            for kind in KINDS:
                for lib in ("ours", "kornia"):
                    if lib not in st:
                        continue
                    v = st[lib][kind]
                    print(f"    {kind:<8} {lib:<6} mean {_fmt(v['mean'])} std {_fmt(v['std'])} "
                          f"crop-mean std {_fmt(v['crop_mean_std'])}")
            if "max_abs_z" in st:
                print(f"    largest |ours - kornia| / standard error over {st['repeats']} draws: {st['max_abs_z']:.2f}")


def _fmt(v: dict[str, list[float]]) -> str:
    return "[" + " ".join(f"{m:+.3f}±{s:.3f}" for m, s in zip(v["mean"], v["sd"])) + "]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=non_negative_int, default=1, help="torch CPU threads (0: all cores)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch (B)")
    p.add_argument("--local-crops", type=positive_int, default=8, help="local crops per sample")
    p.add_argument("--sizes", type=size_pairs, default="224/96,112/48", help="comma-separated GLOBAL/LOCAL crop sizes")
    p.add_argument("--full", default="224/96", type=size_pair,
                   help="full-resolution GLOBAL/LOCAL sizes (blur kernel and sigma scale with size / full)")
    p.add_argument("--rounds", type=positive_int, default=5, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls per variant first (0: none)")
    p.add_argument("--check-batch", type=positive_int, default=16, help="samples of the equivalence checks")
    p.add_argument("--check-repeats", type=non_negative_int, default=4,
                   help="independent draws per library (0: no checks)")
    p.add_argument("--no-kornia", action="store_true", help="time ours only")
    p.add_argument("--compile", action="store_true",
                   help="also time the dense path compiled with torch.compile (inductor; compiled during warm-up)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
