"""Training cost, counted as the code runs (paper s. 3.3).

The unit N is one pass (forward or backward) of one network over the batch.  A
:class:`PassCounter` attaches a forward hook to each network; when the network's output is part
of an autograd graph, a tensor hook on it counts the backward pass that reaches it (once per
forward, however many outputs).  Nothing is inferred from a formula: a frozen substitute whose
outputs need no gradient is never counted as a backward pass, an attack step that
back-propagates to the input is.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

from torch import Tensor, nn


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class PassCounter:
    """Count forward and backward passes per named network while :meth:`active`."""

    def __init__(self) -> None:
        self.forward: dict[str, int] = defaultdict(int)
        self.backward: dict[str, int] = defaultdict(int)
        self.steps = 0
        self._active = False
        self._handles: list = []

    def attach(self, name: str, module: nn.Module) -> "PassCounter":
        self._handles.append(module.register_forward_hook(lambda m, i, o: self._on_forward(name, o)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_forward(self, name: str, out) -> None:
        if not self._active:
            return
        self.forward[name] += 1
        fired = [False]

        def on_grad(grad: Tensor) -> None:
            if self._active and not fired[0]:
                fired[0] = True
                self.backward[name] += 1

        for t in _tensors(out):
            if t.requires_grad:
                t.register_hook(on_grad)

    @contextlib.contextmanager
    def active(self, step: bool = True) -> Iterator[None]:
        """Count passes inside the block; ``step`` counts it as one training step."""
        self._active = True
        try:
            yield
        finally:
            self._active = False
            if step:
                self.steps += 1

    def total(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def per_step(self) -> float:
        return self.total() / self.steps if self.steps else 0.0

    def summary(self) -> dict:
        """Counts per network, the total and N per step (what reports show)."""
        nets = sorted(set(self.forward) | set(self.backward))
        return {
            "steps": self.steps,
            "per_network": {n: {"forward": self.forward[n], "backward": self.backward[n]} for n in nets},
            "total_N": self.total(),
            "N_per_step": self.per_step(),
        }

    def state_dict(self) -> dict:
        return {"forward": dict(self.forward), "backward": dict(self.backward), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.forward = defaultdict(int, state.get("forward", {}))
        self.backward = defaultdict(int, state.get("backward", {}))
        self.steps = int(state.get("steps", 0))


def attach_networks(counter: PassCounter, model: nn.Module) -> PassCounter:
    """Attach the networks of a model: ``target`` and ``substitute`` for ABNN, ``substitute`` and
    ``head`` for a probe, else ``target``;
    plus ``denoiser`` for a model carrying an OUDefend block."""
    from ..framework import ABNN

    from ..probe import Probe

    if isinstance(model, ABNN):
        counter.attach("target", model.target)
        counter.attach("substitute", model.substitute)
    elif isinstance(model, Probe):
        counter.attach("substitute", model.substitute)
        counter.attach("head", model.head)
    else:
        counter.attach("target", model)
    denoiser = getattr(model, "oudefend", None)
    if isinstance(denoiser, nn.Module):  # OUDefend's feature-restoration network (paper eq. 6)
        counter.attach("denoiser", denoiser)
    return counter
