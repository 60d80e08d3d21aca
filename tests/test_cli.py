"""The `abnn` command end to end on a tiny configuration, and its one-line errors."""

import json

import pytest
import torch

from abnn.cli import main


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


def test_resume_continues_and_refuses_to_overwrite(fake_data_root, tmp_path, capsys):
    args = ["train", "--out", tmp_path / "r", "--width", 0.0625, "--batch-size", 32, "--val-size", 0,
            "--data-root", fake_data_root, "--no-progress"]
    assert _run([*args, "--epochs", 2, "--max-steps", 4], capsys)[0] == 0      # stops after epoch 1
    code, _, err = _run([*args, "--epochs", 2], capsys)
    assert code == 2 and "--resume" in err
    assert _run([*args, "--epochs", 2, "--resume"], capsys)[0] == 0
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2]


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
