"""`qgate export RUN --lm-eval DIR`: a stored run's evaluations as lm-eval writes them.

For the baseline and each candidate (and fallback) format of every member, one folder
``DIR/<member>__<format>/`` holding what ``lm_eval --output_path DIR --log_samples`` would write for
that model: ``results_<date>.json`` (results, group_subtasks, configs, versions, n-shot,
higher_is_better, n-samples, config, task_hashes, the model, tokenizer and environment entries) and
``samples_<task>_<date>.jsonl`` (one line per document and filter: doc_id, doc, target, arguments,
resps, filtered_resps, filter, metrics, doc_hash, prompt_hash, target_hash and each metric's value).

Everything comes from the store (no model is loaded, nothing is evaluated): lm-eval's own records of
the evaluation (``lm_eval_logs``), the prompt and target columns of the samples table, and the run's
provenance (versions, git revision). A document larger than qgate keeps is written as ``{}`` (its
doc_hash still identifies it). Evaluations stored before qgate kept lm-eval's records are rebuilt
from qgate's own columns: metrics and per-sample scores exactly, arguments as the prompt alone, resps
as the output, configs empty.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path

from qgate.errors import QgateError
from qgate.files import write_atomic

BASELINE = "bf16"


def _sha(text: str) -> str:  # lm-eval's hash_string
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sanitize_model_name(name: str) -> str:  # lm-eval's folder naming of a model
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def _stringify(value):
    """lm-eval's sanitizing of resps/filtered_resps: nested lists kept, every leaf as its str."""
    if isinstance(value, (list, tuple)):
        return [_stringify(v) for v in value]
    if isinstance(value, bool):
        return str(value)
    return str(value)


def _sample_line(rec: dict, stored: dict) -> dict:
    """One JSONL line from a compact lm-eval record and the stored sample it belongs to."""
    out = dict(rec)
    args = out.pop("arguments", [])
    source = out.pop("context_from", None)
    if source:
        args = [[stored.get(source) or ""] + list(a) for a in args]
    for key in ("task", "idx"):
        out.pop(key, None)
    line = {"doc_id": out.pop("doc_id"), "doc": out.pop("doc", {}), "target": str(out.pop("target", "")),
            "arguments": {f"gen_args_{i}": {f"arg_{j}": v for j, v in enumerate(a)} for i, a in enumerate(args)},
            "resps": _stringify(out.pop("resps", [])), "filtered_resps": _stringify(out.pop("filtered_resps", []))}
    line.update(out)
    return line


def _rebuilt_line(stored: dict) -> dict:
    """A JSONL line from qgate's own columns only (an evaluation stored without lm-eval's records)."""
    scores = stored.get("scores") or {}
    prompt, target, output = stored.get("prompt") or "", stored.get("target") or "", stored.get("output") or ""
    line = {"doc_id": int(stored["doc_id"]) if str(stored["doc_id"]).isdigit() else stored["doc_id"], "doc": {},
            "target": target, "arguments": {"gen_args_0": {"arg_0": prompt or target}},
            "resps": [[output]], "filtered_resps": [output], "filter": "none", "metrics": sorted(scores),
            "doc_hash": stored.get("doc_hash") or "", "prompt_hash": _sha(prompt or target),
            "target_hash": _sha(target)}
    line.update(scores)
    return line


def _rebuilt_results(evaluation: dict, task: str) -> dict:
    entry = {"alias": task}
    for name, m in (evaluation.get("metrics") or {}).items():
        entry[f"{name},none"] = m.get("value")
        entry[f"{name}_stderr,none"] = m.get("stderr") if m.get("stderr") is not None else "N/A"
    extras = evaluation.get("extras") or {}
    hib = evaluation.get("higher_is_better") or {}
    return {"results": {task: entry}, "group_subtasks": {task: []}, "configs": {}, "versions": {},
            "n-shot": {task: extras.get("num_fewshot") or 0}, "higher_is_better": {task: hib},
            "n-samples": {task: {"original": evaluation.get("n"), "effective": evaluation.get("n")}},
            "model": {}, "tokenizer": {}}


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    return _dt.datetime.fromisoformat(iso).timestamp()


