"""APGD / APGD-T (Croce & Hein 2020), Square (Andriushchenko et al. 2020) and the AutoAttack-style
ensemble: the Attack contract, success against an undefended model, and the ensemble's
sample-wise worst case.  CPU-small: a tiny conv net trained for a few dozen steps on a
separable synthetic task."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abnn.attacks import APGD, APGDT, Attack, AutoAttack, InvalidInputError, Square
from abnn.attacks.apgd import apgd_checkpoints, dlr_loss, dlr_targeted_loss
from abnn.attacks.square import margin_loss, square_p

K = 5
EPS_BIG = 0.3

Factory = Callable[..., Attack]

# small budgets keep the file fast; every factory takes (model, eps, seed)
FACTORIES: dict[str, Factory] = {
    "apgd-ce": lambda m, eps, seed=0: APGD(m, eps=eps, steps=20, seed=seed),
    "apgd-dlr": lambda m, eps, seed=0: APGD(m, eps=eps, steps=20, loss="dlr", restarts=2, seed=seed),
    "apgd-t": lambda m, eps, seed=0: APGDT(m, eps=eps, steps=10, n_target_classes=3, seed=seed),
    "square": lambda m, eps, seed=0: Square(m, eps=eps, queries=150, seed=seed),
    "autoattack": lambda m, eps, seed=0: AutoAttack(m, eps=eps, steps=10, queries=100, seed=seed),
}


def _templates() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (K, 3, 8, 8), generator=g).float() * 2 - 1


def _data(n: int, gen: torch.Generator, templates: Tensor) -> tuple[Tensor, Tensor]:
    """Class k = gray + 0.15 * (+-1 template k) + noise: separable, L-inf distance between class
    means 0.3, so eps = 0.3 can always cross the decision boundary."""
    y = torch.randint(0, K, (n,), generator=gen)
    x = (0.5 + 0.15 * templates[y] + 0.08 * torch.randn(n, 3, 8, 8, generator=gen)).clamp(0, 1)
    return x, y


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is fastest, and with several threads a busy
    CPU (a background job) makes every OpenMP region wait for a descheduled thread (~100x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread (module fixtures are set up before it)
    torch.manual_seed(0)
    templates = _templates()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 16, K))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x, y = _data(64, g, templates)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = _data(32, torch.Generator().manual_seed(2), templates)
    assert _acc(model, x, y) >= 0.8
    torch.set_num_threads(n_threads)
    return model, x, y


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


# ---------------------------------------------------------------- the contract, for every attack


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("eps", [8 / 255, EPS_BIG])
def test_contract(trained, name: str, eps: float) -> None:
    model, x, y = trained
    x0 = x.clone()
    model.train()
    x_adv = FACTORIES[name](model, eps)(x, y)
    assert model.training, "model mode not restored"
    model.eval()
    assert torch.equal(x, x0), "input mutated"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert _acc(model, x_adv, y) <= _acc(model, x, y)
    # eval mode is kept too
    FACTORIES[name](model, eps)(x[:4], y[:4])
    assert not model.training


@pytest.mark.parametrize("name", list(FACTORIES))
def test_seeded_is_reproducible(trained, name: str) -> None:
    model, x, y = trained
    eps = 0.05  # partial success, so the random parts matter
    a = FACTORIES[name](model, eps, seed=3)(x, y)
    b = FACTORIES[name](model, eps, seed=3)(x, y)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c = FACTORIES[name](model, eps, seed=None)(x, y)
    torch.manual_seed(5)
    d = FACTORIES[name](model, eps, seed=None)(x, y)
    assert torch.equal(c, d)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_success_against_undefended_model(trained, name: str) -> None:
    model, x, y = trained
    assert _acc(model, x, y) >= 0.8
    x_adv = FACTORIES[name](model, EPS_BIG)(x, y)
    assert _acc(model, x_adv, y) <= 0.1


@pytest.mark.parametrize("name", list(FACTORIES))
def test_clips_5d(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 8 * 8, K))
    x = torch.rand(2, 3, 2, 8, 8)
    y = torch.tensor([0, 3])
    x0 = x.clone()
    x_adv = FACTORIES[name](model, 0.1)(x, y)
    assert x_adv.shape == x.shape
    assert torch.equal(x, x0)
    assert (x_adv - x).abs().max().item() <= 0.1 + 1e-6
    assert 0 <= x_adv.min().item() and x_adv.max().item() <= 1


def test_invalid_input_rejected(trained) -> None:
    model, x, y = trained
    with pytest.raises(InvalidInputError):
        APGD(model)(x * 2, y)
    with pytest.raises(InvalidInputError):
        Square(nn.Sequential(nn.Flatten(), nn.Linear(24, K)))(torch.rand(2, 3, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize("bad", [dict(eps=-1.0), dict(steps=0), dict(loss="hinge"), dict(restarts=0), dict(rho=0.0)])
def test_apgd_bad_options(trained, bad: dict) -> None:
    with pytest.raises(ValueError):
        APGD(trained[0], **bad)


def test_bad_options_other(trained) -> None:
    model = trained[0]
    for make in (lambda: Square(model, queries=0), lambda: Square(model, p_init=0.0),
                 lambda: APGDT(model, n_target_classes=0), lambda: AutoAttack(model, version="rand"),
                 lambda: AutoAttack(model, attacks=["fab-t"]), lambda: AutoAttack(model, attacks=[])):
        with pytest.raises(ValueError):
            make()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_clean_misclassified_returned_unchanged(trained, name: str) -> None:
    """Samples already misclassified are not attacked (accuracy can only go down)."""
    model, x, y = trained
    wrong = y.clone()
    wrong[:4] = (y[:4] + 1) % K  # labels the model disagrees with: already "fooled"
    x_adv = FACTORIES[name](model, 0.05)(x, wrong)
    assert torch.equal(x_adv[:4], x[:4])
    assert _acc(model, x_adv, wrong) <= _acc(model, x, wrong)


# ---------------------------------------------------------------- APGD specifics


def test_apgd_checkpoints_follow_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020, s. 3.2)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    w = apgd_checkpoints(1000)
    gaps = [b - a for a, b in zip([0] + w, w)]
    assert gaps[0] == 220 and min(gaps) == 60
    assert all(0 < c < 10 for c in apgd_checkpoints(10))


def test_dlr_losses() -> None:
    z = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert dlr_loss(z, y).item() == pytest.approx(-(4 - 3) / (4 - 1))
    assert dlr_loss(z, torch.tensor([2])).item() == pytest.approx(-(1 - 4) / (4 - 1))
    t = torch.tensor([3])
    assert dlr_targeted_loss(z, y, t).item() == pytest.approx(-(4 - 0) / (4 - (1 + 0) / 2))
    # scale invariance (the point of DLR)
    assert dlr_loss(7 * z, y).item() == pytest.approx(dlr_loss(z, y).item())
    with pytest.raises(ValueError):
        dlr_loss(z[:, :2], y)




def test_apgd_t_needs_four_classes() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="4 classes"):
        APGDT(model, steps=2)(x, y)


# ---------------------------------------------------------------- Square specifics


def test_square_p_schedule() -> None:
    assert square_p(0.8, 0, 10000) == 0.8
    assert square_p(0.8, 10, 10000) == 0.8
    assert square_p(0.8, 11, 10000) == 0.4
    assert square_p(0.8, 9999, 10000) == pytest.approx(0.8 / 512)
    # rescaled to the budget
    assert square_p(0.8, 6, 1000) == square_p(0.8, 60, 10000) == 0.2


def test_margin_loss() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0]])
    assert margin_loss(z, torch.tensor([1])).item() == 1.0
    assert margin_loss(z, torch.tensor([0])).item() == -2.0


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.inner(x)


def test_square_queries_only_unfooled(trained) -> None:
    model, x, y = trained
    counting = _Counting(model).eval()  # a fresh Module is in train mode; the attack restores it
    Square(counting, eps=EPS_BIG, queries=500, seed=0)(x, y)
    sizes = counting.sizes
    assert sizes[0] == x.shape[0]  # clean check
    assert all(b <= a for a, b in zip(sizes[1:], sizes[2:])), "query batches must shrink"
    assert len(sizes) < 500, "stops once every sample is fooled"


def test_square_non_square_images_and_frames() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 10, K))
    x, y = torch.rand(3, 3, 6, 10), torch.tensor([0, 1, 2])
    x_adv = Square(model, eps=0.1, queries=30, seed=0)(x, y)
    assert (x_adv - x).abs().max().item() <= 0.1 + 1e-6
    # clips: the square spans all frames -> the perturbation is the same in every frame
    clip_model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 3 * 8 * 8, K))
    xc = torch.full((2, 3, 3, 8, 8), 0.5)
    xa = Square(clip_model, eps=0.1, queries=30, seed=0)(xc, torch.tensor([0, 1]))
    d = xa - xc
    assert torch.allclose(d[:, :, 0], d[:, :, 1]) and torch.allclose(d[:, :, 0], d[:, :, 2])


# ---------------------------------------------------------------- AutoAttack


def test_autoattack_is_sample_wise_worst_case(trained) -> None:
    model, x, y = trained
    eps = 0.05  # each component alone leaves a part of the batch robust
    aa = AutoAttack(model, eps=eps, steps=20, queries=200, seed=0)
    x_aa = aa(x, y)
    robust_aa = _correct(model, x_aa, y)
    rep = aa.last_report
    assert list(rep)[:6] == ["clean", "apgd-ce", "apgd-t", "apgd-dlr", "square", "final"]
    assert rep["final"] == pytest.approx(robust_aa.float().mean().item())
    assert rep["clean"] >= rep["apgd-ce"] >= rep["apgd-t"] >= rep["apgd-dlr"] >= rep["square"] == rep["final"]
    assert rep["skipped"] == [] and rep["n"] == x.shape[0]
    # sample-wise: each component attacks exactly the samples the earlier ones left
    survivors = _correct(model, x, y)
    for name in aa.attacks:
        idx = survivors.nonzero().squeeze(1)
        fooled = ~_correct(model, aa.component(name)(x[idx], y[idx]), y[idx])
        survivors[idx[fooled]] = False
    assert torch.equal(survivors, robust_aa)
    assert (x_aa - x).abs().max().item() <= eps + 1e-6


def test_autoattack_first_component_is_identical(trained) -> None:
    """The first attack runs on the clean-correct samples as APGD-CE alone would."""
    model, x, y = trained
    aa = AutoAttack(model, eps=0.05, steps=20, attacks=["apgd-ce"], seed=1)
    x_aa = aa(x, y)
    x_ce = APGD(model, eps=0.05, steps=20, seed=1)(x, y)
    fooled_ce = ~_correct(model, x_ce, y)
    assert torch.equal(x_aa[fooled_ce], x_ce[fooled_ce])
    assert aa.last_report["apgd-ce"] == pytest.approx(1 - fooled_ce.float().mean().item())


def test_autoattack_skips_losses_undefined_for_few_classes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    aa = AutoAttack(model, eps=0.1, steps=3, queries=5, seed=0)
    aa(x, y)
    assert aa.last_report["skipped"] == ["apgd-t"]
    assert "apgd-t" not in aa.last_report and "apgd-dlr" in aa.last_report
    assert "last_report" not in repr(aa)


def test_autoattack_plus_settings(trained) -> None:
    aa = AutoAttack(trained[0], version="plus")
    assert aa.attacks == ("apgd-ce", "apgd-dlr", "square", "apgd-t")
    assert aa.component("apgd-ce").restarts == 5
    assert aa.component("apgd-t").n_target_classes is None
    std = AutoAttack(trained[0], queries=1234)
    assert std.component("square").queries == 1234 and std.component("apgd-t").n_target_classes == 9
    assert math.isclose(std.component("apgd-dlr").eps, 8 / 255)


def test_square_reference_schedule_inside_autoattack(trained) -> None:
    """The paper's p schedule without rescaling to the budget, as the reference AutoAttack runs Square."""
    assert square_p(0.8, 100, 1000, rescale=False) == 0.2 and square_p(0.8, 100, 1000) == 0.8 / 2 ** 4
    assert square_p(0.8, 999, 1000, rescale=False) == 0.8 / 16
    aa = AutoAttack(trained[0], queries=1000)
    assert aa.component("square").rescale_schedule is False and Square(trained[0]).rescale_schedule is True
