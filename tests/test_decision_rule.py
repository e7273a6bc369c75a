"""The decision rule checked over every paired table, not a few examples: a fail never stands beside a
non-significant p, a pass never beside a CI that leaves the allowed drop. And the "about N samples
would decide" estimate checked against an exact search with the same rule."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from qgate import stats
from qgate.decide import decide_task
from qgate.policy import TaskPolicy

N_MAX = 300
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def mcnemar_table(m_max: int) -> np.ndarray:
    """p[b, c]: two-sided exact McNemar p for b + c <= m_max, from cumulative binomial sums in integers."""
    p = np.ones((m_max + 1, m_max + 1))
    for m in range(1, m_max + 1):
        cum = list(itertools.accumulate(math.comb(m, i) for i in range(m + 1)))
        for b in range(m + 1):
            p[b, m - b] = min(1.0, 2 * cum[min(b, m - b)] / 2**m)
    return p


@pytest.fixture(scope="module")
def p_table() -> np.ndarray:
    p = mcnemar_table(N_MAX)
    for b, c in [(0, 0), (5, 0), (3, 9), (40, 61), (150, 150), (0, 300)]:
        assert p[b, c] == pytest.approx(stats.mcnemar_exact_p(b, c), rel=1e-12)
    return p


def numbers(both, b, c, neither):
    """decide_task's arithmetic for pass/fail metrics on arrays of tables: delta and Newcombe CI in points."""
    n = both + b + c + neither
    delta = ((both + c) / n - (both + b) / n) * 100.0
    low, high = stats.newcombe_paired_interval(both, b, c, neither, CONFIDENCE)
    return delta, low * 100.0, high * 100.0


def discordant_triples(n_max: int):
    """Every (n, b, c) with b + c <= n <= n_max."""
    k = np.arange(n_max + 1)
    b, c = (x.ravel() for x in np.meshgrid(k, k, indexing="ij"))
    keep = b + c <= n_max
    b, c = b[keep], c[keep]
    for n in range(1, n_max + 1):
        sel = b + c <= n
        yield np.full(int(sel.sum()), n), b[sel], c[sel]


def full_tables(n_max: int):
    """Every (both, b, c, neither) with n = both + b + c + neither <= n_max, n >= 1."""
    for n in range(1, n_max + 1):
        k = np.arange(n + 1)
        both, b, c = (x.ravel() for x in np.meshgrid(k, k, k, indexing="ij"))
        keep = both + b + c <= n
        yield both[keep], b[keep], c[keep], n - (both + b + c)[keep]


def check(tables, allowed_drops, p_table: np.ndarray, counts: dict) -> None:
    delta, low, high = numbers(*tables)
    p = p_table[tables[1], tables[2]]
    for allowed in allowed_drops:
        verdict = stats.verdict(delta, low, high, p, -allowed, CONFIDENCE)
        fail, passed = verdict == "fail", verdict == "pass"
        assert not np.any(fail & (p >= ALPHA)), "a fail beside a non-significant exact McNemar p"
        assert not np.any(fail & (high >= 0)), "a fail beside a CI that includes zero"
        assert not np.any(passed & (low < -allowed)), "a pass whose CI leaves the allowed drop"
        counts["tables"] += verdict.size
        counts["fail"] += int(fail.sum())
        # what the rule without the test would have called a fail although p >= alpha
        counts["ci_only_fail"] += int(np.sum((delta < -allowed) & (high < 0) & (p >= ALPHA)))


