"""The gate end to end on the real SmolLM2 with a tests-only suite (tests/data/gate_suite.yaml: MMLU
zero-shot and rolling perplexity, a few samples each).

One module-level database is filled once by a real run; later tests reuse it (cached baselines)
or copy it, so the whole file evaluates only a handful of times.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate.cli import cli
from tiny import copy_db, pg_schema

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"
MEMBER = "smollm2-135m-instruct"

POLICY = f"""\
family: smollm2
members: [{MEMBER}]
suite: {SUITE}
formats:
  nvfp4: {{recipe: uniform}}
fallback: [fp8]
tasks:
  mmlu: {{max_drop: 100, inconclusive: pass, blocking: false}}
  perplexity: {{metric: word_perplexity, min_recovery: {{recovery}}, inconclusive: fail}}
"""


def policy_file(tmp: Path, recovery: float, name: str) -> Path:
    path = tmp / name
    path.write_text(POLICY.replace("{recovery}", str(recovery)))
    return path


def counts(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("evaluations", "samples", "runs", "run_evaluations", "decisions", "outcomes")}
    finally:
        con.close()


class ForwardCounter:
    """Counts nn.Module forward calls in this process (every module, every model)."""

    def __init__(self):
        import torch

        self.calls = 0
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def first_run(gate_dir):
    """A real run: loose policy, nvfp4 ships (perplexity may grow 2x)."""
    from qgate.gate import run_gate

    counter = ForwardCounter()
    try:
        result = run_gate("smollm2", ["nvfp4"], policy=policy_file(gate_dir, 0.5, "loose.yaml"),
                          db=str(gate_dir / "q.db"), progress=False, report_path=gate_dir / "report.html")
    finally:
        counter.close()
    return result, counter.calls


@pytest.mark.slow
def test_first_run_evaluates_decides_and_records(first_run, gate_dir):
    result, forward_calls = first_run
    assert forward_calls > 0
    assert result.exit_code == 0 and result.outcome == "ships"
    assert result.evaluations_run == 4 and result.evaluations_cached == 0  # 2 tasks x (baseline, nvfp4)
    assert [(m.member, m.format, m.outcome, m.shipped_format) for m in result.members] == \
        [(MEMBER, "nvfp4", "ships", "nvfp4")]
    by_task = {t.task: t for t in result.tasks}
    assert set(by_task) == {"mmlu", "perplexity"}
    ppl = by_task["perplexity"].decision
    assert not ppl.binary and ppl.n == 3 and ppl.delta > 0  # nvfp4 costs perplexity
    assert by_task["mmlu"].decision.binary and by_task["mmlu"].decision.n == 3
    c = counts(gate_dir / "q.db")
    assert c["evaluations"] == 4 and c["samples"] == 2 * (3 + 3) and c["decisions"] == 2 and c["outcomes"] == 1
    con = sqlite3.connect(gate_dir / "q.db")
    status, exit_code, outcome, policy_text = con.execute(
        "SELECT status, exit_code, outcome, policy_text FROM runs WHERE id = ?", (result.run_id,)).fetchone()
    con.close()
    assert (status, exit_code, outcome) == ("completed", 0, "ships") and "min_recovery: 0.5" in policy_text
    assert result.report_path == str(gate_dir / "report.html") and not result.notes
    assert "<html" in Path(result.report_path).read_text()[:500].lower()


@pytest.mark.slow
def test_unchanged_rerun_does_no_forward_pass_and_loads_no_model(first_run, gate_dir, monkeypatch):
    from qgate import models
    from qgate.gate import run_gate

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every evaluation is stored")

    monkeypatch.setattr(models, "load_member", refuse)
    before = counts(gate_dir / "q.db")
    counter = ForwardCounter()
    started = time.perf_counter()
    try:
        again = run_gate("smollm2", ["nvfp4"], policy=gate_dir / "loose.yaml", db=str(gate_dir / "q.db"),
                         progress=False, report=False)
    finally:
        counter.close()
    assert counter.calls == 0 and again.models_loaded == 0
    assert again.evaluations_run == 0 and again.evaluations_cached == 4
    assert time.perf_counter() - started < 30
    assert again.exit_code == first_run[0].exit_code
    assert [t.decision.reason for t in again.tasks] == [t.decision.reason for t in first_run[0].tasks]
    after = counts(gate_dir / "q.db")
    assert after["evaluations"] == before["evaluations"] and after["samples"] == before["samples"]
    assert after["runs"] == before["runs"] + 1


@pytest.mark.slow
def test_tight_threshold_fails_nvfp4_and_fp8_fallback_decides(first_run, gate_dir):
    from qgate.gate import EXIT_FALLBACK, run_gate

    # perplexity may grow by at most 1/0.97 - 1 = 3%: nvfp4 does not keep that, fp8 does
    result = run_gate("smollm2", ["nvfp4"], policy=policy_file(gate_dir, 0.97, "tight.yaml"),
                      db=str(gate_dir / "q.db"), progress=False, report=False)
    assert result.exit_code == EXIT_FALLBACK == 3 and result.outcome == "fallback"
    assert result.evaluations_run == 2  # only fp8 was new: baseline and nvfp4 came from the store
    (member,) = result.members
    assert (member.outcome, member.shipped_format) == ("fallback", "fp8")
    assert any("ship fp8 instead of nvfp4" in r for r in member.reasons)
    verdicts = {(t.format, t.role, t.task): (t.decision.verdict, t.effect) for t in result.tasks}
    assert verdicts[("nvfp4", "candidate", "perplexity")][1] == "fail"
    assert verdicts[("fp8", "fallback", "perplexity")] == ("pass", "pass")
    con = sqlite3.connect(gate_dir / "q.db")
    rows = con.execute("SELECT format, role, task, verdict FROM decisions WHERE run_id = ? ORDER BY id",
                       (result.run_id,)).fetchall()
    outcome = con.execute("SELECT outcome, shipped_format FROM outcomes WHERE run_id = ?", (result.run_id,)).fetchone()
    run_row = con.execute("SELECT exit_code, outcome FROM runs WHERE id = ?", (result.run_id,)).fetchone()
    con.close()
    assert ("fp8", "fallback", "perplexity", "pass") in rows and len(rows) == 4
    assert outcome == ("fallback", "fp8") and run_row == (3, "fallback")


@pytest.mark.parametrize("args,expected", [
    (["--family", "smollm2", "--format", "nvfp5"], "unknown format 'nvfp5'"),
    (["--family", "smollm3", "--format", "nvfp4"], "unknown family 'smollm3'"),
    (["--family", "smollm2", "--format", "nvfp4", "--policy", "BAD"], "tasks.mmlu.max_drop: negative threshold"),
    (["--family", "smollm2", "--format", "nvfp4", "--member", "nosuch"], "unknown member 'nosuch'"),
    (["--family", "smollm2", "--format", "bf16"], "the unquantized baseline"),
    (["--family", "smollm2", "--format", "nvfp4", "--limit", "0"], "--limit 0"),
])
def test_bad_input_is_one_line_exit_2_and_no_database(tmp_path, args, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("{recovery}", "0.9").replace("max_drop: 100", "max_drop: -1"))
    db = tmp_path / "never.db"
    args = [str(bad) if a == "BAD" else a for a in args]
    result = CliRunner().invoke(cli, ["run", *args, "--db", str(db)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not db.exists() and not list(tmp_path.glob("never.db*"))


def _qgate(db: Path, fmt: str, policy: Path, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "qgate.cli", "run", "--family", "smollm2", "--format", fmt,
                             "--policy", str(policy), "--db", str(db), "--no-report", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, QGATE_PROGRESS="plain", **(env or {})))


def _wait_for(predicate, timeout=400, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_or_duplicating(first_run, gate_dir, tmp_path):
    db = copy_db(gate_dir / "q.db", tmp_path / "kill.db")  # baselines are stored already
    policy = gate_dir / "loose.yaml"
    start = counts(db)["evaluations"]

    proc = _qgate(db, "mxfp6_e2m3", policy)
    stored_one = _wait_for(lambda: counts(db)["evaluations"] >= start + 1, proc=proc)
    proc.send_signal(signal.SIGKILL)  # in the middle of the second candidate evaluation
    out, err = proc.communicate(timeout=60)
    assert stored_one, err
    after_kill = counts(db)
    assert after_kill["evaluations"] == start + 1
    con = sqlite3.connect(db)
    killed_run = con.execute("SELECT MAX(id) FROM runs").fetchone()[0]
    done_key = con.execute("SELECT evaluation_id FROM run_evaluations WHERE run_id = ? AND cached = 0",
                           (killed_run,)).fetchone()[0]
    con.close()

    again = _qgate(db, "mxfp6_e2m3", policy, "--json")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    data = json.loads(out)
    assert data["evaluations_run"] == 1 and data["evaluations_cached"] == 3  # only the unfinished one
    [checkpoint] = data["checkpoints"]  # the baseline's provenance travels with the JSON result
    assert checkpoint["member"] == "smollm2-135m-instruct" and checkpoint["checkpoint"].startswith("sha256:")
    assert checkpoint["source"].endswith(".gguf")
    final = counts(db)
    assert final["evaluations"] == start + 2
    con = sqlite3.connect(db)
    per_eval = dict(con.execute("SELECT e.id, COUNT(s.idx) FROM evaluations e JOIN samples s "
                                "ON s.evaluation_id = e.id GROUP BY e.id").fetchall())
    n_of = dict(con.execute("SELECT id, n FROM evaluations").fetchall())
    reused = con.execute("SELECT cached FROM run_evaluations WHERE run_id = ? AND evaluation_id = ?",
                         (data["run_id"], done_key)).fetchone()[0]
    statuses = dict(con.execute("SELECT id, status FROM runs WHERE id IN (?, ?)", (killed_run, data["run_id"])))
    dupes = con.execute("SELECT COUNT(*) FROM (SELECT evaluation_id, idx FROM samples GROUP BY evaluation_id, idx "
                        "HAVING COUNT(*) > 1)").fetchone()[0]
    con.close()
    assert per_eval == n_of  # every stored evaluation has exactly its n samples
    assert dupes == 0 and reused == 1
    assert statuses == {killed_run: "interrupted", data["run_id"]: "completed"}


@pytest.mark.slow
def test_two_runs_on_one_sqlite_file_both_complete(first_run, gate_dir, tmp_path):
    db = copy_db(gate_dir / "q.db", tmp_path / "two.db")
    policy = gate_dir / "loose.yaml"
    summary = tmp_path / "step_summary.md"
    junit = tmp_path / "junit.xml"
    # the perplexity task alone (same task config, so its baseline is in the store): one evaluation each
    import yaml

    suite = yaml.safe_load(SUITE.read_text())
    suite["tasks"] = [t for t in suite["tasks"] if t["name"] == "perplexity"]
    one_task = tmp_path / "one_task.yaml"
    one_task.write_text(yaml.safe_dump(suite))
    a = _qgate(db, "mxfp8_e4m3", policy, "--suite", str(one_task), "--json")
    b = _qgate(db, "mxfp8_e4m3", policy, "--suite", str(one_task), "--junit", str(junit),
               env={"GITHUB_STEP_SUMMARY": str(summary)})
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0, err_a
    assert b.returncode == 0, err_b
    con = sqlite3.connect(db)
    runs = con.execute("SELECT status, exit_code FROM runs ORDER BY id DESC LIMIT 2").fetchall()
    n_mx = con.execute("SELECT COUNT(*) FROM evaluations WHERE format = 'mxfp8_e4m3'").fetchone()[0]
    con.close()
    assert runs == [("completed", 0), ("completed", 0)]
    assert n_mx == 1  # both may have computed the evaluation; it is stored once

    data = json.loads(out_a)
    assert data["outcome"] == "ships" and [t["task"] for t in data["tasks"]] == ["perplexity"]
    assert data["evaluations_run"] + data["evaluations_cached"] == 2
    assert "SHIPS" in out_b and "mxfp8_e4m3" in out_b  # the console summary
    text = summary.read_text()
    assert text.startswith("### qgate: smollm2 mxfp8_e4m3: SHIPS") and "| perplexity |" in text
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == [f"{MEMBER} mxfp8_e4m3 perplexity"]
    assert root.get("failures") == "0"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QGATE_TEST_PG_URL"), reason="set QGATE_TEST_PG_URL to run against PostgreSQL")
def test_gate_on_postgresql_reuses_its_cache(first_run, gate_dir):
    from qgate.gate import run_gate

    with pg_schema(os.environ["QGATE_TEST_PG_URL"], "qgate_gate") as db:
        first = run_gate("smollm2", ["nvfp4"], policy=gate_dir / "loose.yaml", db=db, progress=False, report=False)
        second = run_gate("smollm2", ["nvfp4"], policy=gate_dir / "loose.yaml", db=db, progress=False, report=False)
        assert first.evaluations_run == 4 and second.evaluations_run == 0 and second.models_loaded == 0
        assert [t.decision.reason for t in first.tasks] == [t.decision.reason for t in second.tasks]


# ---- output helpers (no model) --------------------------------------------------------------------

def _hand_made_result():
    task = {"member": MEMBER, "format": "nvfp4", "role": "candidate", "task": "perplexity", "verdict": "fail",
            "effect": "fail", "blocking": True,
            "reason": "perplexity: +34.13 (100.40 -> 134.52), 95% CI [+17.62, +58.73], recovery >= 0.9 (allowed "
                      "+11.16), n=4: fail"}
    fallback = dict(task, format="fp8", role="fallback", verdict="pass", effect="pass",
                    reason="perplexity: +0.140 (100.40 -> 100.54) <&> | pipe, n=4: pass")
    advisory = dict(task, task="mmlu", verdict="fail", effect="warn", blocking=False, reason="mmlu: -9.0 pts: fail")
    return {"run_id": 7, "family": "smollm2", "formats": ["nvfp4"], "suite": "smoke", "policy": "policies/smollm2.yaml",
            "policy_hash": "ab" * 32, "db": "sqlite:///q.db", "outcome": "fallback", "exit_code": 3,
            "members": [{"member": MEMBER, "format": "nvfp4", "outcome": "fallback", "shipped_format": "fp8",
                         "reasons": ["ship fp8 instead of nvfp4"]}],
            "tasks": [task, advisory, fallback], "evaluations_run": 2, "evaluations_cached": 4, "models_loaded": 1,
            "seconds": 12.5, "report": None, "notes": []}


def test_junit_has_one_case_per_member_format_task_and_agrees_with_the_exit_code():
    """Exit 3 (the fallback ships; a pass in the README's CI recipe) leaves no <failure>: the replaced
    candidate's failing task is <skipped> naming what ships. Exit 1 (blocked) has the <failure>."""
    from qgate.summary import junit_xml

    data = _hand_made_result()
    data["tasks"][0].update(delta=34.13, ci_low=17.62, ci_high=58.73, threshold=11.16, n=4, p_value=0.0312,
                            requested="nvfp4", seconds=41.5)
    root = ET.fromstring(junit_xml(data))
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {f"{MEMBER} nvfp4 perplexity", f"{MEMBER} nvfp4 mmlu", f"{MEMBER} fp8 perplexity"}
    replaced = cases[f"{MEMBER} nvfp4 perplexity"]
    assert replaced.find("failure") is None
    assert replaced.find("skipped").get("message").startswith("nvfp4 does not ship: fp8 ships instead; perplexity:")
    assert replaced.get("time") == "41.500"
    props = {p.get("name"): p.get("value") for p in replaced.iter("property")}
    assert props["delta"] == "34.13" and props["ci_low"] == "17.62" and props["threshold"] == "11.16"
    assert props["n"] == "4" and props["p_value"] == "0.0312" and props["requested"] == "nvfp4"
    assert cases[f"{MEMBER} nvfp4 mmlu"].find("failure") is None  # advisory
    assert cases[f"{MEMBER} fp8 perplexity"].find("system-out").text.endswith("n=4: pass")
    assert root.get("tests") == "3" and root.get("failures") == "0" and root.get("skipped") == "1"

    blocked = _hand_made_result()
    blocked.update(outcome="blocked", exit_code=1, tasks=blocked["tasks"][:2])
    blocked["members"][0].update(outcome="blocked", shipped_format=None)
    root = ET.fromstring(junit_xml(blocked))
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases[f"{MEMBER} nvfp4 perplexity"].find("failure") is not None
    assert root.get("failures") == "1" and root.get("skipped") == "0"

    unsure = _hand_made_result()
    unsure["tasks"][2].update(verdict="inconclusive", effect="warn", reason="perplexity: n=4: inconclusive")
    case = [c for c in ET.fromstring(junit_xml(unsure)).iter("testcase") if "fp8" in c.get("name")][0]
    assert case.find("skipped").get("message") == "perplexity: n=4: inconclusive (gate: warn)"


def test_markdown_and_console_summaries():
    from qgate.summary import console_text, markdown

    data = _hand_made_result()
    md = markdown(data)
    assert md.startswith("### qgate: smollm2 nvfp4: SHIPS WITH FALLBACK")
    assert f"| {MEMBER} | nvfp4 | fallback | fp8 |" in md
    assert "<&> \\| pipe" in md  # table cells escape the pipe
    text = console_text(data)
    assert text.splitlines()[0] == "qgate run 7: smollm2 nvfp4 on suite smoke: SHIPS WITH FALLBACK (exit 3)"
    assert f"{MEMBER} nvfp4: blocked; ship fp8 instead" in text and "[advisory]" in text


def test_progress_plain_lines_and_bar():
    import io

    from qgate.progress import Progress

    out = io.StringIO()
    p = Progress(total=3, label="qgate", stream=out, bar=False)
    p.step("a: cached")
    p.note("loaded model")
    p.show("b: evaluating")
    p.step("b: done")
    p.close("finished")
    assert out.getvalue().splitlines() == ["qgate: [1/3] a: cached", "qgate: loaded model",
                                           "qgate: [1/3] b: evaluating", "qgate: [2/3] b: done", "qgate: finished"]
    tty = io.StringIO()
    bar = Progress(total=4, label="qgate", stream=tty, bar=True)
    bar.step("x")
    drawn = tty.getvalue()
    assert "\rqgate:" in drawn and " 1/4 " in drawn and "x" in drawn and "\n" not in drawn  # tqdm's bar, redrawn in place
    quiet = io.StringIO()
    Progress(total=2, stream=quiet, enabled=False).step("nothing")
    assert quiet.getvalue() == ""
