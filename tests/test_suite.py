"""The evaluation suite (Carlini et al. 2019; Athalye et al. 2018; Croce et al., ICML 2022): the
adaptive StatisticsAttack and Transfer attacks, the sanity curves, the gradient-masking flags on a
deliberately masked toy model, the batch-statistics checks, and the cross-check of our PGD against
torchattacks on the reference ResNet-20.  CPU-small: tiny models trained for a few dozen steps on
a separable synthetic task in module-scoped fixtures."""

from __future__ import annotations

import copy
import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abnn import ABNN
from abnn.attacks import PGD
from abnn.attacks.adaptive import StatisticsAttack, Transfer
from abnn.evaluation.crosscheck import crosscheck_torchattacks
from abnn.evaluation import run_suite, run_suite_on_run
from abnn.evaluation.checks import per_sample_statistics
from abnn.framework import replace_adaptive_with_bn
from abnn.models import resnet18_cifar, vgg19_bn_substitute

K = 5
#: tiny attack budgets (on top of "quick") so that the whole file stays fast on a busy CPU
TINY = {"pgd_steps": 5, "pgd_restarts": 1, "apgd_steps": 5, "apgd_targets": 2, "square_queries": 300,
        "stats_steps": 3, "stats_weights": (1.0,), "transfer_steps": 5, "sweep_steps": 10,
        "steps_grid": (5, 10, 20), "eps_grid_255": (0, 4, 8, 16, 32, 64), "mixed_k": (1, 2),
        "mixed_steps": 3, "bs1_steps": 3}


def _templates() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (K, 3, 8, 8), generator=g).float() * 2 - 1


