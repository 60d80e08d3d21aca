"""Auto-PGD (APGD) and its targeted variant APGD-T, L-inf.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (Algorithm 1 and s. 3).  Written from the paper.

APGD is PGD with momentum whose step size starts at ``2 * eps`` and is halved at checkpoints
``w_j = ceil(p_j * N)`` (``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when

1. the loss increased in fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last
   checkpoint, or
2. the step size was not halved at the last checkpoint and the best loss has not improved since;

after a halving the iterate restarts from the best point found so far.  Everything is per sample
(one step size, one counter, one best point per sample) and vectorised over the batch.

Implementation choices where the paper leaves room (see also the class docstrings):

* the first iterate ``x^(0)`` is drawn uniformly from the eps-ball (clamped to [0, 1]);
* after a restart from ``x_max`` the momentum term is ``x_max - x^(k)`` (the paper's formula
  read literally) and the loss compared by condition 1 at the next step is ``f(x_max)``;
* samples the model already misclassifies on the clean input are returned unchanged and not
  attacked; each restart runs only on the samples not fooled yet (so for a batch-dependent
  model, the batch seen by the model shrinks over restarts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attack, AttackOptionError, check_budget, check_choice, check_count

__all__ = ["APGD", "APGDT", "apgd_checkpoints", "dlr_loss", "dlr_targeted_loss"]

_MOMENTUM = 0.75  # alpha of Algorithm 1


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``0 < w_j < steps`` after which APGD may halve its step.

    The paper's ``w_j = ceil(p_j * N)`` with ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in the integer form of the authors' code:
    the first gap is ``max(int(0.22 N), 1)``, each next one ``max(int(0.03 N), 1)`` shorter, down to
    ``max(int(0.06 N), 1)``.  Both give 22, 41, 57, 70, 80, 87, 93, 99 at N = 100 (and the same at
    N = 1000); at small N the integer form checks more often, and it is the stronger one there: at
    20 steps, with the paper's rounding, APGD-CE left 20.5% robust accuracy where the reference
    implementation left 19.4% (reference ResNet-20, first 200 CIFAR-10 test images, eps 1/255,
    mean over 5 seeds); with this schedule, 19.3%.
    """
    gap, shrink, floor = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, w = [], gap
    while w < steps:
        out.append(w)
        gap = max(gap - shrink, floor)
        w += gap
    return out


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample Difference of Logits Ratio (Croce & Hein 2020, eq. 6), to be maximised:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` with ``z_pi`` the logits sorted decreasingly."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the model gives {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Per-sample targeted DLR (Croce & Hein 2020, eq. 7), to be maximised:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``."""
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model gives {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


class APGD(Attack):
    """Untargeted L-inf Auto-PGD (Croce & Hein, ICML 2020), cross-entropy or DLR loss.

    Returns, per sample, a misclassified iterate if one was found (the latest), else the iterate
    of highest loss (over all restarts).  Samples misclassified on the clean input are returned
    unchanged.

    Args:
        model: maps [0, 1] inputs (B, C, ...) (images or clips) to logits (B, K).
        eps: L-inf radius.
        steps: iterations N per restart (one forward and backward pass each, plus one for x^(0)).
        loss: ``"ce"`` (cross-entropy) or ``"dlr"`` (Difference of Logits Ratio, needs K >= 3).
        restarts: random restarts; each runs only on the samples not fooled yet.
        rho: condition-1 threshold (fraction of steps that must increase the loss).
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`.

    Example::

        x_adv = APGD(model, eps=8/255, steps=100, loss="dlr")(x, y)
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, steps: int = 100, loss: str = "ce",
                 restarts: int = 1, rho: float = 0.75, seed: int | None = None,
                 channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        self.eps = check_budget("eps", eps)
        self.steps = check_count("steps", steps, minimum=1)
        self.loss_type = check_choice("loss", loss, ("ce", "dlr"))  # not ``self.loss``: the contract's loss method
        self.restarts = check_count("restarts", restarts, minimum=1)
        if not (isinstance(rho, (int, float)) and 0 < rho <= 1):
            raise AttackOptionError(f"rho must be in (0, 1], got {rho!r}")
        self.rho = float(rho)

    # losses -------------------------------------------------------------------------------------
    def loss_indiv(self, logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        """Per-sample loss that the attack maximises."""
        if self.loss_type == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if self.loss_type == "dlr":
            return dlr_loss(logits, y)
        if target is None:  # dlr-targeted without a target: aim at the most likely wrong class
            target = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
        return dlr_targeted_loss(logits, y, target)

    def loss(self, logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """The attack's loss summed over the batch (so :meth:`input_grad` uses it)."""
        return self.loss_indiv(logits, y, target).sum()

    def _check_classes(self, k: int) -> None:
        need = {"ce": 2, "dlr": 3, "dlr-targeted": 4}[self.loss_type]
        if k < need:
            raise AttackOptionError(f"{type(self).__name__} with loss {self.loss_type!r} needs at least {need} classes, the model gives {k}")

    def _loss_grad(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        loss = self.loss_indiv(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad.detach(), logits.detach()

    # one run of Algorithm 1 ---------------------------------------------------------------------
    def _run(self, x: Tensor, y: Tensor, target: Tensor | None,
             gen: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """APGD on (x, y); returns (x_out, fooled, best loss) per sample."""
        n = x.shape[0]
        view = (n,) + (1,) * (x.dim() - 1)
        lower, upper = (x - self.eps).clamp(min=0), (x + self.eps).clamp(max=1)

        def proj(z: Tensor) -> Tensor:
            return torch.maximum(torch.minimum(z, upper), lower)

        noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x_cur = proj(x + (2 * noise - 1) * self.eps)
        loss_cur, grad_cur, logits = self._loss_grad(x_cur, y, target)
        fooled = logits.argmax(1) != y
        x_out = x_cur.clone()
        x_max, loss_max, grad_max = x_cur.clone(), loss_cur.clone(), grad_cur.clone()
        x_prev = x_cur

        eta = torch.full(view, 2 * self.eps, device=x.device, dtype=x.dtype)
        checkpoints = set(apgd_checkpoints(self.steps))
        w_last = 0
        n_increase = torch.zeros(n, device=x.device, dtype=torch.long)
        loss_max_last = loss_max.clone()
        reduced_last = torch.zeros(n, device=x.device, dtype=torch.bool)

        for k in range(self.steps):
            z = proj(x_cur + eta * grad_cur.sign())
            if k == 0:
                x_new = z
            else:
                x_new = proj(x_cur + _MOMENTUM * (z - x_cur) + (1 - _MOMENTUM) * (x_cur - x_prev))
            loss_new, grad_new, logits = self._loss_grad(x_new, y, target)

            now = logits.argmax(1) != y
            x_out = torch.where(now.view(view), x_new, x_out)
            fooled |= now
            n_increase += loss_new > loss_cur
            better = loss_new > loss_max
            bv = better.view(view)
            x_max = torch.where(bv, x_new, x_max)
            grad_max = torch.where(bv, grad_new, grad_max)
            loss_max = torch.where(better, loss_new, loss_max)
            x_prev, x_cur, loss_cur, grad_cur = x_cur, x_new, loss_new, grad_new

            if k + 1 in checkpoints:
                w = k + 1
                cond1 = n_increase < self.rho * (w - w_last)
                cond2 = ~reduced_last & (loss_max <= loss_max_last)
                reduce = cond1 | cond2
                rv = reduce.view(view)
                eta = torch.where(rv, eta / 2, eta)
                x_cur = torch.where(rv, x_max, x_cur)
                grad_cur = torch.where(rv, grad_max, grad_cur)
                loss_cur = torch.where(reduce, loss_max, loss_cur)
                reduced_last = reduce
                loss_max_last = loss_max.clone()
                n_increase.zero_()
                w_last = w

        x_out = torch.where(fooled.view(view), x_out, x_max)
        return x_out, fooled, loss_max

    def _attack_remaining(self, x: Tensor, y: Tensor, target: Tensor | None, fooled: Tensor,
                          x_out: Tensor, best_loss: Tensor, gen: torch.Generator | None) -> None:
        """One APGD run on the samples not fooled yet; updates fooled/x_out/best_loss in place."""
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        xa, fa, la = self._run(x[idx], y[idx], None if target is None else target[idx], gen)
        prev = best_loss[idx]
        take = fa | (la > prev)
        x_out[idx] = torch.where(take.view((-1,) + (1,) * (x.dim() - 1)), xa, x_out[idx])
        best_loss[idx] = torch.where(take, la, prev)
        fooled[idx] = fa

    def _start(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.no_grad():
            logits = self.model(x)
        self._check_classes(logits.shape[1])
        fooled = logits.argmax(1) != y
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        return logits, fooled, x.clone(), best_loss

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        gen = self.generator(x.device)
        _, fooled, x_out, best_loss = self._start(x, y)
        for _ in range(self.restarts):
            if fooled.all():
                break
            self._attack_remaining(x, y, None, fooled, x_out, best_loss, gen)
        return x_out


class APGDT(APGD):
    """Targeted L-inf Auto-PGD with the targeted DLR loss (APGD-T, Croce & Hein, ICML 2020).

    Loops over the ``n_target_classes`` most likely wrong classes of the clean input (highest
    logit first); for each target and restart it runs :class:`APGD`'s Algorithm 1 maximising the
    targeted DLR loss on the samples not yet fooled only (a sample counts as fooled as soon as it
    is misclassified, into any class).  Needs K >= 4 classes.

    Args:
        model: maps [0, 1] inputs (B, C, ...) to logits (B, K).
        eps: L-inf radius.
        steps: iterations per target and restart.
        n_target_classes: number of target classes (clipped to K - 1; ``None`` = all K - 1).
        restarts: restarts per target class.
        rho: condition-1 threshold.
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`.
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, steps: int = 100,
                 n_target_classes: int | None = 9, restarts: int = 1, rho: float = 0.75,
                 seed: int | None = None, channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, eps=eps, steps=steps, loss="ce", restarts=restarts, rho=rho, seed=seed,
                         channels_last=channels_last, amp=amp)
        if n_target_classes is not None:
            n_target_classes = check_count("n_target_classes", n_target_classes, minimum=1)
        self.loss_type = "dlr-targeted"
        self.n_target_classes = n_target_classes

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        gen = self.generator(x.device)
        logits, fooled, x_out, best_loss = self._start(x, y)
        k = logits.shape[1]
        n_t = k - 1 if self.n_target_classes is None else min(self.n_target_classes, k - 1)
        order = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        for t in range(n_t):
            target = order[:, t]
            for _ in range(self.restarts):
                if fooled.all():
                    return x_out
                self._attack_remaining(x, y, target, fooled, x_out, best_loss, gen)
        return x_out
