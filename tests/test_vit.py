"""The ViT backbone: shapes, an independent reference forward, position embeddings, masks, feature API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdinov2.config import StudentConfig
from fastdinov2.models import vit as vit_mod
from fastdinov2.models.vit import (
    DinoVisionTransformer,
    DropPath,
    build_backbone,
    build_vit,
    interpolate_pos_embed,
    swiglu_hidden_features,
    vit_giant2,
    vit_small,
)


def small_vit(**kw: object) -> DinoVisionTransformer:
    args: dict[str, object] = dict(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3)
    args.update(kw)
    torch.manual_seed(0)
    return DinoVisionTransformer(**args).eval()  # type: ignore[arg-type]


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial values everywhere (LayerScale, norms, mask token), so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * 0.5)


# ---------------------------------------------------------------- an independent reference forward


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * w + b


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, patch: int, heads: int, depth: int,
                      registers: int, swiglu: bool = False) -> torch.Tensor:
    """Tokens before the final norm ``[B, 1+R+N, D]`` from plain tensor algebra on the state dict."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    d = sd["cls_token"].shape[-1]
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, gh, gw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, c * patch * patch)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    pos = sd["pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    if (gh, gw) != (m, m):
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
    cls = sd["cls_token"].expand(b, 1, d) + pos[:, :1]
    parts = [cls]
    if registers:
        parts.append(sd["register_tokens"].expand(b, registers, d))
    t = torch.cat(parts + [tok + patch_pos], dim=1)
    hd = d // heads
    for i in range(depth):
        p = f"blocks.{i}."
        y = _layer_norm(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, hd)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, -1, d)
        y = y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        t = t + y * sd[p + "ls1.gamma"]
        y = _layer_norm(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        if swiglu:
            y12 = y @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]
            y1, y2 = y12[..., : y12.shape[-1] // 2], y12[..., y12.shape[-1] // 2 :]
            y = (y1 * torch.sigmoid(y1) * y2) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
        else:
            y = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            y = y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        t = t + y * sd[p + "ls2.gamma"]
    return t


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_forward_matches_reference(registers: int, size: tuple[int, int]) -> None:
    # float64 on both sides, so that even a wrong LayerNorm eps (1e-5 vs 1e-6) would show
    model = small_vit(img_size=32, patch_size=8, embed_dim=32, num_heads=4, num_register_tokens=registers)
    randomize(model)
    model.double()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = reference_forward(model.state_dict(), x, 8, 4, 2, registers)
    out = model.forward_features(x)
    torch.testing.assert_close(out["x_prenorm"], ref, atol=1e-10, rtol=1e-10)
    normed = _layer_norm(ref, model.norm.weight, model.norm.bias)
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1 : 1 + registers], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + registers :], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(model(x), normed[:, 0], atol=1e-10, rtol=1e-10)


