"""Cost of the CPU-side data pipeline per curriculum stage: images/s per CPU core of one sample.

Generates ``--n-images`` deterministic JPEGs (natural-looking: a smooth random field plus texture and
edges, quality 90) into a temporary directory, then times ``PretrainDataset.__getitem__`` in this one
process with torch limited to 1 thread, as in a data-loader worker, for every stage of the preset x
low-pass method (resize, fourier, jpeg_draft) x ``photometric_on`` (worker: colour ops in the sample;
device: uint8 crops, colour ops deferred). It also times the decode alone, and ``apply_photometric`` on
a whole batch (CPU with ``--photometric-threads``, and CUDA when present), i.e. the cost
``photometric_on=device`` moves off the worker.

Per-core throughput is ``1 / (process CPU time per sample)``, the median over ``--rounds`` rounds; wall
time is reported too (CPU time is the more robust one on a shared machine). Image size: ``auto`` is
500x375 (ImageNet-like) for presets whose full global crop is >= 128 px, 96x96 (the embedded dataset's
size) otherwise.

Examples::

    .venv/bin/python benchmarks/data_pipeline.py --config fastdinov2_vits16_in100
    .venv/bin/python benchmarks/data_pipeline.py --config fastdinov2_tiny --image-size 500x375
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, non_negative_int, positive_int, run_benchmark, set_threads  # noqa: E402
from fastdinov2.config import LOWPASS_METHODS, Config, load_config  # noqa: E402
from fastdinov2.data import lowpass  # noqa: E402
from fastdinov2.data.augment import sample_rngs  # noqa: E402
from fastdinov2.data.datasets import ImageRecord  # noqa: E402
from fastdinov2.data.lowpass import decode_image  # noqa: E402
from fastdinov2.data.photometric import PhotometricParams, apply_photometric, sample_photometric_params  # noqa: E402
from fastdinov2.data.pretrain import PretrainDataset  # noqa: E402

#: The smallest side :func:`write_jpegs` draws its 8-px-and-larger rectangles in (``height // 2 > 8``).
MIN_IMAGE_SIDE = 18


def write_jpegs(root: Path, n: int, width: int, height: int, seed: int = 0, quality: int = 90) -> list[Path]:
    """``n`` deterministic ``width x height`` RGB JPEGs: smooth colour field + fine texture + a few edges."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"write_jpegs: {width}x{height} is smaller than {MIN_IMAGE_SIDE} px on a side")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        coarse = (rng.random((max(2, height // 40), max(2, width // 40), 3)) * 255).astype(np.uint8)
        img = np.asarray(
            Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32
        )
        img += rng.normal(0.0, 12.0, (height, width, 1)) + rng.normal(0.0, 6.0, (height, width, 3))
        for _ in range(4):  # a few flat rectangles: sharp edges, as objects in photos
            y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
            y1, x1 = y0 + rng.integers(8, height // 2), x0 + rng.integers(8, width // 2)
            img[y0:y1, x0:x1] = 0.5 * img[y0:y1, x0:x1] + 0.5 * rng.random(3) * 255
        path = root / f"img_{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def _time_per_item(fn: Any, n: int, rounds: int) -> tuple[float, float]:
    """Median over rounds of (CPU seconds, wall seconds) per call of ``fn(i)`` for i in range(n)."""
    cpu, wall = [], []
    for r in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n):
            fn(r * n + i)
        cpu.append((time.process_time() - c0) / n)
        wall.append((time.perf_counter() - w0) / n)
    return statistics.median(cpu), statistics.median(wall)


def stage_cfg(base: str, overrides: list[str], stage: int, lowpass: str) -> Config:
    return load_config(base, [*overrides, f"curriculum.stages.{stage}.lowpass={lowpass}"])


def bench_samples(
    cfg: Config, records: list[ImageRecord], stage: int, mode: str, rounds: int
) -> dict[str, Any]:
    ds = PretrainDataset(records, cfg, seed=0, photometric_on=mode)  # type: ignore[arg-type]
    n = len(records)
    ds[(0, 10**6, stage)]  # warm caches / lazy imports
    cpu, wall = _time_per_item(lambda k: ds[(k % n, k, stage)], n, rounds)
    return {"cpu_ms": cpu * 1e3, "wall_ms": wall * 1e3, "img_per_s_per_core": 1.0 / cpu}


