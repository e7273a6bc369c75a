"""Run a suite's tasks through lm-eval on an already-loaded (possibly quantized) model.

The model object is handed to lm-eval through make_lm (qgate's FastLM, an HFLM); tasks come from lm-eval's
registry (hub data) or from qgate's own task folders (qgate/evaluation/tasks, offline data). Every
sample's prompt, output and scores are kept, so baseline and candidate can be compared sample by sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from qgate import __version__
from qgate.canonical import content_hash, json_safe
from qgate.errors import QgateError
from qgate.evaluation import data, sandbox
from qgate.evaluation.suite import Suite, TaskSpec
from qgate.metrics import CORPUS_WEIGHTS
from qgate.validation import did_you_mean

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
STDERR_BOOTSTRAP = 1000  # resamples for corpus-level perplexity stderr (lm-eval reports none for these)


@dataclass
class TaskResult:
    """One task's outcome: aggregate metrics plus every sample (prompt, output, target, scores)."""

    task: str
    metrics: dict[str, dict]  # metric -> {"value": float | None, "stderr": float | None}
    primary_metric: str
    higher_is_better: bool
    n: int
    samples: list[dict]
    config_hash: str
    data_source: str
    extras: dict = field(default_factory=dict)
    per_sample: str = "binary"  # "binary" (pass/fail per sample) or "continuous"
    lm_eval_log: dict | None = None  # lm-eval's own results and sample records (qgate.evaluation.lm_eval_log)

    @property
    def value(self) -> float | None:
        return self.metrics[self.primary_metric]["value"]

    @property
    def stderr(self) -> float | None:
        return self.metrics[self.primary_metric]["stderr"]

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------------------------
# the lm-eval model object


def make_lm(model, tokenizer, max_length: int | None = None, **kw):
    """The lm-eval LM around an already-loaded transformers model: every evaluation goes through here.

    qgate's FastLM (qgate.evaluation.fast_lm): the answers of lm-eval's HFLM at batch size 1, computed
    faster, on batches it schedules itself; its options (max_batch, batch_tokens, decode, ...) pass
    through **kw.
    """
    from qgate.evaluation.fast_lm import FastLM

    with _quiet_lm_eval():  # HFLM warns that an in-memory model skips its loading options: expected here
        return FastLM(model, tokenizer, max_length=max_length, **kw)


# ------------------------------------------------------------------------------------------------
# running