def test_swiglu_matches_reference_and_hidden_rule() -> None:
    model = small_vit(img_size=32, patch_size=8, embed_dim=48, num_heads=3, ffn_layer="swiglu")
    randomize(model)
    model.double()
    hidden = (int(int(48 * 4.0) * 2 / 3) + 7) // 8 * 8  # 128
    sd = model.state_dict()
    assert sd["blocks.0.mlp.w12.weight"].shape == (2 * hidden, 48)
    assert sd["blocks.0.mlp.w3.weight"].shape == (48, hidden)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference_forward(model.state_dict(), x, 8, 3, 2, 0, swiglu=True)
    torch.testing.assert_close(model.forward_features(x)["x_prenorm"], ref, atol=1e-10, rtol=1e-10)
    assert swiglu_hidden_features(int(1536 * 4.0)) == 4096  # official ViT-g/14


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [224, 112, 96, 48])
def test_shapes(registers: int, size: int) -> None:
    model = small_vit(depth=1, num_register_tokens=registers)
    x = torch.randn(2, 3, size, size)
    n = (size // 16) ** 2
    out = model.forward_features(x)
    assert out["x_norm_clstoken"].shape == (2, 48)
    assert out["x_norm_regtokens"].shape == (2, registers, 48)
    assert out["x_norm_patchtokens"].shape == (2, n, 48)
    assert out["x_prenorm"].shape == (2, 1 + registers + n, 48)
    assert out["masks"] is None
    assert model(x).shape == (2, 48)


def test_list_input_returns_list_of_dicts() -> None:
    model = small_vit(depth=1, num_register_tokens=1)
    xs = [torch.randn(2, 3, 112, 112), torch.randn(3, 3, 48, 48)]
    masks = [torch.zeros(2, 49, dtype=torch.bool), None]
    outs = model.forward_features(xs, masks)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["x_norm_patchtokens"].shape == (2, 49, 48)
    assert outs[1]["x_norm_patchtokens"].shape == (3, 9, 48)
    torch.testing.assert_close(outs[1]["x_prenorm"], model.forward_features(xs[1])["x_prenorm"])
    with pytest.raises(ValueError, match="2 inputs but 1 masks"):
        model.forward_features(xs, [None])


def test_pos_embed_identity_at_native_grid_and_resampled_otherwise() -> None:
    model = small_vit()
    vit_mod._BICUBIC_MATRICES.clear()  # the first resampling to a grid builds its matrix with F.interpolate
    assert model.interpolate_pos_encoding((14, 14)) is model.pos_embed  # the stored tensor itself
    calls = []
    real = F.interpolate

    def spy(*a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    vit_mod.F.interpolate = spy  # type: ignore[assignment]
    try:
        model.forward_features(torch.randn(1, 3, 224, 224))
        assert not calls
        pe = model.interpolate_pos_encoding((7, 5))
        assert calls
    finally:
        vit_mod.F.interpolate = real  # type: ignore[assignment]
    assert pe.shape == (1, 1 + 35, 48)
    assert torch.equal(pe[:, 0], model.pos_embed[:, 0])  # class position untouched
    # bicubic of a constant field is that constant
    const = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 16, 4), 2.5)], dim=1)
    torch.testing.assert_close(interpolate_pos_embed(const, (7, 3))[:, 1:], torch.full((1, 21, 4), 2.5))
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 12, 4), (2, 2))


def test_masks_replace_patch_tokens_before_pos_embed() -> None:
    model = small_vit(img_size=32, patch_size=8, num_register_tokens=2)
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[1, 15] = True
    with torch.no_grad():
        plain = model.prepare_tokens_with_masks(x)
        masked = model.prepare_tokens_with_masks(x, masks)
    start = 1 + 2
    expected = model.mask_token[0] + model.pos_embed[0, 1:]  # [16, D]
    for b in range(2):
        for i in range(16):
            got = masked[b, start + i]
            want = expected[i] if masks[b, i] else plain[b, start + i]
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(masked[:, :start], plain[:, :start])  # cls and registers untouched
    out = model.forward_features(x, masks)
    assert out["masks"] is masks
    with pytest.raises(ValueError, match="masks have shape"):
        model.forward_features(x, torch.zeros(2, 15, dtype=torch.bool))


def test_intermediate_layers() -> None:
    model = small_vit(img_size=32, patch_size=8, depth=3, num_register_tokens=1)
    randomize(model)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x)
        per_block = []
        for blk in model.blocks:
            tokens = blk(tokens)
            per_block.append(tokens)
        last = model.get_intermediate_layers(x, 1)
        torch.testing.assert_close(last[0], model.forward_features(x)["x_norm_patchtokens"])
        two = model.get_intermediate_layers(x, [0, 2], return_class_token=True, norm=False)
        torch.testing.assert_close(two[0][0], per_block[0][:, 2:])
        torch.testing.assert_close(two[0][1], per_block[0][:, 0])
        torch.testing.assert_close(two[1][0], per_block[2][:, 2:])
        shaped = model.get_intermediate_layers(x, 2, reshape=True)
    assert len(shaped) == 2 and shaped[0].shape == (2, 48, 4, 6)
    torch.testing.assert_close(shaped[1][:, :, 1, 2], last[0][:, 1 * 6 + 2])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, [3])


