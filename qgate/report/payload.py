"""The signed payload: what a sign-off of a run covers, as one canonical JSON document, and its digest.

The payload holds the run's provenance, every evaluation it used (metrics, n, and a sha256 of all its
samples), the quantization statistics, the current decisions and member outcomes, the policy (hash and
text), and the sha256 of the report content without its sign-off regions (render.content_sha256).
The digest is the sha256 of that document. The database keeps the digest with the sign-off; the report
embeds the digest, the sign-off id and the payload itself (so verify can say what changed).

Read from the store only; both the renderer (to embed it) and qgate.signoff (to record and verify it)
use this module, which imports neither.
"""

from __future__ import annotations

from qgate.canonical import canonical_json, content_hash

PAYLOAD_FORMAT = "qgate-signoff/1"
RUN_SIGNED_FIELDS = ("id", "family", "formats", "members", "suite", "suite_hash", "policy_hash", "status", "outcome",
                     "backend", "device", "host", "git_revision", "versions", "sample_limit", "started_at",
                     "finished_at")


def build_payload(store, run_id: int, report_sha256: str) -> dict:
    """Everything a sign-off of this run approves, as plain JSON values (see module docstring)."""
    run = store.run(run_id)
    links = store.run_evaluations(run_id)
    results = []
    for link in links:
        evaluation = store.evaluation(link["evaluation_id"]) or {}
        sample_rows = [{k: s.get(k) for k in ("doc_id", "doc_hash", "prompt", "output", "target", "scores")}
                       for s in store.samples(link["evaluation_id"])]
        results.append({
            "member": link["member"], "format": link["format"], "role": link["role"], "task": link["task"],
            "evaluation": link["evaluation_id"], "checkpoint": evaluation.get("checkpoint_id"),
            "quant_config": evaluation.get("quant_config_id"), "task_config": evaluation.get("task_config_id"),
            "metrics": evaluation.get("metrics"), "primary_metric": evaluation.get("primary_metric"),
            "n": evaluation.get("n"), "extras": evaluation.get("extras"),
            "samples_sha256": content_hash(sample_rows), "samples": len(sample_rows)})
    quantization = []
    for qid in sorted({link["quant_config_id"] for link in links if link.get("quant_config_id")}):
        row = store.quant_config(qid) or {}
        quantization.append({"id": qid, "format": row.get("format"), "recipe": row.get("recipe"),
                             "summary": row.get("summary"), "stats_sha256": content_hash(row.get("stats"))})
    decisions = [{k: d.get(k) for k in ("member", "format", "role", "task", "verdict", "reason", "numbers", "policy_hash")}
                 for d in store.decisions(run_id)]
    outcomes = [{k: o.get(k) for k in ("member", "format", "outcome", "shipped_format", "reasons", "policy_hash")}
                for o in store.outcomes(run_id)]
    return {
        "format": PAYLOAD_FORMAT,
        "run": {k: run.get(k) for k in RUN_SIGNED_FIELDS},
        "results": results,
        "quantization": quantization,
        "decisions": decisions,
        "outcomes": outcomes,
        "policy": {"hash": run.get("policy_hash"), "text": run.get("policy_text")},
        "report_sha256": report_sha256,
    }


def payload_text(payload: dict) -> str:
    """The payload as the report embeds it (canonical JSON)."""
    return canonical_json(payload)


def digest_of(payload: dict) -> str:
    """The digest a sign-off records: sha256 of the payload's canonical JSON."""
    return content_hash(payload)


def payload_if_signed(store, run_id: int, report_sha256: str, digest: str) -> str | None:
    """The run's payload text as it stands now, when it still hashes to ``digest`` (the latest sign-off's);
    None when the data changed since (a report re-rendered then carries the old digest only)."""
    payload = build_payload(store, run_id, report_sha256)
    return payload_text(payload) if digest_of(payload) == digest else None
