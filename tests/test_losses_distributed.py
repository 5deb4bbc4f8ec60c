"""Two gloo ranks holding half the batch each reproduce the single-process losses on the full batch.

Covers the cross-rank reductions of Sinkhorn-Knopp (DINO and iBOT, the latter with unequal token
counts per rank) and of the centre updates.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdinov2.distributed import get_world_size
from fastdinov2.losses import DINOLoss, iBOTPatchLoss

WORLD = 2
K = 16
N_PER_RANK = 6
IBOT_ROWS = (3, 7)  # masked tokens per rank: deliberately unequal
TEMP = 0.07


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "cls": torch.randn(WORLD * N_PER_RANK, K, generator=g),
        "cls2": torch.randn(WORLD * N_PER_RANK, K, generator=g) + 0.5,
        "patch": torch.randn(sum(IBOT_ROWS), K, generator=g),
        "patch2": torch.randn(sum(IBOT_ROWS), K, generator=g) - 0.3,
    }


def _run(data: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """The losses' reductions on one rank's share (``rank=None``: the whole batch in one process)."""
    if rank is None:
        cls, cls2, patch, patch2 = data["cls"], data["cls2"], data["patch"], data["patch2"]
    else:
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        start = sum(IBOT_ROWS[:rank])
        ibot_rows = slice(start, start + IBOT_ROWS[rank])
        cls, cls2 = data["cls"][rows], data["cls2"][rows]
        patch, patch2 = data["patch"][ibot_rows], data["patch2"][ibot_rows]
    dino, ibot = DINOLoss(K), iBOTPatchLoss(K)
    out = {
        "dino_sk": dino.sinkhorn_knopp_teacher(cls, TEMP),
        "ibot_sk": ibot.sinkhorn_knopp_teacher(patch, TEMP, torch.tensor(patch.shape[0])),
    }
    dino.update_center(cls)
    dino.update_center(cls2)
    ibot.update_center(patch)
    ibot.update_center(patch2)
    # a step where rank 0 holds no masked token: the single process sees only rank 1's tokens
    if rank is None:
        ibot.update_center(data["patch2"][IBOT_ROWS[0]:])
    else:
        ibot.update_center(patch2[:0] if rank == 0 else patch2)
    out["dino_center"] = dino.center.clone()
    out["ibot_center"] = ibot.center.clone()
    out["dino_probs"] = dino.softmax_center_teacher(cls2, TEMP)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        assert get_world_size() == WORLD
        torch.save(_run(_data(), rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    data = _data()
    full = _run(data, None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key in ("dino_sk", "dino_probs"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), full[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["ibot_sk"] for r in ranks]), full["ibot_sk"], rtol=1e-5, atol=1e-6)
    for key in ("dino_center", "ibot_center"):
        for r in ranks:
            torch.testing.assert_close(r[key], full[key], rtol=1e-5, atol=1e-6)
    # the single-process reference is itself not trivial: SK rows are assignments
    torch.testing.assert_close(full["dino_sk"].sum(1), torch.ones(WORLD * N_PER_RANK))
    assert full["dino_center"].abs().sum() > 0
