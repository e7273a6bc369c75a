"""JSON-schema items (qgate.evaluation.jsonschema_task, materialized by qgate.evaluation.data) and scoring."""

import json
import math

from qgate.evaluation.data import load_dataset_dict


def load(**options):
    return load_dataset_dict("json_schema", options)


def process_results(doc, results):
    from qgate.evaluation.jsonschema_task import score_output

    scores = score_output(json.loads(doc["item_json"]), results[0])
    value = scores.get("value_correct")
    return {
        "parseable": float(bool(scores["parseable"])),
        "schema_valid": float(bool(scores["schema_valid"])),
        # NaN where the prompt does not determine the values; left out of the mean
        "value_correct": float("nan") if value is None else float(bool(value)),
    }


def mean_where_determined(items):
    values = [v for v in items if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
