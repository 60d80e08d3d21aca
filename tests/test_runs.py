"""Run folders you can trust (issue 13): one run identity, locks, write failures, divergence,
checked model inputs, one-line errors, and the README's API snippet."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abnn.cli import main
from abnn.config import EXECUTION, TrainConfig, config_differences, defining_fields, flag_of
from abnn.errors import AbnnError, InputRangeError, RunLockedError, WriteError
from abnn.files import ensure_writable, strict_json, write_json_atomic
from abnn.models.io import save_atomic
from abnn.runs import LOCK_NAME, run_lock

from conftest import REPO

TINY = ["--width", "0.0625", "--batch-size", "16", "--val-size", "0", "--no-progress", "--device", "cpu"]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abnn: error: ") and "Traceback" not in err, err
    return lines[0]


def _strict_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines()]


# -- one run identity ------------------------------------------------------------------------------

def test_execution_only_settings_are_the_documented_few():
    """Every field defines the run unless it is marked execution-only: a new field defines it by default."""
    execution = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("execution")}
    assert execution == {"device", "data_root", "num_threads", "channels_last", "compile", "sync_bn",
                         "checkpoint_every", "data_on_device"}
    assert set(defining_fields()) == {f.name for f in dataclasses.fields(TrainConfig)} - execution
    assert {"lr", "augment", "val_size", "at_steps", "substitute", "amp"} <= set(defining_fields())
    assert EXECUTION["execution"] is True


def test_config_differences_name_flags_and_treat_missing_fields_as_defaults(tmp_path, monkeypatch):
    old = TrainConfig(lr=0.1, augment=True).to_dict()
    del old["amp"], old["at_alpha"]            # recorded by a version without these fields
    new = TrainConfig(lr=0.05, augment=False, device="cpu", num_threads=3)
    diffs = config_differences(old, new)
    assert [(d.name, d.flag, d.recorded, d.new) for d in diffs] == [
        ("lr", "--lr", 0.1, 0.05), ("augment", "--no-augment", True, False)]
    assert config_differences(old, TrainConfig()) == []
    assert flag_of("num_threads") == "--threads" and flag_of("dataset") == "dataset"
    # the same substitute written relatively and absolutely is the same source
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    assert config_differences(TrainConfig(substitute="sub"), TrainConfig(substitute=str(sub))) == []
    assert [d.name for d in config_differences(TrainConfig(substitute="sub"), TrainConfig(substitute="other"))] == ["substitute"]


@pytest.fixture
def stopped_run(tmp_path, fake_data_root):
    """A run stopped after 2 of its 8 steps, with a checkpoint: (its argv, folder)."""
    run = tmp_path / "r"
    argv = ["train", "--out", run, "--epochs", "2", *TINY, "--data-root", fake_data_root]
    assert main([str(a) for a in [*argv, "--max-steps", "2"]]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    return argv, run


def test_resume_with_changed_defining_flags_is_refused_and_config_unchanged(stopped_run, capsys):
    argv, run = stopped_run
    recorded, ckpt = (run / "config.json").read_bytes(), (run / "checkpoint.pt").read_bytes()
    code, _, err = _run([*argv, "--lr", "0.05", "--no-augment", "--at-steps", "3"], capsys)
    line = _one_line(err)
    assert code == 2
    assert "--lr recorded 0.1, now 0.05" in line and "--no-augment recorded True, now False" in line
    assert "--at-steps recorded 5, now 3" in line
    assert (run / "config.json").read_bytes() == recorded and (run / "checkpoint.pt").read_bytes() == ckpt


def test_resume_with_execution_settings_changed_keeps_the_recorded_config(stopped_run, capsys):
    argv, run = stopped_run
    recorded = (run / "config.json").read_bytes()
    assert _run([*argv, "--threads", "1", "--checkpoint-every", "3"], capsys)[0] == 0
    assert [r["epoch"] for r in _strict_lines(run / "metrics.jsonl")] == [1, 2]
    assert (run / "config.json").read_bytes() == recorded and not (run / LOCK_NAME).exists()


def test_resume_without_checkpoint_says_so(tmp_path, fake_data_root, capsys):
    code, _, err = _run(["train", "--out", tmp_path / "new", "--epochs", "1", *TINY, "--data-root", fake_data_root,
                         "--resume"], capsys)
    note, error = err.strip().splitlines()  # the deprecated --resume says so, and still insists on a checkpoint
    assert code == 2 and "--resume is deprecated" in note and "no checkpoint.pt" in error
    assert not (tmp_path / "new").exists()


def test_reproduce_reuses_a_stage_only_with_the_same_identity(tmp_path):
    """reproduce's stage check is the shared identity: it now also sees settings such as --val-size."""
    from abnn.errors import SettingsMismatchError
    from abnn.reproduce.stages import finished_train

    run = tmp_path / "standard"
    cfg = TrainConfig(width=0.0625, epochs=1, val_size=64)
    run.mkdir()
    cfg.save(run / "config.json")
    (run / "model.pt").write_bytes(b"")
    write_json_atomic(run / "train_results.json", {"method": "standard"})
    assert finished_train(run, dataclasses.replace(cfg, device="cpu", num_threads=1)) == {"method": "standard"}
    with pytest.raises(SettingsMismatchError, match=r"--val-size recorded 64, now 1000.*--fresh") as e:
        finished_train(run, dataclasses.replace(cfg, val_size=1000))
    assert [d.flag for d in e.value.differences] == ["--val-size"]


