"""What a policy review found: flipped decisions, changed gate outcomes, missing evidence."""

from __future__ import annotations

from dataclasses import dataclass, field

from qgate.policy import Policy
from qgate.review.changes import Change


@dataclass
class Flip:
    """A stored task decision that the new policy decides differently (verdict or gate effect)."""

    run_id: int
    member: str
    format: str
    role: str
    task: str
    old_verdict: str
    new_verdict: str
    old_effect: str | None
    new_effect: str
    old_reason: str
    new_reason: str
    old_threshold: float | None
    numbers: dict  # the new decision's numbers

    def text(self) -> str:
        n = self.numbers
        unit = f" {n['unit']}" if n.get("unit") else ""
        head = f"{self.member} {self.format} {self.task}: {self.old_verdict} -> {self.new_verdict}"
        if self.old_effect and self.old_effect != self.new_effect and (self.old_effect, self.new_effect) != (
                self.old_verdict, self.new_verdict):
            head += f" (gate: {self.old_effect} -> {self.new_effect})"
        if n.get("delta") is None:
            return f"{head}; {self.new_reason}"
        num = _signed(n.get("unit"))
        values = ""
        if not n.get("binary") and n.get("baseline") is not None:
            values = f" ({n['metric']} {n['baseline']:.2f} -> {n['candidate']:.2f})"
        return (f"{head}: {num(n['delta'])}{unit}{values}, {n['confidence'] * 100:g}% CI "
                f"[{num(n['ci_low'])}, {num(n['ci_high'])}], allowed {num(self.old_threshold)} -> "
                f"{num(n.get('threshold'))}, n={n['n']} (run {self.run_id})")

    def to_dict(self) -> dict:
        return {"run": self.run_id, "member": self.member, "format": self.format, "role": self.role,
                "task": self.task, "old_verdict": self.old_verdict, "new_verdict": self.new_verdict,
                "old_effect": self.old_effect, "new_effect": self.new_effect, "old_reason": self.old_reason,
                "new_reason": self.new_reason, "old_threshold": self.old_threshold, "numbers": self.numbers,
                "text": self.text()}


@dataclass
class Missing:
    """Evidence the new policy needs that the store does not hold."""

    member: str
    format: str
    task: str | None  # None: every task
    why: str
    needed: bool = True  # False: only needed if an earlier step of the fallback chain fails
    runs: list[int] = field(default_factory=list)

    def text(self) -> str:
        what = f"{self.member} {self.format} {self.task or '(all tasks)'}"
        runs = f" (run {', '.join(map(str, self.runs))})" if self.runs else ""
        return f"{what}: {self.why}{runs}"

    def to_dict(self) -> dict:
        return {"member": self.member, "format": self.format, "task": self.task, "why": self.why,
                "needed": self.needed, "runs": self.runs, "text": self.text()}


@dataclass
class OutcomeChange:
    run_id: int
    member: str
    format: str  # the requested candidate format
    old: str | None
    old_shipped: str | None
    new: str
    new_shipped: str | None
    reasons: list[str]

    def text(self) -> str:
        return (f"{self.member} {self.format}: {_outcome_text(self.old, self.old_shipped)} -> "
                f"{_outcome_text(self.new, self.new_shipped)} (run {self.run_id})")

    def to_dict(self) -> dict:
        return {"run": self.run_id, "member": self.member, "format": self.format, "old": self.old,
                "old_shipped": self.old_shipped, "new": self.new, "new_shipped": self.new_shipped,
                "reasons": self.reasons, "text": self.text()}


def _signed(unit: str | None):
    """A formatter for deltas and thresholds: one decimal for points, two for metric units."""
    digits = 1 if unit == "pts" else 2

    def signed(x: float | None) -> str:
        if x is None:
            return "-"
        if x and abs(x) < 10 ** -digits:  # a tiny threshold must not read as zero
            return f"{x:+.2g}"
        return f"{x:+.{digits}f}"

    return signed


