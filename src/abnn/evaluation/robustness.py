"""Clean and robust accuracy (paper s. 3.1: white-box attacks on the entire framework).

Robust accuracy counts a sample as robust only if it is classified correctly both clean and
under the attack (the RobustBench convention), so it can never exceed clean accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks import PGD, ROA, Attack
from ..config import write_json_atomic
from ..data import BatchLoader, ImageData, load_dataset
from ..errors import AbnnError
from ..runs import load_run


def _pgd(model: nn.Module, **kw) -> Attack:
    return PGD(model, **{"eps": 8 / 255, "alpha": 2 / 255, "steps": 5, "random_start": True, **kw})


#: attack name -> builder(model, **options); the defaults are METHOD.md s. 4 for images.
ATTACK_BUILDERS: dict[str, Callable[..., Attack]] = {"pgd": _pgd, "roa": ROA}


def build_attack(name: str, model: nn.Module, **options) -> Attack:
    if name not in ATTACK_BUILDERS:
        raise AbnnError(f"unknown attack {name!r}; choose from {', '.join(sorted(ATTACK_BUILDERS))}")
    return ATTACK_BUILDERS[name](model, **options)


def evaluate(model: nn.Module, data: ImageData, attacks: dict[str, Attack], *, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Clean accuracy and, per attack, robust accuracy over ``data``.  Returns a dict with
    ``clean_acc``, ``robust_acc`` {name: acc}, ``n_eval``, ``attacks`` {name: repr}, ``seconds``."""
    model.eval()
    device = torch.device(device)
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = {name: torch.zeros((), dtype=torch.long, device=device) for name in attacks}
    seconds = {name: 0.0 for name in attacks}
    loader = BatchLoader(data, batch_size, device=device)
    for x, y in tqdm(loader, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        clean += ok.sum()
        for name, atk in attacks.items():
            t0 = time.perf_counter()
            x_adv = atk(x, y)
            with torch.no_grad():
                robust[name] += (ok & (model(x_adv).argmax(1) == y)).sum()
            seconds[name] += time.perf_counter() - t0
    n = len(data)
    return {
        "n_eval": n,
        "clean_acc": clean.item() / n,
        "robust_acc": {k: v.item() / n for k, v in robust.items()},
        "attacks": {k: repr(a) for k, a in attacks.items()},
        "attack_seconds": seconds,
    }


def evaluate_run(run_dir: str | Path, *, attacks: list[str], n_eval: int = 1000, batch_size: int = 256,
                 data_root: str | None = None, device: str = "cpu", seed: int = 0, progress: bool = True,
                 out: str | Path | None = None, attack_options: dict | None = None) -> dict:
    """Evaluate a finished run on the first ``n_eval`` test images and write ``eval.json``."""
    model, cfg = load_run(run_dir, device=device)
    data = load_dataset(cfg.dataset, "test", data_root or cfg.data_root).subset(n_eval)
    atks = {name: build_attack(name, model, seed=seed, **(attack_options or {}).get(name, {})) for name in attacks}
    t0 = time.perf_counter()
    res = evaluate(model, data, atks, batch_size=batch_size, device=device, progress=progress)
    res.update({"run": str(run_dir), "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch,
                "width": cfg.width, "seed": seed, "seconds": time.perf_counter() - t0})
    write_json_atomic(Path(out) if out else Path(run_dir) / "eval.json", res)
    return res
