"""`scripts/gpu-check.sh --dry-run`: the CUDA self-test's checks and the `gpu` preset on the CPU, tiny."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path, fake_data_root):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO / "src"), "ABNN_DATA_ROOT": str(fake_data_root)}
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"amp_bf16_train": "passed", "fp16_grad_scaler": "passed", "compile": "skipped",
                      "channels_last": "passed", "data_on_device": "passed", "process_group": "passed",
                      "throughput": "passed"}
    by = {c["name"]: c for c in report["checks"]}
    assert by["process_group"]["details"]["backend"] == "gloo" and report["dry_run"] is True
    assert by["amp_bf16_train"]["details"]["abnn"]["logits_dtypes"] == ["bfloat16"]
    results = json.loads((out / "table1" / "results.json").read_text())
    assert [r["method"] for r in results["records"]] == ["standard", "pgd-at", "abnn", "fast-at"]
    assert "needs_cuda=false" in results["preset"]["overrides"] and results["preset"]["amp"] == "bf16"
    assert all((out / "table1" / f).is_file() for f in ("report.md", "accuracy.png", "training_cost.png"))
    report_md = (out / "table1" / "report.md").read_text()
    assert "`needs_cuda=false`" in report_md and "| Fast-AT |" in report_md and "Training precision: bf16" in report_md


def test_gpu_check_records_a_failing_check_and_goes_on(tmp_path, monkeypatch):
    from abnn import gpucheck

    def broken(env):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpucheck, "CHECKS", {"broken": broken, "data_on_device": gpucheck.check_data_on_device})
    assert gpucheck.main([str(tmp_path), "--dry-run"]) == 1
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert [(c["name"], c["status"]) for c in checks] == [("broken", "failed"), ("data_on_device", "passed")]
    assert checks[0]["error"] == "RuntimeError: boom"
