"""Parameter groups, AdamW construction and per-step lr / wd application on a tiny stand-in model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdinov2.train.optim import apply_optim_schedules, build_adamw, get_layer_id, get_param_groups

D = 8


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((D,), 1e-5))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D)
        self.ls1 = _LayerScale()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(D, D)


class _ViT(nn.Module):
    """The parameter names of the DINOv2 ViT, two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.n_blocks = 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, 2, 2)
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.norm = nn.LayerNorm(D)


class _WeightNormLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(4, 1))
        self.weight_v = nn.Parameter(torch.randn(4, D))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.last_layer = _WeightNormLinear()


class _Model(nn.Module):
    def __init__(self, ibot_head: bool = True) -> None:
        super().__init__()
        self.backbone = _ViT()
        self.dino_head = _Head()
        if ibot_head:
            self.ibot_head = _Head()


def _table(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    out = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name in g["param_names"]:
            out[name] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    return out


def _expected() -> dict[str, tuple[float, float, bool]]:
    # layerwise_decay 0.5, 2 blocks: layer 0 -> 0.5**3, block 0 -> 0.5**2, block 1 -> 0.5, rest -> 1
    exp: dict[str, tuple[float, float, bool]] = {}
    for tok in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
        exp[f"backbone.{tok}"] = (0.125, 0.0, False)
    exp["backbone.patch_embed.proj.weight"] = (0.125 * 0.2, 1.0, False)
    exp["backbone.patch_embed.proj.bias"] = (0.125 * 0.2, 0.0, False)
    for i, lr in ((0, 0.25), (1, 0.5)):
        b = f"backbone.blocks.{i}."
        exp.update({
            b + "norm1.weight": (lr, 0.0, False), b + "norm1.bias": (lr, 0.0, False),
            b + "attn.qkv.weight": (lr, 1.0, False), b + "attn.qkv.bias": (lr, 0.0, False),
            b + "ls1.gamma": (lr, 0.0, False),
            b + "mlp.fc1.weight": (lr, 1.0, False), b + "mlp.fc1.bias": (lr, 0.0, False),
        })
    exp["backbone.norm.weight"] = exp["backbone.norm.bias"] = (1.0, 0.0, False)
    for head in ("dino_head", "ibot_head"):
        for j in (0, 2):
            exp[f"{head}.mlp.{j}.weight"] = (1.0, 1.0, False)
            exp[f"{head}.mlp.{j}.bias"] = (1.0, 0.0, False)
        exp[f"{head}.last_layer.weight_g"] = exp[f"{head}.last_layer.weight_v"] = (1.0, 1.0, True)
    return exp


def test_every_parameter_gets_the_hand_computed_multipliers() -> None:
    model = _Model()
    groups = get_param_groups(model, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    table = _table(groups)
    expected = _expected()
    assert set(table) == set(expected) == {n for n, _ in model.named_parameters()}
    for name, (lr, wd, last) in expected.items():
        assert table[name][0] == pytest.approx(lr), name
        assert table[name][1:] == (wd, last), name


def test_groups_are_fused_by_multipliers() -> None:
    groups = get_param_groups(_Model(), 0.5, 0.2)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], g["is_backbone"]) for g in groups]
    assert len(keys) == len(set(keys)) == 11  # the final norm (backbone) and the head biases share multipliers
    for g in groups:
        assert all(n.startswith("backbone.") == g["is_backbone"] for n in g["param_names"])
    assert all(isinstance(g["name"], str) and g["name"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(_Model().parameters()))
    assert groups[0]["param_names"][0] == "backbone.cls_token"  # order of first appearance


def test_frozen_parameters_and_missing_ibot_head() -> None:
    model = _Model(ibot_head=False)
    model.backbone.mask_token.requires_grad_(False)
    table = _table(get_param_groups(model, 0.9, 1.0))
    assert "backbone.mask_token" not in table and not any(n.startswith("ibot_head") for n in table)
    assert table["backbone.pos_embed"][0] == pytest.approx(0.9**3)


def test_layer_ids_and_errors() -> None:
    assert get_layer_id("cls_token", 12) == 0
    assert get_layer_id("patch_embed.proj.weight", 12) == 0
    assert get_layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert get_layer_id("blocks.11.ls2.gamma", 12) == 12
    assert get_layer_id("norm.weight", 12) == 13
    with pytest.raises(ValueError, match="block 12"):
        get_layer_id("blocks.12.norm1.weight", 12)
    with pytest.raises(ValueError, match="backbone"):
        get_param_groups(nn.Linear(2, 2), 0.9, 0.2)
    with pytest.raises(ValueError, match="layerwise_decay"):
        get_param_groups(_Model(), 0.0, 0.2)


def test_adamw_schedules_and_frozen_last_layer() -> None:
    torch.manual_seed(0)
    model = _Model()
    groups = get_param_groups(model, 0.5, 0.2)
    opt = build_adamw(groups, betas=(0.9, 0.999))
    assert opt.defaults["fused"] is True  # the fused kernel on CPU parameters too
    assert opt.defaults["betas"] == (0.9, 0.999)
    apply_optim_schedules(opt, lr=1e-2, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-2 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr) and g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.stack([p.sum() for p in model.parameters()]).sum()  # every gradient is non-zero
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed != ("last_layer" in n), n  # the prototypes are frozen by last_layer_lr = 0
    # the optimiser state (with parameter names) survives a round trip
    state = opt.state_dict()
    assert state["param_groups"][0]["param_names"][0] == "backbone.cls_token"
    fresh = build_adamw(get_param_groups(model, 0.5, 0.2), betas=(0.9, 0.999))
    fresh.load_state_dict(state)
    first = next(iter(model.parameters()))
    torch.testing.assert_close(fresh.state[first]["exp_avg"], opt.state[first]["exp_avg"])


def test_fused_adamw_matches_foreach_and_skips_on_found_inf() -> None:
    torch.manual_seed(0)
    models = [_Model() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_adamw(get_param_groups(m, 0.5, 0.2), betas=(0.9, 0.999), fused=f)
            for m, f in zip(models, (True, False), strict=True)]
    assert opts[1].defaults["foreach"] is True
    for step in range(3):
        for m, opt in zip(models, opts, strict=True):
            apply_optim_schedules(opt, lr=1e-2, wd=0.04, last_layer_lr=1e-2)
            opt.zero_grad()
            torch.stack([(p * (step + 1)).square().sum() for p in m.parameters()]).sum().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a device-side found_inf flag (as the trainer sets it) skips the update and the step count
    fused, model = opts[0], models[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    fused.found_inf = torch.ones(())  # type: ignore[attr-defined]
    fused.step()
    del fused.found_inf  # type: ignore[attr-defined]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(int(s["step"]) == 3 for s in fused.state.values())


def test_build_adamw_errors_and_missing_group_keys() -> None:
    with pytest.raises(ValueError, match="no parameter groups"):
        build_adamw([], betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="betas"):
        build_adamw(get_param_groups(_Model(), 0.5, 0.2), betas=(0.9, 1.0))
    plain = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(KeyError, match="lr_multiplier"):
        apply_optim_schedules(plain, 1.0, 0.0, 1.0)


def test_backbone_lr_scale_freezes_only_the_backbone() -> None:
    opt = build_adamw(get_param_groups(_Model(), 0.5, 0.2), betas=(0.9, 0.999), fused=False)
    apply_optim_schedules(opt, lr=1e-2, wd=0.1, last_layer_lr=1e-2, backbone_lr_scale=0.0)
    for g in opt.param_groups:
        assert (g["lr"] == 0.0) == g["is_backbone"]
