"""The attack registry (one name -> one builder, defaults stated once), the spec syntax, budget
validation in the API and on the command line (issue 13, item 3), and a toy attack registered in
one place that then appears everywhere: the runner, the suite, `--attack` and `--list-attacks`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from abnn.attacks import (APGD, PGD, REGISTRY, ROA, Attack, AttackEntry, AttackOptionError, AutoAttack, Square,
                          StatisticsAttack, attack_defaults, build_attack, describe_attacks, parse_pixel_budget,
                          parse_spec, register, unregister)
from abnn.cli import main
from abnn.errors import AbnnError


def _model(k: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k))


def test_registry_names_and_defaults() -> None:
    assert {"pgd", "apgd-ce", "apgd-t", "apgd-dlr", "square", "roa", "stats", "transfer-bn", "transfer", "autoattack",
            "autoattack-official"} <= set(REGISTRY)
    img, vid = attack_defaults("pgd"), attack_defaults("pgd", video=True)
    assert (img["eps"], img["alpha"], img["steps"], img["random_start"]) == (8 / 255, 2 / 255, 5, True)
    assert vid["eps"] == 1 / 255 and repr(vid["alpha"]) == "eps/4"
    m = _model()
    # the class defaults are the registry's: PGD(model) and build_attack("pgd", model) are one attack
    for name, atk in (("pgd", PGD(m)), ("roa", ROA(m)), ("square", Square(m)), ("autoattack", AutoAttack(m)),
                      ("apgd-ce", APGD(m))):
        assert repr(build_attack(name, m)) == repr(atk), name
    video_pgd = build_attack("pgd", m, video=True, eps=2 / 255)
    assert (video_pgd.eps, video_pgd.alpha) == (2 / 255, 0.5 / 255)  # alpha follows eps on clips
    assert build_attack("apgd-dlr", m).loss_type == "dlr" and build_attack("apgd-t", m, video=True).eps == 1 / 255


@pytest.mark.parametrize("text, value", [("8", 8 / 255), ("8/255", 8 / 255), (" 0.5/255", 0.5 / 255), ("0", 0.0),
                                         ("255", 1.0), ("2.5", 2.5 / 255)])
def test_pixel_budgets_parse_exactly(text: str, value: float) -> None:
    assert parse_pixel_budget(text) == value


@pytest.mark.parametrize("text, match", [("nan", "finite"), ("-3", ">= 0"), ("inf", "finite"), ("0.03", "ambiguous.*7.65"),
                                         ("300", "whole pixel range"), ("2040/255", "whole pixel range"),
                                         ("8/256", "1/255"), ("abc", "not a budget")])
def test_bad_pixel_budgets_are_refused_with_the_fix(text: str, match: str) -> None:
    with pytest.raises(AttackOptionError, match=match):
        parse_pixel_budget(text)


def test_spec_syntax() -> None:
    spec = parse_spec("pgd:eps=8,alpha=0.5/255,steps=20,random_start=false")
    assert spec.name == "pgd" and spec.options == {"eps": 8 / 255, "alpha": 0.5 / 255, "steps": 20, "random_start": False}
    assert spec.key == "pgd:eps=8/255,alpha=0.5/255,steps=20,random_start=False"
    assert parse_spec("apgd-t:steps=20,n_target_classes=3").options == {"steps": 20, "n_target_classes": 3}
    assert parse_spec("roa:search=gradient,fill=1/2").options == {"search": "gradient", "fill": 0.5}
    for bad, match in (("nope", "unknown attack"), ("pgd:eps", "bad attack option"), ("pgd:eps=0.03", "ambiguous")):
        with pytest.raises(AttackOptionError, match=match):
            parse_spec(bad)
    with pytest.raises(AttackOptionError, match="no option 'stepz'.*steps"):
        build_attack("pgd", _model(), stepz=3)


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, eps=float("nan")), lambda m: PGD(m, eps=-1.0), lambda m: PGD(m, eps=8.0),
    lambda m: PGD(m, alpha=0.0), lambda m: PGD(m, alpha=float("inf")), lambda m: PGD(m, steps=-1),
    lambda m: PGD(m, steps=2.5), lambda m: PGD(m, restarts=0), lambda m: APGD(m, steps=0), lambda m: APGD(m, eps=float("nan")),
    lambda m: Square(m, queries=0), lambda m: ROA(m, alpha=-1.0), lambda m: ROA(m, steps=-2),
    lambda m: AutoAttack(m, eps=float("inf")), lambda m: build_attack("pgd", m, eps="nan"),
])
def test_budgets_validated_in_the_api(make) -> None:
    with pytest.raises(AttackOptionError) as exc:
        make(_model())
    assert isinstance(exc.value, AbnnError) and "\n" not in str(exc.value)


def test_pgd_for_fast_at() -> None:
    """One step, alpha > eps (Fast-AT: 1.25 eps), random start: allowed, and stays in the ball."""
    m = _model()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    atk = build_attack("pgd", m, steps=1, alpha=10 / 255, first_fooling=False, seed=0)
    assert (atk(x, y) - x).abs().max() <= 8 / 255 + 1e-6


def test_stats_attack_on_a_plain_model_is_one_line() -> None:
    with pytest.raises(AbnnError, match="ABNN"):
        build_attack("stats", _model())
    with pytest.raises(AbnnError, match="ABNN"):
        build_attack("transfer-bn", _model())
    with pytest.raises(AbnnError, match="source"):
        build_attack("transfer", _model())
    assert isinstance(build_attack("transfer", _model(), source=_model(), steps=2), Attack)
    with pytest.raises(TypeError):  # the old exception type still holds
        StatisticsAttack(_model())


# ---------------------------------------------------------------- a toy attack, registered once


class Toy(Attack):
    """Adds +eps to every pixel (a deterministic toy)."""

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, seed: int | None = None,
                 channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        self.eps = eps

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return (x + self.eps).clamp(0, 1)


@pytest.fixture
def toy():
    register(AttackEntry("toy", Toy, "a toy attack for the test"))
    yield
    unregister("toy")


def test_toy_attack_appears_everywhere(toy, tmp_path, fake_data_root, capsys) -> None:
    from abnn.config import TrainConfig
    from abnn.evaluation import run_attacks, run_suite
    from abnn.models import resnet18_cifar

    assert "toy" in describe_attacks()
    assert main(["evaluate", "--list-attacks"]) == 0
    listing = capsys.readouterr().out
    assert "toy" in listing and "a toy attack for the test" in listing and "eps=8/255" in listing

    m = _model()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    res = run_attacks(m, (x, y), ["toy:eps=4"], batch_size=3, progress=False)
    assert res.attacks["toy:eps=4/255"].options["eps"] == 4 / 255

    suite = run_suite(m, (x, y), budget={"square_queries": 5, "steps_grid": (5,), "eps_grid_255": (0, 64),
                                         "pgd_steps": 2, "pgd_restarts": 1, "apgd_steps": 2, "apgd_targets": 1},
                      quick=True, batch_size=6, progress=False, extra_attacks=["toy"])
    assert "toy" in suite.attacks and "toy" in suite.worst.attacks

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(method="standard", arch="resnet18_cifar", width=1 / 16, data_root=str(fake_data_root)).save(run / "config.json")
    torch.save(resnet18_cifar(width=1 / 16).state_dict(), run / "model.pt")
    assert main(["evaluate", str(run), "--attack", "toy", "--attack", "pgd:steps=1", "--n-eval", "4",
                 "--no-progress", "--data-root", str(fake_data_root)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["attacks"]) == {"toy", "pgd:steps=1"} and ev["schema_version"] == 3
    assert ev["attacks"]["toy"]["settings"].startswith("Toy(")


def test_registry_refuses_duplicates(toy) -> None:
    with pytest.raises(ValueError, match="registered already"):
        register(AttackEntry("toy", Toy, "again"))
    register(AttackEntry("toy", Toy, "replaced"), replace=True)
    assert REGISTRY["toy"].summary == "replaced"


# ---------------------------------------------------------------- the command line


def _cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path, fake_data_root):
    from abnn.config import TrainConfig
    from abnn.models import resnet18_cifar

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(method="standard", arch="resnet18_cifar", width=1 / 16, data_root=str(fake_data_root)).save(run / "config.json")
    torch.manual_seed(0)
    torch.save(resnet18_cifar(width=1 / 16).state_dict(), run / "model.pt")
    return run


@pytest.mark.parametrize("args, match", [
    (["--eps", "nan"], "--eps must be a finite number"),
    (["--eps", "-3"], "--eps must be a finite number"),
    (["--eps", "0.03"], "--eps 0.03 is ambiguous.*--eps 7.65.*--eps 0.03/255"),
    (["--eps", "1000"], "whole pixel range"),
    (["--attack", "pgd:eps=0.03"], "ambiguous"),
    (["--attack", "pgd:steps=-1"], "steps must be an integer >= 0"),
    (["--attack", "pgd:alpha=nan"], "finite"),
    (["--attack", "fgsm"], "unknown attack 'fgsm'"),
    (["--attack", "stats"], "needs an ABNN model"),
    (["--attack", "transfer"], "source"),
    (["--steps", "-2"], "steps must be an integer"),
    (["--suite", "quick", "--steps", "3"], "leave out --steps"),
])
def test_cli_refuses_bad_budgets_in_one_line(run_dir, fake_data_root, capsys, args, match) -> None:
    code, err = _cli(["evaluate", run_dir, "--n-eval", 2, "--no-progress", "--data-root", fake_data_root, *args], capsys)
    assert code == 2 and err.startswith("abnn: error: ") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(match, err), err
    assert not (run_dir / "eval.json").exists()


def test_cli_eps_in_k_over_255_and_in_the_report(run_dir, fake_data_root, capsys) -> None:
    code = main(["evaluate", str(run_dir), "--eps", "4/255", "--attack", "pgd:steps=1", "--attack", "square:queries=3",
                 "--n-eval", "4", "--batch-size", "2", "--no-progress", "--data-root", str(fake_data_root)])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eps_255"] == pytest.approx(4.0)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["eps"] == 4 / 255 and ev["attacks"]["pgd:steps=1"]["options"]["eps"] == 4 / 255
    assert "eps=4/255" in ev["attacks"]["square:queries=3"]["settings"]
    assert sorted(ev["worst_case"]["attacks"]) == ["pgd:steps=1", "square:queries=3"]


def test_unwritable_output_is_refused_before_any_attack(run_dir, fake_data_root, capsys, monkeypatch) -> None:
    def boom(self, x, y):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(PGD, "perturb", boom)
    blocker = run_dir / "a-file"
    blocker.write_text("")
    for args in (["--out", blocker / "eval.json"], ["--suite", "quick", "--out", blocker / "suite"]):
        code, err = _cli(["evaluate", run_dir, "--n-eval", 2, "--no-progress", "--data-root", fake_data_root, *args],
                         capsys)
        assert code == 2 and "cannot write to" in err and len(err.strip().splitlines()) == 1, err
