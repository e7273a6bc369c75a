"""Offline perplexity text; scored by lm-eval's own wikitext process_results (words and bytes of "page")."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results  # noqa: F401  (the task's scorer)

from qgate.evaluation.data import load_dataset_dict


def load(**options):
    return load_dataset_dict("pg_essays", options)
