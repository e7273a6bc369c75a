"""Sign-off: record who approved (or rejected) exactly which results, and verify a report later.

What a sign-off covers is the "signed payload" of qgate.report.payload (the run's results, decisions,
policy and the report content without its sign-off regions) and its digest. The database keeps the
digest with the sign-off; the report embeds the digest, the sign-off id and the payload itself (so
verify can say what changed).

verify recomputes the payload from the database and the content hash from the file:
  intact  <=> the file's sign-off block is the one qgate renders for that sign-off,
              the file's content hashes to what was signed, and the database still holds it.
"""

from __future__ import annotations

import difflib
import html as html_lib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qgate.errors import QgateError
from qgate.files import write_atomic
from qgate.report.data import collect, resolve_run_id
from qgate.report.payload import build_payload, digest_of, payload_text
from qgate.report.render import (SIGNOFF_PARTS, content_sha256, default_report_path, render_html,
                                 signoff_region_markup, signoff_regions, strip_signoff)

DIFF_ORDER = ("outcomes", "decisions", "results", "quantization", "policy", "run", "format")
MAX_CHANGES_LISTED = 20
_META_RUN = re.compile(r'<meta name="qgate-run" content="([^"]*)">')
_BLOCK_ATTR = re.compile(r'\sdata-qgate-(run|digest|signoff)="([^"]*)"')
_PAYLOAD = re.compile(r'<pre id="qgate-signed-payload">(.*?)</pre>', re.S)


# ---------------------------------------------------------------- signing

def _blocked_members(model: dict) -> list[dict]:
    return [m for m in model["members"] if m["outcome"] in ("blocked", "undecided")]


def sign_off(store, run: str | int, *, reviewer: str, approve: bool, comment: str | None = None,
             override: bool = False, path: str | Path | None = None) -> tuple[dict, Path]:
    """Record a sign-off of a run and re-render its report with the sign-off block.

    Returns (the stored sign-off row, the report path). Bad input raises QgateError before anything
    is written.
    """
    run_id = resolve_run_id(store, run)
    reviewer = (reviewer or "").strip()
    comment = (comment or "").strip() or None
    if not reviewer:
        raise QgateError("--reviewer: expected a non-empty name")
    model = collect(store, run_id)
    if model["run"].get("status") == "running":
        raise QgateError(f"RUN {run_id}: still running; sign off once it has finished")
    if not model["results"] and not model["members"]:
        raise QgateError(f"RUN {run_id}: has no decisions to sign off")
    blocked = _blocked_members(model)
    if override:
        if not approve:
            raise QgateError("--override: only an approval can override a blocked verdict (drop --override to reject)")
        if not blocked:
            raise QgateError(f"--override: RUN {run_id} is not blocked; nothing to override")
        if not comment:
            raise QgateError("--override: needs a --comment saying why the blocked run may ship anyway")
    elif approve and blocked:
        names = ", ".join(f"{m['member']} ({m['requested_format']})" for m in blocked)
        raise QgateError(f"RUN {run_id}: blocked for {names}; approving it needs --override and a --comment")

    target = Path(path) if path is not None else Path(model["run"].get("report_path") or
                                                       default_report_path(model["run"]["family"], run_id))
    payload = build_payload(store, run_id, content_sha256(render_html(model)))
    digest = digest_of(payload)
    signoff_id = store.add_signoff(run_id, reviewer=reviewer, decision="approve" if approve else "reject",
                                   digest=digest, comment=comment, override=override)
    model["signoffs"] = [dict(s) for s in store.signoffs(run_id)]
    model["signed_payload"] = payload_text(payload)
    write_atomic(target, render_html(model))
    row = next(s for s in model["signoffs"] if s["id"] == signoff_id)
    return row, target


# ---------------------------------------------------------------- verifying

@dataclass
class Verification:
    run_id: int
    signoff: dict
    digest_signed: str
    digest_from_database: str
    report_sha256: str
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        s = self.signoff
        head = (f"run {self.run_id}: {s['decision']} by {s['reviewer']} at {s['created_at']}"
                f"{' (override)' if s.get('override') else ''}")
        out = [head, f"  signed digest        {self.digest_signed}",
               f"  digest from database {self.digest_from_database}", f"  report content       {self.report_sha256}"]
        if self.intact:
            out.append("intact: the report and the stored results are what was signed")
        else:
            out.append(f"CHANGED since sign-off ({len(self.problems)} problem(s)):")
            out += [f"  - {p}" for p in self.problems]
        return out


