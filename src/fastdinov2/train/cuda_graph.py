"""The training step as a CUDA graph (``compute.cuda_graph=true``): one launch per step instead of thousands.

On an H100 the eager ViT-S/16 step at 112/48 spends most of its time launching ~3,000 kernels: replaying
the same kernels as one CUDA graph took it from 105.9 to 31.9 ms (``benchmarks/step.py --cuda-graph``,
docs/benchmarks.md). This module gives the trainer the same capture:

- :class:`DeviceSchedules` — everything a step reads that changes from step to step lives on the device:
  the run's schedules as one table indexed by a device step counter, the optimiser groups' learning rates
  as 0-d views of one device vector (fused AdamW takes a tensor ``lr``), and decoupled weight decay
  applied by the step itself (the fused kernel takes ``weight_decay`` only as a Python number, which a
  graph would freeze at its capture value). The host writes one number per step: the step index.
- :class:`GraphedStep` — runs a step function on static input buffers, one set per batch shape (the uint8
  crops and the colour augmentation's per-crop parameters with ``data.photometric_on=device``, so the
  augmentation is replayed with the step instead of ~250 eager kernels launched by the host): a few
  eager steps first (on a side stream, as PyTorch's whole-network capture recipe asks), then a capture,
  then a replay per step. Graphs share one memory pool (they never run concurrently); everything that
  lives from one step to the next (weights, AdamW moments, centres, the health record, the schedule
  buffers) is allocated outside it, so any graph may follow any other.

Without CUDA nothing is captured: the same step runs eagerly on the static buffers, which is what the tests
on a CPU check against the ordinary step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from fastdinov2.data.collate import TrainBatch
from fastdinov2.data.photometric import PhotometricParams
from fastdinov2.train.plan import Schedules

#: Columns of :attr:`DeviceSchedules.table`, in order.
SCHEDULE_COLUMNS = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr", "backbone_lr_scale")
#: Batch tensors a step reads; their shapes (and dtypes) select the graph.
STATIC_FIELDS = ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight")
#: The pending colour augmentation's parameters (``data.photometric_on=device``), applied inside the step.
PARAM_FIELDS = ("global_params", "local_params")
#: the PhotometricParams fields a step reads on the device (all but the blur kernel size, a shape)
_DEVICE_PARAM_FIELDS = tuple(f.name for f in fields(PhotometricParams) if f.name != "blur_kernel_size")


class DeviceSchedules:
    """The run's per-step schedules on the device, and the optimiser's learning rates as device tensors.

    ``table``: float32 ``[total_steps, 6]`` (:data:`SCHEDULE_COLUMNS`); ``step``: 0-d int64, the global step
    the next step function call reads (the host fills it). :meth:`row` computes each group's lr exactly as
    :func:`~fastdinov2.train.optim.apply_optim_schedules` does,
    ``(last_layer_lr if is_last_layer else lr) * lr_multiplier * (backbone_lr_scale if is_backbone else 1)``,
    into ``lr [G]``, whose 0-d views are the groups' ``lr``. :meth:`decay` then applies AdamW's decoupled
    weight decay ``p *= 1 - lr_g * wd * wd_multiplier_g`` (groups keep ``weight_decay = 0``), the same factor
    the fused kernel would apply first. ``optimizer`` must come from :func:`~fastdinov2.train.optim.build_adamw`
    with the fused kernel (tensor ``lr``, device-side ``found_inf``).
    """

    def __init__(self, schedules: Schedules, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("DeviceSchedules needs the fused AdamW kernel (it takes a tensor lr and found_inf)")
        cols = [schedules.lr, schedules.weight_decay, schedules.momentum, schedules.teacher_temp,
                schedules.last_layer_lr, schedules.backbone_lr_scale]
        self.n_steps = len(schedules.lr)
        self.table = torch.from_numpy(np.stack(cols, axis=1).astype(np.float32)).to(device)  # [S, 6]
        groups = optimizer.param_groups

        def column(key: str, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.tensor([float(g.get(key, False)) for g in groups], dtype=dtype, device=device)

        self.lr_multiplier = column("lr_multiplier")  # [G]
        self.wd_multiplier = column("wd_multiplier")  # [G]
        self.is_last_layer = column("is_last_layer", torch.bool)  # [G]
        self.is_backbone = column("is_backbone", torch.bool)  # [G]
        self.lr = torch.zeros(len(groups), device=device)  # [G], the groups' lr (0-d views)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self._decayed = [(i, list(g["params"])) for i, g in enumerate(groups) if g["wd_multiplier"] != 0]
        self._capturable = device.type == "cuda"
        self.install(optimizer)

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Point every group's ``lr`` at its view of :attr:`lr` and zero its ``weight_decay``. Cheap (Python
        only): called before every step, since loading an optimiser state dict replaces the group values."""
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = self.lr[i]
            group["weight_decay"] = 0.0
            group["capturable"] = self._capturable
        # the eager warm-up steps before a capture are intended: no "capturable=True without capture" warning
        optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]

    def row(self, step: Tensor) -> dict[str, Tensor]:
        """The schedules at ``step`` (0-d int64 device tensor; clamped to the last step, as
        :meth:`Schedules.at`) as 0-d tensors named by :data:`SCHEDULE_COLUMNS`; also writes the groups' lr."""
        r = self.table.index_select(0, step.clamp(max=self.n_steps - 1).reshape(1))[0]  # [6]
        values = dict(zip(SCHEDULE_COLUMNS, r.unbind(), strict=True))
        lr = torch.where(self.is_last_layer, values["last_layer_lr"], values["lr"]) * self.lr_multiplier
        lr = lr * torch.where(self.is_backbone, values["backbone_lr_scale"], 1.0)
        self.lr.copy_(lr)
        return values

    def decay(self, wd: Tensor, apply: Tensor) -> None:
        """Decoupled weight decay of the decayed groups, skipped (factor 1) where ``apply`` (bool 0-d) is False."""
        factor = torch.where(apply, 1.0 - self.lr * wd * self.wd_multiplier, 1.0)  # [G]
        for i, params in self._decayed:
            torch._foreach_mul_([p.detach() for p in params], factor[i])


