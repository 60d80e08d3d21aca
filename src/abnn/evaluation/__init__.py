"""Evaluation: clean and robust accuracy under a set of attacks."""

from .robustness import ATTACK_BUILDERS, build_attack, evaluate, evaluate_run

__all__ = ["ATTACK_BUILDERS", "build_attack", "evaluate", "evaluate_run"]
