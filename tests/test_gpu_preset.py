"""The `gpu` Table 1 preset: its settings, the CUDA refusal, the FLOP estimate, Fast-AT in Table 1."""


import pytest

from abnn.cli import main
from abnn.reproduce import get_preset
from abnn.reproduce.estimate import H100_CLASS, estimate_table1
from abnn.reproduce.presets import apply_overrides
from abnn.reproduce.table1 import paper_columns


def test_gpu_preset_settings_reach_every_training_config():
    p = get_preset("gpu")
    assert p.needs_cuda and p.width == 1.0 and p.substitute_width == 1.0 and "fast-at" in p.methods
    for method in p.methods:
        cfg = p.method_config(method, "sub")
        assert (cfg.amp, cfg.channels_last, cfg.data_on_device, cfg.include_jpeg) == ("bf16", True, True, False)
        assert cfg.keep_best == (method == "fast-at") and cfg.robust_val_size == (500 if method == "fast-at" else 0)
    sub = p.substitute_config()
    assert (sub.dataset, sub.width, sub.amp, sub.channels_last) == ("tinyimagenet32", 1.0, "bf16", True)
    assert apply_overrides(p, ["include_jpeg=true"]).method_config("standard", None).include_jpeg
    assert paper_columns("fast-at", "table1") == {"name": "Fast-AT", "clean": None, "pgd": None, "cost": None}
    assert paper_columns("abnn", "table1") == {"name": "ABNN", "clean": 87.5, "pgd": 31.5, "cost": "3N"}


def test_gpu_preset_refuses_cpu_in_one_line(tmp_path, capsys):
    assert main(["reproduce", "table1", "--preset", "gpu", "--device", "cpu", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err and "--set needs_cuda=false" in err
    assert not (tmp_path / "o").exists()


def test_estimate_counts_passes_and_flops(fake_data_root, capsys):
    preset = apply_overrides(get_preset("smoke"), ["methods=standard,pgd-at,abnn,fast-at", "at_steps=2"])
    est = estimate_table1(preset, data_root=str(fake_data_root))
    by = {s["stage"]: s for s in est["stages"]}
    assert {k: by[k]["N_per_step"] for k in by} == {"substitute": 2, "standard": 2, "pgd-at": 6, "abnn": 3,
                                                    "fast-at": 4}
    assert by["standard"]["steps"] == 1 * (128 // 64)  # fake data: 128 training images, batch 64, 1 epoch
    f = est["pass_gflops_per_image"]
    assert f["abnn"]["forward"] > f["resnet18"]["forward"] > 0
    assert by["pgd-at"]["gflops_per_image_step"] == pytest.approx(
        3 * f["resnet18"]["forward"] + f["resnet18"]["train_backward"] + 2 * f["resnet18"]["input_backward"])
    assert {e["roa_positions"] for e in est["evaluations"]} == {144}  # stride-2 grid on 32x32
    assert est["seconds"]["train"] == pytest.approx(est["total_flops"]["train"] / H100_CLASS.train_flops_per_s)
    assert main(["reproduce", "table1", "--preset", "smoke", "--set", "methods=standard", "--estimate",
                 "--data-root", str(fake_data_root)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE, nothing was run" in out and "datasheet" in out and "Estimated time" in out


def test_estimate_is_for_table1_only(capsys):
    assert main(["reproduce", "frontier", "--preset", "smoke", "--estimate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--estimate is for table1 only" in err
