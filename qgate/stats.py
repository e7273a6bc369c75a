"""Paired statistics for baseline-vs-candidate comparisons on the same samples.

Pure functions on numbers; no I/O, no models. Conventions:

* ``delta`` is always candidate minus baseline, in the metric's own units (a
  proportion for pass/fail metrics: multiply by 100 for points).
* Pass/fail metrics: exact McNemar test (two-sided, on the discordant pairs) and
  Newcombe's hybrid score interval for the paired difference of proportions
  (Newcombe 1998, Statistics in Medicine 17:2635, method 10: Wilson intervals
  of the two marginal proportions combined with a continuity-corrected phi).
* Continuous metrics (perplexity, loglikelihood, scores in [0, 1]): paired
  bootstrap over documents with a fixed seed. A corpus-level metric such as
  perplexity is recomputed from the resampled documents' (loglikelihood,
  weight) pairs, so the resampling unit is the document, not the token.

The decision rule (``verdict``; the decision engine, qgate.decide, applies it): pass when the whole
CI lies within the allowed drop; fail when the estimate is beyond the allowed drop, the CI's upper
end is below zero AND the p-value reported with the decision is below alpha = 1 - confidence. The
p-value is the exact McNemar test for pass/fail metrics and the bootstrap tail probability for
continuous ones. Both conditions are needed because interval and test are different procedures that
can disagree near the boundary: Newcombe's interval is liberal for few discordant pairs (20 samples,
5 lost and none gained: CI [-43.4, -3.2] pts, exact McNemar p = 0.0625), and the percentile interval
can clear zero with a bootstrap p just above alpha. So a fail never stands beside p >= alpha nor
beside a CI that includes zero; the published interval and the exact test stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240917


@dataclass(frozen=True)
class Comparison:
    """A paired comparison: point estimate, two-sided CI, p-value for "no difference"."""

    baseline: float
    candidate: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    # standard deviation of one pair's contribution to delta (delta's sd is sd_pair / sqrt(n));
    # what the "how many samples would decide" estimate extrapolates from for continuous metrics
    sd_pair: float
    discordant: tuple[int, int] | None = None  # (baseline-only passes, candidate-only passes)
    # pass/fail metrics: paired_table's 2x2 table, which that estimate projects to larger n
    table: tuple[int, int, int, int] | None = None


def z_value(confidence: float) -> float:
    """Two-sided normal quantile for a confidence level (0.95 -> 1.95996...)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b+c trials at p=1/2.

    b and c are the discordant counts. Exact in integer arithmetic (big ints), then one division.
    """
    b, c = int(b), int(c)  # numpy integers would overflow 2**m
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    term = tail = 1  # C(m, 0); then C(m, i + 1) = C(m, i) * (m - i) / (i + 1), exactly
    for i in range(k):
        term = term * (m - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**m)


def wilson_interval(successes, n, z: float):
    """Wilson score interval for a single proportion.

    Elementwise on numpy arrays, and counts may be fractional (a table projected to another sample
    size); scalars in, floats out.
    """
    s, m = np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if s.ndim == 0 and m.ndim == 0 and m == 0:
        return 0.0, 1.0
    p = s / m
    denom = 1 + z * z / m
    centre = (p + z * z / (2 * m)) / denom
    half = z * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / denom
    low, high = np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def paired_table(baseline: Sequence[float], candidate: Sequence[float]) -> tuple[int, int, int, int]:
    """2x2 table of paired pass/fail outcomes: (both pass, baseline only, candidate only, both fail)."""
    if len(baseline) != len(candidate):
        raise ValueError("paired samples must have the same length")
    both = base_only = cand_only = neither = 0
    for x, y in zip(baseline, candidate):
        bx, by = bool(round(x)), bool(round(y))
        if bx and by:
            both += 1
        elif bx:
            base_only += 1
        elif by:
            cand_only += 1
        else:
            neither += 1
    return both, base_only, cand_only, neither


def newcombe_paired_interval(both, base_only, cand_only, neither, confidence: float = 0.95):
    """CI of p_candidate - p_baseline for paired proportions (Newcombe's method 10).

    Elementwise on numpy arrays of counts (an enumeration of tables is one call), and counts may be
    fractional (a table projected to another sample size); scalars in, floats out.
    """
    both, b, c, nei = (np.asarray(x, dtype=np.float64) for x in (both, base_only, cand_only, neither))
    n = both + b + c + nei
    scalar = n.ndim == 0 and both.ndim == 0
    if scalar and n == 0:
        return -1.0, 1.0
    z = z_value(confidence)
    base_pass, cand_pass = both + b, both + c
    p1, p2 = base_pass / n, cand_pass / n
    l1, u1 = wilson_interval(base_pass, n, z)
    l2, u2 = wilson_interval(cand_pass, n, z)
    margins = base_pass * (n - base_pass) * cand_pass * (n - cand_pass)
    root = np.sqrt(np.where(margins > 0, margins, 1.0))
    cross = both * nei - b * c
    phi = np.where(margins > 0, np.where(cross > n / 2, (cross - n / 2) / root,
                                         np.where(cross < 0, cross / root, 0.0)), 0.0)
    delta = p2 - p1
    # lower limit: candidate low, baseline high; upper: the other way round
    low = delta - np.sqrt(np.maximum(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    high = delta + np.sqrt(np.maximum(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    low, high = np.maximum(-1.0, low), np.minimum(1.0, high)
    return (float(low), float(high)) if scalar else (low, high)


def compare_binary(baseline: Sequence[float], candidate: Sequence[float],
                   confidence: float = 0.95) -> Comparison:
    """Paired pass/fail comparison: McNemar exact p and Newcombe CI of the accuracy difference."""
    both, base_only, cand_only, neither = paired_table(baseline, candidate)
    n = both + base_only + cand_only + neither
    if n == 0:
        raise ValueError("no paired samples to compare")
    low, high = newcombe_paired_interval(both, base_only, cand_only, neither, confidence)
    p_base, p_cand = (both + base_only) / n, (both + cand_only) / n
    delta = p_cand - p_base
    # per-pair difference takes values -1, 0, +1
    mean_sq = (base_only + cand_only) / n
    sd_pair = math.sqrt(max(0.0, mean_sq - delta * delta))
    return Comparison(baseline=p_base, candidate=p_cand, delta=delta, ci_low=low, ci_high=high,
                      p_value=mcnemar_exact_p(base_only, cand_only), n=n, sd_pair=sd_pair,
                      discordant=(base_only, cand_only), table=(both, base_only, cand_only, neither))


# ---- continuous metrics -------------------------------------------------------------------

def mean_aggregate(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over the last axis (the documents of each resample)."""
    return values.mean(axis=-1)


def perplexity_aggregate(loglik: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Corpus perplexity exp(-sum loglik / sum weight) (words, bytes or tokens as the weight)."""
    return np.exp(-loglik.sum(axis=-1) / weights.sum(axis=-1))


def bits_per_byte_aggregate(loglik: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bits per byte: -sum loglik / (sum bytes * ln 2)."""
    return -loglik.sum(axis=-1) / (weights.sum(axis=-1) * math.log(2))


def mean_exp_aggregate(loglik: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-sample loglikelihood perplexity as lm-eval's "perplexity": exp(-mean loglik)."""
    return np.exp(-loglik.mean(axis=-1))


Aggregate = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def compare_bootstrap(baseline: Sequence[float], candidate: Sequence[float],
                      confidence: float = 0.95, *,
                      baseline_weights: Sequence[float] | None = None,
                      candidate_weights: Sequence[float] | None = None,
                      aggregate: Aggregate = mean_aggregate,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Comparison:
    """Paired percentile bootstrap of aggregate(candidate) - aggregate(baseline) over documents.

    The same resampled document indices are used for both sides (that is what makes it paired).
    The p-value is the two-sided bootstrap tail probability of a zero difference.
    """
    base = np.asarray(baseline, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if base.shape != cand.shape or base.ndim != 1:
        raise ValueError("paired samples must be 1-D sequences of the same length")
    n = base.shape[0]
    if n == 0:
        raise ValueError("no paired samples to compare")
    bw = np.asarray(baseline_weights, dtype=np.float64) if baseline_weights is not None else np.ones(n)
    cw = np.asarray(candidate_weights, dtype=np.float64) if candidate_weights is not None else bw

    base_value = float(aggregate(base, bw))
    cand_value = float(aggregate(cand, cw))
    delta = cand_value - base_value

    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    # chunks keep the index matrix small for large samples
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = aggregate(cand[idx], cw[idx]) - aggregate(base[idx], bw[idx])

    alpha = 1.0 - confidence
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    if np.all(diffs == 0):
        p_value = 1.0
    else:
        below = (np.sum(diffs <= 0) + 1) / (resamples + 1)
        above = (np.sum(diffs >= 0) + 1) / (resamples + 1)
        p_value = float(min(1.0, 2 * min(below, above)))
    sd_pair = float(np.std(diffs, ddof=1) * math.sqrt(n)) if resamples > 1 else 0.0
    return Comparison(baseline=base_value, candidate=cand_value, delta=delta, ci_low=float(low),
                      ci_high=float(high), p_value=p_value, n=n, sd_pair=sd_pair)


def on_threshold(delta, threshold):
    """delta equals threshold up to floating-point rounding (16/20 - 18/20 against an allowed -10 pts).

    Elementwise on numpy arrays; scalars in, a bool out.
    """
    d, t = np.asarray(delta, dtype=np.float64), np.asarray(threshold, dtype=np.float64)
    close = np.abs(d - t) <= np.maximum(1e-9 * np.maximum(np.abs(d), np.abs(t)), 1e-12)
    return bool(close) if close.ndim == 0 else close


def verdict(delta, low, high, p_value, threshold, confidence: float = 0.95):
    """The decision rule: "pass", "fail" or "inconclusive" (see the module docstring).

    Oriented so that a drop is negative: ``delta`` and its CI [low, high] in any units, ``threshold``
    (= -allowed drop, <= 0) in the same units; ``p_value`` is the one reported with the decision.
    An estimate on the threshold is not beyond it. Elementwise on numpy arrays (an array of strings).
    """
    delta, low, high, p, threshold = (np.asarray(x, dtype=np.float64)
                                      for x in (delta, low, high, p_value, threshold))
    passed = low >= threshold
    beyond = (delta < threshold) & ~np.asarray(on_threshold(delta, threshold))
    failed = beyond & (high < 0) & (p < 1.0 - confidence)
    out = np.where(passed, "pass", np.where(failed, "fail", "inconclusive"))
    return str(out) if out.ndim == 0 else out


def _smallest_n(decides: Callable[[int], bool], start: int) -> int | None:
    """Smallest n >= 1 with decides(n), for a decides that turns true once and stays: doubling from
    ``start``, then bisection. None past 2**62."""
    lo, hi = 0, max(1, start)
    while not decides(hi):
        lo, hi = hi, hi * 2
        if hi > 2**62:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decides(mid):
            hi = mid
        else:
            lo = mid
    return hi


def samples_to_decide(delta: float, threshold: float, sd_pair: float, n: int, confidence: float = 0.95, *,
                      table: tuple[int, int, int, int] | None = None) -> int | None:
    """About how many paired samples would decide, assuming the observed rates stay, on the side the
    estimate is on. Oriented so that a drop is negative; ``threshold`` is -allowed drop (<= 0):

    * estimate inside the allowed drop (delta > threshold): the n at which the CI's lower end reaches
      the threshold, a pass;
    * estimate beyond it (delta < threshold): the n at which the CI's upper end clears zero AND the
      test is significant, a fail (``verdict`` asks for both).

    Pass/fail metrics: ``table`` is the oriented paired table (both pass, lost, gained, both fail). It
    is projected to other sample sizes at its observed rates (fractional counts) and the smallest n
    whose Newcombe interval decides is found by bisection; the exact McNemar test's significance is
    taken from its continuity-corrected normal form, (|lost - gained| - 1)^2 >= z^2 (lost + gained),
    which asks for the same 6 discordant pairs as the exact test when none is gained (95%).
    Continuous metrics: normal approximation, CI half-width z * sd_pair / sqrt(n) (the bootstrap's
    interval and its p clear zero together to this approximation); with sd 0, one discordant pair in
    n is assumed, so the estimate stays finite and conservative.
    None when the estimate sits on the threshold (up to rounding): no number of samples decides then,
    and when any input is NaN or infinite (no sample size decides what cannot be compared).
    """
    if not all(math.isfinite(float(x)) for x in (delta, threshold, sd_pair)):
        return None
    if table is not None and not all(math.isfinite(float(x)) for x in table):
        return None
    if on_threshold(delta, threshold):
        return None
    z = z_value(confidence)
    if table is not None:
        rates = np.asarray(table, dtype=np.float64) / sum(table)
        start = sum(table)
        if delta > threshold:
            return _smallest_n(lambda m: newcombe_paired_interval(*(rates * m), confidence)[0] >= threshold, start)
        n_ci = _smallest_n(lambda m: newcombe_paired_interval(*(rates * m), confidence)[1] < 0, start)
        if n_ci is None:
            return None
        # (m D - 1)^2 >= z^2 m S for discordant rates S = lost + gained, D = |lost - gained|
        s, d = rates[1] + rates[2], abs(rates[1] - rates[2])
        if d == 0:
            return n_ci
        q = 2 * d + z * z * s
        n_test = math.ceil((q + math.sqrt(q * q - 4 * d * d)) / (2 * d * d))
        return max(n_ci, n_test)
    sd = sd_pair if sd_pair > 0 else math.sqrt(1.0 / max(n, 1))
    gap = delta - threshold if delta > threshold else -delta
    return max(1, math.ceil((z * sd / gap) ** 2))


def detectable_drop(n: int, confidence: float = 0.95, churn: float = 0.0) -> float | None:
    """The smallest drop (a proportion) that n paired pass/fail samples can call significant.

    A drop of d over n samples is D = d*n more samples lost than gained. With a share ``churn`` of the
    samples changing outcome (at least D of them), the best case for detection splits them into
    b = (K + D) / 2 lost and c = (K - D) / 2 gained, K = max(churn * n, D); the smallest D whose exact
    McNemar p is below alpha = 1 - confidence is the answer. churn 0 (every changed sample lost) is the
    floor: at 95% it takes 6 lost samples, so 20 samples cannot detect a drop under 30 points. A fail also
    needs the estimate beyond the allowed drop (``verdict``): a task fails no drop smaller than the
    larger of the two. None when even n lost samples would not be significant.
    """
    n = int(n)
    if n <= 0:
        return None
    alpha = 1.0 - confidence
    changed = round(max(0.0, min(1.0, churn)) * n)
    for d in range(1, n + 1):
        k = max(changed, d)
        if (k - d) % 2:
            k += 1
        b, c = (k + d) // 2, (k - d) // 2
        if b + c <= n and mcnemar_exact_p(b, c) < alpha:
            return d / n
    return None