def _data(n: int, seed: int, size: int = 8) -> tuple[Tensor, Tensor]:
    """Class k = gray + 0.15 * (+-1 template k, upsampled to size) + noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=gen)
    t = _templates()[y]
    if size != 8:
        t = F.interpolate(t, size=size, mode="nearest")
    return (0.5 + 0.15 * t + 0.08 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1), y


def _train(model: nn.Module, size: int, steps: int, lr: float, bs: int) -> nn.Module:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x, y = _data(bs, 100 + i, size)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class Quantize(nn.Module):
    """``x -> round(4x) / 4``: torch.round has zero gradient, so every white-box gradient is zero
    (a textbook obfuscated gradient, Athalye et al. 2018) while predictions barely change."""

    def forward(self, x: Tensor) -> Tensor:
        return (x * 4).round() / 4


@pytest.fixture(scope="module")
def models() -> dict:
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse thread fixture
    torch.manual_seed(0)
    honest = _train(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(8 * 16, K)), 8, steps=40, lr=1e-2, bs=64)
    other = _train(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 32), nn.ReLU(), nn.Linear(32, K)), 8,
                   steps=40, lr=1e-2, bs=64)
    for m in (honest, other):
        m.requires_grad_(False)
    masked = nn.Sequential(Quantize(), honest)
    torch.manual_seed(0)
    abnn = ABNN(resnet18_cifar(width=1 / 16), vgg19_bn_substitute(width=1 / 16), input_shape=(3, 32, 32))
    _train(abnn, 32, steps=30, lr=3e-3, bs=32)
    abnn.requires_grad_(False)
    x, y = _data(16, 1)
    xa, ya = _data(8, 2, size=32)
    assert _acc(honest, x, y) >= 0.9 and _acc(masked, x, y) >= 0.9 and _acc(other, x, y) >= 0.8
    assert _acc(abnn, xa, ya) >= 0.6
    torch.set_num_threads(n_threads)
    return {"honest": honest, "masked": masked, "other": other, "abnn": abnn, "x": x, "y": y, "xa": xa, "ya": ya}


@pytest.fixture(scope="module")
def honest_suite(models, tmp_path_factory) -> tuple[dict, object]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("suite_honest")
    res = run_suite(models["honest"], (models["x"], models["y"]), eps=16 / 255, budget=TINY, quick=True,
                    batch_size=16, seed=0, out_dir=out, progress=False, source_models={"other": models["other"]})
    return res, out


# ------------------------------------------------------------------------ StatisticsAttack


def test_statistics_attack_contract(models) -> None:
    abnn, x, y = models["abnn"], models["xa"], models["ya"]
    x0 = x.clone()
    eps = 4 / 255
    abnn.train()
    x_adv = StatisticsAttack(abnn, eps=eps, alpha=1 / 255, steps=3, weight=0.1, seed=0)(x, y)
    assert abnn.training and not abnn.substitute.training, "modes not restored"
    abnn.eval()
    assert torch.equal(x, x0), "input mutated"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert _acc(abnn, x_adv, y) <= _acc(abnn, x, y)
    assert all(p.grad is None for p in abnn.parameters())


def test_statistics_attack_seeded_and_moves_statistics(models) -> None:
    abnn, x, y = models["abnn"], models["xa"], models["ya"]
    eps = 4 / 255
    a = StatisticsAttack(abnn, eps=eps, alpha=1 / 255, steps=3, weight=1e3, seed=3)(x, y)
    b = StatisticsAttack(abnn, eps=eps, alpha=1 / 255, steps=3, weight=1e3, seed=3)(x, y)
    assert torch.equal(a, b)
    atk = StatisticsAttack(abnn, eps=eps, steps=0)
    clean = atk.clean_statistics(x)
    assert len(clean) == len(abnn.target_stages) and all(len(t) == 4 for t in clean)
    noise = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1)).clamp(0, 1)
    d_attack = atk.statistics_distance(atk.clean_statistics(a), clean).item()
    d_noise = atk.statistics_distance(atk.clean_statistics(noise), clean).item()
    assert d_attack > 2 * d_noise > 0, (d_attack, d_noise)


def test_statistics_attack_needs_abnn(models) -> None:
    with pytest.raises(TypeError, match="ABNN"):
        StatisticsAttack(models["honest"])
    with pytest.raises(ValueError):
        StatisticsAttack(models["abnn"], weight=-1.0)


# ------------------------------------------------------------------------ Transfer


def test_transfer_contract(models) -> None:
    honest, other, x, y = models["honest"], models["other"], models["x"], models["y"]
    x0 = x.clone()
    eps = 16 / 255
    atk = Transfer(honest, source=other, eps=eps, alpha=4 / 255, steps=5, seed=1)
    x_adv = atk(x, y)
    assert torch.equal(x, x0)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert torch.equal(x_adv, Transfer(honest, source=other, eps=eps, alpha=4 / 255, steps=5, seed=1)(x, y))
    assert _acc(other, x_adv, y) <= _acc(other, x, y)
    # transferring from the model itself is the white-box attack
    self_t = Transfer(honest, source=honest, eps=eps, alpha=4 / 255, steps=5, seed=1)(x, y)
    assert torch.equal(self_t, PGD(honest, eps=eps, alpha=4 / 255, steps=5, seed=1)(x, y))
    # a callable factory and the other attack names work
    xf = Transfer(honest, source=other, attack=lambda m: PGD(m, eps=eps, steps=2, seed=0))(x, y)
    assert (xf - x).abs().max().item() <= eps + 1e-6
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        Transfer(honest, source=other, attack="fgsm")


def test_transfer_from_abnn_target_with_plain_bn(models) -> None:
    abnn, x, y = models["abnn"], models["xa"][:4], models["ya"][:4]
    src = replace_adaptive_with_bn(abnn)
    x_adv = Transfer(abnn, source=src, eps=8 / 255, alpha=2 / 255, steps=3, seed=0)(x, y)
    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
    assert _acc(src, x_adv, y) <= _acc(src, x, y)


# ------------------------------------------------------------------------ the suite


def test_honest_model_curves_and_pass(honest_suite) -> None:
    res, out = honest_suite
    ec, sc = res.eps_curve.robust_acc, res.steps_curve.robust_acc
    assert all(b <= a for a, b in zip(ec, ec[1:])), ec
    assert all(b <= a for a, b in zip(sc, sc[1:])), sc
    assert ec[0] == res.evaluation.clean_acc and ec[-1] == 0.0
    assert res.eps_curve.xs[-1] == 64
    assert res.verdict == "PASS", res.flags
    at_eps = [r for r in res.attacks.values() if r.eps == 16 / 255]
    assert res.worst.robust_acc <= min(r.robust_acc for r in at_eps)
    assert res.recheck_acc == pytest.approx(res.worst.robust_acc)
    assert {"pgd-5", "pgd-5x1", "autoattack", "autoattack/apgd-ce", "autoattack/apgd-dlr", "autoattack/apgd-t",
            "autoattack/square", "transfer-other"} <= set(res.attacks)
    # the ensemble runs AutoAttack's way: robust after each component, in its running order
    parts = [r for r in res.attacks.values() if r.part_of == "autoattack"]
    assert [r.attack for r in parts] == ["apgd-ce", "apgd-t", "apgd-dlr", "square"]
    assert all(b.robust_acc <= a.robust_acc for a, b in zip(parts, parts[1:]))
    assert res.attacks["autoattack"].robust_acc == parts[-1].robust_acc and res.attacks["autoattack"].kind == "ensemble"
    for f in ("suite.json", "suite.md", "eps_curve.png", "steps_curve.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "suite.json").read_text())["verdict"] == "PASS"
    md = (out / "suite.md").read_text()
    assert "Verdict: **PASS**" in md and "| autoattack/square |" in md and "worst case" in md


def test_interrupted_suite_resumes_to_the_same_results(models, honest_suite, tmp_path, monkeypatch) -> None:
    from abnn.attacks import Square

    reference, _ = honest_suite
    progress = tmp_path / "attack-progress.pt"
    kwargs = dict(eps=16 / 255, budget=TINY, quick=True, batch_size=16, seed=0, progress=False,
                  source_models={"other": models["other"]}, progress_dir=tmp_path)

    def killed(self, x, y):
        raise KeyboardInterrupt  # the process dies in the middle of the suite

    with monkeypatch.context() as m:
        m.setattr(Square, "perturb", killed)
        with pytest.raises(KeyboardInterrupt):
            run_suite(models["honest"], (models["x"], models["y"]), out_dir=tmp_path / "a", **kwargs)
    assert progress.is_file() and not (tmp_path / "a" / "suite.json").exists()

    res = run_suite(models["honest"], (models["x"], models["y"]), out_dir=tmp_path / "a", **kwargs)
    assert res.evaluation.resumed == ["pgd-5", "pgd-5x1"]  # killed inside the autoattack ensemble
    assert not progress.exists()  # a complete suite needs no progress file
    assert res.evaluation.clean_acc == reference.evaluation.clean_acc
    for key in ("robust_acc", "eps_curve", "steps_curve", "verdict", "masking"):
        assert getattr(res, key) == getattr(reference, key), key
    for k, r in reference.attacks.items():
        assert torch.equal(res.attacks[k].robust_mask, r.robust_mask), k
    assert torch.equal(res.worst.robust_mask, reference.worst.robust_mask)

    # the finished attacks of another suite (other seed: other per-attack seeds) are not used
    with monkeypatch.context() as m:
        m.setattr(Square, "perturb", killed)
        with pytest.raises(KeyboardInterrupt):
            run_suite(models["honest"], (models["x"], models["y"]), **kwargs)
    other = run_suite(models["honest"], (models["x"], models["y"]), **{**kwargs, "seed": 1})
    assert other.evaluation.resumed == []


def test_masked_model_is_suspect(models, tmp_path) -> None:
    res = run_suite(models["masked"], (models["x"], models["y"]), eps=16 / 255, budget=TINY, quick=True,
                    batch_size=16, seed=0, out_dir=tmp_path, progress=False,
                    source_models={"honest": models["honest"]})
    assert res.verdict == "SUSPECT"
    flags = "\n".join(res.flags)
    assert all(f.startswith("possible gradient masking") for f in res.flags)
    assert "at eps 64/255" in flags  # the eps sweep does not reach 0%
    assert "exactly zero" in flags  # the gradient is zero
    assert "gradient-free autoattack/square" in flags  # Square breaks samples no white-box gradient attack breaks
    assert "transfer attack transfer-honest" in flags  # so does a transfer from the unmasked model
    aa = res.attacks
    assert aa["autoattack/square"].robust_acc < aa["autoattack/apgd-ce"].robust_acc == res.evaluation.clean_acc
    assert aa["autoattack"].robust_acc == aa["autoattack/square"].robust_acc
    assert "Verdict: **SUSPECT**" in (tmp_path / "suite.md").read_text()


def test_suite_on_abnn_has_adaptive_attacks(models) -> None:
    res = run_suite(models["abnn"], (models["xa"][:4], models["ya"][:4]), budget={**TINY, "square_queries": 10,
                    "eps_grid_255": (0, 64), "steps_grid": (5,)}, quick=True, batch_size=4, progress=False)
    assert {"stats-w1", "transfer-abnn-target-bn"} <= set(res.attacks)
    assert res.attacks["stats-w1"].kind == "white-box"
    assert res.batch_checks is None and res.substitute_stats == "sample"


def test_batch_statistics_checks(models) -> None:
    abnn = copy.deepcopy(models["abnn"])
    for layer in abnn.adaptive.values():
        layer.substitute_stats = "batch"
    abnn.substitute_stats = "batch"
    x, y = models["xa"], models["ya"]
    # batch size 1 is per-sample statistics
    with torch.no_grad():
        loop = torch.cat([abnn(x[i:i + 1]) for i in range(3)])
        with per_sample_statistics(abnn):
            vec = abnn(x[:3])
        assert not torch.allclose(abnn(x[:3]), vec, atol=1e-5)  # the batch matters
    assert torch.allclose(loop, vec, atol=1e-4)
    assert all(layer.substitute_stats == "batch" for layer in abnn.adaptive.values())
    res = run_suite(abnn, (x, y), budget={**TINY, "square_queries": 10, "eps_grid_255": (0, 64),
                                          "steps_grid": (5,)}, quick=True, batch_size=8, progress=False)
    b = res.batch_checks
    assert b is not None and b["batch_size"] == 8
    assert b["clean_acc_bs1"] == pytest.approx(_acc(models["abnn"], x, y))  # sample-mode weights = bs 1
    for key in ("worst_inputs_in_adversarial_batches", "worst_inputs_at_bs1", "bs1_robust_acc",
                "bs1_crafted_in_adversarial_batches"):
        assert 0 <= b[key] <= 1
    assert b["worst_over_protocols"] <= min(b["bs1_robust_acc"], res.worst.robust_acc)
    assert res.robust_acc == b["worst_over_protocols"]
    assert [m["k"] for m in b["mixed"]] == [1, 2]
    for m in b["mixed"]:
        assert m["n_clean"] == 8 - m["k"]
        for key in ("poison", "transferred"):
            assert 0 <= m[f"{key}_broken_rate"] <= m[f"{key}_flip_rate"] <= 1


def test_suite_on_clips(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, K))
    x = torch.rand(6, 3, 2, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct: the attacks have something to do
    res = run_suite(model, (x, y), eps=1 / 255, budget={**TINY, "square_queries": 10, "steps_grid": (5, 10)},
                    quick=True, batch_size=3, progress=False, out_dir=tmp_path)
    assert res.input_shape == [3, 2, 8, 8] and res.evaluation.clean_acc == 1.0
    assert (tmp_path / "suite.md").is_file()

    class Clips:  # a map-style clip dataset (like UCF101Clips): uint8 samples, None = undecodable
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int):
            return None if i == 2 else ((x[i] * 255).round().to(torch.uint8), int(y[i]))

    res = run_suite(model, Clips(), eps=1 / 255, n_eval=4, budget={**TINY, "square_queries": 5, "steps_grid": (5,),
                    "eps_grid_255": (0, 64)}, quick=True, batch_size=4, progress=False)
    assert res.evaluation.n_eval == 3  # sample 2 skipped


def test_run_suite_on_run(tmp_path, fake_data_root) -> None:
    from abnn.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(method="standard", arch="resnet18_cifar", width=1 / 16, data_root=str(fake_data_root))
    cfg.save(run / "config.json")
    torch.manual_seed(0)
    torch.save(resnet18_cifar(width=1 / 16).state_dict(), run / "model.pt")
    res = run_suite_on_run(run, n_eval=4, batch_size=4, budget={**TINY, "square_queries": 10,
                           "eps_grid_255": (0, 64), "steps_grid": (5,)}, quick=True, progress=False)
    meta = res.evaluation.metadata
    assert res.evaluation.n_eval == 4 and meta["run"] == str(run) and meta["method"] == "standard"
    assert (run / "suite" / "suite.json").is_file() and (run / "suite" / "suite.md").is_file()
    assert not (run / "suite" / "attack-progress.pt").exists()
    # a corrupt progress file (say, from a full disk) is reported and replaced, never trusted
    (run / "suite" / "attack-progress.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="attack-progress.pt.*starts afresh"):
        again = run_suite_on_run(run, n_eval=4, batch_size=4, budget={**TINY, "square_queries": 10,
                                 "eps_grid_255": (0, 64), "steps_grid": (5,)}, quick=True, progress=False)
    assert again.evaluation.resumed == [] and again.robust_acc == res.robust_acc


def test_bad_budget(models) -> None:
    from abnn.errors import AbnnError

    with pytest.raises(AbnnError, match="unknown budget"):
        run_suite(models["honest"], (models["x"], models["y"]), budget="huge", progress=False)
    with pytest.raises(AbnnError, match="unknown budget keys"):
        run_suite(models["honest"], (models["x"], models["y"]), budget={"pgd_stepz": 3}, progress=False)


# ------------------------------------------------------------------------ torchattacks cross-check


def test_crosscheck_without_torchattacks(models, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    with pytest.raises(ImportError, match="pip install --no-deps torchattacks"):
        crosscheck_torchattacks(models["honest"], models["x"], models["y"])


@pytest.mark.slow
def test_crosscheck_torchattacks_resnet20(data_root) -> None:
    """Our PGD vs torchattacks' PGD on the first 1000 CIFAR-10 test images with the reference
    ResNet-20 (about 60 s on one CPU thread).  eps 1/255 keeps the accuracy mid-range, where a
    weaker implementation would show; at 8/255 both give ~0%."""
    pytest.importorskip("torchattacks", reason="torchattacks not importable (pip install --no-deps torchattacks; needs scipy)")
    from abnn.data import load_cifar10
    from abnn.models import resnet20_reference

    weights = data_root / "weights" / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"reference checkpoint {weights} not found")
    model = resnet20_reference(str(weights)).eval()
    data = load_cifar10("test", data_root).subset(1000)
    t0 = time.perf_counter()
    res = crosscheck_torchattacks(model, data.x, data.y, eps=1 / 255, alpha=0.25 / 255, steps=5)
    print(f"crosscheck: {res}, {time.perf_counter() - t0:.0f} s")
    assert res["n"] == 1000 and res["clean_acc"] > 0.9
    assert 0.05 < res["ours_acc"] < res["clean_acc"]
    assert abs(res["difference"]) <= 0.005, res
    assert res["prediction_agreement"] >= 0.99
