"""Issue 21: every input gets one meaning or one clear line (`abnn: error: ...`, exit 2, no
traceback), where the user meets it: the command line."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch

from abnn.cli import build_parser, main
from abnn.errors import CheckpointError, InputRangeError

TINY = ["--width", "0.0625", "--batch-size", "16", "--val-size", "0", "--no-progress", "--threads", "1"]


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("abnn: error: ")
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A target cut short by --max-steps and a 200-class substitute, on fake data."""
    from conftest import write_fake_npz

    tmp = tmp_path_factory.mktemp("runs")
    root = write_fake_npz(tmp / "data")
    common = ["--data-root", str(root), "--no-progress", "--threads", "1", "--width", "0.0625", "--val-size", "0"]
    assert main(["train", "--out", str(tmp / "target"), "--epochs", "2", "--batch-size", "16", "--max-steps", "2",
                 *common]) == 0
    assert main(["pretrain-substitute", "--out", str(tmp / "sub"), "--epochs", "1", "--batch-size", "32",
                 "--max-steps", "1", *common]) == 0
    return {"root": root, "target": tmp / "target", "sub": tmp / "sub"}


def _evaluate(runs, capsys, *args):
    return _run(["evaluate", runs["target"], "--n-eval", 4, "--batch-size", 4, "--data-root", runs["root"],
                 "--no-progress", *args], capsys)


# ------------------------------------------------------------------------- silent cases


@pytest.mark.parametrize("word, value", [("no", False), ("off", False), ("0", False), ("yes", True), ("ON", True)])
def test_boolean_attack_options_are_parsed_and_recorded(runs, capsys, word, value):
    code, _, err = _evaluate(runs, capsys, "--attack", f"pgd:steps=1,random_start={word},first_fooling={word}")
    assert code == 0, err
    opts = next(iter(json.loads((runs["target"] / "eval.json").read_text())["attacks"].values()))["options"]
    assert opts["random_start"] is value and opts["first_fooling"] is value


def test_a_non_boolean_for_a_boolean_option_is_refused(runs, capsys):
    _one_line(*_evaluate(runs, capsys, "--attack", "pgd:random_start=maybe")[::2], "random_start", "true/false")


def test_no_worst_case_without_an_attack_at_the_evaluated_eps(runs, capsys):
    code, out, err = _evaluate(runs, capsys, "--attack", "pgd:eps=8,steps=1", "--eps", "4")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["worst_case"] is None
    worst = json.loads((runs["target"] / "eval.json").read_text())["worst_case"]
    assert worst["robust_acc"] is None and "no L-inf attack ran at the evaluated eps 4/255" in worst["note"]
    assert "8/255" in err


def test_max_steps_run_is_evaluated_with_a_note(runs, capsys):
    res = json.loads((runs["target"] / "train_results.json").read_text())
    assert (res["steps"], res["planned_steps"], res["max_steps"], res["complete"]) == (2, 16, 2, False)
    code, _, err = _evaluate(runs, capsys, "--attack", "pgd:steps=1")
    assert code == 0 and "cut short by --max-steps 2: 2 of its 16 planned steps" in err
    ev = json.loads((runs["target"] / "eval.json").read_text())
    assert ev["training_cut_short"] == {"steps": 2, "planned_steps": 16, "max_steps": 2}


def test_transfer_source_of_other_classes_is_refused(runs, capsys):
    code, _, err = _evaluate(runs, capsys, "--attack", "transfer:source=sub,steps=1", "--source", f"sub={runs['sub']}")
    _one_line(code, err, "'sub' outputs 200 classes and the evaluated model 10")


def test_another_n_eval_does_not_replace_progress(runs, capsys, monkeypatch, tmp_path):
    import abnn.evaluation.runner as runner

    real, calls = runner._attack_dataset, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_attack_dataset", interrupt_second)
    out = ["--out", tmp_path / "e" / "eval.json", "--attack", "pgd:steps=1", "--attack", "pgd:steps=2"]
    assert _evaluate(runs, capsys, *out)[0] == 130
    monkeypatch.setattr(runner, "_attack_dataset", real)
    progress = tmp_path / "e" / "attack-progress.pt"
    assert progress.is_file()
    code, _, err = _run(["evaluate", runs["target"], "--n-eval", 3, "--batch-size", 4, "--data-root", runs["root"],
                         "--no-progress", *out], capsys)
    _one_line(code, err, "--n-eval", "(4 then, 3 now)", "--fresh")
    assert progress.is_file()
    code, _, err = _run(["evaluate", runs["target"], "--n-eval", 3, "--batch-size", 4, "--data-root", runs["root"],
                         "--no-progress", "--fresh", *out], capsys)
    assert code == 0, err


