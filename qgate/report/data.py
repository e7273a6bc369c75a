"""The report model: a plain dict that holds everything the HTML shows, and `collect` that fills it.

Rendering reads only this dict, never the database, so templates and charts can be tested on a
hand-made model and the same model feeds the sign-off digest. Shape (every key present; lists may
be empty; numbers may be None where unknown):

    run:        id, family, formats [str], suite, suite_hash, policy_hash, policy_text, status,
                backend, device, host, git_revision, started_at, finished_at (ISO strings),
                versions {library: version}, qgate_version
    members:    [{member, requested_format, outcome ("ships" | "fallback" | "blocked"),
                  shipped_format (str | None), reasons [str], checkpoint {id, source, revision, file_hash,
                  description (how the baseline was made, or None)}}]
    results:    [{member, format, task, metric, unit, higher_is_better, baseline, candidate, delta,
                  ci_low, ci_high, threshold (signed delta at which the task fails), confidence, n,
                  verdict ("pass" | "fail" | "inconclusive"), blocking, reason, samples_needed}]
    needle:     [{member, format, baseline: grid, candidate: grid}] with grid = {lengths [int],
                  depths [number], cells [[accuracy | None] per depth, one per length]}
    quantization: [{member, format, recipe, config {...}, summary {...}, tensors [{name, format,
                  shape, numel, sqnr_db, rel_mse, saturated_block_share, blocks, promoted_blocks, bytes}]}]
    footprint:  {bandwidth (bytes/s), bandwidth_label, rows [{member, format, params, bytes,
                  bits_per_value, tokens_per_s}]}
    flips:      [{member, format, task, direction ("lost" | "gained"), doc_id, prompt, target,
                  baseline_output, candidate_output}]
    flip_counts: [{member, format, task, lost, gained, n}]
    history:    [{decided_at, policy_hash, current (bool), rows [{member, format, task, verdict, reason}]}]
    signoffs:   [{reviewer, decision ("approve" | "reject"), comment, override, digest, created_at}]
"""

from __future__ import annotations

from pathlib import Path

from qgate.decide import pair_samples
from qgate.errors import QgateError
from qgate.report import roofline
from qgate.store import open_store, resolve_url

OUTCOME_TITLES = {
    "ships": "ships as requested",
    "fallback": "ships with fallback",
    "blocked": "blocked",
    "undecided": "not decided",
}


def empty_model() -> dict:
    """A model with every key present, for callers that fill it piece by piece."""
    return {
        "run": {}, "members": [], "results": [], "needle": [], "quantization": [], "sandboxes": [],
        "footprint": {"bandwidth": None, "bandwidth_label": "", "rows": []},
        "flips": [], "flip_counts": [], "history": [], "signoffs": [],
    }


# ---------------------------------------------------------------- filling the model from a store

MAX_FLIPS_SHOWN = 20  # per comparison and direction; the counts table always has the full numbers
RUN_FIELDS = ("id", "family", "formats", "members", "suite", "suite_hash", "policy_hash", "policy_text", "policy_path",
              "status", "outcome", "backend", "device", "host", "git_revision", "started_at", "finished_at",
              "versions", "sample_limit")


def resolve_run_id(store, run: str | int) -> int:
    """A run argument ("latest" or a number) -> an existing run id, or a QgateError naming what is wrong."""
    if str(run).strip().lower() == "latest":
        run_id = store.latest_run_id()
        if run_id is None:
            raise QgateError(f"RUN latest: the database {store.url} holds no runs yet (run `qgate run` first)")
        return int(run_id)
    try:
        run_id = int(str(run).strip())
    except ValueError:
        raise QgateError(f"RUN {run!r}: expected a run number or 'latest'") from None
    if store.run(run_id) is None:
        raise QgateError(f"RUN {run_id}: no such run in {store.url}")
    return run_id


def collect(store, run_id) -> dict:
    """Fill the report model for one run from the store (read only)."""
    run_row = store.run(int(run_id))
    if run_row is None:
        raise QgateError(f"RUN {run_id}: no such run in {store.url}")
    model = empty_model()
    run = {key: run_row.get(key) for key in RUN_FIELDS}
    run["formats"] = list(run.get("formats") or [])
    run["versions"] = dict(run.get("versions") or {})
    run["qgate_version"] = run["versions"].get("qgate")
    model["run"] = run

    links = store.run_evaluations(run["id"])
    evaluations = {link["evaluation_id"]: store.evaluation(link["evaluation_id"]) for link in links}
    decisions = store.decisions(run["id"])
    model["members"] = _members(store, run, links, store.outcomes(run["id"]))
    model["results"] = [_result(row) for row in decisions]
    model["needle"] = _needle(links, evaluations)
    model["sandboxes"] = _sandboxes(links, evaluations)
    model["quantization"] = _quantization(store, links)
    model["footprint"] = _footprint(model["quantization"], links, store)
    model["flips"], model["flip_counts"] = _flips(store, links, decisions)
    model["history"] = _history(store, run["id"])
    model["signoffs"] = [dict(s) for s in store.signoffs(run["id"])]
    return model


