"""The `abnn` command end to end on a tiny configuration, and its one-line errors."""

import json

import pytest
import torch

from abnn.cli import build_parser, main


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_pretrain_train_evaluate(fake_data_root, tmp_path, capsys):
    root = ["--data-root", fake_data_root, "--no-progress", "--threads", "2"]
    sub = tmp_path / "sub"
    code, out, _ = _run(["pretrain-substitute", "--out", sub, "--width", 0.0625, "--epochs", 1, "--batch-size", 16,
                         "--val-size", 16, *root], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["val_size"] == 16
    assert (sub / "model.pt").is_file() and (sub / "metrics.jsonl").is_file()

    for method, extra in (("abnn", ["--substitute", sub]), ("standard", []), ("pgd-at", ["--at-steps", 1])):
        run = tmp_path / method
        code, out, _ = _run(["train", "--method", method, *extra, "--out", run, "--width", 0.0625, "--epochs", 2,
                             "--batch-size", 32, "--val-size", 16, *root], capsys)
        assert code == 0
        res = json.loads((run / "train_results.json").read_text())
        assert res["cost"]["steps"] == 8 and res["train_seconds"] > 0
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "abnn" / "train_results.json").read_text())["cost_N_per_step"] == 3.0
    assert json.loads((tmp_path / "pgd-at" / "train_results.json").read_text())["cost_N_per_step"] == 4.0

    code, out, _ = _run(["evaluate", tmp_path / "abnn", "--attack", "pgd", "--n-eval", 8, "--batch-size", 4, *root], capsys)
    assert code == 0
    ev = json.loads((tmp_path / "abnn" / "eval.json").read_text())
    assert ev["n_eval"] == 8 and 0 <= ev["robust_acc"]["pgd"] <= ev["clean_acc"] <= 1


