"""The results store: cache keys, one-transaction evaluations, migrations, concurrency, kill -9.

Every test runs on SQLite; the ones taking ``store_url`` also run on PostgreSQL when
QGATE_TEST_PG_URL names a database (each test gets its own schema, dropped afterwards).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from qgate import store as store_mod
from qgate.canonical import content_hash
from qgate.errors import QgateError
from qgate.keys import evaluation_key
from qgate.store import open_store

from tiny import pg_schema  # noqa: E402

PG_URL = os.environ.get("QGATE_TEST_PG_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qgate.db'}"
        return
    if not PG_URL:
        pytest.skip("set QGATE_TEST_PG_URL=postgresql+psycopg://user:pw@host/db to run against PostgreSQL")
    with pg_schema(PG_URL, "qgate_test") as url:
        yield url


def _fill_refs(s, ckpt="c" * 64, task_cfg="t" * 64, quant="q" * 64):
    s.put_checkpoint(ckpt, family="smollm2", member="m", source="/x.gguf", file_hash="f" * 64)
    s.put_task_config(task_cfg, task="task_a", config={"limit": 5})
    s.put_quant_config(quant, format="nvfp4", recipe="uniform", config={"format": "nvfp4"})
    return ckpt, task_cfg, quant


def _sample_rows(n, tag="x"):
    return [{"doc_id": str(i), "doc_hash": f"h{i}", "prompt": f"p{i} {tag}", "output": "o", "target": "t",
             "scores": {"acc": i % 2}} for i in range(n)]


def _save(s, key, ckpt, task_cfg, quant, n=5, run_link=None):
    return s.save_evaluation(key, checkpoint_id=ckpt, quant_config_id=quant, task_config_id=task_cfg,
                             qgate_version="0.1.0", task="task_a", format="nvfp4", metrics={"acc": 0.4},
                             primary_metric="acc", higher_is_better={"acc": True}, n=n,
                             samples_rows=_sample_rows(n), run_link=run_link)


def test_url_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QGATE_DB", raising=False)
    assert store_mod.resolve_url() == f"sqlite:///{tmp_path / 'qgate.db'}"
    monkeypatch.setenv("QGATE_DB", str(tmp_path / "env.db"))
    assert store_mod.resolve_url() == f"sqlite:///{tmp_path / 'env.db'}"
    assert store_mod.resolve_url("other.db") == f"sqlite:///{tmp_path / 'other.db'}"
    assert store_mod.resolve_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path):
    path = tmp_path / "q.db"
    s = open_store(path)
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == store_mod.SQLITE_BUSY_TIMEOUT_MS
    s.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    raw.close()


def test_bad_db_locations_are_one_line_errors(tmp_path):
    with pytest.raises(QgateError, match="does not exist"):
        open_store(tmp_path / "missing-folder" / "q.db")
    with pytest.raises(QgateError, match="not a database URL"):
        open_store("nosuchdialect://x/y")


def test_redact_url_hides_the_password_only():
    assert store_mod.redact_url("postgresql+psycopg://qgate:s3cret@db.example:5432/qgate") == \
        "postgresql+psycopg://qgate:***@db.example:5432/qgate"
    assert store_mod.redact_url("sqlite:////tmp/x/qgate.db") == "sqlite:////tmp/x/qgate.db"
    assert store_mod.redact_url("not a url") == "not a url"


def test_content_hash_ignores_key_order_and_tuple_vs_list():
    a = content_hash({"b": [1, 2], "a": {"y": 1, "x": 2.5}})
    b = content_hash({"a": {"x": 2.5, "y": 1}, "b": (1, 2)})
    assert a == b and len(a) == 64
    assert content_hash({"a": 1}) != content_hash({"a": 2})
    k1 = evaluation_key("c", None, "t", "0.1.0")
    assert k1 != evaluation_key("c", "q", "t", "0.1.0") != evaluation_key("c", "q", "t", "0.2.0")
    assert evaluation_key("c", "q", "t", "0.1.0", {"device": "cpu"}) != evaluation_key("c", "q", "t", "0.1.0",
                                                                                      {"device": "cuda"})


def test_evaluation_round_trip_and_cache(store_url):
    s = open_store(store_url)
    assert s.version() == store_mod.SCHEMA_VERSION
    ckpt, task_cfg, quant = _fill_refs(s)
    _fill_refs(s)  # content-addressed: writing the same records again is a no-op
    assert s.count("checkpoints") == 1 and s.count("task_configs") == 1 and s.count("quant_configs") == 1
    run_id = s.start_run(family="smollm2", formats=["nvfp4"], versions={"qgate": "0.1.0"}, host="h", pid=1)
    link = dict(run_id=run_id, member="m", format="nvfp4", role="candidate", task="task_a")
    first = _save(s, "k1", ckpt, task_cfg, quant, n=7, run_link=link)
    again = _save(s, "k1", ckpt, task_cfg, quant, n=7, run_link=link)
    assert first.inserted and not again.inserted
    assert s.count("evaluations") == 1 and s.count("samples") == 7 and s.count("run_evaluations") == 1
    assert s.cached_keys(["k1", "k2"]) == {"k1"}
    rows = s.samples("k1")
    assert [r["doc_id"] for r in rows] == [str(i) for i in range(7)]
    assert rows[3]["scores"] == {"acc": 1} and rows[3]["prompt"] == "p3 x"
    used = s.run_evaluations(run_id)
    assert len(used) == 1 and used[0]["metrics"] == {"acc": 0.4} and used[0]["cached"] is False
    # NaN cannot be stored as JSON in PostgreSQL: it becomes null everywhere
    s.save_evaluation("k2", checkpoint_id=ckpt, quant_config_id=None, task_config_id=task_cfg, qgate_version="0.1.0",
                      task="task_a", format="bf16", metrics={"acc": float("nan")}, primary_metric="acc",
                      higher_is_better={"acc": True}, n=0, samples_rows=[])
    assert s.evaluation("k2")["metrics"] == {"acc": None}
    s.close()


def test_quant_stats_fill_in_later_but_are_never_overwritten(store_url):
    s = open_store(store_url)
    s.put_quant_config("q1", format="nvfp4", recipe="uniform", config={"f": 1})
    s.put_quant_config("q1", format="nvfp4", recipe="uniform", config={"f": 1}, stats=[{"name": "w", "sqnr": 20.0}],
                       summary={"tensors": 1}, log=["one"])
    s.put_quant_config("q1", format="nvfp4", recipe="uniform", config={"f": 1}, stats=[{"name": "w", "sqnr": 99.0}])
    row = s.quant_config("q1")
    assert row["stats"] == [{"name": "w", "sqnr": 20.0}] and row["summary"] == {"tensors": 1} and row["log"] == ["one"]
    s.close()


def test_evaluation_and_samples_are_one_transaction(store_url):
    s = open_store(store_url)
    ckpt, task_cfg, quant = _fill_refs(s)

    def fail_on_samples(conn, cursor, statement, params, context, executemany):
        # the evaluation row is already inserted in this transaction when the samples fail
        if statement.lstrip().upper().startswith("INSERT INTO SAMPLES"):
            raise RuntimeError("disk full (simulated)")

    sa.event.listen(s.engine, "before_cursor_execute", fail_on_samples)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(s, "k1", ckpt, task_cfg, quant, n=4)
    sa.event.remove(s.engine, "before_cursor_execute", fail_on_samples)
    assert s.cached_keys(["k1"]) == set()
    assert s.count("evaluations") == 0 and s.count("samples") == 0
    assert _save(s, "k1", ckpt, task_cfg, quant, n=4).inserted  # and a retry writes it whole
    assert s.count("samples") == 4
    s.close()


def test_decisions_accumulate_in_batches(store_url):
    s = open_store(store_url)
    run_id = s.start_run(family="smollm2", formats=["nvfp4"])
    row = dict(member="m", format="nvfp4", role="candidate", task="task_a", verdict="pass", reason="ok",
               numbers={"delta": -0.5})
    b1 = s.record_decisions(run_id, policy_hash="p1", decisions_rows=[row],
                            outcomes_rows=[dict(member="m", format="nvfp4", outcome="ships", shipped_format="nvfp4")])
    b2 = s.record_decisions(run_id, policy_hash="p2", decisions_rows=[dict(row, verdict="fail", reason="tight")],
                            outcomes_rows=[dict(member="m", format="nvfp4", outcome="fallback", shipped_format="fp8",
                                                reasons=["task_a failed"])])
    assert [b["batch"] for b in s.decision_batches(run_id)] == [b1, b2]
    assert [b["policy_hash"] for b in s.decision_batches(run_id)] == ["p1", "p2"]
    latest = s.decisions(run_id)
    assert [d["verdict"] for d in latest] == ["fail"] and latest[0]["numbers"] == {"delta": -0.5}
    assert len(s.decisions(run_id, batch=None)) == 2 and s.decisions(run_id, batch=b1)[0]["verdict"] == "pass"
    assert s.outcomes(run_id)[0]["shipped_format"] == "fp8" and s.outcomes(run_id)[0]["reasons"] == ["task_a failed"]
    s.add_signoff(run_id, reviewer="rev", decision="approve", digest="d" * 64, comment="fine")
    assert s.signoffs(run_id)[0]["reviewer"] == "rev" and s.signoffs(run_id)[0]["override"] is False
    s.finish_run(run_id, status="completed", outcome="fallback", exit_code=3)
    assert s.run(run_id)["exit_code"] == 3 and s.run(run_id)["finished_at"]
    s.close()


def test_interrupted_runs_are_marked(store_url):
    s = open_store(store_url)
    dead = s.start_run(family="f", formats=["nvfp4"], host="here", pid=111)
    alive = s.start_run(family="f", formats=["nvfp4"], host="here", pid=222)
    elsewhere = s.start_run(family="f", formats=["nvfp4"], host="other", pid=111)
    assert s.mark_interrupted("here", lambda pid: pid == 222) == [dead]
    assert [s.run(i)["status"] for i in (dead, alive, elsewhere)] == ["interrupted", "running", "running"]
    s.close()


def test_old_database_is_migrated_and_newer_one_refused(store_url):
    s = open_store(store_url, migrate_to=1)
    assert s.version() == 1
    assert not sa.inspect(s.engine).has_table("outcomes")
    ckpt, task_cfg, quant = _fill_refs(s)
    run_id = s.start_run(family="smollm2", formats=["nvfp4"])
    _save(s, "old", ckpt, task_cfg, quant, n=3)
    s.close()

    s = open_store(store_url)  # a newer qgate opens the old file
    assert s.version() == store_mod.SCHEMA_VERSION == 3
    assert s.cached_keys(["old"]) == {"old"} and len(s.samples("old")) == 3
    s.record_decisions(run_id, policy_hash="p", decisions_rows=[],
                       outcomes_rows=[dict(member="m", format="nvfp4", outcome="ships", shipped_format="nvfp4")])
    assert s.outcomes(run_id)[0]["outcome"] == "ships"
    index_names = {ix["name"] for ix in sa.inspect(s.engine).get_indexes("samples")}
    assert "ix_samples_doc_hash" in index_names
    with s.engine.begin() as conn:
        conn.execute(store_mod.schema_version.update().values(version=99))
    s.close()
    with pytest.raises(QgateError, match="schema version 99 is newer"):
        open_store(store_url)


WRITER = textwrap.dedent("""
    import sys
    from qgate.store import open_store
    url, tag, count, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    s = open_store(url)
    s.put_checkpoint("c", family="f", member="m", source="x")
    s.put_task_config("t", task="task", config={})
    for i in range(count):
        key = f"{tag}-{i}" if tag != "shared" else f"shared-{i}"
        rows = [{"doc_id": str(j), "prompt": "x" * 2000, "scores": {"acc": j % 2}} for j in range(n)]
        s.save_evaluation(key, checkpoint_id="c", quant_config_id=None, task_config_id="t", qgate_version="0",
                          task="task", format="bf16", metrics={"acc": 0.5}, primary_metric="acc",
                          higher_is_better={"acc": True}, n=n, samples_rows=rows)
        print(key, flush=True)
