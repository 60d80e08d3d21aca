"""``abnn bench train-cost`` and ``abnn bench throughput``.

``train-cost``: measured time and memory of one training step per method.  One process, one
fixed batch, every method's step timed in interleaved rounds (standard, ABNN, PGD-AT, standard,
...), so background load affects all methods alike and the ratios stay fair.  Peak memory: CUDA's
allocator peak on GPU; on CPU the peak resident set size sampled every 2 ms while the method's
steps run, minus the resident size before them.

``throughput`` (:func:`bench_throughput`): training images/s per method (the training loop's own
:class:`~abnn.training.TrainStep`, with its mixed precision and memory format), inference
images/s, and attack throughput in PGD steps per second (batch x steps / seconds), optionally
against torchattacks' PGD on the same model and batch.  Also interleaved rounds; both wall-clock
and process CPU seconds are recorded (with one thread, CPU seconds are robust to other load).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

from .config import AMP_MODES, TrainConfig, write_json_atomic
from .framework import ABNN
from .models import resnet18_cifar, vgg19_bn_substitute
from .training import PassCounter, TrainStep, attach_networks, batch_loss_for, resolve_amp


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


def _child_step_memory(kind: str, kwargs: dict, threads: int) -> dict:
    """In a fresh process: build the models of ``kind``, run two training steps and return the
    process's peak resident memory (``ru_maxrss``) and its resident size before the first step.
    A fresh process per measurement: in one long process, memory freed by an earlier method stays
    mapped and hides the next method's peak."""
    import resource

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if kind == "image":
        model = build_image_model(kwargs["method"], kwargs["width"], kwargs["substitute_width"], kwargs["encoder"],
                       torch.device("cpu")).train()
        x = torch.rand(kwargs["batch_size"], 3, 32, 32)
        y = torch.randint(0, 10, (kwargs["batch_size"],))
        loss_fn = batch_loss_for(TrainConfig(method=kwargs["method"], at_steps=kwargs["at_steps"]))
    else:
        from .models import r3d18_substitute, resnext3d_101

        f = kwargs["frames"]
        model = ABNN(resnext3d_101(101), r3d18_substitute(400), input_shape=(3, f, 112, 112), encoder="pooled").train()
        x = torch.rand(kwargs["batch_size"], 3, f, 112, 112)
        y = torch.randint(0, 101, (kwargs["batch_size"],))
        loss_fn = batch_loss_for(TrainConfig(method="abnn"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    before = _rss_bytes()
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss, _ = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds.append(time.perf_counter() - t0)
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_step_bytes": before,
            "seconds_second_step": seconds[-1]}


def _in_child(kind: str, kwargs: dict) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_child_step_memory, kind, kwargs, torch.get_num_threads()).result()


def build_image_model(method: str, width: float, substitute_width: float, encoder: str, device: torch.device) -> nn.Module:
    """The CIFAR model of ``method`` with fresh weights: ResNet-18 at ``width``, for ``abnn`` inside
    ABNN with a VGG-19-BN substitute (200 classes) at ``substitute_width``."""
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
        model = build_image_model(m, width, substitute_width, encoder, dev).train()
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
        for _ in range(max(warmup, 1)):
            step(m)
        if dev.type == "cuda":
            peak[m] = torch.cuda.max_memory_allocated(dev)
        else:
            peak[m] = _in_child("image", {"method": m, "width": width, "substitute_width": substitute_width,
                                          "encoder": encoder, "batch_size": batch_size, "at_steps": at_steps})["peak_rss_bytes"]
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
        "memory_kind": ("cuda_max_allocated" if dev.type == "cuda"
                        else "cpu peak resident memory of a fresh process doing two steps of this method alone"),
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



def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0


