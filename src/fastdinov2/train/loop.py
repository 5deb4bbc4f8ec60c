"""``fastdinov2 train``: set-up, then one visible loop over global steps.

Set-up resolves the data, the curriculum and the per-step schedules, builds the student/teacher, the
optimizer and the data loader, and restores the newest committed checkpoint of the output directory, if
any (so running the same command again continues the run). The loop then does, for every global step:
batch -> (restart mode: reset optimizer at a stage switch) -> schedules -> teacher targets -> student
forward/backward -> finiteness check -> clip -> AdamW step -> EMA teacher -> log -> checkpoint.

Under torchrun every process runs this same loop on its own shard of each global batch; the data
parallelism (DDP or FSDP2, ``compute.strategy``) is applied to the student from outside the model
(:mod:`fastdinov2.distributed`). Only rank 0 writes files and logs; logged losses are means over ranks.

Resuming at another world size: the progress of a run is its data position (images consumed,
:meth:`Curriculum.sample_position`), which does not depend on the world size, while its step counter
does. A checkpoint is resumed at the first step of this run whose data position is at or after the
saved one (:meth:`Curriculum.resume_step`), so no image is fed twice and at most one global batch minus one image of
the stream is skipped; with an unchanged global batch (e.g. 2 x B -> 1 x 2B) that is exactly the saved step.
The message on stderr states the conversion, and ``metrics.jsonl`` is renumbered to the new steps.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdinov2 import distributed as dist_utils
from fastdinov2.config import (
    Config,
    ConfigError,
    cuda_graph_conflicts,
    diff_configs,
    load_config,
    to_yaml,
    tristate,
)
from fastdinov2.curriculum import Curriculum
from fastdinov2.data.collate import TrainBatch, collate_train
from fastdinov2.data.datasets import DataError, discover_training_images
from fastdinov2.data.photometric import DenseFn, compiled_dense_fn
from fastdinov2.data.pretrain import PhotometricOn, PretrainDataset
from fastdinov2.models.vit import DinoVisionTransformer, build_vit
from fastdinov2.train.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from fastdinov2.train.cuda_graph import DeviceSchedules, GraphedStep
from fastdinov2.train.half_weights import HalfWeights
from fastdinov2.train.logging import MetricsLogger, read_metrics
from fastdinov2.train.meta_arch import FUSED_LOSS_TERMS, MetaArch, fused_loss_auto
from fastdinov2.train.optim import apply_optim_schedules, build_adamw, get_param_groups, reset_optimizer_state
from fastdinov2.train.plan import build_schedules
from fastdinov2.train.sampler import StepBatchSampler

#: Exit code of a run that saved and stopped because it received SIGTERM or SIGUSR1 (EX_TEMPFAIL).
EXIT_PREEMPTED = 75

#: Keys that may change when a run is continued in the same output directory.
RESUMABLE_KEYS = (
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last_checkpoints",
    "train.knn_at_end",
    "train.progress",
    "train.nan_policy",
    "train.max_consecutive_skips",
    "data.num_workers",
    "data.max_bad_samples",
    "data.on_bad_sample",
    "data.photometric_on",  # where the colour ops run, not what they draw (both give the same values)
    "compute.",
    # how the same iBOT loss is computed (reference, chunked or Triton): a run saved before ibot.fused_loss
    # became "auto" continues under the new default
    "ibot.fused_loss",
    "ibot.loss_chunk_rows",
    "dino.fused_loss",
)


class TrainingError(RuntimeError):
    """The run stopped on a fault (non-finite loss, too many bad files, ...); the message says which."""


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the CLI exits with :data:`EXIT_PREEMPTED`."""


