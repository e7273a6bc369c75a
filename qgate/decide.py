"""The decision engine: one task decided from paired samples, its effect on the gate, and the walk
down the fallback chain (candidate -> fallback formats -> outcome).

There is one copy of each rule. The gate and a policy review both call ``walk_chain``; they differ
only in the evidence they pass: the gate reads what its units stored, a review looks samples up in the store.

Decision rule (``delta`` = candidate - baseline, oriented so that a drop is bad; ``allowed`` is
the allowed drop from ``max_drop`` or ``min_recovery``; the CI is two-sided at ``confidence``):
  pass          the whole CI lies within the allowed drop (non-inferiority shown);
  fail          the point estimate is beyond the allowed drop AND the drop is significant: the CI
                excludes zero and the reported p-value (exact McNemar for pass/fail metrics, the
                bootstrap's for continuous ones) is below 1 - confidence, so a fail never stands
                beside a non-significant p;
  inconclusive  otherwise: the samples cannot tell. ``samples_needed`` estimates how many would.
The rule itself is ``qgate.stats.verdict`` (array-friendly, so that tests can decide every table).
What an inconclusive task does to the gate is the policy's ``inconclusive``: pass, fail or warn
(passes, flagged). A task with ``blocking: false`` is advisory: reported, never failing the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from qgate import stats
from qgate.metrics import CORPUS_WEIGHTS
from qgate.policy import Policy, TaskPolicy


# ---- one task from paired samples ------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """One task's verdict. delta, ci_low, ci_high, threshold are in the task's units: percentage
    points for pass/fail metrics, metric units otherwise; delta = candidate - baseline."""

    task: str
    metric: str
    verdict: str  # pass | fail | inconclusive
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n: int
    threshold: float | None  # the signed delta at which the task fails (e.g. -1.0, or +0.5 for perplexity)
    reason: str
    samples_needed: int | None
    baseline: float | None = None
    candidate: float | None = None
    confidence: float = 0.95
    higher_is_better: bool = True
    binary: bool = True
    unit: str = "pts"
    method: str = ""
    discordant: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def gate_effect(decision: Decision, task_policy: TaskPolicy) -> str:
    """What a decision does to the gate: "pass", "warn" (passes, flagged) or "fail".

    Advisory tasks (blocking: false) never give "fail": a failing advisory task is a "warn".
    """
    if decision.verdict == "pass":
        effect = "pass"
    elif decision.verdict == "fail":
        effect = "fail"
    else:
        effect = task_policy.inconclusive
    if effect == "fail" and not task_policy.blocking:
        return "warn"
    return effect


def _score_value(scores: Mapping[str, Any], metric: str) -> Any:
    weight = CORPUS_WEIGHTS.get(metric)
    if weight and "loglikelihood" in scores and scores.get(weight):
        return (scores["loglikelihood"], scores[weight])  # checked by is_finite_value before use
    if metric not in scores:
        raise KeyError(metric)
    return scores[metric]


def _aggregate_for(metric: str, pair: bool):
    name = metric.lower()
    if pair:
        if "bits_per_byte" in name or name == "bpb":
            return stats.bits_per_byte_aggregate
        if "perplexity" in name or name == "ppl":
            return stats.perplexity_aggregate
        return lambda v, w: (v * w).sum(axis=-1) / w.sum(axis=-1)  # weighted mean
    if name == "perplexity":
        return stats.mean_exp_aggregate  # per-sample loglikelihoods, as lm-eval aggregates them
    return stats.mean_aggregate


def is_finite_value(value: Any) -> bool:
    """A per-sample value the statistics can use: a finite number or bool, or a pair of them.
    NaN, inf, null (how the store keeps NaN) and anything else are not."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(is_finite_value(v) for v in value)
    if isinstance(value, bool):
        return True
    try:
        return isinstance(value, (int, float)) and math.isfinite(value)
    except (TypeError, OverflowError):
        return False


def _non_finite_decision(task: str, metric: str, bad_base: int, bad_cand: int, n: int, conf: float,
                         higher_is_better: bool, detail: str | None = None) -> Decision:
    """The task fails: NaN/inf/null scores cannot be compared, and a model that produces them must not ship."""
    sides = [f"{k} of {n} {side} samples" for k, side in ((bad_cand, "candidate"), (bad_base, "baseline")) if k]
    where = detail or " and ".join(sides)
    reason = f"{task}: non-finite {metric} (NaN, inf or null) in {where}: fail"
    return Decision(task=task, metric=metric, verdict="fail", delta=None, ci_low=None, ci_high=None, p_value=None,
                    n=n, threshold=None, reason=reason, samples_needed=None, confidence=conf,
                    higher_is_better=higher_is_better, binary=False, unit="", method="non-finite values")


