"""The authors' AutoAttack (optional package pyautoattack): our APGD-CE agrees with theirs on the
reference ResNet-20, `abnn evaluate --suite autoattack` runs theirs through the runner into the
usual result records, and a missing package is one line."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from abnn.attacks import APGD
from abnn.attacks.official import import_official_autoattack
from abnn.cli import main
from abnn.errors import AbnnError


def _official():
    try:
        return import_official_autoattack()
    except AbnnError as exc:
        pytest.skip(f"the official AutoAttack is not installed: {exc}")


def test_our_apgd_ce_agrees_with_the_official_one(data_root) -> None:
    """First 200 CIFAR-10 test images, eps 1/255, one restart, 10 steps (about 10 s on one CPU
    thread; the checkpoint schedule of APGD is the authors' integer one at any step count, the
    paper's at 100 steps): robust accuracies within 1 point."""
    module = _official()
    from abnn.data import load_cifar10
    from abnn.models import resnet20_reference

    weights = data_root / "weights" / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"reference checkpoint {weights} not found")
    model = resnet20_reference(str(weights)).eval()
    data = load_cifar10("test", data_root).subset(200)
    x, y = data.x.float().div(255), data.y.long()
    t0 = time.perf_counter()
    ours = APGD(model, eps=1 / 255, steps=10, restarts=1, seed=0)(x, y)
    theirs = module.autopgd_base.APGDAttack(model, n_iter=10, n_restarts=1, eps=1 / 255, seed=0, loss="ce",
                                            device="cpu").perturb(x, y)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        acc_ours = (model(ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(theirs).argmax(1) == y).float().mean().item()
    print(f"clean {clean:.3f}, APGD-CE ours {acc_ours:.3f}, official {acc_theirs:.3f}, {time.perf_counter() - t0:.0f} s")
    assert clean > 0.85 and 0.05 < acc_theirs < clean  # mid-range, where a weaker attack would show
    assert abs(acc_ours - acc_theirs) <= 0.01


@pytest.fixture
def tiny_run(tmp_path, fake_data_root):
    from abnn.config import TrainConfig
    from abnn.models import resnet18_cifar

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(method="standard", arch="resnet18_cifar", width=1 / 16, data_root=str(fake_data_root)).save(run / "config.json")
    torch.manual_seed(0)
    torch.save(resnet18_cifar(width=1 / 16).state_dict(), run / "model.pt")
    return run


def test_suite_autoattack_runs_the_official_code(tiny_run, fake_data_root, capsys) -> None:
    _official()
    code = main(["evaluate", str(tiny_run), "--suite", "autoattack", "--n-eval", "4", "--batch-size", "4",
                 "--no-progress", "--data-root", str(fake_data_root)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tiny_run / "autoattack.json").read_text())
    row = res["attacks"]["autoattack-official"]
    assert row["kind"] == "ensemble" and row["settings"].startswith("OfficialAutoAttack(")
    assert "version='standard'" in row["settings"] and len(row["robust_mask"]) == 4
    assert 0 <= row["robust_acc"] <= res["clean_acc"] and res["worst_case"]["attacks"] == ["autoattack-official"]


def test_missing_package_is_one_line(tiny_run, fake_data_root, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "autoattack", None)
    code = main(["evaluate", str(tiny_run), "--suite", "autoattack", "--n-eval", "2", "--no-progress",
                 "--data-root", str(fake_data_root)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install -e '.[autoattack]'" in err
    assert not (tiny_run / "autoattack.json").exists()


def test_official_attacks_correctly_classified_images_in_our_cpu_layout() -> None:
    """Our attacks hand 4-D CPU batches over in channels-last; the authors' code reshapes
    gradients with ``view`` and must get them in the default layout.  Every image here is
    classified correctly (labels = the model's predictions), so the official attacks really run."""
    from abnn.attacks.official import OfficialAutoAttack
    from abnn.models import resnet18_cifar

    _official()
    torch.manual_seed(0)
    model = resnet18_cifar(width=1 / 16).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = OfficialAutoAttack(model, eps=8 / 255, seed=0)(x, y)
    assert x_adv.shape == x.shape and x_adv.is_contiguous()
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
