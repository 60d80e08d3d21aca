"""Training: one loop for every method, the counted cost, atomic checkpoints, distributed runs."""

from .cost import PassCounter, attach_networks
from .loop import train
from .methods import batch_loss_for, check_config, clean_loss, pgd_at_loss
from .results import TrainResult
from .step import TrainStep, resolve_amp, resolve_device
from .trainer import Trainer
from .validation import accuracy

__all__ = ["PassCounter", "TrainResult", "TrainStep", "Trainer", "accuracy", "attach_networks", "batch_loss_for",
           "check_config", "clean_loss", "pgd_at_loss", "resolve_amp", "resolve_device", "train"]