def task_manager(task: TaskSpec, metadata: dict | None = None, include_defaults: bool | None = None):
    """qgate's task folders and the task's own include paths, plus lm-eval's registry when the task reads
    its own data (``include_defaults`` None)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(task.include_path or [])]
    defaults = (not task.offline) if include_defaults is None else include_defaults
    return TaskManager(include_path=paths, include_defaults=defaults, metadata=metadata or {})


BINARY_METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "pass@1", "mcc_binary")
LOWER_IS_BETTER = ("word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity")
_OUTPUT_METRIC = {"multiple_choice": "acc", "loglikelihood": "acc", "generate_until": "exact_match",
                  "loglikelihood_rolling": "word_perplexity"}


def select_tasks(suite: Suite, names: list[str], include_path: str | None = None) -> list[TaskSpec]:
    """The suite's tasks by name; a name the suite does not list is an lm-eval task (registry or the user's
    folder), its settings read from its own config (lm_eval_task_spec)."""
    out = []
    for name in names:
        if name in suite.task_names():
            out.append(suite.task(name))
            continue
        try:
            out.append(lm_eval_task_spec(name, include_path))
        except QgateError as exc:
            raise QgateError(f"suite {suite.name!r}: no task {name!r}{did_you_mean(name, suite.task_names())} "
                             f"(tasks: {', '.join(suite.task_names())}), and {exc}") from None
    return out


def lm_eval_task_spec(name: str, include_path: str | None = None, num_fewshot: int | None = None) -> TaskSpec:
    """A suite entry for an lm-eval task that no suite lists (``qgate eval --tasks NAME``), read from the
    task's own config: the primary metric is the first of its metric_list (its filter's name appended when
    the task has several filters), its direction the metric_list's higher_is_better (lm-eval's own default
    otherwise); pass/fail per sample for accuracy-like metrics, continuous otherwise; shots from the
    config (0 if none); generation as the config sets it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    probe = TaskSpec(name=name, lm_eval_task=name, data={"source": "lm_eval"}, num_fewshot=0, metric="?",
                     higher_is_better=True, per_sample="binary",
                     include_path=[include_path] if include_path else None)
    with _quiet_lm_eval():
        tm = task_manager(probe, include_defaults=False) if include_path else None
        if tm is None or name not in tm.task_index:  # not in the user's folder: lm-eval's registry too
            tm = task_manager(probe, include_defaults=True)
    entry = tm.task_index.get(name)
    if entry is None:
        where = "its registry" + (f" or {include_path}" if include_path else "")
        raise QgateError(f"lm-eval has no task {name!r} in {where}")
    if entry.yaml_path is None or str(getattr(entry.kind, "name", entry.kind)).upper() not in ("TASK",):
        raise QgateError(f"task {name!r} is an lm-eval group or tag; list it in a suite with its metric "
                         f"(suites/<name>.yaml: lm_eval_task: {name}, metric: ...)")
    try:
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
    except Exception as exc:  # noqa: BLE001 - a user's YAML may be broken in any way yaml can say
        raise QgateError(f"task {name!r}: cannot read {entry.yaml_path}: {str(exc).splitlines()[0]}") from None
    metrics = cfg.get("metric_list") or []
    first = metrics[0] if metrics and isinstance(metrics[0], dict) else {}
    metric = str(first.get("metric") or _OUTPUT_METRIC.get(cfg.get("output_type"), "acc"))
    higher = first.get("higher_is_better")
    if not isinstance(higher, bool):
        higher = metric not in LOWER_IS_BETTER
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)]
    if len(filters) > 1 and filters[0]:
        metric = f"{metric},{filters[0]}"
    shots = num_fewshot if num_fewshot is not None else cfg.get("num_fewshot") or 0
    gen = cfg.get("generation_kwargs") or {}
    generation = {k: gen[k] for k in ("max_gen_toks", "until") if k in gen} or None
    if generation and isinstance(generation.get("until"), str):
        generation["until"] = [generation["until"]]
    base = metric.split(",", 1)[0]
    return TaskSpec(name=re.sub(r"[^a-z0-9_]", "_", name.lower()), lm_eval_task=name, data={"source": "lm_eval"},
                    num_fewshot=int(shots), metric=metric, higher_is_better=higher,
                    per_sample="binary" if base in BINARY_METRICS else "continuous", generation=generation,
                    include_path=[include_path] if include_path else None)


def materialize_task_data(task: TaskSpec, tokenizer=None, max_context: int | None = None):
    """The DataFile an offline task reads (None for hub tasks)."""

    if not task.offline:
        return None
    params = task.data_params
    source = data.get_source(task.source)
    if "max_context" in source.defaults and params.get("max_context") is None and max_context is not None:
        params = {**params, "max_context": max_context}
    return data.materialize(task.source, params, tokenizer if source.needs_tokenizer else None)


def context_budget(task: TaskSpec, model_max_length: int) -> int:
    """Prompt tokens a task may use: the model's context minus the reply and the chat template's markup."""
    return model_max_length - (task.generation or {}).get("max_gen_toks", 256) - 64


def _config_hash(task: TaskSpec, limit: int | None, data_sha: str) -> str:
    import lm_eval

    spec = {**task.to_dict(), "limit": limit}
    payload = {"task": spec, "data_sha256": data_sha, "qgate": __version__,
               "lm_eval": getattr(lm_eval, "__version__", "?")}
    return content_hash(payload, safe=False, ensure_ascii=True)


def _docs_sha(doc_hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(doc_hashes).encode()).hexdigest()


