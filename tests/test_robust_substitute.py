"""A robust substitute pretrained once (issue 20) and the forensics of the paper's number (issue 19):
adversarial substitute pretraining, a Fast-AT CIFAR run as an ABNN substitute, the probe, and
`reproduce robust-substitute` / `reproduce forensics` end to end on the smoke preset."""

import json

import pytest
import torch

from abnn.cli import main
from abnn.config import TrainConfig
from abnn.framework import ABNN
from abnn.models import RESNET18_STAGES
from abnn.probe import Probe
from abnn.runs import build_model_from_config, resolve_config
from abnn.training import train
from abnn.training.methods import batch_loss_for
from conftest import record


@pytest.fixture
def root(study_data_root):
    return study_data_root


def _pretrain(out, root, *extra):
    return main(["pretrain-substitute", "--out", str(out), "--method", "fast-at", "--width", "0.0625", "--epochs", "1",
                 "--train-size", "128", "--batch-size", "64", "--val-size", "64", "--robust-val-size", "16",
                 "--keep-best", "--data-root", str(root), "--no-progress", *extra])


def test_pretrain_substitute_fast_at_counts_4N_records_robust_validation_and_keeps_its_identity(tmp_path, root, capsys):
    run = tmp_path / "sub"
    assert _pretrain(run, root) == 0
    res = json.loads((run / "train_results.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "fast-at" and cfg["dataset"] == "tinyimagenet32" and cfg["keep_best"]
    assert res["cost_N_per_step"] == 4.0 and res["cost"]["total_N"] == 4 * res["cost"]["steps"] == 8
    assert len(res["robust_val"]["per_epoch"]) == 1 and res["robust_val"]["n"] == 16
    assert res["robust_validation_seconds"] > 0 and res["best_robust_epoch"] == 1
    capsys.readouterr()
    assert _pretrain(run, root, "--method", "standard") == 2  # a rerun continues; the method defines the run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method recorded 'fast-at', now 'standard'" in err[0]


def test_fast_at_substitute_examples_stay_in_the_eps_ball_and_pixel_range():
    torch.manual_seed(0)
    cfg = TrainConfig(method="fast-at", dataset="tinyimagenet32", arch="vgg19_bn")
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    batch_loss_for(cfg)(model, x, y)
    trained_on = seen[-1]  # the attack's forward, then the training forward on the FGSM-RS example
    assert len(seen) == 2 and (trained_on - x).abs().max() <= cfg.at_eps + 1e-7
    assert trained_on.min() >= 0 and trained_on.max() <= 1 and not torch.equal(trained_on, x)


@pytest.fixture
def fast_at_cifar_run(tmp_path, root):
    cfg = TrainConfig(method="fast-at", width=1 / 16, epochs=1, batch_size=32, train_size=64, val_size=0,
                      data_root=str(root))
    train(cfg, tmp_path / "fast-at", progress=False)
    return tmp_path / "fast-at"


def _on(run, method, root):
    return resolve_config(TrainConfig(method=method, width=1 / 16, substitute=str(run), in_domain_substitute=True,
                                      substitute_taps=list(RESNET18_STAGES), data_root=str(root)))


def test_a_fast_at_cifar_run_is_an_abnn_substitute_frozen_and_tapped_by_stage_names(fast_at_cifar_run, root):
    cfg = _on(fast_at_cifar_run, "abnn", root)
    assert (cfg.substitute_arch, cfg.substitute_num_classes, cfg.substitute_width) == ("resnet18_cifar", 10, 1 / 16)
    model = build_model_from_config(cfg).train()
    assert isinstance(model, ABNN) and len(model.adaptive) == len(RESNET18_STAGES)
    assert not model.substitute.training and not any(p.requires_grad for p in model.substitute.parameters())
    saved = torch.load(fast_at_cifar_run / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.substitute.state_dict().items())  # its trained weights
    with pytest.raises(Exception, match="CIFAR-10"):  # in-domain only on purpose
        resolve_config(TrainConfig(method="abnn", substitute=str(fast_at_cifar_run)))


def test_a_probe_trains_its_head_and_never_updates_the_frozen_substitute(fast_at_cifar_run, tmp_path, root):
    cfg = _on(fast_at_cifar_run, "probe", root)
    cfg.epochs, cfg.batch_size, cfg.train_size, cfg.val_size = 1, 32, 64, 0
    before = build_model_from_config(cfg)
    assert isinstance(before, Probe)
    res = train(cfg, tmp_path / "probe", progress=False)
    after = torch.load(tmp_path / "probe" / "model.pt", weights_only=True)
    sub = {k: v for k, v in before.state_dict().items() if k.startswith("substitute.")}
    assert sub and all(torch.equal(after[k], v) for k, v in sub.items())  # parameters and BN statistics
    assert any(not torch.equal(after[k], v) for k, v in before.state_dict().items() if k.startswith("head."))
    assert res.cost["per_network"]["substitute"] == {"forward": 2, "backward": 0}  # frozen: never backward
    assert res.cost_N_per_step == 3.0  # substitute forward, head forward and backward


def test_autoattack_runs_only_on_rows_above_five_percent(tmp_path):
    from abnn.reproduce.robust_substitute import job_autoattack

    args = (200, 50, None, "cpu", False)
    five = record("1" * 1000, {"pgd": "1" * 50 + "0" * 950})
    assert "<= 5%" in job_autoattack(tmp_path, five, *args)["skipped"]  # 5.0% is not above 5%
    thirty = record("1" * 10, {"pgd": "1110000000"})
    assert "autoattack_n = 0" in job_autoattack(tmp_path, thirty, 0, *args[1:])["skipped"]
    assert not any(tmp_path.iterdir())  # nothing attacked, nothing written


@pytest.mark.slow
def test_robust_substitute_and_forensics_smoke_end_to_end(tmp_path, root, capfd):
    rs, fx = tmp_path / "rs", tmp_path / "fx"
    common = ["--preset", "smoke", "--data-root", str(root), "--no-progress", "--jobs", "1"]
    assert main(["reproduce", "robust-substitute", "--out", str(rs), *common]) == 0
    for f in ("report.md", "results.json", "robust_substitute.png"):
        assert (rs / f).stat().st_size > 0, f
    res = json.loads((rs / "results.json").read_text())
    recs = {r["name"]: r for r in res["records"]}
    assert list(recs) == ["abnn", "abnn:fast-at-tiny", "abnn:fast-at-cifar", "probe:fast-at-tiny",
                          "probe:fast-at-cifar", "fast-at", "pgd-at"]
    assert recs["abnn:fast-at-tiny"]["substitute_cost"]["N_per_step"] == 4.0  # the Fast-AT substitute, counted
    assert recs["probe:fast-at-cifar"]["substitute_run"] == str(rs / "frontier" / "fast-at")
    for r in recs.values():
        t, s, am = r["target_cost"], r["substitute_cost"], r["amortised"]["total_N"]
        assert am["1"] == t["total_N"] + (s["total_N"] if s else 0) and am["20"] <= am["5"] <= am["1"]
        assert r["worst_case_acc"] <= r["robust_acc"]["pgd"] <= r["clean_acc"]
        assert (r["attribution_median"] is not None) == (r["method"] == "abnn")  # the forensics' split per ABNN row
        assert "autoattack_n = 0" in r["autoattack"]["skipped"]  # the smoke preset runs no AutoAttack
    assert "breaks the paper's premise on purpose" in (rs / "report.md").read_text()
    capfd.readouterr()
    # forensics reuses the frontier models the first study trained (its --studies-out layout)
    assert main(["reproduce", "forensics", "--out", str(fx), "--studies-out", str(rs), *common]) == 0
    assert "abnn: finished earlier, reused" in "".join(capfd.readouterr())
    for f in ("report.md", "results.json", "forensics.png"):
        assert (fx / f).stat().st_size > 0, f
    fres = json.loads((fx / "results.json").read_text())
    names = [r["name"] for r in fres["records"]]
    assert names[:2] == ["abnn", "abnn:batch"] and fres["paper_pgd"] == 0.315
    for r in fres["records"]:
        assert {"pgd", "pgd-target-only", "pgd-no-stats-grad", "pgd-clean-substitute"} <= set(r["pgd5"])
        assert r["pgd20_protocol"] in r["pgd5"] and set(r["pgd20"]) == {"pgd", r["pgd20_protocol"]}
        s = r["path_swap"]
        assert s["target_label"] + s["substitute_label"] + s["neither"] == pytest.approx(1.0)
    assert "31.5" in (fx / "report.md").read_text()
