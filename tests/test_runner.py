"""The one runner (`run_attacks`): typed per-sample results, per-attack seeds, resumability,
float32 attacks inside autocast, the worst case over every attack at the evaluated eps, per-sample
masking counts, and the JSON schema (old suite.json files still load for reports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abnn.attacks import PGD, AttackSpec, Square
from abnn.evaluation import EvalResult, SuiteResult, derive_seed, run_attacks
from abnn.evaluation.checks import flags, masking_counts
from abnn.evaluation.report import suite_markdown, write_suite_report

REPO = Path(__file__).resolve().parents[1]
K = 5


def _data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    templates = torch.randint(0, 2, (K, 3, 8, 8), generator=g).float() * 2 - 1
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=gen)
    return (0.5 + 0.15 * templates[y] + 0.08 * torch.randn(n, 3, 8, 8, generator=gen)).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, K))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(40):
        x, y = _data(64, 100 + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.set_num_threads(n)
    return model.eval().requires_grad_(False)


def test_run_attacks_api(trained) -> None:
    x, y = _data(12, 1)
    res = run_attacks(trained, (x, y), ["pgd", "apgd-ce:steps=5", "apgd-t:steps=5,n_target_classes=2"],
                      batch_size=5, device="cpu", seed=0, progress=False, progress_dir=None)
    assert isinstance(res, EvalResult) and res.n_eval == 12 and res.eps == 8 / 255
    assert list(res.attacks) == ["pgd", "apgd-ce:steps=5", "apgd-t:steps=5,n_target_classes=2"]
    pgd = res.attacks["pgd"]
    assert pgd.robust_mask.dtype == torch.bool and pgd.robust_mask.shape == (12,)
    assert pgd.robust_acc == pgd.robust_mask.float().mean().item() <= res.clean_acc
    assert not (pgd.robust_mask & ~res.clean_mask).any()  # robust only if correct clean too
    assert pgd.seed == derive_seed(0, "pgd") and pgd.kind == "white-box" and pgd.seconds > 0
    worst = res.worst_case()
    assert torch.equal(worst.robust_mask, torch.stack([r.robust_mask for r in res.attacks.values()]).all(0))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["schema_version"] == 3 and d["robust_acc"]["pgd"] == pgd.robust_acc
    back = EvalResult.from_dict(d)
    assert torch.equal(back.attacks["pgd"].robust_mask, pgd.robust_mask)
    assert back.worst_case().robust_acc == worst.robust_acc


def test_seeds_are_per_attack(trained) -> None:
    """Adding an attack never changes another attack's numbers (each has its own seed)."""
    x, y = _data(10, 2)
    one = run_attacks(trained, (x, y), ["pgd:eps=4"], batch_size=10, seed=3, progress=False)
    two = run_attacks(trained, (x, y), ["square:queries=20", "pgd:eps=4"], batch_size=10, seed=3, progress=False)
    assert torch.equal(one.attacks["pgd:eps=4/255"].robust_mask, two.attacks["pgd:eps=4/255"].robust_mask)
    other = run_attacks(trained, (x, y), ["pgd:eps=4"], batch_size=10, seed=4, progress=False)
    assert other.attacks["pgd:eps=4/255"].seed != one.attacks["pgd:eps=4/255"].seed


def test_resume_after_interruption(trained, tmp_path, monkeypatch) -> None:
    x, y = _data(10, 3)
    specs = ["pgd:eps=4", "square:queries=30,eps=4", "apgd-ce:steps=5,eps=4"]
    ref = run_attacks(trained, (x, y), specs, batch_size=4, progress=False)

    def killed(self, x, y):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Square, "perturb", killed)
        with pytest.raises(KeyboardInterrupt):
            run_attacks(trained, (x, y), specs, batch_size=4, progress=False, progress_dir=tmp_path)
    assert (tmp_path / "attack-progress.pt").is_file()
    res = run_attacks(trained, (x, y), specs, batch_size=4, progress=False, progress_dir=tmp_path)
    assert res.resumed == ["pgd:eps=4/255"] and not (tmp_path / "attack-progress.pt").exists()
    for k in ref.attacks:
        assert torch.equal(res.attacks[k].robust_mask, ref.attacks[k].robust_mask), k
    # other weights: the file is not trusted
    with monkeypatch.context() as m:
        m.setattr(Square, "perturb", killed)
        with pytest.raises(KeyboardInterrupt):
            run_attacks(trained, (x, y), specs, batch_size=4, progress=False, progress_dir=tmp_path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(192, K))
    with pytest.warns(UserWarning, match="other settings, weights or data"):
        assert run_attacks(other, (x, y), specs[:1], batch_size=4, progress=False, progress_dir=tmp_path).resumed == []


