"""The method registry (training/methods.py): every method is one entry; a new one is one
`register` call and then trains through the CLI, lists itself and counts its passes."""

import json

import pytest
import torch.nn.functional as F

from abnn.cli import main
from abnn.config import TrainConfig
from abnn.training.methods import METHODS, Method, get_method, register


def test_every_builtin_method_states_its_loss_model_and_counted_cost():
    assert set(METHODS) == {"standard", "abnn", "pgd-at", "fast-at", "oudefend", "probe"}
    cfg = TrainConfig(at_steps=5)
    assert {m: METHODS[m].cost(cfg) for m in METHODS} == {"standard": 2, "abnn": 3, "pgd-at": 12, "fast-at": 4,
                                                           "oudefend": 24, "probe": 3}  # METHOD.md s. 5
    assert [m for m in METHODS if METHODS[m].substitute] == ["abnn", "probe"]
    with pytest.raises(ValueError, match="registered already"):
        register(METHODS["standard"])


def test_a_toy_method_registered_in_one_place_trains_through_the_cli(tmp_path, fake_data_root, capsys, monkeypatch):
    def label_smoothed(cfg):
        def loss(model, x, y):
            logits = model(x)
            return F.cross_entropy(logits, y, label_smoothing=0.1), logits
        return loss

    monkeypatch.setitem(METHODS, "toy", None)  # restored after the test
    register(Method("toy", "Toy", "cross-entropy with label smoothing 0.1", label_smoothed), replace=True)
    assert main(["train", "--list-methods"]) == 0
    assert "toy  [Toy, 2N/step]" in capsys.readouterr().out
    run = tmp_path / "toy"
    assert main(["train", "--method", "toy", "--out", str(run), "--epochs", "1", "--width", "0.0625",
                 "--batch-size", "16", "--train-size", "32", "--val-size", "0", "--no-progress",
                 "--data-root", str(fake_data_root)]) == 0
    res = json.loads((run / "train_results.json").read_text())
    assert res["method"] == "toy" and res["cost_N_per_step"] == get_method("toy").cost(TrainConfig()) == 2.0
