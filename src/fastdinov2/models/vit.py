"""The DINOv2 Vision Transformer, read top to bottom: patch embedding, attention, feed-forward layers,
layer scale, stochastic depth, the block, and the whole network.

Parameter names are those of the official DINOv2 backbones (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,
norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*``, ``norm.*``; SwiGLU blocks use ``mlp.w12``/``mlp.w3``), so official and
seed checkpoints load without renaming (see :mod:`fastdinov2.interop`).

Shapes: ``B`` batch, ``D`` embed dim, ``R`` register tokens, ``N`` patch tokens of the input grid.
Token order inside the network is ``[cls, registers..., patches...]``; registers carry no position embedding.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from fastdinov2.config import StudentConfig

FFNLayer = Literal["mlp", "swiglu"]
#: Packed sequences: ``((B_1, L_1), (B_2, L_2), ...)``, B_i sequences of L_i tokens each, end to end.
Segments = tuple[tuple[int, int], ...]
Arch = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2", "vit_custom"]

# (embed_dim, depth, num_heads) of the named widths.
ARCH_WIDTHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}

LAYER_NORM_EPS = 1e-6  # DINOv2 uses LayerNorm(eps=1e-6) everywhere
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``x``'s device, or ``None`` (no autocast there; e.g. the meta device)."""
    dt = x.device.type
    if dt in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return None


def layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``, keeping a half-precision ``x`` (the half residual stream, see
    :attr:`DinoVisionTransformer.half_residual`) in its dtype under autocast.

    CUDA autocast runs ``layer_norm`` in fp32 and returns fp32, which the next linear layer casts back: for a
    bf16 ``x`` that is a 2x wider output and one more kernel. Here the LayerNorm of a bf16/fp16 ``x`` runs with
    autocast off, its statistics in fp32 inside the kernel and its output in ``x``'s dtype; an fp32 ``x`` goes
    through ``norm`` unchanged. Off the CPU the weight and bias enter in ``x``'s dtype: the CPU kernel takes
    fp32 ones with a bf16 input, the CUDA kernel does not ("expected scalar type BFloat16 but found Float");
    ``compute.half_weights`` keeps bf16 copies of them with the half stream, so that the cast is a no-op.
    """
    if isinstance(norm, nn.LayerNorm) and x.dtype in (torch.bfloat16, torch.float16) and _autocast_dtype(x):
        w, b = norm.weight, norm.bias
        if x.device.type != "cpu":
            w = None if w is None else w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)
    return norm(x)


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample position embeddings to another patch grid (bicubic; the class position is kept).

    Args:
        pos_embed: ``[1, 1 + M*M, D]`` (class position first, then a square ``M x M`` patch grid).
        grid: target ``(rows, cols)``; they may differ.
    Returns:
        ``[1, 1 + rows*cols, D]`` in the dtype of ``pos_embed``. The input tensor itself when the grid
        is already ``(M, M)`` (no interpolation call, so the native grid is exactly the identity).
    """
    n_patches = pos_embed.shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"pos_embed holds {n_patches} patch positions, which is not a square grid")
    rows, cols = grid
    if (rows, cols) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    class_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:]
    if patch_pos.dtype not in (torch.float32, torch.float64):  # interpolate half precision in fp32
        patch_pos = patch_pos.float()
    matrix = _bicubic_matrix(side, rows, cols, patch_pos.device, patch_pos.dtype)
    if matrix is not None:
        # an fp32 product, not autocast's bf16 one
        off = (torch.autocast(patch_pos.device.type, enabled=False) if _autocast_dtype(patch_pos) is not None
               else contextlib.nullcontext())
        with off:
            patch_pos = torch.matmul(matrix, patch_pos)  # [R*C, M*M] @ [1, M*M, D] -> [1, R*C, D]
    else:
        patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
        patch_pos = F.interpolate(patch_pos, size=(rows, cols), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((class_pos, patch_pos.to(pos_embed.dtype)), dim=1)


#: the largest matrix made (elements, 16 MB in fp32); a larger resampling interpolates directly
_BICUBIC_MATRIX_MAX = 1 << 22
#: how many matrices are kept (least recently used first out)
_BICUBIC_MATRICES_KEPT = 32
#: (side, rows, cols, device, dtype) -> the bicubic resampling as a matrix ``[rows*cols, side*side]``
_BICUBIC_MATRICES: OrderedDict[tuple[int, int, int, str, torch.dtype], Tensor] = OrderedDict()


def _bicubic_matrix(side: int, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """``F.interpolate(mode="bicubic", align_corners=False)`` from a ``side x side`` grid to ``rows x cols`` as a
    matrix ``K [rows*cols, side*side]`` (the resampling is linear: ``out = K @ grid``, row-major grids), cached per
    shape, device and dtype (the :data:`_BICUBIC_MATRICES_KEPT` most recently used). ``None``, and the caller
    interpolates directly, where a new one is not worth making or cannot be made now: without gradients
    (evaluation, where images of many sizes would each make one for a single use; the teacher of a training
    step finds the student's), above :data:`_BICUBIC_MATRIX_MAX` elements, inside ``torch.compile``'s
    tracing, or during a CUDA-graph capture (the trainer's eager warm-up steps make them first).

    Why: CUDA's bicubic kernel runs one thread per output position and loops over the channels, so resampling
    ``[1, D, 14, 14]`` to ``7 x 7`` runs 49 threads; on an H100 its forward and backward took ~0.3 ms per call,
    ~1 ms per ViT-S/16 step at 112/48. The matrix product (and its backward, one more) takes microseconds. ``K``
    is the interpolation of the identity basis, computed once in float64 on the CPU, so it holds the kernel's
    exact weights, borders included."""
    key = (side, rows, cols, str(device), dtype)
    matrix = _BICUBIC_MATRICES.get(key)
    if matrix is not None:
        if not torch.compiler.is_compiling():
            _BICUBIC_MATRICES.move_to_end(key)
        return matrix
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or rows * cols * side * side > _BICUBIC_MATRIX_MAX):
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    basis = torch.eye(side * side, dtype=torch.float64).reshape(side * side, 1, side, side)
    out = F.interpolate(basis, size=(rows, cols), mode="bicubic", align_corners=False)  # [M*M, 1, R, C]
    matrix = out.reshape(side * side, rows * cols).t().contiguous().to(device=device, dtype=dtype)
    _BICUBIC_MATRICES[key] = matrix
    while len(_BICUBIC_MATRICES) > _BICUBIC_MATRICES_KEPT:
        _BICUBIC_MATRICES.popitem(last=False)
    return matrix


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> tokens: ``[B, C, H, W] -> [B, (H/p)*(W/p), D]``.

    The parameters are those of DINOv2's ``nn.Conv2d(C, D, kernel_size=p, stride=p)`` (``proj.weight``
    ``[D, C, p, p]``, ``proj.bias`` ``[D]``; checkpoints are unchanged), but the forward computes the same
    product as one matmul over the unfolded patches ``[B, N, C*p*p]``. A stride-p convolution with 3 input
    channels is a poor fit for cuDNN: on an H100 it ran as ``implicit_convolve_sgemm``, 2.3 ms forward and
    0.9 ms backward per step of ViT-S/16 at 224/96 (3 calls), where the matmul takes a few tens of
    microseconds (``benchmarks/step.py --profile``, docs/benchmarks.md).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def unfold(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p]``: each patch's values in the weight's ``(C, p, p)`` order."""
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)

    def _project(self, patches: Tensor) -> Tensor:
        weight = self.proj.weight
        return F.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._project(self.unfold(x))

    def forward_many(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`forward` of several inputs (e.g. crops of two sizes) as one matmul over all their patches:
        ``[B_i, C, H_i, W_i] -> [B_i, N_i, D]`` each. One product forward and one for the weight's gradient,
        where one call per input would sum the inputs' weight gradients afterwards (in bf16 under
        ``compute.half_weights``)."""
        if len(xs) == 1:
            return [self(xs[0])]
        patches = [self.unfold(x) for x in xs]
        k = patches[0].shape[-1]
        flat = self._project(torch.cat([q.reshape(-1, k) for q in patches]))  # [sum B_i N_i, D]
        sizes = [q.shape[0] * q.shape[1] for q in patches]
        return [t.view(q.shape[0], q.shape[1], -1) for t, q in zip(flat.split(sizes), patches, strict=True)]