def step_inputs(batch: TrainBatch) -> dict[str, Tensor]:
    """The tensors a step reads, by name: the :data:`STATIC_FIELDS`, and while the colour augmentation is
    pending (``data.photometric_on=device``) every field of the two :class:`PhotometricParams` but the blur
    kernel size (``"global_params.brightness"``, ...), which stays on the host: it sets the blur's shape, so it
    is part of the graph's key (:func:`batch_key`) instead."""
    out = {f: getattr(batch, f) for f in STATIC_FIELDS}
    for name, params in _pending_params(batch):
        out.update({f"{name}.{f}": getattr(params, f) for f in _DEVICE_PARAM_FIELDS})
    return out


def _pending_params(batch: TrainBatch) -> list[tuple[str, PhotometricParams]]:
    """``(field name, parameters)`` of the batch's pending colour augmentation (none once it is applied)."""
    return [(name, getattr(batch, name)) for name in PARAM_FIELDS if getattr(batch, name) is not None]


def _with_inputs(batch: TrainBatch, tensors: dict[str, Tensor]) -> TrainBatch:
    """``batch`` with the tensors named as in :func:`step_inputs` replaced by ``tensors``."""
    changes: dict[str, object] = {f: tensors[f] for f in STATIC_FIELDS}
    for name, params in _pending_params(batch):
        changes[name] = replace(params, **{f: tensors[f"{name}.{f}"] for f in _DEVICE_PARAM_FIELDS})
    return replace(batch, **changes)


def batch_key(batch: TrainBatch) -> tuple[tuple[str, tuple[int, ...], object], ...]:
    """Names, shapes and dtypes of the tensors a step reads (:func:`step_inputs`), and the blur kernel sizes
    of a pending colour augmentation: one graph per distinct key."""
    key = [(name, tuple(t.shape), t.dtype) for name, t in step_inputs(batch).items()]
    for name, params in _pending_params(batch):  # a CPU tensor (PhotometricParams.to keeps it there): no device read
        key.append((f"{name}.blur_kernel_size", tuple(params.blur_kernel_size.cpu().unique().tolist()), None))
    return tuple(key)


def describe_key(key: tuple[tuple[str, tuple[int, ...], object], ...]) -> str:
    shown = [(name, shape) for name, shape, _ in key if "." not in name or name.endswith("blur_kernel_size")]
    return ", ".join(f"{name} {list(shape)}" for name, shape in shown)


@dataclass
class _Entry:
    batch: TrainBatch  # every tensor on the device; those of step_inputs are the static input buffers
    eager_steps: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    output: Tensor | None = None  # the graph's stacked scalars, overwritten by every replay
    capture_s: float = 0.0