def export_lm_eval(store, run_id: int, directory: str | Path) -> list[Path]:
    """Write the run's evaluations under ``directory`` in lm-eval's output layout; returns the files."""
    run = store.run(run_id)
    links = store.run_evaluations(run_id)
    if not links:
        raise QgateError(f"RUN {run_id}: it stored no evaluations (nothing to export)")
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise QgateError(f"--lm-eval {directory}: exists and is not a folder")
    versions = run.get("versions") or {}
    models: dict[tuple[str, str], list[dict]] = {}
    for link in links:
        models.setdefault((link["member"], link["format"]), []).append(link)

    written: list[Path] = []
    for (member, fmt), group in sorted(models.items(), key=lambda kv: (kv[0][0], kv[0][1] != BASELINE, kv[0][1])):
        model_name = f"{member}:{fmt}"
        folder = root / _sanitize_model_name(model_name)
        results: dict = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                         "higher_is_better": {}, "n-samples": {}}
        model_block: dict = {}
        tokenizer_block: dict = {}
        task_files: dict[str, list[dict]] = {}
        started, finished, seconds, first = [], [], 0.0, None
        for link in sorted(group, key=lambda l: l["task"]):
            evaluation = store.evaluation(link["evaluation_id"]) or {}
            first = first or evaluation
            extras = evaluation.get("extras") or {}
            lm_task = extras.get("lm_eval_task") or link["task"]
            stored = store.samples(link["evaluation_id"])
            log = store.lm_eval_log(link["evaluation_id"])
            if log is not None:
                part = log["results"]
                for rec in log["samples"]:
                    task_files.setdefault(rec.get("task") or lm_task, []).append(_sample_line(rec, stored[rec["idx"]]))
            else:
                part = _rebuilt_results(evaluation, lm_task)
                task_files.setdefault(lm_task, []).extend(_rebuilt_line(s) for s in stored)
            for key in results:
                results[key].update(part.get(key) or {})
            if part.get("groups"):
                results.setdefault("groups", {}).update(part["groups"])
            model_block = model_block or part.get("model") or {}
            tokenizer_block = tokenizer_block or part.get("tokenizer") or {}
            started.append(evaluation.get("started_at"))
            finished.append(evaluation.get("finished_at"))
            seconds += float(evaluation.get("duration_s") or 0.0)

        extras = (first or {}).get("extras") or {}
        runtime = (first or {}).get("runtime") or {}
        checkpoint = store.checkpoint((first or {}).get("checkpoint_id")) or {}
        # the suite entry the evaluation ran (its seed and generation caps), as the store keyed it
        spec = ((store.task_config((first or {}).get("task_config_id")) or {}).get("config") or {}).get("task") or {}
        seed = spec.get("seed")
        gen_kwargs = {**(spec.get("generation") or {}), "do_sample": False, "temperature": 0.0}  # always greedy
        results["config"] = {
            "model": model_name,
            "model_args": {"pretrained": checkpoint.get("source"), "revision": checkpoint.get("revision"),
                           "format": fmt, "checkpoint": checkpoint.get("id")},
            **{k: v for k, v in model_block.items() if k != "batch_sizes"},
            "batch_size": 1,
            "batch_sizes": model_block.get("batch_sizes", []),
            "device": runtime.get("device"),
            "use_cache": None,
            "limit": extras.get("limit"),
            "bootstrap_iters": 1000,
            "gen_kwargs": gen_kwargs,
            "random_seed": seed, "numpy_seed": seed, "torch_seed": seed, "fewshot_seed": seed,
        }
        date_id = (_dt.datetime.fromisoformat(max(f for f in finished if f)).replace(tzinfo=None)
                   .isoformat().replace(":", "-"))
        task_hashes = {task: _sha("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in lines))
                       for task, lines in task_files.items()}
        begin = _timestamp(min(s for s in started if s) if any(started) else None)
        results.update({
            "git_hash": run.get("git_revision"),
            "date": begin,
            "pretty_env_info": f"not collected per evaluation; qgate run {run_id} ran on {run.get('host')} "
                               f"with {json.dumps(versions, sort_keys=True)}",
            "transformers_version": versions.get("transformers"),
            "lm_eval_version": versions.get("lm_eval") or extras.get("lm_eval_version"),
            "upper_git_hash": None,
            **tokenizer_block,
            "task_hashes": task_hashes,
            "model_source": "qgate",
            "model_name": model_name,
            "model_name_sanitized": _sanitize_model_name(model_name),
            "system_instruction": spec.get("system_instruction"),
            "system_instruction_sha": _sha(spec["system_instruction"]) if spec.get("system_instruction") else None,
            "fewshot_as_multiturn": bool(spec.get("fewshot_as_multiturn") and spec.get("chat_template")),
            "chat_template": None, "chat_template_sha": None,  # the tokenizer's template is not stored
            "total_evaluation_time_seconds": str(seconds),
        })
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"results_{date_id}.json"
        write_atomic(path, json.dumps(results, indent=2, ensure_ascii=False))
        written.append(path)
        for task, lines in sorted(task_files.items()):
            lines.sort(key=lambda s: (s["doc_id"] if isinstance(s["doc_id"], int) else 0, s.get("filter", "")))
            path = folder / f"samples_{task}_{date_id}.jsonl"
            write_atomic(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in lines))
            written.append(path)
    return written
