"""A short self-test of the CUDA code paths (``scripts/gpu-check.sh``).

    python -m abnn.gpucheck OUT_DIR            # on a CUDA machine
    python -m abnn.gpucheck OUT_DIR --dry-run  # the same checks on the CPU, tiny

Each check runs on its own, is recorded as passed, failed (with its error) or skipped (with the
reason) in ``OUT_DIR/gpu_check.json``, and never stops the others.  The checks: bf16 autocast
training steps, fp16 training steps with the gradient scaler, ``torch.compile`` of the model,
channels-last training, the on-device data loader against the host one, a one-process NCCL
process group with an all-reduce, and a short measured training throughput (to compare with the
assumption of ``abnn reproduce table1 --estimate``).  ``--dry-run`` runs them on the CPU with
tiny models: bf16 autocast on the CPU, gloo instead of NCCL, compile skipped (it needs minutes
of C++ compilation on a CPU), fp16 autocast on the CPU without a scaler (the scaler is CUDA's).
Exit status 1 when any check failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .files import write_json_atomic


@dataclass
class CheckResult:
    """One check: ``status`` passed | failed | skipped, with the error or reason and details."""

    name: str
    status: str
    seconds: float
    error: str | None = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckEnv:
    """Where and at what size the checks run."""

    device: torch.device
    width: float
    batch_size: int
    steps: int
    dry_run: bool


class Skip(Exception):
    """A check that does not apply here (its message says why)."""


def _env(dry_run: bool) -> CheckEnv:
    if dry_run:
        return CheckEnv(torch.device("cpu"), width=1 / 16, batch_size=8, steps=2, dry_run=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpucheck: CUDA is not available here; run it on a GPU machine, or pass --dry-run")
    return CheckEnv(torch.device("cuda"), width=1.0, batch_size=128, steps=20, dry_run=False)


def _model(env: CheckEnv, method: str = "standard") -> torch.nn.Module:
    from .benchmark import build_image_model

    torch.manual_seed(0)
    return build_image_model(method, env.width, env.width, "flatten", env.device).train()


def _batch(env: CheckEnv) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(env.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (env.batch_size,), generator=g)
    return x.to(env.device), y.to(env.device)


def _train_steps(env: CheckEnv, model: torch.nn.Module, *, amp: torch.dtype | None, channels_last: bool = False,
                 method: str = "standard", steps: int | None = None) -> dict:
    """A few training steps through the loop's TrainStep; the losses must stay finite."""
    from .config import TrainConfig
    from .training import TrainStep, batch_loss_for

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    step = TrainStep(model, batch_loss_for(TrainConfig(method=method, at_steps=2)), opt, amp_dtype=amp,
                     channels_last=channels_last, device_type=env.device.type)
    x, y = _batch(env)
    losses, dtypes = [], set()
    for _ in range(steps or 3):
        loss, logits = step(x, y)
        losses.append(float(loss))
        dtypes.add(str(logits.dtype).replace("torch.", ""))
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"non-finite training loss: {losses}")
    return {"losses": losses, "logits_dtypes": sorted(dtypes), "grad_scaler": step.scaler.is_enabled(),
            "scale": step.scaler.get_scale() if step.scaler.is_enabled() else None}


def check_amp_bf16(env: CheckEnv) -> dict:
    """bf16 autocast training steps, no defense and ABNN (the substitute inside the graph)."""
    if env.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise AssertionError("this GPU does not support bfloat16")
    out = {m: _train_steps(env, _model(env, m), amp=torch.bfloat16, method=m) for m in ("standard", "abnn")}
    if any(r["logits_dtypes"] != ["bfloat16"] for r in out.values()):
        raise AssertionError(f"autocast did not produce bf16 logits: {out}")
    return out


def check_fp16_grad_scaler(env: CheckEnv) -> dict:
    """fp16 autocast training steps with the gradient scaler (CUDA) and PGD-AT's attack under it."""
    out = {m: _train_steps(env, _model(env), amp=torch.float16, method=m) for m in ("standard", "pgd-at")}
    if env.device.type == "cuda" and not all(r["grad_scaler"] for r in out.values()):
        raise AssertionError("the GradScaler was not enabled for fp16 on CUDA")
    return out


def check_compile(env: CheckEnv) -> dict:
    """torch.compile of the model: forward and backward, outputs close to the eager model's."""
    if env.dry_run:
        raise Skip("dry run: torch.compile on the CPU needs minutes of C++ compilation; run on the GPU machine")
    model = _model(env)
    compiled = torch.compile(model)
    x, y = _batch(env)
    t0 = time.perf_counter()
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    first = time.perf_counter() - t0
    with torch.no_grad():
        model.eval()
        diff = _relative_diff(compiled(x), model(x))
    if not diff < 1e-2:
        raise AssertionError(f"compiled and eager logits differ by {diff:.3g} of their largest value")
    return {"first_step_seconds": first, "relative_logit_diff": diff}


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest value of ``b`` (kernels differ in
    summation order, and on GPUs float32 convolutions use TF32 by default)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_channels_last(env: CheckEnv) -> dict:
    """channels-last training steps (bf16), and eval logits close to the default layout's."""
    model = _model(env)
    x, _ = _batch(env)
    with torch.no_grad():
        ref = model.eval()(x)
        cl = model.to(memory_format=torch.channels_last)
        diff = _relative_diff(cl(x.contiguous(memory_format=torch.channels_last)), ref)
    if not diff < 1e-2:
        raise AssertionError(f"channels-last and default-layout logits differ by {diff:.3g} of their largest value")
    return {"relative_logit_diff": diff, "train": _train_steps(env, cl.train(), amp=torch.bfloat16, channels_last=True)}


