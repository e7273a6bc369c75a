"""Evaluation: suites of lm-eval tasks run on an already-loaded model, every sample kept.

    from qgate.evaluation import load_suite, evaluate
    results = evaluate(model, tokenizer, load_suite("smoke"))

Names are imported lazily so that `import qgate.evaluation` stays cheap (lm-eval is loaded on first use).
"""

from __future__ import annotations

_EXPORTS = {
    "Suite": "qgate.evaluation.suite",
    "TaskSpec": "qgate.evaluation.suite",
    "load_suite": "qgate.evaluation.suite",
    "available_suites": "qgate.evaluation.suite",
    "TaskResult": "qgate.evaluation.runner",
    "evaluate": "qgate.evaluation.runner",
    "evaluate_task": "qgate.evaluation.runner",
    "make_lm": "qgate.evaluation.runner",
    "print_results_table": "qgate.evaluation.runner",
    "materialize": "qgate.evaluation.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qgate.evaluation' has no attribute {name!r}")
