"""Distributed training (gloo, CPU): two processes with the global batch of one reproduce the
single-process run; the frozen ABNN substitute stays out of DDP; SyncBN by class swap.

This file doubles as the worker script that ``torch.distributed.run`` starts for one test
(``python -m torch.distributed.run ... tests/test_distributed.py worker ARGS``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, write_fake_npz  # noqa: E402

TINY = dict(width=0.0625, epochs=2, batch_size=16, val_size=8, augment=False, device="cpu", num_threads=1)
# The plain ResNet at lr 0.1 and batch 16 on random labels is chaotic: float rounding differences
# (even 1 vs 2 threads in one process) grow to ~1e-1 in 16 steps.  At this gentler setting a
# single process and 2 ranks with SyncBN agree to ~1e-7, while 2 ranks without SyncBN differ by
# ~1e-2 in the weights and ~3e-3 in the loss: the comparison below tells them apart.
STANDARD = dict(TINY, batch_size=32, lr=0.005)
# ABNN at lr 0.1 is as chaotic (its 2-rank loss was off by 4e-4 on one machine, 0 on another):
# the ABNN test below trains at lr 0.005 too.


def _substitute_file(path: Path) -> Path:
    from abnn.models import vgg19_bn_substitute

    torch.manual_seed(1)
    torch.save(vgg19_bn_substitute(200, width=1 / 16).state_dict(), path)
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["train_loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(single: Path, multi: Path, cfg: dict) -> None:
    """Loss curve and final weights of a 2-process run match the single-process run.  (Without
    SyncBN the same comparison is off by ~1e-2 in the loss and ~1 in the weights.)"""
    ls, lm = _losses(single), _losses(multi)
    assert len(ls) == len(lm) == cfg["epochs"]
    assert lm == pytest.approx(ls, rel=1e-5, abs=1e-6)
    a = torch.load(single / "model.pt", weights_only=True)
    b = torch.load(multi / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        # float32 reductions in another order (SyncBN's all-reduce) leave ~2e-4 in BN running
        # statistics on some CPUs; without SyncBN the weights differ by ~1
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-3, atol=1e-3), k
    res = json.loads((multi / "train_results.json").read_text())
    assert res["world_size"] == 2 and res["per_rank_batch_size"] == cfg["batch_size"] // 2 and res["sync_bn"]
    assert not list(multi.glob("*.tmp"))


def _single(cfg_kwargs: dict, out: Path) -> None:
    from abnn.config import TrainConfig
    from abnn.training import train

    train(TrainConfig(**cfg_kwargs), out, progress=False)


def test_two_processes_match_one_abnn_via_cli(tmp_path, capsys):
    """`abnn train --nproc 2` (torch.distributed.run, gloo) for ABNN; the frozen substitute is
    replicated, untouched, and the cost is counted per rank (3N per step)."""
    from abnn.cli import main

    root = write_fake_npz(tmp_path / "data")
    sub = _substitute_file(tmp_path / "sub.pt")
    multi = tmp_path / "multi"
    code = main(["train", "--nproc", "2", "--method", "abnn", "--substitute", str(sub), "--substitute-width", "0.0625",
                 "--out", str(multi), "--width", "0.0625", "--epochs", "2", "--batch-size", "16", "--val-size", "8",
                 "--lr", "0.005",
                 "--no-augment", "--data-root", str(root), "--no-progress", "--device", "cpu", "--threads", "1"])
    assert code == 0
    single = tmp_path / "single"
    _single(dict(TINY, method="abnn", substitute=str(sub), substitute_width=1 / 16, lr=0.005, data_root=str(root)),
            single)
    _assert_same_training(single, multi, TINY)
    res = json.loads((multi / "train_results.json").read_text())
    assert res["cost_N_per_step"] == 3.0 and res["cost"]["per_network"]["substitute"]["backward"] == 0
    own = torch.load(sub, weights_only=True)
    trained = torch.load(multi / "model.pt", weights_only=True)
    assert all(torch.equal(v, trained["substitute." + k]) for k, v in own.items())


def test_two_processes_standard_and_pgd_at_in_one_group(tmp_path):
    """A process group created by the caller (torchrun running this file) is reused by train():
    standard matches the single-process run; PGD-AT (attack on the module inside DDP) runs and
    counts 4N per step per rank; only rank 0 writes the run folders."""
    root = write_fake_npz(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "worker",
           str(root), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = tmp_path / "single"
    _single(dict(STANDARD, method="standard", data_root=str(root)), single)
    _assert_same_training(single, tmp_path / "standard", STANDARD)
    res = json.loads((tmp_path / "pgd-at" / "train_results.json").read_text())
    assert res["cost_N_per_step"] == 4.0 and res["world_size"] == 2
    assert (tmp_path / "pgd-at" / "model.pt").is_file()
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0.json", "rank1.json"]


def _worker(root: str, out: str) -> None:
    from abnn.config import TrainConfig
    from abnn.training import train

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for method, base in (("standard", STANDARD), ("pgd-at", dict(TINY, at_steps=1, epochs=1))):
        cfg = TrainConfig(**dict(base, method=method, data_root=root))
        results[method] = train(cfg, Path(out) / method, progress=False)
    assert dist.is_initialized()  # train() leaves a group it did not create alone
    Path(out, f"rank{rank}.json").write_text(json.dumps({m: r.rank for m, r in results.items()}))
    dist.destroy_process_group()


# -- in-process units --------------------------------------------------------------------------

def test_convert_sync_batchnorm_keeps_objects_hooks_and_keys(tiny_abnn):
    from abnn.training.distributed import SyncBatchNorm2d, convert_sync_batchnorm

    model = tiny_abnn
    keys = list(model.state_dict())
    bns = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    n = convert_sync_batchnorm(model, exclude=[model.substitute])
    assert n > 0 and list(model.state_dict()) == keys
    assert not any(isinstance(m, SyncBatchNorm2d) for m in model.substitute.modules())
    assert all(isinstance(m, SyncBatchNorm2d) for m in model.target.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(isinstance(layer.bn, SyncBatchNorm2d) for layer in model.adaptive.values())
    assert sum(isinstance(m, SyncBatchNorm2d) for m in bns) == n
    x = torch.rand(4, 3, 32, 32)   # not distributed: plain BatchNorm, the ABNN stage hooks still run
    model.train()
    assert model(x).shape == (4, 10)


def test_wrap_ddp_ignores_the_frozen_substitute(tiny_abnn, tmp_path):
    from abnn.training.distributed import DistContext, unwrap, wrap_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = wrap_ddp(tiny_abnn, DistContext(0, 1), torch.device("cpu"), sync_bn=True)
        sub_names = {"substitute." + n for n, _ in tiny_abnn.substitute.named_parameters()}
        sub_names |= {"substitute." + n for n, _ in tiny_abnn.substitute.named_buffers()}
        assert sub_names and sub_names <= set(ddp.parameters_to_ignore)
        assert not any(n.startswith("substitute.") for n in ddp.named_module_buffers)
        assert not ddp.forward_sync_buffers if hasattr(ddp, "forward_sync_buffers") else not ddp.broadcast_buffers
        assert unwrap(ddp) is tiny_abnn
        before = {k: v.clone() for k, v in tiny_abnn.substitute.state_dict().items()}
        ddp.train()
        loss = ddp(torch.rand(4, 3, 32, 32)).logsumexp(1).mean()
        loss.backward()
        assert all(p.grad is None for p in tiny_abnn.substitute.parameters())
        assert all(torch.equal(v, tiny_abnn.substitute.state_dict()[k]) for k, v in before.items())
    finally:
        dist.destroy_process_group()


def test_nproc_needs_a_divisible_batch(capsys, tmp_path):
    from abnn.cli import main

    code = main(["train", "--nproc", "3", "--batch-size", "16", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "divisible" in err and len(err.strip().splitlines()) == 1


def test_strip_nproc():
    from abnn.training.distributed import strip_nproc

    assert strip_nproc(["train", "--nproc", "2", "--out", "x", "--nproc=4"]) == ["train", "--out", "x"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    torch.set_num_threads(1)
    _worker(sys.argv[2], sys.argv[3])
