"""A training step budget (``total_steps``): the run stops at exactly that step with the cosine
schedule at its end, resumes exactly mid-way, and records its steps; the per-epoch validation is
timed apart from the training time."""

from __future__ import annotations

import json
import math

import pytest
import torch

from abnn.config import TrainConfig
from abnn.training import train


def _lines(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(root, **kw) -> TrainConfig:
    # 64 fake training images in batches of 16: 4 steps per epoch; 6 steps end mid-way through epoch 2
    base = dict(width=0.0625, epochs=30, total_steps=6, batch_size=16, train_size=64, val_size=0, data_root=str(root), device="cpu")
    return TrainConfig(**{**base, **kw})


def test_total_steps_stops_at_the_budget_with_the_cosine_end(tmp_path, fake_data_root):
    res = train(_cfg(fake_data_root), tmp_path / "r", progress=False)
    assert (res.steps, res.total_steps, res.steps_per_epoch, res.epochs) == (6, 6, 4, 2)
    assert res.cost["steps"] == 6
    lines = _lines(tmp_path / "r")
    assert [(r["epoch"], r["step"]) for r in lines] == [(1, 4), (2, 6)] and not any(r.get("partial") for r in lines)
    assert lines[0]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 4 / 6)) / 2)
    assert lines[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine's end, at the budget's last step
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["epoch_done"], ck["step"]) == (1, True, 6)
    assert train(_cfg(fake_data_root), tmp_path / "r", progress=False, resume=True).steps == 6  # nothing left


@pytest.mark.parametrize("stop_at", [3, 5])  # in the first epoch, and in the budget's partial last epoch
def test_total_steps_resume_mid_way_is_exact(stop_at, tmp_path, fake_data_root):
    train(_cfg(fake_data_root), tmp_path / "a", progress=False)
    train(_cfg(fake_data_root), tmp_path / "b", progress=False, max_steps=stop_at)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == stop_at and ck["epoch_done"] is False
    train(_cfg(fake_data_root), tmp_path / "b", progress=False, resume=True)
    a, b = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _lines(tmp_path / "a"), _lines(tmp_path / "b")
    assert [(r["step"], r["lr"], r["train_loss"]) for r in la] == [(r["step"], r["lr"], r["train_loss"]) for r in lb]


def test_no_total_steps_keeps_whole_epochs(tmp_path, fake_data_root):
    res = train(_cfg(fake_data_root, epochs=2, total_steps=None), tmp_path / "r", progress=False)
    assert (res.steps, res.total_steps, res.epochs) == (8, 8, 2)


def test_validation_is_timed_apart_from_training(tmp_path, fake_data_root):
    """Clean and robust per-epoch validation: wall and CPU seconds per epoch in metrics.jsonl,
    their sums in train_results.json, none of it in the training time."""
    cfg = _cfg(fake_data_root, method="fast-at", total_steps=None, epochs=2, val_size=8, robust_val_size=8)
    res = train(cfg, tmp_path / "r", progress=False)
    lines = _lines(tmp_path / "r")
    for total, key in (("validation_seconds", "val_seconds"), ("validation_cpu_seconds", "val_cpu_seconds"),
                       ("robust_validation_seconds", "robust_val_seconds"),
                       ("robust_validation_cpu_seconds", "robust_val_cpu_seconds")):
        assert all(r[key] > 0 for r in lines), key
        assert getattr(res, total) == pytest.approx(sum(r[key] for r in lines)), total
    assert res.train_seconds == pytest.approx(sum(r["epoch_seconds"] for r in lines))


def test_total_steps_flag_and_identity(tmp_path, fake_data_root):
    from abnn.cli import main
    from abnn.config import config_differences

    assert main(["train", "--out", str(tmp_path / "r"), "--width", "0.0625", "--total-steps", "3", "--train-size", "64", "--batch-size",
                 "16", "--val-size", "0", "--data-root", str(fake_data_root), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "r" / "train_results.json").read_text())["steps"] == 3
    assert [d.name for d in config_differences({}, TrainConfig(total_steps=3))] == ["total_steps"]
    assert config_differences({"epochs": 30}, TrainConfig()) == []  # a recorded run without the field: unchanged