def _read_report(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise QgateError(f"REPORT {p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise QgateError(f"REPORT {p}: cannot be read as a UTF-8 HTML file ({exc})") from None


def _signed_block(html: str, path) -> tuple[dict, dict]:
    """(attributes of the sign-off block, {region name: content}); QgateError if it is not a signed report."""
    if not _META_RUN.search(html):
        raise QgateError(f"REPORT {path}: not a qgate report (no <meta name=\"qgate-run\">)")
    regions = signoff_regions(html)
    names = [name for name, _ in regions]
    if names != list(SIGNOFF_PARTS):
        raise QgateError(f"REPORT {path}: the sign-off regions are missing or repeated (found {names}, "
                         f"expected {list(SIGNOFF_PARTS)}); not a report qgate wrote")
    contents = dict(regions)
    opening = contents["block"].split(">", 1)[0]
    attrs = {k: html_lib.unescape(v) for k, v in _BLOCK_ATTR.findall(opening)}
    if "digest" not in attrs or "signoff" not in attrs:
        raise QgateError(f"REPORT {path}: not signed off (no digest in its sign-off block); "
                         f"sign it with `qgate signoff RUN --reviewer NAME --approve|--reject`")
    return attrs, contents


def _label(item: dict, index: int) -> str:
    parts = [str(item[k]) for k in ("member", "format", "role", "task") if item.get(k) is not None]
    if not parts and item.get("id") is not None:
        parts = [str(item["id"])]
    return "/".join(parts) if parts else str(index)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def diff_values(signed, current, path: str = "", limit: int = 20) -> list[str]:
    """Human-readable differences between two JSON values ("results[m/fmt/candidate/mmlu].n: 50 -> 49")."""
    out: list[str] = []

    def walk(a, b, where):
        if len(out) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if key not in b:
                    out.append(f"{where}.{key}: removed (was {_short(a[key])})")
                elif key not in a:
                    out.append(f"{where}.{key}: added ({_short(b[key])})")
                else:
                    walk(a[key], b[key], f"{where}.{key}" if where else str(key))
        elif isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) for x in a + b):
            la = {_label(x, i): x for i, x in enumerate(a)}
            lb = {_label(x, i): x for i, x in enumerate(b)}
            if len(la) != len(a) or len(lb) != len(b):  # labels not unique: compare by position
                la, lb = dict(enumerate(a)), dict(enumerate(b))
            for key in list(dict.fromkeys([*la, *lb])):
                if key not in lb:
                    out.append(f"{where}[{key}]: removed")
                elif key not in la:
                    out.append(f"{where}[{key}]: added")
                else:
                    walk(la[key], lb[key], f"{where}[{key}]")
        else:
            out.append(f"{where}: {_short(a)} -> {_short(b)}")

    walk(signed, current, path)
    return out


def _content_diff(file_html: str, expected_html: str, limit: int = 6) -> list[str]:
    lines = difflib.unified_diff(strip_signoff(expected_html).splitlines(), strip_signoff(file_html).splitlines(),
                                 "as rendered from the database", "report file", n=0, lineterm="")
    changed = [l for l in lines if l[:1] in "+-" and not l.startswith(("+++", "---"))]
    return [(l[:160] + "...") if len(l) > 160 else l for l in changed[:limit]]


def verify_report(store, path: str | Path) -> Verification:
    """Check a signed report file against the database. Raises QgateError on bad input (not a
    signed qgate report, unknown run or sign-off); otherwise returns a Verification listing problems."""
    html = _read_report(path)
    attrs, regions = _signed_block(html, path)
    meta_run = _META_RUN.search(html).group(1)
    if attrs.get("run") != meta_run:
        raise QgateError(f"REPORT {path}: its sign-off block names run {attrs.get('run')!r} but the report is "
                         f"run {meta_run!r}")
    try:
        run_id, signoff_id = int(meta_run), int(attrs["signoff"])
    except ValueError:
        raise QgateError(f"REPORT {path}: run {meta_run!r} / sign-off {attrs['signoff']!r} are not numbers") from None
    if store.run(run_id) is None:
        raise QgateError(f"REPORT {path}: run {run_id} is not in the database {store.url}")
    signoffs = [dict(s) for s in store.signoffs(run_id)]
    record = next((s for s in signoffs if s["id"] == signoff_id), None)
    if record is None:
        raise QgateError(f"REPORT {path}: sign-off #{signoff_id} of run {run_id} is not in the database {store.url}")

    problems: list[str] = []
    if attrs["digest"] != record["digest"]:
        problems.append(f"the digest in the report ({attrs['digest']}) is not the one recorded for sign-off "
                        f"#{signoff_id} ({record['digest']})")

    # The payload the report says was signed: trusted only if it hashes to the recorded digest.
    embedded = _PAYLOAD.search(regions["block"])
    signed = None
    if embedded:
        try:
            candidate = json.loads(html_lib.unescape(embedded.group(1)))
            if digest_of(candidate) == record["digest"]:
                signed = candidate
        except ValueError:
            pass
    if signed is None:
        problems.append("the signed data embedded in the report is missing or does not match the recorded digest")

    file_sha = content_sha256(html)
    current = build_payload(store, run_id, file_sha)
    from_db = digest_of(current)
    if from_db != record["digest"]:
        if signed is not None:
            if file_sha != signed["report_sha256"]:
                model = collect(store, run_id)
                detail = _content_diff(html, render_html(model))
                problems.append("the report content was edited after sign-off (sha256 "
                                f"{file_sha}, signed {signed['report_sha256']})"
                                + ("; changed lines:\n      " + "\n      ".join(detail) if detail else ""))
            changes = []
            for key in DIFF_ORDER:  # what a reviewer cares about first
                changes += diff_values(signed.get(key), current.get(key), key, limit=MAX_CHANGES_LISTED + 1)
            for line in changes[:MAX_CHANGES_LISTED]:
                problems.append(f"stored data changed: {line}")
            if len(changes) > MAX_CHANGES_LISTED:
                problems.append("stored data changed: ... and more")
        else:
            problems.append("the report content or the stored results changed since sign-off "
                            "(digest recomputed from the database and the file differs)")

    # The sign-off block itself must be exactly what qgate renders for that sign-off.
    model = {"run": {"id": run_id}, "signoffs": [s for s in signoffs if s["id"] <= signoff_id],
             "signed_payload": payload_text(signed) if signed is not None else None}
    expected = {name: str(region) for name, region in signoff_region_markup(model).items()}
    for name, content in regions.items():
        wanted = expected[name]
        inner = wanted[len(f"<!--qgate:signoff:{name}-->"):-len(f"<!--/qgate:signoff:{name}-->")]
        if content != inner:
            problems.append(f"the sign-off {name} region was edited (it is not what qgate records for sign-off "
                            f"#{signoff_id})")
    return Verification(run_id=run_id, signoff=record, digest_signed=record["digest"], digest_from_database=from_db,
                        report_sha256=file_sha, problems=problems)
