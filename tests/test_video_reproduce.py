"""`abnn reproduce video --preset smoke` on the 13 real clips; the paper preset fails clearly here."""

import json


from abnn.cli import main


def test_video_smoke_reproduction_writes_both_tables(tmp_path, data_root, capsys):
    out = tmp_path / "v"
    assert main(["reproduce", "video", "--preset", "smoke", "--out", str(out), "--data-root", str(data_root),
                 "--no-progress"]) == 0
    for f in ("report.md", "results.json", "accuracy.png", "training_cost.png", "examples.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    recs = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert [recs[m]["cost_N_per_step"] for m in ("standard", "abnn", "oudefend")] == [2.0, 3.0, 24.0]
    den, tgt = recs["oudefend"]["cost_counts"]["denoiser"], recs["oudefend"]["cost_counts"]["target"]
    assert den == tgt and den["forward"] == den["backward"]      # the block runs in every pass of the target
    for r in recs.values():
        assert 0 <= r["robust_acc"]["pgd"] <= r["clean_acc"] and 0 <= r["robust_acc"]["roa"] <= r["clean_acc"]
    report = (out / "report.md").read_text()
    assert "Table 2" in report and "Table 3" in report and "mean nothing" in report


def test_video_paper_preset_needs_ucf101(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ABNN_UCF101_ROOT", raising=False)
    assert main(["reproduce", "table2", "--preset", "paper", "--out", str(tmp_path), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "UCF-101" in err and len(err.strip().splitlines()) == 1


def test_cpu_preset_is_image_only(tmp_path, capsys):
    assert main(["reproduce", "video", "--preset", "cpu", "--out", str(tmp_path)]) == 2
    assert "unknown video preset" in capsys.readouterr().err

