"""The method registry: every training method by name, in one place (paper s. 2.2, 3.3).

A method is "how a batch becomes a loss" plus which model it trains; the loop, checkpoints,
cost counter and schedule are shared (:mod:`abnn.training.loop`).  Each entry states its batch
loss, the kind of model it trains (a plain target, ABNN's target with adaptive BN and a frozen
substitute, a target with an OUDefend block, or a probe on a frozen substitute), its display
name, and the counted cost per step it is expected to show (METHOD.md s. 5; the loop *counts*
the passes, the expectation is what a test compares them with).

    abnn train --list-methods
    from abnn.training.methods import register, Method   # a new method is one entry

A new method is one :func:`register` call; it is then a choice of ``abnn train --method``, of
``TrainConfig.method`` and of every reproduce table that names it.  An entry also carries the
method's rows in the paper's tables (:class:`PaperRow`, :func:`paper_row`), which the reproduce
reports print beside the measured numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD
from ..config import TrainConfig
from ..errors import AbnnError
from .distributed import unwrap

__all__ = ["METHODS", "PAPER_TABLES", "BatchLoss", "Method", "PaperRow", "batch_loss_for", "check_config",
           "clean_loss", "describe_methods", "fast_at_loss", "fgsm_rs_example", "get_method", "paper_row",
           "pgd_at_loss", "register"]

BatchLoss = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]

#: the kinds of model a method trains (built by :func:`abnn.runs.build_model_from_config`)
MODEL_KINDS = ("plain", "abnn", "oudefend", "probe")


def clean_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Standard, ABNN and probe training: cross-entropy on clean inputs."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def pgd_at_loss(eps: float, alpha: float, steps: int) -> BatchLoss:
    """PGD-AT: cross-entropy on L-inf PGD examples (random start) generated each step.  The
    attack runs with the model in eval mode (BN running statistics untouched by attack
    iterations, as in torchattacks); the training pass runs in train mode.  Under DDP the attack
    uses the module inside the wrapper (local, no communication); it runs with the autocast dtype
    the caller set (the training step's, passed on explicitly: attacks otherwise run in float32),
    in the batch's memory layout (the training step's ``channels_last``, not the attack's own CPU
    default), so that every method trains in the same layout and their costs stay comparable, and
    trains on the last iterate (Madry et al.), not on the first that fools the model."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        x_adv = PGD(unwrap(model), eps=eps, alpha=alpha, steps=steps, random_start=True, first_fooling=False,
                    channels_last=False, amp=amp)(x, y)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits

    return loss


def fast_at_loss(eps: float, alpha: float) -> BatchLoss:
    """Fast-AT, FGSM with a random start (Wong, Rice & Kolter, ICLR 2020, "Fast is better than
    free"; METHOD.md s. 5): delta ~ U(-eps, eps), one step ``delta += alpha * sign(grad)``
    (alpha = 1.25 eps by default), projection to the eps-ball, clamp of ``x + delta`` to [0, 1];
    then a training pass on the result.  4N per step: the attack's forward and input-gradient
    backward, the training forward and backward.

    BN mode during the attack step: **train mode**, as in the authors' reference code
    (``train_fgsm.py`` keeps ``model.train()`` for the FGSM pass: batch statistics, and the
    running statistics are updated by both passes).  Our PGD-AT makes its examples in eval mode
    instead (METHOD.md s. 5); both choices follow their method's reference.  Under DDP the attack
    pass uses the module inside the wrapper, as PGD-AT's does."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(fgsm_rs_example(unwrap(model), x, y, eps=eps, alpha=alpha))
        return F.cross_entropy(logits, y), logits

    return loss


def fgsm_rs_example(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float) -> Tensor:
    """Fast-AT's training example: FGSM from a uniform random start in the eps-ball, in the
    model's current mode (train mode during training), projected to the eps-ball and [0, 1]."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    return torch.minimum(torch.maximum(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp_(0, 1)


#: the paper's tables a method may have a row in: Table 1 (CIFAR-10, PGD) and the video tables
#: (UCF-101: Table 2, PGD; Table 3, ROA)
PAPER_TABLES = ("table1", "video")


