"""Loading and exporting backbones in every supported layout, and the errors for bad input."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastdinov2 import interop
from fastdinov2.interop import (
    BackboneLoadError,
    export_backbone,
    from_official_state_dict,
    from_timm_state_dict,
    infer_vit_config,
    load_backbone,
    load_pretrained_into,
    to_official_state_dict,
    to_timm_state_dict,
)
from fastdinov2.models.vit import DinoVisionTransformer, build_vit, interpolate_pos_embed

REPO = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0, **kw: object) -> DinoVisionTransformer:
    args: dict[str, object] = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
    args.update(kw)
    with torch.device("meta"):  # no init: every tensor is drawn below
        model = DinoVisionTransformer(**args)  # type: ignore[arg-type]
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial values for every tensor (mask token, LayerScale, ...)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def features(model: DinoVisionTransformer, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.forward_features(x)["x_prenorm"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------ official layout, built by hand from DINOv2's shapes


def official_shapes(dim: int, depth: int, registers: int, patch: int = 14, grid: int = 37,
                    swiglu_hidden: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official DINOv2 backbone checkpoint (``dinov2_vit*14[_reg4]_pretrain.pth``)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "ls2.gamma": (dim,),
        })
        if swiglu_hidden:
            shapes.update({b + "mlp.w12.weight": (2 * swiglu_hidden, dim), b + "mlp.w12.bias": (2 * swiglu_hidden,),
                           b + "mlp.w3.weight": (dim, swiglu_hidden), b + "mlp.w3.bias": (dim,)})
        else:
            shapes.update({b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                           b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    return shapes


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize(
    "arch, dim, depth, heads, swiglu",
    [("vit_small", 384, 12, 6, None), ("vit_base", 768, 12, 12, None), ("vit_large", 1024, 24, 16, None),
     ("vit_giant2", 1536, 40, 24, 4096)],
)
def test_official_checkpoints_load_strictly(arch: str, dim: int, depth: int, heads: int, swiglu: int | None,
                                            registers: int) -> None:
    sd = {k: torch.empty(s, device="meta") for k, s in official_shapes(dim, depth, registers,
                                                                       swiglu_hidden=swiglu).items()}
    sd = from_official_state_dict(sd)
    cfg = infer_vit_config(sd)
    assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (dim, depth, heads)
    assert (cfg["patch_size"], cfg["img_size"], cfg["num_register_tokens"]) == (14, 518, registers)
    assert cfg["ffn_layer"] == ("swiglu" if swiglu else "mlp") and cfg["layerscale_init"] is not None
    with torch.device("meta"):
        model = build_vit(**cfg)
        named = build_vit(arch, **{k: v for k, v in cfg.items() if k not in ("embed_dim", "depth", "num_heads")})
    interop.check_state_dict(model, sd, "official")
    model.load_state_dict(sd, strict=True, assign=True)
    assert set(named.state_dict()) == set(sd)
    if not registers:  # (with registers the conversion adds tensors, which is slow on meta; see round trips)
        timm = to_timm_state_dict(sd)
        assert set(timm) == {k.replace(".w12.", ".fc1.").replace(".w3.", ".fc2.") for k in sd} - {"mask_token"}


def test_chunked_fsdp_block_names_and_no_layerscale_or_biases(tmp_path: Path) -> None:
    ref = tiny(depth=4, layerscale_init=None, qkv_bias=False, ffn_bias=False)
    sd = ref.state_dict()
    chunked = {}
    for k, v in sd.items():  # DINOv2 block_chunks=2 names: blocks.<chunk>.<global index>.*
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        chunked[k] = v
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in chunked.items()},
                            "dino_head.mlp.0.weight": torch.zeros(4, 128)}}, path)
    model = load_backbone(path)
    assert model.config["layerscale_init"] is None and not model.config["qkv_bias"]
    assert model.config["proj_bias"] and not model.config["ffn_bias"]
    assert_same_weights(model.state_dict(), sd)
    assert torch.equal(features(model), features(ref))


# ------------------------------------------------ round trips


@pytest.mark.parametrize("registers", [0, 3])
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_round_trip_official(registers: int, ffn: str) -> None:
    model = tiny(num_register_tokens=registers, ffn_layer=ffn)
    sd = model.state_dict()
    back = from_official_state_dict(to_official_state_dict(model))
    assert_same_weights(back, sd)


@pytest.mark.parametrize("registers", [0, 3])
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_round_trip_timm(registers: int, ffn: str) -> None:
    model = tiny(num_register_tokens=registers, ffn_layer=ffn)
    sd = model.state_dict()
    timm = to_timm_state_dict(model)
    # timm's names: no mask_token, reg_token, fc1/fc2 even for SwiGLU, class position folded with registers
    assert "mask_token" not in timm and not any(".w12." in k or ".w3." in k for k in timm)
    assert ("reg_token" in timm) == bool(registers) and "register_tokens" not in timm
    grid = 16
    assert timm["pos_embed"].shape == (1, grid + (0 if registers else 1), 128)
    back = from_timm_state_dict(timm)
    assert back.keys() == sd.keys()
    assert torch.all(back["mask_token"] == 0)  # timm has none
    for k in sd:
        if k in ("mask_token", "cls_token", "pos_embed"):
            continue
        assert torch.equal(back[k], sd[k]), k
    if registers:
        assert torch.equal(back["cls_token"] + back["pos_embed"][:, :1], sd["cls_token"] + sd["pos_embed"][:, :1])
        assert torch.equal(back["pos_embed"][:, 1:], sd["pos_embed"][:, 1:])
        assert torch.all(back["pos_embed"][:, 0] == 0)
    else:
        assert torch.equal(back["cls_token"], sd["cls_token"]) and torch.equal(back["pos_embed"], sd["pos_embed"])
    clone = build_vit(**model.config).eval()
    clone.load_state_dict(back, strict=True)
    for size in ((32, 32), (48, 24)):  # identical features at the native grid and an interpolated one
        assert torch.equal(features(clone, size), features(model, size))


# ------------------------------------------------ export and load_backbone


@pytest.mark.parametrize("layout", ["fastdinov2", "official", "timm"])
def test_export_then_load_gives_equal_features(tmp_path: Path, layout: str) -> None:
    model = tiny(num_register_tokens=2, ffn_layer="swiglu" if layout == "timm" else "mlp")
    st = export_backbone(model, tmp_path / "out" / "backbone", layout=layout)  # type: ignore[arg-type]
    assert st == tmp_path / "out" / "backbone.safetensors" and st.is_file()
    info = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert info == {"format": "fastdinov2-backbone", "layout": layout, "config": model.config}
    for source in (st, st.with_suffix(".json")):
        loaded = load_backbone(source)
        assert not loaded.training and loaded.config == model.config
        assert torch.equal(features(loaded), features(model))
    st.with_suffix(".json").unlink()  # the metadata inside the safetensors file is enough
    assert torch.equal(features(load_backbone(st)), features(model))
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_bare_timm_safetensors_is_recognised(tmp_path: Path) -> None:
    model = tiny(num_register_tokens=4)
    path = tmp_path / "model.safetensors"  # e.g. from the timm hub: no json, no metadata
    save_file({k: v.contiguous().clone() for k, v in to_timm_state_dict(model).items()}, str(path))
    loaded = load_backbone(path)
    assert loaded.num_register_tokens == 4 and loaded.config["img_size"] == 32
    assert torch.equal(features(loaded), features(model))


def test_official_pth_and_dinov2_training_checkpoint(tmp_path: Path) -> None:
    student, teacher = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(teacher.state_dict(), path)
    assert torch.equal(features(load_backbone(path, arch="vit_custom")), features(teacher))
    ckpt = {"model": {**{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
                      **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
                      "dino_loss.center": torch.zeros(1, 8)}, "iteration": 12}
    path = tmp_path / "model_0000012.rank_0.pth"
    torch.save(ckpt, path)
    assert torch.equal(features(load_backbone(path)), features(teacher))


def _write_checkpoint(d: Path, teacher: DinoVisionTransformer, committed: bool = True) -> None:
    d.mkdir(parents=True)
    sd = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    sd["dino_head.last_layer.weight_g"] = torch.ones(3, 1)
    torch.save({"teacher": sd, "student": sd, "backbone_config": teacher.config}, d / "model.pt")
    if committed:
        (d / "COMMITTED").touch()


def test_training_checkpoint_and_run_dirs(tmp_path: Path) -> None:
    old, new, torn = tiny(seed=1), tiny(seed=2), tiny(seed=3)
    run = tmp_path / "run"
    _write_checkpoint(run / "checkpoints" / "step_00000010", old)
    _write_checkpoint(run / "checkpoints" / "step_00000020", new)
    _write_checkpoint(run / "checkpoints" / "step_00000030", torn, committed=False)
    assert torch.equal(features(load_backbone(run / "checkpoints" / "step_00000010")), features(old))
    assert torch.equal(features(load_backbone(run / "checkpoints" / "step_00000010" / "model.pt")), features(old))
    assert torch.equal(features(load_backbone(run)), features(new))  # newest committed
    with pytest.raises(BackboneLoadError, match="step_00000030.*COMMITTED"):
        load_backbone(run / "checkpoints" / "step_00000030")
    export_backbone(torn, run / "teacher_backbone")  # the final export wins over checkpoints
    assert torch.equal(features(load_backbone(run)), features(torn))
    with pytest.raises(BackboneLoadError, match="not a run or checkpoint directory"):
        load_backbone(tmp_path / "run" / "checkpoints")


def test_load_pretrained_into_resamples_position_embeddings(tmp_path: Path) -> None:
    src = tiny(img_size=64, num_register_tokens=1)
    st = export_backbone(src, tmp_path / "src")
    dst = tiny(seed=5, img_size=32, num_register_tokens=1)
    load_pretrained_into(dst, st)
    want = src.state_dict()
    want["pos_embed"] = interpolate_pos_embed(want["pos_embed"], (4, 4))
    assert_same_weights(dst.state_dict(), want)
    wrong = tiny(embed_dim=192, num_heads=3)
    with pytest.raises(BackboneLoadError, match="src.safetensors.*shape mismatches"):
        load_pretrained_into(wrong, st)
    no_regs = tiny()
    with pytest.raises(BackboneLoadError, match="unexpected keys: register_tokens"):
        load_pretrained_into(no_regs, st)


# ------------------------------------------------ hub


def test_torch_hub_local(tmp_path: Path) -> None:
    src = tiny(img_size=64, patch_size=16, embed_dim=384, depth=1, num_heads=6, num_register_tokens=2)
    st = export_backbone(src, tmp_path / "w")
    with pytest.raises(BackboneLoadError, match="arch=vit_small"):
        torch.hub.load(str(REPO), "vit_small", source="local", weights=str(st))  # depth 1 is not ViT-S
    ref = tiny(img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_register_tokens=2)
    st = export_backbone(ref, tmp_path / "tiny")
    model = torch.hub.load(str(REPO), "vit_tiny", source="local", weights=str(st), patch_size=16, img_size=64)
    assert not model.training and model.num_register_tokens == 2
    assert torch.equal(features(model, (64, 64)), features(ref, (64, 64)))
    model = torch.hub.load(str(REPO), "vit_tiny", source="local", weights=str(st), img_size=32)
    assert model.pos_embed.shape == (1, 1 + 4, 192)
    with torch.device("meta"):
        bare = torch.hub.load(str(REPO), "vit_small", source="local")
    assert (bare.patch_size, bare.config["img_size"], bare.embed_dim) == (14, 518, 384)


# ------------------------------------------------ bad input


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_backbone(tmp_path / "nothing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(BackboneLoadError, match="notes.pth"):
        load_backbone(text)
    good = tmp_path / "good.pth"
    torch.save(tiny().state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BackboneLoadError, match="cut.pth.*truncated"):
        load_backbone(cut)
    st = export_backbone(tiny(), tmp_path / "exp")
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(BackboneLoadError, match="exp.safetensors.*truncated"):
        load_backbone(st)
    with pytest.raises(BackboneLoadError, match="holds a list"):
        torch.save([torch.zeros(1)], tmp_path / "list.pth")
        load_backbone(tmp_path / "list.pth")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        torch.save({"teacher": {"backbone.cls_token": _Evil(str(marker))}}, fh)
    with pytest.raises(BackboneLoadError, match=r"evil.pth.*weights_only=True.*may not be a plain checkpoint"):
        load_backbone(path)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(BackboneLoadError, match="plain.pkl"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about the pickle protocol
        load_backbone(plain)


def test_other_architecture_lists_keys(tmp_path: Path) -> None:
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.zeros(8), "fc.weight": torch.zeros(2, 8)}
    path = tmp_path / "resnet.pth"
    torch.save(resnet, path)
    with pytest.raises(BackboneLoadError, match=r"no ViT backbone keys found in .*resnet.pth: .*conv1\.\* \(1 key\)"):
        load_backbone(path)
    # an export whose config does not match its tensors
    st = export_backbone(tiny(), tmp_path / "mixed")
    info = json.loads(st.with_suffix(".json").read_text())
    info["config"].update(depth=3, num_register_tokens=1)
    st.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(st)
    msg = str(err.value)
    assert "mixed.safetensors" in msg and "missing keys" in msg and "blocks.2." in msg and "register_tokens" in msg
    # a checkpoint with an extra, non-backbone key: strict refuses, non-strict warns and loads
    model = tiny()
    extra = {**model.state_dict(), "head.weight": torch.zeros(10, 128)}
    path = tmp_path / "with_head.pth"
    torch.save(extra, path)
    with pytest.raises(BackboneLoadError, match="head.weight"):
        load_backbone(path)
    with pytest.warns(UserWarning, match="head.weight"):
        loaded = load_backbone(path, strict=False)
    assert torch.equal(features(loaded), features(model))
    with pytest.raises(BackboneLoadError, match=r"\(128, 2, 2\).*arch=vit_small"), pytest.warns(UserWarning):
        load_backbone(path, arch="vit_small", strict=False)


# ------------------------------------------------ layouts that are neither official nor timm


def test_files_without_backbone_keys_say_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(BackboneLoadError, match=r"no ViT backbone keys found in .*empty.pth: it holds no tensors"):
        load_backbone(empty)
    student = tiny()  # a DINOv2 training checkpoint that holds only the student
    path = tmp_path / "student_only.pth"
    torch.save({"model": {f"student.backbone.{k}": v for k, v in student.state_dict().items()}}, path)
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(path)
    msg = str(err.value)
    n = len(student.state_dict())
    assert msg.startswith(f"no ViT backbone keys found in {path}") and f"student.* ({n} keys)" in msg
    assert "'student.backbone.'" in msg and "teacher" in msg and "timm" not in msg
    teacher = tiny(seed=3)  # a DINOv2 training model's state dict saved without the {"model": ...} wrapper
    path = tmp_path / "flat_training_model.pth"
    torch.save({**{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
                **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}}, path)
    assert torch.equal(features(load_backbone(path)), features(teacher))


def test_majority_backbone_prefix_is_stripped_before_dropping_heads(tmp_path: Path) -> None:
    model = tiny(depth=3)
    path = tmp_path / "with_head.pth"
    torch.save({"model": {**{f"backbone.{k}": v for k, v in model.state_dict().items()},
                          "head.weight": torch.zeros(10, 128)}}, path)
    with pytest.raises(BackboneLoadError, match=r"with_head.pth: 1 keys are not official DINOv2 .*: head.weight$"):
        load_backbone(path)
    with pytest.warns(UserWarning, match=r"ignoring 1 non-backbone keys: head.weight$"):
        loaded = load_backbone(path, strict=False)
    assert_same_weights(loaded.state_dict(), model.state_dict())
    # the same as a bare safetensors file
    st = tmp_path / "with_head.safetensors"
    save_file({**{f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()},
               "head.weight": torch.zeros(10, 128)}, str(st))
    with pytest.warns(UserWarning, match="head.weight"):
        assert torch.equal(features(load_backbone(st, strict=False)), features(model))
    # heads with more tensors than the backbone: the backbone names are under the prefix, none outside it
    heads = {f"head.layer{i}.weight": torch.zeros(2) for i in range(len(model.state_dict()) + 5)}
    path = tmp_path / "big_head.pth"
    torch.save({**{f"backbone.{k}": v for k, v in model.state_dict().items()}, **heads}, path)
    with pytest.warns(UserWarning, match=rf"ignoring {len(heads)} non-backbone keys: head.layer0.weight"):
        assert torch.equal(features(load_backbone(path, strict=False)), features(model))


@pytest.mark.parametrize("key", ["blocks.0.attn.qkv.bias", "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.bias",
                                 "blocks.1.mlp.fc1.weight"])
def test_a_key_missing_from_one_block_is_reported_as_missing(tmp_path: Path, key: str) -> None:
    sd = tiny(depth=3).state_dict()
    del sd[key]
    path = tmp_path / "holey.pth"
    torch.save(sd, path)
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(path)
    msg = str(err.value)
    assert "holey.pth: weights do not fit the backbone" in msg and f"1 missing keys: {key}" in msg
    assert "unexpected" not in msg


def test_legacy_pickle_with_code_names_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pth"  # a plain pickle (protocol 4): torch refuses it before reaching the global
    path.write_bytes(pickle.dumps({"teacher": {"backbone.cls_token": _Evil(str(marker))}}, protocol=4))
    with pytest.raises(BackboneLoadError, match=rf"legacy.pth: .*refused .*{os.system.__module__}\.system"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about the pickle protocol
        load_backbone(path)
    assert not marker.exists()
    old = tmp_path / "old_torch.pth"  # torch's legacy (non-zip) format
    torch.save({"teacher": {"backbone.cls_token": _Evil(str(marker))}}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(BackboneLoadError, match=rf"old_torch.pth: .*{os.system.__module__}\.system"):
        load_backbone(old)
    assert not marker.exists()


def test_non_strict_load_warns_once(tmp_path: Path) -> None:
    model = tiny()
    sd = model.state_dict()
    del sd["norm.weight"]
    path = tmp_path / "no_norm.pth"
    torch.save(sd, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_backbone(path, strict=False)
    notes = [str(w.message) for w in caught if "loaded non-strictly" in str(w.message)]
    assert len(notes) == 1 and "missing: norm.weight" in notes[0]
    assert torch.equal(loaded.norm.bias, model.norm.bias) and torch.all(loaded.norm.weight == 1)


def test_intermediate_layers_arguments_are_checked() -> None:
    model = tiny()
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"n=\[\]: expected a positive int or a non-empty list of block indices"):
        model.get_intermediate_layers(x, [])
    with pytest.raises(ValueError, match=r"block indices \[2, -1\] are out of range 0..1 \(the model has 2 blocks"):
        model.get_intermediate_layers(x, [0, 2, -1])
    with pytest.raises(ValueError, match=r"n=0: .* must be 1..2"):
        model.get_intermediate_layers(x, 0)
    assert len(model.get_intermediate_layers(x, [1])) == 1


def test_run_dir_prefers_a_checkpoint_newer_than_the_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    exported, continued = tiny(seed=1), tiny(seed=2)
    run = tmp_path / "run"
    _write_checkpoint(run / "checkpoints" / "step_00000010", exported)
    st = export_backbone(exported, run / "teacher_backbone")
    assert torch.equal(features(load_backbone(run)), features(exported))  # the final export of a finished run
    assert capsys.readouterr().err == ""
    # the run continued (--allow-config-change optim.epochs=2) and committed a checkpoint after the export
    newer = run / "checkpoints" / "step_00000020"
    _write_checkpoint(newer, continued)
    (newer / "COMMITTED").write_text(json.dumps({"step": 20, "time": st.stat().st_mtime + 60,
                                                 "sample_position": 640}))
    assert torch.equal(features(load_backbone(run)), features(continued))
    err = capsys.readouterr().err
    assert str(newer) in err and str(st) in err and len(err.strip().splitlines()) == 1
    # a checkpoint committed before the export (the end of a run) does not win over it
    (newer / "COMMITTED").write_text(json.dumps({"step": 20, "time": st.stat().st_mtime - 60}))
    assert torch.equal(features(load_backbone(run)), features(exported))


def test_exports_are_readable_by_the_group_and_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        st = export_backbone(tiny(), tmp_path / "shared")
        assert (st.stat().st_mode & 0o777, st.with_suffix(".json").stat().st_mode & 0o777) == (0o644, 0o644)
        os.umask(0o007)
        st = export_backbone(tiny(), tmp_path / "group")
        assert (st.stat().st_mode & 0o777, st.with_suffix(".json").stat().st_mode & 0o777) == (0o660, 0o660)
    finally:
        os.umask(old)


def test_torch_hub_accepts_pretrained(tmp_path: Path) -> None:
    with torch.device("meta"):
        bare = torch.hub.load(str(REPO), "vit_small", source="local", pretrained=False)
    assert (bare.patch_size, bare.embed_dim) == (14, 384)
    with pytest.raises(ValueError, match=r"vit_small: pretrained=True .* download nothing .* weights=PATH"):
        torch.hub.load(str(REPO), "vit_small", source="local", pretrained=True)
    ref = tiny(img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    st = export_backbone(ref, tmp_path / "tiny")
    model = torch.hub.load(str(REPO), "vit_tiny", source="local", pretrained=True, weights=str(st))
    assert torch.equal(features(model, (64, 64)), features(ref, (64, 64)))
