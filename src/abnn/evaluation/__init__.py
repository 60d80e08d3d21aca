"""Evaluation: the one runner (:func:`run_attacks`), typed results, the suites and their checks.

    from abnn.evaluation import run_attacks, run_suite
    res = run_attacks(model, data, ["pgd", "apgd-ce:steps=20"], seed=0)   # EvalResult
    suite = run_suite(model, data, quick=True, out_dir="suite")           # SuiteResult
"""

from .attribution import Attribution, PathSwap, gradient_attribution, path_swap, summarize_attribution
from .clips import ClipStackEvaluator
from .crosscheck import crosscheck_torchattacks
from .results import SCHEMA_VERSION, AttackResult, Curve, EvalResult, SuiteResult, WorstCase, read_evaluation
from .runner import PROGRESS_FILE, derive_seed, evaluate_run, run_attacks
from .suites import BUDGETS, SUITES, run_suite, run_suite_on_run, suite_specs

__all__ = ["Attribution", "PathSwap", "gradient_attribution", "path_swap", "summarize_attribution",
            "ClipStackEvaluator"]
__all__ += ["AttackResult", "BUDGETS", "Curve", "EvalResult", "PROGRESS_FILE", "SCHEMA_VERSION", "SUITES",
           "SuiteResult", "WorstCase", "crosscheck_torchattacks", "derive_seed", "evaluate_run", "read_evaluation",
           "run_attacks", "run_suite", "run_suite_on_run", "suite_specs"]
