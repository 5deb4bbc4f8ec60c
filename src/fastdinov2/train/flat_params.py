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

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def views_of_one_buffer(like: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A new uninitialised buffer ``[sum of numel]`` in ``like``'s dtype and device (one of each), and one
    view of it per tensor of ``like``, shaped like it, end to end in order."""
    if not like:
        raise ValueError("a flat buffer needs at least one tensor")
    dtypes, devices = {t.dtype for t in like}, {t.device for t in like}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"a flat buffer needs one dtype and one device, got {sorted(map(str, dtypes))} on "
                         f"{sorted(map(str, devices))}")
    flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
    return flat, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


class FlatParameters:
    """``module``'s parameters (one dtype, one device) as views into ``flat [sum of numel]``, in the order of
    ``module.parameters()``."""

    def __init__(self, module: nn.Module) -> None:
        self.params = list(module.parameters())
        self.flat, views = views_of_one_buffer(self.params)
        with torch.no_grad():
            for p, view in zip(self.params, views, strict=True):
                view.copy_(p)
                p.data = view
        self._ptrs = [p.data_ptr() for p in self.params]
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


def flatten_pair(student: nn.Module, teacher: nn.Module) -> tuple[FlatParameters, FlatParameters]:
    """The student's and the teacher's parameters, each module in one buffer with the same layout (their
    ``parameters()`` orders correspond, as the EMA pairs them): then ``teacher.flat.lerp_(student.flat, w)``
    is the EMA of every parameter in one kernel, ``w`` a number or a 0-d tensor on the device."""
    s, t = FlatParameters(student), FlatParameters(teacher)
    if [p.shape for p in s.params] != [p.shape for p in t.params] or s.flat.dtype != t.flat.dtype:
        raise ValueError("the student's and the teacher's parameters differ in shape or order")
    return s, t
