"""Paired intervals and seed counts for the verdict experiment (issue 25); a draft the experiments/
package split will move (to experiments/stats.py or beside the verdict claim).

Pure functions of numbers (math and scipy.stats.t only): nothing here trains, reads or writes.

    paired_interval(diffs)                       mean, t-based 95% CI and SD of per-seed paired differences
    seeds_for_halfwidth(sd, halfwidth)           the fewest seeds n whose t-interval half-width
                                                 t_{1-α/2, n-1}·sd/√n is at most halfwidth
    power_table(diffs, halfwidths)               seeds_for_halfwidth for several half-widths, from diffs' SD
"""

import math

from scipy import stats

MAX_SEEDS = 10_000_000  # seeds_for_halfwidth's search bound: beyond it the answer is "impractical" anyway


def _mean_sd(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def paired_interval(diffs, confidence=0.95):
    """The mean of per-seed paired differences (method − baseline, same seed) and its t-interval.

    diffs: finite numbers, one per seed (at least 2 for an interval).
    Returns {"n", "mean", "sd", "halfwidth", "low", "high", "t", "p"}: sd is the sample SD (n − 1),
    halfwidth t_{(1+confidence)/2, n-1}·sd/√n, p the two-sided one-sample t-test of mean 0 (the
    paired t-test); nan where n < 2, and t, p nan where sd is 0 and the mean is too.
    """
    diffs = [float(d) for d in diffs]
    if not diffs or not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"paired_interval: need finite differences, got {diffs}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_interval: confidence {confidence} is not in (0, 1)")
    n = len(diffs)
    mean, sd = _mean_sd(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "halfwidth": math.nan, "low": math.nan,
                "high": math.nan, "t": math.nan, "p": math.nan}
    se = sd / math.sqrt(n)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * se
    if se > 0:
        t = mean / se
        p = 2 * stats.t.sf(abs(t), n - 1)
    else:
        t, p = (math.nan, math.nan) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    return {"n": n, "mean": mean, "sd": sd, "halfwidth": half, "low": mean - half, "high": mean + half,
            "t": t, "p": p}


def halfwidth(sd, n, confidence=0.95):
    """The t-interval half-width t_{(1+confidence)/2, n-1}·sd/√n of a mean of n paired differences."""
    if n < 2:
        return math.inf
    return stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)


def seeds_for_halfwidth(sd, halfwidth_wanted, confidence=0.95):
    """The fewest seeds n ≥ 2 with halfwidth(sd, n, confidence) ≤ halfwidth_wanted.

    sd: the SD of one seed's paired difference (a planning value, e.g. from committed runs);
    halfwidth_wanted > 0 in the same unit. Returns an int, or None beyond MAX_SEEDS.
    The half-width falls monotonically in n, so the answer is found by doubling and bisection; it is at
    least the normal approximation (z·sd/w)² and at most a few seeds more.
    """
    if not (sd >= 0 and math.isfinite(sd)):
        raise ValueError(f"seeds_for_halfwidth: sd {sd} must be finite and >= 0")
    if not halfwidth_wanted > 0:
        raise ValueError(f"seeds_for_halfwidth: halfwidth {halfwidth_wanted} must be > 0")
    if sd == 0:
        return 2
    low, high = 1, 2  # halfwidth(low) > wanted (n = 1 has no interval); search for high with <= wanted
    while halfwidth(sd, high, confidence) > halfwidth_wanted:
        low, high = high, high * 2
        if high > MAX_SEEDS:
            return None if halfwidth(sd, MAX_SEEDS, confidence) > halfwidth_wanted else \
                _bisect(sd, halfwidth_wanted, confidence, low, MAX_SEEDS)
    return _bisect(sd, halfwidth_wanted, confidence, low, high)


def _bisect(sd, wanted, confidence, low, high):
    """The smallest n in (low, high] with halfwidth ≤ wanted, given halfwidth(low) > wanted ≥ halfwidth(high)."""
    while high - low > 1:
        mid = (low + high) // 2
        if halfwidth(sd, mid, confidence) <= wanted:
            high = mid
        else:
            low = mid
    return high


def power_table(diffs, halfwidths, confidence=0.95):
    """[{"halfwidth", "seeds"}] for each wanted half-width, planned from the sample SD of diffs."""
    sd = paired_interval(diffs, confidence)["sd"]
    return [{"halfwidth": w, "seeds": seeds_for_halfwidth(sd, w, confidence)} for w in halfwidths]
