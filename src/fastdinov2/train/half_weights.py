"""``compute.half_weights``: half-precision copies of the matmul weights, refreshed once per step.

Under autocast every ``nn.Linear`` / ``nn.Conv2d`` call casts its fp32 weight and bias to the autocast dtype
(bf16), and the backward casts each of their gradients back to fp32: one small kernel per tensor and use. For
the student and teacher of a ViT-S/16 step that is about 400 of its ~1,700 kernel-launching calls
(``benchmarks/step.py --count-ops`` under CPU autocast), a large share of a step whose time, at low resolution,
follows the number of kernels.

:class:`HalfWeights` keeps one bf16 copy of each such weight and bias of the student and the teacher, as FSDP's
mixed precision (``param_dtype``) and DINOv2 do:

- :meth:`HalfWeights.refresh` copies the fp32 parameters into the copies: a few multi-tensor kernels, once per
  step before the forward (after the previous step's optimizer update and EMA, and after any checkpoint load);
- inside :meth:`HalfWeights.swapped` the modules use the copies (their ``_parameters`` entries point at them;
  nothing is registered, so ``parameters()``, ``state_dict()`` and checkpoints outside it are the fp32 ones);
  autocast then has nothing to cast;
- :meth:`HalfWeights.collect_grads` moves the student copies' gradients into the fp32 parameters' ``.grad``
  (copied on the first micro-batch of a step, added on later ones), where clipping, AdamW and the finiteness
  check find them.

The arithmetic is the autocast path's: the same bf16 weights enter the same bf16 matmuls, and a weight's
gradient comes out of the matmul in bf16 either way. Only a weight used twice in one backward (the patch
embedding, once per crop size) sums its two contributions in bf16 instead of fp32.

With ``layer_scale=True`` (the trainer passes ``compute.half_residual``) the layer-scale vectors ``gamma`` and
the LayerNorm weights and biases get copies too: the bf16 residual stream multiplies by the gammas in bf16,
and its LayerNorms take bf16 weights on CUDA (a cast per branch and use otherwise); on the fp32 stream they
stay fp32.

Several processes: DDP reduces the registered parameters' gradients through hooks that the copies bypass, so
under ``compute.strategy=ddp`` the trainer averages the gradients itself
(:class:`~fastdinov2.distributed.FlatGradients`, one all-reduce per step after :meth:`HalfWeights.collect_grads`);
FSDP2's mixed precision already computes with bf16 copies (the trainer refuses the combination).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fastdinov2.models.vit import LayerScale

#: Modules whose weight and bias autocast casts for its matmul / convolution.
CAST_MODULES = (nn.Linear, nn.Conv2d)


class HalfWeights:
    """bf16 (``dtype``) copies of the fp32 weights and biases of the ``nn.Linear``/``nn.Conv2d`` modules of
    ``trained`` (copies with gradients) and ``frozen`` (copies without); with ``layer_scale``, also of the
    :class:`~fastdinov2.models.vit.LayerScale` ``gamma`` vectors (for the half residual stream)."""

    def __init__(self, trained: nn.Module, frozen: nn.Module | None, dtype: torch.dtype,
                 layer_scale: bool = False) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"half weights need a half-precision dtype, got {dtype}")
        self.dtype = dtype
        #: (module, parameter name, fp32 parameter, half copy) for every cast weight and bias
        self.slots: list[tuple[nn.Module, str, nn.Parameter, Tensor]] = []
        self.n_trained = 0
        for model, train in ((trained, True), (frozen, False)):
            if model is None:
                continue
            for mod in model.modules():
                if isinstance(mod, CAST_MODULES):
                    names: tuple[str, ...] = ("weight", "bias")
                elif layer_scale and isinstance(mod, LayerScale):
                    names = ("gamma",)
                elif layer_scale and isinstance(mod, nn.LayerNorm):
                    names = ("weight", "bias")  # the half stream's LayerNorm takes them in bf16 on CUDA
                else:
                    continue
                for name in names:
                    p = mod._parameters.get(name)
                    if p is None or p.dtype != torch.float32:
                        continue
                    half = torch.empty_like(p, dtype=dtype).requires_grad_(train and p.requires_grad)
                    self.slots.append((mod, name, p, half))
            if train:
                self.n_trained = len(self.slots)
        # the refresh's two lists, built once (the optimizer and checkpoint loads update the parameters in place)
        self._halves = [s[3] for s in self.slots]
        self._sources = [s[2].detach() for s in self.slots]
        self.refresh()

    @property
    def trained(self) -> list[tuple[nn.Module, str, nn.Parameter, Tensor]]:
        return self.slots[: self.n_trained]

    @torch.no_grad()
    def refresh(self) -> None:
        """fp32 parameters -> half copies (multi-tensor copies; no host synchronisation)."""
        if self.slots:
            torch._foreach_copy_(self._halves, self._sources)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The modules compute with the half copies inside the block; the fp32 parameters are back after it."""
        for mod, name, _, half in self.slots:
            mod._parameters[name] = half  # type: ignore[assignment]  # a plain tensor, as functional_call does
        try:
            yield
        finally:
            for mod, name, p, _ in self.slots:
                mod._parameters[name] = p

    @torch.no_grad()
    def collect_grads(self, accumulate: bool) -> None:
        """Move the trained copies' gradients into the fp32 parameters' ``.grad`` (``accumulate``: add to what
        is there, for the later micro-batches of a step) and clear the copies' gradients."""
        params, grads = [], []
        for _, _, p, half in self.trained:
            if half.grad is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p) if accumulate else torch.empty_like(p)
            params.append(p.grad)
            grads.append(half.grad)
        if params:
            if accumulate:
                torch._foreach_add_(params, grads)
            else:
                torch._foreach_copy_(params, grads)
        for _, _, _, half in self.trained:
            half.grad = None
