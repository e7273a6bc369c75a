"""What `qgate run` prints and writes about a GateResult: console text, markdown, JUnit XML; and the
markdown helpers every command shares (table cells, the GitHub step summary).

The renderers are pure functions of the result's dict (GateResult.to_dict()), so they can be tested on a
hand-made one.
"""

from __future__ import annotations

import os
from xml.sax.saxutils import escape, quoteattr

OUTCOME_WORDS = {"ships": "SHIPS", "fallback": "SHIPS WITH FALLBACK", "blocked": "BLOCKED"}


def _member_line(m: dict) -> str:
    if m["outcome"] == "ships":
        return f"{m['member']} {m['format']}: ships"
    if m["outcome"] == "fallback":
        return f"{m['member']} {m['format']}: blocked; ship {m['shipped_format']} instead"
    return f"{m['member']} {m['format']}: blocked (no fallback passed)"


def console_text(result: dict) -> str:
    lines = [f"qgate run {result['run_id']}: {result['family']} {', '.join(result['formats'])} on suite "
             f"{result['suite']}: {OUTCOME_WORDS[result['outcome']]} (exit {result['exit_code']})"]
    for m in result["members"]:
        lines.append(f"  {_member_line(m)}")
    for t in result["tasks"]:
        tag = "" if t["blocking"] else " [advisory]"
        lines.append(f"    {t['member']} {t['format']} ({t['role']}) {t['reason']} -> {t['effect']}{tag}")
    lines.append(f"  evaluations: {result['evaluations_run']} run, {result['evaluations_cached']} from the store; "
                 f"models loaded: {result['models_loaded']}; {result['seconds']:.1f} s; db {result['db']}")
    if result.get("report"):
        lines.append(f"  report: {result['report']}")
    return "\n".join(lines)


def markdown_cell(text) -> str:
    """Text fit for one cell of a markdown table (or one list item): "|" escaped, newlines as spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def append_step_summary(markdown: str) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when it is set (GitHub Actions); True when written."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(markdown)
    return True


def markdown(result: dict) -> str:
    """A GitHub step summary."""
    out = [f"### qgate: {result['family']} {', '.join(result['formats'])}: {OUTCOME_WORDS[result['outcome']]}", "",
           f"Run {result['run_id']}, suite `{result['suite']}`, policy `{result['policy']}` "
           f"(`{result['policy_hash'][:12]}`), exit code {result['exit_code']}.", "",
           "| member | format | outcome | shipped |", "|---|---|---|---|"]
    for m in result["members"]:
        out.append(f"| {markdown_cell(m['member'])} | {m['format']} | {m['outcome']} | "
                   f"{m['shipped_format'] or '-'} |")
    out += ["", "| member | format | role | task | verdict | effect | reason |", "|---|---|---|---|---|---|---|"]
    for t in result["tasks"]:
        effect = t["effect"] + ("" if t["blocking"] else " (advisory)")
        out.append(f"| {markdown_cell(t['member'])} | {t['format']} | {t['role']} | {markdown_cell(t['task'])} | "
                   f"{t['verdict']} | {effect} | {markdown_cell(t['reason'])} |")
    out += ["", f"{result['evaluations_run']} evaluations run, {result['evaluations_cached']} reused from the store."]
    if result.get("report"):
        out.append(f"Report: `{result['report']}`")
    return "\n".join(out) + "\n"


JUNIT_PROPERTIES = ("requested", "role", "verdict", "effect", "metric", "unit", "baseline", "candidate", "delta",
                    "ci_low", "ci_high", "threshold", "confidence", "n", "p_value", "samples_needed")


def junit_xml(result: dict) -> str:
    """One test case per member x format x task (fallbacks included) that agrees with the exit code:
    a blocking failure is a <failure> only where its member x format ends blocked (exit 1); where the
    fallback chain ships another format (exit 3, a pass in the README's CI recipe) it is <skipped> with
    the format that ships; an inconclusive decision is <skipped> with its reason; an advisory failure
    passes with the reason in system-out. Each case has its evaluation's time and the decision's numbers
    as properties."""
    outcomes = {(m["member"], m["format"]): m for m in result["members"]}
    cases, failures, skipped = [], 0, 0
    for t in result["tasks"]:
        name = f"{t['member']} {t['format']} {t['task']}"
        outcome = outcomes.get((t["member"], t.get("requested", t["format"])), {})
        body = ""
        if t["effect"] == "fail" and outcome.get("outcome") == "blocked":
            failures += 1
            body = (f"<failure message={quoteattr(t['reason'])} type={quoteattr(t['verdict'])}>"
                    f"{escape(t['reason'])}</failure>")
        elif t["effect"] == "fail":
            skipped += 1
            message = f"{t['format']} does not ship: {outcome.get('shipped_format')} ships instead; {t['reason']}"
            body = f"<skipped message={quoteattr(message)}/>"
        elif t["verdict"] == "inconclusive":
            skipped += 1
            body = f"<skipped message={quoteattr(t['reason'] + ' (gate: ' + t['effect'] + ')')}/>"
        props = "".join(f"<property name={quoteattr(k)} value={quoteattr(str(t[k]))}/>"
                        for k in JUNIT_PROPERTIES if t.get(k) is not None)
        seconds = t.get("seconds") or 0.0
        cases.append(f'    <testcase classname={quoteattr("qgate." + result["family"] + "." + t["role"])} '
                     f'name={quoteattr(name)} time="{seconds:.3f}"><properties>{props}</properties>{body}'
                     f'<system-out>{escape(t["reason"])}</system-out></testcase>')
    suite_name = f"qgate {result['family']} {' '.join(result['formats'])}"
    counts = f'tests="{len(cases)}" failures="{failures}" skipped="{skipped}"'
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<testsuites name="qgate" {counts}>\n'
            f'  <testsuite name={quoteattr(suite_name)} {counts} errors="0" '
            f'time="{result["seconds"]:.3f}">\n' + "\n".join(cases) + "\n  </testsuite>\n</testsuites>\n")
