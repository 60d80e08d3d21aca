"""Training: one loop for every method, the counted cost, atomic checkpoints, distributed runs."""

from .cost import PassCounter, attach_networks
from .loop import TrainStep, accuracy, batch_loss_for, clean_loss, pgd_at_loss, resolve_amp, resolve_device, train

__all__ = ["PassCounter", "attach_networks", "accuracy", "batch_loss_for", "clean_loss", "pgd_at_loss",
           "resolve_amp", "resolve_device", "train", "TrainStep"]
