"""The Ray executor on a real local Ray cluster (2 CPUs, no GPU) with a tiny random Qwen2 member and the
tests-only gate suite: same stored rows and decisions as the local executor, idempotent writes when two
workers run the same unit, a worker killed with SIGKILL mid-unit retried by Ray, a killed driver's rerun
resuming from the store, and (with QGATE_TEST_PG_URL) the same run on PostgreSQL.

One cluster serves the module; its two workers are started (and their imports paid) once, up front.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from qgate.executors.ray_executor import RayExecutor  # noqa: E402
from tiny import copy_db, pg_schema  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"
MEMBER = "qwen2.5-0.5b-instruct"  # a registered name; the policy points it at the tiny model
LIMIT = 2
# mmlu on 2 samples is always inconclusive, and inconclusive fails here: nvfp4 fails, so the fp8 fallback
# is evaluated in a second round of units and fails too (blocked, exit 1)
POLICY = """\
family: qwen2.5
members: [{{name: {member}, model: {model}}}]
suite: {suite}
formats:
  nvfp4: {{recipe: uniform}}
fallback: [fp8]
tasks:
  mmlu: {{max_drop: 0, inconclusive: fail}}
  perplexity: {{metric: word_perplexity, min_recovery: 0.5, inconclusive: pass, blocking: false}}