def test_examples_are_remade_for_other_weights_and_under_force(runs, tmp_path, capsys):
    import shutil

    from abnn.reproduce.presets import get_preset
    from abnn.reproduce.table1 import make_examples

    out = tmp_path / "t1"
    shutil.copytree(runs["target"], out / "standard")
    preset = get_preset("smoke").__class__(name="t", description="", methods=("standard",), n_examples=2,
                                           roa_stride=16)
    path = make_examples(out, preset, str(runs["root"]), "cpu")
    first = torch.load(path, weights_only=True)
    assert make_examples(out, preset, str(runs["root"]), "cpu") == path
    assert torch.equal(torch.load(path, weights_only=True)["x_pgd"], first["x_pgd"])  # same model: reused
    mtime = path.stat().st_mtime_ns
    make_examples(out, preset, str(runs["root"]), "cpu", force=True)
    assert path.stat().st_mtime_ns != mtime
    state = torch.load(out / "standard" / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, out / "standard" / "model.pt")
    make_examples(out, preset, str(runs["root"]), "cpu")
    assert torch.load(path, weights_only=True)["made_with"]["model_digest"] != first["made_with"]["model_digest"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    from abnn.files import write_json_atomic
    from abnn.models.io import save_atomic

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        save_atomic({"w": torch.zeros(1)}, tmp_path / "w.pt")
    finally:
        os.umask(old)
    for name in ("a.json", "w.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("table", ["frontier", "substitute-study"])
def test_missing_table1_out_is_one_line(table, tmp_path, capsys):
    code, _, err = _run(["reproduce", table, "--preset", "smoke", "--table1-out", tmp_path / "typo",
                         "--out", tmp_path / "o"], capsys)
    _one_line(code, err, "--table1-out", "no such folder")
    assert not (tmp_path / "o").exists()


def test_clamped_n_eval_is_said(fake_data_root, capsys):
    from abnn.reproduce.presets import apply_overrides, get_preset
    from abnn.reproduce.table1 import note_clamped

    note_clamped(apply_overrides(get_preset("smoke"), ["n_eval=20000"]), str(fake_data_root))
    assert "n_eval 20000 is more than the 32 test samples of cifar10; all 32 are used" in capsys.readouterr().out


# -------------------------------------------------------------------------- loud cases


@pytest.mark.parametrize("pair, needle", [
    ("width=1/0", "--set width=1/0: expected float"),
    ("methods=", "--set methods=: give one or more"),
    ("methods=standard,magic", "give one or more of standard"),
    ("dataset=tinyimagenet32", "CIFAR-10 only"),
    ("eval_batch_size=0", "--set eval_batch_size=0: expected an integer >= 1"),
    ("roa_stride=0", "roa_stride"),
    ("n_examples=-1", "n_examples"),
    ("n_eval=0", "n_eval"),
    ("needs_cuda=maybe", "--set needs_cuda must be a boolean"),
    ("extra=1", "KEY one of"),
])
def test_bad_set_values_are_one_line_before_any_work(pair, needle, tmp_path, capsys):
    code, _, err = _run(["reproduce", "table1", "--preset", "smoke", "--set", pair, "--out", tmp_path / "o"], capsys)
    _one_line(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_pixel_budgets_mean_one_thing_everywhere(capsys, tmp_path):
    from abnn.reproduce.presets import apply_overrides, get_video_preset

    assert apply_overrides(get_video_preset("smoke"), ["eps=2"]).eps == 2 / 255
    assert apply_overrides(get_video_preset("smoke"), ["eps=2/255"]).eps == 2 / 255
    code, _, err = _run(["reproduce", "video", "--preset", "smoke", "--set", "eps=0.5", "--out", tmp_path], capsys)
    _one_line(code, err, "ambiguous")
    parse = build_parser().parse_args
    for text in ("10", "10/255"):
        assert parse(["train", "--out", "x", "--fast-at-alpha", text]).fast_at_alpha == 10 / 255
    with pytest.raises(SystemExit) as e:
        parse(["train", "--out", "x", "--fast-at-alpha", "0.5"])
    assert e.value.code == 2 and "ambiguous" in capsys.readouterr().err


def _resnet20_file(tmp_path):
    from abnn.models import resnet20_reference

    torch.save(resnet20_reference().state_dict(), tmp_path / "r20.pt")
    return tmp_path / "r20.pt"


@pytest.mark.parametrize("taps, needle", [
    (None, "cannot return its features itself"),
    ("layer1.0,layer1,layer9,layer3.0,layer3", "no module named 'layer9'"),
    ("layer1,layer2", "2 substitute taps for 5 target stages"),
])
def test_substitute_taps_are_one_line(taps, needle, fake_data_root, tmp_path, capsys):
    args = ["train", "--method", "abnn", "--substitute", _resnet20_file(tmp_path), "--substitute-arch", "resnet20",
            "--allow-in-domain-substitute", "--out", tmp_path / "r", "--epochs", "1", "--data-root", fake_data_root,
            *TINY, *(["--substitute-taps", taps] if taps else [])]
    _one_line(*_run(args, capsys)[::2], needle, "layer1.0")


def test_random_bytes_are_not_a_checkpoint(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(runs["target"], run)
    (run / "model.pt").write_bytes(os.urandom(4096))
    code, _, err = _run(["evaluate", run, "--n-eval", 4, "--data-root", runs["root"]], capsys)
    _one_line(code, err, "is not a checkpoint")
    assert "code execution" not in err


def test_crafted_examples_file_is_one_line(tmp_path):
    from abnn.reports.table1 import load_examples

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        load_examples(tmp_path / "evil.pt")
    torch.save({"x": torch.rand(2, 3, 8, 8)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="not an examples file"):
        load_examples(tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_examples(tmp_path / "junk.pt")


def test_abnn_input_and_labels_get_one_clear_error(tiny_abnn):
    from abnn.attacks import build_attack

    model = tiny_abnn.eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputRangeError, match=r"x\.float\(\)"):
        model(x.double())
    with pytest.raises(InputRangeError, match=r"shape \(B, 3, 32, 32\).*\(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(InputRangeError, match="float tensor"):
        model((x * 255).to(torch.uint8))
    attack = build_attack("pgd", model, steps=1)
    for y, needle in ((torch.tensor([1, 12]), "label 12"), (torch.tensor([1.0, 2.0]), "integer labels"),
                      (torch.tensor([-1, 0]), "got -1")):
        with pytest.raises(InputRangeError, match=needle):
            attack(x, y)


def test_fp16_on_cpu_is_refused(fake_data_root, tmp_path, capsys):
    code, _, err = _run(["train", "--out", tmp_path / "r", "--amp", "fp16", "--epochs", "1",
                         "--data-root", fake_data_root, *TINY], capsys)
    _one_line(code, err, "--amp bf16")


def test_ctrl_c_writes_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    """SIGINT after step 3 of 8: a checkpoint of step 3, then --resume ends where an
    uninterrupted run ends (PGD-AT: its random starts test the RNG state)."""
    from conftest import write_fake_npz

    from abnn.config import TrainConfig
    from abnn.training import TrainStep, train

    root = write_fake_npz(tmp_path / "data", n_train=64)
    cfg = dict(method="pgd-at", at_steps=1, width=1 / 16, epochs=2, batch_size=16, val_size=0, data_root=str(root),
               device="cpu", num_threads=1)
    real, steps = TrainStep.__call__, []

    def step_then_interrupt(self, x, y):
        out = real(self, x, y)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; deferred to the step boundary
        return out

    monkeypatch.setattr(TrainStep, "__call__", step_then_interrupt)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # a known start: Python's own handler
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg), tmp_path / "cut", progress=False)
    finally:
        restored = signal.signal(signal.SIGINT, outer)
    monkeypatch.setattr(TrainStep, "__call__", real)
    assert restored is signal.default_int_handler  # the loop put back the handler it found
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"], ck["epoch_done"]) == (3, 0, 3, False)
    train(TrainConfig(**cfg), tmp_path / "cut", resume=True, progress=False)
    train(TrainConfig(**cfg), tmp_path / "ref", progress=False)
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

