"""`abnn reproduce table1 --preset smoke` writes a complete report, results and figures; reruns reuse stages."""

import json

import pytest

from abnn.cli import main
from conftest import REPO, shared_data_root


def test_smoke_reproduction_writes_everything(tmp_path, capsys, fake_data_root):
    root = shared_data_root() or fake_data_root  # real data when present (as in CI), else fake npz files
    out = tmp_path / "t1"
    args = ["reproduce", "table1", "--preset", "smoke", "--out", str(out), "--data-root", str(root), "--no-progress"]
    assert main(args) == 0
    for f in ("report.md", "results.json", "accuracy.png", "training_cost.png", "examples.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    n_eval = 48 if root != fake_data_root else 32  # the smoke preset's 48, or all 32 fake test images
    res = json.loads((out / "results.json").read_text())
    recs = {r["method"]: r for r in res["records"]}
    assert set(recs) == {"standard", "pgd-at", "abnn"}
    assert [recs[m]["cost_N_per_step"] for m in ("standard", "abnn", "pgd-at")] == [2.0, 3.0, 12.0]
    for r in recs.values():
        assert 0 <= r["robust_acc"]["pgd"] <= r["clean_acc"] and 0 <= r["robust_acc"]["roa"] <= r["clean_acc"]
        assert r["train_seconds"] > 0 and r["n_eval"] == n_eval and "torch" in r["versions"]
    assert recs["abnn"]["substitute"]["val_acc"] is not None
    report = (out / "report.md").read_text()
    assert "| ABNN |" in report and "87.5" in report and "examples.png" in report

    capsys.readouterr()
    assert main(args) == 0                      # a rerun reuses every finished stage
    log = capsys.readouterr()
    assert "reused" in log.err + log.out and "training" not in (log.err + log.out).replace("training (", "")


def test_finished_stage_with_other_settings_is_not_reused(tmp_path, fake_data_root, capsys):
    out = tmp_path / "t1"
    base = ["--out", str(out), "--data-root", str(fake_data_root), "--no-progress"]
    assert main(["train", "--out", str(out / "standard"), "--width", "0.0625", "--epochs", "1", "--batch-size", "64",
                 "--val-size", "0", "--data-root", str(fake_data_root), "--no-progress"]) == 0
    code = main(["reproduce", "table1", "--preset", "smoke", *base])
    assert code == 2 and "other settings" in capsys.readouterr().err


def test_paper_preset_fails_clearly_without_network(monkeypatch, capsys, tmp_path):
    import socket

    def refuse(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert main(["reproduce", "table1", "--preset", "paper", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "network" in err and "--preset smoke/cpu" in err


def test_bench_train_cost_counts_and_times():
    from abnn.benchmark import bench_train_cost

    res = bench_train_cost(width=1 / 16, substitute_width=1 / 16, batch_size=8, steps=1, warmup=1, at_steps=2,
                           progress=False)
    m = res["methods"]
    assert [m[k]["N_per_step_counted"] for k in ("standard", "abnn", "pgd-at")] == [2.0, 3.0, 6.0]
    assert all(v["ms_per_step_median"] > 0 for v in m.values())
    assert res["ratio_abnn_over_standard"] > 0 and res["ratio_pgdat_over_abnn"] > 0



def test_set_overrides_are_typed_validated_and_recorded():
    from abnn.errors import AbnnError
    from abnn.reproduce import get_preset, get_video_preset
    from abnn.reproduce.presets import apply_overrides

    p = apply_overrides(get_preset("smoke"), ["epochs=3", "width=1/8", "methods=standard,abnn", "train_size=none",
                                              "full_cifar10=true", "amp=bf16"])
    assert (p.epochs, p.width, p.methods, p.train_size, p.full_cifar10) == (3, 0.125, ("standard", "abnn"), None, True)
    assert p.method_config("abnn", "random").amp == "bf16" and p.substitute_config().amp == "bf16"
    assert p.overrides == ("epochs=3", "width=1/8", "methods=standard,abnn", "train_size=none", "full_cifar10=true",
                           "amp=bf16") and p.to_dict()["overrides"] == p.overrides
    assert get_preset("smoke").epochs != 3  # the named preset itself is untouched
    assert apply_overrides(get_video_preset("smoke"), ["epochs=1"]).overrides == ("epochs=1",)
    for bad, says in (("epoch=3", "KEY one of"), ("epochs=three", "expected int"), ("width=0", "--width must be"),
                      ("amp=fp8", "unknown --amp"), ("extra=1", "KEY one of")):
        with pytest.raises(AbnnError, match=says):
            apply_overrides(get_preset("smoke"), [bad])


def test_set_bad_value_is_one_line_before_anything_runs(tmp_path, capsys):
    assert main(["reproduce", "table1", "--preset", "smoke", "--out", str(tmp_path / "o"), "--set", "epochs=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--epochs must be" in err and not (tmp_path / "o").exists()


def test_table1_report_names_pgds_first_fooling_iterate(tmp_path):
    """The Table 1 report, written from the committed cpu results.json, says that its PGD keeps
    the first fooling iterate per sample."""
    from abnn.reports.table1 import write_table1_report

    path = REPO / "docs" / "results" / "table1-cpu" / "results.json"
    if not path.is_file():
        pytest.skip(f"{path} not in this checkout")
    write_table1_report(tmp_path, json.loads(path.read_text()))
    assert "PGD-5 (first fooling iterate kept per sample)" in (tmp_path / "report.md").read_text()


def test_table1_and_video_declare_train_points_on_the_shared_stages(tmp_path):
    """Table 1 and video are TrainPoints scheduled by the studies' stage builders: one training
    stage per point (ABNN after the substitute it pretrains), one ``eval:NAME`` per model, each
    weighed by the method registry's expected cost; a finished ``eval_table.json`` is reused."""
    from abnn.reproduce import get_preset, get_video_preset
    from abnn.reproduce.stages import TableEval, stage_weight, train_and_eval_stages
    from abnn.reproduce.table1 import table1_points
    from abnn.reproduce.video import video_points
    from abnn.training.methods import get_method

    preset = get_preset("smoke")
    points = table1_points(preset, tmp_path, None, "cpu")
    by = {p.name: p for p in points}
    assert list(by) == ["substitute", *preset.methods]
    assert by["abnn"].after == ("substitute",) and by["abnn"].cfg.substitute == str(tmp_path / "substitute")
    models = points[1:]
    stages, done = train_and_eval_stages(points, models, TableEval.of(preset), None, "cpu", force=False)
    assert not done and [s.name for s in stages] == [p.name for p in points] + [f"eval:{p.name}" for p in models]
    assert {s.name: s.weight for s in stages if s.name in by} == {p.name: stage_weight(p.cfg) for p in points}
    ratio = stage_weight(by["pgd-at"].cfg) / stage_weight(by["standard"].cfg)
    assert ratio == get_method("pgd-at").cost(by["pgd-at"].cfg) / get_method("standard").cost(by["standard"].cfg)

    video = get_video_preset("smoke")
    assert [(p.name, p.after) for p in video_points(video, tmp_path, None, "cpu")] == [(m, ()) for m in video.methods]

    spec = TableEval.of(preset)
    (tmp_path / "standard").mkdir()
    old = {"n_eval": preset.n_eval, "attack_options": preset.attack_options(), "seed": preset.seed, "clean_acc": 0.5,
           "robust_acc": {"pgd": 0.25, "roa": 0.375}, "attacks": {"pgd": "PGD(...)", "roa": "ROA(...)"},
           "attack_seconds": {"pgd": 1.0, "roa": 2.0}, "seconds": 3.0}  # the format before the one record format
    (tmp_path / "standard" / "eval_table.json").write_text(json.dumps(old))
    ev = spec.finished(tmp_path / "standard")
    assert (ev.clean_acc, ev.robust_acc, ev.attacks["roa"].seconds) == (0.5, {"pgd": 0.25, "roa": 0.375}, 2.0)
    assert TableEval.of(preset.__class__(name="t", description="", seed=1)).finished(tmp_path / "standard") is None


def test_preset_choices_come_from_the_preset_tables():
    """`--preset` choices are the names of the preset tables, not a list written twice."""
    from abnn.reproduce import PRESETS, VIDEO_PRESETS, preset_names

    assert preset_names("video") == tuple(VIDEO_PRESETS) and preset_names("table1") == tuple(PRESETS)
    assert preset_names("frontier") == tuple(PRESETS)
    assert preset_names() == ("smoke", "cpu", "gpu", "paper")  # every table's, in order: the CLI's choices