def test_a_rerun_continues_and_fresh_starts_over(fake_data_root, tmp_path, capsys):
    """The resume policy: the same command continues, other settings are refused in one line
    naming --fresh, --fresh starts over, the old --resume still works with a one-line note."""
    args = ["train", "--out", tmp_path / "r", "--width", 0.0625, "--batch-size", 32, "--val-size", 0,
            "--data-root", fake_data_root, "--no-progress"]
    assert _run([*args, "--epochs", 2, "--max-steps", 4], capsys)[0] == 0      # stops after epoch 1
    code, _, err = _run([*args, "--epochs", 2, "--lr", 0.05], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--lr recorded 0.1, now 0.05" in err and "--fresh" in err
    assert _run([*args, "--epochs", 2], capsys)[0] == 0                        # continues
    epochs = lambda: [json.loads(ln)["epoch"] for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs() == [1, 2]
    code, _, err = _run([*args, "--epochs", 2, "--resume"], capsys)            # deprecated, still works
    assert code == 0 and "abnn: note: --resume is deprecated" in err and epochs() == [1, 2]
    assert _run([*args, "--epochs", 1, "--fresh"], capsys)[0] == 0 and epochs() == [1]
    code, _, err = _run([*args, "--epochs", 1, "--fresh", "--resume"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("abnn: error: --fresh starts the run over")


def test_reproduce_force_is_fresh_with_a_note(capsys):
    parse = build_parser().parse_args
    assert parse(["reproduce", "table1"]).fresh is False and parse(["reproduce", "table1", "--fresh"]).fresh is True
    assert parse(["reproduce", "table1", "--force"]).fresh is True
    assert capsys.readouterr().err.strip() == ("abnn: note: --force is deprecated: it is spelled --fresh now "
                                               "(redo finished stages)")
    assert parse(["evaluate", "run"]).fresh is False and parse(["train", "--out", "x"]).resume is None


def test_every_setting_has_a_generated_flag(capsys):
    """Every TrainConfig field with help gets a flag (help lists it); pretrain-substitute has all but
    the target's; the rest is execution-only or fixed by the command (no flag on purpose)."""
    import dataclasses

    from abnn.config import TARGET, TrainConfig, flag_of
    from abnn.flags import flag_fields

    flagless = {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in flag_fields()}
    assert flagless == {"dataset", "full_cifar10", "frames", "substitute_num_classes", "at_eps", "at_alpha", "device",
                        "data_root", "num_threads"}  # the last three: the common --device, --data-root, --threads
    for command, target in (("train", True), ("pretrain-substitute", False)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for f in dataclasses.fields(TrainConfig):
            if f.name not in flagless:
                assert (flag_of(f.name) in text) == (target or f.metadata.get("scope") != TARGET), (command, f.name)
        assert all(flag in text for flag in ("--threads", "--device", "--data-root", "--out", "--fresh"))


def test_argv_to_config_round_trip():
    from abnn.config import TrainConfig
    from abnn.flags import config_from_args

    a = build_parser().parse_args(["train", "--out", "x", "--method", "fast-at", "--lr", "0.05", "--no-augment",
                                   "--threads", "3", "--val-size", "-1", "--substitute-taps", "layer1,layer2",
                                   "--fast-at-alpha", "12", "--allow-in-domain-substitute", "--no-sync-bn",
                                   "--checkpoint-every", "7", "--amp", "bf16", "--epochs", "2"])
    cfg = config_from_args(a)
    assert cfg == TrainConfig(method="fast-at", lr=0.05, augment=False, num_threads=3, val_size=None,
                              substitute_taps=["layer1", "layer2"], fast_at_alpha=12 / 255, in_domain_substitute=True,
                              sync_bn=False, checkpoint_every=7, amp="bf16", epochs=2)
    d = config_from_args(build_parser().parse_args(["pretrain-substitute", "--out", "x"]), dataset="tinyimagenet32",
                         arch="vgg19_bn")
    assert (d.lr, d.val_size, d.dataset, d.fast_at_alpha) == (0.05, None, "tinyimagenet32", 10 / 255)


def test_parse_errors_are_one_line(capsys):
    for argv in (["train", "--out", "x", "--fast-at-alpha", "0"], ["evaluate", "r", "--eps", "0.03"],
                 ["train", "--lr", "fast"], ["reproduce", "table9"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("abnn: error: "), err


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "/nonexistent/run"], "run folder not found"),
    (["train", "--method", "abnn", "--out", "X"], "needs a pretrained substitute"),
    (["train", "--method", "abnn", "--substitute", "/nope", "--out", "X"], "neither a run folder"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, fake_data_root):
    argv = [a.replace("X", str(tmp_path / "x")) for a in argv] + ["--data-root", str(fake_data_root)]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ABNN_DATA_ROOT", raising=False)
    code, _, err = _run(["pretrain-substitute", "--out", tmp_path / "s", "--data-root", tmp_path], capsys)
    assert code == 2 and "tinyimagenet32_train.npz not found" in err


def test_corrupt_and_unsafe_checkpoints(fake_data_root, tmp_path, capsys):
    run = tmp_path / "r"
    assert _run(["train", "--out", run, "--width", 0.0625, "--epochs", 1, "--batch-size", 64, "--val-size", 0,
                 "--data-root", fake_data_root, "--no-progress"], capsys)[0] == 0
    good = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(good[: len(good) // 2])
    code, _, err = _run(["evaluate", run, "--n-eval", 4, "--data-root", fake_data_root], capsys)
    assert code == 2 and "model.pt" in err and "corrupt" in err

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, run / "model.pt")
    code, out, err = _run(["evaluate", run, "--n-eval", 4, "--data-root", fake_data_root], capsys)
    assert code == 2 and "refusing" in err and "pwned" not in out


def test_bad_flag_and_help(capsys):
    assert main(["train", "--method", "magic", "--out", "x"]) == 2  # the method registry names the choices
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --method 'magic'" in err[0] and "fast-at" in err[0] and "probe" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
