"""One training loop for every method (paper s. 2.2 and 3.3).

A method is only "how a batch becomes a loss": ``standard`` and ``abnn`` train on clean data
(ABNN differs in the model: a target with adaptive BN and a frozen substitute), ``pgd-at``
trains on PGD examples made on the fly (Madry et al.).  The loop, progress bars, per-epoch
metrics (JSON lines), atomic checkpoints, resume and the counted cost are written once.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..attacks import PGD
from ..config import TrainConfig, write_json_atomic
from ..data import BatchLoader, load_dataset
from ..errors import AbnnError
from ..runs import build_model_from_config
from .checkpoint import load_checkpoint, save_atomic
from .cost import PassCounter, attach_networks

BatchLoss = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def clean_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Standard and ABNN training: cross-entropy on clean inputs."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def pgd_at_loss(eps: float, alpha: float, steps: int) -> BatchLoss:
    """PGD-AT: cross-entropy on L-inf PGD examples (random start) generated each step.  The
    attack runs with the model in eval mode (BN running statistics untouched by attack
    iterations, as in torchattacks); the training pass runs in train mode."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits

    return loss


def batch_loss_for(cfg: TrainConfig) -> BatchLoss:
    if cfg.method == "pgd-at":
        return pgd_at_loss(cfg.at_eps, cfg.at_alpha, cfg.at_steps)
    return clean_loss


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise AbnnError(f"bad device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AbnnError(f"device {spec} requested but CUDA is not available; use --device cpu")
    return dev


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int, device: torch.device) -> float:
    """Clean top-1 accuracy (model put in eval mode, previous mode restored)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(data, batch_size, device=device):
        correct += (model(x).argmax(1) == y).sum()
    model.train(was)
    return correct.item() / len(data)


def software_versions() -> dict:
    import torchvision

    return {"abnn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          max_steps: int | None = None) -> dict:
    """Train the run described by ``cfg`` into ``run_dir`` and return its results.

    Each epoch writes one line of ``metrics.jsonl`` and an atomic ``checkpoint.pt``; with
    ``resume`` an interrupted run continues from its last checkpoint.  At the end ``model.pt``
    (final weights) and ``train_results.json`` (counted cost N per step, seconds, accuracies)
    are written.  ``max_steps`` stops early (tests and benchmarks).
    """
    cfg.validate()
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    if run.exists() and (run / "config.json").is_file() and not resume:
        if (run / "model.pt").is_file() or ckpt_path.is_file():
            raise AbnnError(f"run folder {run} already holds a run; pass --resume to continue it or choose a new --out")
    if resume and (run / "config.json").is_file():
        saved = TrainConfig.load(run / "config.json")
        for key in ("method", "dataset", "arch", "width", "epochs", "batch_size", "seed", "train_size"):
            if getattr(saved, key) != getattr(cfg, key):
                raise AbnnError(f"--resume: {key}={getattr(cfg, key)!r} differs from the run's {getattr(saved, key)!r}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    opts = {k: True for k, on in (("include_jpeg", cfg.include_jpeg), ("full", cfg.full_cifar10)) if on}
    train_data = load_dataset(cfg.dataset, "train", cfg.data_root, **opts).subset(cfg.train_size)
    val_opts = {"full": True} if cfg.full_cifar10 else {}
    val_data = load_dataset(cfg.dataset, "test", cfg.data_root, **val_opts).subset(cfg.val_size) if cfg.val_size != 0 else None

    model = build_model_from_config(cfg).to(device)
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / "config.json")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = BatchLoader(train_data, cfg.batch_size, shuffle=True, augment=cfg.augment, drop_last=True,
                         seed=cfg.seed, device=device)
    if len(loader) == 0:
        raise AbnnError(f"{len(train_data)} training images give no full batch of {cfg.batch_size}; lower --batch-size")
    total_steps = cfg.epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    counter = attach_networks(PassCounter(), model)
    batch_loss = batch_loss_for(cfg)

    start_epoch, train_seconds = 0, 0.0
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        counter.load_state_dict(ck["cost"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        start_epoch, train_seconds = int(ck["epoch"]) + 1, float(ck["train_seconds"])
        _truncate_metrics(run, start_epoch)
        if progress:
            tqdm.write(f"resuming {run} after epoch {start_epoch}")

    step = start_epoch * len(loader)
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            with counter.active():
                loss, logits = batch_loss(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            step += 1
            if progress and i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            if max_steps is not None and step >= max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        val_acc = accuracy(model, val_data, 256, device) if val_data is not None else None
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / max(seen, 1),
                  "train_acc": correct.item() / max(seen, 1), "val_acc": val_acc, "lr": sched.get_last_lr()[0],
                  "epoch_seconds": epoch_seconds, "cost_N_per_step": counter.per_step()}
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if progress:
            tqdm.write(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
                       f"train_acc {record['train_acc']:.4f} val_acc {val_acc if val_acc is None else round(val_acc, 4)} "
                       f"({epoch_seconds:.1f}s, {counter.per_step():.1f}N/step)")
        save_atomic({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "cost": counter.state_dict(), "epoch": epoch, "step": step, "train_seconds": train_seconds,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
            "config": cfg.to_dict(), "version": __version__,
        }, ckpt_path)
        if max_steps is not None and step >= max_steps:
            break

    counter.detach()
    save_atomic(model.state_dict(), run / "model.pt")
    last = _last_metrics(run)
    results = {
        "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
        "epochs": cfg.epochs, "train_size": len(train_data), "batch_size": cfg.batch_size, "seed": cfg.seed,
        "final_val_acc": last.get("val_acc"), "val_size": len(val_data) if val_data is not None else 0,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(counter.steps, 1),
        "cost": counter.summary(), "cost_N_per_step": counter.per_step(),
        "device": str(device), "threads": torch.get_num_threads(), "versions": software_versions(),
    }
    if cfg.method == "abnn":
        results["substitute"] = {"source": cfg.substitute, "arch": cfg.substitute_arch, "width": cfg.substitute_width,
                                 "stats": cfg.substitute_stats, "encoder": cfg.encoder}
    write_json_atomic(run / "train_results.json", results)
    return results


def _last_metrics(run: Path) -> dict:
    try:
        lines = (run / "metrics.jsonl").read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except OSError:
        return {}



def _truncate_metrics(run: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint (a kill between the two writes)."""
    path = run / "metrics.jsonl"
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in keep))