def test_every_table_up_to_300_samples_agrees_with_its_p(p_table):
    # The verdict depends on b, c and n through the drop, the exact test and most of the interval, but
    # Newcombe's interval also reads the marginals (both vs neither): every (n, b, c) is decided with the
    # concordant pairs split three ways (all passing, half and half, all failing), and up to 60 samples
    # every table is decided. Allowed drops of 1 and 5 points.
    counts = dict(tables=0, fail=0, ci_only_fail=0)
    for n, b, c in discordant_triples(N_MAX):
        rest = n - b - c
        for both in (np.zeros_like(rest), rest // 2, rest):
            check((both, b, c, rest - both), (1.0, 5.0), p_table, counts)
    for table in full_tables(60):
        check(table, (1.0, 5.0), p_table, counts)
    assert counts["tables"] > 28_000_000 and counts["fail"] > 2_000_000
    # the enumeration reaches the cases the issue found: an interval clear of zero beside p >= alpha
    assert counts["ci_only_fail"] > 1000


def test_five_lost_none_gained_of_twenty_is_not_a_fail():
    # CI [-43.4, -3.2] clears zero, but the exact McNemar p of 5 vs 0 discordant pairs is 2 / 2^5
    base = [1] * 15 + [0] * 5
    cand = [1] * 10 + [0] * 10
    docs = lambda vals: [{"doc_id": i, "scores": {"acc": v}} for i, v in enumerate(vals)]
    d = decide_task(docs(base), docs(cand), TaskPolicy("mmlu", metric="acc", max_drop=1.0), True, True)
    assert (round(d.ci_low, 1), round(d.ci_high, 1)) == (-43.4, -3.2)
    assert d.p_value == 0.0625 and d.verdict == "inconclusive"
    # one more lost answer (6 vs 0 of 21) is significant: the same drop then fails
    d = decide_task(docs(base + [1]), docs(cand + [0]), TaskPolicy("mmlu", metric="acc", max_drop=1.0), True, True)
    assert d.p_value == 0.03125 and d.verdict == "fail"


def test_decide_task_agrees_with_the_enumeration(p_table):
    rng = np.random.default_rng(17)
    docs = lambda vals: [{"doc_id": i, "scores": {"acc": v}} for i, v in enumerate(vals)]
    for _ in range(300):
        n = int(rng.integers(1, 120))
        both, b, c, neither = (int(x) for x in rng.multinomial(n, rng.dirichlet([3, 1, 1, 3])))
        allowed = float(rng.choice([0.0, 1.0, 5.0]))
        base = [1] * both + [1] * b + [0] * c + [0] * neither
        cand = [1] * both + [0] * b + [1] * c + [0] * neither
        d = decide_task(docs(base), docs(cand), TaskPolicy("t", metric="acc", max_drop=allowed), True, True)
        delta, low, high = numbers(*(np.array([x]) for x in (both, b, c, neither)))
        p = p_table[[b], [c]]
        assert d.verdict == stats.verdict(delta, low, high, p, -allowed, CONFIDENCE)[0], (both, b, c, neither)
        assert (d.delta, d.ci_low, d.ci_high) == pytest.approx((delta[0], low[0], high[0]), abs=1e-9)
        assert d.p_value == pytest.approx(p[0], rel=1e-12)


def test_a_bootstrap_interval_clear_of_zero_beside_p_above_alpha_is_not_a_fail():
    # Continuous metrics: the percentile interval's upper end and the bootstrap p are read from the same
    # resamples but not at the same point. Shift the candidate until exactly 50 of the 2000 resampled
    # differences are >= 0: the 97.5% quantile is still below zero, the p is 2 * 51 / 2001 > 0.05.
    rng = np.random.default_rng(4)
    n = 60
    base, noise = rng.normal(0, 1, n), rng.normal(0, 1, n)
    idx = np.random.default_rng(stats.BOOTSTRAP_SEED).integers(0, n, size=(stats.BOOTSTRAP_RESAMPLES, n))
    shift = -np.sort(noise[idx].mean(axis=1))[stats.BOOTSTRAP_RESAMPLES - 50] + 1e-9
    cand = base + noise + shift
    cmp = stats.compare_bootstrap(base, cand)
    assert cmp.ci_high < 0 and cmp.p_value == pytest.approx(2 * 51 / 2001)  # the case this test is about
    docs = lambda vals: [{"doc_id": i, "scores": {"score": float(v)}} for i, v in enumerate(vals)]
    tp = TaskPolicy("t", metric="score", max_drop=0.1)
    d = decide_task(docs(base), docs(cand), tp, True, False)
    assert d.delta < -0.1 and d.ci_high < 0 and d.p_value >= ALPHA
    assert d.verdict == "inconclusive"
    # a clearer drop (all but a handful of resamples below zero) fails
    d = decide_task(docs(base), docs(cand - 0.2), tp, True, False)
    assert d.verdict == "fail" and d.p_value < ALPHA


# ---- how many samples would decide, against an exact search -----------------------------------------

def scaled_table(table, n):
    """``table`` at ``n`` samples (an array) with its observed rates: discordant counts rounded, the
    rest split between both-pass and both-fail in the observed proportion."""
    both, b, c, neither = table
    n0 = sum(table)
    bn, cn = np.round(b * n / n0), np.round(c * n / n0)
    rest = n - bn - cn
    bothn = np.round(rest * both / (both + neither)) if both + neither else np.zeros_like(rest)
    return bothn.astype(np.int64), bn.astype(np.int64), cn.astype(np.int64), (rest - bothn).astype(np.int64)


def exact_samples_to_decide(table, allowed: float, n_max: int) -> int | None:
    """The smallest n (from the table's own) at which decide_task's rule decides the scaled table."""
    n = np.arange(sum(table), n_max + 1)
    both, b, c, neither = scaled_table(table, n)
    delta, low, high = numbers(both, b, c, neither)
    # binomial tails in floats to scan; the answer is confirmed with the exact test below
    p = np.minimum(1.0, 2 * binom.cdf(np.minimum(b, c), np.maximum(b + c, 1), 0.5))
    decided = np.flatnonzero(stats.verdict(delta, low, high, p, -allowed, CONFIDENCE) != "inconclusive")
    if not len(decided):
        return None
    i = decided[0]
    assert stats.verdict(delta[i], low[i], high[i], stats.mcnemar_exact_p(b[i], c[i]), -allowed,
                         CONFIDENCE) != "inconclusive"
    return int(n[i])


def estimate(table, allowed: float) -> int | None:
    """decide_task's samples_needed for ``table``."""
    both, b, c, neither = table
    docs = lambda vals: [{"doc_id": i, "scores": {"acc": v}} for i, v in enumerate(vals)]
    base = [1] * both + [1] * b + [0] * c + [0] * neither
    cand = [1] * both + [0] * b + [1] * c + [0] * neither
    d = decide_task(docs(base), docs(cand), TaskPolicy("t", metric="acc", max_drop=allowed), True, True)
    return d.samples_needed if d.verdict == "inconclusive" else None


def grid():
    """Inconclusive tables at 20 to 300 samples, allowed drops of 1, 3 and 5 points."""
    for n0 in (20, 50, 100, 300):
        counts = sorted({0, 3, 5, round(0.1 * n0), round(0.2 * n0)})
        for b, c in itertools.product(counts, counts):
            for share in (0.5, 0.8):
                both = round((n0 - b - c) * share)
                for allowed in (1.0, 3.0, 5.0):
                    yield (both, b, c, n0 - b - c - both), allowed


def test_samples_needed_is_close_to_an_exact_search():
    # ~280 inconclusive tables (n 20 to 300; discordant counts 0, 3, 5, 10% and 20% of n; allowed 1, 3
    # and 5 points): decide_task's estimate against the smallest n at which its own rule decides the
    # table scaled to n. Observed: median error 4%, largest 26% ((74, 3, 5, 18) at 3 points: 141 vs 112).
    # The largest misses are rounding luck in the exact search: a count of 3 or 5 scaled to n is rounded,
    # and the first n decided is one where the rounding happened to favour a decision (the same tables
    # stay decided only from 132, 461, ...: within 17% of the estimate).
    errors = []
    for table, allowed in grid():
        est = estimate(table, allowed)
        if est is None:
            continue
        exact = exact_samples_to_decide(table, allowed, 3 * est + 2 * sum(table))
        assert exact is not None, (table, allowed, est)
        errors.append(abs(est - exact) / exact)
    assert len(errors) > 250
    assert np.median(errors) < 0.06
    assert max(errors) <= 0.30


def test_readme_example_of_an_inconclusive_decision():
    # one lost answer out of 20, -5 points against an allowed -3: the old estimate measured the 2 points to
    # the threshold (457); a fail needs the interval to clear zero and 6 lost answers for an exact
    # McNemar p < 0.05, which a 5% loss rate reaches near 110-120 samples
    table = (10, 1, 0, 9)
    assert estimate(table, 3.0) == 114
    assert exact_samples_to_decide(table, 3.0, 1000) == 110
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    base = [1] * 11 + [0] * 9
    cand = [1] * 10 + [0] * 10
    docs = lambda vals: [{"doc_id": i, "scores": {"acc": v}} for i, v in enumerate(vals)]
    d = decide_task(docs(base), docs(cand), TaskPolicy("mmlu", metric="acc", max_drop=3.0), True, True)
    assert f"`{d.reason}`" in readme