def _split_heads(qkv: Tensor, segments: Segments, num_heads: int) -> list[Tensor]:
    """Packed ``qkv [1, T, 3D]`` -> ``[q, k, v, q, k, v, ...]``, views ``[n, heads, L, D/heads]`` per segment."""
    d = qkv.shape[-1] // 3
    out: list[Tensor] = []
    start = 0
    for n, length in segments:
        part = qkv[:, start:start + n * length].view(n, length, 3, num_heads, d // num_heads)
        out.extend(part.permute(2, 0, 3, 1, 4).unbind(0))
        start += n * length
    return out


def _head_views(t: Tensor, segments: Segments, num_heads: int) -> list[Tensor]:
    """Packed ``t [1, T, D]`` -> per segment a view ``[n, heads, L, D/heads]`` (the attention output layout)."""
    d = t.shape[-1]
    views: list[Tensor] = []
    start = 0
    for n, length in segments:
        views.append(t[:, start:start + n * length].view(n, length, num_heads, d // num_heads).transpose(1, 2))
        start += n * length
    return views


def _merge_heads(segments: Segments, outs: Sequence[Tensor]) -> Tensor:
    """Attention outputs ``[n, heads, L, D/heads]`` per segment -> one new packed ``[1, T, D]`` tensor."""
    _, heads, _, hd = outs[0].shape
    out = outs[0].new_empty(1, sum(n * length for n, length in segments), heads * hd)
    for view, o in zip(_head_views(out, segments, heads), outs, strict=True):
        view.copy_(o)
    return out


class _SplitHeads(torch.autograd.Function):
    """Packed ``qkv [1, T, 3D]`` -> ``q, k, v`` views ``[n, heads, L, D/heads]`` for each segment ``(n, L)``.

    The forward returns views (no copy). The backward writes every segment's ``dq, dk, dv`` straight into one
    ``[1, T, 3D]`` gradient: one strided copy each, so the gradient is written once. Autograd's own backward
    of the slicing, ``reshape``, ``permute`` and ``unbind`` chain stacks the three gradients (a copy),
    copies the non-contiguous stack back to ``qkv``'s layout (a second copy) and, with more than one
    segment, zero-fills a full-size gradient per segment and sums them.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, segments: Segments, num_heads: int) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.segments, ctx.num_heads, ctx.shape = segments, num_heads, qkv.shape
        return tuple(_split_heads(qkv, segments, num_heads))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        like = next(g for g in grads if g is not None)
        grad = like.new_empty(ctx.shape)
        # the gradient's views in the forward's q, k, v layout: dq, dk, dv copy in as they are
        for view, g in zip(_split_heads(grad, ctx.segments, ctx.num_heads), grads, strict=True):
            view.zero_() if g is None else view.copy_(g)
        return grad, None, None


class _MergeHeads(torch.autograd.Function):
    """Attention outputs ``[n, heads, L, D/heads]`` of each segment -> packed ``[1, T, D]`` (one strided copy
    per segment into a new tensor). The backward hands each segment a view of the packed gradient, with no
    copy; autograd's backward of copying into slices of a new tensor clones the full gradient per segment."""

    @staticmethod
    def forward(ctx: Any, segments: Segments, *outs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.segments, ctx.heads = segments, outs[0].shape[1]
        return _merge_heads(segments, outs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *_head_views(grad, ctx.segments, ctx.heads))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, segments: Segments | None = None) -> Tensor:
        """``segments``: ``x`` is ``[1, T, D]``, the tokens of several batches of sequences packed end to end,
        ``((B_1, L_1), (B_2, L_2), ...)`` with ``T = sum B_i * L_i``; attention runs within each sequence
        (one call per segment), everything else on all tokens at once."""
        b, t, d = x.shape
        if segments is None:  # a batch of B sequences of T tokens is one segment of the packed layout
            segments = ((b, t),)
        elif sum(n * length for n, length in segments) != t or b != 1:
            raise ValueError(f"segments {segments} do not pack an input of shape {tuple(x.shape)}")
        qkv = self.qkv(x).view(1, b * t, 3 * d)  # [1, T, 3D]
        # the autograd functions only where a backward will run: inference (evaluation, tracing, export) sees
        # plain view and copy operators
        train = torch.is_grad_enabled() and qkv.requires_grad
        # q, k, v [n, heads, L, D/heads] per segment
        qkvs = _SplitHeads.apply(qkv, segments, self.num_heads) if train else _split_heads(qkv, segments,
                                                                                           self.num_heads)
        # default scale head_dim ** -0.5; each segment's output is written, transposed, into its slice of
        # one [1, T, D] tensor (one copy, no concatenation)
        outs = [F.scaled_dot_product_attention(*qkvs[i:i + 3]) for i in range(0, len(qkvs), 3)]
        merged = _MergeHeads.apply(segments, *outs) if train else _merge_heads(segments, outs)
        return self.proj(merged.view(b, t, d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear: ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of 8 (giant2: 6144 -> 4096)."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (DINOv2 names): ``w12`` makes both halves, ``w3`` projects back.

    ``[..., D] -> [..., D]``; ``hidden_features`` is the MLP width ``int(D * mlp_ratio)`` before the 2/3 rule.
    """

    def __init__(self, dim: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * gamma`` (CaiT), ``gamma`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zero the residual branch of a sample with probability
    ``drop_prob`` and rescale the kept ones by ``1 / (1 - drop_prob)``. Draws from torch's default
    generator (the trainer seeds it). Identity in eval mode or when ``drop_prob == 0``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    ``[B, T, D] -> [B, T, D]``. ``layerscale_init=None`` builds no LayerScale (no ``ls1``/``ls2`` keys).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        layerscale_init: float | None = 1e-5,
        ffn_layer: FFNLayer = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1: nn.Module = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden, bias=ffn_bias)
        elif ffn_layer == "swiglu":
            self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias)
        else:
            raise ValueError(f"ffn_layer {ffn_layer!r} is not one of 'mlp', 'swiglu'")
        self.ls2: nn.Module = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def _draw_keep(self, x: Tensor, segments: Segments | None) -> Tensor:
        """One stochastic-depth draw for a branch output ``x``: 0/1 in ``x``'s dtype per sequence, ``[B, 1, 1]``,
        or per token ``[1, T, 1]`` for packed ``segments`` (every token of a sequence alike)."""
        keep = 1.0 - self.drop_path.drop_prob
        if segments is None:
            return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return _per_token(x.new_empty(sum(n for n, _ in segments)).bernoulli_(keep), segments).view(1, -1, 1)

    def _add_branch(self, x: Tensor, branch: Tensor, ls: nn.Module, segments: Segments | None = None,
                    keep: Tensor | None = None) -> Tensor:
        """``x + drop_path(ls(branch))``: the layer scale and the stochastic-depth factor applied by one
        ``addcmul`` (and one multiply by the 0/1 draw), the same result as the three modules in sequence (to
        rounding). ``keep``: this branch's draw, 0/1 ``[B, 1, 1]`` or per token ``[1, T, 1]`` (drawn for all
        blocks at once by :meth:`DinoVisionTransformer.stochastic_depth_draws`); ``None``: drawn here. With
        ``segments`` (packed sequences, :meth:`Attention.forward`) a sample is one sequence of a segment."""
        gamma = ls.gamma if isinstance(ls, LayerScale) else None
        dp = self.drop_path
        value = 1.0
        if dp.drop_prob > 0.0 and dp.training:
            value = 1.0 / (1.0 - dp.drop_prob)  # as addcmul's scalar: no division kernel, forward or backward
            if keep is None:
                keep = self._draw_keep(branch, segments)
        else:
            keep = None
        if gamma is None:
            return x + branch if keep is None else torch.add(x, branch * keep, alpha=value)
        if torch.is_grad_enabled() and (x.requires_grad or branch.requires_grad or gamma.requires_grad):
            return _LayerScaleResidual.apply(x, branch, gamma, keep, value)
        # a no-op cast for the fp32 stream
        return torch.addcmul(x, branch if keep is None else branch * keep, gamma.to(x.dtype), value=value)

    def forward(self, x: Tensor, segments: Segments | None = None,
                keeps: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``[B, T, D] -> [B, T, D]``; with ``segments``, ``x`` is ``[1, T, D]`` packed (:meth:`Attention.forward`).
        ``keeps``: the stochastic-depth draws of the two branches (see :meth:`_add_branch`); ``None``: drawn here."""
        k1, k2 = keeps if keeps is not None else (None, None)
        x = self._add_branch(x, self.attn(layer_norm(self.norm1, x), segments), self.ls1, segments, k1)
        return self._add_branch(x, self.mlp(layer_norm(self.norm2, x)), self.ls2, segments, k2)


class _LayerScaleResidual(torch.autograd.Function):
    """``x + value * (branch * keep) * gamma`` with a backward of fewer passes than autograd's.

    Shapes: ``x`` ``[B, T, D]``, ``branch`` ``[B, T, D]`` (may be of a narrower dtype than ``x``), ``gamma``
    ``[D]``, ``keep`` a 0/1 stochastic-depth factor broadcasting to ``[B, T, 1]`` or ``None``, ``value`` the
    ``1 / keep probability`` scale (1 without stochastic depth).

    Autograd's backward of ``torch.addcmul(x, branch * keep, gamma, value=value)`` multiplies the saved
    ``[B, T, D]`` product by ``value`` (a full pass even for ``value == 1``) before multiplying it by the
    gradient, multiplies the gradient by ``gamma * value``, and then by ``keep`` for the multiply before it:
    four full-size results and a reduction per residual branch (three without stochastic depth), plus small
    kernels (``gamma * value``, casts of a half-precision ``gamma``). Here ``d branch = grad * (value * gamma) *
    keep`` (two passes; one without stochastic depth) and ``d gamma = value * sum(grad * branch * keep)`` over
    the tokens (a product and a reduction, accumulated in fp32, written in ``gamma``'s dtype); ``d x`` is
    ``grad`` itself.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, branch: Tensor, gamma: Tensor, keep: Tensor | None,  # type: ignore[override]
                value: float) -> Tensor:
        scaled = branch if keep is None else branch * keep
        g = gamma.to(x.dtype)  # no-op for the fp32 stream and for half copies of gamma (compute.half_weights)
        ctx.save_for_backward(scaled, g, keep)
        ctx.value, ctx.branch_dtype, ctx.gamma_dtype = value, branch.dtype, gamma.dtype
        return torch.addcmul(x, scaled, g, value=value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scaled, g, keep = ctx.saved_tensors
        value = ctx.value
        grad_branch = grad_gamma = None
        if ctx.needs_input_grad[1]:
            grad_branch = grad * (g * value if value != 1.0 else g)
            if keep is not None:
                grad_branch.mul_(keep)
            grad_branch = grad_branch.to(ctx.branch_dtype)
        if ctx.needs_input_grad[2]:
            # summed with an fp32 accumulator (half dtypes too), written in gamma's dtype
            grad_gamma = torch.sum((grad * scaled).view(-1, grad.shape[-1]), dim=0, dtype=ctx.gamma_dtype)
            if value != 1.0:
                grad_gamma.mul_(value)
        return grad if ctx.needs_input_grad[0] else None, grad_branch, grad_gamma, None, None


def _per_token(draws: Tensor, segments: Segments) -> Tensor:
    """Per-sequence values ``[..., sum B_i]`` -> per token ``[..., T]`` for packed ``segments`` (one broadcasting
    copy per segment into the result; ``draws`` carries no gradient)."""
    t = sum(n * length for n, length in segments)
    lead = draws.shape[:-1]
    out = draws.new_empty(*lead, t)
    start, tok = 0, 0
    for n, length in segments:
        out[..., tok:tok + n * length].view(*lead, n, length).copy_(
            draws[..., start:start + n, None].expand(*lead, n, length))
        start, tok = start + n, tok + n * length
    return out


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT backbone working on any input whose sides are multiples of ``patch_size``.

    Position embeddings are stored for the native grid ``img_size // patch_size`` (official DINOv2
    backbones: ``img_size=518`` with patch 14, a 37x37 grid) and bicubically resampled to other grids.
    Stochastic depth uses the same rate in every block (DINOv2's ``drop_path_uniform``).
    ``config`` holds the constructor arguments: ``DinoVisionTransformer(**model.config)`` rebuilds it.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        ffn_layer: FFNLayer = "mlp",
        num_register_tokens: int = 0,
    ) -> None:
        super().__init__()
        if patch_size <= 0 or img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a positive multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.config: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
            drop_path_rate=drop_path_rate, layerscale_init=layerscale_init, ffn_layer=ffn_layer,
            num_register_tokens=num_register_tokens,
        )
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.n_blocks = depth
        self.num_heads = num_heads
        self.native_grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.native_grid**2, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                  ffn_bias=ffn_bias, drop_path=drop_path_rate, layerscale_init=layerscale_init, ffn_layer=ffn_layer)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        #: Under autocast, keep the residual stream (the tokens between blocks), the LayerNorm outputs and the
        #: layer-scale products in the autocast dtype (bf16 on CUDA) instead of fp32, as DINOv2's FSDP mixed
        #: precision (half-precision parameters) does: about half the bytes of every elementwise pass and no
        #: cast before each linear layer. ``False`` (default): the fp32 stream of autocast. No effect without
        #: autocast. Set by the trainer (``compute.half_residual``); not part of ``config`` or checkpoints.
        self.half_residual = False
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2 init: trunc-normal(0.02) linear weights and pos_embed, zero biases, tiny cls/registers."""
        if self.pos_embed.is_meta:  # shapes only (e.g. built to receive loaded weights): nothing to draw
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def prepare_input_sizes(self, sizes: Sequence[int]) -> None:
        """Make the cached resampling matrices of the position embeddings for square inputs of these sizes
        now (:func:`_bicubic_matrix`; sizes on the native grid need none).

        Training calls it with its crop sizes. Otherwise the first step of a process would resample the
        teacher's embeddings (a no-grad forward, which makes no matrix) with ``F.interpolate`` and every later
        step with the student's matrix: a rounding difference that made a resumed run differ from an
        uninterrupted one in the last bit of its first step's losses.
        """
        side = math.isqrt(self.pos_embed.shape[1] - 1)
        dtype = self.pos_embed.dtype if self.pos_embed.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.enable_grad():
            for size in sorted(set(sizes)):
                grid = size // self.patch_size
                if grid != side:
                    _bicubic_matrix(side, grid, grid, self.pos_embed.device, dtype)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings for a ``(rows, cols)`` patch grid: ``[1, 1 + rows*cols, D]``."""
        return interpolate_pos_embed(self.pos_embed, grid)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None,
                                  patch_tokens: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` (+ bool ``[B, N]`` masks) -> tokens ``[B, 1 + R + N, D]`` entering the blocks.
        ``patch_tokens``: ``patch_embed(x)`` ``[B, N, D]`` when already computed."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x) if patch_tokens is None else patch_tokens  # [B, N, D]
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks have shape {tuple(masks.shape)}, expected {tuple(tokens.shape[:2])} "
                                 f"for a {h}x{w} input with patch size {self.patch_size}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding((h // self.patch_size, w // self.patch_size))
        if self.register_tokens is not None:
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]), dim=1)
        return tokens

    def _to_stream(self, tokens: Tensor) -> Tensor:
        """Tokens entering the blocks in the residual stream's dtype (:attr:`half_residual`)."""
        dtype = _autocast_dtype(tokens) if self.half_residual else None
        return tokens.to(dtype) if dtype is not None else tokens

    def stochastic_depth_draws(self, x: Tensor, segments: Segments | None = None) -> list[tuple[Tensor, Tensor] | None]:
        """Every block's two stochastic-depth draws for the tokens ``x`` entering the blocks, made at once: one
        Bernoulli draw ``[depth * 2, sequences]`` and, for packed ``segments``, one broadcasting copy per segment
        to the tokens, instead of a draw and copies in each of the ``2 * depth`` branches (kernels of their own
        on a GPU). Per block ``(attention branch, MLP branch)``: 0/1 views ``[B, 1, 1]`` (``x [B, T, D]``) or
        ``[1, T, 1]`` (packed ``x [1, T, D]``) in the branches' dtype (the autocast dtype, else ``x``'s).

        ``None`` entries (the block draws for itself, see :meth:`Block._add_branch`): not training, no
        stochastic depth, or blocks with different rates."""
        rates = {blk.drop_path.drop_prob for blk in self.blocks}
        if not (self.training and len(rates) == 1) or rates == {0.0}:
            return [None] * len(self.blocks)
        keep = 1.0 - rates.pop()
        n_seq = x.shape[0] if segments is None else sum(n for n, _ in segments)
        dtype = _autocast_dtype(x) or x.dtype
        draws = x.new_empty(2 * len(self.blocks), n_seq, dtype=dtype).bernoulli_(keep)
        if segments is None:
            per = draws.view(2 * len(self.blocks), n_seq, 1, 1)
        else:
            per = _per_token(draws, segments).view(2 * len(self.blocks), 1, -1, 1)
        return [(per[2 * i], per[2 * i + 1]) for i in range(len(self.blocks))]

    def _features(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x = self._to_stream(self.prepare_tokens_with_masks(x, masks))
        for blk, keeps in zip(self.blocks, self.stochastic_depth_draws(x), strict=True):
            x = blk(x, None, keeps)
        return self._outputs(x, layer_norm(self.norm, x), masks)

    def _outputs(self, x: Tensor, x_norm: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        """The feature dict of :meth:`forward_features` from the last block's tokens ``x [B, 1+R+N, D]`` and their
        final norm ``x_norm``."""
        r = self.num_register_tokens
        # split (views), not indexing: the backward of a split is one concatenation, where each slice or
        # select would zero-fill a gradient of the full size and the pieces would then be summed
        cls, regs, patches = x_norm.split([1, r, x_norm.shape[1] - 1 - r], dim=1)
        return {
            "x_norm_clstoken": cls.squeeze(1),
            "x_norm_regtokens": regs,
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    def _features_packed(self, xs: list[Tensor], masks: list[Tensor | None]) -> list[dict[str, Tensor | None]]:
        """:meth:`forward_features` of a list: the inputs' tokens ``[B_i, T_i, D]`` go through the blocks as one
        ``[1, sum B_i T_i, D]`` sequence (:meth:`Attention.forward` with ``segments``)."""
        embedded = self.patch_embed.forward_many(xs)
        tokens = [self.prepare_tokens_with_masks(xi, mi, ti) for xi, mi, ti in zip(xs, masks, embedded, strict=True)]
        segments: Segments = tuple((t.shape[0], t.shape[1]) for t in tokens)
        d = tokens[0].shape[-1]
        x = self._to_stream(torch.cat([t.reshape(1, -1, d) for t in tokens], dim=1))
        for blk, keeps in zip(self.blocks, self.stochastic_depth_draws(x, segments), strict=True):
            x = blk(x, segments, keeps)
        x_norm = layer_norm(self.norm, x)
        sizes = [n * length for n, length in segments]  # split, not slices: see _outputs
        return [self._outputs(xi.view(n, length, d), ni.view(n, length, d), mi)
                for xi, ni, (n, length), mi in zip(x[0].split(sizes), x_norm[0].split(sizes), segments, masks,
                                                   strict=True)]

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None, packed: bool = True
    ) -> Any:
        """Token features.

        Args:
            x: ``[B, C, H, W]``, or a list of such tensors (e.g. global and local crops of other sizes).
            masks: bool ``[B, N]`` (True: replace that patch token by ``mask_token`` before position
                embeddings), or for a list input a list of masks / ``None`` entries.
            packed: for a list input, run the blocks once on the tokens of all inputs packed end to end
                (attention within each image, one call per input; DINOv2 does the same with a block-diagonal
                attention mask): half the kernels of one pass per input for two inputs, the same result (to
                rounding; stochastic depth draws once for all images). ``False``: one pass per input.
        Returns:
            a dict (a list of dicts for a list input) with ``x_norm_clstoken [B, D]``,
            ``x_norm_regtokens [B, R, D]``, ``x_norm_patchtokens [B, N, D]``, ``x_prenorm [B, 1+R+N, D]``
            and ``masks``.
        """
        if isinstance(x, list | tuple):
            mask_list = list(masks) if isinstance(masks, list | tuple) else [masks] * len(x)
            if len(mask_list) != len(x):
                raise ValueError(f"got {len(x)} inputs but {len(mask_list)} masks")
            if packed and len(x) > 1:
                return self._features_packed(list(x), mask_list)
            return [self._features(xi, mi) for xi, mi in zip(x, mask_list)]
        if isinstance(masks, list | tuple):
            raise ValueError("masks is a list but x is a single tensor")
        return self._features(x, masks)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Outputs of the last ``n`` blocks (an int), or of the blocks with the given indices.

        Returns a tuple of patch tokens ``[B, N, D]`` (``[B, D, H/p, W/p]`` with ``reshape``), or of
        ``(patch tokens, cls token [B, D])`` pairs with ``return_class_token``. ``norm`` applies the
        final LayerNorm to each output (as DINOv2).
        """
        depth = len(self.blocks)
        if isinstance(n, int) and not isinstance(n, bool):
            if not 1 <= n <= depth:
                raise ValueError(f"get_intermediate_layers: n={n}: the number of last blocks must be 1..{depth} "
                                 f"(the model has {depth} blocks)")
            take = list(range(depth - n, depth))
        else:
            take = list(n)
            if not take or not all(isinstance(i, int) and not isinstance(i, bool) for i in take):
                raise ValueError(f"get_intermediate_layers: n={n!r}: expected a positive int or a non-empty list "
                                 f"of block indices in 0..{depth - 1}")
            bad = [i for i in take if not 0 <= i < depth]
            if bad:
                raise ValueError(f"get_intermediate_layers: block indices {bad} are out of range 0..{depth - 1} "
                                 f"(the model has {depth} blocks)")
        tokens = self._to_stream(self.prepare_tokens_with_masks(x))
        outputs: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs[i] = tokens
            if i >= max(take):
                break
        outs = [layer_norm(self.norm, outputs[i]) if norm else outputs[i] for i in take]
        start = 1 + self.num_register_tokens
        patches = [o[:, start:] for o in outs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, [o[:, 0] for o in outs]))
        return tuple(patches)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, D]``: the normed CLS token."""
        return self._features(x, None)["x_norm_clstoken"]  # type: ignore[return-value]


def _named(arch: str, kwargs: dict[str, Any]) -> DinoVisionTransformer:
    clash = sorted({"embed_dim", "depth", "num_heads"} & kwargs.keys())
    if clash:
        raise ValueError(f"{arch} fixes {', '.join(clash)}; use vit_custom to choose them")
    embed_dim, depth, num_heads = ARCH_WIDTHS[arch]
    return DinoVisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def vit_tiny(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-Ti: 192 wide, 12 blocks, 3 heads."""
    return _named("vit_tiny", kwargs)


def vit_small(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 blocks, 6 heads."""
    return _named("vit_small", kwargs)


def vit_base(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 blocks, 12 heads."""
    return _named("vit_base", kwargs)


def vit_large(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 blocks, 16 heads."""
    return _named("vit_large", kwargs)


def vit_giant2(**kwargs: Any) -> DinoVisionTransformer:
    """DINOv2's ViT-g: 1536 wide, 40 blocks, 24 heads (64 per head), SwiGLU feed-forward by default."""
    kwargs.setdefault("ffn_layer", "swiglu")
    return _named("vit_giant2", kwargs)


def build_vit(arch: str = "vit_custom", **kwargs: Any) -> DinoVisionTransformer:
    """Build by name; ``vit_custom`` passes every argument (``embed_dim``, ``depth``, ``num_heads``, ...)
    to :class:`DinoVisionTransformer`. ``build_vit(**model.config)`` rebuilds ``model``."""
    if arch == "vit_custom":
        return DinoVisionTransformer(**kwargs)
    if arch == "vit_giant2":
        return vit_giant2(**kwargs)
    if arch not in ARCH_WIDTHS:
        raise ValueError(f"unknown arch {arch!r}: not one of {', '.join([*ARCH_WIDTHS, 'vit_custom'])}")
    return _named(arch, kwargs)


def build_backbone(student_cfg: StudentConfig, img_size: int) -> DinoVisionTransformer:
    """The backbone described by ``student`` config, with position embeddings for ``img_size``
    (the full-resolution global crop size; other crop sizes are served by interpolation).
    ``student.layerscale == 0`` means no LayerScale."""
    s = student_cfg
    ffn_layer = s.ffn_layer if s.ffn_layer != "auto" else ("swiglu" if s.arch == "vit_giant2" else "mlp")
    kwargs: dict[str, Any] = dict(
        img_size=img_size, patch_size=s.patch_size, mlp_ratio=s.mlp_ratio, qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias, ffn_bias=s.ffn_bias, drop_path_rate=s.drop_path_rate,
        layerscale_init=s.layerscale or None, ffn_layer=ffn_layer, num_register_tokens=s.num_register_tokens,
    )
    if s.arch == "vit_custom":
        kwargs.update(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads)
    return build_vit(s.arch, **kwargs)