def test_layerscale_none_and_key_names() -> None:
    keys = set(small_vit(layerscale_init=None, depth=1).state_dict())
    assert not any(".ls1." in k or ".ls2." in k for k in keys)
    keys = set(small_vit(depth=1, num_register_tokens=4).state_dict())
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
            "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "norm.bias"} <= keys


def test_init_like_dinov2() -> None:
    model = small_vit(embed_dim=192, num_heads=3, num_register_tokens=4)
    assert torch.all(model.mask_token == 0)
    assert model.cls_token.abs().max() < 1e-4 and model.cls_token.abs().max() > 0
    assert model.register_tokens is not None and model.register_tokens.abs().max() < 1e-4
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    sd = model.state_dict()
    assert abs(sd["blocks.0.attn.qkv.weight"].std().item() - 0.02) < 0.002
    assert torch.all(sd["blocks.0.attn.qkv.bias"] == 0)
    assert torch.all(sd["blocks.0.ls1.gamma"] == 1e-5)


def test_config_rebuilds_and_named_widths() -> None:
    model = small_vit(num_register_tokens=2, ffn_layer="swiglu", layerscale_init=None)
    clone = build_vit(**model.config)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.device("meta"):
        s = vit_small()
        g = vit_giant2(patch_size=14, img_size=518)
    assert (s.embed_dim, s.n_blocks, s.num_heads) == (384, 12, 6)
    assert (g.embed_dim, g.n_blocks, g.num_heads, g.config["ffn_layer"]) == (1536, 40, 24, "swiglu")
    assert g.pos_embed.shape == (1, 1 + 37 * 37, 1536)
    with pytest.raises(ValueError, match="fixes embed_dim"):
        vit_small(embed_dim=10)
    with pytest.raises(ValueError, match="unknown arch"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        small_vit()(torch.randn(1, 3, 100, 96))


def test_build_backbone_from_student_config() -> None:
    cfg = StudentConfig(arch="vit_custom", patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        num_register_tokens=3, layerscale=0.0, drop_path_rate=0.1)
    model = build_backbone(cfg, img_size=64)
    assert model.config["img_size"] == 64 and model.native_grid == 8
    assert model.num_register_tokens == 3 and model.config["layerscale_init"] is None
    assert [m.drop_prob for m in model.modules() if isinstance(m, DropPath)] == [0.1, 0.1]  # uniform
    with torch.device("meta"):
        base = build_backbone(StudentConfig(arch="vit_base"), img_size=224)
    assert base.embed_dim == 768 and base.config["layerscale_init"] == 1e-5


def test_drop_path_per_sample() -> None:
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3, 2)
    torch.manual_seed(0)
    y = dp(x)
    kept = (y[:, 0, 0] != 0).float()
    assert abs(kept.mean().item() - 0.75) < 0.03
    # each sample is all-dropped or all-kept and rescaled by 1/keep
    assert torch.all((y == 0).all(dim=(1, 2)) | (y == 1 / 0.75).all(dim=(1, 2)))
    torch.manual_seed(0)
    assert torch.equal(dp(x), y)  # reproducible from the default generator
    assert torch.equal(dp.eval()(x), x)