def bench_decode(cfg: Config, paths: list[Path], stage: int, rounds: int) -> dict[str, Any]:
    st, crops = cfg.curriculum.stages[stage], cfg.crops
    ratio = max(st.global_size / crops.global_crops_size, st.local_size / crops.local_crops_size)
    n = len(paths)
    decode_image(paths[0], st.lowpass, ratio)  # untimed, as in bench_samples: lazy imports, decoder start-up
    cpu, wall = _time_per_item(
        lambda k: decode_image(paths[k % n], st.lowpass, ratio), n, rounds  # fully decoded either way
    )
    return {"cpu_ms": cpu * 1e3, "wall_ms": wall * 1e3}


def photometric_batch(cfg: Config, stage: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """uint8 crops and crop-major parameters of one batch of ``stage`` (random pixels, real draws)."""
    st, crops = cfg.curriculum.stages[stage], cfg.crops
    n_local = crops.local_crops_number
    g_scale, l_scale = st.global_size / crops.global_crops_size, st.local_size / crops.local_crops_size
    gp, lp = [], []
    for k in range(batch):
        prng = sample_rngs(seed, k).photometric
        gp.append(
            PhotometricParams.cat(
                [
                    sample_photometric_params(prng, 1, "global1", g_scale),
                    sample_photometric_params(prng, 1, "global2", g_scale),
                ]
            )
        )
        lp.append(sample_photometric_params(prng, n_local, "local", l_scale))
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(
        0, 256, (2 * batch, 3, st.global_size, st.global_size), generator=gen, dtype=torch.uint8
    )
    loc = torch.randint(
        0, 256, (n_local * batch, 3, st.local_size, st.local_size), generator=gen, dtype=torch.uint8
    )
    return g, PhotometricParams.stack_crop_major(gp), loc, PhotometricParams.stack_crop_major(lp)  # type: ignore[return-value]


def bench_photometric(
    cfg: Config, stage: int, batch: int, device: torch.device, rounds: int
) -> dict[str, Any]:
    g, gp, loc, lp = photometric_batch(cfg, stage, batch)
    g, loc, gp, lp = g.to(device), loc.to(device), gp.to(device), lp.to(device)

    def once() -> None:
        apply_photometric(g, gp)
        apply_photometric(loc, lp)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        once()
    times = []
    for _ in range(max(3, rounds)):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {
        "device": str(device),
        "batch": batch,
        "ms_per_batch": ms,
        "ms_per_sample": ms / batch,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


DECODERS = ("auto", "pillow", "torchcodec")


@contextlib.contextmanager
def jpeg_decoder_as(name: str) -> Iterator[None]:
    """Full-size JPEG decoding by ``name``: "auto" (the library's choice), "pillow" or "torchcodec"."""
    real = lowpass.jpeg_decoder
    if name == "torchcodec" and real() is None:
        raise SystemExit("--decoders torchcodec: torchcodec cannot be loaded here")
    if name == "pillow":
        lowpass.jpeg_decoder = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        lowpass.jpeg_decoder = real  # type: ignore[assignment]


def used_decoder(name: str) -> str:
    """The decoder that "auto" resolves to here (torchcodec when it loads)."""
    if name != "auto":
        return name
    return "torchcodec" if lowpass.jpeg_decoder() is not None else "pillow"


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    set_threads(1)  # a data-loader worker: one core, torch single-threaded
    base = load_config(args.config, args.overrides)
    if args.image_size == "auto":
        w, h = (500, 375) if base.crops.global_crops_size >= 128 else (96, 96)
    else:
        w, h = args.image_size
    methods = LOWPASS_METHODS if args.lowpass == "all" else tuple(args.lowpass.split(","))
    for m in methods:
        if m not in LOWPASS_METHODS:
            raise SystemExit(f"--lowpass: {m!r} is not one of {', '.join(LOWPASS_METHODS)}")
    decoders = tuple(args.decoders.split(","))
    for d in decoders:
        if d not in DECODERS:
            raise SystemExit(f"--decoders: {d!r} is not one of {', '.join(DECODERS)}")
    rows: list[dict[str, Any]] = []
    photometric: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastdinov2_bench_") as tmp:
        paths = write_jpegs(Path(tmp), args.n_images, w, h)
        records = [ImageRecord(p, 0) for p in paths]
        for stage, st in enumerate(base.curriculum.stages):
            full = (st.global_size, st.local_size) == (
                base.crops.global_crops_size,
                base.crops.local_crops_size,
            )
            # At full size the three methods are the same code path (no FFT, no draft): time it once.
            for method in (st.lowpass,) if full else methods:
                cfg = stage_cfg(args.config, args.overrides, stage, method)
                for decoder in decoders:  # side by side, same images, same process
                    with jpeg_decoder_as(decoder):
                        dec = bench_decode(cfg, paths, stage, args.rounds)
                        for mode in ("worker", "device"):
                            r = bench_samples(cfg, records, stage, mode, args.rounds)
                            rows.append(
                                {
                                    "stage": st.name,
                                    "global_size": st.global_size,
                                    "local_size": st.local_size,
                                    "lowpass": method,
                                    "noise": st.noise.kind,
                                    "photometric_on": mode,
                                    "decoder": used_decoder(decoder),
                                    "decode_cpu_ms": dec["cpu_ms"],
                                    **r,
                                }
                            )
            set_threads(args.photometric_threads)
            photometric.append(
                {
                    "stage": st.name,
                    "global_size": st.global_size,
                    "local_size": st.local_size,
                    **bench_photometric(base, stage, args.batch_size, torch.device("cpu"), args.rounds),
                }
            )
            if torch.cuda.is_available() and not args.no_cuda:
                photometric.append(
                    {
                        "stage": st.name,
                        "global_size": st.global_size,
                        "local_size": st.local_size,
                        **bench_photometric(base, stage, args.batch_size, torch.device("cuda"), args.rounds),
                    }
                )
            set_threads(1)
    return {
        "benchmark": "data_pipeline",
        "config": args.config,
        "overrides": args.overrides,
        "image_size": [w, h],
        "n_images": args.n_images,
        "rounds": args.rounds,
        "local_crops_number": base.crops.local_crops_number,
        "samples": rows,
        "photometric_batched": photometric,
        "loadavg_start": load_start,
        "machine": machine_info(
            torch.device("cuda") if torch.cuda.is_available() and not args.no_cuda else None
        ),
    }


def print_readable(out: dict[str, Any]) -> None:
    m = out["machine"]
    w, h = out["image_size"]
    print(
        f"data pipeline: {out['config']}, {w}x{h} JPEGs, one core of {m['cpu_model']}, "
        f"load {m['loadavg_1_5_15']}"
    )
    print(
        f"  {'stage':<16} {'sizes':>8} {'lowpass':<10} {'noise':<8} {'mode':<7} {'decoder':<10} {'decode':>8} "
        f"{'sample':>9} {'img/s/core':>10}"
    )
    for r in out["samples"]:
        print(
            f"  {r['stage']:<16} {r['global_size']:>4}/{r['local_size']:<3} {r['lowpass']:<10} "
            f"{r['noise']:<8} {r['photometric_on']:<7} {r['decoder']:<10} {r['decode_cpu_ms']:6.2f}ms "
            f"{r['cpu_ms']:7.2f}ms {r['img_per_s_per_core']:10.1f}"
        )
    for p in out["photometric_batched"]:
        thr = f", {p['threads']} thread(s)" if p["threads"] else ""
        print(
            f"  apply_photometric batched on {p['device']}{thr}: {p['global_size']}/{p['local_size']} "
            f"B={p['batch']}: "
            f"{p['ms_per_batch']:.2f} ms/batch = {p['ms_per_sample']:.3f} ms/sample"
        )


def image_size(text: str) -> str | tuple[int, int]:
    """``--image-size``: ``auto`` or ``WIDTHxHEIGHT``, each side at least :data:`MIN_IMAGE_SIDE` px."""
    if text == "auto":
        return text
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 500x375) or 'auto'") from None
    if min(w, h) < MIN_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"{text}: each side must be at least {MIN_IMAGE_SIDE} px")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="fastdinov2_tiny", help="preset name or YAML file")
    p.add_argument("--image-size", type=image_size, default="auto",
                   help=f"WIDTHxHEIGHT of the generated JPEGs (sides >= {MIN_IMAGE_SIDE}), or 'auto'")
    p.add_argument("--n-images", type=positive_int, default=24, help="generated JPEGs (samples per round)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timing rounds (median reported)")
    p.add_argument("--lowpass", default="all", help="'all' or comma-separated low-pass methods")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch of the batched photometric timing")
    p.add_argument(
        "--photometric-threads", type=non_negative_int, default=1,
        help="CPU threads of the batched photometric (0: all cores)"
    )
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA photometric timing")
    p.add_argument("--decoders", default="auto",
                   help="comma-separated full-size JPEG decoders to time side by side: auto, pillow, torchcodec")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_benchmark(build_parser(), argv, run, print_readable)


if __name__ == "__main__":
    main()
