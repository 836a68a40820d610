"""experiments/_verdict_stats_draft.py against scipy.stats: paired t-intervals and the seeds a half-width needs."""

import importlib.util
import math
import os

import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_verdict_stats_draft",
                                               os.path.join(ROOT, "experiments", "_verdict_stats_draft.py"))
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

DIFFS = [0.2355, 0.0054, -0.055, -0.0291, -0.0484, 0.0357, -0.1894, -0.2619]  # Sr-DPO − DPO, seeds8 (committed)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_paired_interval_is_scipys_t_interval_and_paired_t_test(confidence):
    got = vs.paired_interval(DIFFS, confidence)
    n = len(DIFFS)
    low, high = stats.t.interval(confidence, n - 1, loc=stats.tmean(DIFFS), scale=stats.sem(DIFFS))
    assert got["n"] == n
    assert got["low"] == pytest.approx(low, rel=1e-12) and got["high"] == pytest.approx(high, rel=1e-12)
    assert got["sd"] == pytest.approx(stats.tstd(DIFFS), rel=1e-12)
    test = stats.ttest_1samp(DIFFS, 0.0)
    assert got["t"] == pytest.approx(test.statistic, rel=1e-12) and got["p"] == pytest.approx(test.pvalue, rel=1e-12)
    # a paired test of a - b is the one-sample test of the differences
    a = [0.7 + d for d in DIFFS]
    b = [0.7] * n
    assert got["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)


def test_paired_interval_edge_cases():
    one = vs.paired_interval([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["halfwidth"]) and math.isnan(one["p"])
    flat = vs.paired_interval([0.5, 0.5, 0.5])  # exact in binary: sd 0
    assert flat["halfwidth"] == pytest.approx(0.0, abs=1e-15) and flat["p"] == 0.0 and flat["t"] == math.inf
    zero = vs.paired_interval([0.0, 0.0])
    assert math.isnan(zero["t"]) and math.isnan(zero["p"])
    for bad in ([], [1.0, math.nan]):
        with pytest.raises(ValueError):
            vs.paired_interval(bad)


@pytest.mark.parametrize("sd", [0.01, 0.15, 0.45, 2.0])
@pytest.mark.parametrize("w", [0.01, 0.05, 0.25])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_seeds_for_halfwidth_is_the_smallest_n_by_scipy(sd, w, confidence):
    n = vs.seeds_for_halfwidth(sd, w, confidence)

    def scipy_half(k):
        return stats.t.ppf((1 + confidence) / 2, k - 1) * sd / math.sqrt(k)

    assert n >= 2 and scipy_half(n) <= w
    assert n == 2 or scipy_half(n - 1) > w
    z = stats.norm.ppf((1 + confidence) / 2)
    assert n >= (z * sd / w) ** 2  # never fewer than the normal approximation asks


def test_seeds_for_halfwidth_limits():
    assert vs.seeds_for_halfwidth(0.0, 0.01) == 2
    assert vs.seeds_for_halfwidth(1.0, 1e-4) is None  # over MAX_SEEDS
    for sd, w in ((-1.0, 0.1), (math.nan, 0.1), (1.0, 0.0)):
        with pytest.raises(ValueError):
            vs.seeds_for_halfwidth(sd, w)


def test_power_table_plans_from_the_sample_sd():
    table = vs.power_table(DIFFS, [0.02, 0.05])
    sd = stats.tstd(DIFFS)
    assert [row["seeds"] for row in table] == [vs.seeds_for_halfwidth(sd, 0.02), vs.seeds_for_halfwidth(sd, 0.05)]
    assert table[0]["seeds"] > table[1]["seeds"]
