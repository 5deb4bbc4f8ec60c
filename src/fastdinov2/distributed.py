"""Everything fastdinov2 does with ``torch.distributed`` lives here.

Model and loss code import only the guarded helpers below (:func:`all_reduce_sum`, :func:`get_rank`,
:func:`get_world_size`), which are no-ops in a single process, so every loss runs unchanged on one CPU
process. Process-group set-up (:func:`init_distributed`, :func:`destroy`) and the data parallelism
(:func:`wrap_student`, :func:`shard_teacher`) are applied from outside the model, as in torchtitan.

Strategies (``compute.strategy``):

- ``ddp``: the student is wrapped in ``DistributedDataParallel``; every rank holds full copies of student,
  teacher and optimizer state; gradients are averaged across ranks in backward.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` shards every parameter on dim 0 across the ranks (one
  FSDP unit per transformer block, per head and for the rest of the backbone). The teacher is sharded the
  same way, so each rank's teacher shard lines up with its student shard and the EMA update works on local
  shards. Checkpoints gather full state dicts (:func:`full_model_state_dict`,
  :func:`full_optimizer_state_dict`), so they have the same layout as single-process and DDP checkpoints
  and load at any world size.

With one process neither strategy wraps anything: ``fastdinov2 train`` behaves exactly as without torchrun.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn

from fastdinov2.train.flat_params import views_of_one_buffer

Strategy = Literal["ddp", "fsdp2"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2")

#: torchrun's environment: a process is part of a launch when all of these are set.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- queries (safe in a single process) ---------------------------------------------------------------
def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (identity in a single process); returns it."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``tensor`` over all ranks, in place (identity in a single process)."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks, in place (identity in a single process); returns it."""
    world = get_world_size()
    if is_enabled() and world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_enabled() and get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects only; identity in a single process)."""
    if not (is_enabled() and get_world_size() > 1):
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class FlagAgreement:
    """Whether any rank has raised a host-side flag (a preemption signal), agreed one call late, without a
    device synchronisation.

    Every rank calls :meth:`poll` at the same points (each step boundary). A call starts an asynchronous MAX
    all-reduce of a CPU scalar (gloo, also under ``cuda:nccl,cpu:gloo``) and returns the result of the
    previous call's, which has long finished, so all ranks get the same answer at the same call. In a single
    process the flag is returned as it is.
    """

    def __init__(self) -> None:
        self._work: Any = None
        self._value: torch.Tensor | None = None

    def poll(self, flag: bool) -> bool:
        if not (is_enabled() and get_world_size() > 1):
            return flag
        agreed = self._finish()
        self._value = torch.tensor([1.0 if flag else 0.0])
        self._work = dist.all_reduce(self._value, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def _finish(self) -> bool:
        if self._work is None or self._value is None:
            return False
        self._work.wait()
        agreed = bool(self._value.item() > 0)
        self._work = self._value = None
        return agreed

    def close(self) -> None:
        """Wait for the outstanding all-reduce (every rank must call it at the same point)."""
        self._finish()


class _CPUArray:
    """A tensor in transit through an object collective (pickled as a numpy array)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.array = t.detach().cpu().numpy()


