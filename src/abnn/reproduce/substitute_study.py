"""How does ABNN's robustness move with the substitute's strength?

The paper's mechanism is that a *good* pretrained substitute supplies clean statistics that an
attack on the target leaves "relatively unaffected" (s. 2.2).  This study trains ABNN with the
Table 1 preset's target, data, schedule and seed and substitutes of increasing strength, each
labelled with its own validation accuracy (METHOD.md s. 5, "Substitute strength"):

* ``untrained``: a randomly initialised VGG-19-BN, the control (if ABNN's numbers do not move,
  the substitute's statistics play no role);
* ``tiny-weak`` and ``tiny``: VGG-19-BN pretrained on tinyimagenet32 for a fifth of the preset's
  epochs and for all of them (the Table 1 substitute);
* ``cifar10-vgg`` and ``cifar10-resnet20``: **in-domain upper bounds that break the paper's
  premise on purpose**: a VGG-19-BN trained on the CIFAR-10 training images, and the reference
  CIFAR-10 ResNet-20 of ``shared/data/weights`` tapped by module name.

Each ABNN model gets the paper's PGD-5 and the strong white-box worst case, and the study
measures how far the attack moves the substitute's statistics mu(z_s), sigma(z_s) per stage
(and, as a scale reference only, the same per-sample moments of the target's stage outputs z_t:
an eval-mode ABNN does not use them, it normalises z_t with its BN's running statistics).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import TrainConfig, write_json_atomic
from ..data import BatchLoader, load_dataset, resolve_data_root
from ..runs import load_run, read_json, run_lock
from ..training.loop import software_versions
from .frontier import study_eval
from .presets import Table1Preset
from .schedule import Stage
from .stages import (STUDY_LOCK_WAIT, StudyEval, TrainPoint, eval_of, log, place, schedule,
                     train_and_eval_stages)

#: the reference ResNet-20's taps, paired in order with the target's five stages (by resolution:
#: 32x32, 32x32, 16x16, 8x8, 8x8; ResNet-20 has three stages of three blocks)
RESNET20_TAPS = ("layer1.0", "layer1", "layer2", "layer3.0", "layer3")
RESNET20_FILE = "weights/resnet20-12fca82f.th"
SHIFT_FILE = "substitute_shift.json"


@dataclass(frozen=True)
class Substitute:
    """One substitute of the study: how to build it, and where its accuracy is measured."""

    name: str
    label: str
    spec: str | None                 # --substitute value (None: trained by the study, see `train`)
    arch: str = "vgg19_bn"
    width: float | None = None       # None: the preset's substitute width
    num_classes: int = 200
    taps: tuple[str, ...] | None = None
    in_domain: bool = False
    val_dataset: str = "tinyimagenet32"
    train: TrainConfig | None = None  # the substitute's own training run, if any


def substitutes(preset: Table1Preset, out: Path, table1_dir: Path | None, data_root: str | None,
                device: str) -> tuple[list[Substitute], list[TrainPoint]]:
    """The study's substitutes and the training stages that make them."""
    shared = [table1_dir] if table1_dir is not None else []
    full = preset.substitute_config()
    weak = dataclasses.replace(full, epochs=max(1, full.epochs // 5))
    cifar = dataclasses.replace(full, dataset="cifar10", train_size=preset.train_size, val_size=preset.val_size)
    for c in (full, weak, cifar):
        c.data_root, c.device = data_root, device
    runs = {"tiny": place("substitute", full, out / "substitutes", shared),
            "tiny-weak": out / "substitutes" / f"tinyimagenet32-{weak.epochs}ep",
            "cifar10-vgg": out / "substitutes" / "cifar10-vgg19bn"}
    subs = [Substitute("untrained", "untrained VGG-19-BN (control)", "random"),
            Substitute("tiny-weak", f"VGG-19-BN, tinyimagenet32, {weak.epochs} epochs", None, train=weak),
            Substitute("tiny", f"VGG-19-BN, tinyimagenet32, {full.epochs} epochs (Table 1)", None, train=full),
            Substitute("cifar10-vgg", "VGG-19-BN trained on CIFAR-10 (in-domain: breaks the premise)", None,
                       num_classes=10, in_domain=True, val_dataset="cifar10", train=cifar)]
    root = resolve_data_root(data_root)
    if root is not None and (root / RESNET20_FILE).is_file():
        subs.append(Substitute("cifar10-resnet20", "reference ResNet-20, CIFAR-10 (in-domain: breaks the premise)",
                               str(root / RESNET20_FILE), arch="resnet20", width=1.0, num_classes=10,
                               taps=RESNET20_TAPS, in_domain=True, val_dataset="cifar10"))
    points = [TrainPoint(f"sub:{s.name}", runs[s.name], s.train) for s in subs if s.train is not None]
    subs = [dataclasses.replace(s, spec=str(runs[s.name])) if s.train is not None else s for s in subs]
    return subs, points


def abnn_point(preset: Table1Preset, sub: Substitute, out: Path, table1_dir: Path | None, data_root: str | None,
               device: str) -> TrainPoint:
    cfg = preset.method_config("abnn", sub.spec)
    cfg.data_root, cfg.device = data_root, device
    cfg.substitute_arch, cfg.substitute_num_classes = sub.arch, sub.num_classes
    cfg.substitute_width = preset.substitute_width if sub.width is None else sub.width
    cfg.substitute_taps = list(sub.taps) if sub.taps else None
    cfg.in_domain_substitute = sub.in_domain
    shared = [table1_dir] if table1_dir is not None and sub.name == "tiny" else []
    after = (f"sub:{sub.name}",) if sub.train is not None else ()
    return TrainPoint(f"abnn:{sub.name}", place(f"abnn-{sub.name}", cfg, out, shared, folder="abnn"), cfg, after)


@torch.no_grad()
def substitute_accuracy(model: nn.Module, val_dataset: str, data_root: str | None, device: str | torch.device,
                        batch_size: int = 500) -> float:
    """Top-1 accuracy of an ABNN model's own substitute (the weights it trained with) on the
    whole validation split of the substitute's dataset."""
    net = model.substitute
    data = load_dataset(val_dataset, "test", data_root)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(data, batch_size, device=device):
        correct += (net(x).argmax(1) == y).sum()
    return correct.item() / len(data)


def _moments(f: Tensor) -> tuple[Tensor, Tensor]:
    flat = f.flatten(1).float()
    return flat.mean(1), flat.std(1)


def _rel(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs() / b.abs().clamp_min(1e-12)


@torch.no_grad()
def statistics_shift(model: nn.Module, x: Tensor, x_adv: Tensor) -> dict:
    """Mean over samples of |m(adv) - m(clean)| / |m(clean)| for m = mu, sigma of the
    substitute's features at each tap (per sample, over C*H*W, as in the ``sample`` option of
    eq. 2), and of the target's stage outputs z_t before adaptive BN (``"target"``): a scale
    reference only, since an eval-mode ABNN normalises z_t with its BN's running statistics and
    never uses these per-sample moments."""
    captured: list[Tensor] = []
    hooks = [model.target.get_submodule(n).register_forward_hook(lambda m, i, o: captured.append(o), prepend=True)
             for n in model.target_stages]
    try:
        out = {}
        for key, inp in (("clean", x), ("adv", x_adv)):
            captured.clear()
            model(inp)
            out[key] = ([_moments(f) for f in model.substitute_features(inp)], [_moments(f) for f in captured])
    finally:
        for h in hooks:
            h.remove()
    res = {}
    for i, who in enumerate(("substitute", "target")):
        pairs = list(zip(out["adv"][i], out["clean"][i]))
        res[who] = {"mu": [_rel(a[0], c[0]).mean().item() for a, c in pairs],
                    "sigma": [_rel(a[1], c[1]).mean().item() for a, c in pairs]}
    return res


def job_analysis(run: Path, val_dataset: str, n_eval: int, batch_size: int, seed: int, data_root: str | None,
                 device: str, force: bool) -> dict:
    """The substitute's own validation accuracy, and the statistics shift under the paper's
    PGD-5 on the first ``n_eval`` test images (cached in ``RUN/substitute_shift.json``)."""
    from ..attacks import build_attack

    key = {"attack": "pgd", "n_eval": n_eval, "seed": seed, "val_dataset": val_dataset}
    path = run / SHIFT_FILE
    if path.is_file() and not force and read_json(path).get("key") == key:
        return read_json(path)
    with run_lock(run, wait=STUDY_LOCK_WAIT):  # one writer per run folder
        model, cfg = load_run(run, device=device)
        data = load_dataset(cfg.dataset, "test", data_root or cfg.data_root).subset(n_eval)
        attack = build_attack("pgd", model, seed=seed)
        sums: dict = {}
        for x, y in BatchLoader(data, batch_size, device=device):
            part = statistics_shift(model, x, attack(x, y))
            for who, d in part.items():
                for m, vals in d.items():
                    acc = sums.setdefault(who, {}).setdefault(m, [0.0] * len(vals))
                    for j, v in enumerate(vals):
                        acc[j] += v * len(y)
        shift = {who: {m: [v / len(data) for v in vals] for m, vals in d.items()} for who, d in sums.items()}
        res = {"key": key, "attack": repr(attack), "n": len(data), "stages": list(model.target_stages), **shift,
               "substitute_val_acc": substitute_accuracy(model, val_dataset, data_root or cfg.data_root, device)}
        write_json_atomic(path, res)
        return res


def analysis_stages(points: Sequence[tuple[TrainPoint, str]], spec: StudyEval, data_root: str | None, device: str,
                    force: bool) -> list[Stage]:
    """One statistics-shift stage per (ABNN point, dataset of its substitute's accuracy), each
    after the point's training *and* evaluation: both hold the run folder's lock."""
    return [Stage(f"analysis:{p.name}", job_analysis,
                  (p.run, val, spec.n_eval, spec.batch_size, spec.seed, data_root, device, force),
                  after=(p.name, f"eval:{p.name}"), weight=0.2) for p, val in points]


def run_substitute_study(preset: Table1Preset, out: str | Path, *, table1_dir: str | Path | None = None,
                         data_root: str | None = None, device: str = "cpu", force: bool = False,
                         progress: bool = True, command: str = "", jobs: int | None = None,
                         threads: int | None = None) -> dict:
    """Train (or reuse) the substitutes and their ABNN models, evaluate them, measure the
    statistics shift; write report.md, results.json and substitute_study.png into ``out``."""
    from ..reports.studies import write_substitute_study_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    table1 = Path(table1_dir) if table1_dir is not None else None
    subs, sub_points = substitutes(preset, out, table1, data_root, device)
    models = [abnn_point(preset, s, out, table1, data_root, device) for s in subs]
    spec = study_eval(preset)
    stages, done = train_and_eval_stages(sub_points + models, models, spec, data_root, device, force=force)
    stages += analysis_stages([(p, s.val_dataset) for s, p in zip(subs, models)], spec, data_root, device, force)
    results, workers, per_stage = schedule("substitute study", stages, done, jobs=jobs, threads=threads,
                                           progress=progress, quiet=("analysis:",))

    records = []
    for sub, p in zip(subs, models):
        tr, e, an = results[p.name], eval_of(p, models, results), results[f"analysis:{p.name}"]
        records.append({
            "substitute": sub.name, "label": sub.label, "in_domain": sub.in_domain, "run": str(p.run),
            "substitute_arch": sub.arch, "substitute_source": sub.spec, "substitute_val_dataset": sub.val_dataset,
            "substitute_val_acc": an["substitute_val_acc"],
            "substitute_train_seconds": results[f"sub:{sub.name}"]["train_seconds"] if sub.train else None,
            "clean_acc": e.clean_acc, "robust_acc": e.robust_acc, "worst_case_acc": e.worst_case().robust_acc,
            "n_eval": e.n_eval, "train_seconds": tr["train_seconds"], "cost_N_per_step": tr["cost_N_per_step"],
            "statistics_shift": {k: an[k] for k in ("attack", "n", "stages", "substitute", "target")},
        })
    summary = {"preset": preset.to_dict(), "records": records, "evaluation": spec.key(), "command": command,
               "versions": software_versions(), "workers": workers, "threads_per_stage": per_stage,
               "pipeline_seconds_this_call": time.perf_counter() - t_start}
    write_json_atomic(out / "results.json", summary)
    write_substitute_study_report(out, summary)
    log(f"report written to {out / 'report.md'}")
    return summary