# -- locks -----------------------------------------------------------------------------------------

_HOLDER = ("import sys, time\nfrom abnn.runs import run_lock\nwith run_lock(sys.argv[1]):\n"
           "    print('held', flush=True)\n    time.sleep(120)\n")


def test_second_writer_is_refused_while_the_first_runs_and_a_stale_lock_is_taken_over(tmp_path, fake_data_root,
                                                                                      capsys):
    run = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        argv = ["train", "--out", run, "--epochs", "1", *TINY, "--data-root", fake_data_root]
        code, _, err = _run(argv, capsys)
        assert code == 2 and f"in use by process {holder.pid}" in _one_line(err)
        assert not (run / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)   # no clean-up: its lock file stays, stale
        holder.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid
    assert _run(argv, capsys)[0] == 0
    assert (run / "model.pt").is_file() and not (run / LOCK_NAME).exists()


def test_a_waiting_writer_takes_the_lock_once_its_holder_ends(tmp_path):
    """Study stages that share a run folder take turns (run_lock's wait) instead of failing."""
    folder = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.replace("120", "1.5"), str(folder)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(RunLockedError):
            with run_lock(folder, wait=0.2):
                pass
        with run_lock(folder, wait=60):
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_on_errors_and_interrupts_and_reentrant(tmp_path):
    folder = tmp_path / "f"
    for exc in (AbnnError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with run_lock(folder):
                (folder / "x").write_text("kept")   # so the folder is not removed as empty
                assert (folder / LOCK_NAME).is_file()
                with run_lock(folder):               # the same process may nest
                    pass
                assert (folder / LOCK_NAME).is_file()
                raise exc
        assert not (folder / LOCK_NAME).exists()
    # a lock whose PID was reused by a newer process (another start time) is stale
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": -1}))
    with run_lock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["start"] != -1
    # a lock from another host cannot be checked: held
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match="process 1 on elsewhere"):
        with run_lock(folder):
            pass


# -- write failures --------------------------------------------------------------------------------

