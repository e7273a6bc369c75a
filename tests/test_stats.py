"""Paired statistics: checked against scipy, published values and known answers."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from qgate import stats


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (3, 9), (6, 16), (10, 10), (0, 25), (40, 61), (150, 190)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert stats.mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_mcnemar_is_exact_for_large_counts():
    # 2 * P(X <= 0) for X ~ Bin(2000, 1/2): far below float underflow of naive products, still exact
    assert stats.mcnemar_exact_p(0, 60) == pytest.approx(2 * 0.5**60, rel=1e-12)
    assert stats.mcnemar_exact_p(900, 1100) == pytest.approx(binomtest(900, 2000, 0.5).pvalue, rel=1e-9)
    # numpy counts (a table from np.random or an array) must not overflow 2**m in int64
    assert stats.mcnemar_exact_p(np.int64(5), np.int64(70)) == pytest.approx(binomtest(5, 75, 0.5).pvalue, rel=1e-12)


def test_newcombe_paired_interval_published_example():
    # Cavo et al. 2012 table [[59, 6], [16, 80]] from Fagerland, Lydersen & Laake, "Statistical analysis
    # of contingency tables", ch. 8: Newcombe square-and-add CI of p1 - p2 = -0.0621 (-0.1186 to -0.0046).
    low, high = stats.newcombe_paired_interval(both=59, base_only=6, cand_only=16, neither=80)
    # our delta is candidate - baseline = -(p1 - p2)
    assert low == pytest.approx(0.0046, abs=5e-5)
    assert high == pytest.approx(0.1186, abs=5e-5)


def test_newcombe_interval_is_antisymmetric_and_contains_estimate():
    low, high = stats.newcombe_paired_interval(40, 7, 2, 51)
    low2, high2 = stats.newcombe_paired_interval(40, 2, 7, 51)
    assert (low, high) == pytest.approx((-high2, -low2), abs=1e-12)
    assert low < (2 - 7) / 100 < high


def test_newcombe_interval_is_elementwise_on_arrays():
    # one call decides an enumeration of tables; each row is the scalar interval (to rounding)
    rng = np.random.default_rng(5)
    tables = rng.integers(0, 60, size=(500, 4))
    tables[0] = (0, 0, 0, 7)
    low, high = stats.newcombe_paired_interval(*tables.T, confidence=0.9)
    for row, lo, hi in zip(tables, low, high):
        assert (lo, hi) == pytest.approx(stats.newcombe_paired_interval(*map(int, row), confidence=0.9), abs=1e-12)
    assert isinstance(stats.newcombe_paired_interval(40, 7, 2, 51)[0], float)
    # counts may be fractional (a table projected to another size): between its integer neighbours
    low, high = stats.newcombe_paired_interval(100, 17.5, 5, 127.5)
    assert stats.newcombe_paired_interval(100, 18, 5, 127) < (low, high) < stats.newcombe_paired_interval(100, 17, 5, 128)
    assert high < stats.newcombe_paired_interval(100, 17, 5, 128)[1]


def test_newcombe_interval_covers_at_the_nominal_rate():
    # simulate paired outcomes with a true difference; coverage of a 95% interval should be close to 95%
    rng = np.random.default_rng(7)
    n, reps = 120, 1500
    probs = np.array([0.55, 0.08, 0.12, 0.25])  # both, base only, cand only, neither
    true_delta = probs[2] - probs[1]
    tables = rng.multinomial(n, probs, size=reps)
    covered = sum(lo <= true_delta <= hi for lo, hi in
                  (stats.newcombe_paired_interval(*map(int, t)) for t in tables))
    assert 0.93 <= covered / reps <= 0.975


def test_compare_binary_counts_and_point_estimate():
    base = [1] * 50 + [0] * 50
    cand = [1] * 45 + [0] * 5 + [1] * 2 + [0] * 48  # 5 lost, 2 gained
    cmp = stats.compare_binary(base, cand)
    assert cmp.discordant == (5, 2)
    assert cmp.delta == pytest.approx(-0.03)
    assert cmp.p_value == pytest.approx(binomtest(2, 7, 0.5).pvalue)
    assert cmp.ci_low < -0.03 < cmp.ci_high
    # sd of a pair's difference: values -1 (5x), +1 (2x), 0 (93x)
    assert cmp.sd_pair == pytest.approx(np.std([-1] * 5 + [1] * 2 + [0] * 93))


def test_identical_outcomes_give_zero_delta_and_p_one():
    outcomes = [1, 0, 1, 1, 0] * 8
    cmp = stats.compare_binary(outcomes, outcomes)
    assert cmp.delta == 0 and cmp.p_value == 1.0
    assert cmp.ci_low < 0 < cmp.ci_high  # 40 samples cannot prove "no difference at all"


def test_bootstrap_constant_shift_is_recovered_exactly():
    rng = np.random.default_rng(1)
    base = rng.normal(5, 2, 300)
    cmp = stats.compare_bootstrap(base, base + 0.25)
    assert cmp.delta == pytest.approx(0.25)
    assert cmp.ci_low == pytest.approx(0.25) and cmp.ci_high == pytest.approx(0.25)


def test_bootstrap_ci_matches_normal_theory_for_a_mean_difference():
    rng = np.random.default_rng(2)
    n = 400
    base = rng.normal(0, 1, n)
    cand = base + rng.normal(-0.1, 0.5, n)
    cmp = stats.compare_bootstrap(base, cand, 0.95)
    diff = cand - base
    half = norm.ppf(0.975) * diff.std(ddof=1) / math.sqrt(n)
    assert cmp.delta == pytest.approx(diff.mean())
    assert (cmp.ci_high - cmp.ci_low) / 2 == pytest.approx(half, rel=0.1)
    assert cmp.sd_pair == pytest.approx(diff.std(ddof=1), rel=0.1)
    assert cmp.p_value < 0.01  # a true shift of -0.1 with sd 0.5 over 400 pairs is clear


def test_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(3)
    base, cand = rng.normal(0, 1, 50), rng.normal(0, 1, 50)
    a = stats.compare_bootstrap(base, cand)
    b = stats.compare_bootstrap(base, cand)
    c = stats.compare_bootstrap(base, cand, seed=99)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)


def test_perplexity_bootstrap_resamples_documents():
    # 20 documents: loglikelihoods and word counts. Candidate loses 0.1 nats per word everywhere,
    # so its corpus perplexity is exactly exp(0.1) times the baseline's.
    words = np.arange(10, 30, dtype=float)
    base_ll = -2.0 * words
    cand_ll = base_ll - 0.1 * words
    cmp = stats.compare_bootstrap(base_ll, cand_ll, baseline_weights=words, candidate_weights=words,
                                  aggregate=stats.perplexity_aggregate)
    assert cmp.baseline == pytest.approx(math.exp(2.0))
    assert cmp.candidate == pytest.approx(math.exp(2.1))
    # every resample has the same per-word loss: the CI collapses on the exact difference
    assert cmp.ci_low == pytest.approx(math.exp(2.1) - math.exp(2.0))
    assert cmp.ci_high == pytest.approx(math.exp(2.1) - math.exp(2.0))


def test_bits_per_byte_aggregate():
    ll = np.array([-math.log(2) * 8, -math.log(2) * 8])  # 8 bits over 4 + 4 bytes
    assert stats.bits_per_byte_aggregate(ll, np.array([4.0, 4.0])) == pytest.approx(2.0)


def test_samples_to_decide_formula_and_effect():
    # drop of 3 points against an allowed 1: a fail needs the interval to clear zero, 0.03 away:
    # sd 0.3 -> (1.96 * 0.3 / 0.03)^2 = 384.1 (not the 0.02 to the threshold, which a pass would need)
    assert stats.samples_to_decide(-0.03, -0.01, 0.3, 100) == math.ceil((norm.ppf(0.975) * 0.3 / 0.03) ** 2)
    # no drop against an allowed 2: a pass needs the lower end above -0.02
    assert stats.samples_to_decide(0.0, -0.02, 0.3, 100) == math.ceil((norm.ppf(0.975) * 0.3 / 0.02) ** 2)
    assert stats.samples_to_decide(-0.01, -0.01, 0.3, 100) is None
    # with a few times that many samples a simulated comparison fails: interval clear of zero, p < 0.05
    rng = np.random.default_rng(11)
    n = stats.samples_to_decide(-0.10, -0.02, math.sqrt(0.2 - 0.01), 50)
    p = np.array([0.5, 0.15, 0.05, 0.3])  # delta = -0.10, E[d^2] = 0.2
    decided = 0
    for _ in range(200):
        t = rng.multinomial(4 * n, p)
        lo, hi = stats.newcombe_paired_interval(*map(int, t))
        delta = (t[2] - t[1]) / t.sum()
        decided += stats.verdict(delta, lo, hi, stats.mcnemar_exact_p(t[1], t[2]), -0.02) == "fail"
    assert decided / 200 > 0.9


def test_samples_to_decide_stays_finite_without_discordant_pairs():
    n = stats.samples_to_decide(0.0, -0.01, 0.0, 40)
    assert n is not None and n > 40


def test_samples_to_decide_past_the_allowed_drop_measures_to_zero():
    # -3.5 pts against an allowed -3, sd 0.2: the distance to the threshold (0.5 pts) advised 6,147
    # samples; a fail needs the interval to clear zero, 3.5 pts away: (1.96 * 0.2 / 0.035)^2 = 125.4
    assert stats.samples_to_decide(-0.035, -0.03, 0.2, 200) == 126
    assert stats.samples_to_decide(-0.025, -0.03, 0.2, 200) == math.ceil((norm.ppf(0.975) * 0.2 / 0.005) ** 2)


def test_samples_to_decide_on_the_threshold_is_none_despite_rounding():
    # 18/20 -> 16/20 against an allowed -10 pts: delta is -0.1 only up to float rounding, which advised
    # 448784877754822708872548639047680 samples
    delta = 16 / 20 - 18 / 20
    assert delta != -0.1
    assert stats.samples_to_decide(delta, -10.0 / 100, math.sqrt(0.1 - delta * delta), 20) is None
    assert stats.samples_to_decide(delta, -0.1, 0.3, 20, table=(16, 2, 0, 2)) is None
    assert stats.on_threshold(delta * 100, -10.0) and not stats.on_threshold(-0.1001, -0.1)


def test_samples_to_decide_for_pass_fail_counts_the_exact_test():
    # one lost answer of 20 (-5 pts, allowed -3): the interval clears zero near 73 samples (normal) and
    # ~91 (Newcombe), but exact McNemar needs 6 lost with none gained (5 gives p = 0.0625): 5% of ~114
    n = stats.samples_to_decide(-0.05, -0.03, math.sqrt(0.05 - 0.0025), 20, table=(10, 1, 0, 9))
    assert n == 114
    assert stats.mcnemar_exact_p(round(0.05 * n), 0) < 0.05 <= stats.mcnemar_exact_p(5, 0)
    # inside the allowed drop: the projected Newcombe interval's lower end reaches the threshold
    n = stats.samples_to_decide(0.0, -0.05, 0.0, 20, table=(10, 0, 0, 10))
    low = stats.newcombe_paired_interval(n / 2, 0, 0, n / 2)[0]
    assert low >= -0.05 > stats.newcombe_paired_interval((n - 1) / 2, 0, 0, (n - 1) / 2)[0]


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_detectable_drop_is_the_smallest_significant_excess_of_lost_samples(confidence):
    alpha = 1 - confidence
    for n in list(range(1, 60)) + [164, 541, 1140]:
        for churn in (0.0, 0.05, 0.1, 0.3):
            got = stats.detectable_drop(n, confidence, churn=churn)
            changed = round(churn * n)

            def significant(d):  # the best split of max(changed, d) changed samples with d more lost
                k = max(changed, d) + (max(changed, d) - d) % 2
                b, c = (k + d) // 2, (k - d) // 2
                return b + c <= n and binomtest(b, b + c, 0.5).pvalue < alpha

            smallest = next((d for d in range(1, n + 1) if significant(d)), None)
            assert got == (None if smallest is None else smallest / n), (n, churn)
    assert stats.detectable_drop(20) == pytest.approx(0.30)  # 6 lost of 20, none gained: p = 0.031
    assert stats.detectable_drop(5) is None  # 5 of 5 lost: p = 0.0625