@dataclass
class RunState:
    step: int = 0
    bad_samples: int = 0
    nan_skips: int = 0
    scaler_skips: int = 0  # fp16 overflow steps skipped by the grad scaler
    consecutive_skips: int = 0
    preempt_signal: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.compute.device == "cuda" or (cfg.compute.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("compute.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype:
    p = cfg.compute.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def resolve_photometric_on(cfg: Config, device: torch.device) -> PhotometricOn:
    """Where the colour augmentation runs: ``data.photometric_on``, with "auto" = the device on CUDA (the
    workers then only decode, crop and resize) and the loader workers on the CPU."""
    mode = cfg.data.photometric_on
    if mode == "auto":
        return "device" if device.type == "cuda" else "worker"
    return "device" if mode == "device" else "worker"


#: compute.masked_tokens_bucket when compute.cuda_graph=auto turns the graph step on and the key is 0
AUTO_MASKED_TOKENS_BUCKET = 64


def resolve_auto_options(cfg: Config, device: torch.device, world_size: int) -> tuple[Config, list[str]]:
    """A copy of ``cfg`` with ``compute.cuda_graph``, ``ibot.fused_loss`` and ``dino.fused_loss`` decided
    ("true"/"false"), and a line for the log per "auto" one on CUDA.

    ``compute.cuda_graph=auto`` is on on CUDA unless something it needs is missing
    (:func:`~fastdinov2.config.cuda_graph_conflicts`, errors for an explicit true: bf16 or fp32, one
    micro-batch per step, softmax centring, no torch.compile CUDA graphs), and on one process (under torchrun an
    explicit true captures the flat-gradient all-reduce, ``docs/distributed.md``; not yet run on several GPUs,
    so not a default). Then a
    ``compute.masked_tokens_bucket`` of 0 becomes :data:`AUTO_MASKED_TOKENS_BUCKET` (one batch shape per stage).
    ``ibot.fused_loss=auto`` and ``dino.fused_loss=auto``: :func:`~fastdinov2.train.meta_arch.fused_loss_auto`."""
    out = copy.deepcopy(cfg)
    notes: list[str] = []
    c = out.compute
    if tristate(c.cuda_graph, "compute.cuda_graph") is None:
        reasons = [f"{key} {why}" for key, why in cuda_graph_conflicts(cfg)]
        if device.type != "cuda":
            reasons.insert(0, "not on CUDA")
        if world_size > 1:  # the flat-gradient all-reduce a graph needs here has run on one GPU and on CPUs only
            reasons.append(f"{world_size} processes: set compute.cuda_graph=true to capture the all-reduce too")
        c.cuda_graph = "false" if reasons else "true"
        if not reasons and c.masked_tokens_bucket == 0:
            c.masked_tokens_bucket = AUTO_MASKED_TOKENS_BUCKET
        if device.type == "cuda":
            notes.append("compute.cuda_graph=auto: " + (
                f"each step replayed as one CUDA graph (masked tokens padded to multiples of "
                f"{c.masked_tokens_bucket})" if not reasons else f"eager step ({', '.join(reasons)})"))
    for key, term in FUSED_LOSS_TERMS.items():
        section = getattr(out, key.partition(".")[0])
        if tristate(section.fused_loss, key) is None:
            fused = fused_loss_auto(cfg, device, key)
            section.fused_loss = "true" if fused else "false"
            if device.type == "cuda":
                notes.append(f"{key}=auto: " + (f"the {term} loss as Triton row kernels" if fused else
                                                 f"the reference {term} loss"))
    return out, notes


def resolve_data_root(cfg: Config) -> Path:
    if cfg.data.root is None:
        from fastdinov2.data.synthetic import default_dataset_root

        return default_dataset_root(cfg.data.cache_dir)
    root = Path(cfg.data.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root: directory not found: {root}")
    return root


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def _reseed(seed: int, rank: int, step: int) -> None:
    """Seed the global RNGs (drop-path draws) from (seed, rank, step): used when a checkpoint's per-rank RNG
    states cannot be restored because the world size changed."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def reconcile_metrics(logger: MetricsLogger, position: int, step: int, cur: Curriculum) -> int:
    """Bring ``metrics.jsonl`` in line with a run that continues at ``step`` from a checkpoint at data position
    ``position`` (0 for a fresh start); returns how many records remain.

    Records are matched by their data position (``samples_seen``), never by their step, because the step
    numbering depends on the world size and a file can still be in an earlier run's numbering (a resume on
    another world size that stopped before its first checkpoint): records at or after ``position`` are
    dropped (they are recomputed), and each kept record moves to the step of ``cur`` that covers its
    position; when several fall into one step (the world grew), the first is kept. Records without
    ``samples_seen`` (older files) keep their step and are dropped from ``step`` on.
    """
    if logger.enabled and logger.path.is_file():
        out, last = [], -1
        for rec in read_metrics(logger.path):
            if "samples_seen" in rec:
                seen = int(rec["samples_seen"])
                new = cur.step_covering(seen)
                if seen >= position or new <= last:
                    continue
                rec = {**rec, "step": new}
                last = new
            out.append(json.dumps(rec))
        _write_text_atomic(logger.path, "".join(line + "\n" for line in out))
    return logger.truncate_from(step)


def check_run_dir(output_dir: Path, cfg: Config, allow_config_change: bool) -> bool:
    """True when ``output_dir`` holds an earlier run of the same config (to be continued).

    Raises :class:`ConfigError` when it holds a run of a different config, unless allowed. A run that never
    committed a checkpoint (a start that failed, e.g. on a bad data folder) has nothing to continue: a new
    config may start afresh there.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir")
    saved = output_dir / "config.yaml"
    if not saved.is_file():
        return False
    try:
        old = load_config(str(saved))
    except ConfigError as exc:
        raise ConfigError(f"{saved}: the saved config of this run cannot be read: {exc}") from exc
    diffs = diff_configs(old, cfg, ignore=RESUMABLE_KEYS)
    if diffs and not list_checkpoints(output_dir / "checkpoints"):
        if dist_utils.is_main_process():
            print(f"[fastdinov2] {output_dir} holds the config of a run that committed no checkpoint; starting "
                  f"afresh with the new config (keys: {', '.join(diffs)})", file=sys.stderr)
        return False
    if diffs and not allow_config_change:
        raise ConfigError(
            f"{output_dir} holds a run with a different config (keys: {', '.join(diffs)}); "
            "use another --output-dir, or --allow-config-change to continue it with the new values"
        )
    return True


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 only set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _PreemptionFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.state.preempt_signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _ignore_preemption_in_loader_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the training loader: preemption is the main process's to handle.

    SLURM signals every process of a job step and torchrun its workers' whole process groups, so loader
    workers get the SIGTERM (or SIGUSR1) too. Dying of it would make the main process fail in the middle of
    a step ("DataLoader worker ... is killed by signal") before it reaches the step boundary where it saves.
    A worker therefore ignores SIGUSR1 and its first SIGTERM and is stopped by the main process through the
    loader as usual; a second SIGTERM (a shutdown that does not wait) ends it.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _second_sigterm_ends_worker)


def _second_sigterm_ends_worker(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(dist_utils.all_reduce_max(t).item() > 0)


@dataclass
class HealthSnapshot:
    """What :meth:`DeviceHealth.read` found: non-finite steps since the previous read."""

    n_skipped: int
    run: int  # consecutive non-finite steps ending at the last recorded step
    longest: int  # longest consecutive run since the previous read (a run carried in from before included)
    first_bad: int  # step of the first non-finite step since the previous read, -1 if none
    first_values: dict[str, float]  # its loss terms and grad_norm
    last_ok: bool  # whether the last recorded step's update was applied


class DeviceHealth:
    """Per-step finiteness bookkeeping kept on the device, so that a step needs no host synchronisation.

    :meth:`record` costs a few scalar kernels; :meth:`read` is the one host sync, done at the loop's sync
    points (log steps, checkpoints, the end of the run, and a preemption).
    """

    def __init__(self, device: torch.device, consecutive: int = 0) -> None:
        long = dict(device=device, dtype=torch.int64)
        self.n_skipped = torch.zeros((), **long)
        self.run = torch.full((), consecutive, **long)
        self.longest = self.run.clone()
        self.first_bad = torch.full((), -1, **long)
        self.last_ok = torch.ones((), device=device, dtype=torch.bool)
        self.names: list[str] = []
        self.first_values: torch.Tensor | None = None

    def record(self, ok: torch.Tensor, step: int | torch.Tensor, totals: dict[str, torch.Tensor]) -> None:
        """``ok``: bool scalar tensor, whether step ``step`` (an int, or a 0-d int64 device tensor) with loss
        terms ``totals`` was finite."""
        bad = ~ok
        values = torch.stack([v.float() for v in totals.values()])
        if self.first_values is None or self.names != list(totals):
            self.names = list(totals)
            self.first_values = torch.zeros_like(values)
        is_first = bad & (self.first_bad < 0)
        # Every update is in place: a CUDA graph of the step (compute.cuda_graph) writes these same tensors.
        self.n_skipped.add_(bad.long())
        self.run.copy_((self.run + 1) * bad.long())
        torch.maximum(self.longest, self.run, out=self.longest)
        self.first_bad.copy_(torch.where(is_first, step, self.first_bad))
        self.first_values.copy_(torch.where(is_first, values, self.first_values))
        self.last_ok.copy_(ok)

    def read(self) -> HealthSnapshot:
        """One host sync: the record since the previous read; then starts a new record."""
        scalars = torch.stack([self.n_skipped, self.run, self.longest, self.first_bad, self.last_ok.long()])
        n_skipped, run, longest, first_bad, last_ok = scalars.tolist()
        values = self.first_values.tolist() if (self.first_values is not None and n_skipped) else []
        self.n_skipped.zero_()
        self.longest.copy_(self.run)
        self.first_bad.fill_(-1)
        return HealthSnapshot(int(n_skipped), int(run), int(longest), int(first_bad),
                              dict(zip(self.names, values, strict=False)), bool(last_ok))


class Trainer:
    """Holds the set-up of one run; :meth:`run` is the training loop."""

    def __init__(self, cfg: Config, output_dir: Path, allow_config_change: bool = False) -> None:
        self.user_cfg = cfg  # as given ("auto" options undecided): saved with the run, compared on resume
        self.output_dir = output_dir
        self.rank = dist_utils.get_rank()
        self.world_size = dist_utils.get_world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg)
        # what the run uses: the "auto" options decided for this device (compute.cuda_graph, ibot.fused_loss)
        cfg, self._auto_notes = resolve_auto_options(cfg, self.device, self.world_size)
        self.cfg = cfg
        self.dtype = resolve_precision(cfg, self.device)
        self.photometric_on = resolve_photometric_on(cfg, self.device)
        not_with_fsdp2 = {"half_weights": "FSDP2's mixed precision already computes with bf16 copies of the weights",
                          "cuda_graph": "FSDP2 gathers and frees parameters around each block"}
        for key, why in not_with_fsdp2.items():
            if (self.world_size > 1 and cfg.compute.strategy == "fsdp2"
                    and tristate(getattr(cfg.compute, key), f"compute.{key}")):
                raise ConfigError(f"compute.{key}=true does not combine with compute.strategy=fsdp2 ({why}); "
                                  f"use compute.strategy=ddp or compute.{key}=false")
        if self.world_size > 1 and cfg.data.on_bad_sample == "drop" and cfg.data.max_bad_samples > 0:
            raise ConfigError(
                "data.on_bad_sample=drop works on one process only: under torchrun a rank whose micro-batch "
                "held only bad files would skip collectives the others run; use data.on_bad_sample=replace"
            )
        if cfg.compute.threads:
            torch.set_num_threads(cfg.compute.threads)
        elif self.device.type == "cpu" and cfg.data.num_workers > 0:
            # Leave the loader workers their cores: oversubscribed OpenMP pools spin and stall badly.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.data.num_workers))

        # Data first: a missing or empty data directory fails before anything is written.
        self.data_root = resolve_data_root(cfg)
        self.records, self.classes = discover_training_images(self.data_root)
        self.curriculum = Curriculum(cfg, len(self.records), self.world_size)
        small = [st for st in self.curriculum.stages if st.global_batch > len(self.records)]
        if small:
            st = small[0]
            raise DataError(
                f"{self.data_root} holds {len(self.records)} training image(s), fewer than one global batch of "
                f"stage {st.index} ({st.global_batch} = {self.world_size} process(es) x batch {st.batch_size_per_gpu}"
                f" x train.grad_accum_steps {cfg.train.grad_accum_steps}): an epoch could not show each image "
                "once; add images or lower the batch size"
            )
        self.schedules = build_schedules(cfg, self.curriculum)
        self.continuing = check_run_dir(output_dir, self.user_cfg, allow_config_change)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = MetaArch(cfg).to(self.device)
        if cfg.student.pretrained:
            from fastdinov2.interop import load_pretrained_into

            load_pretrained_into(self.model.student.backbone, cfg.student.pretrained)
            self.model.teacher.load_state_dict(self.model.student.state_dict())
        # the same position-embedding resampling for the teacher and the student from the first step on
        self.model.student.backbone.prepare_input_sizes(
            [size for st in self.curriculum.stages for size in (st.global_size, st.local_size)])
        # Data parallelism is applied from outside the model. The optimizer is built afterwards: fsdp2
        # replaces the parameters by sharded ones. `self.student` is what the step calls (the DDP wrapper);
        # `self.model.student` stays the module whose parameters the optimizer and the EMA use.
        strategy = cfg.compute.strategy
        fsdp_dtype = self.dtype if self.device.type == "cuda" else None
        # compute.cuda_graph / compute.half_weights under ddp: no DDP wrapper; the gradients sit in one flat buffer
        # averaged by one all-reduce per step (distributed.FlatGradients), which a CUDA graph captures too
        graph = cfg.compute.cuda_graph == "true"
        flat = self.world_size > 1 and strategy == "ddp" and (graph or cfg.compute.half_weights)
        if self.world_size > 1 and graph and cfg.ibot.mask_sampling != "batch":
            raise ConfigError("compute.cuda_graph=true on several processes needs ibot.mask_sampling=batch: every "
                              "rank must replay a graph of the same shape, and per-sample masks give each rank its "
                              "own masked-token count")
        if strategy != "fsdp2":
            # one buffer per model: the EMA is one lerp kernel (DDP keeps the parameters; fsdp2 replaces them)
            self.model.flatten_parameters()
        self.student: nn.Module = (self.model.student if flat else
                                   dist_utils.wrap_student(self.model.student, strategy, self.device, fsdp_dtype))
        dist_utils.shard_teacher(self.model.teacher, strategy, self.device, fsdp_dtype)
        self.param_groups = get_param_groups(
            self.model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult
        )
        self._flat_grads = dist_utils.FlatGradients(list(self.model.student.parameters())) if flat else None
        if flat and self.is_main:
            key = "cuda_graph" if graph else "half_weights"
            print(f"[fastdinov2] compute.strategy=ddp with compute.{key}=true: the student's gradients are averaged "
                  f"over the {self.world_size} processes by one all-reduce of a flat buffer per step (no DDP wrapper)",
                  file=sys.stderr)
        self.optimizer = build_adamw(self.param_groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        # compute.half_weights: bf16 copies of the matmul weights, refreshed once per step (train/half_weights.py)
        self._half: HalfWeights | None = None
        if cfg.compute.half_weights and self.dtype != torch.float32:
            self._half = HalfWeights(self.model.student, self.model.teacher, self.dtype,
                                     layer_scale=cfg.compute.half_residual)
        # The fused AdamW kernel takes the finiteness flag on the device: the step needs no host sync.
        self.sync_free = bool(self.optimizer.defaults.get("fused")) and self.scaler is None
        self.state = RunState()
        self._health = DeviceHealth(self.device)
        self._bad_pending, self._last_bad = 0, ""  # bad files of this rank not yet summed across ranks
        self._forward_loss_fn = self._forward_loss
        # compute.overlap_teacher: the teacher's forward on a stream of its own (MetaArch.targets_and_student)
        self._teacher_stream: torch.cuda.Stream | None = None
        if cfg.compute.overlap_teacher:
            if self.world_size > 1:
                raise ConfigError("compute.overlap_teacher=true is for one process: under torchrun the teacher's "
                                  "centre update is a collective, which would run on the second stream")
            if self.device.type == "cuda":
                self._teacher_stream = torch.cuda.Stream(self.device)
            elif self.is_main:
                print("[fastdinov2] compute.overlap_teacher=true without CUDA: no effect", file=sys.stderr)
        # The teacher temperature goes in as one 0-d device tensor refilled every step (a fill kernel, no copy
        # from the host): compiled graphs and CUDA graphs then see the same input instead of a new constant.
        self._teacher_temp = torch.zeros((), device=self.device)
        # Photometric augmentation on the GPU (photometric_on=device): compiled with the step, it is a few fused
        # kernels instead of ~700 (the CPU keeps its eager subset path).
        self._photometric_fn: DenseFn | None = None
        kw = self._compile_kwargs()
        if cfg.compute.compile != "none" and self.device.type == "cuda":
            self._photometric_fn = compiled_dense_fn(**kw)
        if cfg.compute.compile == "modules":
            self._compile_modules(kw)
        elif cfg.compute.compile == "blocks":
            self.model.compile_regions(**kw)
        elif cfg.compute.compile == "step":
            self._forward_loss_fn = torch.compile(self._forward_loss, **kw)
        # CUDA graphs of compiled code (cudagraph trees): each micro-batch starts a new generation, so outputs
        # of the one before (already consumed) may be overwritten without a liveness check failing.
        self._cudagraphs = (cfg.compute.compile != "none" and self.device.type == "cuda"
                            and (kw["backend"] == "cudagraphs" or kw.get("mode") == "reduce-overhead"))
        # compute.cuda_graph: the whole step (forward, backward, clip, AdamW, EMA) replayed as one CUDA graph per
        # batch shape, its schedules read from the device (fastdinov2.train.cuda_graph).
        self._dsched: DeviceSchedules | None = None
        self._graphed: GraphedStep | None = None
        if graph:
            if not self.sync_free:
                raise ConfigError("compute.cuda_graph=true needs the fused AdamW kernel and no fp16 grad scaler")
            self._dsched = DeviceSchedules(self.schedules, self.optimizer, self.device)
            self._graphed = GraphedStep(self._static_step, self.device, verbose=self.is_main,
                                        any_failed=(lambda failed: _agree(failed, self.device))
                                        if self.world_size > 1 else None)
            if self.device.type != "cuda" and self.is_main:
                print("[fastdinov2] compute.cuda_graph=true without CUDA: the same static step runs eagerly",
                      file=sys.stderr)
        self.ckpt_dir = output_dir / "checkpoints"
        self.logger: MetricsLogger | None = None
        self.resume_position = 0  # data position of the checkpoint this run continues from (0: a fresh start)
        # Each process seeds its own RNGs from (seed, rank): drop-path draws differ across ranks.
        torch.manual_seed(cfg.train.seed * 1000 + self.rank + 1)
        random.seed(cfg.train.seed * 1000 + self.rank)
        np.random.seed(cfg.train.seed * 1000 + self.rank)

    #: Overrides ``compute.compile_backend`` when set (tests use "aot_eager": the same graphs, no code generation).
    compile_backend: str | None = None

    def _compile_modules(self, kw: dict[str, Any]) -> None:
        """``compute.compile=modules``: compile the student's and the teacher's backbone and heads in place
        (``nn.Module.compile``: parameter names and checkpoints are unchanged) with ``torch.compile(**kw)``. The
        loss, optimizer and EMA stay eager; ``benchmarks/step.py --compile`` / ``--compile-step`` measure what
        each variant gains."""
        for model in (self.model.student, self.model.teacher):
            model.backbone.compile(**kw)
            model.dino_head.compile(**kw)
            if model.ibot_head is not None:
                model.ibot_head.compile(**kw)

    def _compile_kwargs(self) -> dict[str, Any]:
        """``torch.compile`` arguments: the backend, and ``compute.compile_mode`` (inductor only)."""
        backend = self.compile_backend or self.cfg.compute.compile_backend
        kw: dict[str, Any] = {"backend": backend}
        if backend == "inductor" and self.cfg.compute.compile_mode != "default":
            kw["mode"] = self.cfg.compute.compile_mode
        return kw

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint contents: full (unsharded) states in the single-process layout, whatever the world.

        With several processes this is a collective (every rank calls it: the RNG states of all ranks are
        gathered, and fsdp2 gathers the shards); only rank 0's result is complete.
        """
        m, cur, step = self.model, self.curriculum, self.state.step
        rngs = dist_utils.all_gather_object(_rng_state(self.device))  # one entry per rank
        model_state = {
            "student": dist_utils.full_model_state_dict(m.student),
            "teacher": dist_utils.full_model_state_dict(m.teacher),
            "dino_loss": m.dino_loss.state_dict(),
            "ibot_loss": m.ibot_loss.state_dict(),
            "backbone_config": dict(m.teacher.backbone.config),
            "step": step,
        }
        optimizer_state = dist_utils.full_optimizer_state_dict(self.optimizer)
        for group in optimizer_state.get("param_groups", []):  # one format whatever compute.cuda_graph says
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])
                group["capturable"] = False
        optim_state = {
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "step": step,
            "sample_position": cur.sample_position(step),  # images consumed: the world-size-free progress
            "total_steps": cur.total_steps,
            "world_size": self.world_size,
            "counters": {"bad_samples": self.state.bad_samples, "nan_skips": self.state.nan_skips,
                         "scaler_skips": self.state.scaler_skips,
                         "consecutive_skips": self.state.consecutive_skips},
        }
        return model_state, optim_state

    def save(self) -> Path | None:
        """Write a checkpoint (every rank must call it; rank 0 writes). Returns its path on rank 0."""
        model_state, optim_state = self.state_dicts()
        if not self.is_main:
            return None
        return save_checkpoint(
            self.ckpt_dir, self.state.step, model_state, optim_state,
            keep_last=self.cfg.train.keep_last_checkpoints,
            meta={"world_size": self.world_size, "sample_position": self.curriculum.sample_position(self.state.step)},
        )

    def restore(self) -> Path | None:
        """Load the newest committed checkpoint of the run directory, at any world size (module docstring)."""
        if self.is_main:
            remove_stale_temporaries(self.ckpt_dir)
        # Rank 0 picks the checkpoint and tells the others, so all ranks load the same one.
        path = dist_utils.broadcast_object(find_latest_checkpoint(self.ckpt_dir) if self.is_main else None)
        if path is None:
            return None
        try:
            model_state, optim_state = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            earlier = [p for _, p in list_checkpoints(self.ckpt_dir) if p != path]
            hint = (f"; the previous committed checkpoint is {earlier[-1]}: move {path} out of {self.ckpt_dir} to "
                    "continue from it" if earlier else "; no earlier committed checkpoint exists")
            raise CheckpointError(f"{exc}{hint}") from exc
        m = self.model
        try:
            dist_utils.load_full_model_state_dict(m.student, model_state["student"])
            dist_utils.load_full_model_state_dict(m.teacher, model_state["teacher"])
            m.dino_loss.load_state_dict(model_state["dino_loss"])
            m.ibot_loss.load_state_dict(model_state["ibot_loss"])
            dist_utils.load_full_optimizer_state_dict(self.optimizer, optim_state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()
            raise CheckpointError(
                f"{path} does not fit this run's model or optimizer ({reason[0] if reason else type(exc).__name__}"
                f"{' ...' if len(reason) > 1 else ''}): the architecture (student.*, dino/ibot head sizes) and "
                "the optimizer's parameter groups cannot change when a run is continued, even with "
                "--allow-config-change; start a new --output-dir (student.pretrained loads weights into a new run)"
            ) from exc
        if self.scaler is not None and optim_state.get("scaler") is not None:
            self.scaler.load_state_dict(optim_state["scaler"])
        counters = optim_state.get("counters", {})
        self.state.bad_samples = int(counters.get("bad_samples", 0))
        self.state.nan_skips = int(counters.get("nan_skips", 0))
        self.state.scaler_skips = int(counters.get("scaler_skips", 0))
        self.state.consecutive_skips = int(counters.get("consecutive_skips", 0))

        saved_step = int(optim_state["step"])
        saved_world = int(optim_state.get("world_size", 1))
        if "total_steps" in optim_state:
            position = int(optim_state["sample_position"])
        elif saved_world == self.world_size:  # an older layout: its step is valid at this world size only
            position = self.curriculum.sample_position(saved_step)
        else:
            raise CheckpointError(f"{path} was written by {saved_world} process(es) in an older layout without "
                                  f"a data position; resume it on {saved_world} process(es)")
        step = self.curriculum.resume_step(position)
        self.state.step = step
        self.resume_position = position
        rngs = optim_state["rng"] if isinstance(optim_state["rng"], list) else [optim_state["rng"]]
        if saved_world == self.world_size and step == saved_step and len(rngs) == self.world_size:
            _set_rng_state(rngs[self.rank], self.device)  # an exact continuation
            return path
        _reseed(self.cfg.train.seed, self.rank, step)
        if self.is_main:
            new_position = self.curriculum.sample_position(step)
            skipped = new_position - position
            print(
                f"[fastdinov2] {path} was written by {saved_world} process(es) at step {saved_step} after "
                f"{position} images; resuming on {self.world_size} process(es) (global batch "
                f"{self.curriculum.stage_at(step).global_batch}) at step {step}, the first step at or after that "
                f"data position ({skipped} image(s) of the stream skipped); schedules follow the new step, "
                f"RNG states are re-seeded from (seed, rank, step)"
                + (", metrics.jsonl is renumbered to the new steps" if step != saved_step else ""),
                file=sys.stderr,
            )
        return path

    def _augmentation_place(self) -> str:
        if self.photometric_on == "device":
            return "on the device"
        n = self.cfg.data.num_workers
        return f"on {n} loader worker(s)" if n > 0 else "in the loader, in this process (data.num_workers=0)"

    def teacher_backbone(self) -> DinoVisionTransformer:
        """The teacher backbone as a plain module on every rank (a collective under fsdp2, which rebuilds
        it from the gathered full weights)."""
        backbone = self.model.teacher.backbone
        if not dist_utils.is_sharded(backbone):
            return backbone
        plain = build_vit(**backbone.config).to(self.device)
        plain.load_state_dict(dist_utils.full_model_state_dict(backbone, all_ranks=True))
        return plain

    # ---- data --------------------------------------------------------------------------------------
    def make_loader(self, start_step: int, end_step: int) -> DataLoader:
        dataset = PretrainDataset(self.records, self.cfg, seed=self.cfg.train.seed,
                                  photometric_on=self.photometric_on,
                                  on_bad=self.cfg.data.on_bad_sample)
        sampler = StepBatchSampler(self.curriculum, self.cfg.train.seed, start_step, end_step,
                                   rank=self.rank, world_size=self.world_size)
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=functools.partial(collate_train, masked_bucket=self.cfg.compute.masked_tokens_bucket),
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
            worker_init_fn=_ignore_preemption_in_loader_worker if workers > 0 else None,
        )

    def _check_bad_samples(self, batch: TrainBatch) -> None:
        """Count the batch's undecodable files against ``data.max_bad_samples`` (a limit for the whole run).

        One process checks at once. Several processes each see only their shard of the files, so each
        counts its own and the counts are summed across ranks at the loop's sync points
        (:meth:`_sync_bad_samples`), where every rank applies the limit to the same total.
        """
        limit = self.cfg.data.max_bad_samples
        for path, reason in batch.bad_samples:
            if self.world_size > 1:
                self._bad_pending += 1
                self._last_bad = f"{path}: {reason}"
                print(f"[fastdinov2] rank {self.rank}: {self._bad_action} bad image {path}: {reason}",
                      file=sys.stderr)
                continue
            self.state.bad_samples += 1
            if self.state.bad_samples > limit:
                raise DataError(
                    f"bad image {path}: {reason} (bad files so far: {self.state.bad_samples}, "
                    f"data.max_bad_samples={limit}); run 'fastdinov2 data verify {self.data_root}' to list all"
                )
            print(f"[fastdinov2] {self._bad_action} bad image {path}: {reason} "
                  f"({self.state.bad_samples}/{limit} allowed)", file=sys.stderr)

    @property
    def _bad_action(self) -> str:
        return "replaced" if self.cfg.data.on_bad_sample == "replace" else "skipped"

    def _sync_bad_samples(self) -> None:
        """Several processes: add the bad files every rank found since the last call to the run's count (one
        collective) and stop on every rank once it exceeds ``data.max_bad_samples``. A no-op for one process."""
        if self.world_size == 1:
            return
        new = int(dist_utils.all_reduce_sum(torch.tensor([float(self._bad_pending)], device=self.device)).item())
        self._bad_pending = 0
        if new == 0:
            return
        self.state.bad_samples += new
        limit = self.cfg.data.max_bad_samples
        if self.state.bad_samples > limit:
            mine = f"; this rank's last: {self._last_bad}" if self._last_bad else ""
            raise DataError(
                f"{self.state.bad_samples} bad image(s) across {self.world_size} processes (data.max_bad_samples="
                f"{limit}){mine}; run 'fastdinov2 data verify {self.data_root}' to list all"
            )
        if self.is_main:
            print(f"[fastdinov2] bad images so far: {self.state.bad_samples}/{limit} allowed "
                  f"(all {self.world_size} processes)", file=sys.stderr)

    # ---- one step ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _forward_loss(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
        mask_indices: torch.Tensor, masks_weight: torch.Tensor, n_masked: int, teacher_temp: torch.Tensor,
        n_local: int,
    ) -> dict[str, torch.Tensor]:
        """Teacher targets (and centre updates) + student forward + all loss terms of one micro-batch: the
        function ``compute.compile=step`` compiles (its backward is compiled by AOTAutograd). Shapes as in
        :class:`~fastdinov2.data.collate.TrainBatch`; returns the scalar loss terms."""
        (t_cls, t_patch), s_out = self.model.targets_and_student(
            self.student, global_crops, local_crops, masks, mask_indices, n_masked, teacher_temp, masks_weight,
            teacher_stream=self._teacher_stream)
        return self.model.compute_losses(s_out, t_cls, t_patch, masks, masks_weight, n_local)

    def _on_device(self, batch: TrainBatch) -> TrainBatch:
        """``batch`` on the training device, its pending colour augmentation applied there (batched)."""
        batch = batch.to(self.device)
        if batch.photometric_pending:
            batch = batch.with_photometric(self._photometric_fn)
        return batch

    def _forward_backward(self, micro_batches: list[TrainBatch], teacher_temp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches; returns the loss terms (device scalars, mean over
        micro-batches and ranks). ``teacher_temp``: 0-d device tensor. Issues no host synchronisation."""
        n_micro = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        centers = (self.model.dino_loss, self.model.ibot_loss)
        half = self._half
        if half is not None:
            half.refresh()  # after the last update, the EMA and any checkpoint load
        if n_micro > 1:  # one centre update per step, from all micro-batches: as one large batch
            for c in centers:
                c.begin_center_accumulation()
        for i, batch in enumerate(micro_batches):
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            batch = self._on_device(batch)
            n_local = batch.local_crops.shape[0] // max(1, batch.batch_size)
            # Gradients are reduced across ranks once per step, in the backward of the last micro-batch.
            with dist_utils.gradient_sync(self.student, enabled=i == n_micro - 1), self.autocast():
                with half.swapped() if half is not None else contextlib.nullcontext():
                    losses = self._forward_loss_fn(
                        batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices, batch.masks_weight,
                        batch.n_masked_patches, teacher_temp, n_local,
                    )
                loss = losses["loss"] / n_micro
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            if half is not None:
                half.collect_grads(accumulate=i > 0)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / n_micro
        if self._flat_grads is not None:  # (DDP reduced them in the last backward)
            self._flat_grads.all_reduce()
        if n_micro > 1:
            for c in centers:
                c.end_center_accumulation()
        # Each rank's terms are means over its shard of the batch: log their mean over ranks (one collective).
        names = list(totals)
        return dict(zip(names, dist_utils.all_reduce_mean(torch.stack([totals[k] for k in names])), strict=True))

    def train_step(self, micro_batches: list[TrainBatch], step: int) -> dict[str, torch.Tensor] | None:
        """Forward/backward over the micro-batches of one step and the optimizer update.

        Returns the loss terms and ``grad_norm`` (detached device scalars, averaged over micro-batches and
        ranks). With the fused AdamW kernel (CPU and CUDA) the step issues **no host synchronisation**: the
        finiteness of the loss and of the global gradient norm stays on the device, where it gates the
        update (AdamW's ``found_inf``) and the EMA, and is counted; the loop reads it at its sync points
        (:meth:`sync_health`). Without the fused kernel, and with fp16's grad scaler, the check is read at
        once (the legacy path); there ``None`` is returned for a skipped update.

        With ``compute.cuda_graph`` the step is :meth:`_static_step` run through :class:`GraphedStep`: the host
        copies the tensors the step reads (crops, masks and, with ``data.photometric_on=device``, the colour
        augmentation's parameters) into the graph's buffers, writes the step index, and replays the graph of
        the batch's shape; the colour augmentation runs inside it.
        """
        if self._graphed is not None:
            assert self._dsched is not None and len(micro_batches) == 1  # validated: grad_accum_steps == 1
            self._dsched.install(self.optimizer)
            self._dsched.step.fill_(step)  # the one step-dependent number the graph reads
            return self._graphed(micro_batches[0])
        sched = self.schedules.at(step)
        apply_optim_schedules(self.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"],
                              backbone_lr_scale=sched["backbone_lr_scale"])
        self._zero_grad()
        # The centres are updated during the forward pass; a non-finite step must not leave NaN in them.
        centers = self._centers()
        saved_centers = [c.clone() for c in centers]
        totals = self._forward_backward(micro_batches, self._teacher_temp.fill_(sched["teacher_temp"]))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip(totals)
        if self.scaler is None and self.sync_free:
            self._update_sync_free(totals, saved_centers, step, sched["momentum"])
            return totals
        loss_ok = not _agree(not bool(torch.isfinite(totals["loss"]).item()), self.device)
        grad_ok = bool(torch.isfinite(grad_norm).item())  # a norm over all ranks: the same on every rank
        if self.scaler is not None and loss_ok and not grad_ok:
            # fp16 gradient overflow: expected now and then; the grad scaler skips this update and lowers its
            # scale. Not a fault, so the NaN policy does not apply.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.state.scaler_skips += 1
            return None
        if not (loss_ok and grad_ok):
            self._zero_grad()
            for c, saved in zip(centers, saved_centers, strict=True):
                c.copy_(saved)
            run = self.state.consecutive_skips + 1
            self._on_nonfinite(step, 1, step, {k: float(v.item()) for k, v in totals.items()}, run, run)
            if self.scaler is not None:
                self.scaler.update()
            return None
        self.state.consecutive_skips = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.update_teacher(sched["momentum"])
        return totals

    def _zero_grad(self) -> None:
        """Clear the student's gradients: dropped (``set_to_none``), or zeroed in place in the flat buffer of
        :class:`~fastdinov2.distributed.FlatGradients`."""
        if self._flat_grads is not None:
            self._flat_grads.zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _centers(self) -> list[torch.Tensor]:
        """The softmax-centring centres, updated in the forward pass (restored after a non-finite step)."""
        return [self.model.dino_loss.center, self.model.ibot_loss.center]

    def _clip(self, totals: dict[str, torch.Tensor]) -> torch.Tensor:
        """Clip the student's gradients to ``optim.clip_grad``; stores and returns the norm before clipping."""
        params = [p for p in self.model.student.parameters() if p.grad is not None]
        grad_norm = dist_utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)  # norm over all ranks' shards
        totals["grad_norm"] = grad_norm.detach().float()
        return grad_norm

    def _update_sync_free(
        self, totals: dict[str, torch.Tensor], saved_centers: list[torch.Tensor], step: int | torch.Tensor,
        momentum: float | torch.Tensor, decay: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """The update gated on the device by the step's finiteness: health record, centres restored if not
        finite, (``decay(ok)``,) fused AdamW with ``found_inf``, EMA teacher. Issues no host synchronisation."""
        # Loss terms are means over ranks and the norm covers all ranks: `ok` is the same everywhere.
        ok = torch.isfinite(totals["loss"]) & torch.isfinite(totals["grad_norm"])
        self._health.record(ok, step, totals)
        for c, saved in zip(self._centers(), saved_centers, strict=True):
            c.copy_(torch.where(ok, c, saved))
        if decay is not None:
            decay(ok)
        self.optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]  # fused AdamW skips
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        self.model.update_teacher(momentum, apply=ok)

    def _static_step(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The step :class:`GraphedStep` captures (``compute.cuda_graph``): the sync-free path of
        :meth:`train_step` for one on-device micro-batch, with every step-dependent value read from
        :class:`DeviceSchedules` (the step index is in ``self._dsched.step``). A pending colour augmentation
        (``data.photometric_on=device``) is applied here, so the graph holds it too."""
        ds = self._dsched
        assert ds is not None
        sched = ds.row(ds.step)  # also writes the groups' lr
        self._zero_grad()  # (one process) a captured backward then writes, not adds, the gradients
        saved_centers = [c.clone() for c in self._centers()]
        totals = self._forward_backward([batch], sched["teacher_temp"])
        self._clip(totals)
        self._update_sync_free(totals, saved_centers, ds.step, sched["momentum"],
                               decay=lambda ok: ds.decay(sched["wd"], ok))
        return totals

    def _on_nonfinite(self, step: int, n_skipped: int, first_bad: int, first_values: dict[str, float],
                      run: int, longest: int) -> None:
        """Apply ``train.nan_policy`` to ``n_skipped`` non-finite steps seen up to ``step``: the first at
        ``first_bad`` (its loss terms ``first_values``), ``run`` consecutive ones ending at ``step``, and a
        longest consecutive run of ``longest`` (runs carried in from before included)."""
        cfg = self.cfg
        bad_terms = [k for k, v in first_values.items() if not np.isfinite(v)]
        if cfg.train.nan_policy == "halt":
            raise TrainingError(
                f"non-finite values at step {first_bad}: {', '.join(bad_terms) or 'on another rank'} "
                f"({', '.join(f'{k}={v:.4g}' for k, v in first_values.items())}); no update was applied from "
                f"it, and the last committed checkpoint in {self.ckpt_dir} is intact. Lower optim.base_lr, "
                "or set train.nan_policy=skip"
            )
        self.state.nan_skips += n_skipped
        self.state.consecutive_skips = run
        if self.is_main:
            where = f"step {step}" if n_skipped == 1 and first_bad == step else f"steps {first_bad}..{step}"
            print(f"[fastdinov2] {where}: {n_skipped} non-finite step(s), first with "
                  f"{', '.join(bad_terms) or 'a non-finite value on another rank'}; update(s) skipped "
                  f"({run} in a row now)", file=sys.stderr)
        if longest >= cfg.train.max_consecutive_skips:
            raise TrainingError(
                f"{longest} consecutive non-finite steps (up to step {step}); "
                f"train.max_consecutive_skips={cfg.train.max_consecutive_skips}"
            )

    def sync_health(self, step: int) -> bool:
        """Read the on-device finiteness record of the steps since the last call (one host sync) and apply
        the NaN policy to them. Returns whether the last step's update was applied."""
        if not self.sync_free or self.scaler is not None:
            return True
        h = self._health.read()
        if h.n_skipped > 0:
            self._on_nonfinite(step, h.n_skipped, h.first_bad, h.first_values, h.run, h.longest)
        else:
            self.state.consecutive_skips = h.run
        return h.last_ok

    # ---- the loop ----------------------------------------------------------------------------------
    def _batches(self, loader: DataLoader) -> Iterator[list[TrainBatch]]:
        it = iter(loader)
        n = self.cfg.train.grad_accum_steps
        while True:
            micro = []
            for _ in range(n):
                try:
                    micro.append(next(it))
                except StopIteration:
                    return
            yield micro

    def run(self) -> dict[str, Any]:
        cfg, cur = self.cfg, self.curriculum
        restored = self.restore()
        end_step = cur.total_steps if cfg.train.max_steps is None else min(cur.total_steps, cfg.train.max_steps)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_text_atomic(self.output_dir / "config.yaml", to_yaml(self.user_cfg))
            for note in self._auto_notes:
                print(f"[fastdinov2] {note}", file=sys.stderr)
            self.logger = MetricsLogger(self.output_dir, enabled=True)
            reconcile_metrics(self.logger, self.resume_position, self.state.step, cur)
            where = f"resuming from {restored}" if restored else "starting"
            print(f"[fastdinov2] {where}: step {self.state.step} of {cur.total_steps} "
                  f"({len(self.records)} images in {self.data_root}, device {self.device}, world {self.world_size}, "
                  f"colour augmentation {self._augmentation_place()})")
            print(cur.describe())
        start = self.state.step
        self._health = DeviceHealth(self.device, self.state.consecutive_skips)
        if start >= end_step:
            return self._summary(end_step)
        if self.is_main:
            self._drop_stale_export()
        loader = self.make_loader(start, end_step)
        progress = None
        if self.is_main and cfg.train.progress:
            from tqdm import tqdm

            progress = tqdm(total=end_step, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        window_t0, wait_time, window_imgs = time.perf_counter(), 0.0, 0
        preemption = dist_utils.FlagAgreement()
        # closing the batch generator drops the loader's iterator, whose workers then stop, on any way out:
        # they ignore a first SIGTERM (preemption), so none may be left to interpreter exit to terminate
        batches = self._batches(loader)
        with _PreemptionFlag(self.state), contextlib.closing(batches):
            t_wait = time.perf_counter()
            for step, micro in zip(range(start, end_step), batches, strict=False):
                wait_time += time.perf_counter() - t_wait
                stage = cur.stage_at(step)
                if cfg.curriculum.switch_mode == "restart" and step == stage.start_step and stage.index > 0:
                    reset_optimizer_state(self.optimizer)  # the paper's stage-2 job starts with a fresh optimizer
                for b in micro:
                    self._check_bad_samples(b)
                micro = [b for b in micro if b.batch_size > 0]  # a micro-batch of only bad files
                totals = self.train_step(micro, step) if micro else None
                self.state.step = step + 1
                window_imgs += sum(b.batch_size for b in micro) * self.world_size
                is_log = step % cfg.train.log_every == 0 or step + 1 == end_step
                is_ckpt = self.state.step % cfg.train.checkpoint_every == 0 and self.state.step < end_step
                # Host sync points: only here are device values read back (the step itself issues none).
                if is_log or is_ckpt:
                    self._sync_bad_samples()
                    applied = self.sync_health(step)
                    if totals is not None and not applied:
                        totals = None  # a skipped update is not logged as a normal step
                if totals is not None and is_log:
                    now = time.perf_counter()
                    names = list(totals)
                    values = torch.stack([totals[k].float() for k in names]).tolist()  # one host sync
                    record = {
                        "step": step,
                        "epoch": round(cur.epoch_at(step), 4),
                        "stage": stage.index,
                        "samples_seen": cur.sample_position(step),
                        "world_size": self.world_size,
                        "global_size": stage.global_size,
                        "local_size": stage.local_size,
                        "noise_max_scale": stage.noise.max_scale if stage.noise.kind == "gaussian" else 0.0,
                        **{k: round(v, 8) for k, v in self.schedules.at(step).items()},
                        **dict(zip(names, (float(v) for v in values), strict=True)),
                        "img_per_s": window_imgs / max(now - window_t0, 1e-9),
                        "data_wait_frac": wait_time / max(now - window_t0, 1e-9),
                        "bad_samples": self.state.bad_samples,
                        "nan_skips": self.state.nan_skips,
                        "scaler_skips": self.state.scaler_skips,
                    }
                    self.state.history.append(record)
                    if self.logger is not None:
                        self.logger.log(record)
                    if progress is not None:
                        progress.set_postfix_str(
                            f"stage {stage.index} {stage.global_size}/{stage.local_size} "
                            f"loss {record['loss']:.3f} {record['img_per_s']:.0f} img/s "
                            f"wait {100 * record['data_wait_frac']:.0f}%"
                        )
                    window_t0, wait_time, window_imgs = now, 0.0, 0
                if progress is not None:
                    progress.update(1)
                # One process: the signal flag is read on the host. Several: the ranks agree at every step
                # boundary, one step late (an asynchronous all-reduce on the host; no device sync).
                if preemption.poll(self.state.preempt_signal is not None):
                    self._sync_bad_samples()
                    self.sync_health(step)
                    path = self.save()
                    if progress is not None:
                        progress.close()
                    sig = self.state.preempt_signal
                    raise Preempted(f"{f'received signal {sig}' if sig is not None else 'another rank was signalled'}"
                                    f"; saved {path} at step {self.state.step}; run the same command again to continue")
                if is_ckpt:
                    self.save()
                t_wait = time.perf_counter()
            preemption.close()
        if progress is not None:
            progress.close()
        if self.state.step < end_step:
            raise TrainingError(f"the data loader stopped early at step {self.state.step} of {end_step}")
        self._sync_bad_samples()
        self.sync_health(self.state.step - 1)
        self.save()
        return self._summary(end_step)

    def _drop_stale_export(self) -> None:
        """A run that trains on past an earlier end of its schedule (``--allow-config-change optim.epochs=...``)
        makes that end's teacher export stale; it is removed, so that ``--checkpoint RUN`` finds the newest
        checkpoint until this run ends and exports again."""
        stale = [self.output_dir / f"teacher_backbone{suffix}" for suffix in (".safetensors", ".json")]
        if any(f.is_file() for f in stale):
            for f in stale:
                f.unlink(missing_ok=True)
            print(f"[fastdinov2] removed {stale[0]} (+ .json): the run continues past the end it was exported "
                  "at; the teacher is exported again when this run ends", file=sys.stderr)

    def _summary(self, end_step: int) -> dict[str, Any]:
        done = self.state.step >= self.curriculum.total_steps
        return {"step": self.state.step, "end_step": end_step, "total_steps": self.curriculum.total_steps,
                "finished": done, "output_dir": str(self.output_dir)}


def finish_run(trainer: Trainer) -> dict[str, Any]:
    """Export the teacher backbone and (when the data has a labelled val split) compare kNN top-1 of the
    trained teacher against the same architecture at random initialisation.

    Every rank calls it: the kNN feature extraction is sharded across ranks (:mod:`fastdinov2.eval.features`);
    rank 0 writes the files and prints.
    """
    from fastdinov2.interop import export_backbone

    cfg, out = trainer.cfg, trainer.output_dir
    result: dict[str, Any] = {}
    teacher = trainer.teacher_backbone()
    if trainer.is_main:
        result["export"] = str(export_backbone(teacher, out / "teacher_backbone"))
    train_dir, val_dir = trainer.data_root / "train", trainer.data_root / "val"
    if cfg.train.knn_at_end and train_dir.is_dir() and val_dir.is_dir():
        from fastdinov2.eval.knn import evaluate_knn
        from fastdinov2.eval.results import write_result
        from fastdinov2.models.vit import build_backbone

        torch.manual_seed(cfg.train.seed)
        random_model = build_backbone(cfg.student, img_size=cfg.crops.global_crops_size).to(trainer.device)
        kw = dict(image_size=cfg.crops.global_crops_size, device=trainer.device, ks=(10, 20))
        trained = evaluate_knn(teacher.eval(), train_dir, val_dir, **kw)
        baseline = evaluate_knn(random_model.eval(), train_dir, val_dir, **kw)
        result["knn"] = {"trained": trained, "random_init": baseline}
        if trainer.is_main:
            write_result(out / "eval" / "knn_end_of_training.json", "knn", str(out),
                         {"data": str(trainer.data_root), "ks": [10, 20]}, result["knn"])
            print(f"[fastdinov2] kNN top-1 on {val_dir}: trained teacher {trained['top1']:.2f}% "
                  f"vs random init {baseline['top1']:.2f}% ({trained['top1'] - baseline['top1']:+.2f} points)")
    return result


def train(cfg: Config, output_dir: Path, allow_config_change: bool = False) -> dict[str, Any]:
    """Run (or continue) training in ``output_dir``; returns a summary dict."""
    trainer = Trainer(cfg, output_dir, allow_config_change=allow_config_change)
    summary = trainer.run()
    summary["history"] = trainer.state.history
    if summary["finished"]:
        summary.update(finish_run(trainer))
    if trainer.is_main:
        with open(output_dir / "summary.json", "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2, default=str)
    return summary
