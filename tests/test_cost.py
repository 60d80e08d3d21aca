"""Training cost is counted by hooks as the code runs (paper s. 3.3), not asserted from a formula."""

import torch

from abnn.config import TrainConfig
from abnn.training import PassCounter, attach_networks, batch_loss_for
from abnn.models import resnet18_cifar


def _count(model, method, steps=2, at_steps=5):
    cfg = TrainConfig(method=method, at_steps=at_steps)
    counter = attach_networks(PassCounter(), model)
    loss_fn = batch_loss_for(cfg)
    model.train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(steps):
        with counter.active():
            loss, _ = loss_fn(model, x, y)
            loss.backward()
    return counter.summary()


def test_standard_counts_2N():
    s = _count(resnet18_cifar(width=1 / 16), "standard")
    assert s["N_per_step"] == 2.0
    assert s["per_network"]["target"] == {"forward": 2, "backward": 2}


def test_abnn_counts_3N_substitute_forward_only(tiny_abnn):
    s = _count(tiny_abnn, "abnn")
    assert s["N_per_step"] == 3.0
    assert s["per_network"]["substitute"] == {"forward": 2, "backward": 0}


def test_pgd_at_counts_12N_at_5_steps_and_scales_with_steps():
    assert _count(resnet18_cifar(width=1 / 16), "pgd-at", at_steps=5)["N_per_step"] == 12.0
    assert _count(resnet18_cifar(width=1 / 16), "pgd-at", steps=1, at_steps=2)["N_per_step"] == 6.0


def test_counter_ignores_passes_outside_steps():
    model = resnet18_cifar(width=1 / 16).eval()
    counter = attach_networks(PassCounter(), model)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert counter.total() == 0


def test_pgd_at_attack_keeps_the_training_layout():
    """The attack inside PGD-AT runs in the batch's layout (the training step's --channels-last),
    not the attacks' CPU default, so every method's cost is measured in the same layout."""
    seen = []
    model = resnet18_cifar(width=1 / 16)
    model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    loss_fn = batch_loss_for(TrainConfig(method="pgd-at", at_steps=2))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_fn(model.train(), x, y)
    assert seen and not any(seen)
    seen.clear()
    loss_fn(model, x.contiguous(memory_format=torch.channels_last), y)
    assert seen and all(seen)
