"""Test-suite settings: one intra-op thread (tests use tiny tensors, and several test processes or loader
workers on a 2-core machine make OpenMP thread pools spin against each other)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
