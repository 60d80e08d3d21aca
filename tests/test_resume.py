"""Durable training: mid-epoch checkpoints, a SIGKILL and an exact resume; safe loading errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abnn.cli import main
from abnn.config import TrainConfig
from abnn.training import train

from conftest import REPO, write_fake_npz


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _substitute_file(path: Path) -> Path:
    from abnn.models import vgg19_bn_substitute

    torch.manual_seed(1)
    torch.save(vgg19_bn_substitute(200, width=1 / 16).state_dict(), path)
    return path


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """A run killed with SIGKILL right after a mid-epoch checkpoint, resumed with --resume, ends
    with exactly the weights, metrics and counted cost of an uninterrupted run (PGD-AT: the
    attack's random starts test the RNG state; augmentation on: the loader's generator replay)."""
    root = write_fake_npz(tmp_path / "data", n_train=256)
    args = ["train", "--method", "pgd-at", "--at-steps", "1", "--width", "0.0625", "--epochs", "2",
            "--batch-size", "16", "--val-size", "8", "--checkpoint-every", "2", "--data-root", str(root),
            "--device", "cpu", "--threads", "1", "--no-progress"]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "abnn.cli", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)   # weights-only loadable
    assert ck["epoch_done"] is False and ck["step"] % 2 == 0 and 0 < ck["batch_in_epoch"] == ck["step"] - 32 * ck["epoch"]

    assert main([*args, "--out", str(killed), "--resume"]) == 0

    cfg = TrainConfig(method="pgd-at", at_steps=1, width=0.0625, epochs=2, batch_size=16, val_size=8,
                      checkpoint_every=2, data_root=str(root), device="cpu", num_threads=1)
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False)
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert _states_equal(a, b) or all(torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in a)
    la = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [1, 2]
    for ra, rb in zip(la, lb):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6) and ra["train_acc"] == rb["train_acc"]
    res_a = json.loads((ref / "train_results.json").read_text())
    res_b = json.loads((killed / "train_results.json").read_text())
    assert res_a["cost"] == res_b["cost"] and res_b["cost_N_per_step"] == 4.0


@pytest.mark.parametrize("method", ["abnn", "standard"])
def test_max_steps_stop_mid_epoch_then_resume_exact(method, tmp_path, fake_data_root):
    kw = dict(method=method, width=0.0625, epochs=2, batch_size=16, val_size=0, data_root=str(fake_data_root),
              device="cpu")
    if method == "abnn":
        kw.update(substitute=str(_substitute_file(tmp_path / "sub.pt")), substitute_width=1 / 16)
    train(TrainConfig(**kw), tmp_path / "a", progress=False)
    train(TrainConfig(**kw), tmp_path / "b", progress=False, max_steps=3)
    partial = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert partial[-1].get("partial") is True
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["epoch_done"], ck["batch_in_epoch"], ck["step"]) == (0, False, 3, 3)
    train(TrainConfig(**kw), tmp_path / "b", progress=False, resume=True)
    assert _states_equal(torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt"))
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and not any(r.get("partial") for r in lines)


def test_checkpoint_contents_weights_only(tmp_path, fake_data_root):
    cfg = TrainConfig(width=0.0625, epochs=1, batch_size=16, val_size=0, data_root=str(fake_data_root), device="cpu",
                      checkpoint_every=1)
    train(cfg, tmp_path / "r", progress=False, max_steps=2)
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "cost", "rng", "rng_per_rank", "epoch", "step",
                "batch_in_epoch", "epoch_partial", "config", "version"):
        assert key in ck, key
    import abnn

    assert ck["version"] == abnn.__version__ and ck["config"]["checkpoint_every"] == 1
    assert isinstance(ck["rng"]["torch"], torch.Tensor) and ck["world_size"] == 1
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_truncated_checkpoint_on_resume_is_one_line(tmp_path, fake_data_root, capsys):
    args = ["train", "--out", str(tmp_path / "r"), "--width", "0.0625", "--epochs", "2", "--batch-size", "16",
            "--val-size", "0", "--data-root", str(fake_data_root), "--no-progress", "--device", "cpu"]
    assert main([*args, "--max-steps", "2"]) == 0
    ckpt = tmp_path / "r" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert main(args) == 2  # the same command continues: from a truncated checkpoint, not at all
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_model_for_another_width_or_class_count_is_one_line(tmp_path, fake_data_root, capsys):
    from abnn.models import resnet18_cifar

    run = tmp_path / "r"
    root = ["--data-root", str(fake_data_root), "--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run), "--width", "0.0625", "--epochs", "1", "--batch-size", "32",
                 "--val-size", "0", *root]) == 0
    for wrong in (resnet18_cifar(10, width=0.125), resnet18_cifar(200, width=0.0625)):
        torch.save(wrong.state_dict(), run / "model.pt")
        capsys.readouterr()
        assert main(["evaluate", str(run), "--n-eval", "4", *root]) == 2
        err = capsys.readouterr().err
        assert "model.pt" in err and "shape mismatch" in err and len(err.strip().splitlines()) == 1
    assert "linear" in err or "fc" in err  # the class-count case names the classifier


def test_train_result_writes_the_file_it_returns_and_reads_older_files(tmp_path, fake_data_root):
    from abnn.training import TrainResult

    cfg = TrainConfig(width=0.0625, epochs=1, batch_size=16, val_size=8, data_root=str(fake_data_root), device="cpu")
    res = train(cfg, tmp_path / "r", progress=False, max_steps=2)
    written = json.loads((tmp_path / "r" / "train_results.json").read_text())
    assert list(written) == list(res.to_dict()) and "robust_val" not in written and "substitute" not in written
    back = TrainResult.load(tmp_path / "r")
    assert back.to_dict() == written and (back.steps, back.complete) == (2, False)
    old = {"method": "standard", "steps": 5, "an_entry_of_another_version": 1}   # an older file: entries missing
    (tmp_path / "r" / "train_results.json").write_text(json.dumps(old))
    back = TrainResult.load(tmp_path / "r")
    assert back.steps == 5 and back.total_steps is None and back.to_dict()["an_entry_of_another_version"] == 1


def test_a_file_that_is_not_a_training_checkpoint_is_one_line(tmp_path):
    from abnn.errors import CheckpointError
    from abnn.training.checkpoint import TrainingCheckpoint

    torch.save({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")   # weights, not a training checkpoint
    with pytest.raises(CheckpointError, match="is not an abnn training checkpoint") as e:
        TrainingCheckpoint.load(tmp_path / "checkpoint.pt")
    assert len(str(e.value).splitlines()) == 1