def evaluate_task(model, tokenizer, task: TaskSpec, limit: int | None = None, lm=None, progress=None) -> TaskResult:
    """Evaluate one task of a suite; `limit` (if given) overrides the suite's sample cap.

    progress: a qgate.progress.Progress; the task's requests are reported to it as they are answered."""
    from qgate.progress import library_bars_hidden

    started = time.time()
    lm = lm if lm is not None else make_lm(model, tokenizer)
    tokenizer = tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None)
    effective_limit = limit if limit is not None else task.limit
    datafile = materialize_task_data(task, tokenizer, context_budget(task, int(lm.max_length)))
    metadata = {"data_file": str(datafile.path)} if datafile else {}

    programs_before = sandbox.programs_run()
    with _quiet_lm_eval(), _reporting(lm, task, progress), library_bars_hidden(progress):
        tm = None
        if task.include_path and not task.offline:  # the user's own folder first: no registry scan if it is there
            tm = task_manager(task, metadata, include_defaults=False)
            if task.lm_eval_task not in tm.all_tasks:
                tm = None
        tm = tm or task_manager(task, metadata)
        if task.lm_eval_task not in tm.all_tasks:
            where = "qgate's task folders" + ("" if task.offline else " or lm-eval's registry")
            where += "".join(f" or {p}" for p in task.include_path or [])
            raise QgateError(f"task {task.name}: lm_eval_task {task.lm_eval_task!r} not found in {where}")
        gen_kwargs = {**(task.generation or {}), "do_sample": False, "temperature": 0.0}  # always greedy
        with _hub_data_errors(task):
            out = _simple_evaluate(lm, task, tm, effective_limit, gen_kwargs)
    result = _to_task_result(task, out, datafile, effective_limit, time.time() - started, lm=lm)
    if sandbox.programs_run() > programs_before:  # it ran model code: record how that code was contained
        result.extras["sandbox"] = sandbox.isolation_report()
    return result


@contextlib.contextmanager
def _reporting(lm, task: TaskSpec, progress):
    """Requests answered by qgate's adapter go to ``progress`` for the duration of one task."""
    if progress is None or not hasattr(lm, "progress_report"):
        yield
        return
    lm.progress_report = lambda desc, total: progress.within(f"{task.name} {desc}", total)
    try:
        yield
    finally:
        lm.progress_report = None


@contextlib.contextmanager
def _hub_data_errors(task: TaskSpec):
    """A hub dataset that cannot be fetched (offline, no cache) is one clear line, not a traceback."""
    try:
        yield
    except ConnectionError as e:  # datasets and huggingface_hub raise (subclasses of) ConnectionError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QgateError(
            f"task {task.name}: its dataset could not be fetched from the Hugging Face Hub and is not in the "
            f"local cache ({reason}); run once with network access to fill the cache (HF_HOME), or use the "
            "offline suite: --suite smoke") from None


def _simple_evaluate(lm, task: TaskSpec, tm, limit, gen_kwargs):
    """What ``lm_eval.simple_evaluate`` does for one task and an initialized LM, through lm-eval's own
    ``evaluate``: the same seeds, task loading, generation and few-shot overrides, the same results and
    logged samples. It leaves out simple_evaluate's per-call environment report (``git describe``, which
    prints "fatal: not a git repository" outside a checkout, and torch's collect_env, ~1.5 s per task):
    qgate records versions and the git revision once per run."""
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    random.seed(task.seed)
    np.random.seed(task.seed)
    set_torch_seed(task.seed)
    loaded = tm.load([task.lm_eval_task])
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("output_type") == "generate_until" and gen_kwargs:
            task_obj.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
        if task.num_fewshot is not None:
            if task_obj.get_config("num_fewshot") != 0:  # lm-eval never overrides a task's explicit 0
                task_obj.set_config(key="num_fewshot", value=task.num_fewshot)
        elif task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=task.seed)
    return evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
        bootstrap_iters=STDERR_BOOTSTRAP,
        log_samples=True,
        system_instruction=task.system_instruction,
        apply_chat_template=task.chat_template,
        fewshot_as_multiturn=task.fewshot_as_multiturn and task.chat_template,
        verbosity=None,
        confirm_run_unsafe_code=True,  # qgate's humaneval runs programs only in its sandbox
    )