@pytest.mark.parametrize("layerscale,drop_path", [(1e-5, 0.0), (1e-5, 0.3), (None, 0.3), (None, 0.0)])
def test_fused_residual_equals_the_modules_in_sequence(layerscale: float | None, drop_path: float) -> None:
    from fastdinov2.models.vit import Block

    torch.manual_seed(0)
    block = Block(16, 2, drop_path=drop_path, layerscale_init=layerscale).train()
    if layerscale:
        with torch.no_grad():
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    x = torch.randn(6, 5, 16, requires_grad=True)

    def reference(x: torch.Tensor) -> torch.Tensor:
        x = x + block.drop_path(block.ls1(block.attn(block.norm1(x))))
        return x + block.drop_path(block.ls2(block.mlp(block.norm2(x))))

    torch.manual_seed(1)
    out = block(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    torch.manual_seed(1)  # the same stochastic-depth draws
    ref = reference(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, block.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("registers", [0, 2])
def test_packed_list_equals_one_pass_per_input(registers: int) -> None:
    """compute.pack_crops: the tokens of all inputs go through the blocks once (attention per input)."""
    model = small_vit(num_register_tokens=registers).train()  # no stochastic depth: no random draw
    torch.manual_seed(1)
    xs = [torch.randn(4, 3, 64, 64), torch.randn(6, 3, 32, 32)]
    masks = [torch.rand(4, 16) < 0.3, None]
    packed, single = model.forward_features(xs, masks), model.forward_features(xs, masks, packed=False)
    for a, b in zip(packed, single, strict=True):
        assert a.keys() == b.keys() and a["masks"] is b["masks"]
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    grads = []
    for outs in (packed, single):
        loss = sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].square().sum() for o in outs)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads, strict=True):
        # elements near 0 differ by fp32 rounding of the summation order (torch 2.11: 1.9e-6 on a 48-entry bias)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_packed_stochastic_depth_drops_whole_images() -> None:
    from fastdinov2.models.vit import Block

    block = Block(8, 2, drop_path=0.5, layerscale_init=None).train()

    class Ones(torch.nn.Module):
        def forward(self, x: torch.Tensor, segments: object = None) -> torch.Tensor:
            return torch.ones_like(x)

    block.attn, block.mlp = Ones(), Ones()  # type: ignore[assignment]
    segments = ((300, 5), (500, 2))
    x = torch.zeros(1, 300 * 5 + 500 * 2, 8)
    torch.manual_seed(0)
    added = block(x, segments)[0, :, 0]  # per token: 0, 2 or 4 (each branch kept and scaled by 1/0.5)
    per_image = torch.cat([added[:1500].view(300, 5), added[1500:].view(500, 2)[:, :1].expand(500, 5)])
    assert torch.all(per_image == per_image[:, :1])  # every token of an image alike: one draw per image
    assert set(per_image[:, 0].tolist()) == {0.0, 2.0, 4.0}
    assert abs(per_image[:, 0].mean().item() - 2.0) < 0.15  # E = 2 * keep * (1 / keep)
    with pytest.raises(ValueError, match="do not pack"):
        block.attn = Block(8, 2).attn  # a real attention checks the segments against its input
        block(x, ((300, 5),))


@pytest.mark.parametrize("segments", [None, ((2, 5), (3, 2))])
def test_attention_backward_matches_numerical_gradients(segments: tuple[tuple[int, int], ...] | None) -> None:
    """The attention's own autograd functions (_SplitHeads/_MergeHeads: the qkv gradient written once, the
    output gradient handed back as views) against finite differences, packed and unpacked, in float64."""
    from fastdinov2.models.vit import Attention

    torch.manual_seed(0)
    attn = Attention(8, 2).double()
    x = torch.randn((1, 16, 8) if segments else (3, 4, 8), dtype=torch.float64, requires_grad=True)
    params = [attn.qkv.weight, attn.proj.weight]
    assert torch.autograd.gradcheck(lambda inp, *_: attn(inp, segments), (x, *params), eps=1e-6, atol=1e-5)
    with torch.no_grad():  # without autograd: the plain view/copy path, the same values
        plain = attn(x, segments)
    torch.testing.assert_close(attn(x, segments), plain, rtol=0, atol=0)


