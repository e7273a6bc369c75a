"""A policy review as console text and as GitHub-flavoured markdown."""

from __future__ import annotations

from qgate.review.findings import PolicyReview, _signed, policy_source
from qgate.summary import markdown_cell


def _verdict_line(review: PolicyReview) -> str:
    n, k = len(review.flips), len(review.decided_changes)
    undecided = len(review.outcome_changes) - k
    tail = (f"; {undecided} gate outcome{'s' if undecided != 1 else ''} cannot be decided without the missing "
            f"evidence" if undecided else "")
    if review.exit_code == 0:
        return f"verdict: no stored decision would flip{tail} (exit 0)"
    parts = []
    if n:
        parts.append(f"{n} decision{'s' if n != 1 else ''} would flip")
    if k:
        parts.append(f"{k} gate outcome{'s' if k != 1 else ''} would change")
    return f"verdict: {', '.join(parts)}{tail} (exit 1)"


def review_text(review: PolicyReview) -> str:
    """The console report: changes, flips, outcome changes, missing evidence, one verdict line."""
    lines = [f"policy diff for family {review.new.family}",
             f"  OLD {policy_source(review.old)}", f"  NEW {policy_source(review.new)}", ""]
    if review.changes:
        lines.append(f"changed settings ({len(review.changes)}):")
        lines += [f"  {c.text}" for c in review.changes]
    else:
        lines.append("changed settings: none (the policies decide alike)")
    lines.append("")
    if review.database is None:
        lines.append("stored decisions: no results database; nothing re-decided")
    else:
        lines.append(f"re-decided {review.redecided} stored decision{'s' if review.redecided != 1 else ''} "
                     f"from stored per-sample results, no model loaded ({review.database}): "
                     f"{len(review.flips)} would flip")
        lines += [f"  {f.text()}" for f in review.flips]
        if review.outcome_changes:
            lines.append(f"gate outcomes that would change ({len(review.outcome_changes)}):")
            lines += [f"  {o.text()}" for o in review.outcome_changes]
    needed = [m for m in review.missing if m.needed]
    optional = [m for m in review.missing if not m.needed]
    if needed:
        lines += ["", f"missing evidence: NEW needs evaluations the store does not hold ({len(needed)}):"]
        lines += [f"  {m.text()}" for m in needed]
    if optional:
        lines += ["", f"not stored, needed only if a format before it fails ({len(optional)}):"]
        lines += [f"  {m.text()}" for m in optional]
    if review.missing:
        lines.append(f"  (`qgate run --family {review.new.family} --policy NEW` evaluates them; "
                     f"nothing above is guessed)")
    if review.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in review.notes]
    lines += ["", _verdict_line(review)]
    return "\n".join(lines)


def review_markdown(review: PolicyReview) -> str:
    """The same review as GitHub-flavoured markdown (for $GITHUB_STEP_SUMMARY or a PR comment)."""
    out = [f"## qgate policy diff: {markdown_cell(review.new.family)}", "",
           f"- OLD `{markdown_cell(review.old.path)}` (hash `{review.old.hash[:12]}`)",
           f"- NEW `{markdown_cell(review.new.path)}` (hash `{review.new.hash[:12]}`)", "",
           f"**{markdown_cell(_verdict_line(review))}**", "", "### Changed settings", ""]
    out += [f"- {markdown_cell(c.text)}" for c in review.changes] or ["- none"]
    out += ["", "### Decisions that would flip", ""]
    if review.database is None:
        out.append("No results database: nothing re-decided.")
    else:
        out.append(f"{review.redecided} stored decisions re-decided from stored per-sample results "
                   f"(no model loaded).")
        if review.flips:
            out += ["", "| run | member | format | task | old -> new | delta | CI | allowed (old -> new) | n |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for f in review.flips:
                n = f.numbers
                num = _signed(n.get("unit"))

                verdicts = f"{f.old_verdict} -> **{f.new_verdict}**"
                if f.old_effect and f.old_effect != f.new_effect and (f.old_effect, f.new_effect) != (
                        f.old_verdict, f.new_verdict):
                    verdicts += f" (gate {f.old_effect} -> {f.new_effect})"
                out.append(f"| {f.run_id} | {markdown_cell(f.member)} | {f.format} | {markdown_cell(f.task)} | {verdicts} | "
                           f"{num(n.get('delta'))} {n.get('unit') or ''} | [{num(n.get('ci_low'))}, "
                           f"{num(n.get('ci_high'))}] | {num(f.old_threshold)} -> {num(n.get('threshold'))} | "
                           f"{n.get('n')} |")
        if review.outcome_changes:
            out += ["", "Gate outcomes that would change:", ""]
            out += [f"- {markdown_cell(o.text())}" for o in review.outcome_changes]
    if review.missing:
        out += ["", "### Missing evidence", "", "NEW needs evaluations the store does not hold (not guessed):", ""]
        out += [f"- {markdown_cell(m.text())}" for m in review.missing]
    if review.notes:
        out += ["", "### Notes", ""] + [f"- {markdown_cell(n)}" for n in review.notes]
    return "\n".join(out) + "\n"