def _members(store, run: dict, links: list[dict], outcomes: list[dict]) -> list[dict]:
    checkpoints = {}
    for link in links:
        if link["member"] not in checkpoints and link.get("checkpoint_id"):
            row = store.checkpoint(link["checkpoint_id"]) or {}
            checkpoints[link["member"]] = {k: row.get(k) for k in ("id", "source", "revision", "file_hash")}
            checkpoints[link["member"]]["description"] = (row.get("info") or {}).get("description")
    members = []
    for o in outcomes:
        members.append({"member": o["member"], "requested_format": o["format"], "outcome": o["outcome"],
                        "shipped_format": o.get("shipped_format"), "reasons": list(o.get("reasons") or []),
                        "checkpoint": checkpoints.get(o["member"], {})})
    decided = {m["member"] for m in members}
    for name in dict.fromkeys([*(run.get("members") or []), *checkpoints]):
        if name not in decided:  # an interrupted run: show the member, undecided
            members.append({"member": name, "requested_format": ", ".join(run["formats"]), "outcome": "undecided",
                            "shipped_format": None, "reasons": [f"not decided (run status: {run.get('status')})"],
                            "checkpoint": checkpoints.get(name, {})})
    return members


def _result(row: dict) -> dict:
    numbers = row.get("numbers") or {}
    out = {"member": row["member"], "format": row["format"], "task": row["task"], "role": row.get("role"),
           "verdict": row["verdict"], "reason": row["reason"]}
    for key in ("metric", "unit", "baseline", "candidate", "delta", "ci_low", "ci_high", "threshold",
                "confidence", "n", "samples_needed", "p_value", "method", "effect"):
        out[key] = numbers.get(key)
    out["higher_is_better"] = numbers.get("higher_is_better", True)
    out["blocking"] = numbers.get("blocking", True)
    out["binary"] = numbers.get("binary")
    return out


# -- needle grids: accept the shapes a task may store in extras

def _as_number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def normalize_grid(extras: dict | None) -> dict | None:
    """Find a needle depth x length grid in an evaluation's extras, as {lengths, depths, cells}.

    Accepted (under "needle_grid" or "grid", or at the top level):
      {context_lengths, depths, accuracy: {length: {depth: acc}}}  (what qgate's needle task stores);
      {lengths, depths, cells: [[acc per length] per depth]};  {length: {depth: acc}};
      [{length|context_len, depth, accuracy|score}, ...].
    """
    if not isinstance(extras, dict):
        return None
    if "depths" in extras and ("lengths" in extras or "context_lengths" in extras):
        grid = extras
    else:
        grid = extras.get("needle_grid", extras.get("grid"))
    if isinstance(grid, dict) and "depths" in grid:
        lengths = grid.get("lengths", grid.get("context_lengths"))
        cells = grid.get("cells", grid.get("accuracy"))
        if isinstance(lengths, list) and isinstance(cells, list):
            return {"lengths": list(lengths), "depths": list(grid["depths"]), "cells": cells}
        if isinstance(cells, dict):
            grid = cells  # {length: {depth: acc}}, handled below
    entries = []
    if isinstance(grid, dict):
        for length, row in grid.items():
            if isinstance(row, dict):
                entries += [(_as_number(length), _as_number(depth), acc) for depth, acc in row.items()]
    elif isinstance(grid, list):
        for cell in grid:
            if isinstance(cell, dict):
                length = cell.get("length", cell.get("context_len", cell.get("context_length")))
                depth = cell.get("depth", cell.get("depth_percent"))
                acc = cell.get("accuracy", cell.get("score", cell.get("acc")))
                if length is not None and depth is not None:
                    entries.append((_as_number(length), _as_number(depth), acc))
    if not entries:
        return None
    lengths = sorted({e[0] for e in entries}, key=lambda v: (isinstance(v, str), v))
    depths = sorted({e[1] for e in entries}, key=lambda v: (isinstance(v, str), v))
    lookup = {(e[0], e[1]): e[2] for e in entries}
    lengths_out = [int(v) if isinstance(v, float) and v.is_integer() else v for v in lengths]
    return {"lengths": lengths_out, "depths": depths,
            "cells": [[lookup.get((length, depth)) for length in lengths] for depth in depths]}


def _needle(links: list[dict], evaluations: dict) -> list[dict]:
    baselines = {(l["member"], l["task"]): l for l in links if l["role"] == "baseline"}
    out = []
    for link in links:
        if link["role"] == "baseline":
            continue
        base_link = baselines.get((link["member"], link["task"]))
        candidate = normalize_grid((evaluations.get(link["evaluation_id"]) or {}).get("extras"))
        baseline = normalize_grid((evaluations.get(base_link["evaluation_id"]) or {}).get("extras")) if base_link else None
        if candidate or baseline:
            out.append({"member": link["member"], "format": link["format"], "task": link["task"],
                        "baseline": baseline or {}, "candidate": candidate or {}})
    return out


