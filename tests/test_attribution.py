"""Gradient attribution (exact split of the input gradient) and the path swap (issue 19)."""

import pytest
import torch
import torch.nn.functional as F

from abnn.attacks import UnsupportedModelError
from abnn.evaluation.attribution import gradient_attribution, path_swap, summarize_attribution, swap_partners
from abnn.models import resnet18_cifar


def _full_grad(model, x, y):
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y, reduction="sum"), xi)
    return g


def test_parts_sum_to_the_full_gradient_float64(tiny_abnn):
    model = tiny_abnn.double().eval()
    torch.manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.tensor([2, 5, 9])
    att = gradient_attribution(model, x, y)
    full = _full_grad(model, x, y)
    assert torch.allclose(att.full, full, atol=1e-6, rtol=0)
    assert (att.target + sum(att.stats) + sum(att.encoder) - full).abs().max() < 1e-6
    assert len(att.stats) == len(model.target_stages) == len(att.encoder)
    # the substitute parts are those of the protocols: target part = the target-only gradient
    from abnn.framework import ProtocolView
    assert torch.allclose(att.target, _full_grad(ProtocolView(model, "target-only"), x, y), atol=1e-10)
    assert torch.allclose(att.target + sum(att.stats), _full_grad(ProtocolView(model, "no-encoder-grad"), x, y),
                          atol=1e-10)
    coarse = gradient_attribution(model, x, y, per_stage=False)
    assert torch.allclose(coarse.stats[0], sum(att.stats), atol=1e-10)
    m = att.metrics()
    assert torch.allclose(m["target"]["share"] + m["substitute"]["share"], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(m["target"]["share"] + m["stats"]["share"] + m["encoder"]["share"],
                          torch.ones(3, dtype=torch.float64))
    assert f"stats/{model.target_stages[0]}" in m
    s = summarize_attribution(m)
    assert set(s["target"]) == {"share", "norm_ratio", "cosine", "sign_agreement"}
    assert not model.training


def test_path_swap_with_itself_is_the_normal_forward(tiny_abnn):
    model = tiny_abnn.eval()
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, substitute_input=x), model(x))
    res = path_swap(model, x, y, partner=torch.arange(6), batch_size=4)
    assert torch.equal(res.pred, res.pred_normal)
    swapped = path_swap(model, x, y, seed=3)
    assert (swapped.y_partner != swapped.y).all()
    assert torch.equal(swapped.partner, swap_partners(y, seed=3))
    s = swapped.summary()
    assert abs(s["target_label"] + s["substitute_label"] + s["neither"] - 1) < 1e-9


def test_refuses_non_abnn():
    with pytest.raises(UnsupportedModelError):
        gradient_attribution(resnet18_cifar(width=1 / 16), torch.rand(1, 3, 32, 32), torch.tensor([0]))


def test_cli_attribution_and_protocol_attack(fake_data_root, tmp_path, capsys):
    import json

    from abnn.cli import main

    root = ["--data-root", str(fake_data_root), "--no-progress", "--threads", "1"]
    run = tmp_path / "abnn"
    assert main(["train", "--method", "abnn", "--substitute", "random", "--substitute-width", "0.0625",
                 "--substitute-std", "unbiased", "--out", str(run), "--width", "0.0625", "--epochs", "1",
                 "--train-size", "16", "--batch-size", "16", "--val-size", "0", *root]) == 0
    assert json.loads((run / "config.json").read_text())["substitute_std"] == "unbiased"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--attribution", "--n-eval", "6", "--batch-size", "4", *root]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 6 and set(printed["path_swap"]) >= {"target_label", "substitute_label", "neither"}
    saved = json.loads((run / "forensics.json").read_text())
    assert abs(saved["attribution_median"]["target"]["share"] - printed["share_median"]["target"]) < 1e-12
    assert main(["evaluate", str(run), "--attack", "pgd-target-only:steps=1", "--n-eval", "4", *root]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["attacks"]["pgd-target-only:steps=1"]["kind"] == "weaker threat model"
