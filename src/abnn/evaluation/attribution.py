"""Forensics of ABNN's input gradient (issue 19): where does the attacker's gradient go?

:func:`gradient_attribution` splits the input gradient of the cross-entropy exactly into the part
through the target's own path and the parts through the substitute (paper s. 2, eq. 2): the
logits depend on ``x`` directly (the target path) and through each substitute feature ``z_s^k``,
which enters eq. (2) twice, through its moments ``(mu_s, sigma_s)`` and through the AdaIN
encoder ``(gamma_s, beta_s)``.  By the chain rule

    dL/dx = d/dx L(x; z_s held)  +  sum_k  (dz_s^k/dx)^T [ dL/dz_s^k |_stats + dL/dz_s^k |_encoder ]

Each term is computed as a vector-Jacobian product: one forward with the substitute features
fed to the adaptive layers as detached leaves (two per stage: one for the moments, one for the
encoder), one backward to the input and the leaves, then one backward of each leaf's gradient
through the substitute.

:func:`path_swap` feeds the two branches different images: the target path sees ``x_i`` and the
substitute ``x_j`` of another class, and counts which label the prediction follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import UnsupportedModelError
from ..framework import ABNN

__all__ = ["Attribution", "PathSwap", "forensics", "forensics_run", "gradient_attribution", "path_swap",
           "summarize_attribution", "swap_partners"]


@dataclass
class Attribution:
    """The exact split of one batch's input gradient ``d CE / dx`` (loss summed over the batch, so
    each sample's gradient is its own).

    Attributes:
        target: through the target path, every substitute feature held constant.
        stats: per stage, through that stage's ``(mu_s, sigma_s)`` (one entry summing all stages
            when computed with ``per_stage=False``).
        encoder: per stage, through that stage's ``(gamma_s, beta_s)`` (likewise).
        stages: the stage names of ``stats`` / ``encoder`` (``("all",)`` without per-stage parts).
        logits: of the forward pass (eval mode).

    ``full`` = target + sum(stats) + sum(encoder), exactly (up to float rounding).
    """

    target: Tensor
    stats: tuple[Tensor, ...]
    encoder: tuple[Tensor, ...]
    stages: tuple[str, ...]
    logits: Tensor

    @property
    def full(self) -> Tensor:
        return self.target + self.substitute

    @property
    def substitute(self) -> Tensor:
        return sum(self.stats) + sum(self.encoder)

    def parts(self) -> dict[str, Tensor]:
        """``target``, ``substitute``, ``stats``, ``encoder``, and ``stats/<stage>``, ``encoder/<stage>``."""
        out = {"target": self.target, "substitute": self.substitute, "stats": sum(self.stats),
               "encoder": sum(self.encoder)}
        if len(self.stages) > 1:
            out.update({f"stats/{s}": t for s, t in zip(self.stages, self.stats)})
            out.update({f"encoder/{s}": t for s, t in zip(self.stages, self.encoder)})
        return out

    def metrics(self) -> dict[str, dict[str, Tensor]]:
        """Per part, per sample (tensors of shape (B,)), against the full gradient G:

        * ``share`` = <P, G> / ||G||^2, the part's projection on G: the shares of a partition
          (target + substitute, or target + stats + encoder) sum to 1 per sample;
        * ``norm_ratio`` = ||P|| / ||G||;
        * ``cosine`` = <P, G> / (||P|| ||G||) (0 where either is 0);
        * ``sign_agreement``: fraction of pixels where sign(P) == sign(G) (what L-inf PGD steps on).
        """
        g = self.full.flatten(1)
        gg = (g * g).sum(1)
        gn = gg.sqrt()
        out = {}
        for name, part in self.parts().items():
            p = part.flatten(1)
            dot = (p * g).sum(1)
            pn = p.norm(dim=1)
            out[name] = {
                "share": torch.where(gg > 0, dot / gg, torch.zeros_like(dot)),
                "norm_ratio": torch.where(gn > 0, pn / gn, torch.zeros_like(pn)),
                "cosine": torch.where((gn > 0) & (pn > 0), dot / (gn * pn).clamp_min(1e-300), torch.zeros_like(dot)),
                "sign_agreement": (torch.sign(p) == torch.sign(g)).to(g.dtype).mean(1),
            }
        return out


def gradient_attribution(model: ABNN, x: Tensor, y: Tensor, *, per_stage: bool = True) -> Attribution:
    """Split the input gradient of ``CE(model(x), y)`` (summed over the batch) exactly into the
    target path and the substitute's statistics / encoder paths (module docstring), per stage
    unless ``per_stage=False`` (2 instead of 2K backward passes through the substitute).  The
    model runs in eval mode (restored afterwards); no parameter ``.grad`` is touched."""
    if not isinstance(model, ABNN):
        raise UnsupportedModelError(f"gradient attribution needs an ABNN model, got {type(model).__name__}")
    model.check_tensor(x)
    if model.check_input:
        model.check_pixels(x)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            feats = model.substitute_features(xg)
            s_leaves = [f.detach().requires_grad_(True) for f in feats]
            e_leaves = [f.detach().requires_grad_(True) for f in feats]
            logits = model.target_forward(xg, s_leaves, e_leaves)
            loss = F.cross_entropy(logits, y, reduction="sum")
            g_target, *g_z = torch.autograd.grad(loss, [xg, *s_leaves, *e_leaves])
            k = len(feats)

            def through_substitute(idx: list[int], grads: list[Tensor]) -> Tensor:
                (g,) = torch.autograd.grad([feats[i] for i in idx], xg, grad_outputs=grads, retain_graph=True)
                return g

            if per_stage:
                stats = tuple(through_substitute([i], [g_z[i]]) for i in range(k))
                enc = tuple(through_substitute([i], [g_z[k + i]]) for i in range(k))
                stages = model.target_stages
            else:
                stats = (through_substitute(list(range(k)), g_z[:k]),)
                enc = (through_substitute(list(range(k)), g_z[k:]),)
                stages = ("all",)
    finally:
        model.train(was_training)
    return Attribution(target=g_target, stats=stats, encoder=enc, stages=tuple(stages), logits=logits.detach())


def summarize_attribution(metrics: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Medians over samples of :meth:`Attribution.metrics` (concatenated over batches)."""
    return {part: {k: float(v.median()) for k, v in m.items()} for part, m in metrics.items()}