class _Recorder(nn.Module):
    """Records the dtype of its activations (a bf16 autocast region would give bf16 logits)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.dtypes = inner, []

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        self.dtypes.append(out.dtype)
        return out


def test_attacks_run_in_float32_inside_autocast(trained) -> None:
    x, y = _data(6, 4)
    rec = _Recorder(trained).eval()
    plain = PGD(rec, steps=2, seed=0)(x, y)
    rec.dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = PGD(rec, steps=2, seed=0)(x, y)
        assert set(rec.dtypes) == {torch.float32}  # float32 logits, float32 input gradients
        rec.dtypes.clear()
        res = run_attacks(rec, (x, y), ["pgd:steps=2"], batch_size=6, progress=False)
    assert torch.equal(inside, plain)
    assert set(rec.dtypes) == {torch.float32} and res.n_eval == 6
    rec.dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision only when asked for
        PGD(rec, steps=1, amp=torch.bfloat16)(x, y)
    assert rec.dtypes and set(rec.dtypes) == {torch.bfloat16}


def test_worst_case_includes_every_attack_at_eps(trained) -> None:
    """Sweep points at the evaluated eps count; attacks at other eps and ROA (not an eps-ball) do not."""
    x, y = _data(16, 5)
    specs = [AttackSpec("pgd", {"steps": 1, "alpha": 1 / 255}, label="pgd-weak"),
             AttackSpec("pgd", {"steps": 5, "alpha": 8 / 255}, label="steps-5", group="steps-sweep"),
             AttackSpec("pgd", {"eps": 64 / 255, "steps": 5}, label="eps-64", group="eps-sweep"),
             AttackSpec("roa", {"size": 3, "stride": 5, "steps": 1}, label="roa")]
    res = run_attacks(trained, (x, y), specs, eps=32 / 255, batch_size=16, progress=False, keep_worst_inputs=True)
    worst = res.worst_case()
    assert worst.attacks == ["pgd-weak", "steps-5"] and res.attacks["roa"].eps is None
    assert torch.equal(worst.robust_mask, res.attacks["pgd-weak"].robust_mask & res.attacks["steps-5"].robust_mask)
    assert worst.robust_acc < res.attacks["pgd-weak"].robust_acc  # the sweep point breaks more
    with torch.no_grad():  # the worst-case inputs are adversarial where the worst case says so
        ok = trained(res.x_worst).argmax(1) == y
    assert torch.equal(ok & res.clean_mask, worst.robust_mask)
    assert res.worst_case(64 / 255).attacks == ["eps-64"]


class HalfMasked(nn.Module):
    """Samples whose top-left pixel of channel 0 is bright go through a quantiser with zero
    gradient (gradient masking); the others see the model as it is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        masked = (x[:, :1, :1, :1] > 0.5).to(x.dtype)
        return self.inner(masked * ((x * 4).round() / 4) + (1 - masked) * x)


def test_masking_is_compared_per_sample(trained) -> None:
    """Square breaks masked samples that no gradient attack breaks: flagged with the count, even
    where Square is the weaker attack on average."""
    x, y = _data(32, 6)
    x[:, 0, 0, 0] = (torch.arange(32) % 2).float()  # odd samples masked
    model = HalfMasked(trained).eval()
    res = run_attacks(model, (x, y), ["pgd:steps=10,alpha=2/255", "square:queries=400"], eps=16 / 255,
                      batch_size=32, progress=False, seed=0)
    pgd, sq = res.attacks["pgd:steps=10,alpha=2/255"], res.attacks["square:queries=400"]
    expected = int((res.clean_mask & pgd.robust_mask & ~sq.robust_mask).sum())
    counts = masking_counts(res)
    assert counts == {"square:queries=400": expected} and expected > 0
    from abnn.evaluation.results import Curve

    found = flags(n=32, eps_curve=Curve([0], [0.0], {"steps": 1}), steps_curve=Curve([5], [0.0], {}),
                  masking=counts, kinds={k: r.kind for k, r in res.attacks.items()},
                  gradients={"zero_grad_frac": 0.0, "nonfinite_grad": False}, batch=None, worst_acc=0.0)
    assert found == [f"possible gradient masking: gradient-free square:queries=400 breaks {expected} of 32 samples "
                     f"({100 * expected / 32:.1f}%) that every white-box gradient attack leaves robust"]


@pytest.mark.parametrize("name", ["standard", "pgd-at", "abnn"])
def test_old_suite_json_loads_for_reports(name: str, tmp_path) -> None:
    path = REPO / "docs" / "results" / "table1-cpu-full-eval" / name / "suite.json"
    if not path.is_file():
        pytest.skip(f"{path} not in this checkout")
    old = json.loads(path.read_text())
    res = SuiteResult.from_dict(old)
    assert res.verdict == old["verdict"] and res.worst.robust_acc == old["worst_case"]["robust_acc"]
    assert res.attacks["pgd-5"].robust_acc == old["attacks"]["pgd-5"]["robust_acc"]
    md = suite_markdown(res)
    assert f"Verdict: **{old['verdict']}**" in md and f"**{100 * old['robust_acc']:.1f}%**" in md
    assert "PGD-5 (first fooling iterate kept per sample)" in md
    write_suite_report(res, tmp_path)
    again = SuiteResult.from_dict(json.loads((tmp_path / "suite.json").read_text()))
    assert again.to_dict()["attacks"] == res.to_dict()["attacks"]