def is_binary(values: Sequence[Any]) -> bool:
    """Every value is a pass/fail outcome (0/1 or a bool)."""
    return bool(values) and all(isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1))
                                for v in values)


@dataclass
class Pairing:
    """Baseline and candidate samples matched by doc_id (and doc_hash where both have one)."""

    pairs: list[tuple[Mapping, Mapping]]
    mismatched: int  # same doc_id, different doc_hash: left out
    missing: int  # baseline samples without a candidate: left out


def pair_samples(baseline: Sequence[Mapping], candidate: Sequence[Mapping]) -> Pairing:
    """The one way samples are paired: by doc_id, and only where the documents are the same."""
    cand_by_id = {str(s["doc_id"]): s for s in candidate}
    pairs, mismatched, missing = [], 0, 0
    for s in baseline:
        c = cand_by_id.get(str(s["doc_id"]))
        if c is None:
            missing += 1
        elif s.get("doc_hash") and c.get("doc_hash") and s["doc_hash"] != c["doc_hash"]:
            mismatched += 1
        else:
            pairs.append((s, c))
    return Pairing(pairs, mismatched, missing)


def _paired_values(baseline: Sequence[Mapping], candidate: Sequence[Mapping], metric: str):
    """Paired ``metric`` values; returns (pairs, note on what was left out)."""
    pairing = pair_samples(baseline, candidate)
    pairs, missing = [], pairing.missing
    for s, c in pairing.pairs:
        try:
            pairs.append((_score_value(s.get("scores") or {}, metric), _score_value(c.get("scores") or {}, metric)))
        except KeyError:
            missing += 1
    note = []
    if pairing.mismatched:
        note.append(f"{pairing.mismatched} samples differ between baseline and candidate (doc_hash) and were left out")
    if missing:
        note.append(f"{missing} samples without a pair (or without {metric}) were left out")
    return pairs, "; ".join(note)


def _fmt(x: float, unit: str, signed: bool = True) -> str:
    digits = 1 if unit == "pts" else (3 if abs(x) < 10 else 2)
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return text