# ------------------------------------------------------------------------------------ path swap


@dataclass
class PathSwap:
    """Predictions with the target path on image ``i`` and the substitute on image ``partner[i]``.

    Attributes:
        partner: per image, the index of the image the substitute saw.
        y, y_partner: the labels of the two images.
        pred: the swapped prediction; pred_normal: the normal forward's.
    """

    partner: Tensor
    y: Tensor
    y_partner: Tensor
    pred: Tensor
    pred_normal: Tensor

    def summary(self) -> dict[str, Any]:
        """Fractions of swapped predictions equal to the target image's label, the substitute
        image's label, or neither; and the normal forward's accuracy for reference."""
        n = len(self.y)
        tgt, sub = self.pred == self.y, self.pred == self.y_partner
        return {"n": n, "target_label": float(tgt.float().mean()), "substitute_label": float(sub.float().mean()),
                "neither": float((~tgt & ~sub).float().mean()),
                "clean_acc": float((self.pred_normal == self.y).float().mean()),
                "unchanged": float((self.pred == self.pred_normal).float().mean())}


def swap_partners(y: Tensor, *, seed: int) -> Tensor:
    """Per image ``i``, a partner ``j`` drawn uniformly (seeded) among the images of another label."""
    y = y.cpu()
    if len(torch.unique(y)) < 2:
        raise ValueError("path swap needs images of at least two labels")
    gen = torch.Generator().manual_seed(seed)
    partner = torch.empty(len(y), dtype=torch.long)
    for i in range(len(y)):
        cand = (y != y[i]).nonzero().squeeze(1)
        partner[i] = cand[torch.randint(len(cand), (1,), generator=gen)]
    return partner


