"""``abnn bench train-cost``: measured time and memory of one training step per method.

One process, one fixed batch, every method's step timed in interleaved rounds (standard, ABNN,
PGD-AT, standard, ...), so background load affects all methods alike and the ratios stay fair.
Peak memory: CUDA's allocator peak on GPU; on CPU the peak resident set size sampled every
2 ms while the method's steps run, minus the resident size before them.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig, write_json_atomic
from .framework import ABNN
from .models import resnet18_cifar, vgg19_bn_substitute
from .training import PassCounter, attach_networks, batch_loss_for


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakRSS":
        self.base = _rss_bytes()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _build(method: str, width: float, substitute_width: float, encoder: str, device: torch.device) -> nn.Module:
    target = resnet18_cifar(10, width=width)
    if method != "abnn":
        return target.to(device)
    return ABNN(target, vgg19_bn_substitute(200, width=substitute_width), input_shape=(3, 32, 32),
                encoder=encoder).to(device)


def bench_train_cost(*, width: float = 1.0, substitute_width: float = 1.0, batch_size: int = 128,
                     steps: int = 3, warmup: int = 1, at_steps: int = 5, encoder: str = "flatten",
                     methods: tuple[str, ...] = ("standard", "abnn", "pgd-at"), device: str = "cpu",
                     seed: int = 0, out: str | Path | None = None, progress: bool = True) -> dict:
    """Milliseconds per training step (median over ``steps`` interleaved rounds), counted N per
    step, and peak memory for each method at the given sizes; ratios ABNN/standard and PGD-AT/ABNN."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    setups = {}
    for m in methods:
        model = _build(m, width, substitute_width, encoder, dev).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                              weight_decay=5e-4)
        setups[m] = (model, opt, batch_loss_for(TrainConfig(method=m, at_steps=at_steps)),
                     attach_networks(PassCounter(), model))

    def step(m: str) -> float:
        model, opt, loss_fn, counter = setups[m]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with counter.active():
            loss, _ = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {m: [] for m in methods}
    peak: dict[str, int] = {}
    for m in methods:  # warm-up, and the memory peak of one step per method
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with _PeakRSS() as rss:
            for _ in range(max(warmup, 1)):
                step(m)
        peak[m] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss.peak - rss.base
        setups[m][3].load_state_dict({})  # count only the timed steps
    for r in range(steps):
        for m in methods:
            times[m].append(step(m))
            if progress:
                print(f"round {r + 1}/{steps} {m}: {1000 * times[m][-1]:.0f} ms", flush=True)

    res: dict = {
        "benchmark": "train-cost", "device": str(dev), "threads": torch.get_num_threads(), "batch_size": batch_size,
        "target": f"resnet18_cifar width {width}", "encoder": encoder, "at_steps": at_steps,
        "substitute": f"vgg19_bn width {substitute_width}", "rounds": steps, "warmup": warmup,
        "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "cpu_peak_rss_increase",
        "methods": {},
    }
    for m in methods:
        res["methods"][m] = {
            "ms_per_step_median": 1000 * statistics.median(times[m]),
            "ms_per_step_all": [1000 * t for t in times[m]],
            "N_per_step_counted": setups[m][3].per_step(),
            "peak_memory_mb": peak[m] / 2**20,
        }
    ms = {m: v["ms_per_step_median"] for m, v in res["methods"].items()}
    if "abnn" in ms and "standard" in ms:
        res["ratio_abnn_over_standard"] = ms["abnn"] / ms["standard"]
    if "abnn" in ms and "pgd-at" in ms:
        res["ratio_pgdat_over_abnn"] = ms["pgd-at"] / ms["abnn"]
    if out:
        write_json_atomic(Path(out), res)
    return res

