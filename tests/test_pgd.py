"""PGD invariants: bound, range, no mutation, accuracy <= clean, determinism, mode restore."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abnn.attacks import PGD, InvalidInputError


def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture
def trained_tiny():
    """A tiny CNN that fits 64 fixed images, so clean accuracy is high and the attack has work to do."""
    model = _tiny_classifier()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_invariants(trained_tiny):
    model, x, y = trained_tiny
    x0 = x.clone()
    eps = 8 / 255
    x_adv = PGD(model, eps=eps, alpha=2 / 255, steps=5, seed=0)(x, y)
    assert torch.equal(x, x0), "input mutated"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    clean = _acc(model, x, y)
    assert clean > 0.9
    assert _acc(model, x_adv, y) <= clean
    assert not x_adv.requires_grad


def test_pgd_breaks_an_undefended_model_at_large_eps(trained_tiny):
    model, x, y = trained_tiny
    x_adv = PGD(model, eps=64 / 255, alpha=8 / 255, steps=20, seed=0)(x, y)
    assert _acc(model, x_adv, y) < 0.1


def test_pgd_seeded_determinism(trained_tiny):
    model, x, y = trained_tiny
    a = PGD(model, steps=3, seed=123)(x, y)
    b = PGD(model, steps=3, seed=123)(x, y)
    c = PGD(model, steps=3, seed=124)(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pgd_without_random_start_is_deterministic_and_restarts_are_worst_case(trained_tiny):
    model, x, y = trained_tiny
    a = PGD(model, random_start=False)(x, y)
    assert torch.equal(a, PGD(model, random_start=False)(x, y))
    one = PGD(model, steps=2, seed=5)(x, y)
    many = PGD(model, steps=2, restarts=4, seed=5)(x, y)
    assert (many - x).abs().max() <= 8 / 255 + 1e-6
    assert _acc(model, many, y) <= _acc(model, one, y)


def test_pgd_restores_model_mode_and_leaves_param_grads(trained_tiny):
    model, x, y = trained_tiny
    model.zero_grad(set_to_none=True)
    model.train()
    PGD(model, steps=1)(x, y)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    PGD(model, steps=1)(x, y)
    assert not model.training


def test_pgd_on_abnn_runs_through_the_substitute(tiny_abnn):
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in tiny_abnn.substitute.state_dict().items()}
    x_adv = PGD(tiny_abnn, steps=2, seed=0)(x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert all(torch.equal(before[k], v) for k, v in tiny_abnn.substitute.state_dict().items())


def test_pgd_on_video_clips():
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 5))
    x, y = torch.rand(2, 3, 4, 8, 8), torch.tensor([0, 1])
    x_adv = PGD(model, eps=1 / 255, alpha=0.25 / 255, steps=2, seed=0)(x, y)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("bad, match", [
    (lambda x: x * 3, r"\[0, 1\]"),
    (lambda x: x.masked_fill(x > 0.5, float("nan")), "NaN"),
    (lambda x: x[0], "shape"),
    (lambda x: (x * 255).to(torch.uint8), "float"),
])
def test_pgd_rejects_bad_input(trained_tiny, bad, match):
    model, x, y = trained_tiny
    with pytest.raises(InvalidInputError, match=match):
        PGD(model)(bad(x), y)


def test_pgd_rejects_bad_labels(trained_tiny):
    model, x, y = trained_tiny
    with pytest.raises(InvalidInputError, match="labels"):
        PGD(model)(x, y[:3])


def test_repr_shows_settings(trained_tiny):
    r = repr(PGD(trained_tiny[0], eps=8 / 255, alpha=2 / 255, steps=5))
    assert "eps=8/255" in r and "alpha=2/255" in r and "steps=5" in r
    assert "alpha=0.8/255" in repr(PGD(trained_tiny[0], alpha=(8 / 255) / 10))
    assert "alpha=0.0123" in repr(PGD(trained_tiny[0], alpha=0.0123))  # 3.1365/255: not a clean k/255


class _BatchSizes(nn.Module):
    """Records the batch size and memory layout of every forward call of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes, self.channels_last = model, [], []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.channels_last.append(x.dim() == 4 and not x.is_contiguous()
                                  and x.is_contiguous(memory_format=torch.channels_last))
        return self.model(x)