class GraphedStep:
    """Calls ``step_fn(batch) -> {name: 0-d tensor}`` through CUDA graphs, one per batch shape.

    ``step_fn`` must read its step-dependent inputs from device tensors only (:class:`DeviceSchedules`),
    issue no host synchronisation, keep state that outlives a step in tensors updated in place, and
    depend on the batch only through the tensors of :func:`step_inputs`. The batch may be on the host (the
    loader's pinned tensors: each is copied straight into its device buffer, asynchronously) or on the device;
    a batch whose colour augmentation is pending keeps it pending, so the step applies it inside the graph
    (its parameters are inputs like the crops). The first shape runs
    ``warmup_steps`` eager steps (real training steps, on a side stream: lazy initialisation of handles and
    optimiser state happens there), every later shape one (its kernels' plans for the new shape); then the
    shape is captured. The capture itself runs nothing, so the first graphed step is the replay right after
    it. Outputs are copied out after each replay (one small copy), so they stay valid after the next step.
    With DINOv2's batch masking (``ibot.mask_sampling=batch``) the masked-token rows are padded to the
    masking's upper bound (rounded up to ``compute.masked_tokens_bucket``): one shape per curriculum stage, the
    same on every rank (per-crop masking with a bucket of 256: about six), and a long run replays almost every
    step.

    ``capture=False`` (the default without CUDA) runs ``step_fn`` eagerly on the static buffers every time.

    Several processes (collectives inside the step): ``any_failed(failed) -> bool`` must return whether the
    capture failed on any rank (a collective call). Every rank then keeps its graph or every rank runs eagerly
    from then on: NCCL needs each collective to be captured on all ranks or on none.
    """

    def __init__(self, step_fn: Callable[[TrainBatch], dict[str, Tensor]], device: torch.device,
                 warmup_steps: int = 2, capture: bool | None = None, verbose: bool = True,
                 any_failed: Callable[[bool], bool] | None = None) -> None:
        self.step_fn = step_fn
        self.any_failed = any_failed
        self.device = device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.warmup_steps = max(1, warmup_steps) if self.capture else 0
        self.verbose = verbose
        self.entries: dict[tuple, _Entry] = {}
        self.names: list[str] | None = None
        self.capture_failure: str | None = None
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._side = torch.cuda.Stream(device) if self.capture else None

    @property
    def n_graphs(self) -> int:
        return sum(e.graph is not None for e in self.entries.values())

    def __call__(self, batch: TrainBatch) -> dict[str, Tensor]:
        key = batch_key(batch)
        entry = self.entries.get(key)
        inputs = step_inputs(batch)
        if entry is None:
            static = {name: torch.empty_like(t, device=self.device) for name, t in inputs.items()}
            # the fields no step reads (labels, ...) moved once, so that nothing in the step moves them
            entry = self.entries[key] = _Entry(_with_inputs(batch.to(self.device), static))
        # straight from the loader's pinned host tensors into the graph's buffers: one copy per tensor
        for name, buffer in step_inputs(entry.batch).items():
            buffer.copy_(inputs[name], non_blocking=True)
        if not self.capture:
            return self._eager(entry.batch)
        warmup = self.warmup_steps if self.n_graphs == 0 else min(1, self.warmup_steps)
        if entry.graph is None and entry.eager_steps < warmup:
            entry.eager_steps += 1
            return self._eager_on_side_stream(entry.batch)
        if entry.graph is None and not self._capture(entry, key):
            return self._eager(entry.batch)  # the capture failed: from now on every step runs eagerly
        assert entry.graph is not None and entry.output is not None and self.names is not None
        entry.graph.replay()
        return dict(zip(self.names, entry.output.clone().unbind(), strict=True))

    def _eager(self, batch: TrainBatch) -> dict[str, Tensor]:
        out = self.step_fn(batch)
        if self.names is None:
            self.names = list(out)
        elif list(out) != self.names:
            raise RuntimeError(f"the step returned {list(out)}, earlier steps {self.names}")
        return out

    def _eager_on_side_stream(self, batch: TrainBatch) -> dict[str, Tensor]:
        assert self._side is not None
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self._eager(batch)
        main.wait_stream(self._side)
        return out

    def _capture(self, entry: _Entry, key: tuple) -> bool:
        """Capture the step for ``entry``'s shape; False (with a warning) if the capture failed.

        A capture runs nothing on the device, so a failed one leaves weights, optimiser state and the health
        record as they were (they are only changed in place by captured kernels); the step is then run
        eagerly and ``capture`` is turned off for the rest of the run (``capture_failure`` says why)."""
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        failure = None
        try:
            # thread_local: the DataLoader's pin-memory thread keeps working while this thread captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.step_fn(entry.batch)
                if list(out) != self.names:
                    raise RuntimeError(f"the step returned {list(out)} while captured, eagerly {self.names}")
                stacked = torch.stack([v.detach().float() for v in out.values()])
        except Exception as exc:  # e.g. an operation that synchronises, which a capture cannot hold
            failure = f"{type(exc).__name__}: {exc}"
        if self.any_failed is not None and self.any_failed(failure is not None) and failure is None:
            failure = "the capture failed on another rank"
        if failure is not None:
            self.capture, self.capture_failure = False, failure
            print(f"[fastdinov2] WARNING: capturing the training step as a CUDA graph failed for the batch shape "
                  f"({describe_key(key)}): {self.capture_failure}; every step runs eagerly from now on "
                  "(set compute.cuda_graph=false to skip the attempt)", file=sys.stderr)
            self.entries.clear()
            return False
        entry.graph, entry.output = graph, stacked
        entry.capture_s = time.perf_counter() - t0
        if self.verbose:
            print(f"[fastdinov2] CUDA graph {self.n_graphs} captured in {entry.capture_s:.1f} s "
                  f"({describe_key(key)})", file=sys.stderr)
        return True
