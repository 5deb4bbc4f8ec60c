"""Loading and exporting backbones: our exports and checkpoints, official DINOv2, the seed code, timm.

Every path to a backbone goes through :func:`load_backbone` (evaluation, the hub entry points) or
:func:`load_pretrained_into` (continued pre-training). Accepted inputs:

- our export ``X.safetensors`` with ``X.json`` beside it (``{"format": "fastdinov2-backbone", "layout",
  "config"}``); a bare ``.safetensors`` (e.g. timm's) is read with its layout and architecture inferred;
- our checkpoint directory ``RUN/checkpoints/step_XXXXXXXX/`` (``model.pt`` + ``COMMITTED``), or a run
  directory (``RUN/teacher_backbone.safetensors``, unless its newest committed checkpoint was committed after
  the export was written; else its newest committed checkpoint);
- torch files read with ``torch.load(weights_only=True)`` only: the seed's ``teacher_checkpoint.pth``
  (``{"teacher": {"backbone.*", "dino_head.*"}}``), DINOv2-style training checkpoints
  (``{"model": {"teacher.backbone.*", ...}}``), official DINOv2 backbone state dicts, timm state dicts.

Key layouts. Ours == official DINOv2 (block-chunked FSDP names ``blocks.C.I.*`` are read as
``blocks.I.*``). timm differs as timm's own DINOv2 converter does: no ``mask_token``;
``register_tokens`` -> ``reg_token``; SwiGLU ``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2``; and with
registers timm's model has no class position, so ``cls_token`` absorbs ``pos_embed[:, 0]`` and
``pos_embed`` keeps only the patch positions. Reading timm back puts a zero class position and a zero
``mask_token`` in, which gives identical features.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import sys
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastdinov2.models.vit import ARCH_WIDTHS, DinoVisionTransformer, build_vit, interpolate_pos_embed

StateDict = dict[str, Tensor]
Layout = Literal["fastdinov2", "official", "timm"]
LAYOUTS: tuple[str, ...] = ("fastdinov2", "official", "timm")
EXPORT_FORMAT = "fastdinov2-backbone"
_SHOW = 8  # how many keys of each kind an error lists

# Heads of the named widths (DINOv2 uses 64-dim heads except for ViT-S/B/L's classic choices).
_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1536: 24}

_BLOCK_PARTS = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(?:weight|bias)|ls[12]\.gamma"
_OFFICIAL_KEY = re.compile(
    r"^(?:cls_token|pos_embed|register_tokens|mask_token|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias)"
    rf"|blocks\.\d+\.(?:{_BLOCK_PARTS}))$"
)
_TIMM_KEY = re.compile(
    r"^(?:cls_token|pos_embed|reg_token|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias)"
    r"|blocks\.\d+\.(?:(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)|ls[12]\.gamma))$"
)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


class BackboneLoadError(ValueError):
    """A file or state dict cannot be read as a backbone; the message names the file and the keys."""


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


# ---------------------------------------------------------------------------------------------------------
# Architecture from tensors
# ---------------------------------------------------------------------------------------------------------


def _swiglu_mlp_ratio(embed_dim: int, hidden: int, source: str) -> float:
    """An ``mlp_ratio`` whose DINOv2 SwiGLU rule gives ``hidden`` (4.0 for ViT-g: 6144 -> 4096)."""
    from fastdinov2.models.vit import swiglu_hidden_features

    candidates = [int(embed_dim * 4.0)] + list(range(math.ceil(1.5 * (hidden - 8)), math.ceil(1.5 * hidden) + 2))
    for h in candidates:
        ratio = h / embed_dim
        if h > 0 and int(embed_dim * ratio) == h and swiglu_hidden_features(h) == hidden:
            return ratio
    raise BackboneLoadError(f"{source}: SwiGLU hidden width {hidden} cannot come from the DINOv2 rule "
                          f"(hidden=int(dim*mlp_ratio), then (int(hidden*2/3)+7)//8*8) for dim {embed_dim}")


def _hidden_width(sd: Mapping[str, Tensor], depth: int, swiglu: bool) -> int | None:
    """The feed-forward hidden width from the first block that holds a feed-forward weight."""
    for i in range(depth):
        b = f"blocks.{i}.mlp."
        if swiglu:
            if f"{b}w3.weight" in sd:
                return int(sd[f"{b}w3.weight"].shape[1])
            if f"{b}w12.weight" in sd:
                return int(sd[f"{b}w12.weight"].shape[0]) // 2
        else:
            if f"{b}fc1.weight" in sd:
                return int(sd[f"{b}fc1.weight"].shape[0])
            if f"{b}fc2.weight" in sd:
                return int(sd[f"{b}fc2.weight"].shape[1])
    return None


def infer_vit_config(state_dict: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Any]:
    """Constructor arguments of :class:`DinoVisionTransformer` that fit an official-layout state dict.

    Reads embed_dim and patch size from ``patch_embed.proj.weight`` ``[D, C, p, p]``, ``img_size`` from the
    square grid of ``pos_embed`` ``[1, 1+M*M, D]``, depth from the block indices, num_heads from the width
    (192->3, 384->6, 768->12, 1024->16, 1536->24, else D//64), registers from ``register_tokens``, SwiGLU from
    ``mlp.w12`` keys, LayerScale and biases from whether their keys exist. Works on meta tensors.
    """
    need = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state_dict]
    if need:
        found = _listing(sorted(state_dict)) or "no keys"
        raise BackboneLoadError(f"{source}: not a DINOv2 ViT state dict: missing {', '.join(need)} (found: {found})")
    w = state_dict["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise BackboneLoadError(f"{source}: patch_embed.proj.weight has shape {list(w.shape)}, expected [D, C, p, p]")
    embed_dim, in_chans, patch_size = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    pos = state_dict["pos_embed"]
    n_patches = int(pos.shape[1]) - 1
    side = math.isqrt(max(n_patches, 0))
    if pos.ndim != 3 or side * side != n_patches or side == 0:
        raise BackboneLoadError(f"{source}: pos_embed has shape {list(pos.shape)}: expected [1, 1+M*M, D] "
                              "(class position then a square patch grid)")
    block_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise BackboneLoadError(f"{source}: block indices {block_ids[:_SHOW]} are not 0..depth-1")
    depth = len(block_ids)

    def count(part: str) -> int:
        return sum(f"blocks.{i}.{part}" in state_dict for i in range(depth))

    def most(part: str) -> bool:  # held by most blocks (ties count as held: the others then miss it)
        n = count(part)
        return n > 0 and 2 * n >= depth

    # Every per-block feature is read from all blocks, not block 0 alone, so that a key missing from one
    # block is reported as missing there (not as unexpected in every other block).
    swiglu = count("mlp.w12.weight") + count("mlp.w3.weight") > count("mlp.fc1.weight") + count("mlp.fc2.weight")
    ffn_layer = "swiglu" if swiglu else "mlp"
    hidden = _hidden_width(state_dict, depth, swiglu)
    if hidden is None:
        raise BackboneLoadError(f"{source}: no block has feed-forward weights "
                              f"(blocks.N.mlp.{'w12/w3' if swiglu else 'fc1/fc2'}.weight)")
    if swiglu:
        mlp_ratio = _swiglu_mlp_ratio(embed_dim, hidden, source)
    else:
        mlp_ratio = hidden / embed_dim
        if int(embed_dim * mlp_ratio) != hidden:
            raise BackboneLoadError(f"{source}: MLP width {hidden} is not int({embed_dim} * ratio) for any ratio")
    registers = state_dict.get("register_tokens")
    return dict(
        img_size=side * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=_HEADS_BY_DIM.get(embed_dim, max(1, embed_dim // 64)),
        mlp_ratio=mlp_ratio,
        qkv_bias=most("attn.qkv.bias"),
        proj_bias=most("attn.proj.bias"),
        ffn_bias=most(f"mlp.{'w12' if swiglu else 'fc1'}.bias") or most(f"mlp.{'w3' if swiglu else 'fc2'}.bias"),
        drop_path_rate=0.0,
        layerscale_init=1e-5 if most("ls1.gamma") or most("ls2.gamma") else None,  # init value is not stored
        ffn_layer=ffn_layer,
        num_register_tokens=int(registers.shape[1]) if registers is not None else 0,
    )


# ---------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------


def _as_state_dict(model_or_sd: nn.Module | Mapping[str, Tensor]) -> StateDict:
    if isinstance(model_or_sd, nn.Module):
        return dict(model_or_sd.state_dict())
    return dict(model_or_sd)


def _check_names(sd: Mapping[str, Any], pattern: re.Pattern[str], layout: str, source: str) -> None:
    bad = sorted(k for k in sd if not pattern.match(k))
    if bad:
        raise BackboneLoadError(f"{source}: {len(bad)} keys are not {layout} ViT backbone names: {_listing(bad)}")
    not_tensors = sorted(k for k, v in sd.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise BackboneLoadError(f"{source}: values of {_listing(not_tensors)} are not tensors")


def from_official_state_dict(state_dict: Mapping[str, Tensor], source: str = "state dict") -> StateDict:
    """Official DINOv2 / seed backbone keys -> ours. Names are the same; FSDP block-chunked names
    ``blocks.<chunk>.<i>.*`` become ``blocks.<i>.*``. Raises :class:`BackboneLoadError` on other names."""
    out = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}
    _check_names(out, _OFFICIAL_KEY, "official DINOv2", source)
    return out


def to_official_state_dict(model_or_sd: nn.Module | Mapping[str, Tensor], source: str = "state dict") -> StateDict:
    """Ours -> official DINOv2 keys (the same names; validated). Loads into ``dinov2.models.vision_transformer``
    built with ``block_chunks=0`` and the same ``img_size``/``patch_size``/registers."""
    sd = _as_state_dict(model_or_sd)
    _check_names(sd, _OFFICIAL_KEY, "official DINOv2", source)
    return sd


def to_timm_state_dict(model_or_sd: nn.Module | Mapping[str, Tensor], source: str = "state dict") -> StateDict:
    """Ours -> timm ``VisionTransformer`` (``vit_*_patch14_dinov2`` / ``*_reg4_dinov2``) keys.

    Drops ``mask_token``; renames SwiGLU ``w12``/``w3`` to ``fc1``/``fc2``; with registers, renames
    ``register_tokens`` -> ``reg_token`` ``[1, R, D]``, folds the class position into ``cls_token`` and keeps
    ``pos_embed[:, 1:]`` ``[1, M*M, D]`` (timm's ``no_embed_class``), exactly as timm's converter does.
    """
    sd = to_official_state_dict(model_or_sd, source)
    out: StateDict = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        out[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = v
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd["pos_embed"][:, 1:]
    return out


def from_timm_state_dict(state_dict: Mapping[str, Tensor], source: str = "state dict") -> StateDict:
    """timm DINOv2 keys -> ours (inverse of :func:`to_timm_state_dict` up to the folded class position).

    A ``pos_embed`` without class position (``[1, M*M, D]``) gets a zero one in front (its value is already
    in ``cls_token``); ``reg_token`` -> ``register_tokens``; ``fc1``/``fc2`` shaped as SwiGLU
    (``fc1`` out == 2 x ``fc2`` in) -> ``w12``/``w3``; a zero ``mask_token`` ``[1, D]`` is added.
    """
    _check_names(state_dict, _TIMM_KEY, "timm", source)
    sd = dict(state_dict)
    if "pos_embed" not in sd or "cls_token" not in sd:
        raise BackboneLoadError(f"{source}: timm state dict without cls_token/pos_embed")
    pos = sd["pos_embed"]
    n = int(pos.shape[1])
    if math.isqrt(n) ** 2 == n:  # no class position (timm no_embed_class)
        sd["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
    elif math.isqrt(n - 1) ** 2 != n - 1:
        raise BackboneLoadError(f"{source}: pos_embed has {n} positions: neither a square grid nor 1 + a square grid")
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"^(blocks\.\d+\.mlp\.)fc([12])\.(weight|bias)$", k)
        if m:
            fc1, fc2 = sd[f"{m.group(1)}fc1.weight"], sd[f"{m.group(1)}fc2.weight"]
            if fc1.shape[0] == 2 * fc2.shape[1]:  # packed SwiGLU
                k = f"{m.group(1)}{'w12' if m.group(2) == '1' else 'w3'}.{m.group(3)}"
        out[k] = v
    cls = sd["cls_token"]
    out["mask_token"] = torch.zeros(1, cls.shape[-1], dtype=cls.dtype, device=cls.device)
    return out


def _is_backbone_name(key: str) -> bool:
    """An official/ours or a timm ViT backbone parameter name (block-chunked names included)."""
    key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
    return bool(_OFFICIAL_KEY.match(key) or _TIMM_KEY.match(key))


def _no_backbone_keys(sd: Mapping[str, Any], source: str) -> BackboneLoadError:
    """The error for a state dict without any ViT backbone name: the most common key prefixes, and what a
    training checkpoint's ``student.``/``teacher.``/``backbone.`` prefixes mean."""
    if not sd:
        return BackboneLoadError(f"no ViT backbone keys found in {source}: it holds no tensors")
    prefixes = Counter(str(k).split(".", 1)[0] for k in sd)
    common = ", ".join(f"{p}.* ({n} key{'s' if n > 1 else ''})" for p, n in prefixes.most_common(3))
    more = f" and {len(prefixes) - 3} more prefixes" if len(prefixes) > 3 else ""
    hint = ""
    n_student = sum(str(k).startswith("student.backbone.") for k in sd)
    n_backbone = sum(".backbone." in f".{k}" for k in sd)
    if n_student:
        hint = (f"; {n_student} keys start with 'student.backbone.': a DINOv2 training checkpoint holding only the "
                "student. The teacher (teacher.backbone.*) is what is loaded, and this file has none; to use the "
                "student, save its keys without the 'student.backbone.' prefix with torch.save and load that file")
    elif n_backbone:
        hint = f"; {n_backbone} keys hold 'backbone.' in their names, but none under it is a ViT backbone name"
    return BackboneLoadError(f"no ViT backbone keys found in {source}: its most common key prefixes are "
                             f"{common}{more}{hint}")


def _detect_layout(sd: Mapping[str, Tensor], source: str = "state dict") -> str:
    """``"timm"`` for timm's names, else ``"official"``; raises when no key is a ViT backbone name.

    timm has ``reg_token`` and never ``mask_token``/``register_tokens``/``mlp.w12``; a dict with none of these
    markers is timm's only when it holds timm's tokens (``cls_token``, ``pos_embed``, ``patch_embed``) and
    timm's block names (reading an official dict without ``mask_token`` as timm gives the same model).
    A dict with some backbone names but neither marker set is read as official, so that the errors list what
    is missing or extra."""
    keys = {_CHUNKED_BLOCK.sub(r"blocks.\1.", str(k)) for k in sd}
    if "reg_token" in keys:
        return "timm"
    if "mask_token" in keys or "register_tokens" in keys or any(".mlp.w12." in k or ".mlp.w3." in k for k in keys):
        return "official"
    timm_blocks = any(k.startswith("blocks.") and _TIMM_KEY.match(k) for k in keys)
    if {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= keys and timm_blocks:
        return "timm"
    if any(_is_backbone_name(k) for k in keys):
        return "official"
    raise _no_backbone_keys(sd, source)


def _to_ours(sd: Mapping[str, Tensor], layout: str, source: str, strict: bool) -> StateDict:
    if layout not in LAYOUTS:
        raise BackboneLoadError(f"{source}: unknown layout {layout!r}, expected one of {', '.join(LAYOUTS)}")
    pattern = _TIMM_KEY if layout == "timm" else _OFFICIAL_KEY
    if not strict:
        dropped = sorted(k for k in sd if not pattern.match(_CHUNKED_BLOCK.sub(r"blocks.\1.", k)))
        if dropped:
            warnings.warn(f"{source}: ignoring {len(dropped)} non-backbone keys: {_listing(dropped)}", stacklevel=3)
            sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    if layout == "timm":
        return from_timm_state_dict(sd, source)
    return from_official_state_dict(sd, source)


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; never an unsafe fallback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            reason = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), None)
            if reason is None:  # e.g. a plain pickle of protocol 4+, refused before its globals are reached
                found = _unsafe_globals(path)
                reason = (f"it imports {', '.join(found[:_SHOW])}" if found else
                          next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln), "unsupported content"))
            raise BackboneLoadError(
                f"{path}: torch.load(weights_only=True) refused this file ({reason}). It holds Python objects "
                "besides tensors and plain containers, so it may not be a plain checkpoint; it is not loaded "
                "unsafely. Save the state dict alone (torch.save(model.state_dict(), ...)) and load that."
            ) from exc
        raise BackboneLoadError(f"{path}: not a torch checkpoint ({exc})") from exc
    except Exception as exc:  # torch raises many types (RuntimeError, EOFError, KeyError, IndexError, ...)
        raise BackboneLoadError(
            f"{path}: cannot read it as a torch checkpoint: truncated, corrupt or another kind of file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global that the pickle(s) in ``data`` import, read with :mod:`pickletools`
    (which only parses opcodes: nothing is imported or run). Legacy torch files hold several pickles in a row."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str | None] = []  # what each opcode pushed: a string, or None for anything else
        memo: dict[int, str | None] = {}
        start = stream.tell()
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2 and strings[-2] and strings[-1]:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if name in ("BINPUT", "LONG_BINPUT", "PUT") and isinstance(arg, int):
                    memo[arg] = strings[-1] if strings else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int):
                    strings.append(memo.get(arg))
                elif op.stack_after and name != "MARK":
                    is_text = isinstance(arg, str) and name.endswith(("UNICODE", "UNICODE8", "STRING"))
                    strings.append(arg if is_text else None)
                if name == "STOP":
                    break
        except Exception:  # noqa: BLE001 (not a pickle past this point: report what was found)
            break
        if stream.tell() == start:
            break
    return list(dict.fromkeys(found))


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle at ``path`` imports that ``torch.load(weights_only=True)`` does not allow."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                data = zf.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # a private helper: fall back to torch's own modules
        return [g for g in _pickle_globals(data) if not g.startswith(("torch.", "collections.OrderedDict"))]
    return [g for g in _pickle_globals(data) if g not in allowed]