def _pack(obj: Any) -> Any:
    # all_gather_object of this PyTorch fails to unpickle tensors ("UntypedStorage has no attribute
    # dtype"); numpy arrays travel safely.
    if isinstance(obj, torch.Tensor):
        return _CPUArray(obj)
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, _CPUArray):
        return torch.from_numpy(obj.array)
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_unpack(v) for v in obj)
    return obj


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process). Tensors inside
    ``obj`` arrive as CPU tensors."""
    if not (is_enabled() and get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, _pack(obj))
    return [_unpack(o) for o in out]


# ---- process group --------------------------------------------------------------------------------------
def _env_int(name: str, minimum: int) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise RuntimeError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def launched_by_torchrun() -> bool:
    """True when torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) are all set."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_distributed(device_type: str = "cpu", timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group that torchrun describes in the environment; returns ``(rank, world, local_rank)``.

    Without torchrun's variables (a plain ``python -m fastdinov2 train``) nothing is initialised and
    ``(0, 1, 0)`` is returned. ``device_type="cuda"`` selects ``cuda:LOCAL_RANK`` as the current device and
    the backend ``cuda:nccl,cpu:gloo`` (NCCL for device tensors, gloo for CPU tensors and objects);
    ``"cpu"`` uses gloo. Calling it again when a group already exists returns the existing ranks.
    """
    if is_enabled():
        return get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if not launched_by_torchrun():
        partial = [v for v in TORCHRUN_VARS if v in os.environ]
        if {"RANK", "WORLD_SIZE"} & set(partial):  # half a torchrun environment: refuse to guess
            missing = [v for v in TORCHRUN_VARS if v not in os.environ]
            raise RuntimeError(
                f"incomplete torchrun environment: {', '.join(partial)} set but {', '.join(missing)} missing; "
                "launch with torchrun (see docs/distributed.md) or unset them"
            )
        return 0, 1, 0
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if rank >= world:
        raise RuntimeError(f"environment variable RANK={rank} must be < WORLD_SIZE={world}")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested for the process group but CUDA is not available")
        n_dev = torch.cuda.device_count()
        if local_rank >= n_dev:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {n_dev} CUDA device(s); "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        backend = "cuda:nccl,cpu:gloo"
    elif device_type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    # torchrun keeps one store across the restarts of its workers, and a restarted worker could read the
    # address a dead peer published in the previous round: keep each round's keys apart.
    store = dist.PrefixStore(f"fastdinov2/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world, local_rank


#: Seconds :func:`destroy` releases the GIL for after leaving the process group (see there).
EXIT_GRACE_S = 0.2


def destroy() -> None:
    """Leave the process group (no-op when none is initialised).

    Then wait :data:`EXIT_GRACE_S` with the GIL released. A gloo worker thread frees a finished collective's
    work object only after the caller's ``wait()`` has returned; when that drops the last reference to a
    tensor made in Python, the thread needs the GIL. If the interpreter is already shutting down by then,
    Python ends the thread inside a C++ destructor and the process aborts ("terminate called without an
    active exception", SIGABRT, no traceback): about 1 in 90 two-process CPU runs here; the core dump showed
    ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllgatherWork`` ->
    ``decref_pyobject`` -> ``take_gil`` -> ``PyThread_exit_thread`` while the main thread was in
    ``Py_FinalizeEx``. The pause lets those threads finish first.
    """
    _MESHES.clear()
    if is_enabled():
        dist.destroy_process_group()
        time.sleep(EXIT_GRACE_S)


# ---- data parallelism -----------------------------------------------------------------------------------
def _fsdp_units(module: nn.Module) -> list[nn.Module]:
    """Sub-modules that become their own FSDP unit: each backbone block, then each head."""
    units: list[nn.Module] = []
    backbone = getattr(module, "backbone", None)
    if backbone is None or not hasattr(backbone, "blocks"):
        raise ValueError(f"fsdp2 expects a module with backbone.blocks (student/teacher), got {type(module)}")
    units.extend(backbone.blocks)
    for name in ("dino_head", "ibot_head"):
        head = getattr(module, name, None)
        if head is not None:
            units.append(head)
    return units


_MESHES: dict[str, Any] = {}


def _mesh(device_type: str) -> Any:
    """One 1-D device mesh over all ranks per device type, shared by student and teacher."""
    if device_type not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[device_type] = init_device_mesh(device_type, (get_world_size(),))
    return _MESHES[device_type]


def _fully_shard(module: nn.Module, device: torch.device, param_dtype: torch.dtype | None, root: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # forward_features returns views (CLS / patch slices of one tensor); nothing modifies them in place, so
    # FSDP2's warning about in-place ops on view outputs does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    kw: dict[str, Any] = {"mesh": _mesh(device.type)}
    if not root:
        # Without a root unit, the first unit to run would count as a root and keep its parameters
        # gathered after forward; the teacher has no backward, so every unit reshards right away.
        kw["reshard_after_forward"] = True
    if param_dtype is not None and param_dtype != torch.float32:
        # Compute in bf16, reduce gradients in fp32 (the optimizer keeps fp32 master shards).
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in _fsdp_units(module):
        fully_shard(unit, **kw)
    backbone = cast(nn.Module, module.backbone)
    fully_shard(backbone, **kw)
    # The meta-architecture calls backbone.forward_features (not forward): let FSDP gather around it too.
    register_fsdp_forward_method(backbone, "forward_features")
    if root:
        fully_shard(module, **kw)


def wrap_student(
    module: nn.Module, strategy: str, device: torch.device, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply data parallelism to the student; returns the module the training step should call.

    - one process: ``module`` itself (nothing is wrapped);
    - ``"ddp"``: a ``DistributedDataParallel`` wrapper around ``module`` (``module``'s parameters are shared
      with it, so the optimizer and the EMA can keep using ``module``);
    - ``"fsdp2"``: ``module`` itself, sharded in place by ``fully_shard`` (its parameters become DTensors:
      build the optimizer after this call). ``param_dtype`` (bf16/fp16) sets FSDP's compute dtype.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"compute.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if get_world_size() == 1:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
    _fully_shard(module, device, param_dtype, root=True)
    return module


def shard_teacher(
    module: nn.Module, strategy: str, device: torch.device, param_dtype: torch.dtype | None = None
) -> None:
    """Shard the EMA teacher like the student under ``fsdp2`` (no-op for ``ddp`` or one process).

    Its units are those of the student, so every teacher parameter has the student's placement and the
    foreach EMA pairs matching local shards. The teacher root is not an FSDP unit: only
    ``backbone.forward_features`` and the heads are ever called on it, and those are units themselves, so
    every teacher parameter is resharded right after the no-grad forward.
    """
    if strategy != "fsdp2" or get_world_size() == 1:
        return
    _fully_shard(module, device, param_dtype, root=False)
    from torch.distributed.tensor import DTensor

    loose = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    if loose:
        raise RuntimeError(f"fsdp2: teacher parameters outside every FSDP unit: {', '.join(loose[:5])}")


class FlatGradients:
    """Data parallelism without a wrapper: the gradients of ``params`` live in one flat buffer per (device, dtype),
    averaged across ranks by one ``all_reduce`` per buffer after the backward (:meth:`all_reduce`).

    ``compute.strategy=ddp`` uses it instead of ``DistributedDataParallel`` when the step is replayed as one CUDA
    graph (``compute.cuda_graph``) or its forward computes with half copies of the weights
    (``compute.half_weights``): DDP's reducer hooks into the registered parameters' gradient accumulation
    during the backward, which the copies bypass and which a graph capture would have to hold. NCCL
    collectives can be captured (NCCL >= 2.9.6), so the whole step, all-reduce included, is one graph. The
    reduction does not overlap the backward as DDP's buckets do; one all-reduce of the whole gradient per step
    costs ~1 ms for ViT-S/16 (176 MB) over NVLink.

    Each parameter's ``.grad`` is a view of the buffer (as DDP's ``gradient_as_bucket_view``): :meth:`zero_`
    replaces ``optimizer.zero_grad`` (the views stay), the backward accumulates into them in place, and
    clipping, AdamW and the finiteness check read them as ordinary gradients. The parameters are broadcast from
    rank 0 once, as DDP does at construction.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.buffers: list[torch.Tensor] = []
        view_of: dict[int, torch.Tensor] = {}
        for group in groups.values():
            flat, views = views_of_one_buffer(group)
            self.buffers.append(flat.zero_())
            view_of.update((id(p), view) for p, view in zip(group, views, strict=True))
        self.views = [view_of[id(p)] for p in self.params]  # in the order of self.params
        if is_enabled() and get_world_size() > 1:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0)
        self.attach()

    def attach(self) -> None:
        """Point every ``.grad`` at its view of the buffer. A gradient that something put in its place (e.g. set
        to ``None`` and re-created by a backward) is copied into the view first, or zeroed there if ``None``."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:
                with torch.no_grad():
                    view.copy_(p.grad) if p.grad is not None else view.zero_()
                p.grad = view

    def zero_(self) -> None:
        """Zero the gradients in place (instead of ``optimizer.zero_grad``); the views stay attached."""
        self.attach()
        for flat in self.buffers:
            flat.zero_()

    def all_reduce(self) -> None:
        """Average the gradients over the ranks: per buffer one division by the world size and one ``all_reduce``
        (sum), as DDP's default hook does, on the current stream, so a CUDA graph of the step captures them.
        Runs even in a one-rank group."""
        self.attach()
        if not is_enabled():
            return
        world = get_world_size()
        for flat in self.buffers:
            if world > 1:
                flat.div_(world)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)


def is_sharded(module: nn.Module) -> bool:
    """True when ``module``'s parameters are DTensors (sharded by :func:`wrap_student`/:func:`shard_teacher`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def gradient_sync(student: nn.Module, enabled: bool) -> Iterator[None]:
    """Context for one micro-batch's backward: with ``enabled=False`` gradients are only accumulated
    locally (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync(False)``); the last micro-batch of a
    step runs with ``enabled=True`` and reduces the accumulated gradients across ranks once."""
    no_sync = getattr(student, "no_sync", None)  # DDP
    set_sync = getattr(student, "set_requires_gradient_sync", None)  # FSDP2
    if enabled or (no_sync is None and set_sync is None):
        yield
    elif no_sync is not None:
        with no_sync():
            yield
    else:
        assert set_sync is not None
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (over all ranks' shards for DTensors), clipping them
    to ``max_norm`` when ``max_norm > 0``. Returns the norm before clipping (a plain scalar tensor)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the sum of the shards' squared norms, reduced across ranks
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ---- full (unsharded) state dicts, the on-disk format at every world size --------------------------------
def full_model_state_dict(module: nn.Module, all_ranks: bool = False) -> dict[str, Any]:
    """``module``'s full state dict. Plain modules: ``module.state_dict()``. Sharded modules: a collective
    (every rank must call it); the full tensors land on rank 0's CPU and the other ranks get ``{}``, or,
    with ``all_ranks=True``, every rank gets them on its device."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    return get_model_state_dict(module, options=options)


def load_full_model_state_dict(module: nn.Module, state: dict[str, Any]) -> None:
    """Load a full state dict (as written by :func:`full_model_state_dict`) into a plain or sharded module;
    every rank passes the full dict (it is sliced locally for sharded modules). Strict on keys."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order ``optimizer.state_dict()`` numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to its full shape.

    The layout is that of a single-process optimizer (states keyed by parameter index), so a checkpoint
    loads at any world size. For sharded parameters this is a collective: every rank must call it; the
    full tensors are kept (on the CPU) by rank 0 only, the other ranks get ``None`` in their place.
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()  # its per-parameter dicts are the live state: build new ones
    keep = is_main_process()

    def full(value: Any) -> Any:
        if not isinstance(value, DTensor):
            return value
        gathered = value.full_tensor()
        return gathered.cpu() if keep else None

    return {**sd, "state": {i: {k: full(v) for k, v in per_param.items()} for i, per_param in sd["state"].items()}}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state dict written by :func:`full_optimizer_state_dict` (or a plain ``optimizer.state_dict()``)
    into an optimizer over plain or sharded parameters; each rank keeps its own slice of every state tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = _flat_params(optimizer)
    converted = {"param_groups": state["param_groups"], "state": {}}
    for idx, per_param in state["state"].items():
        p = params[int(idx)]
        out = {}
        for key, value in per_param.items():
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape:
                # Every rank holds the full tensor: slice locally (src_data_rank=None), no communication.
                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                          src_data_rank=None)
            out[key] = value
        converted["state"][idx] = out
    optimizer.load_state_dict(converted)