@pytest.fixture
def blocked(tmp_path) -> Path:
    """A path no one can create, root included: it lies under a regular file."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


def test_unwritable_output_is_refused_before_training(blocked, fake_data_root, capsys, monkeypatch):
    import abnn.training.trainer as trainer

    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the write check"))
    for cmd in (["train"], ["pretrain-substitute"]):
        code, _, err = _run([*cmd, "--out", blocked, "--epochs", "1", *TINY, "--data-root", fake_data_root], capsys)
        assert code == 2 and f"cannot write to {blocked}" in _one_line(err)


def test_unwritable_output_is_refused_before_any_attack(blocked, tmp_path, fake_data_root, capsys, monkeypatch):
    from abnn.attacks.base import Attack

    run = tmp_path / "run"
    assert _run(["train", "--out", run, "--epochs", "1", *TINY, "--data-root", fake_data_root], capsys)[0] == 0
    monkeypatch.setattr(Attack, "__call__", lambda *a, **k: pytest.fail("an attack ran before the write check"))
    for extra in (["--out", blocked / "eval.json"], ["--suite", "quick", "--out", blocked]):
        code, _, err = _run(["evaluate", run, "--n-eval", "4", *extra, "--data-root", fake_data_root], capsys)
        assert code == 2 and "cannot write to" in _one_line(err)


def test_unwritable_reproduce_output_is_refused_at_once(blocked):
    from abnn.reproduce import get_preset, run_table1

    with pytest.raises(WriteError, match="cannot write to"):
        run_table1(get_preset("smoke"), blocked)


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root (the file-in-the-way test covers it)")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="cannot write to"):
            ensure_writable(ro)
    finally:
        ro.chmod(0o700)


def _enospc_after_some_bytes(obj, f, *args, **kwargs):
    f.write(b"partial checkpoint bytes")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"w": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", _enospc_after_some_bytes)
    with pytest.raises(WriteError, match="No space left on device") as e:
        save_atomic({"w": torch.zeros(3)}, path)
    assert len(str(e.value).splitlines()) == 1
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError):
        write_json_atomic(tmp_path / "r.json", {"a": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "r.json"]


def test_full_disk_during_training_is_one_line_and_the_last_checkpoint_stays(tmp_path, fake_data_root, capsys,
                                                                            monkeypatch):
    import abnn.models.io as io

    run = tmp_path / "r"
    real_save, calls = torch.save, []

    def fail_second(obj, f, *a, **k):
        calls.append(1)
        return _enospc_after_some_bytes(obj, f) if len(calls) == 2 else real_save(obj, f, *a, **k)

    monkeypatch.setattr(io.torch, "save", fail_second)
    code, _, err = _run(["train", "--out", run, "--epochs", "1", "--checkpoint-every", "1", "--max-steps", "3", *TINY,
                         "--data-root", fake_data_root], capsys)
    assert code == 2 and "checkpoint.pt" in _one_line(err) and "No space left" in err
    monkeypatch.undo()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (run / "model.pt").exists() and not list(run.glob("*.tmp")) and not (run / LOCK_NAME).exists()


# -- divergence ------------------------------------------------------------------------------------

def test_nan_loss_stops_the_run_with_the_last_good_checkpoint_and_strict_metrics(tmp_path, fake_data_root, capsys,
                                                                                monkeypatch):
    import abnn.training.trainer as trainer
    from abnn.training.methods import clean_loss

    calls = []

    def nan_at_step_6(cfg):
        def loss(model, x, y):
            calls.append(1)
            value, logits = clean_loss(model, x, y)
            return (value * float("nan") if len(calls) == 6 else value), logits
        return loss

    monkeypatch.setattr(trainer, "batch_loss_for", nan_at_step_6)
    run = tmp_path / "r"   # 64 images / 16 = 4 steps per epoch: epoch 1 finishes, step 6 is in epoch 2
    code, _, err = _run(["train", "--out", run, "--epochs", "3", "--train-size", "64", "--checkpoint-every", "5", *TINY,
                         "--data-root", fake_data_root], capsys)
    line = _one_line(err)
    assert code == 2 and "non-finite at step 6 (epoch 2)" in line and "step 5" in line
    assert not (run / "model.pt").exists() and not (run / "train_results.json").exists()
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 5 and all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())
    records = _strict_lines(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1] and records[0]["val_acc"] is None


def test_strict_json_has_null_for_non_finite_values(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(2.5)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None], "c": 2.5}
    assert strict_json({"p": tmp_path}) == {"p": str(tmp_path)}


# -- ABNN input check ------------------------------------------------------------------------------

def test_abnn_refuses_input_that_is_not_pixels(tiny_abnn):
    model = tiny_abnn.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
        for bad, hint in ((x * 255, "divide 0-255 images by 255"), (x - 0.5, r"got values in \[-0.4"), (x.clone().fill_(float("nan")), "nan")):
            with pytest.raises(InputRangeError, match=hint):
                model(bad)
        assert isinstance(InputRangeError("x"), ValueError)
        model.check_input = False
        model(x * 255)   # the switch turns the check off


# -- one-line errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--width", "0"], "--width must be a finite number > 0, got 0.0"),
    (["--threads", "-2"], "--threads must be an integer >= 1, got -2"),
    (["--arch", "foo"], "unknown --arch 'foo'"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--momentum", "-1"], "--momentum must be a finite number >= 0"),
    (["--at-steps", "0"], "--at-steps must be an integer >= 1"),
    (["--val-size", "-5"], "--val-size must be an integer >= 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--substitute-width", "0", "--method", "abnn", "--substitute", "random"], "--substitute-width must be"),
])
def test_bad_training_flags_are_one_line(flags, message, tmp_path, fake_data_root, capsys):
    code, _, err = _run(["train", "--out", tmp_path / "r", "--epochs", "1", *TINY, "--data-root", fake_data_root,
                         *flags], capsys)
    assert code == 2 and message in _one_line(err) and not (tmp_path / "r").exists()


def test_corrupt_npz_is_one_line(tmp_path, fake_data_root, capsys):
    npz = fake_data_root / "cifar10.npz"
    npz.write_bytes(npz.read_bytes()[:2000])
    code, _, err = _run(["train", "--out", tmp_path / "r", "--epochs", "1", *TINY, "--data-root", fake_data_root],
                        capsys)
    assert code == 2 and "cannot read" in _one_line(err) and "cifar10.npz" in err


# -- README ----------------------------------------------------------------------------------------

def test_readme_api_snippet_runs_as_written(tmp_path, fake_data_root, monkeypatch):
    """The README's Python snippet, executed verbatim in a folder with tiny stand-in runs at the
    step-by-step's widths (untrained weights: only that it runs is checked)."""
    from abnn.runs import build_model_from_config

    text = (REPO / "README.md").read_text()
    snippet = re.search(r"## Python API\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ABNN_DATA_ROOT", str(fake_data_root))
    sub = TrainConfig(dataset="tinyimagenet32", arch="vgg19_bn", width=0.25)
    build = build_model_from_config(sub)
    sub.save(Path("runs/substitute/config.json"))
    torch.save(build.state_dict(), "runs/substitute/model.pt")
    abnn_cfg = TrainConfig(method="abnn", width=0.25, substitute="runs/substitute", substitute_width=0.25)
    abnn_cfg.save(Path("runs/abnn/config.json"))
    torch.save(build_model_from_config(abnn_cfg).state_dict(), "runs/abnn/model.pt")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["logits"].shape == (8, 10) and scope["x_adv"].shape == scope["x"].shape
    assert 0.0 <= scope["robust"] <= 1.0