def _sandboxes(links: list[dict], evaluations: dict) -> list[dict]:
    """How model-generated code was contained, per evaluation that ran some (stored with the evaluation)."""
    out = []
    for link in links:
        sandbox = ((evaluations.get(link["evaluation_id"]) or {}).get("extras") or {}).get("sandbox")
        if isinstance(sandbox, dict):
            out.append({"member": link["member"], "format": link["format"], "task": link["task"],
                        "mode": sandbox.get("mode") or "unrecorded",
                        "network_namespace": sandbox.get("network_namespace"),
                        "notes": list(sandbox.get("notes") or [])})
    return out


def _tensor_stats(stats) -> list[dict]:
    if isinstance(stats, dict):
        stats = stats.get("tensors", [])
    return [dict(t) for t in (stats or []) if isinstance(t, dict)]


def _quantization(store, links: list[dict]) -> list[dict]:
    out, seen = [], set()
    for link in links:
        key = (link["member"], link.get("quant_config_id"))
        if link["role"] == "baseline" or not link.get("quant_config_id") or key in seen:
            continue
        seen.add(key)
        row = store.quant_config(link["quant_config_id"]) or {}
        out.append({"member": link["member"], "format": row.get("format", link["format"]), "role": link["role"],
                    "quant_config_id": link["quant_config_id"], "recipe": row.get("recipe"),
                    "config": row.get("config") or {}, "summary": dict(row.get("summary") or {}),
                    "log": list(row.get("log") or []), "tensors": _tensor_stats(row.get("stats"))})
    return out


def _footprint(quantization: list[dict], links: list[dict], store) -> dict:
    """Bytes and the decode ceiling per member x format: qgate.footprint from the checkpoint's config
    where it can, else the byte counts the quantization recorded."""
    return roofline.footprint_table(store, links, quantization)


def _score(scores: dict, metric: str | None):
    if not isinstance(scores, dict):
        return None
    value = scores.get(metric) if metric else None
    if value is None and len(scores) == 1:
        value = next(iter(scores.values()))
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None  # not a pass/fail score: no flips for this task


def _flips(store, links: list[dict], decisions: list[dict]) -> tuple[list[dict], list[dict]]:
    by_role = {(l["member"], l["format"], l["role"], l["task"]): l["evaluation_id"] for l in links}
    baselines = {(l["member"], l["task"]): l["evaluation_id"] for l in links if l["role"] == "baseline"}
    cache: dict[str, list[dict]] = {}

    def samples_of(key):
        if key not in cache:
            cache[key] = store.samples(key)
        return cache[key]

    flips, counts = [], []
    for row in decisions:
        base_key = baselines.get((row["member"], row["task"]))
        cand_key = by_role.get((row["member"], row["format"], row.get("role"), row["task"])) or next(
            (v for (m, f, _r, t), v in by_role.items() if (m, f, t) == (row["member"], row["format"], row["task"])
             and _r != "baseline"), None)
        if not base_key or not cand_key:
            continue
        metric = (row.get("numbers") or {}).get("metric")
        lost, gained, n = [], [], 0
        for base, cand in pair_samples(samples_of(base_key), samples_of(cand_key)).pairs:
            b, c = _score(base.get("scores"), metric), _score(cand.get("scores"), metric)
            if b is None or c is None:
                continue
            n += 1
            if b != c:
                (lost if b > c else gained).append({
                    "member": row["member"], "format": row["format"], "task": row["task"],
                    "direction": "lost" if b > c else "gained", "doc_id": base["doc_id"],
                    "prompt": base.get("prompt") or "", "target": base.get("target") or "",
                    "baseline_output": base.get("output") or "", "candidate_output": cand.get("output") or ""})
        if n:
            counts.append({"member": row["member"], "format": row["format"], "task": row["task"],
                           "lost": len(lost), "gained": len(gained), "n": n})
            flips += lost[:MAX_FLIPS_SHOWN] + gained[:MAX_FLIPS_SHOWN]
    return flips, counts


def _history(store, run_id: int) -> list[dict]:
    batches = store.decision_batches(run_id)
    history = []
    for index, batch in enumerate(batches):
        rows = store.decisions(run_id, batch=batch["batch"])
        history.append({"decided_at": batch["created_at"], "policy_hash": batch["policy_hash"],
                        "current": index == len(batches) - 1,
                        "rows": [{k: r.get(k) for k in ("member", "format", "task", "verdict", "reason")} for r in rows]})
    return history


def open_existing_store(db=None):
    """Open the results database for reading a run: a SQLite file that does not exist is an error
    (reporting must not create an empty database as a side effect)."""
    url = resolve_url(db)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise QgateError(f"--db {db or url[len('sqlite:///'):]}: no database there (run `qgate run` first, "
                         f"or pass --db / set QGATE_DB)")
    return open_store(db)
