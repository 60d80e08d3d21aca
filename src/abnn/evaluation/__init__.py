"""Evaluation: clean and robust accuracy under a set of attacks."""

from .crosscheck import crosscheck_torchattacks
from .robustness import ATTACK_BUILDERS, build_attack, evaluate, evaluate_run
from .suite import BUDGETS, run_suite, run_suite_on_run

__all__ = ["ATTACK_BUILDERS", "BUDGETS", "build_attack", "crosscheck_torchattacks", "evaluate", "evaluate_run",
           "run_suite", "run_suite_on_run"]
