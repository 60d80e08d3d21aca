"""Fast-AT (FGSM with a random start, Wong et al. 2020): counted 4N, bounded perturbation, the
per-epoch robust metric, the best-robust checkpoint."""

import json

import torch

from abnn.cli import main
from abnn.models import resnet18_cifar
from abnn.training import PassCounter, TrainStep, attach_networks
from abnn.training.loop import fast_at_loss, fgsm_rs_example


def test_fgsm_rs_example_stays_in_the_eps_ball_and_in_pixel_range():
    torch.manual_seed(0)
    model = resnet18_cifar(width=1 / 16).train()
    x = torch.rand(8, 3, 32, 32)
    x[:2] = 0.0  # pixels at the borders of [0, 1]: the clamp must act
    x[2:4] = 1.0
    y = torch.randint(0, 10, (8,))
    eps, alpha = 8 / 255, 10 / 255
    x_adv = fgsm_rs_example(model, x, y, eps=eps, alpha=alpha)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # alpha > eps: most coordinates end on the boundary of the eps-ball (where the image allows)
    inner = (x[4:] > eps) & (x[4:] < 1 - eps)
    on_edge = ((x_adv[4:] - x[4:]).abs() - eps).abs() < 1e-6
    assert on_edge[inner].float().mean() > 0.5


def test_fast_at_counts_4N_per_step():
    torch.manual_seed(0)
    model = resnet18_cifar(width=1 / 16)
    counter = attach_networks(PassCounter(), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = TrainStep(model.train(), fast_at_loss(8 / 255, 10 / 255), opt, counter=counter)
    for _ in range(2):
        step(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert counter.per_step() == 4.0
    assert counter.summary()["per_network"]["target"] == {"forward": 4, "backward": 4}


def test_fast_at_run_writes_the_per_epoch_robust_metric_and_keeps_the_best(tmp_path, fake_data_root):
    out = tmp_path / "fa"
    args = ["train", "--method", "fast-at", "--width", "0.0625", "--epochs", "2", "--batch-size", "32",
            "--val-size", "8", "--robust-val-size", "16", "--keep-best", "--fast-at-alpha", "10/255",
            "--out", str(out), "--data-root", str(fake_data_root), "--no-progress"]
    assert main(args) == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    assert all(0 <= ln["val_pgd_acc"] <= 1 for ln in lines)
    res = json.loads((out / "train_results.json").read_text())
    assert res["cost_N_per_step"] == 4.0
    assert res["robust_val"]["per_epoch"] == [ln["val_pgd_acc"] for ln in lines]
    best = max(range(2), key=lambda i: (lines[i]["val_pgd_acc"], -i)) + 1
    assert res["best_robust_epoch"] == best and res["model_pt_epoch"] == best
    # fake data has no JPEG training images: the held-out images are the last test images
    assert "last 16" in res["robust_val"]["source"]
    assert torch.equal(torch.load(out / "model.pt", weights_only=True)["fc.weight"],
                       torch.load(out / "best.pt", weights_only=True)["fc.weight"])


def test_keep_best_needs_a_robust_metric(tmp_path, fake_data_root, capsys):
    code = main(["train", "--method", "fast-at", "--keep-best", "--out", str(tmp_path / "x"),
                 "--data-root", str(fake_data_root), "--no-progress"])
    assert code == 2 and "--robust-val-size" in capsys.readouterr().err