def decide_task(baseline_samples: Sequence[Mapping], candidate_samples: Sequence[Mapping],
                task_policy: TaskPolicy, higher_is_better: bool = True, binary: bool | None = None, *,
                metric: str | None = None) -> Decision:
    """Decide one task from paired per-sample scores (pure: no I/O, no model).

    Samples are dicts with doc_id, optional doc_hash, and scores {metric: value}; a value is a
    number, a bool, or a [loglikelihood, weight] pair for corpus metrics such as perplexity.
    ``binary`` None: detected from the values. ``metric`` overrides the policy's metric.
    """
    metric = metric or task_policy.metric
    if not metric:
        raise ValueError(f"{task_policy.task}: no metric given and the policy names none")
    task = task_policy.task
    pairs, note = _paired_values(baseline_samples, candidate_samples, metric)
    conf = task_policy.confidence
    if not pairs:
        reason = f"{task}: no paired samples for {metric}" + (f" ({note})" if note else "") + ": inconclusive"
        return Decision(task=task, metric=metric, verdict="inconclusive", delta=None, ci_low=None, ci_high=None,
                        p_value=None, n=0, threshold=None, reason=reason, samples_needed=None, confidence=conf,
                        higher_is_better=higher_is_better, binary=bool(binary), unit="")

    base_vals = [p[0] for p in pairs]
    cand_vals = [p[1] for p in pairs]
    bad_base = sum(not is_finite_value(v) for v in base_vals)
    bad_cand = sum(not is_finite_value(v) for v in cand_vals)
    if bad_base or bad_cand:
        return _non_finite_decision(task, metric, bad_base, bad_cand, len(pairs), conf, higher_is_better)
    pair_valued = isinstance(base_vals[0], (list, tuple))
    if binary is None:
        binary = not pair_valued and is_binary(base_vals + cand_vals)

    if binary:
        cmp = stats.compare_binary([float(v) for v in base_vals], [float(v) for v in cand_vals], conf)
        scale, unit, method = 100.0, "pts", "exact McNemar; Newcombe hybrid score CI"
    else:
        if pair_valued:
            kwargs = dict(baseline_weights=[float(v[1]) for v in base_vals],
                          candidate_weights=[float(v[1]) for v in cand_vals],
                          aggregate=_aggregate_for(metric, True))
            b, c = [float(v[0]) for v in base_vals], [float(v[0]) for v in cand_vals]
        else:
            kwargs = dict(aggregate=_aggregate_for(metric, False))
            b, c = [float(v) for v in base_vals], [float(v) for v in cand_vals]
        cmp = stats.compare_bootstrap(b, c, conf, **kwargs)
        scale, unit, method = 1.0, "", f"paired bootstrap over documents ({stats.BOOTSTRAP_RESAMPLES} resamples)"

    if not all(math.isfinite(x) for x in (cmp.baseline, cmp.candidate, cmp.delta, cmp.ci_low, cmp.ci_high)):
        # finite samples whose aggregate overflows (a perplexity of exp(1000)): as undecidable as NaN samples
        return _non_finite_decision(task, metric, 0, 0, len(pairs), conf, higher_is_better,
                                    detail=f"aggregate ({cmp.baseline:g} -> {cmp.candidate:g})")
    delta, low, high = cmp.delta * scale, cmp.ci_low * scale, cmp.ci_high * scale
    base_value = cmp.baseline * scale
    sign = 1.0 if higher_is_better else -1.0
    # allowed drop in the task's units
    if task_policy.min_recovery is not None:
        r = task_policy.min_recovery
        allowed = (1 - r) * abs(base_value) if higher_is_better else abs(base_value) * (1 / r - 1)
        allowed_text = f"recovery >= {r:g} (allowed {_fmt(-sign * allowed, unit)})"
    else:
        allowed = float(task_policy.max_drop if task_policy.max_drop is not None else 0.0)
        allowed_text = f"allowed {_fmt(-sign * allowed, unit)}"
    threshold = -sign * allowed

    # orient so that "good" is positive: o_delta >= -allowed passes
    o_delta, o_low, o_high = (delta, low, high) if higher_is_better else (-delta, -high, -low)
    verdict = stats.verdict(o_delta, o_low, o_high, cmp.p_value, -allowed, conf)

    table = cmp.table
    if table is not None and not higher_is_better:  # oriented: (both, worse, better, neither)
        table = (table[0], table[2], table[1], table[3])
    needed = stats.samples_to_decide(o_delta / scale, -allowed / scale, cmp.sd_pair, cmp.n, conf, table=table)
    unit_text = f" {unit}" if unit else ""
    values = f" ({_fmt(base_value, unit, False)} -> {_fmt(cmp.candidate * scale, unit, False)})" if not binary else ""
    reason = (f"{task}: {_fmt(delta, unit)}{unit_text}{values}, {conf * 100:g}% CI "
              f"[{_fmt(low, unit)}, {_fmt(high, unit)}], {allowed_text}, n={cmp.n}: {verdict}")
    if verdict == "inconclusive" and needed is not None:
        reason += f" (about {needed} samples would decide)"
    elif verdict == "inconclusive" and stats.on_threshold(o_delta, -allowed):
        reason += " (the estimate sits exactly on the allowed drop: more samples decide only if it moves)"
    if note:
        reason += f"; {note}"
    return Decision(task=task, metric=metric, verdict=verdict, delta=delta, ci_low=low, ci_high=high,
                    p_value=cmp.p_value, n=cmp.n, threshold=threshold, reason=reason, samples_needed=needed,
                    baseline=base_value, candidate=cmp.candidate * scale, confidence=conf,
                    higher_is_better=higher_is_better, binary=bool(binary), unit=unit, method=method,
                    discordant=cmp.discordant)


# ---- one task of one member x format ------------------------------------------------------------

@dataclass(frozen=True)
class Evidence:
    """What one task's decision rests on: both sides' samples and how the evaluated task scores."""

    baseline: Sequence[Mapping]
    candidate: Sequence[Mapping]
    task_spec: Mapping[str, Any]  # the evaluated suite entry: metric (primary), higher_is_better, per_sample
    stored_higher_is_better: Mapping[str, bool] = field(default_factory=dict)  # per metric, as evaluated


def task_metric(task_policy: TaskPolicy, task_spec: Mapping[str, Any],
                stored_higher_is_better: Mapping[str, bool]) -> tuple[str | None, bool, bool | None]:
    """(metric, higher_is_better, binary) a task is decided on: the policy's metric, else the task's
    primary one; direction and kind from the task definition for its primary metric, else from what
    the evaluation stored (binary then detected from the values)."""
    primary = task_spec.get("metric")
    metric = task_policy.metric or primary
    if metric == primary and task_spec.get("higher_is_better") is not None:
        return metric, bool(task_spec["higher_is_better"]), task_spec.get("per_sample") == "binary"
    return metric, bool(stored_higher_is_better.get(metric, True)), None


