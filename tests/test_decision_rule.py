"""The decision rule checked over every paired table, not a few examples: a fail never stands beside a
non-significant p, a pass never beside a CI that leaves the allowed drop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

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


def numbers(both, b, c, neither, p_table: np.ndarray):
    """decide_task's arithmetic for pass/fail metrics on arrays of tables: delta and Newcombe CI in
    points, exact McNemar p."""
    n = both + b + c + neither
    delta = ((both + c) / n - (both + b) / n) * 100.0
    low, high = stats.newcombe_paired_interval(both, b, c, neither, CONFIDENCE)
    return delta, low * 100.0, high * 100.0, p_table[b, c]


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
    delta, low, high, p = numbers(*tables, p_table)
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
        delta, low, high, p = numbers(*(np.array([x]) for x in (both, b, c, neither)), p_table)
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
