"""Re-deciding stored decisions under another policy, through the one decision engine (qgate.decide).

Nothing is evaluated: every decision rests on stored per-sample scores, found by the gate's own
cache keys; what the store lacks is reported as missing evidence, never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from qgate.decide import ChainOutcome, TaskVerdict, decide, gate_effect, walk_chain
from qgate.errors import QgateError
from qgate.evaluation.suite import load_suite
from qgate.policy import Policy
from qgate.report.data import open_existing_store, resolve_run_id
from qgate.review.changes import describe_changes, suite_tasks
from qgate.review.evidence import StoredEvidence
from qgate.review.findings import Flip, Missing, OutcomeChange, PolicyReview, RunRedecision
from qgate.review.sources import load_policy_source
from qgate.store import open_store, redact_url, resolve_url


def _suite_delta(old: Policy, new: Policy) -> tuple[list[str], list[str]]:
    """Tasks NEW's suite runs that OLD's does not, and the other way round (empty when unknown)."""
    old_suite, new_suite = suite_tasks(old), suite_tasks(new)
    if old_suite is None or new_suite is None:
        return [], []
    return [t for t in new_suite if t not in old_suite], [t for t in old_suite if t not in new_suite]


def _run_tasks_under(policy: Policy, run: Mapping, stored: Sequence[str]) -> list[str]:
    """The tasks ``policy`` decides for a stored run: the run's own tasks when the policy's suite is the
    one the run used, else the policy's suite's tasks."""
    try:
        suite = load_suite(policy.suite)
    except QgateError:
        return list(stored)
    if suite.name == run.get("suite") and (not run.get("suite_hash") or suite.hash == run.get("suite_hash")):
        return list(stored)
    return suite.task_names()


def review(old: Policy, new: Policy, store=None) -> PolicyReview:
    """Compare two policies and re-decide the family's stored decisions under the new one."""
    stored_rows = store.family_decisions(new.family) if store is not None else []
    units = {r["task"]: (r.get("numbers") or {}).get("unit") or "" for r in stored_rows}
    for policy in (old, new):
        for name, spec in (suite_tasks(policy) or {}).items():
            units.setdefault(name, "pts" if spec.per_sample == "binary" else "")
    result = PolicyReview(old, new, describe_changes(old, new, units, extra_tasks=[r["task"] for r in stored_rows]),
                          redact_url(store.url) if store is not None else None)
    if old.family != new.family:
        result.notes.append(f"the policies are for different families ({old.family}, {new.family}); "
                            f"stored decisions of {new.family} are re-decided")
    if store is None:
        return result
    if not stored_rows:
        result.notes.append(f"no stored decisions of family {new.family}: nothing to re-decide")
    evidence = StoredEvidence(store, new)
    by_run: dict[int, list[dict]] = {}
    for row in stored_rows:
        by_run.setdefault(row["run_id"], []).append(row)
    other_policy = sorted({r["run_id"] for r in stored_rows if r["policy_hash"] != old.hash})
    if other_policy:
        result.notes.append(f"decisions of run {', '.join(map(str, other_policy))} were made under a policy other "
                            f"than OLD; flips are against the stored decisions")

    missing: dict[tuple, Missing] = {}

    old_chain = {c.format for c in old.fallback}

    def add_missing(m: Missing) -> None:
        if not m.needed and m.format in old_chain:
            return  # only a fallback the change introduces is worth a line when it is not (yet) needed
        key = (m.member, m.format, m.task, m.why)
        if key in missing:
            missing[key].runs = sorted(set(missing[key].runs) | set(m.runs))
        else:
            missing[key] = m

    added, removed = _suite_delta(old, new)
    for run_id, rows in by_run.items():
        run = store.run(run_id) or {}
        stored_tasks = list(dict.fromkeys(r["task"] for r in rows))
        # what the policy change asks of this run: its tasks, plus those NEW's suite adds, minus those it drops
        tasks = [t for t in dict.fromkeys([*stored_tasks, *added]) if t not in removed]
        hints = {(r["member"], r["format"], r["task"]): r.get("numbers") or {} for r in rows}
        role_of = {(r["member"], r["format"], r["task"]): r["role"] for r in rows}
        stored = {(r["member"], r["format"], r["task"]): r for r in rows}
        old_outcomes = {(o["member"], o["format"]): o for o in store.outcomes(run_id)}
        members = list(dict.fromkeys(r["member"] for r in rows))
        requested = list(run.get("formats") or []) or list(dict.fromkeys(r["format"] for r in rows
                                                                         if r["role"] == "candidate"))
        redecided_here: dict[tuple, TaskVerdict] = {}
        for member in members:
            for fmt in requested:
                outcome, missing_here = _walk(evidence, run_id, member, fmt, tasks, new, hints, role_of)
                for v in outcome.verdicts:
                    redecided_here[(member, v.format, v.task)] = v
                for m in missing_here:
                    add_missing(m)
                before = old_outcomes.get((member, fmt))
                if before is not None and (before["outcome"], before.get("shipped_format")) != (
                        outcome.outcome, outcome.shipped_format):
                    result.outcome_changes.append(OutcomeChange(
                        run_id, member, fmt, before["outcome"], before.get("shipped_format"), outcome.outcome,
                        outcome.shipped_format, outcome.reasons))
        # every stored decision, whether or not the new outcome needed it
        for key, row in stored.items():
            got = redecided_here.get(key)
            if got is None and row["task"] in tasks:
                found = evidence.evidence(run_id, row["member"], row["format"], row["task"], row["role"],
                                          row.get("numbers") or {})
                got = found if isinstance(found, str) else decide(new, row["member"], row["format"], row["role"],
                                                                  row["task"], found)
                if isinstance(got, str):
                    add_missing(Missing(row["member"], row["format"], row["task"], got, runs=[run_id]))
                    continue
            if got is None:
                result.notes.append(f"run {run_id}: {row['member']} {row['format']} {row['task']} is no longer "
                                    f"decided under NEW (task not in its suite)")
                continue
            result.redecided += 1
            old_numbers = row.get("numbers") or {}
            old_effect = old_numbers.get("effect") or gate_effect(_verdict_only(row), old.task_policy(row["task"]))
            if row["verdict"] != got.decision.verdict or old_effect != got.effect:
                result.flips.append(Flip(run_id, row["member"], row["format"], row["role"], row["task"],
                                         row["verdict"], got.decision.verdict, old_effect, got.effect,
                                         row["reason"], got.decision.reason, old_numbers.get("threshold"),
                                         got.numbers()))
    # what NEW adds that no stored run covers: members and candidate formats
    evaluated = {(r["member"], r["format"]) for r in stored_rows}
    stored_members = {r["member"] for r in stored_rows}
    for m in new.members:
        if stored_members and m.name not in stored_members:
            add_missing(Missing(m.name, "-", None, "member never evaluated"))
    for choice in new.formats:
        for member in sorted(stored_members):
            if (member, choice.format) not in evaluated and choice.format not in {c.format for c in old.formats}:
                add_missing(Missing(member, choice.format, None, "candidate format added; no stored evaluations"))
    result.missing = sorted(missing.values(), key=lambda m: (not m.needed, m.member, m.format, m.task or ""))
    return result