def _rounds(fns: dict, rounds: int, warmup: int, dev: torch.device, progress: bool, label: str) -> dict:
    """Warm every function up, then time them in interleaved rounds; {name: (walls, cpus)}."""
    for fn in fns.values():
        for _ in range(max(warmup, 0)):
            fn()
    out: dict = {k: ([], []) for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            w, c = _timed(fn, dev)
            out[k][0].append(w)
            out[k][1].append(c)
            if progress:
                print(f"{label} round {r + 1}/{rounds} {k}: {1000 * w:.0f} ms", flush=True)
    return out


def _train_step(model: nn.Module, method: str, at_steps: int, dev: torch.device, amp_dtype: torch.dtype | None, *,
                channels_last: bool = False) -> TrainStep:
    """``method``'s training step of ``model`` as ``abnn train`` takes it (:class:`~abnn.training.TrainStep`),
    with the benchmarks' SGD (lr 0.01, momentum 0.9, weight decay 5e-4)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=5e-4)
    return TrainStep(model, batch_loss_for(TrainConfig(method=method, at_steps=at_steps)), opt, amp_dtype=amp_dtype,
                     channels_last=channels_last, device_type=dev.type)


def _train_steps(methods: tuple[str, ...], width: float, substitute_width: float, encoder: str, at_steps: int,
                 dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> tuple[dict, dict]:
    """Per method a fresh model's training step (:func:`_train_step`), and the models to time
    inference and attacks on: ``resnet18`` (the first plain model; standard and PGD-AT train the
    same architecture) and ``abnn``."""
    steps: dict = {}
    models: dict[str, nn.Module] = {}
    for m in methods:
        model = build_image_model(m, width, substitute_width, encoder, dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        steps[m] = _train_step(model.train(), m, at_steps, dev, amp_dtype, channels_last=channels_last)
        models.setdefault("abnn" if m == "abnn" else "resnet18", model)
    return steps, models


def _attack_fns(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                steps: int, amp_dtype: torch.dtype | None, dev: torch.device,
                compare_torchattacks: bool) -> tuple[dict, str | None, str | None]:
    """The attack calls to time: our PGD against each model and, with ``compare_torchattacks``,
    torchattacks' PGD against the ResNet-18 (else the first model) as ``torchattacks:NAME``; then
    torchattacks' version, or why it was skipped (not importable)."""
    from .attacks import build_attack

    def ours(model: nn.Module):
        atk = build_attack("pgd", model, eps=eps, alpha=alpha, steps=steps, random_start=True, amp=amp_dtype)

        def run() -> None:
            atk(x, y)
        return run

    fns = {k: ours(mdl) for k, mdl in models.items()}
    if not compare_torchattacks:
        return fns, None, None
    try:
        import torchattacks
    except Exception as exc:  # noqa: BLE001 - optional dependency
        return fns, None, f"torchattacks not importable ({type(exc).__name__}: {exc}); pip install torchattacks"
    ref = models.get("resnet18") or next(iter(models.values()))
    ta = torchattacks.PGD(ref, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def theirs() -> None:
        with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
            ta(x, y)
    fns["torchattacks:" + ("resnet18" if "resnet18" in models else next(iter(models)))] = theirs
    return fns, getattr(torchattacks, "__version__", "?"), None


def _torchattacks_comparison(timed: dict, skipped: str | None) -> dict:
    """``compare_torchattacks`` of the result: our and torchattacks' seconds per call on the same
    model and their ratios, or why torchattacks was skipped (nothing where it was not asked for)."""
    their_key = next((k for k in timed if k.startswith("torchattacks:")), None)
    if their_key is None:
        return {"compare_torchattacks": {"skipped": skipped}} if skipped else {}
    med = statistics.median
    ours_key = their_key.split(":", 1)[1]
    (ow, oc), (tw, tc) = timed[ours_key], timed[their_key]
    return {"compare_torchattacks": {
        "model": ours_key, "ours_seconds": med(ow), "torchattacks_seconds": med(tw),
        "ratio_ours_over_torchattacks": med(ow) / med(tw),
        "cpu_ratio_ours_over_torchattacks": med(oc) / med(tc) if med(tc) > 0 else None,
        "per_round_ratio": [a / b for a, b in zip(ow, tw)],
    }}


def bench_throughput(*, width: float = 0.25, substitute_width: float = 0.25, batch_size: int = 128, iters: int = 3,
                     warmup: int = 1, at_steps: int = 5, attack_steps: int = 10, encoder: str = "flatten",
                     methods: tuple[str, ...] = ("standard", "abnn", "pgd-at"), device: str = "cpu",
                     amp: str = "auto", channels_last: bool = False, compare_torchattacks: bool = False,
                     eps: float = 8 / 255, alpha: float = 2 / 255, seed: int = 0, out: str | Path | None = None,
                     progress: bool = True) -> dict:
    """Throughput on one fixed batch of random CIFAR-sized images (medians over ``iters`` rounds).

    * ``train``: images/s of a full training step of each method (PGD-AT: with its ``at_steps``
      attack), through :class:`~abnn.training.TrainStep` as in ``abnn train``;
    * ``inference``: images/s of an eval-mode forward without gradients, for each model
      (the plain ResNet-18, shared by standard and PGD-AT, and ABNN);
    * ``attack``: our L-inf PGD (``attack_steps`` steps, random start) against each model in
      eval mode: seconds per call, images/s and PGD steps/s = batch * steps / seconds;
    * ``compare_torchattacks``: torchattacks' ``PGD`` with the same settings on the same
      ResNet-18 and batch, interleaved with ours; ``ratio_ours_over_torchattacks`` < 1 means ours
      is faster (wall clock; ``cpu_ratio...`` uses process CPU time, robust to other load when
      running one thread).  Skipped with a note when torchattacks is not importable.
    """
    dev = torch.device(device)
    amp_dtype = resolve_amp(amp, dev)
    torch.manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rounds = max(iters, 1)
    med = statistics.median
    res: dict = {
        "benchmark": "throughput", "device": str(dev), "threads": torch.get_num_threads(), "batch_size": batch_size,
        "target": f"resnet18_cifar width {width}", "substitute": f"vgg19_bn width {substitute_width}",
        "encoder": encoder, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
        "channels_last": channels_last, "rounds": rounds, "warmup": warmup, "at_steps": at_steps,
        "attack": {"name": "PGD", "eps": eps, "alpha": alpha, "steps": attack_steps, "random_start": True},
    }

    # -- training ---------------------------------------------------------------------------------
    steps, models = _train_steps(methods, width, substitute_width, encoder, at_steps, dev, amp_dtype, channels_last)
    timed = _rounds({m: (lambda s=s: s(x, y)) for m, s in steps.items()}, rounds, warmup, dev, progress, "train")
    res["train"] = {m: {"images_per_s": batch_size / med(w), "ms_per_step": 1000 * med(w), "cpu_ms_per_step": 1000 * med(c)}
                    for m, (w, c) in timed.items()}

    # -- inference --------------------------------------------------------------------------------
    for model in models.values():
        model.eval()
    timed = _rounds({k: _inference_fn(mdl, x, amp_dtype, dev) for k, mdl in models.items()}, max(rounds, 3), warmup,
                    dev, progress, "inference")
    res["inference"] = {k: {"images_per_s": batch_size / med(w), "ms_per_batch": 1000 * med(w)} for k, (w, c) in timed.items()}

    # -- attack -----------------------------------------------------------------------------------
    fns, version, skipped = _attack_fns(models, x, y, eps=eps, alpha=alpha, steps=attack_steps, amp_dtype=amp_dtype,
                                        dev=dev, compare_torchattacks=compare_torchattacks)
    if version is not None:
        res["torchattacks_version"] = version
    timed = _rounds(fns, rounds, warmup, dev, progress, "attack")
    res["attack"]["models"] = {
        k: {"seconds_per_call": med(w), "cpu_seconds_per_call": med(c), "images_per_s": batch_size / med(w),
            "pgd_steps_per_s": batch_size * attack_steps / med(w)}
        for k, (w, c) in timed.items()}
    res["attack"] = res.pop("attack")  # report order: train, inference, attack
    res.update(_torchattacks_comparison(timed, skipped))
    if out:
        write_json_atomic(Path(out), res)
    return res


def bench_precision(*, width: float = 0.25, substitute_width: float = 0.25, batch_size: int = 128, iters: int = 3,
                    warmup: int = 1, at_steps: int = 5, encoder: str = "flatten",
                    methods: tuple[str, ...] = ("standard", "abnn"), modes: tuple[str, ...] = ("off", "bf16"),
                    device: str = "cpu", seed: int = 0, out: str | Path | None = None, progress: bool = True) -> dict:
    """float32 and mixed precision side by side (``abnn bench throughput --compare-amp``).

    For every method and every ``--amp`` mode in ``modes``: training images/s of a full
    :class:`~abnn.training.TrainStep`, and inference images/s of each model (an eval-mode forward
    without gradients, under the mode's autocast).  Every (method, mode) pair is timed in the
    same interleaved rounds on the same batch, so background load hits them alike; wall-clock and
    process CPU time are both recorded (``*_cpu`` figures: images per CPU second, which other
    jobs on the machine distort far less than wall time when running one thread)."""
    dev = torch.device(device)
    dtypes = {mode: resolve_amp(mode, dev) for mode in modes}
    label = {mode: str(dt).replace("torch.", "") if dt is not None else "float32" for mode, dt in dtypes.items()}
    torch.manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    rounds = max(iters, 1)
    train_fns, infer_fns = {}, {}
    for m in methods:
        for mode, dt in dtypes.items():
            torch.manual_seed(seed)  # the same initial weights for every mode
            model = build_image_model(m, width, substitute_width, encoder, dev).train()
            step = _train_step(model, m, at_steps, dev, dt)
            train_fns[(m, label[mode])] = lambda s=step: s(x, y)
            infer_fns[(m, label[mode])] = _inference_fn(model, x, dt, dev)
    timed_train = _rounds(train_fns, rounds, warmup, dev, progress, "train")
    timed_infer = _rounds(infer_fns, max(rounds, 3), warmup, dev, progress, "inference")

    def rates(walls: list[float], cpus: list[float]) -> dict:
        w, c = statistics.median(walls), statistics.median(cpus)
        return {"images_per_s": batch_size / w, "images_per_cpu_s": batch_size / c if c > 0 else None,
                "ms_per_batch": 1000 * w, "cpu_ms_per_batch": 1000 * c}

    res: dict = {
        "benchmark": "precision", "device": str(dev), "threads": torch.get_num_threads(), "batch_size": batch_size,
        "target": f"resnet18_cifar width {width}", "substitute": f"vgg19_bn width {substitute_width}",
        "encoder": encoder, "rounds": rounds, "warmup": warmup, "modes": [label[m] for m in modes],
        "train": {m: {lab: rates(*timed_train[(m, lab)]) for lab in label.values()} for m in methods},
        "inference": {m: {lab: rates(*timed_infer[(m, lab)]) for lab in label.values()} for m in methods},
        "note": ("inference rows: ResNet-18 for standard, ABNN (target + substitute) for abnn; evaluation in abnn "
                 "always runs in float32, the mixed-precision inference figures only show what it would gain"),
    }
    if "float32" in label.values():
        res["speedup_over_float32_cpu_time"] = {
            part: {m: {lab: v["images_per_cpu_s"] / res[part][m]["float32"]["images_per_cpu_s"]
                       for lab, v in res[part][m].items() if lab != "float32" and v["images_per_cpu_s"]}
                   for m in methods} for part in ("train", "inference")}
    if out:
        write_json_atomic(Path(out), res)
    return res


def _inference_fn(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None, dev: torch.device):
    """An eval-mode forward without gradients, under autocast with ``amp_dtype`` when set."""
    def run() -> None:
        was = model.training
        model.eval()
        with torch.no_grad(), (torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None
                               else contextlib.nullcontext()):
            model(x)
        model.train(was)
    return run


def bench_video_step(*, full: bool = True, batch_sizes: tuple[int, ...] = (1, 2), frames: int = 40,
                     reduced_width: float = 0.125, steps: int = 2, device: str = "cpu", out: str | Path | None = None,
                     progress: bool = True) -> dict:
    """Video ABNN training steps (issue figures): seconds per step of the reduced ResNeXt-3D
    (depth (1,1,1,1), width ``reduced_width``) with and without an R3D-18 substitute, and, with
    ``full``, peak memory of full-size 3D ResNeXt-101 + R3D-18 ABNN steps at ``batch_sizes`` x
    ``frames`` frames; the per-clip slope gives the batch that fits in a memory budget."""
    from .models import r3d18_substitute, resnext3d_101

    dev = torch.device(device)
    torch.manual_seed(0)

    def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        model.train()
        times = []
        with _PeakRSS() as rss:
            for _ in range(steps + 1):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss.peak - rss.base
        return statistics.median(times[1:]), peak

    res: dict = {"benchmark": "video-step", "device": str(dev), "threads": torch.get_num_threads(), "frames": frames,
                 "memory_kind": ("cuda_max_allocated" if dev.type == "cuda"
                                 else "cpu peak resident memory of a fresh process doing two steps")}
    x = torch.rand(2, 3, frames, 112, 112, device=dev)
    y = torch.randint(0, 101, (2,), device=dev)
    reduced = {}
    for with_sub in (False, True):
        target = resnext3d_101(101, width=reduced_width, blocks=(1, 1, 1, 1))
        model = ABNN(target, r3d18_substitute(400, width=reduced_width), input_shape=(3, frames, 112, 112),
                     encoder="pooled") if with_sub else target
        sec, _ = step_time(model.to(dev), x, y)
        reduced["abnn" if with_sub else "standard"] = sec
        if progress:
            print(f"reduced ResNeXt-3D {'with' if with_sub else 'without'} substitute: {sec:.2f} s/step", flush=True)
    res["reduced"] = {"target": f"resnext3d (1,1,1,1) width {reduced_width}", "substitute": f"r3d_18 width {reduced_width}",
                      "batch": 2, "seconds_per_step": reduced, "ratio_abnn_over_standard": reduced["abnn"] / reduced["standard"]}
    if full:
        rows = {}
        for b in batch_sizes:
            if dev.type == "cuda":
                model = ABNN(resnext3d_101(101), r3d18_substitute(400), input_shape=(3, frames, 112, 112),
                             encoder="pooled").to(dev)
                xb = torch.rand(b, 3, frames, 112, 112, device=dev)
                sec, peak = step_time(model, xb, torch.randint(0, 101, (b,), device=dev))
            else:  # a fresh process per batch size: the true peak of the whole process
                r = _in_child("video", {"batch_size": b, "frames": frames})
                sec, peak = r["seconds_second_step"], r["peak_rss_bytes"]
            rows[b] = {"seconds_per_step": sec, "peak_memory_gib": peak / 2**30}
            if progress:
                print(f"full ResNeXt-101 + R3D-18 ABNN, batch {b}x{frames}: {sec:.1f} s/step, peak {peak / 2**30:.2f} GiB",
                      flush=True)
        res["full"] = {"target": "resnext3d_101 (3,4,23,3) card. 32", "substitute": "r3d_18", "rows": rows}
        if len(rows) >= 2:
            (b0, r0), (b1, r1) = sorted(rows.items())[:2]
            slope = (r1["peak_memory_gib"] - r0["peak_memory_gib"]) / (b1 - b0)
            base = r0["peak_memory_gib"] - slope * b0
            res["full"]["gib_per_clip"] = slope
            res["full"]["batch_fitting_24gib_estimate"] = int((24 - base) // slope) if slope > 0 else None
    if out:
        write_json_atomic(Path(out), res)
    return res


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``abnn bench``, one per parameter of :func:`bench_command` (the CLI calls it
    with them by name); the CLI adds the flags every command has (``--device``, ...)."""
    p.add_argument("what", choices=("train-cost", "throughput", "video-step"),
                   help="train-cost: ms per step per method; throughput: images/s and attack steps/s; "
                        "video-step: video ABNN step time and full-size ResNeXt-101 memory")
    p.add_argument("--width", type=float, default=None,
                   help="ResNet-18 width (default 1.0, the paper's, for train-cost; 0.25 for throughput)")
    p.add_argument("--substitute-width", type=float, default=None,
                   help="VGG-19-BN width (default 1.0 for train-cost; 0.25 for throughput)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--at-steps", type=int, default=5, help="PGD-AT attack steps inside training (default 5)")
    p.add_argument("--encoder", choices=("flatten", "pooled"), default="flatten")
    p.add_argument("--methods", default=None, help="comma-separated (default standard,abnn,pgd-at)")
    p.add_argument("--attack-steps", type=int, default=10, help="throughput: PGD steps per attack call (default 10)")
    p.add_argument("--compare-torchattacks", action="store_true",
                   help="throughput: also time torchattacks' PGD on the same model and batch, report our/their time ratio")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="throughput: mixed precision as in `abnn train --amp` (default auto: on for CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="throughput: channels-last memory format")
    p.add_argument("--compare-amp", action="store_true",
                   help="throughput: float32 and --amp bf16 side by side instead (training images/s per method, "
                        "inference images/s; wall and CPU time); --methods defaults to standard,abnn")
    p.add_argument("--out", default=None, help="JSON output file")


def bench_command(what: str, *, methods: str | None = None, width: float | None = None,
                  substitute_width: float | None = None, batch_size: int = 128, steps: int = 3, warmup: int = 1,
                  at_steps: int = 5, attack_steps: int = 10, encoder: str = "flatten", amp: str = "auto",
                  channels_last: bool = False, compare_torchattacks: bool = False, compare_amp: bool = False,
                  device: str = "cpu", out: str | None = None, progress: bool = True) -> dict:
    """``abnn bench WHAT``: check the flags in one line each, then run ``train-cost``,
    ``throughput`` (``compare_amp``: :func:`bench_precision`) or ``video-step``.  ``methods``
    is comma-separated; widths default to 1.0 for train-cost (the paper's), 0.25 otherwise."""
    from .errors import AbnnError
    from .training.methods import METHODS

    default_methods = "standard,abnn" if compare_amp else "standard,abnn,pgd-at"
    names = tuple(m.strip() for m in (methods or default_methods).split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise AbnnError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if batch_size < 1 or steps < 1 or attack_steps < 1:
        raise AbnnError(f"need --batch-size, --steps and --attack-steps >= 1; got {batch_size}, {steps}, {attack_steps}")
    if what == "video-step":
        return bench_video_step(device=device, out=out, progress=progress)
    default_width = 1.0 if what == "train-cost" else 0.25
    common = dict(width=width if width is not None else default_width, batch_size=batch_size, warmup=warmup,
                  substitute_width=substitute_width if substitute_width is not None else default_width,
                  at_steps=at_steps, encoder=encoder, methods=names, device=device, out=out, progress=progress)
    if what == "train-cost":
        return bench_train_cost(steps=steps, **common)
    if compare_amp:
        return bench_precision(iters=steps, **common)
    return bench_throughput(iters=steps, attack_steps=attack_steps, amp=amp, channels_last=channels_last,
                            compare_torchattacks=compare_torchattacks, **common)
