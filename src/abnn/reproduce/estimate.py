"""``abnn reproduce table1 --estimate``: the counted FLOPs of a Table 1 preset and its time at an
assumed GPU throughput, without training or evaluating anything.

How the numbers are made (every count from the real code, the throughput an assumption):

* **FLOPs per image** of each network pass, counted by :class:`torch.utils.flop_counter.FlopCounterMode`
  on one image through the real models at the preset's widths: a forward pass ``F``, an
  input-gradient backward ``B_in`` (what an attack step back-propagates) and a training backward
  ``B_train`` (weight gradients of the trained part; the frozen substitute needs none).
  FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-add); element-wise
  work (BN, ReLU, the optimizer) is left out.
* **Passes per training step**, counted by the training loop's own :class:`~abnn.training.PassCounter`
  on one real step of each method (a tiny-width copy: the counts do not depend on width): the
  forward passes of the model and its backward passes, of which one per step is the training
  backward and the others are attack steps' input-gradient backwards.
* **Steps** = epochs x (training images // batch); per-epoch validation (clean on ``val_size``
  images; Fast-AT's PGD-5 on ``robust_val_size`` held-out images) and the evaluation (clean, PGD
  and ROA on ``n_eval`` images: an upper bound, every image attacked, while the runner skips
  images misclassified clean) are counted the same way; ROA's candidate positions come from the
  ROA attack itself.
* **Time** = FLOPs / (assumed fraction of the GPU's dense peak): training at the bf16 peak,
  validation and evaluation (float32 tensors; cuDNN convolutions use TF32 by PyTorch's default) at
  the TF32 peak.  The fraction is an assumption, not a measurement: small 32x32 CNNs at batch 128
  keep a GPU far from its peak (kernel launches, memory-bound BN and element-wise layers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..data import load_dataset
from .presets import Table1Preset


@dataclass(frozen=True)
class GpuThroughput:
    """An assumed sustained throughput: a fraction of a GPU's dense peak."""

    name: str
    peak_bf16_tflops: float
    peak_tf32_tflops: float
    fraction: float
    source: str

    @property
    def train_flops_per_s(self) -> float:
        return self.fraction * self.peak_bf16_tflops * 1e12

    @property
    def eval_flops_per_s(self) -> float:
        return self.fraction * self.peak_tf32_tflops * 1e12


#: the assumption of the ``gpu`` preset's estimate
H100_CLASS = GpuThroughput(
    name="NVIDIA H100/H200 SXM", peak_bf16_tflops=989.4, peak_tf32_tflops=494.7, fraction=0.10,
    source=("NVIDIA H100 Tensor Core GPU datasheet (SXM: 989.4 TFLOP/s dense BF16, 494.7 TFLOP/s dense TF32; "
            "the H200 has the same compute); 10% of peak sustained is our assumption for ResNet-18/VGG-19 on "
            "32x32 images at batch 128, not a measurement"))


@dataclass(frozen=True)
class PassFlops:
    """FLOPs per image of one pass of a model: forward, input-gradient backward, training backward."""

    forward: float
    input_backward: float
    train_backward: float


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def pass_flops(model: nn.Module) -> PassFlops:
    """Count the three passes of ``model`` on one 32x32 image (eval mode: the same FLOPs)."""
    model.eval()
    x = torch.rand(1, 3, 32, 32)
    forward = _flops(lambda: model(x))
    xg = x.clone().requires_grad_(True)
    trained = {p: p.requires_grad for p in model.parameters()}
    for p in trained:
        p.requires_grad_(False)
    out = model(xg)
    input_backward = _flops(lambda: torch.autograd.grad(out.sum(), xg))
    for p, req in trained.items():
        p.requires_grad_(req)
    out = model(x)
    train_backward = _flops(lambda: out.sum().backward())
    model.zero_grad(set_to_none=True)
    return PassFlops(forward, input_backward, train_backward)