@pytest.mark.parametrize("keep,value", [(None, 1.0), ("tokens", 1.0 / 0.7), ("samples", 1.0 / 0.7)])
def test_layer_scale_residual_gradients(keep: str | None, value: float) -> None:
    from fastdinov2.models.vit import _LayerScaleResidual

    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(4, dtype=torch.float64, requires_grad=True)
    k = None
    if keep == "tokens":
        k = (torch.rand(2, 5, 1) < 0.7).double()
    elif keep == "samples":
        k = torch.tensor([[[1.0]], [[0.0]]], dtype=torch.float64)
    out = _LayerScaleResidual.apply(x, branch, gamma, k, value)
    ref = torch.addcmul(x, branch if k is None else branch * k, gamma, value=value)
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda a, b, g: _LayerScaleResidual.apply(a, b, g, k, value), (x, branch, gamma))


def test_layer_scale_residual_backward_passes() -> None:
    """The block's residual backward writes three full-size tensors per branch with stochastic depth (autograd's
    backward of the multiply and the addcmul: four) and two without (autograd: three), plus one reduction."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdinov2.models.vit import _LayerScaleResidual

    class FullSize(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = Counter()  # type: Counter[str]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == 6 * 7 * 8 and "view" not in func.__name__:
                self.n[func.__name__.split(".")[0]] += 1
            return out

    for k, limit in ((torch.ones(6, 1, 1), 3), (None, 2)):
        x, branch = torch.randn(6, 7, 8, requires_grad=True), torch.randn(6, 7, 8, requires_grad=True)
        gamma = torch.randn(8, requires_grad=True)
        out = _LayerScaleResidual.apply(x, branch, gamma, k, 1.25)
        grad = torch.ones_like(out)
        with FullSize() as mode:
            torch.autograd.grad(out, [x, branch, gamma], grad)
        mode.n.pop("detach", None)
        assert sum(mode.n.values()) <= limit, mode.n


def test_stochastic_depth_draws_once_for_all_blocks() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    model = small_vit(drop_path_rate=0.5).train()
    segments = ((300, 5), (500, 2))
    x = torch.zeros(1, 300 * 5 + 500 * 2, model.embed_dim)
    torch.manual_seed(0)
    draws = model.stochastic_depth_draws(x, segments)
    assert len(draws) == model.n_blocks and all(d is not None for d in draws)
    seen = []
    for pair in draws:
        assert pair is not None
        for d in pair:
            assert d.shape == (1, x.shape[1], 1)
            per = torch.cat([d[0, :1500, 0].view(300, 5), d[0, 1500:, 0].view(500, 2)[:, :1].expand(500, 5)])
            assert torch.all(per == per[:, :1]) and set(per.unique().tolist()) <= {0.0, 1.0}
            seen.append(per[:, 0])
    rate = torch.stack(seen).mean().item()
    assert abs(rate - 0.5) < 0.05 and not torch.equal(seen[0], seen[1])  # independent draws per branch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.stochastic_depth_draws(torch.zeros(4, 3, model.embed_dim))[0][0].shape == (4, 1, 1)  # type: ignore[index]
        assert model.stochastic_depth_draws(x, segments)[0][0].dtype == torch.bfloat16  # type: ignore[index]
    assert model.eval().stochastic_depth_draws(x, segments) == [None] * model.n_blocks
    assert small_vit().train().stochastic_depth_draws(x, segments) == [None] * model.n_blocks

    class Bernoulli(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Bernoulli.n += func.__name__.startswith("bernoulli")
            return func(*args, **(kwargs or {}))

    model.train()
    with Bernoulli():
        out = model.forward_features([torch.randn(2, 3, 64, 64), torch.randn(4, 3, 32, 32)])
    assert Bernoulli.n == 1 and all(torch.isfinite(o["x_norm_patchtokens"]).all() for o in out)


@pytest.mark.parametrize(("side", "grid"), [(14, (7, 7)), (14, (6, 6)), (14, (20, 9)), (37, (16, 16))])
def test_pos_embed_matrix_equals_bicubic_interpolation(side: int, grid: tuple[int, int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the resampling as a cached matrix product: the values and gradients of F.interpolate(mode="bicubic")
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + side * side, 16, requires_grad=True)
    out = interpolate_pos_embed(pos, grid)
    key = (side, *grid, "cpu", torch.float32)
    assert key in vit_mod._BICUBIC_MATRICES
    monkeypatch.setattr(vit_mod, "_BICUBIC_MATRIX_MAX", 0)  # the direct interpolation
    ref = interpolate_pos_embed(pos, grid)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), pos)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), pos)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an fp32 product under autocast too
        monkeypatch.setattr(vit_mod, "_BICUBIC_MATRIX_MAX", 1 << 22)
        assert interpolate_pos_embed(pos, grid).dtype == torch.float32
        torch.testing.assert_close(interpolate_pos_embed(pos, grid), ref, rtol=0, atol=1e-5)


def test_patch_embed_matmul_equals_the_convolution() -> None:
    # the unfolded patches times the conv weight: DINOv2's Conv2d(kernel=stride=p) output and weight gradient
    from fastdinov2.models.vit import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(16, 3, 24)
    xs = [torch.randn(2, 3, 64, 48), torch.randn(3, 3, 32, 32)]
    refs = [F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=16).flatten(2).transpose(1, 2) for x in xs]
    for x, ref in zip(xs, refs, strict=True):
        torch.testing.assert_close(pe(x), ref, rtol=0, atol=1e-5)
    many = pe.forward_many(xs)  # one matmul for both inputs
    for out, ref in zip(many, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(many, g, strict=True)), list(pe.parameters()))
    ref_grads = torch.autograd.grad(sum((r * gi).sum() for r, gi in zip(refs, g, strict=True)),
                                    list(pe.parameters()))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        pe(torch.randn(1, 3, 40, 32))


def test_pos_embed_matrices_are_made_for_training_and_kept_in_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    # without gradients (evaluation: images of many sizes) a new grid interpolates directly; a made matrix
    # serves no-grad calls too (the teacher); only the most recently used are kept
    pos = torch.randn(1, 1 + 14 * 14, 8)
    vit_mod._BICUBIC_MATRICES.clear()
    with torch.no_grad():
        interpolate_pos_embed(pos, (5, 9))
    assert not vit_mod._BICUBIC_MATRICES
    interpolate_pos_embed(pos, (5, 9))
    with torch.no_grad():
        interpolate_pos_embed(pos, (5, 9))
    assert list(vit_mod._BICUBIC_MATRICES) == [(14, 5, 9, "cpu", torch.float32)]
    monkeypatch.setattr(vit_mod, "_BICUBIC_MATRICES_KEPT", 3)
    for rows in (2, 3, 4):
        interpolate_pos_embed(pos, (rows, 9))
    assert [k[1] for k in vit_mod._BICUBIC_MATRICES] == [2, 3, 4]


def test_prepared_input_sizes_give_the_teacher_the_students_resampling_from_the_first_step() -> None:
    # A training step runs the teacher (no grad) before the student; without the prepared matrices the
    # teacher's first forward in a process resamples with F.interpolate and every later one with the matrix.
    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=64, patch_size=8, embed_dim=16, depth=1, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)

    def teacher_forward() -> torch.Tensor:
        with torch.no_grad():
            return vit.forward_features(x)["x_norm_clstoken"]

    vit_mod._BICUBIC_MATRICES.clear()
    vit.prepare_input_sizes([32, 64])  # 64 is the native grid: no matrix
    assert list(vit_mod._BICUBIC_MATRICES) == [(8, 4, 4, "cpu", torch.float32)]
    first = teacher_forward()
    vit.forward_features(x)["x_norm_clstoken"].sum().backward()  # a student step
    assert torch.equal(teacher_forward(), first)