@dataclass(frozen=True)
class PaperRow:
    """A method's row in one of the paper's tables, for comparison only (METHOD.md s. 6):
    accuracies in %, the training cost per step as the paper prints it ("12N"), and ROA where
    the table has it (the paper reports no ROA on CIFAR-10)."""

    clean: float
    pgd: float
    cost: str
    roa: float | None = None


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        name: the registry name (``--method NAME``).
        display: the name reports print ("No defense", "ABNN", ...).
        summary: one line for ``--list-methods`` (cite the source).
        loss: ``loss(cfg) -> BatchLoss``, how a batch becomes a loss.
        model: the kind of model trained, one of :data:`MODEL_KINDS`.
        cost: ``cost(cfg) -> N per step`` the pass counter should show (one network pass over
            the batch = 1N; METHOD.md s. 5).
        substitute: whether the method needs a pretrained substitute (``--substitute``).
        paper: the method's rows in the paper's tables by table (:data:`PAPER_TABLES`); none
            for a method the paper does not report (Fast-AT).
    """

    name: str
    display: str
    summary: str
    loss: Callable[[TrainConfig], BatchLoss]
    model: str = "plain"
    cost: Callable[[TrainConfig], float] = lambda cfg: 2.0
    substitute: bool = False
    paper: Mapping[str, PaperRow] = field(default_factory=dict, hash=False)


METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace`` an entry of the same name explicitly)."""
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is registered already; pass replace=True to replace it")
    if method.model not in MODEL_KINDS:
        raise ValueError(f"method {method.name!r}: model must be one of {', '.join(MODEL_KINDS)}, got {method.model!r}")
    if set(method.paper) - set(PAPER_TABLES):
        raise ValueError(f"method {method.name!r}: paper rows are for the tables {', '.join(PAPER_TABLES)}, got "
                         f"{', '.join(method.paper)}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise AbnnError(f"unknown --method {name!r}; choose one of {', '.join(METHODS)} (abnn train --list-methods)")
    return METHODS[name]


def paper_row(method: str, table: str) -> PaperRow | None:
    """The row of ``method`` in the paper's ``table`` (one of :data:`PAPER_TABLES`), or None where
    the paper does not report it."""
    return get_method(method).paper.get(table)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg``, checked before anything runs: its method, dataset and architecture are entries of
    the registries (:data:`METHODS`, :data:`abnn.data.datasets.DATASETS`, :data:`abnn.models.MODELS`),
    a method that needs a substitute has one, and :meth:`TrainConfig.validate` accepts its values;
    else one line naming the flag."""
    from ..data.datasets import DATASETS
    from ..models import MODELS

    cfg.check_choice("method", tuple(METHODS))
    cfg.check_choice("dataset", tuple(DATASETS))
    cfg.check_choice("arch", tuple(MODELS))
    if METHODS[cfg.method].substitute and not cfg.substitute:
        raise AbnnError(f"method {cfg.method} needs a pretrained substitute: --substitute RUN_DIR|WEIGHTS|"
                        "IMAGENET1K_V1 (make one with `abnn pretrain-substitute`)")
    return cfg.validate()


def batch_loss_for(cfg: TrainConfig) -> BatchLoss:
    """The batch loss of ``cfg.method`` with the config's attack settings."""
    return get_method(cfg.method).loss(cfg)


def describe_methods() -> str:
    """The text of ``abnn train --list-methods``."""
    lines = ["Methods (abnn train --method NAME); counted cost per step in N = one network pass over the batch:", ""]
    for m in METHODS.values():
        lines.append(f"{m.name}  [{m.display}, {m.cost(TrainConfig(method=m.name)):g}N/step"
                     f"{', needs --substitute' if m.substitute else ''}]  {m.summary}")
    return "\n".join(lines)


def _pgd_at(cfg: TrainConfig) -> BatchLoss:
    return pgd_at_loss(cfg.at_eps, cfg.at_alpha, cfg.at_steps)


for _m in (
    Method("standard", "No defense", "cross-entropy on clean data", lambda cfg: clean_loss,
           paper={"table1": PaperRow(93.4, 0.0, "2N"), "video": PaperRow(93.0, 0.0, "2N", roa=7.0)}),
    Method("abnn", "ABNN", "clean data; target with adaptive BN (eq. 2) beside a frozen substitute (Lo & Patel)",
           lambda cfg: clean_loss, model="abnn", cost=lambda cfg: 3.0, substitute=True,
           paper={"table1": PaperRow(87.5, 31.5, "3N"), "video": PaperRow(68.3, 43.4, "3N", roa=24.4)}),
    Method("pgd-at", "PGD-AT", "PGD adversarial training, t_max = --at-steps (Madry et al., ICLR 2018)", _pgd_at,
           cost=lambda cfg: 2.0 * (cfg.at_steps + 1), paper={"table1": PaperRow(83.3, 51.6, "12N")}),
    Method("fast-at", "Fast-AT", "FGSM from a random start (Wong, Rice & Kolter, ICLR 2020)",
           lambda cfg: fast_at_loss(cfg.at_eps, cfg.fast_at_alpha), cost=lambda cfg: 4.0),
    Method("oudefend", "OUDefend", "PGD-AT of a target with a feature-restoration block (paper eq. 6)", _pgd_at,
           model="oudefend", cost=lambda cfg: 4.0 * (cfg.at_steps + 1),
           paper={"video": PaperRow(62.0, 58.6, "24N", roa=13.6)}),
    Method("probe", "Probe", "clean data; a small head on a frozen substitute's pooled last tap (the "
           "robust-substitute study's control)", lambda cfg: clean_loss, model="probe", cost=lambda cfg: 3.0,
           substitute=True),
):
    register(_m)
