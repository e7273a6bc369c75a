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


def junit_xml(result: dict) -> str:
    """One test case per member x format x task (fallbacks included); a blocking failure is a <failure>,
    an advisory failure or an inconclusive "warn" is reported as passed with the reason in system-out."""
    cases = []
    failures = 0
    for t in result["tasks"]:
        name = f"{t['member']} {t['format']} {t['task']}"
        body = f"<system-out>{escape(t['reason'])}</system-out>"
        if t["effect"] == "fail":
            failures += 1
            body = (f"<failure message={quoteattr(t['reason'])} type={quoteattr(t['verdict'])}>"
                    f"{escape(t['reason'])}</failure>") + body
        cases.append(f'    <testcase classname={quoteattr("qgate." + result["family"] + "." + t["role"])} '
                     f'name={quoteattr(name)} time="0">{body}</testcase>')
    suite_name = f"qgate {result['family']} {' '.join(result['formats'])}"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<testsuites name="qgate" tests="{len(cases)}" failures="{failures}">\n'
            f'  <testsuite name={quoteattr(suite_name)} tests="{len(cases)}" failures="{failures}" errors="0" '
            f'time="{result["seconds"]:.3f}">\n' + "\n".join(cases) + "\n  </testsuite>\n</testsuites>\n")
