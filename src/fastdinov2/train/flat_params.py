"""Parameters as views into one contiguous buffer, so that the EMA teacher update is one kernel.

The trainer's EMA, ``teacher += w * (student - teacher)`` with ``w = ok * (1 - momentum)`` a device tensor
(the finiteness gate and, in the CUDA-graph step, the momentum schedule both live on the device), had to be
three multi-tensor passes: ``_foreach_lerp_`` takes its weight only as a Python number, which would mean a
host read. Those passes move 32 bytes per parameter (read student and teacher, write the difference; read
and write it scaled; read teacher and difference, write teacher), as much memory traffic as the fused AdamW
step itself (ViT-B/16 with its heads, 109M parameters: 3.5 GB per step each, counted by
``benchmarks/step.py --count-ops``). With the student's and the teacher's parameters laid out alike in one
buffer each, the update is ``teacher_flat.lerp_(student_flat, w)``: one kernel, 12 bytes per parameter.

:class:`FlatParameters` re-points each parameter's ``.data`` at its slice of a new buffer (the values are
copied first; the ``Parameter`` objects, their names, ``requires_grad`` and every reference to them stay as
they were, so optimizers, hooks and state dicts see no difference; a state dict holds views into the buffer,
which ``torch.save`` stores once). Anything that later replaces a parameter's ``.data`` (``module.to()``,
``load_state_dict(assign=True)``, FSDP's sharding; DDP's wrapper does not) breaks the layout;
:meth:`FlatParameters.intact` notices it and the EMA falls back to the multi-tensor passes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatParameters:
    """``module``'s parameters (one dtype, one device) as views into ``flat [sum of numel]``, in the order of
    ``module.parameters()``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        params = list(module.parameters())
        if not params:
            raise ValueError("FlatParameters needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"FlatParameters needs one dtype and one device, got {sorted(map(str, dtypes))} on "
                             f"{sorted(map(str, devices))}")
        self.params = params
        self.shapes = [tuple(p.shape) for p in params]
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        offset = 0
        with torch.no_grad():
            for p in params:
                view = self.flat[offset:offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
        self._ptrs = [p.data_ptr() for p in params]
        # where each parameter is registered: (owning module, attribute), in the order of module.parameters()
        self._owners = []
        for name, _ in module.named_parameters():
            owner, _, attr = name.rpartition(".")
            self._owners.append((module.get_submodule(owner) if owner else module, attr))

    def intact(self) -> bool:
        """The module still has these parameters, each still its view into :attr:`flat` (nothing replaced a
        parameter or its ``.data`` since). A dict lookup and a pointer per parameter (~183 for ViT-B/16 with its
        heads), no walk over the module tree."""
        return all(owner._parameters.get(attr) is p and p.data_ptr() == ptr
                   for (owner, attr), p, ptr in zip(self._owners, self.params, self._ptrs, strict=True))

    def same_layout(self, other: FlatParameters) -> bool:
        return self.shapes == other.shapes and self.flat.dtype == other.flat.dtype


def flatten_pair(student: nn.Module, teacher: nn.Module) -> tuple[FlatParameters, FlatParameters]:
    """The student's and the teacher's parameters, each module in one buffer with the same layout (their
    ``parameters()`` orders correspond, as the EMA pairs them)."""
    s, t = FlatParameters(student), FlatParameters(teacher)
    if not s.same_layout(t):
        raise ValueError("the student's and the teacher's parameters differ in shape or order")
    return s, t


def lerp_flat(teacher: FlatParameters, student: FlatParameters, weight: float | Tensor) -> None:
    """``teacher += weight * (student - teacher)`` over every parameter in one kernel; ``weight`` may be a
    0-d tensor on the parameters' device (read there, not on the host)."""
    teacher.flat.lerp_(student.flat, weight)