"""
UNITS = 3  # baseline, nvfp4, fp8
EVALUATIONS = 2 * UNITS  # 2 tasks each
WAIT_S = 240  # seconds; a few on an idle machine, far more when many tests share its two cores


def _warm():  # a worker imports what a unit needs once; later units reuse the process
    import importlib

    for module in ("qgate.executors.units", "qgate.models", "qgate.quantize", "qgate.evaluation.runner"):
        importlib.import_module(module)

    time.sleep(1)  # overlapping tasks: two workers, not one twice
    return os.getpid()


@pytest.fixture(scope="module")
def cluster():
    # workers inherit the environment: this module (the warm-up task) must be importable there
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)] + ([saved] if saved else []))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="ERROR",
             log_to_driver=False)
    try:
        warm = ray.remote(num_cpus=1)(_warm)
        assert len(set(ray.get([warm.remote(), warm.remote()]))) == 2
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from qgate import models
    from tiny import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "tiny-qwen2"
    models.build_tiny_model("qwen2", seed=3).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    path = folder.parent / "policy.yaml"
    path.write_text(POLICY.format(member=MEMBER, model=folder, suite=SUITE))
    return path


class Recording(RayExecutor):
    """The real Ray executor, keeping the units it ran and their results for the assertions."""

    def __init__(self):
        super().__init__()
        self.units, self.results = [], []

    def run(self, units, on_done):
        self.units += units
        out = super().run(units, on_done)
        self.results += out
        return out


def gate(policy, db, executor="ray"):
    from qgate.gate import run_gate

    return run_gate("qwen2.5", ["nvfp4"], policy=policy, db=str(db), limit=LIMIT, progress=False, report=False,
                    device="cpu", executor=executor)


def stored(url: str) -> dict:
    """Everything a run leaves that must not depend on where it ran."""
    engine = sa.create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.connect() as conn:
            def q(sql):
                return [tuple(r) for r in conn.execute(sa.text(sql)).all()]
            return {
                "evaluations": sorted(q("SELECT id, task, format, n, metrics FROM evaluations"), key=str),
                "samples": sorted(q("SELECT evaluation_id, idx, doc_id, doc_hash, prompt, output, target, scores "
                                    "FROM samples"), key=str),
                "decisions": sorted(q("SELECT member, format, role, task, verdict, reason FROM decisions"), key=str),
                "outcomes": sorted(q("SELECT member, format, outcome, shipped_format, reasons FROM outcomes"), key=str),
            }
    finally:
        engine.dispose()


def count(db: Path, table: str) -> int:
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def local_run(policy, tmp_path_factory):
    """The reference: the default executor, in this process."""
    db = tmp_path_factory.mktemp("local") / "local.db"
    result = gate(policy, db, executor=None)
    return result, stored(str(db))


@pytest.fixture(scope="module")
def ray_run(cluster, policy, tmp_path_factory):
    """A run through the Ray executor, counting forward passes in this (the driver's) process."""
    from test_gate import ForwardCounter

    db = tmp_path_factory.mktemp("ray") / "ray.db"
    ex = Recording()
    counter = ForwardCounter()
    try:
        result = gate(policy, db, executor=ex)
    finally:
        counter.close()
    return result, ex, db, counter.calls


def test_ray_stores_the_same_rows_and_decisions_as_the_local_executor(ray_run, policy, local_run):
    local, expected = local_run
    assert local.exit_code == 1 and local.outcome == "blocked" and local.evaluations_run == EVALUATIONS
    result, ex, db, forward_calls = ray_run
    assert forward_calls == 0  # the driver only plans and decides
    assert stored(str(db)) == expected
    assert (result.exit_code, result.outcome) == (local.exit_code, local.outcome)
    assert [t.decision.reason for t in result.tasks] == [t.decision.reason for t in local.tasks]
    assert result.evaluations_run == EVALUATIONS and result.evaluations_cached == 0
    # baselines first, then the candidate; the fallback only after deciding that the candidate fails
    assert [(u.format, u.role) for u in ex.units] == [("bf16", "baseline"), ("nvfp4", "candidate"),
                                                      ("fp8", "fallback")]
    assert all(u.gpus == 0 for u in ex.units)  # CPU cluster
    assert {r.pid for r in ex.results} and os.getpid() not in {r.pid for r in ex.results}



def test_a_rerun_through_ray_loads_nothing_and_links_every_stored_evaluation(ray_run, policy, tmp_path):
    _, _, db, _ = ray_run
    copy = tmp_path / "again.db"
    copy_db(db, copy)
    again = gate(policy, copy, executor=Recording())
    assert again.evaluations_run == 0 and again.evaluations_cached == EVALUATIONS and again.models_loaded == 0
    con = sqlite3.connect(copy)
    linked = con.execute("SELECT COUNT(*) FROM run_evaluations WHERE run_id = ?", (again.run_id,)).fetchone()[0]
    con.close()
    assert linked == EVALUATIONS  # the fallback's stored evaluations too, through its unit


def test_the_planned_path_runs_the_same_in_process(policy, local_run, tmp_path):
    """The local executor runs the same units in this process: the same rows and decisions again."""
    from qgate.executors.local import LocalExecutor

    _, expected = local_run
    result = gate(policy, tmp_path / "planned.db", executor=LocalExecutor())
    assert result.exit_code == 1 and result.evaluations_run == EVALUATIONS
    assert stored(str(tmp_path / "planned.db")) == expected


def test_two_workers_finishing_the_same_unit_leave_one_row(cluster, ray_run, tmp_path):
    from qgate.executors.ray_executor import qgate_unit

    _, ex, source, _ = ray_run
    db = copy_db(source, tmp_path / "twice.db")
    unit = dataclasses.replace(ex.units[1], db_url=f"sqlite:///{db}")  # nvfp4: load, quantize, evaluate
    con = sqlite3.connect(db)
    keys = [t.key for t in unit.tasks]
    marks = ",".join("?" * len(keys))
    n_samples = con.execute(f"SELECT COUNT(*) FROM samples WHERE evaluation_id IN ({marks})", keys).fetchone()[0]
    for table, column in (("samples", "evaluation_id"), ("run_evaluations", "evaluation_id"),
                          ("lm_eval_logs", "evaluation_id"), ("evaluations", "id")):
        con.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", keys)
    con.commit()
    con.close()

    task = ray.remote(qgate_unit).options(num_cpus=1)
    first, second = ray.get([task.remote(unit), task.remote(unit)])  # two workers at once
    assert first.pid != second.pid
    # each evaluation was inserted by exactly one of them; the other found it (or lost the insert)
    assert sorted(first.evaluated + second.evaluated) == sorted(t.task.name for t in unit.tasks)
    assert sorted(first.evaluated + first.found) == sorted(second.evaluated + second.found)
    assert count(db, "evaluations") == EVALUATIONS
    con = sqlite3.connect(db)
    assert con.execute(f"SELECT COUNT(*) FROM samples WHERE evaluation_id IN ({marks})", keys).fetchone()[0] \
        == n_samples
    con.close()


def _unit_workers() -> list[psutil.Process]:
    """Ray worker processes running a unit now (Ray titles a busy worker ray::<task>)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::qgate_unit"):
            found.append(proc)
    return found


def _wait_for_rows(db: Path, n: int, timeout: float, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                if count(db, "evaluations") >= n:
                    return
            except sqlite3.OperationalError:  # schema not created yet
                pass
        if alive is not None and not alive():
            raise AssertionError("the run ended before the awaited rows appeared")
        time.sleep(0.02)
    raise AssertionError(f"no {n} evaluation(s) stored within {timeout} s")


def test_a_worker_killed_mid_unit_is_retried_and_nothing_is_lost_or_duplicated(cluster, policy, local_run,
                                                                                tmp_path):
    _, expected = local_run
    db = tmp_path / "kill.db"
    ex = Recording()
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.setdefault("result", gate(policy, db, executor=ex)))
    driver.start()
    try:
        # the first stored evaluation: its unit is now on its second task, the other unit on its first
        _wait_for_rows(db, 1, WAIT_S, alive=driver.is_alive)
        victims = _unit_workers()
        for proc in victims:
            os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
    finally:
        driver.join(3 * WAIT_S)
    assert victims, "no worker was running a unit"
    result = outcome["result"]
    assert result.exit_code == 1 and result.outcome == "blocked"
    assert not {p.pid for p in victims} & {r.pid for r in ex.results}  # their units finished on new workers
    assert stored(str(db)) == expected  # nothing lost, nothing duplicated, the same decisions
    assert count(db, "run_evaluations") == EVALUATIONS
    # the evaluation stored before the kill was not redone by the retry
    con = sqlite3.connect(db)
    first = con.execute("SELECT task, format, finished_at FROM evaluations ORDER BY finished_at LIMIT 1").fetchone()
    con.close()
    assert datetime.datetime.fromisoformat(first[2]).timestamp() <= killed_at
    retried = [r for r in ex.results if r.format == first[1]]
    assert first[0] not in retried[0].evaluated


def test_a_killed_driver_is_resumed_from_the_store(cluster, policy, local_run, tmp_path):
    _, expected = local_run
    db = tmp_path / "driver.db"
    cmd = [sys.executable, "-m", "qgate.cli", "run", "--family", "qwen2.5", "--format", "nvfp4", "--policy",
           str(policy), "--db", str(db), "--limit", str(LIMIT), "--device", "cpu", "--no-report",
           "--executor", "ray", "--ray-address", cluster]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        _wait_for_rows(db, 1, WAIT_S, alive=lambda: proc.poll() is None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    stored_before = count(db, "evaluations")
    assert 1 <= stored_before < EVALUATIONS

    result = gate(policy, db, executor=Recording())
    assert result.exit_code == 1
    assert result.evaluations_cached >= stored_before and result.evaluations_run <= EVALUATIONS - stored_before
    assert stored(str(db)) == expected
    con = sqlite3.connect(db)
    statuses = [s for (s,) in con.execute("SELECT status FROM runs ORDER BY id")]
    con.close()
    assert statuses == ["interrupted", "completed"]


PG_URL = os.environ.get("QGATE_TEST_PG_URL")


@pytest.mark.skipif(not PG_URL, reason="set QGATE_TEST_PG_URL to run against PostgreSQL")
def test_ray_workers_write_to_postgresql(cluster, policy, local_run):
    _, expected = local_run
    with pg_schema(PG_URL, "qgate_ray") as url:
        result = gate(policy, url)
        assert result.exit_code == 1 and result.evaluations_run == EVALUATIONS
        got = stored(url)
        # JSON columns come back as objects from PostgreSQL and as text from SQLite: compare as values
        def norm(rows):
            return sorted((tuple(_json_value(v) for v in r) for r in rows), key=str)
        for table in expected:
            assert norm(got[table]) == norm(expected[table]), table


def _json_value(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def test_a_ray_address_without_the_ray_executor_is_bad_input(tmp_path):
    from click.testing import CliRunner

    from qgate.cli import cli

    db = tmp_path / "never.db"
    out = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--db", str(db), "--ray-address", "head:6379"])
    assert out.exit_code == 2 and not db.exists()
    assert out.output.strip().splitlines()[-1] == \
        "qgate: error: --ray-address head:6379: only meaningful with --executor ray"