def _verdict_only(row: Mapping) -> Any:
    return SimpleNamespace(verdict=row["verdict"])


def _walk(evidence: StoredEvidence, run_id: int, member: str, fmt: str, tasks: Sequence[str], policy: Policy,
          hints: Mapping[tuple, Mapping], role_of: Mapping[tuple, str]) -> tuple[ChainOutcome, list[Missing]]:
    """The engine's outcome for a stored run's member x format, with the evidence it lacks: what stopped
    the walk, and the formats further down the chain that have no stored evaluations at all (needed
    only if an earlier step fails)."""
    outcome = walk_chain(policy, member, fmt, tasks, evidence.for_run(run_id, hints, role_of))
    missing = [Missing(member, m.format, m.task, m.why, runs=[run_id]) for m in outcome.missing]
    if outcome.outcome == "undecided":
        outcome.reasons = outcome.reasons + [m.text() for m in missing]
    stopped_at = (outcome.missing[0].format if outcome.missing else outcome.shipped_format)
    if outcome.outcome != "blocked":
        missing += [Missing(member, c, None, f"no stored evaluations (needed only if {stopped_at} fails)",
                            needed=False, runs=[run_id]) for c, _ in outcome.untried
                    if not any(evidence.find(run_id, member, c, t) for t in tasks)]
    return outcome, missing