""")


def _writer(url, tag, count, n):
    return subprocess.Popen([sys.executable, "-c", WRITER, url, tag, str(count), str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_write_one_database_at_once(store_url):
    open_store(store_url).close()
    procs = [_writer(store_url, "shared", 15, 200), _writer(store_url, "shared", 15, 200),
             _writer(store_url, "a", 10, 200), _writer(store_url, "b", 10, 200)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    s = open_store(store_url)
    assert s.count("evaluations") == 15 + 10 + 10  # the shared keys were written once
    assert s.count("samples") == 35 * 200
    s.close()


def test_kill_9_leaves_whole_evaluations_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    open_store(url).close()
    proc = _writer(url, "k", 10_000, 400)
    # let it commit a few evaluations, then kill it in the middle of whatever it is doing
    seen = 0
    deadline = time.time() + 120
    while seen < 5 and time.time() < deadline:
        if proc.stdout.readline():
            seen += 1
    time.sleep(0.137)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    s = open_store(url)
    with s.engine.begin() as conn:
        per_eval = dict(conn.execute(sa.text(
            "SELECT e.id, COUNT(x.idx) FROM evaluations e LEFT JOIN samples x ON x.evaluation_id = e.id GROUP BY e.id"
        )).all())
        orphans = conn.execute(sa.text(
            "SELECT COUNT(*) FROM samples WHERE evaluation_id NOT IN (SELECT id FROM evaluations)")).scalar()
    assert len(per_eval) >= 5
    assert set(per_eval.values()) == {400}  # every evaluation present has all of its samples
    assert orphans == 0
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    s.close()


def test_processes_creating_a_fresh_database_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = ("import sys; from qgate.store import open_store; s = open_store(sys.argv[1]); "
            "s.put_checkpoint('c', family='f', member='m', source='x'); print(s.version())")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    assert [out.strip() for out, _ in results] == [str(store_mod.SCHEMA_VERSION)] * 4
    s = open_store(url)
    assert s.count("checkpoints") == 1 and s.version() == store_mod.SCHEMA_VERSION
    with s.engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store_mod.schema_version)).scalar() == 1
    s.close()