@dataclass
class TaskVerdict:
    """One member x format x task decided, and what that does to the gate."""

    member: str
    format: str
    role: str  # candidate | fallback
    task: str
    decision: Decision
    effect: str  # pass | warn | fail
    blocking: bool

    def numbers(self) -> dict:
        """The decision row's numbers, as stored."""
        return {**self.decision.to_dict(), "effect": self.effect, "blocking": self.blocking}

    def to_dict(self) -> dict:
        d = self.decision.to_dict()
        d.update(member=self.member, format=self.format, role=self.role, task=self.task, effect=self.effect,
                 blocking=self.blocking)
        return d

    def row(self) -> dict:
        """The row the store records for this decision."""
        return dict(member=self.member, format=self.format, role=self.role, task=self.task,
                    verdict=self.decision.verdict, reason=self.decision.reason, numbers=self.numbers())


def decide(policy: Policy, member: str, fmt: str, role: str, task: str, evidence: Evidence) -> TaskVerdict | str:
    """Decide one task under ``policy``; a sentence instead when the evidence cannot be decided on."""
    tp = policy.task_policy(task)
    metric, higher, binary = task_metric(tp, evidence.task_spec, evidence.stored_higher_is_better)
    if not metric:
        return "the stored evaluation names no primary metric and the policy names none"
    decision = decide_task(evidence.baseline, evidence.candidate, tp, higher, binary, metric=metric)
    return TaskVerdict(member, fmt, role, task, decision, gate_effect(decision, tp), tp.blocking)


# ---- the fallback chain -------------------------------------------------------------------------

# (member, format, role, task) -> the evidence, or a sentence saying why there is none
EvidenceSource = Callable[[str, str, str, str], "Evidence | str"]


def fallback_chain(policy: Policy, fmt: str) -> list[tuple[str, str]]:
    """(format, role) in the order they are tried for a requested candidate format."""
    return [(fmt, "candidate")] + [(c.format, "fallback") for c in policy.fallback if c.format != fmt]


@dataclass
class MissingEvidence:
    format: str
    task: str
    why: str


@dataclass
class ChainOutcome:
    """What the gate decides for one member x requested format."""

    member: str
    format: str  # the requested candidate format
    outcome: str  # ships | fallback | blocked | undecided (evidence missing)
    shipped_format: str | None
    reasons: list[str]
    verdicts: list[TaskVerdict]  # every task decided on the way, in order
    missing: list[MissingEvidence]  # why the walk stopped undecided
    untried: list[tuple[str, str]]  # (format, role) of the chain after the step where the walk stopped

    def to_dict(self) -> dict:
        return {"member": self.member, "format": self.format, "outcome": self.outcome,
                "shipped_format": self.shipped_format, "reasons": list(self.reasons)}


def walk_chain(policy: Policy, member: str, fmt: str, tasks: Sequence[str], evidence: EvidenceSource,
               on_decided: Callable[[list[TaskVerdict]], None] | None = None) -> ChainOutcome:
    """The candidate ships when no task's effect is "fail"; otherwise the fallback chain is walked in
    order and the first format that passes ships instead; none passing is "blocked". A step whose
    evidence is missing stops the walk "undecided" (the gate then runs that step's units and walks again).
    ``on_decided`` sees each step's verdicts as they are made."""
    chain = fallback_chain(policy, fmt)
    reasons: list[str] = []
    verdicts: list[TaskVerdict] = []
    for step, (f, role) in enumerate(chain):
        decided, missing = [], []
        for task in tasks:
            got = evidence(member, f, role, task)
            if not isinstance(got, str):
                got = decide(policy, member, f, role, task, got)
            if isinstance(got, str):
                missing.append(MissingEvidence(f, task, got))
            else:
                decided.append(got)
        verdicts += decided
        if on_decided is not None:
            on_decided(decided)
        failing = [v.decision.reason for v in decided if v.effect == "fail"]
        if missing:
            return ChainOutcome(member, fmt, "undecided", None, reasons, verdicts, missing, chain[step + 1:])
        if not failing:
            if step:
                reasons.append(f"ship {f} instead of {fmt}")
            return ChainOutcome(member, fmt, "ships" if step == 0 else "fallback", f, reasons, verdicts, [],
                                chain[step + 1:])
        reasons += [f"{f}: {r}" for r in failing]
    return ChainOutcome(member, fmt, "blocked", None, reasons, verdicts, [], [])


def worst_outcome(outcomes: Sequence[str]) -> str:
    """The gate's overall outcome: the worst of its members x formats."""
    return max(outcomes, key=lambda o: ("ships", "fallback", "blocked").index(o))
