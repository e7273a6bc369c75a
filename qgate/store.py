"""The results store: SQLAlchemy schema, versioned migrations, and the few queries qgate needs.

SQLite file by default (``./qgate.db``, or ``$QGATE_DB``), any SQLAlchemy URL otherwise
(``postgresql+psycopg://user@host/db`` for a team). Keys are content hashes: an evaluation's
key is the hash of (checkpoint, quantization config, task config, runtime, qgate version), so a
result computed once is found again by every later run with the same inputs, and writing it
twice is a no-op. An evaluation's result row and all its samples are written in one transaction:
a process killed at any point leaves either the whole evaluation or none of it.

SQLite runs in WAL mode with a busy timeout, and every transaction starts with BEGIN IMMEDIATE,
so concurrent writers queue instead of failing with "database is locked" on a lock upgrade.

Schema versions are explicit steps in ``MIGRATIONS``; opening a database applies the missing
ones in order, inside one transaction each, so a database written by an older qgate still opens.
A step never edits an earlier step: to change an existing table, add a new step (ALTER TABLE).
"""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from qgate.canonical import canonical_json, has_non_finite, json_safe
from qgate.errors import QgateError

DEFAULT_DB = "qgate.db"
# An evaluation row is "completed" (finite numbers) or "non_finite" (some metric or sample score was NaN or
# inf, stored as null): both are whole results a later run reuses; the decision fails the latter.
NON_FINITE = "non_finite"
STORED_STATUSES = ("completed", NON_FINITE)
SQLITE_BUSY_TIMEOUT_MS = 120_000

metadata = sa.MetaData()
# Python None is stored as SQL NULL, not as the JSON text 'null' (so "IS NULL" finds it)
_JSON = sa.JSON(none_as_null=True)

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)

checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("id", sa.String(128), primary_key=True),  # content hash of the weights (or revision)
    sa.Column("family", sa.String(200), nullable=False),
    sa.Column("member", sa.String(200), nullable=False),
    sa.Column("source", sa.Text, nullable=False),  # hub id, local folder or GGUF file
    sa.Column("revision", sa.String(200)),
    sa.Column("file_hash", sa.String(128)),
    sa.Column("info", _JSON),
    sa.Column("created_at", sa.String(40), nullable=False),
)

quant_configs = sa.Table(
    "quant_configs", metadata,
    sa.Column("id", sa.String(128), primary_key=True),  # hash of the quantization config
    sa.Column("format", sa.String(128), nullable=False),
    sa.Column("recipe", sa.Text),
    sa.Column("config", _JSON, nullable=False),
    sa.Column("stats", _JSON),  # per-tensor statistics of the quantization (SQNR, promotions...)
    sa.Column("summary", _JSON),
    sa.Column("log", _JSON),
    sa.Column("created_at", sa.String(40), nullable=False),
)

task_configs = sa.Table(
    "task_configs", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("config", _JSON, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.String(128), primary_key=True),  # the cache key
    sa.Column("checkpoint_id", sa.String(128), sa.ForeignKey("checkpoints.id"), nullable=False),
    sa.Column("quant_config_id", sa.String(128), sa.ForeignKey("quant_configs.id")),  # NULL: baseline
    sa.Column("task_config_id", sa.String(128), sa.ForeignKey("task_configs.id"), nullable=False),
    sa.Column("qgate_version", sa.String(40), nullable=False),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("format", sa.String(128), nullable=False),
    sa.Column("metrics", _JSON, nullable=False),
    sa.Column("primary_metric", sa.String(200)),
    sa.Column("higher_is_better", _JSON),  # {metric: bool}
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("data_source", sa.Text),
    sa.Column("extras", _JSON),
    sa.Column("runtime", _JSON),  # device, dtype, backend it was computed with
    sa.Column("duration_s", sa.Float),
    sa.Column("started_at", sa.String(40)),
    sa.Column("finished_at", sa.String(40), nullable=False),
)

