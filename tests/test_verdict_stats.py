"""experiments/stats.py's paired t-intervals, seeds for a half-width and Wilcoxon's signed-rank test, against
scipy.stats (skipped without scipy) and closed forms."""

import math

import pytest

from experiments import stats as vs

DIFFS = [0.2355, 0.0054, -0.055, -0.0291, -0.0484, 0.0357, -0.1894, -0.2619]  # Sr-DPO − DPO, seeds8 (committed)


@pytest.fixture(scope="module")
def scipy_stats():
    return pytest.importorskip("scipy.stats")


def test_t_quantile_closed_forms():
    assert vs.t_quantile(0.75, 1) == pytest.approx(1.0, rel=1e-10)  # Cauchy: tan(π/4)
    assert vs.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.025 * 0.975), rel=1e-10)  # df 2
    assert vs.t_quantile(0.025, 2) == -vs.t_quantile(0.975, 2) and vs.t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        vs.t_quantile(1.0, 3)


@pytest.mark.parametrize("q,df", [(0.975, 1), (0.975, 7), (0.95, 15), (0.995, 3), (0.6, 40), (0.975, 1e6)])
def test_t_quantile_is_scipys(scipy_stats, q, df):
    assert vs.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_paired_interval_is_scipys_t_interval_and_paired_t_test(scipy_stats, confidence):
    stats = scipy_stats
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
def test_seeds_for_halfwidth_is_the_smallest_n_by_scipy(scipy_stats, sd, w, confidence):
    stats = scipy_stats
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


def test_power_table_plans_from_the_sample_sd(scipy_stats):
    stats = scipy_stats
    table = vs.power_table(DIFFS, [0.02, 0.05])
    sd = stats.tstd(DIFFS)
    assert [row["seeds"] for row in table] == [vs.seeds_for_halfwidth(sd, 0.02), vs.seeds_for_halfwidth(sd, 0.05)]
    assert table[0]["seeds"] > table[1]["seeds"]


@pytest.mark.parametrize("diffs", [DIFFS, [1, 2, 3, 4, 5], [-0.3, 0.1, 0.25, -0.05, 0.7, 0.45],
                                   [(-1) ** i * i ** 1.3 for i in range(1, 24)]])
def test_wilcoxon_exact_is_scipys(scipy_stats, diffs):
    got = vs.wilcoxon(diffs)
    want = scipy_stats.wilcoxon(diffs, method="exact")
    assert got["exact"] and got["p"] == pytest.approx(want.pvalue, rel=1e-12)
    assert min(got["w"], got["n"] * (got["n"] + 1) / 2 - got["w"]) == want.statistic


def test_wilcoxon_with_ties_and_zeros_is_scipys_normal_approximation(scipy_stats):
    diffs = [1, 1, -2, 3, 0, 4, -1, 2, 2, 5]
    got = vs.wilcoxon(diffs)
    want = scipy_stats.wilcoxon(diffs, zero_method="wilcox", correction=False, method="approx")
    assert not got["exact"] and got["n"] == 9 and got["p"] == pytest.approx(want.pvalue, rel=1e-9)


def test_wilcoxon_closed_forms():
    assert vs.wilcoxon([1, 2, 3])["p"] == pytest.approx(2 / 8)  # all positive: 1 of 2^3 patterns per tail
    assert vs.wilcoxon([-1, 2])["p"] == 1.0
    assert math.isnan(vs.wilcoxon([0, 0])["p"])


@pytest.mark.parametrize("diffs", [DIFFS, [1, 2, 3, 4, 5, 6, 7, -1], [0, 0, 3, -2, 5], [-1] * 9, [2, -3]])
def test_sign_test_is_scipys_binomtest(scipy_stats, diffs):
    got = vs.sign_test(diffs)
    nonzero = [d for d in diffs if d != 0]
    k = sum(d > 0 for d in nonzero)
    assert got["n"] == len(nonzero) and got["positive"] == k
    assert got["p"] == pytest.approx(scipy_stats.binomtest(k, len(nonzero), 0.5).pvalue, rel=1e-12)


def test_sign_test_closed_forms():
    assert vs.sign_test([1.0] * 5)["p"] == pytest.approx(2 / 32)  # all 5 one way: 2·(1/2)^5
    assert vs.sign_test([1, -1])["p"] == 1.0
    assert math.isnan(vs.sign_test([0, 0])["p"])
    # issue 32's figures: 5 of 16 seeds won: 2·P(X ≤ 5), X ~ Bin(16, 1/2) = 2·6885/65536
    assert vs.sign_test([1] * 5 + [-1] * 11)["p"] == pytest.approx(2 * 6885 / 65536)


def test_holm_closed_form():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 times 5, 4, 3, 2, 1: 0.025, 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.5
    assert vs.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    assert vs.holm([0.038, 0.2, 0.9, 0.6, 0.03])[0] == pytest.approx(min(1, 4 * 0.038))
    assert vs.holm([0.9, 0.8]) == [1.0, 1.0] and vs.holm([]) == []
    out = vs.holm([math.nan, 0.01, 0.02])
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.02, 0.02])