def evaluate(model, tokenizer, suite: Suite, limit: int | None = None, tasks: list[str] | None = None,
             lm=None, on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Evaluate a suite (or the named subset of its tasks), one shared lm-eval model object."""
    selected = [suite.task(name) for name in tasks] if tasks else list(suite.tasks)
    lm = lm if lm is not None else make_lm(model, tokenizer)
    results = []
    for spec in selected:
        result = evaluate_task(model, tokenizer, spec, limit=limit, lm=lm)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every override and default at INFO/WARNING; keep errors only unless asked otherwise."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    if logging.getLogger("qgate").isEnabledFor(logging.DEBUG):
        yield
        return
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ------------------------------------------------------------------------------------------------
# lm-eval output -> TaskResult


def _metric_keys(entry: dict) -> list[tuple[str, str]]:
    keys = []
    for key in entry:
        if "," not in key or "_stderr," in key:
            continue
        name, filt = key.split(",", 1)
        keys.append((name, filt))
    return keys


def _namer(filters: set[str]) -> Callable[[str, str], str]:
    # one filter (lm-eval's "none", or a task's only filter): bare metric names; several: "metric,filter"
    if len(filters) <= 1:
        return lambda name, filt: name
    return lambda name, filt: f"{name},{filt}"


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


def _to_task_result(task: TaskSpec, out: dict, datafile, limit: int | None, wall_s: float,
                    lm=None) -> TaskResult:
    import lm_eval

    from qgate.evaluation import lm_eval_log

    results, logged = out["results"], out.get("samples") or {}
    if task.lm_eval_task not in results:
        raise QgateError(f"task {task.name}: lm-eval returned no results for {task.lm_eval_task!r}")
    entry = results[task.lm_eval_task]
    leaf_tasks = sorted(logged)
    filters = {filt for name, filt in _metric_keys(entry)}
    for leaf in leaf_tasks:
        filters.update(s["filter"] for s in logged[leaf])
    name_of = _namer(filters)

    samples = _merge_samples(task, logged, leaf_tasks, name_of)
    records = [lm_eval_log.compact_sample(r, leaf, i, s["prompt"], s["target"])
               for i, s in enumerate(samples) for leaf, r in s.pop("_logged")]
    metrics: dict[str, dict] = {}
    for name, filt in _metric_keys(entry):
        stderr = entry.get(f"{name}_stderr,{filt}")
        metrics[name_of(name, filt)] = {"value": _number(entry[f"{name},{filt}"]), "stderr": _number(stderr)}
    _fill_missing_stderr(metrics, samples)
    if task.metric not in metrics:
        raise QgateError(
            f"task {task.name}: the suite's metric {task.metric!r} is not reported by lm-eval task "
            f"{task.lm_eval_task!r} (it reports: {', '.join(sorted(metrics))})"
        )

    if datafile is not None:
        data_sha, data_source = datafile.sha256, datafile.data_source
    else:
        data_sha = _docs_sha([s["doc_hash"] for s in samples])
        cfg = out.get("configs", {}).get(leaf_tasks[0], {}) if leaf_tasks else {}
        dataset = task.data.get("dataset") or "/".join(
            str(x) for x in (cfg.get("dataset_path"), cfg.get("dataset_name")) if x)
        data_source = (f"dataset {dataset or '?'} through lm-eval's {task.lm_eval_task!r} task; "
                       f"{len(samples)} evaluated documents, sha256 {data_sha}")
    lm_eval_version = getattr(lm_eval, "__version__", "?")
    config_hash = _config_hash(task, limit, data_sha)

    extras: dict = {"lm_eval_task": task.lm_eval_task, "lm_eval_version": lm_eval_version, "limit": limit,
                    "num_fewshot": task.num_fewshot, "wall_s": round(wall_s, 2)}
    if len(leaf_tasks) > 1:
        extras["subtasks"] = leaf_tasks
    if samples and "context_len" in samples[0].get("doc", {}) and "depth" in samples[0].get("doc", {}):
        extras["needle_grid"] = _needle_grid(samples, task.metric)
    for s in samples:
        s.pop("doc", None)  # docs can be large (MMLU carries its exemplars); doc_hash identifies them
    return TaskResult(
        task=task.name, metrics=metrics, primary_metric=task.metric, higher_is_better=task.higher_is_better,
        n=len(samples), samples=samples, config_hash=config_hash, data_source=data_source, extras=extras,
        per_sample=task.per_sample, lm_eval_log=lm_eval_log.build(out, lm, records),
    )


def _merge_samples(task: TaskSpec, logged: dict, leaf_tasks: list[str], name_of) -> list[dict]:
    """lm-eval logs one record per (document, filter); qgate keeps one per document with all its scores."""
    merged: dict[tuple[str, int], dict] = {}
    for leaf in leaf_tasks:
        for s in sorted(logged[leaf], key=lambda s: s["doc_id"]):
            key = (leaf, s["doc_id"])
            rec = merged.get(key)
            if rec is None:
                rec = merged[key] = _base_sample(s)
                rec["_logged"] = []  # lm-eval's own records of this document (one per filter)
                if len(leaf_tasks) > 1:
                    rec["subtask"], rec["subtask_doc_id"] = leaf, s["doc_id"]
            rec["_logged"].append((leaf, s))
            filtered = s.get("filtered_resps")
            if filtered and isinstance(filtered[0], str):  # what each filter made of the output
                rec.setdefault("extracted", {})[s["filter"]] = filtered[0]
            for metric in s.get("metrics", []):
                _add_score(rec["scores"], name_of(metric, s["filter"]), metric, s.get(metric))
    samples = list(merged.values())
    for i, rec in enumerate(samples):
        if len(leaf_tasks) > 1:
            rec["doc_id"] = i  # unique across the subtasks of a group
        if len(rec.get("extracted", {})) == 1 and "none" in rec["extracted"]:
            rec.pop("extracted")
    return samples


def _base_sample(s: dict) -> dict:
    args = s.get("arguments") or []
    resps = s.get("resps") or []
    first = args[0] if args else ()
    prompt = first[0] if isinstance(first, (list, tuple)) and first and isinstance(first[0], str) else ""
    rec: dict[str, Any] = {"doc_id": int(s["doc_id"]), "doc_hash": s.get("doc_hash", ""), "prompt": prompt,
                           "output": "", "target": "", "scores": {}, "doc": s.get("doc") or {}}
    second = first[1] if isinstance(first, (list, tuple)) and len(first) > 1 else None
    if isinstance(second, str):  # loglikelihood requests: (context, continuation) per choice
        continuations = [a[1] for a in args]
        logprobs = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in resps]
        best = max(range(len(logprobs)), key=logprobs.__getitem__) if logprobs else None
        rec["output"] = continuations[best].strip() if best is not None else ""
        rec["logprobs"] = logprobs
        target = s.get("target")
        if isinstance(target, int) and 0 <= target < len(continuations):
            rec["target"] = continuations[target].strip()
        else:
            rec["target"] = str(target)
    elif isinstance(second, dict) or (resps and resps[0] and isinstance(resps[0][0], str)):  # generation
        rec["output"] = resps[0][0] if resps and resps[0] else ""
        rec["target"] = str(s.get("target", ""))
    else:  # loglikelihood_rolling: the document itself is the target
        rec["target"] = first[0] if isinstance(first, (list, tuple)) and first else str(s.get("target", ""))
        rec["prompt"] = ""
    return rec


def _add_score(scores: dict, name: str, metric: str, value: Any) -> None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and metric in CORPUS_WEIGHTS:
        loglikelihood, count = float(value[0]), int(value[1])
        scores["loglikelihood"] = loglikelihood
        scores[CORPUS_WEIGHTS[metric]] = count
        return
    if isinstance(value, (list, tuple)):  # per-instruction outcomes (IFEval): keep the rate and the count
        if value:
            scores[name] = sum(float(v) for v in value) / len(value)
        scores[f"{name}_count"] = float(len(value))
        return
    number = _number(value)
    if number is not None:
        scores[name] = number


def _fill_missing_stderr(metrics: dict, samples: list[dict]) -> None:
    """Where lm-eval gives no stderr: the sample mean's (per-sample metrics) or a bootstrap (perplexities)."""
    import numpy as np

    if samples and all("loglikelihood" in s["scores"] for s in samples):
        _perplexity_metrics(metrics, samples)
    for name, m in metrics.items():
        if m["stderr"] is not None or m["value"] is None:
            continue
        values = [s["scores"][name] for s in samples if name in s["scores"]]
        if len(values) > 1 and abs(float(np.mean(values)) - m["value"]) < 1e-9:
            m["stderr"] = float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _perplexity_metrics(metrics: dict, samples: list[dict]) -> None:
    import numpy as np

    ll = np.array([s["scores"]["loglikelihood"] for s in samples])
    words = np.array([s["scores"].get("words", 0) for s in samples], dtype=float)
    nbytes = np.array([s["scores"].get("bytes", 0) for s in samples], dtype=float)
    for s in samples:  # per-document values, for reading samples (the gate re-aggregates from the sums)
        sc = s["scores"]
        if sc.get("words"):
            sc["word_perplexity"] = math.exp(-sc["loglikelihood"] / sc["words"])
        if sc.get("bytes"):
            sc["byte_perplexity"] = math.exp(-sc["loglikelihood"] / sc["bytes"])
            sc["bits_per_byte"] = -sc["loglikelihood"] / sc["bytes"] / math.log(2)
    formulas = {
        "word_perplexity": lambda idx: math.exp(-ll[idx].sum() / words[idx].sum()),
        "byte_perplexity": lambda idx: math.exp(-ll[idx].sum() / nbytes[idx].sum()),
        "bits_per_byte": lambda idx: -ll[idx].sum() / nbytes[idx].sum() / math.log(2),
    }
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(samples), size=(STDERR_BOOTSTRAP, len(samples)))
    for name, f in formulas.items():
        if name in metrics and metrics[name]["stderr"] is None and len(samples) > 1:
            metrics[name]["stderr"] = float(np.std([f(idx) for idx in draws], ddof=1))