def counted_passes(method: str, at_steps: int) -> tuple[int, int, float]:
    """(forward, backward) passes of the target network and N (passes of every network) in one
    real training step of ``method`` (a tiny-width model and batch: the counts depend on neither)."""
    from ..benchmark import build_image_model
    from ..training import PassCounter, TrainStep, attach_networks, batch_loss_for

    torch.manual_seed(0)
    model = build_image_model(method, 1 / 16, 1 / 16, "flatten", torch.device("cpu")).train()
    counter = attach_networks(PassCounter(), model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = TrainStep(model, batch_loss_for(TrainConfig(method=method, at_steps=at_steps)), opt, counter=counter)
    step(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    counter.detach()
    summary = counter.summary()
    target = summary["per_network"]["target"]
    return target["forward"], target["backward"], summary["N_per_step"]


def _train_images(cfg: TrainConfig) -> int:
    """Training images of a config (the data files' sizes; nothing is trained)."""
    from ..training.loop import dataset_options

    return len(load_dataset(cfg.dataset, "train", cfg.data_root, **dataset_options(cfg, "train")).subset(cfg.train_size))


def _val_images(cfg: TrainConfig) -> int:
    if cfg.val_size == 0:
        return 0
    from ..training.loop import dataset_options

    return len(load_dataset(cfg.dataset, "test", cfg.data_root, **dataset_options(cfg, "test")).subset(cfg.val_size))


def _pgd_flops(pf: PassFlops, steps: int) -> float:
    """One image through PGD: ``steps`` forward + input-gradient passes and the adversarial prediction."""
    return steps * (pf.forward + pf.input_backward) + pf.forward


def _stage(name: str, cfg: TrainConfig, pf: PassFlops, passes: tuple[int, int, float]) -> dict:
    """Counted FLOPs of one training stage: its steps and its per-epoch validation."""
    fwd, bwd, n_per_step = passes
    images = _train_images(cfg)
    steps = cfg.epochs * (images // cfg.batch_size)
    per_image = fwd * pf.forward + pf.train_backward + max(bwd - 1, 0) * pf.input_backward
    val = cfg.epochs * (_val_images(cfg) * pf.forward
                        + cfg.robust_val_size * (pf.forward + _pgd_flops(pf, 5)))
    return {"stage": name, "train_images": images, "epochs": cfg.epochs, "steps": steps,
            "batch_size": cfg.batch_size, "passes_per_step": {"forward": fwd, "backward": bwd},
            "N_per_step": n_per_step, "gflops_per_image_step": per_image / 1e9,
            "train_flops": steps * cfg.batch_size * per_image, "validation_flops": val}


def _evaluation(name: str, preset: Table1Preset, pf: PassFlops) -> dict:
    """Counted FLOPs of one model's evaluation: clean, PGD and ROA on ``n_eval`` images."""
    from ..attacks import build_attack

    opts = preset.attack_options()
    rows, cols = build_attack("roa", nn.Identity(), **opts["roa"]).candidates(32, 32)
    positions = len(rows) * len(cols)
    per_image = {"clean": pf.forward, "pgd": _pgd_flops(pf, opts["pgd"]["steps"]),
                 "roa": positions * pf.forward + _pgd_flops(pf, opts["roa"]["steps"])}
    return {"stage": f"eval:{name}", "n_eval": preset.n_eval, "roa_positions": positions,
            "flops": {k: v * preset.n_eval for k, v in per_image.items()}}


def estimate_table1(preset: Table1Preset, *, data_root: str | None = None,
                    gpu: GpuThroughput = H100_CLASS) -> dict:
    """Counted training and evaluation FLOPs of every stage of ``preset`` and the time they take
    at ``gpu``'s assumed throughput (see the module docstring).  Nothing is trained."""
    torch.manual_seed(0)
    flops: dict[str, PassFlops] = {}

    def model_flops(kind: str) -> PassFlops:
        if kind not in flops:
            flops[kind] = pass_flops(_model(kind, preset))
        return flops[kind]

    stages = []
    if "abnn" in preset.methods and preset.substitute_source == "pretrain":
        cfg = preset.substitute_config()
        cfg.data_root = data_root
        stages.append(_stage("substitute", cfg, model_flops("substitute"), counted_passes("standard", preset.at_steps)))
    evals = []
    for method in preset.methods:
        cfg = preset.method_config(method, "substitute")
        cfg.data_root = data_root
        pf = model_flops("abnn" if method == "abnn" else "resnet18")
        stages.append(_stage(method, cfg, pf, counted_passes(method, preset.at_steps)))
        evals.append(_evaluation(method, preset, pf))
    train = sum(s["train_flops"] for s in stages)
    val = sum(s["validation_flops"] for s in stages)
    ev = sum(sum(e["flops"].values()) for e in evals)
    seconds = {"train": train / gpu.train_flops_per_s, "validation": val / gpu.eval_flops_per_s,
               "evaluation": ev / gpu.eval_flops_per_s}
    return {
        "preset": preset.name, "estimate": True,
        "note": ("An estimate, not a measurement: counted FLOPs (matrix products and convolutions only) at an "
                 "assumed sustained throughput; data loading, element-wise layers, compilation and start-up "
                 "are not counted"),
        "assumption": asdict(gpu) | {"train_tflops": gpu.train_flops_per_s / 1e12,
                                     "eval_tflops": gpu.eval_flops_per_s / 1e12},
        "pass_gflops_per_image": {k: {f: v / 1e9 for f, v in asdict(p).items()} for k, p in flops.items()},
        "stages": stages, "evaluations": evals,
        "total_flops": {"train": train, "validation": val, "evaluation": ev},
        "seconds": seconds | {"total": sum(seconds.values())},
    }


def _model(kind: str, preset: Table1Preset) -> nn.Module:
    """The real network of ``kind`` (resnet18, abnn, substitute) at the preset's widths."""
    from ..benchmark import build_image_model
    from ..models import vgg19_bn_substitute

    if kind == "substitute":
        return vgg19_bn_substitute(200, width=preset.substitute_width)
    method = "abnn" if kind == "abnn" else "standard"
    return build_image_model(method, preset.width, preset.substitute_width, "flatten", torch.device("cpu"))


def format_estimate(est: dict) -> str:
    """The estimate as a few lines of text (what ``--estimate`` prints)."""
    a = est["assumption"]
    lines = [f"Table 1, preset {est['preset']}: ESTIMATE, nothing was run. {est['note']}.",
             f"Assumed throughput: {a['fraction']:.0%} of the {a['name']} dense peak = {a['train_tflops']:.0f} TFLOP/s "
             f"bf16 for training, {a['eval_tflops']:.0f} TFLOP/s TF32 for validation and evaluation. Source: "
             f"{a['source']}.", ""]
    for s in est["stages"]:
        lines.append(f"  train {s['stage']:<10} {s['steps']:>6} steps x {s['batch_size']} images, "
                     f"{s['N_per_step']:g}N/step counted, {s['gflops_per_image_step']:.2f} GFLOP/image-step: "
                     f"{s['train_flops'] / 1e15:7.2f} PFLOP (+{s['validation_flops'] / 1e15:.2f} validation)")
    for e in est["evaluations"]:
        parts = ", ".join(f"{k} {v / 1e15:.2f}" for k, v in e["flops"].items())
        lines.append(f"  {e['stage']:<16} {e['n_eval']} images, ROA {e['roa_positions']} positions: {parts} PFLOP")
    t, sec = est["total_flops"], est["seconds"]
    lines += ["", f"Total: {t['train'] / 1e15:.1f} PFLOP training, {t['validation'] / 1e15:.2f} PFLOP validation, "
              f"{t['evaluation'] / 1e15:.1f} PFLOP evaluation.",
              f"Estimated time: {sec['train']:.0f} s training + {sec['validation']:.0f} s validation + "
              f"{sec['evaluation']:.0f} s evaluation = {sec['total']:.0f} s ({sec['total'] / 60:.1f} min)."]
    return "\n".join(lines)
