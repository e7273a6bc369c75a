"""Sign-off and verify on a real SQLite store: the digest covers results, decisions, policy and the
report content; a changed value in the database or an edited report is detected (exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from qgate.cli import cli
from qgate.report.render import content_sha256, render_html, strip_signoff
from qgate.report.data import collect
from qgate.report.payload import build_payload, digest_of
from qgate.signoff import diff_values
from qgate.store import evaluations, open_store, samples
from tests.test_report import populate_store


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "qgate.db"
    store = open_store(db)
    run_id = populate_store(store)
    yield store, run_id, str(db)
    store.close()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def sign(db, run_id, *extra):
    return invoke("signoff", run_id, "--reviewer", "Ana Lima", "--db", db, *extra)


def block_blocked(store, run_id):
    """A second decide pass (e.g. a stricter policy) that blocks the member."""
    store.record_decisions(run_id, policy_hash="77" * 32, decisions_rows=[
        {"member": "smollm2-135m", "format": "nvfp4", "role": "candidate", "task": "mmlu", "verdict": "fail",
         "reason": "mmlu: -30.0 pts: fail", "numbers": {"delta": -30.0, "threshold": -1.0, "unit": "pts"}},
        {"member": "smollm2-135m", "format": "fp8", "role": "fallback", "task": "mmlu", "verdict": "fail",
         "reason": "mmlu: -1.5 pts: fail", "numbers": {"delta": -1.5, "threshold": -1.0, "unit": "pts"}}],
        outcomes_rows=[{"member": "smollm2-135m", "format": "nvfp4", "outcome": "blocked", "shipped_format": None,
                        "reasons": ["nvfp4 and the fp8 fallback fail mmlu"]}])


def test_approve_records_digest_and_verify_says_intact(env):
    store, run_id, db = env
    result = sign(db, run_id, "--approve", "--comment", "fp8 fallback is fine for us")
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip().splitlines()[-1])
    assert path == Path("reports") / f"smollm2-{run_id}.html"
    [row] = store.signoffs(run_id)
    assert (row["reviewer"], row["decision"], row["override"]) == ("Ana Lima", "approve", False)
    assert row["comment"] == "fp8 fallback is fine for us" and f"digest {row['digest']}" in result.output
    html = path.read_text(encoding="utf-8")
    assert f'<meta name="qgate-signoff-digest" content="{row["digest"]}">' in html
    assert f'data-qgate-run="{run_id}" data-qgate-digest="{row["digest"]}" data-qgate-signoff="{row["id"]}"' in html
    # the digest is the sha256 of the canonical payload: results, decisions, policy and report content
    payload = build_payload(store, run_id, content_sha256(html))
    assert digest_of(payload) == row["digest"]
    assert payload["policy"]["text"].startswith("family: smollm2") and len(payload["results"]) == 9
    assert {d["verdict"] for d in payload["decisions"]} >= {"fail"}
    # signing changed nothing outside the sign-off block
    assert strip_signoff(html) == strip_signoff(render_html(collect(store, run_id)))
    verified = invoke("verify", path, "--db", db)
    assert verified.exit_code == 0, verified.output
    assert "intact" in verified.output and row["digest"] in verified.output


def test_a_stored_value_changed_after_signoff_fails_verify_and_names_it(env):
    store, run_id, db = env
    path = Path(sign(db, run_id, "--approve").output.strip().splitlines()[-1])
    key = next(l["evaluation_id"] for l in store.run_evaluations(run_id)
               if (l["role"], l["task"]) == ("candidate", "mmlu"))
    with store.engine.begin() as conn:
        metrics = conn.execute(sa.select(evaluations.c.metrics).where(evaluations.c.id == key)).scalar_one()
        conn.execute(evaluations.update().where(evaluations.c.id == key)
                     .values(metrics={"acc": {**metrics["acc"], "value": 0.9}}))
    result = invoke("verify", path, "--db", db)
    assert result.exit_code == 1, result.output
    assert "CHANGED" in result.output
    assert "results[smollm2-135m/nvfp4/candidate/mmlu].metrics.acc.value" in result.output and "-> 0.9" in result.output
    # a report rendered after the change says so in its sign-off block, and does not verify either
    again = Path(invoke("report", run_id, "--db", db, "-o", "again.html").output.strip())
    assert "no longer match the latest signature" in again.read_text(encoding="utf-8")
    assert invoke("verify", again, "--db", db).exit_code == 1


def test_a_changed_sample_score_fails_verify(env):
    store, run_id, db = env
    path = Path(sign(db, run_id, "--approve").output.strip().splitlines()[-1])
    key = next(l["evaluation_id"] for l in store.run_evaluations(run_id) if (l["role"], l["task"]) == ("baseline", "needle"))
    with store.engine.begin() as conn:
        conn.execute(samples.update().where(samples.c.evaluation_id == key, samples.c.idx == 3)
                     .values(output="something else"))
    result = invoke("verify", path, "--db", db)
    assert result.exit_code == 1
    assert "results[smollm2-135m/bf16/baseline/needle].samples_sha256" in result.output


def test_a_redecision_after_signoff_fails_verify(env):
    store, run_id, db = env
    path = Path(sign(db, run_id, "--approve").output.strip().splitlines()[-1])
    block_blocked(store, run_id)
    result = invoke("verify", path, "--db", db)
    assert result.exit_code == 1
    assert "outcomes[smollm2-135m/nvfp4].outcome: \"fallback\" -> \"blocked\"" in result.output


@pytest.mark.parametrize("old, new, message", [
    ("ships with fallback", "ships as requested", "report content was edited"),  # the verdict banner
    ('<td class="num">40</td>', '<td class="num">400</td>', "report content was edited"),  # a number in a table
    ("<b>Ana Lima</b>", "<b>Bob</b>", "sign-off block region was edited"),  # the signature itself
])
def test_an_edited_report_fails_verify(env, old, new, message):
    store, run_id, db = env
    path = Path(sign(db, run_id, "--approve").output.strip().splitlines()[-1])
    html = path.read_text(encoding="utf-8")
    assert old in html
    path.write_text(html.replace(old, new, 1), encoding="utf-8")
    result = invoke("verify", path, "--db", db)
    assert result.exit_code == 1, result.output
    assert message in result.output
    if "content" in message:
        assert f"+{new}" in result.output.replace(" ", "") or new.replace(" ", "") in result.output.replace(" ", "")


def test_approving_a_blocked_run_needs_override_and_comment(env):
    store, run_id, db = env
    block_blocked(store, run_id)
    report = Path("reports") / f"smollm2-{run_id}.html"
    plain = sign(db, run_id, "--approve")
    assert plain.exit_code == 2 and "blocked for smollm2-135m (nvfp4)" in plain.output and "--override" in plain.output
    no_comment = sign(db, run_id, "--approve", "--override")
    assert no_comment.exit_code == 2 and "--comment" in no_comment.output
    assert store.signoffs(run_id) == [] and not report.exists()  # nothing written on error
    ok = sign(db, run_id, "--approve", "--override", "--comment", "regression accepted: see ticket 12")
    assert ok.exit_code == 0, ok.output
    [row] = store.signoffs(run_id)
    assert row["override"] is True and row["comment"] == "regression accepted: see ticket 12"
    html = report.read_text(encoding="utf-8")
    assert "override of a blocked verdict" in html and 'data-outcome="blocked"' in html
    assert "Decision history" in html  # decided twice: the history is shown
    assert invoke("verify", report, "--db", db).exit_code == 0


def test_reject_needs_no_override_and_override_needs_a_blocked_run(env):
    store, run_id, db = env
    wrong = sign(db, run_id, "--approve", "--override", "--comment", "x")
    assert wrong.exit_code == 2 and "not blocked" in wrong.output
    assert sign(db, run_id).exit_code == 2  # neither --approve nor --reject
    rejected = sign(db, run_id, "--reject", "--comment", "needle drop at 1024 tokens worries me")
    assert rejected.exit_code == 0
    assert [s["decision"] for s in store.signoffs(run_id)] == ["reject"]


def test_a_second_signoff_keeps_the_first_report_verifiable(env, tmp_path):
    store, run_id, db = env
    first = Path(sign(db, run_id, "--approve", "-o", tmp_path / "first.html").output.strip().splitlines()[-1])
    second = invoke("signoff", run_id, "--reviewer", "Bo", "--approve", "--db", db, "-o", tmp_path / "second.html")
    path2 = Path(second.output.strip().splitlines()[-1])
    html2 = path2.read_text(encoding="utf-8")
    assert "Ana Lima" in html2 and "<b>Bo</b>" in html2
    assert invoke("verify", first, "--db", db).exit_code == 0
    assert invoke("verify", path2, "--db", db).exit_code == 0
    # a report re-rendered later carries the sign-offs and still verifies
    rerendered = invoke("report", run_id, "--db", db, "-o", tmp_path / "again.html")
    assert rerendered.exit_code == 0
    assert invoke("verify", tmp_path / "again.html", "--db", db).exit_code == 0


def test_verify_bad_input_exits_2(env, tmp_path):
    store, run_id, db = env
    not_report = tmp_path / "page.html"
    not_report.write_text("<html><body>hello</body></html>", encoding="utf-8")
    result = invoke("verify", not_report, "--db", db)
    assert result.exit_code == 2 and "not a qgate report" in result.output
    unsigned = Path(invoke("report", run_id, "--db", db).output.strip())
    result = invoke("verify", unsigned, "--db", db)
    assert result.exit_code == 2 and "not signed off" in result.output
    assert invoke("verify", tmp_path / "missing.html", "--db", db).exit_code == 2
    # a signed report checked against a database that does not hold its run
    signed = Path(sign(db, run_id, "--approve").output.strip().splitlines()[-1])
    other = tmp_path / "other.db"
    open_store(other).close()
    result = invoke("verify", signed, "--db", other)
    assert result.exit_code == 2 and f"run {run_id} is not in the database" in result.output
    for output in (result.output,):
        assert "Traceback" not in output


def test_diff_values_names_paths():
    signed = {"results": [{"member": "m", "task": "t", "n": 5}], "policy": {"hash": "a"}}
    now = {"results": [{"member": "m", "task": "t", "n": 6}], "policy": {"hash": "b", "text": "x"}}
    assert diff_values(signed, now) == ['policy.hash: "a" -> "b"', 'policy.text: added ("x")', "results[m/t].n: 5 -> 6"]
    assert json.loads(json.dumps(signed)) == signed


def test_the_report_package_never_imports_the_signoff_module():
    """Sign-off sits beside the report and uses it; the report (render included) never imports it back."""
    import ast

    import qgate.report

    for path in sorted(Path(qgate.report.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "qgate.signoff" or n.startswith("qgate.signoff.") for n in names), path.name
