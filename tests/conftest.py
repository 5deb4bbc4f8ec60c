"""Test-suite settings: one intra-op thread (tests use tiny tensors, and several test processes or loader
workers on a 2-core machine make OpenMP thread pools spin against each other)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic image folder (4 classes x 8 training images of 40 px), one per test module."""
    from fastdinov2.data.synthetic import SyntheticSpec, write_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(root, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=4, image_size=40))
    return root