def redecide_run(store, run_id: int, policy: Policy) -> RunRedecision:
    """Decide a stored run again under ``policy`` from its stored samples and record the result as a
    new decision set (the run's earlier sets stay, so the report shows the history)."""
    run = store.run(run_id)
    if run is None:
        raise QgateError(f"RUN {run_id}: no such run in {store.url}")
    if run["family"] != policy.family:
        raise QgateError(f"--policy {policy.path}: policy is for family {policy.family!r}, "
                         f"run {run_id} is of family {run['family']!r}")
    evidence = StoredEvidence(store, policy)
    links = evidence.links(run_id)
    if not links:
        raise QgateError(f"RUN {run_id}: the run has no stored evaluations to decide from (status {run['status']})")
    previous_rows = store.decisions(run_id)
    previous = {(r["member"], r["format"], r["task"]): r for r in previous_rows}
    hints = {k: r.get("numbers") or {} for k, r in previous.items()}
    role_of = {(l["member"], l["format"], l["task"]): l["role"] for l in links if l["role"] != "baseline"}
    stored_tasks = list(dict.fromkeys(l["task"] for l in links))
    tasks = _run_tasks_under(policy, run, stored_tasks)
    members = list(dict.fromkeys([*(run.get("members") or []), *(l["member"] for l in links)]))
    members = [m for m in members if any(l["member"] == m for l in links)]
    formats = list(run.get("formats") or [])
    decision_rows, outcome_rows, missing = [], [], []
    for member in members:
        for fmt in formats:
            outcome, missing_here = _walk(evidence, run_id, member, fmt, tasks, policy, hints, role_of)
            decision_rows += [v.row() for v in outcome.verdicts]
            outcome_rows.append(outcome.to_dict())
            missing += [m for m in missing_here if m.needed]
    previous_outcomes = {(o["member"], o["format"]): o for o in store.outcomes(run_id)}
    batch = store.record_decisions(run_id, policy_hash=policy.hash, decisions_rows=decision_rows,
                                   outcomes_rows=outcome_rows)
    return RunRedecision(run_id, policy, batch, decision_rows, outcome_rows, previous, previous_outcomes, missing)


def open_review_store(db: str | None):
    """The results database to re-decide from, or None when there is none (a default SQLite path that
    does not exist: nothing is stored yet, and a review must not create a database as a side effect)."""
    url = resolve_url(db)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        if db or os.environ.get("QGATE_DB"):
            raise QgateError(f"--db {db or os.environ.get('QGATE_DB')}: no database there")
        return None
    return open_store(db)


def diff(old_spec: str, new_spec: str, db: str | None = None) -> PolicyReview:
    """``qgate policy diff``: load both policies (bad input raises before anything is read from the
    store), then review the change against the stored decisions."""
    new = load_policy_source(new_spec)
    old = load_policy_source(old_spec, check_tasks=False)  # the base was checked on its own branch
    store = open_review_store(db)
    try:
        return review(old, new, store)
    finally:
        if store is not None:
            store.close()


def redecide(run: str | int, policy_spec: str, db: str | None = None) -> RunRedecision:
    """``qgate policy redecide``: record a new decision set for a stored run under another policy."""
    policy = load_policy_source(policy_spec)
    with open_existing_store(db) as store:
        return redecide_run(store, resolve_run_id(store, run), policy)