def test_pgd_restarts_attack_only_the_samples_not_fooled_yet(trained_tiny):
    model, x, y = trained_tiny
    spy = _BatchSizes(model).eval()  # the attack restores the mode it found
    steps = 1
    one = PGD(spy, eps=8 / 255, alpha=4 / 255, steps=steps, seed=3)(x, y)
    spy.sizes.clear()
    many = PGD(spy, eps=8 / 255, alpha=4 / 255, steps=steps, restarts=3, seed=3)(x, y)
    with torch.no_grad():
        fooled_first = model(one).argmax(1) != y
        fooled_many = model(many).argmax(1) != y
    # the first restart is the single-restart run (same seed); a fooled sample stays fooled
    assert 0 < int(fooled_first.sum()) < len(x)
    assert bool((fooled_many >= fooled_first).all())
    # restart 2 crafts on the survivors of restart 1 only: its forward passes see that many samples
    survivors = len(x) - int(fooled_first.sum())
    assert spy.sizes[:steps + 1] == [len(x)] * (steps + 1)
    assert spy.sizes[steps + 1] == survivors


def test_attacks_run_channels_last_on_cpu_and_return_the_input_layout(trained_tiny):
    model, x, y = trained_tiny
    spy = _BatchSizes(model).eval()  # the attack restores the mode it found
    auto = PGD(spy, steps=2, seed=0)(x, y)
    assert all(spy.channels_last) and auto.is_contiguous()
    spy.channels_last.clear()
    plain = PGD(spy, steps=2, seed=0, channels_last=False)(x, y)
    assert not any(spy.channels_last) and plain.is_contiguous()
    # same attack, another memory layout: identical up to float rounding of the kernels
    assert (auto - plain).abs().gt(1e-5).float().mean() < 0.01
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert PGD(model, steps=1, seed=0)(x_cl, y).is_contiguous(memory_format=torch.channels_last)
    clips = torch.rand(2, 3, 4, 8, 8)
    assert PGD(model, channels_last=None).memory_format(clips) is None
    assert PGD(model, channels_last=True).memory_format(clips) is torch.channels_last_3d
    assert "channels_last" not in repr(PGD(model)) and "channels_last=False" in repr(PGD(model, channels_last=False))


class Band(nn.Module):
    """Two classes; class 1 wins only while the mean pixel is within ``width`` of ``center``: the
    sign steps of a gradient attack overshoot the band, so a later iterate is worse than an earlier."""

    def __init__(self, center: float, width: float) -> None:
        super().__init__()
        self.center, self.width = center, width

    def forward(self, x):
        f = 1 - (x.mean(dim=tuple(range(1, x.dim()))) - self.center).abs() / self.width
        return torch.stack((torch.zeros_like(f), f), dim=1)


def test_pgd_returns_the_first_fooling_iterate():
    a = 2 / 255
    model = Band(0.5 + 0.8 * a, 0.5 * a)  # iterates: 0.5 (robust), 0.5 + a (fooled), 0.5 (robust)
    x, y = torch.full((3, 3, 4, 4), 0.5), torch.zeros(3, dtype=torch.long)
    first = PGD(model, eps=2 * a, alpha=a, steps=2, random_start=False)(x, y)
    last = PGD(model, eps=2 * a, alpha=a, steps=2, random_start=False, first_fooling=False)(x, y)
    assert _acc(model, x, y) == 1.0 and _acc(model, last, y) == 1.0
    assert _acc(model, first, y) == 0.0 and torch.allclose(first, x + a)
    with_restarts = PGD(model, eps=2 * a, alpha=a, steps=2, restarts=2, seed=0)(x, y)
    assert _acc(model, with_restarts, y) <= _acc(model, x, y)


def _recording_input_grads(monkeypatch) -> list:
    """Every input gradient PGD computes, in call order, with the dtype of the logits it came from
    (the input gradient of a float32 input is float32 either way: the logits show the arithmetic)."""
    grads: list = []
    original = PGD.input_grad

    def spy(self, x, y):
        grad, logits = original(self, x, y)
        grads.append((grad, logits.dtype))
        return grad, logits

    monkeypatch.setattr(PGD, "input_grad", spy)
    return grads


def test_pgd_inside_bf16_training_autocast_keeps_float32_input_gradients(trained_tiny, monkeypatch):
    """An evaluation attack called inside a bf16 autocast region (a training step's) switches
    autocast off: float32 gradients, equal to those of a float32 run; ``amp`` opts in to bf16,
    as PGD-AT's training attack does (pgd_at_loss passes the step's autocast dtype on)."""
    from abnn.training.loop import pgd_at_loss

    model, x, y = trained_tiny
    grads = _recording_input_grads(monkeypatch)
    plain = PGD(model, steps=3, seed=0)(x, y)
    reference = list(grads)
    grads.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = PGD(model, steps=3, seed=0)(x, y)
    assert [(g.dtype, dt) for g, dt in grads] == [(torch.float32, torch.float32)] * 3
    for (g, _), (ref, _) in zip(grads, reference):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(inside, plain)
    grads.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # PGD-AT: the attack runs under the step's bf16
        pgd_at_loss(8 / 255, 2 / 255, 1)(model, x, y)
    assert [dt for _, dt in grads] == [torch.bfloat16]
