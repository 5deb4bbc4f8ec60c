"""Continued pre-training: student and teacher start from a backbone file, heads fresh, optional head-only
warm-up during which the backbone does not move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastdinov2.config import load_config
from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset
from fastdinov2.interop import export_backbone, load_backbone
from fastdinov2.models.vit import build_backbone
from fastdinov2.train.loop import Trainer

from .test_train_e2e import TINY


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cp")
    write_synthetic_dataset(root / "data", SyntheticSpec(num_classes=2, train_per_class=8, val_per_class=2,
                                                         image_size=40))
    cfg = load_config("fastdinov2_tiny", TINY)
    torch.manual_seed(123)
    source = build_backbone(cfg.student, img_size=cfg.crops.global_crops_size)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return root / "data", export_backbone(source, root / "source")


def test_teacher_starts_from_the_loaded_backbone(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, weights = setup
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data}", f"student.pretrained={weights}"])
    trainer = Trainer(cfg, tmp_path / "run")
    loaded = load_backbone(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.forward_features(x)["x_norm_clstoken"]
        teacher = trainer.model.teacher.backbone.eval().forward_features(x)["x_norm_clstoken"]
        student = trainer.model.student.backbone.eval().forward_features(x)["x_norm_clstoken"]
    assert torch.equal(teacher, expected) and torch.equal(student, expected)


def test_head_only_warmup_keeps_the_backbone_fixed(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, weights = setup
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data}", f"student.pretrained={weights}",
                                          "student.head_warmup_epochs=1", "optim.warmup_epochs=0",
                                          "train.max_steps=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.run()
    after = trainer.model.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("dino_head."))


def test_pretrained_file_of_another_architecture_is_refused(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = setup
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data}"])
    other = build_backbone(load_config("fastdinov2_tiny", [*TINY, "student.embed_dim=48"]).student, img_size=32)
    path = export_backbone(other, tmp_path / "other")
    cfg = load_config("fastdinov2_tiny", [*TINY, f"data.root={data}", f"student.pretrained={path}"])
    with pytest.raises(Exception, match="other"):
        Trainer(cfg, tmp_path / "run")
