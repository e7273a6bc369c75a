"""Needle-in-a-haystack documents (qgate.evaluation.data, "needle") and exact-match retrieval scoring."""

import re

from qgate.evaluation.data import load_dataset_dict


def load(**options):
    return load_dataset_dict("needle", options)


def retrieved(answer: str, output: str) -> bool:
    return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", output) is not None


def process_results(doc, results):
    return {"acc": float(retrieved(doc["answer"], results[0]))}