def _take_prefix(sd: Mapping[str, Any], prefix: str, source: str) -> dict[str, Any]:
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise BackboneLoadError(f"{source}: no keys start with {prefix!r} (found: {_listing(sorted(sd))})")
    return out


def _strip_wrappers(sd: dict[str, Any]) -> dict[str, Any]:
    """Remove the prefixes of DDP (``module.``), torch.compile (``_orig_mod.``) or a bare ``backbone.`` (a
    meta-architecture's backbone saved with its heads, e.g. ``backbone.*`` + ``head.weight``).

    A prefix is removed when every key has it, or when no other key is a backbone name (nor would collide
    with a stripped one) and most keys have it or the backbone names are under it; the other keys keep their
    names, so that ``strict=False`` drops them as non-backbone keys and ``strict=True`` reports them."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in ("module.", "_orig_mod.", "backbone."):
            inside = {str(k)[len(prefix):] for k in sd if str(k).startswith(prefix)}
            outside = [str(k) for k in sd if not str(k).startswith(prefix)]
            if not inside:
                continue
            if outside and (inside & set(outside) or any(_is_backbone_name(k) for k in outside)
                            or (len(inside) <= len(outside) and not any(_is_backbone_name(k) for k in inside))):
                continue
            sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
            changed = True
    return sd


def _state_dict_from_object(obj: Any, source: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The teacher/backbone state dict (and our ``backbone_config``, if any) inside a loaded torch object."""
    if not isinstance(obj, Mapping):
        raise BackboneLoadError(f"{source}: holds a {type(obj).__name__}, not a checkpoint dict")
    config = None
    if isinstance(obj.get("teacher"), Mapping):  # ours (model.pt) or the seed's teacher_checkpoint.pth
        config = obj.get("backbone_config")
        if config is not None and not isinstance(config, Mapping):
            raise BackboneLoadError(f"{source}: backbone_config is a {type(config).__name__}, not a dict")
        sd = _take_prefix(obj["teacher"], "backbone.", f"{source} ['teacher']")
    elif isinstance(obj.get("model"), Mapping) and any(str(k).startswith("teacher.") for k in obj["model"]):
        sd = _take_prefix(obj["model"], "teacher.backbone.", f"{source} ['model']")  # DINOv2 training ckpt
    elif any(str(k).startswith("teacher.backbone.") for k in obj):  # a DINOv2 training model's state dict
        sd = _take_prefix(obj, "teacher.backbone.", source)
    elif isinstance(obj.get("model"), Mapping):
        sd = dict(obj["model"])
    elif isinstance(obj.get("state_dict"), Mapping):
        sd = dict(obj["state_dict"])
    else:
        sd = dict(obj)
    sd = _strip_wrappers(sd)
    flat = [k for k in sd if "flat_param" in str(k) or "_fsdp_wrapped_module" in str(k)]
    if flat:
        raise BackboneLoadError(f"{source}: holds FSDP-sharded parameters ({_listing(flat)}); it cannot be read "
                              "alone. Use the consolidated teacher_checkpoint.pth (or an export) instead")
    not_tensors = sorted(str(k) for k, v in sd.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise BackboneLoadError(f"{source}: not a backbone state dict: {_listing(not_tensors)} are not tensors")
    return sd, (dict(config) if config is not None else None)


def _read_export_info(st_path: Path, metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    json_path = st_path.with_suffix(".json")
    if json_path.is_file():
        try:
            info = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackboneLoadError(f"{json_path}: not valid JSON ({exc})") from exc
        source = str(json_path)
    elif metadata and EXPORT_FORMAT in metadata:
        info = json.loads(metadata[EXPORT_FORMAT])
        source = f"{st_path} (metadata)"
    else:
        return None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise BackboneLoadError(f"{source}: expected {{'format': '{EXPORT_FORMAT}', 'layout', 'config'}}")
    if info.get("layout") not in LAYOUTS or not isinstance(info.get("config"), dict):
        raise BackboneLoadError(f"{source}: 'layout' must be one of {', '.join(LAYOUTS)} and 'config' a dict")
    return info


def _read_safetensors(path: Path, strict: bool) -> tuple[StateDict, dict[str, Any] | None, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error types
        raise BackboneLoadError(f"{path}: cannot read it as safetensors: truncated, corrupt or another kind of "
                              f"file ({type(exc).__name__}: {exc})") from exc
    info = _read_export_info(path, metadata)
    if info is None:
        sd = _strip_wrappers(sd)
        return _to_ours(sd, _detect_layout(sd, str(path)), str(path), strict), None, str(path)
    return _to_ours(sd, info["layout"], str(path), strict), dict(info["config"]), str(path)


def _read_torch_file(path: Path, strict: bool) -> tuple[StateDict, dict[str, Any] | None, str]:
    sd, config = _state_dict_from_object(_torch_load(path), str(path))
    return _to_ours(sd, _detect_layout(sd, str(path)), str(path), strict), config, str(path)


def _commit_time(ckpt: Path) -> float:
    """When a checkpoint was committed: its ``COMMITTED`` marker's ``"time"``, else the marker's mtime."""
    marker = ckpt / "COMMITTED"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = None
    stamp = info.get("time") if isinstance(info, dict) else None
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and math.isfinite(stamp):
        return float(stamp)
    return marker.stat().st_mtime


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _resolve_dir(d: Path) -> tuple[Path, str | None]:
    """The weights file a checkpoint or run directory is read from, and a note to print when a run's newest
    checkpoint is preferred to its (stale) export."""
    if (d / "model.pt").is_file():
        if not (d / "COMMITTED").exists():
            raise BackboneLoadError(f"{d}: checkpoint has no COMMITTED marker, so it was not completely written")
        return d / "model.pt", None
    from fastdinov2.train.checkpoint import list_checkpoints

    # the newest by data position (a run continued on more processes names later checkpoints with smaller steps)
    committed = [sub for _, sub in list_checkpoints(d / "checkpoints") if (sub / "model.pt").is_file()]
    export = d / "teacher_backbone.safetensors"
    if export.is_file():
        if committed:
            stamp = _commit_time(committed[-1])
            # a run continued past the end it was exported at (1 s: file times come from a coarser clock)
            if stamp > export.stat().st_mtime + 1.0:
                return committed[-1] / "model.pt", (
                    f"[fastdinov2] {committed[-1]} (committed {_when(stamp)}) is newer than {export} (written "
                    f"{_when(export.stat().st_mtime)}): loading the checkpoint")
        return export, None
    if committed:
        return committed[-1] / "model.pt", None
    raise BackboneLoadError(f"{d}: not a run or checkpoint directory: found no teacher_backbone.safetensors, no "
                          "committed checkpoints/step_*/model.pt and no model.pt + COMMITTED")


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        return _resolve_dir(p)
    if p.suffix == ".json":
        st = p.with_suffix(".safetensors")
        if not st.is_file():
            raise BackboneLoadError(f"{p}: an export description without its weights {st.name}")
        return st, None
    return p, None


def resolve_backbone_file(path: str | os.PathLike[str]) -> Path:
    """The file :func:`read_backbone_weights` reads for ``path`` (module docstring): a checkpoint directory's
    ``model.pt``; a run directory's export, or its newest committed checkpoint (the newer of the two); an
    export's ``.safetensors`` for its ``.json``; any other file itself."""
    return _resolve(path)[0]


def read_backbone_weights(path: str | os.PathLike[str], strict: bool = True
                          ) -> tuple[StateDict, dict[str, Any] | None, str]:
    """Read any supported file or directory into ``(state dict in our layout, config or None, source)``.

    ``config`` is the stored constructor config (our exports and checkpoints), else None. ``source`` is the
    file actually read (:func:`resolve_backbone_file`), for messages. ``strict=False`` drops (with a warning)
    keys that are not backbone keys.
    """
    p, note = _resolve(path)
    if note is not None:
        print(note, file=sys.stderr)
    if p.suffix == ".safetensors":
        return _read_safetensors(p, strict)
    return _read_torch_file(p, strict)


# ---------------------------------------------------------------------------------------------------------
# Loading into models
# ---------------------------------------------------------------------------------------------------------


def _mismatch_report(model: nn.Module, sd: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    return missing, unexpected, shapes


def _describe(model: DinoVisionTransformer) -> str:
    c = model.config
    extra = f", {c['num_register_tokens']} registers" if c["num_register_tokens"] else ""
    return (f"ViT {c['embed_dim']}d x {c['depth']} blocks, patch {c['patch_size']}, img {c['img_size']}"
            f"{extra}, {c['ffn_layer']}{', no LayerScale' if not c['layerscale_init'] else ''}")


def check_state_dict(model: DinoVisionTransformer, sd: Mapping[str, Tensor], source: str,
                     strict: bool = True) -> None:
    """Raise :class:`BackboneLoadError` naming ``source`` and listing missing/unexpected keys (when
    ``strict``) and shape mismatches (always); warn about missing/unexpected keys when not strict."""
    missing, unexpected, shapes = _mismatch_report(model, sd)
    if shapes or (strict and (missing or unexpected)):
        parts = [f"{len(missing)} missing keys: {_listing(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected keys: {_listing(unexpected)}" if unexpected else "",
                 f"{len(shapes)} shape mismatches: {_listing(shapes)}" if shapes else ""]
        raise BackboneLoadError(f"{source}: weights do not fit the backbone ({_describe(model)}): "
                              + "; ".join(p for p in parts if p))
    if missing or unexpected:
        warnings.warn(f"{source}: loaded non-strictly; missing: {_listing(missing) or 'none'}; "
                      f"unexpected: {_listing(unexpected) or 'none'}", stacklevel=3)


def load_state_dict_checked(model: DinoVisionTransformer, sd: Mapping[str, Tensor], source: str,
                            strict: bool = True, assign: bool = False) -> None:
    """:func:`check_state_dict`, then ``model.load_state_dict`` of the keys the model has."""
    check_state_dict(model, sd, source, strict)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=strict, assign=assign)


def _apply_arch(arch: str, config: dict[str, Any], inferred: bool, source: str) -> dict[str, Any]:
    """Check ``config`` against a named width; an inferred head count (a guess) is replaced by the arch's."""
    if arch == "vit_custom":
        return config
    if arch not in ARCH_WIDTHS:
        raise ValueError(f"unknown arch {arch!r}: not one of {', '.join([*ARCH_WIDTHS, 'vit_custom'])}")
    dim, depth, heads = ARCH_WIDTHS[arch]
    have = (config.get("embed_dim"), config.get("depth"))
    if have != (dim, depth) or (not inferred and config.get("num_heads") != heads):
        raise BackboneLoadError(f"{source}: holds a backbone of (embed_dim, depth, num_heads) = "
                              f"{(*have, config.get('num_heads'))}, but arch={arch} is {(dim, depth, heads)}")
    return {**config, "num_heads": heads}


def load_backbone(path: str | os.PathLike[str], device: str | torch.device = "cpu", arch: str | None = None,
                  strict: bool = True) -> DinoVisionTransformer:
    """Build and load the backbone stored at ``path`` (any input listed in the module docstring).

    The architecture comes from the stored config (our exports and checkpoints) or is inferred from the
    tensors (:func:`infer_vit_config`); ``arch`` (e.g. ``"vit_small"``), when given, must agree with its
    width and depth, and supplies the head count, which tensors alone do not determine.
    Returns the model on ``device`` in eval mode, in float32. Errors name the file and list missing /
    unexpected keys and shape mismatches. ``strict=False`` tolerates missing/unexpected keys (with a
    warning), never shape mismatches.
    """
    sd, config, source = read_backbone_weights(path, strict=strict)
    inferred = config is None
    if config is None:
        config = infer_vit_config(sd, source)
    if arch is not None:
        config = _apply_arch(arch, config, inferred, source)
    try:
        with torch.device("meta"):  # no random init of weights that are overwritten anyway
            model = build_vit(**config)
    except (TypeError, ValueError) as exc:
        raise BackboneLoadError(f"{source}: stored backbone config {config} is not valid ({exc})") from exc
    check_state_dict(model, sd, source, strict)
    if strict:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
    else:  # missing tensors keep a real initialisation; check_state_dict above has warned
        model = build_vit(**config)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model.to(device).eval()


def load_pretrained_into(model: DinoVisionTransformer, path: str | os.PathLike[str]) -> None:
    """Load backbone weights from ``path`` into ``model`` strictly (continued pre-training,
    ``student.pretrained=PATH``). Position embeddings stored for another grid are resampled (bicubic) to the
    model's native grid; everything else must match exactly."""
    sd, _, source = read_backbone_weights(path, strict=True)
    pos = sd.get("pos_embed")
    target = model.pos_embed
    if pos is not None and pos.shape != target.shape and pos.ndim == 3 and pos.shape[-1] == target.shape[-1]:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:
            sd = {**sd, "pos_embed": interpolate_pos_embed(pos, (model.native_grid, model.native_grid))}
    load_state_dict_checked(model, sd, source, strict=True)


# ---------------------------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file, then rename; the file gets the usual mode ``0o666 & ~umask`` (a
    temporary file or safetensors would leave it 0600, unreadable to colleagues on a shared cluster)."""
    from fastdinov2.eval.results import share_like_a_new_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        share_like_a_new_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_backbone(model: DinoVisionTransformer, out_stem: str | os.PathLike[str],
                    layout: Layout = "fastdinov2") -> Path:
    """Write ``<stem>.safetensors`` (keys in ``layout``) and ``<stem>.json``
    (``{"format": "fastdinov2-backbone", "layout", "config": model.config}``), each atomically; the JSON is
    also stored in the safetensors metadata. ``"official"`` keys equal ours; ``"timm"`` loads strictly into
    timm's ``VisionTransformer`` of the same shape. Returns the ``.safetensors`` path."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    stem = Path(out_stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd = to_timm_state_dict(sd) if layout == "timm" else to_official_state_dict(sd)
    sd = {k: v.to("cpu").clone().contiguous() for k, v in sd.items()}
    info = {"format": EXPORT_FORMAT, "layout": layout, "config": dict(model.config)}
    text = json.dumps(info, indent=2, sort_keys=True)
    st_path = stem.with_name(stem.name + ".safetensors")
    json_path = stem.with_name(stem.name + ".json")
    _atomic_write(st_path, lambda p: save_file(sd, str(p), metadata={"format": "pt", EXPORT_FORMAT: text}))
    _atomic_write(json_path, lambda p: p.write_text(text + "\n"))
    return st_path
