"""`abnn bench throughput` on tiny sizes, and the CLI wiring of both benchmarks."""

import json

import pytest

from abnn.benchmark import bench_throughput
from abnn.cli import main

TINY = dict(width=1 / 16, substitute_width=1 / 16, batch_size=4, iters=1, warmup=1, at_steps=1, attack_steps=2,
            device="cpu", progress=False)


def test_throughput_reports_every_part(tmp_path):
    out = tmp_path / "t.json"
    res = bench_throughput(**TINY, compare_torchattacks=True, out=out)
    assert json.loads(out.read_text())["benchmark"] == "throughput"
    assert set(res["train"]) == {"standard", "abnn", "pgd-at"}
    assert all(v["images_per_s"] > 0 for v in res["train"].values())
    assert set(res["inference"]) == {"resnet18", "abnn"}
    for k in ("resnet18", "abnn"):
        a = res["attack"]["models"][k]
        assert a["pgd_steps_per_s"] == pytest.approx(4 * 2 / a["seconds_per_call"])
    cmp = res["compare_torchattacks"]
    try:
        import torchattacks  # noqa: F401
    except Exception:  # noqa: BLE001
        assert "skipped" in cmp
    else:
        assert cmp["model"] == "resnet18" and cmp["ratio_ours_over_torchattacks"] > 0
    assert res["amp"] == "off"  # auto: off on CPU


def test_cli_bench_throughput_and_train_cost(capsys):
    args = ["--width", "0.0625", "--substitute-width", "0.0625", "--batch-size", "4", "--steps", "1",
            "--at-steps", "1", "--methods", "standard,pgd-at", "--device", "cpu", "--no-progress"]
    assert main(["bench", "throughput", *args, "--attack-steps", "1", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["train"]) == {"standard", "pgd-at"} and set(res["inference"]) == {"resnet18"}
    assert main(["bench", "train-cost", *args]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["methods"]["pgd-at"]["N_per_step_counted"] == 4.0


def test_speed_options_are_harmless_on_cpu(tmp_path, fake_data_root, capsys):
    """--channels-last and --amp bf16 (CPU autocast; PGD-AT's attack runs under it too) train and
    write a normal run; --amp auto stays off on CPU."""
    for extra, amp in ((["--channels-last", "--amp", "bf16"], "bfloat16"), ([], "off")):
        run = tmp_path / f"r{len(extra)}"
        assert main(["train", "--method", "pgd-at", "--at-steps", "1", "--out", str(run), "--width", "0.0625",
                     "--epochs", "1", "--batch-size", "16", "--val-size", "8", "--max-steps", "2",
                     "--data-root", str(fake_data_root), "--no-progress", "--device", "cpu", *extra]) == 0
        res = json.loads((run / "train_results.json").read_text())
        assert res["amp"] == amp and res["cost_N_per_step"] == 4.0 and res["channels_last"] == bool(extra)
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] > 0


def test_bench_video_step_reduced_models():
    from abnn.benchmark import bench_video_step

    res = bench_video_step(full=False, frames=4, steps=1, progress=False)
    sec = res["reduced"]["seconds_per_step"]
    assert sec["standard"] > 0 and sec["abnn"] > 0 and res["reduced"]["ratio_abnn_over_standard"] > 0


def test_bench_compare_amp_reports_float32_and_bf16_side_by_side(capsys):
    args = ["bench", "throughput", "--compare-amp", "--width", "0.0625", "--substitute-width", "0.0625",
            "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["benchmark"] == "precision" and res["modes"] == ["float32", "bfloat16"]
    for part in ("train", "inference"):
        assert set(res[part]) == {"standard", "abnn"}
        for m in ("standard", "abnn"):
            assert set(res[part][m]) == {"float32", "bfloat16"}
            assert all(v["images_per_s"] > 0 for v in res[part][m].values())
    assert set(res["speedup_over_float32_cpu_time"]["train"]["abnn"]) == {"bfloat16"}