def check_data_on_device(env: CheckEnv) -> dict:
    """The on-device loader (uint8 data on the device, crop/flip there) yields the host path's batches."""
    from .data import BatchLoader
    from .data.datasets import ImageData

    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (64,), generator=g), 10, "random")
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=1, device=env.device)
    pairs = list(zip(BatchLoader(data, 16, **kw), BatchLoader(data, 16, on_device=True, **kw), strict=True))
    same = all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in pairs)
    if not same:
        raise AssertionError("the on-device loader's batches differ from the host loader's")
    return {"batches_compared": len(pairs)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_process_group(env: CheckEnv) -> dict:
    """A one-process process group (NCCL on CUDA, gloo on the dry run) and an all-reduce."""
    import torch.distributed as dist

    backend = "nccl" if env.device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        raise AssertionError(f"torch.distributed backend {backend} is not available in this build")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        t = torch.full((4,), 3.0, device=env.device)
        dist.all_reduce(t)
        if not torch.equal(t.cpu(), torch.full((4,), 3.0)):
            raise AssertionError(f"all_reduce over one process changed the tensor: {t.tolist()}")
        return {"backend": backend, "world_size": dist.get_world_size()}
    finally:
        dist.destroy_process_group()


def check_throughput(env: CheckEnv) -> dict:
    """Measured bf16 channels-last training images/s of the no-defense model, and the sustained
    TFLOP/s it implies (counted FLOPs per image-step), beside the estimate's assumption."""
    from .reproduce.estimate import H100_CLASS, pass_flops

    model = _model(env).to(memory_format=torch.channels_last)
    pf = pass_flops(model)
    model.train()
    _train_steps(env, model, amp=torch.bfloat16, channels_last=True, steps=2)  # warm-up
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _train_steps(env, model, amp=torch.bfloat16, channels_last=True, steps=env.steps)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images_per_s = env.steps * env.batch_size / seconds
    tflops = images_per_s * (pf.forward + pf.train_backward) / 1e12
    return {"width": env.width, "batch_size": env.batch_size, "steps": env.steps, "images_per_s": images_per_s,
            "sustained_tflops": tflops, "assumed_train_tflops": H100_CLASS.train_flops_per_s / 1e12}


CHECKS: dict[str, Callable[[CheckEnv], dict]] = {
    "amp_bf16_train": check_amp_bf16,
    "fp16_grad_scaler": check_fp16_grad_scaler,
    "compile": check_compile,
    "channels_last": check_channels_last,
    "data_on_device": check_data_on_device,
    "process_group": check_process_group,
    "throughput": check_throughput,
}


def run_check(name: str, fn: Callable[[CheckEnv], dict], env: CheckEnv) -> CheckResult:
    t0 = time.perf_counter()
    try:
        details = fn(env)
    except Skip as exc:
        return CheckResult(name, "skipped", time.perf_counter() - t0, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the other checks still run
        tb = traceback.format_exc(limit=4)
        return CheckResult(name, "failed", time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}",
                           details={"traceback": tb})
    return CheckResult(name, "passed", time.perf_counter() - t0, details=details)


def run_checks(out_dir: str | Path, *, dry_run: bool = False) -> dict:
    """Run every check and write ``OUT_DIR/gpu_check.json``; returns what it wrote."""
    env = _env(dry_run)
    results = []
    for name, fn in CHECKS.items():
        res = run_check(name, fn, env)
        print(f"[gpu-check] {name}: {res.status}" + (f" ({res.error})" if res.error else "")
              + f" [{res.seconds:.1f}s]", flush=True)
        results.append(res)
    report = {
        "dry_run": dry_run, "device": str(env.device),
        "device_name": torch.cuda.get_device_name(0) if env.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "passed": sum(r.status == "passed" for r in results), "failed": sum(r.status == "failed" for r in results),
        "skipped": sum(r.status == "skipped" for r in results), "checks": [asdict(r) for r in results],
    }
    write_json_atomic(Path(out_dir) / "gpu_check.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abnn.gpucheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU, tiny (no GPU needed)")
    a = parser.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    report = run_checks(a.out, dry_run=a.dry_run)
    print(json.dumps({k: report[k] for k in ("device", "passed", "failed", "skipped")}))
    return 1 if report["failed"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