def _outcome_text(outcome: str | None, shipped: str | None) -> str:
    if outcome == "fallback":
        return f"ships {shipped} instead"
    if outcome == "ships":
        return f"ships {shipped}" if shipped else "ships"
    if outcome == "undecided":
        return "undecided (evidence missing)"
    return outcome or "not decided"


@dataclass
class PolicyReview:
    old: Policy
    new: Policy
    changes: list[Change]
    database: str | None
    redecided: int = 0  # stored decisions decided again
    flips: list[Flip] = field(default_factory=list)
    outcome_changes: list[OutcomeChange] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def decided_changes(self) -> list[OutcomeChange]:
        """Outcome changes that are decided (not merely undecidable for missing evidence)."""
        return [o for o in self.outcome_changes if o.new != "undecided"]

    @property
    def exit_code(self) -> int:
        """0: no stored decision would flip; 1: some would (missing evidence alone is not a flip)."""
        return 1 if self.flips or self.decided_changes else 0

    def to_dict(self) -> dict:
        return {"old": {"source": self.old.path, "family": self.old.family, "hash": self.old.hash},
                "new": {"source": self.new.path, "family": self.new.family, "hash": self.new.hash},
                "changes": [c.to_dict() for c in self.changes], "database": self.database,
                "redecided": self.redecided, "flips": [f.to_dict() for f in self.flips],
                "outcome_changes": [o.to_dict() for o in self.outcome_changes],
                "missing": [m.to_dict() for m in self.missing], "notes": self.notes,
                "exit_code": self.exit_code}


@dataclass
class RunRedecision:
    run_id: int
    policy: Policy
    batch: str | None
    decisions: list[dict]  # rows as recorded
    outcomes: list[dict]
    previous: dict[tuple, dict]  # the run's latest decisions before, by (member, format, task)
    previous_outcomes: dict[tuple, dict]
    missing: list[Missing]

    def changed(self) -> list[str]:
        lines = []
        for d in self.decisions:
            before = self.previous.get((d["member"], d["format"], d["task"]))
            if before is not None and before["verdict"] != d["verdict"]:
                lines.append(f"{d['member']} {d['format']} {d['task']}: {before['verdict']} -> {d['verdict']}")
        for o in self.outcomes:
            before = self.previous_outcomes.get((o["member"], o["format"]))
            if before is not None and (before["outcome"], before.get("shipped_format")) != (
                    o["outcome"], o.get("shipped_format")):
                lines.append(f"{o['member']} {o['format']}: {_outcome_text(before['outcome'], before.get('shipped_format'))}"
                             f" -> {_outcome_text(o['outcome'], o.get('shipped_format'))}")
        return lines

    def text(self) -> str:
        lines = [f"run {self.run_id} re-decided under {policy_source(self.policy)}: decision set {self.batch} recorded "
                 f"({len(self.decisions)} task decisions); earlier sets kept"]
        for o in self.outcomes:
            lines.append(f"  {o['member']} {o['format']}: {_outcome_text(o['outcome'], o.get('shipped_format'))}")
        for d in self.decisions:
            lines.append(f"    {d['reason']}" + ("" if d["role"] == "candidate" else f"  [{d['format']}]"))
        changed = self.changed()
        lines.append(f"changed against the previous decision set ({len(changed)}):" if changed
                     else "no verdict changed against the previous decision set")
        lines += [f"  {c}" for c in changed]
        if self.missing:
            lines.append("missing evidence (not guessed):")
            lines += [f"  {m.text()}" for m in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"run": self.run_id, "policy": {"source": self.policy.path, "hash": self.policy.hash},
                "batch": self.batch, "decisions": self.decisions, "outcomes": self.outcomes,
                "changed": self.changed(), "missing": [m.to_dict() for m in self.missing]}


def policy_source(policy: Policy) -> str:
    return f"{policy.path} (hash {policy.hash[:12]})"