def _needle_grid(samples: list[dict], metric: str) -> dict:
    cells: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        doc = s["doc"]
        s["cell"] = {"context_len": doc["context_len"], "depth": doc["depth"]}
        cells.setdefault((doc["context_len"], doc["depth"]), []).append(s["scores"].get(metric, 0.0))
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = {str(L): {str(d): (sum(cells[(L, d)]) / len(cells[(L, d)]) if (L, d) in cells else None)
                     for d in depths} for L in lengths}
    counts = {str(L): {str(d): len(cells.get((L, d), [])) for d in depths} for L in lengths}
    return {"context_lengths": lengths, "depths": depths, "accuracy": grid, "n": counts}


def print_results_table(results: list[TaskResult], file=None) -> None:
    """task, metric, value, stderr, n — the primary metric first, then the task's other metrics."""
    file = file or sys.stdout
    rows = [("task", "metric", "value", "stderr", "n")]
    for r in results:
        names = [r.primary_metric] + sorted(m for m in r.metrics if m != r.primary_metric)
        for i, name in enumerate(names):
            m = r.metrics[name]
            rows.append((r.task if i == 0 else "", name + (" *" if i == 0 else ""), _fmt(m["value"]),
                         _fmt(m["stderr"]), str(r.n) if i == 0 else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.rjust(w) if j in (2, 3, 4) else cell.ljust(w)
                        for j, (cell, w) in enumerate(zip(row, widths))).rstrip(), file=file)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