samples = sa.Table(
    "samples", metadata,
    sa.Column("evaluation_id", sa.String(128), sa.ForeignKey("evaluations.id"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("doc_id", sa.String(200), nullable=False),
    sa.Column("doc_hash", sa.String(128)),
    sa.Column("prompt", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("target", sa.Text),
    sa.Column("scores", _JSON, nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("family", sa.String(200), nullable=False),
    sa.Column("formats", _JSON, nullable=False),
    sa.Column("members", _JSON),
    sa.Column("suite", sa.String(200)),
    sa.Column("suite_hash", sa.String(128)),
    sa.Column("policy_hash", sa.String(128)),
    sa.Column("policy_text", sa.Text),
    sa.Column("policy_path", sa.Text),
    sa.Column("versions", _JSON),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("git_revision", sa.String(128)),
    sa.Column("backend", sa.String(128)),
    sa.Column("device", sa.String(128)),
    sa.Column("sample_limit", sa.Integer),
    sa.Column("status", sa.String(20), nullable=False),  # running, completed, failed, interrupted
    sa.Column("outcome", sa.String(20)),  # ships, fallback, blocked
    sa.Column("exit_code", sa.Integer),
    sa.Column("report_path", sa.Text),
    sa.Column("started_at", sa.String(40), nullable=False),
    sa.Column("finished_at", sa.String(40)),
)

run_evaluations = sa.Table(
    "run_evaluations", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("evaluation_id", sa.String(128), sa.ForeignKey("evaluations.id"), primary_key=True),
    sa.Column("member", sa.String(200), nullable=False),
    sa.Column("format", sa.String(128), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),  # baseline, candidate, fallback
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("cached", sa.Boolean, nullable=False),
)

decisions = sa.Table(
    "decisions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("batch", sa.String(32), nullable=False),  # one decide pass (a later redecide adds a batch)
    sa.Column("member", sa.String(200), nullable=False),
    sa.Column("format", sa.String(128), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),  # candidate or fallback
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("verdict", sa.String(20), nullable=False),  # pass, fail, inconclusive
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("numbers", _JSON, nullable=False),
    sa.Column("policy_hash", sa.String(128), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

signoffs = sa.Table(
    "signoffs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("decision", sa.String(20), nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("override", sa.Boolean, nullable=False),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

# added in schema version 2: the per member x requested-format outcome of a decide pass
outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("batch", sa.String(32), nullable=False),
    sa.Column("member", sa.String(200), nullable=False),
    sa.Column("format", sa.String(128), nullable=False),  # the requested candidate format
    sa.Column("outcome", sa.String(20), nullable=False),  # ships, fallback, blocked
    sa.Column("shipped_format", sa.String(128)),
    sa.Column("reasons", _JSON, nullable=False),
    sa.Column("policy_hash", sa.String(128), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

# added in schema version 3: what lm-eval itself logged for an evaluation, for `qgate export --lm-eval`:
# the results-level entries (results, configs, versions, n-shot, ...) and every per-sample record with its
# document left out (documents can be large; doc_hash identifies them) and the prompt, which the samples
# table already holds, not repeated
lm_eval_logs = sa.Table(
    "lm_eval_logs", metadata,
    sa.Column("evaluation_id", sa.String(128), sa.ForeignKey("evaluations.id"), primary_key=True),
    sa.Column("results", _JSON, nullable=False),
    sa.Column("samples", _JSON, nullable=False),
)

_V1_TABLES = [schema_version, checkpoints, quant_configs, task_configs, evaluations, samples, runs,
              run_evaluations, decisions, signoffs]


def _migrate_1_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=_V1_TABLES)


def _migrate_2_outcomes(conn: Connection) -> None:
    outcomes.create(conn)
    # plain DDL, not sa.Index objects: those would attach to the tables and step 1 would create them too
    conn.execute(sa.text("CREATE INDEX ix_samples_doc_hash ON samples (doc_hash)"))
    conn.execute(sa.text("CREATE INDEX ix_decisions_run ON decisions (run_id, batch)"))


def _migrate_3_lm_eval_logs(conn: Connection) -> None:
    lm_eval_logs.create(conn)


# (version, what it does, step). Append only.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _migrate_1_initial),
    (2, "outcomes table; indexes on samples.doc_hash and decisions(run_id, batch)", _migrate_2_outcomes),
    (3, "lm_eval_logs table: lm-eval's own results and per-sample records of an evaluation", _migrate_3_lm_eval_logs),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


# ---- helpers ----------------------------------------------------------------------------------


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def resolve_url(url: str | os.PathLike | None = None) -> str:
    """--db value, else $QGATE_DB, else ./qgate.db. A plain path means a SQLite file."""
    value = str(url) if url else os.environ.get("QGATE_DB") or DEFAULT_DB
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def _row(r) -> dict:
    return dict(r._mapping) if r is not None else None


# ---- the store --------------------------------------------------------------------------------

@dataclass
class SavedEvaluation:
    key: str
    inserted: bool  # False: another process had written the same evaluation first


class Store:
    """A handle on one results database. Methods are small transactions; all writes are idempotent
    where the key is a content hash."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name

    # -- lifecycle --

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def version(self) -> int:
        with self.engine.begin() as conn:
            return _read_version(conn)

    # -- insert helpers --

    def _insert_ignore(self, conn: Connection, table: sa.Table, values: dict | list[dict]) -> int:
        """INSERT ... ON CONFLICT DO NOTHING; returns the number of rows inserted."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # other backends: check first (the transaction keeps it consistent enough)
            rows = values if isinstance(values, list) else [values]
            pk = [c.name for c in table.primary_key.columns]
            inserted = 0
            for v in rows:
                cond = sa.and_(*(table.c[k] == v[k] for k in pk))
                if conn.execute(sa.select(sa.func.count()).select_from(table).where(cond)).scalar() == 0:
                    conn.execute(table.insert().values(**v))
                    inserted += 1
            return inserted
        # RETURNING counts the rows really inserted (rowcount is unreliable for ON CONFLICT on some drivers)
        pk = list(table.primary_key.columns)
        stmt = insert(table).values(values).on_conflict_do_nothing().returning(*pk)
        return len(conn.execute(stmt).all())

    # -- content-addressed records --

    def put_checkpoint(self, id: str, *, family: str, member: str, source: str, revision: str | None = None,
                       file_hash: str | None = None, info: dict | None = None) -> None:
        with self.engine.begin() as conn:
            self._insert_ignore(conn, checkpoints, dict(
                id=id, family=family, member=member, source=str(source), revision=revision,
                file_hash=file_hash, info=json_safe(info or {}), created_at=utcnow()))

    def put_quant_config(self, id: str, *, format: str, recipe: Any, config: dict, stats: Any = None,
                         summary: dict | None = None, log: Sequence[str] | None = None) -> None:
        """Record a quantization config; stats/summary/log fill in the first time they are known."""
        with self.engine.begin() as conn:
            inserted = self._insert_ignore(conn, quant_configs, dict(
                id=id, format=format, recipe=recipe if isinstance(recipe, str) else canonical_json(recipe),
                config=json_safe(config), stats=json_safe(stats), summary=json_safe(summary),
                log=json_safe(list(log) if log is not None else None), created_at=utcnow()))
            if not inserted and stats is not None:
                conn.execute(quant_configs.update()
                             .where(quant_configs.c.id == id, quant_configs.c.stats.is_(None))
                             .values(stats=json_safe(stats), summary=json_safe(summary),
                                     log=json_safe(list(log) if log is not None else None)))

    def put_task_config(self, id: str, *, task: str, config: dict) -> None:
        with self.engine.begin() as conn:
            self._insert_ignore(conn, task_configs, dict(id=id, task=task, config=json_safe(config),
                                                         created_at=utcnow()))

    def checkpoint(self, id: str) -> dict | None:
        return self._get(checkpoints, id)

    def quant_config(self, id: str) -> dict | None:
        return self._get(quant_configs, id)

    def task_config(self, id: str) -> dict | None:
        return self._get(task_configs, id)

    def _get(self, table: sa.Table, id) -> dict | None:
        with self.engine.begin() as conn:
            return _row(conn.execute(sa.select(table).where(table.c.id == id)).first())

    # -- evaluations: the cache --

    def cached_keys(self, keys: Iterable[str]) -> set[str]:
        """Which of these evaluation keys are already stored (complete, with their samples)."""
        keys = list(dict.fromkeys(keys))
        found: set[str] = set()
        with self.engine.begin() as conn:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                found.update(conn.execute(sa.select(evaluations.c.id).where(
                    evaluations.c.id.in_(chunk), evaluations.c.status.in_(STORED_STATUSES))).scalars())
        return found

    def evaluation(self, key: str) -> dict | None:
        return self._get(evaluations, key)

    def save_evaluation(self, key: str, *, checkpoint_id: str, quant_config_id: str | None,
                        task_config_id: str, qgate_version: str, task: str, format: str, metrics: dict,
                        primary_metric: str | None, higher_is_better: dict | None, n: int,
                        samples_rows: Sequence[dict], data_source: str | None = None,
                        extras: dict | None = None, runtime: dict | None = None,
                        duration_s: float | None = None, started_at: str | None = None,
                        run_link: dict | None = None, lm_eval_log: dict | None = None) -> SavedEvaluation:
        """Write an evaluation and all its samples in ONE transaction (and link it to a run).

        If the key is already stored (another process got there first), nothing is rewritten.
        ``run_link``: {run_id, member, format, role, task} to record in run_evaluations.
        ``lm_eval_log``: {results, samples} as lm-eval logged them (see ``lm_eval_logs``).
        """
        # NaN/inf results are kept (as null, JSON has neither) under their own status, never as "completed"
        non_finite = has_non_finite(metrics) or (primary_metric is not None and metrics.get(primary_metric) is None) \
            or any(has_non_finite(s.get("scores")) for s in samples_rows)
        row = dict(id=key, checkpoint_id=checkpoint_id, quant_config_id=quant_config_id,
                   task_config_id=task_config_id, qgate_version=qgate_version, task=task, format=format,
                   metrics=json_safe(metrics), primary_metric=primary_metric,
                   higher_is_better=json_safe(higher_is_better), n=int(n),
                   status=NON_FINITE if non_finite else "completed",
                   data_source=data_source, extras=json_safe(extras or {}), runtime=json_safe(runtime or {}),
                   duration_s=duration_s, started_at=started_at, finished_at=utcnow())
        sample_rows = [dict(evaluation_id=key, idx=i, doc_id=str(s.get("doc_id", i)), doc_hash=s.get("doc_hash"),
                            prompt=_text(s.get("prompt")), output=_text(s.get("output")),
                            target=_text(s.get("target")), scores=json_safe(s.get("scores") or {}))
                       for i, s in enumerate(samples_rows)]
        with self.engine.begin() as conn:
            inserted = self._insert_ignore(conn, evaluations, row) > 0
            if inserted:
                for i in range(0, len(sample_rows), 500):
                    conn.execute(samples.insert(), sample_rows[i:i + 500])
                if lm_eval_log is not None:  # ignored if a log of this key outlived its evaluation row
                    self._insert_ignore(conn, lm_eval_logs, dict(
                        evaluation_id=key, results=json_safe(lm_eval_log["results"]),
                        samples=json_safe(lm_eval_log["samples"])))
            if run_link is not None:
                self._link(conn, run_link["run_id"], key, run_link["member"], run_link["format"],
                           run_link["role"], run_link["task"], cached=not inserted)
        return SavedEvaluation(key=key, inserted=inserted)

    def samples(self, key: str) -> list[dict]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(samples).where(samples.c.evaluation_id == key)
                                .order_by(samples.c.idx)).all()
        return [_row(r) for r in rows]

    def lm_eval_log(self, key: str) -> dict | None:
        """What lm-eval logged for an evaluation ({results, samples}); None for one stored before schema 3."""
        with self.engine.begin() as conn:
            return _row(conn.execute(sa.select(lm_eval_logs).where(lm_eval_logs.c.evaluation_id == key)).first())

    def count(self, table_name: str) -> int:
        table = metadata.tables[table_name]
        with self.engine.begin() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()

    # -- runs --

    def start_run(self, *, family: str, formats: Sequence[str], members: Sequence[str] | None = None,
                  suite: str | None = None, suite_hash: str | None = None, policy_hash: str | None = None,
                  policy_text: str | None = None, policy_path: str | None = None,
                  versions: dict | None = None, host: str | None = None, pid: int | None = None,
                  git_revision: str | None = None, backend: str | None = None, device: str | None = None,
                  sample_limit: int | None = None) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(runs.insert().values(
                family=family, formats=list(formats), members=list(members or []), suite=suite,
                suite_hash=suite_hash, policy_hash=policy_hash, policy_text=policy_text,
                policy_path=policy_path, versions=json_safe(versions or {}), host=host, pid=pid,
                git_revision=git_revision, backend=backend, device=device, sample_limit=sample_limit,
                status="running", started_at=utcnow()))
            return int(result.inserted_primary_key[0])

    def update_run(self, run_id: int, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**json_safe(values)))

    def finish_run(self, run_id: int, *, status: str, outcome: str | None = None,
                   exit_code: int | None = None, report_path: str | None = None) -> None:
        self.update_run(run_id, status=status, outcome=outcome, exit_code=exit_code,
                        report_path=report_path, finished_at=utcnow())

    def run(self, run_id: int) -> dict | None:
        return self._get(runs, run_id)

    def runs(self, family: str | None = None, limit: int | None = None) -> list[dict]:
        q = sa.select(runs).order_by(runs.c.id.desc())
        if family:
            q = q.where(runs.c.family == family)
        if limit:
            q = q.limit(limit)
        with self.engine.begin() as conn:
            return [_row(r) for r in conn.execute(q).all()]

    def latest_run_id(self) -> int | None:
        with self.engine.begin() as conn:
            return conn.execute(sa.select(sa.func.max(runs.c.id))).scalar()

    def mark_interrupted(self, host: str, is_alive: Callable[[int], bool]) -> list[int]:
        """Runs on this host still 'running' whose process is gone were killed: say so."""
        with self.engine.begin() as conn:
            stale = [r.id for r in conn.execute(sa.select(runs.c.id, runs.c.pid).where(
                runs.c.status == "running", runs.c.host == host)).all()
                     if r.pid is not None and not is_alive(r.pid)]
            if stale:
                conn.execute(runs.update().where(runs.c.id.in_(stale)).values(status="interrupted"))
        return stale

    def _link(self, conn: Connection, run_id: int, key: str, member: str, format: str, role: str, task: str,
              cached: bool) -> None:
        self._insert_ignore(conn, run_evaluations, dict(run_id=run_id, evaluation_id=key, member=member,
                                                        format=format, role=role, task=task, cached=cached))

    def link_evaluation(self, run_id: int, key: str, *, member: str, format: str, role: str, task: str,
                        cached: bool) -> None:
        with self.engine.begin() as conn:
            self._link(conn, run_id, key, member, format, role, task, cached)

    def run_evaluations(self, run_id: int) -> list[dict]:
        """The evaluations a run used, with their metrics (no samples)."""
        q = (sa.select(run_evaluations, evaluations.c.checkpoint_id, evaluations.c.quant_config_id,
                       evaluations.c.task_config_id, evaluations.c.metrics, evaluations.c.primary_metric,
                       evaluations.c.higher_is_better, evaluations.c.n, evaluations.c.runtime,
                       evaluations.c.duration_s, evaluations.c.finished_at)
             .join(evaluations, evaluations.c.id == run_evaluations.c.evaluation_id)
             .where(run_evaluations.c.run_id == run_id)
             .order_by(run_evaluations.c.member, run_evaluations.c.role, run_evaluations.c.format,
                       run_evaluations.c.task))
        with self.engine.begin() as conn:
            return [_row(r) for r in conn.execute(q).all()]

    # -- decisions --

    def record_decisions(self, run_id: int, *, policy_hash: str, decisions_rows: Sequence[dict],
                         outcomes_rows: Sequence[dict]) -> str:
        """Add one decide pass (task decisions + member outcomes) in one transaction; returns its batch id.

        decisions_rows: {member, format, role, task, verdict, reason, numbers}
        outcomes_rows:  {member, format, outcome, shipped_format, reasons}
        Earlier batches stay: a later pass under another policy adds rows, it never rewrites them.
        """
        batch = uuid.uuid4().hex
        now = utcnow()
        with self.engine.begin() as conn:
            if decisions_rows:
                conn.execute(decisions.insert(), [dict(
                    run_id=run_id, batch=batch, member=d["member"], format=d["format"], role=d["role"],
                    task=d["task"], verdict=d["verdict"], reason=d["reason"],
                    numbers=json_safe(d.get("numbers") or {}), policy_hash=policy_hash, created_at=now)
                    for d in decisions_rows])
            if outcomes_rows:
                conn.execute(outcomes.insert(), [dict(
                    run_id=run_id, batch=batch, member=o["member"], format=o["format"], outcome=o["outcome"],
                    shipped_format=o.get("shipped_format"), reasons=json_safe(list(o.get("reasons") or [])),
                    policy_hash=policy_hash, created_at=now) for o in outcomes_rows])
        return batch

    def decision_batches(self, run_id: int) -> list[dict]:
        """The decide passes of a run, oldest first: {batch, policy_hash, created_at}."""
        q = (sa.select(decisions.c.batch, decisions.c.policy_hash, sa.func.min(decisions.c.created_at))
             .where(decisions.c.run_id == run_id)
             .group_by(decisions.c.batch, decisions.c.policy_hash)
             .order_by(sa.func.min(decisions.c.created_at), sa.func.min(decisions.c.id)))
        with self.engine.begin() as conn:
            return [{"batch": b, "policy_hash": h, "created_at": t} for b, h, t in conn.execute(q).all()]

    def decisions(self, run_id: int, batch: str | None = "latest") -> list[dict]:
        """Task decisions of a run: the latest pass by default, one named batch, or all (batch=None)."""
        return self._batch_rows(decisions, run_id, batch)

    def outcomes(self, run_id: int, batch: str | None = "latest") -> list[dict]:
        return self._batch_rows(outcomes, run_id, batch)

    def family_decisions(self, family: str) -> list[dict]:
        """The latest stored decision per run x member x format x task of a family, oldest run first;
        the decisions table's rows plus ``run_policy_hash``."""
        q = (sa.select(decisions, runs.c.policy_hash.label("run_policy_hash"))
             .join(runs, runs.c.id == decisions.c.run_id)
             .where(runs.c.family == family)
             .order_by(decisions.c.run_id, decisions.c.id))
        latest: dict[tuple, dict] = {}
        with self.engine.begin() as conn:
            for row in conn.execute(q).all():
                r = _row(row)
                latest[(r["run_id"], r["member"], r["format"], r["task"])] = r  # later ids win
        return list(latest.values())

    def _batch_rows(self, table: sa.Table, run_id: int, batch: str | None) -> list[dict]:
        """Rows of a per-run, batched table (decisions, outcomes): latest batch, one batch, or all."""
        q = sa.select(table).where(table.c.run_id == run_id).order_by(table.c.id)
        with self.engine.begin() as conn:
            if batch == "latest":
                batch = _latest_batch(conn, table, run_id)
                if batch is None:
                    return []
            if batch is not None:
                q = q.where(table.c.batch == batch)
            return [_row(r) for r in conn.execute(q).all()]

    # -- sign-offs --

    def add_signoff(self, run_id: int, *, reviewer: str, decision: str, digest: str, comment: str | None = None,
                    override: bool = False) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(signoffs.insert().values(
                run_id=run_id, reviewer=reviewer, decision=decision, comment=comment, override=bool(override),
                digest=digest, created_at=utcnow()))
            return int(result.inserted_primary_key[0])

    def signoffs(self, run_id: int) -> list[dict]:
        with self.engine.begin() as conn:
            return [_row(r) for r in conn.execute(
                sa.select(signoffs).where(signoffs.c.run_id == run_id).order_by(signoffs.c.id)).all()]


def _latest_batch(conn: Connection, table: sa.Table, run_id: int) -> str | None:
    return conn.execute(sa.select(table.c.batch).where(table.c.run_id == run_id)
                        .order_by(table.c.id.desc()).limit(1)).scalar()


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return canonical_json(value)


# ---- opening and migrating --------------------------------------------------------------------

def _read_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(sa.select(schema_version.c.version).where(schema_version.c.id == 1)).scalar() or 0


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # the driver's own transaction handling is off: we issue BEGIN IMMEDIATE ourselves
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def migrate(engine: Engine, target: int | None = None) -> int:
    """Apply the missing migration steps (up to ``target``, default the newest); returns the version."""
    target = SCHEMA_VERSION if target is None else target
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # one migrator at a time across processes (DDL is transactional in PostgreSQL)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242424201)"))
        current = _read_version(conn)
        if current > SCHEMA_VERSION:
            raise QgateError(f"database schema version {current} is newer than this qgate supports "
                             f"({SCHEMA_VERSION}); upgrade qgate")
        for version, _what, step in MIGRATIONS:
            if current < version <= target:
                step(conn)
                current = version
        if current != _read_version(conn):
            if conn.execute(sa.select(sa.func.count()).select_from(schema_version)).scalar():
                conn.execute(schema_version.update().where(schema_version.c.id == 1)
                             .values(version=current, updated_at=utcnow()))
            else:
                conn.execute(schema_version.insert().values(id=1, version=current, updated_at=utcnow()))
    return current


SQLITE_HEADER = b"SQLite format 3\x00"
CONNECT_TIMEOUT_S = 10  # a database server that does not answer: give up quickly, with one line


_CHECKED_FILES: set[tuple[int, int]] = set()  # (device, inode) of SQLite files this process checked


def _check_sqlite_file(path: Path) -> None:
    """Before SQLite touches anything (it would create -wal/-shm files beside a file it then refuses):
    the path is a regular file holding a SQLite database (or nothing yet), and it and its folder are
    writable. A file whose write bits are all off counts as read-only even for root: someone meant it.

    Once per file and process: reading the header opens and closes the file outside SQLite, and closing
    any descriptor of a file drops every POSIX lock this process holds on it, SQLite's included. With a
    connection already open, another process would then checkpoint under it and corrupt the database."""
    try:
        ident = (path.stat().st_dev, path.stat().st_ino)
    except OSError:
        ident = None
    if ident in _CHECKED_FILES:
        return
    parent = path.parent
    if not parent.is_dir():
        raise QgateError(f"--db {path}: folder {parent} does not exist")
    if path.exists():
        if path.is_dir():
            raise QgateError(f"--db {path}: is a folder; expected a SQLite database file (e.g. {path / 'qgate.db'})")
        if not path.is_file():
            raise QgateError(f"--db {path}: not a regular file; expected a SQLite database file")
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise QgateError(f"--db {path}: cannot be read ({exc.strerror})") from None
        if head and head != SQLITE_HEADER:
            raise QgateError(f"--db {path}: not a SQLite database (its first bytes are not 'SQLite format 3'); "
                             f"give another path or move the file away")
        if not path.stat().st_mode & 0o222 or not os.access(path, os.W_OK):
            raise QgateError(f"--db {path}: the database file is read-only (mode {path.stat().st_mode & 0o777:04o}); "
                             f"qgate records every run in it and needs to write")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QgateError(f"--db {path}: folder {parent} is not writable (SQLite keeps its journal beside the file)")
    if ident is not None:
        _CHECKED_FILES.add(ident)


def check_location(url: str | os.PathLike | None = None) -> str:
    """What open_store would refuse about a SQLite path (folder, foreign or read-only file), checked
    without creating anything; returns the resolved URL. Server URLs are checked when opened."""
    resolved = resolve_url(url)
    if resolved.startswith("sqlite:///"):
        _check_sqlite_file(Path(resolved[len("sqlite:///"):]))
    return resolved


def _create_private(path: Path) -> None:
    """A new SQLite file is created readable by its owner only: it holds prompts, outputs and scores, and
    programs run by the code sandbox (another uid) must not read it; SQLite gives -wal/-shm the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _one_line(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def open_store(url: str | os.PathLike | None = None, *, migrate_to: int | None = None) -> Store:
    """Open (creating if needed) the results database and bring its schema up to date."""
    resolved = resolve_url(url)
    created = None
    if resolved.startswith("sqlite:///"):
        path = Path(resolved[len("sqlite:///"):])
        _check_sqlite_file(path)
        if not path.exists():
            _create_private(path)
            created = path
    try:
        engine = _make_engine(resolved)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise QgateError(f"--db {redact_url(resolved)!r}: not a database URL SQLAlchemy can open "
                         f"({_one_line(exc)})") from None
    try:
        migrate(engine, migrate_to)
    except sa.exc.DBAPIError as exc:  # OperationalError, DatabaseError, InterfaceError ...
        engine.dispose()
        if created is not None:
            for stray in (created, Path(f"{created}-wal"), Path(f"{created}-shm")):
                stray.unlink(missing_ok=True)
        raise QgateError(f"cannot open database {redact_url(resolved)}: {_one_line(exc)}") from None
    return Store(engine, resolved)


def redact_url(url: str) -> str:
    """A database URL fit to print: the password hidden (``***``); the text as given if it is not a URL."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a message
        return url