@torch.no_grad()
def path_swap(model: ABNN, x: Tensor, y: Tensor, *, seed: int = 0, batch_size: int = 256,
              partner: Tensor | None = None) -> PathSwap:
    """Run the target path on ``x[i]`` and the substitute on ``x[partner[i]]`` (default:
    :func:`swap_partners`, a seeded partner of another label), via
    ``model(x_i, substitute_input=x_j)``, in eval mode.  ``x``: float pixels in [0, 1] or uint8."""
    if not isinstance(model, ABNN):
        raise UnsupportedModelError(f"path swap needs an ABNN model, got {type(model).__name__}")
    partner = swap_partners(y, seed=seed) if partner is None else partner.cpu().long()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    preds, normal = [], []
    try:
        for i in range(0, len(x), batch_size):
            xi = _pixels(x[i:i + batch_size], device, dtype)
            xj = _pixels(x[partner[i:i + batch_size]], device, dtype)
            preds.append(model(xi, substitute_input=xj).argmax(1).cpu())
            normal.append(model(xi).argmax(1).cpu())
    finally:
        model.train(was_training)
    y = y.cpu()
    return PathSwap(partner=partner, y=y, y_partner=y[partner], pred=torch.cat(preds), pred_normal=torch.cat(normal))


def _pixels(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = x.to(device)
    return x.to(dtype).div_(255) if x.dtype == torch.uint8 else x.to(dtype)


# ------------------------------------------------------------------------------------ run folders


def forensics(model: ABNN, x: Tensor, y: Tensor, *, batch_size: int = 256, seed: int = 0) -> dict[str, Any]:
    """Gradient attribution (medians over samples of :meth:`Attribution.metrics`, computed batch
    by batch) and the path swap summary on ``(x, y)`` (float pixels in [0, 1] or uint8)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    per_sample: dict[str, dict[str, list[Tensor]]] = {}
    for i in range(0, len(x), batch_size):
        att = gradient_attribution(model, _pixels(x[i:i + batch_size], device, dtype), y[i:i + batch_size].to(device))
        for part, m in att.metrics().items():
            for k, v in m.items():
                per_sample.setdefault(part, {}).setdefault(k, []).append(v.detach().cpu())
    metrics = {part: {k: torch.cat(v) for k, v in m.items()} for part, m in per_sample.items()}
    return {"n": len(x), "attribution_median": summarize_attribution(metrics),
            "definitions": {"share": "<part, full> / ||full||^2 (shares of target+substitute, or of "
                                     "target+stats+encoder, sum to 1 per sample)",
                            "norm_ratio": "||part|| / ||full||", "cosine": "cos(part, full)",
                            "sign_agreement": "fraction of pixels with sign(part) == sign(full)"},
            "path_swap": path_swap(model, x, y, seed=seed, batch_size=batch_size).summary()}


def forensics_run(run_dir: str | Any, *, n_eval: int = 1000, batch_size: int = 256, data_root: str | None = None,
                  device: str = "cpu", seed: int = 0, out: str | Any | None = None) -> dict[str, Any]:
    """:func:`forensics` on a finished ABNN run and the first ``n_eval`` test samples of its
    dataset; written as JSON to ``out`` (default ``run_dir/forensics.json``)."""
    from pathlib import Path

    from ..data import load_dataset
    from ..files import write_json_atomic
    from ..runs import load_run
    from .runner import as_tensors

    model, cfg = load_run(run_dir, device=device)
    if not isinstance(model, ABNN):
        raise UnsupportedModelError(f"forensics need an ABNN run; {run_dir} is a {cfg.method} run")
    data = load_dataset(cfg.dataset, "test", data_root or cfg.data_root, frames=cfg.frames).subset(n_eval)
    x, y = as_tensors(data, n_eval)
    res = {"run": str(run_dir), "dataset": cfg.dataset, "seed": seed, "batch_size": batch_size,
           **forensics(model, x, y, batch_size=batch_size, seed=seed)}
    write_json_atomic(Path(out) if out is not None else Path(run_dir) / "forensics.json", res)
    return res
