"""experiments/stats.py: the statistics of the tables, in float64 with the standard library alone.

Owns: the regularized incomplete beta function, Student's t p-value and quantile, the paired and Welch t-tests, paired
t-intervals and the seeds a half-width needs, Wilcoxon's signed-rank test, the sign test, Holm's adjustment, the
mean and sample standard deviation (n - 1) over seeds (``spread``, ``stat``) and curves pooled over seeds.
Does not own: rank correlations (training/metrics.py) or any model.
"""

import math


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1.

    Continued fraction (modified Lentz), on the side of x where it converges fast; float64.
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc: need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if not df > 0 or math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def _mean_var(values):
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan)


def t_test(a, b, paired=True):
    """Two-sided t-test of mean(a) against mean(b): paired (a[i], b[i] from the same seed) or Welch's.

    Shape: a, b sequences of floats (equally long when paired). Returns {"t", "df", "p", "mean_diff"};
    p is nan with fewer than two values a side (or no variance at all), 0 when the differences are
    all equal and non-zero.
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if paired and len(a) != len(b):
        raise ValueError(f"t_test: paired samples differ in length ({len(a)} and {len(b)})")
    if paired:
        mean, var = _mean_var([x - y for x, y in zip(a, b)])
        se2, df = var / len(a), len(a) - 1.0
    else:
        (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
        mean, se2 = ma - mb, va / len(a) + vb / len(b)
        df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1)) \
            if se2 > 0 else len(a) + len(b) - 2.0  # Welch-Satterthwaite
    if min(len(a), len(b)) < 2 or math.isnan(se2) or (se2 == 0 and mean == 0):
        return {"t": math.nan, "df": df, "p": math.nan, "mean_diff": mean}
    t = math.copysign(math.inf, mean) if se2 == 0 else mean / math.sqrt(se2)
    return {"t": t, "df": df, "p": t_two_sided_p(t, df), "mean_diff": mean}


def spread(values):
    """Mean and sample standard deviation (n - 1) of the finite values; nan where undefined."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean, var = _mean_var(values)
    return mean, math.sqrt(var) if len(values) > 1 else math.nan


def stat(values):
    """{"mean", "std", "per_seed"} of one value per seed (``spread``)."""
    mean, std = spread(values)
    return {"mean": mean, "std": std, "per_seed": list(values)}


def pooled_curves(per_seed):
    """{key: [{"pairs", "mean", "std", "per_seed"}]} from {seed: {key: [(pairs, value)]}}."""
    out = {}
    seeds = sorted(per_seed)
    for key in per_seed[seeds[0]]:
        points = sorted({x for seed in seeds for x, _ in per_seed[seed][key]})
        out[key] = []
        for x in points:
            values = [dict(per_seed[seed][key]).get(x) for seed in seeds]
            mean, std = spread(values)
            out[key].append({"pairs": x, "mean": mean, "std": std, "per_seed": values})
    return out


def t_quantile(q, df):
    """The q-quantile of Student's t with df degrees of freedom (0 < q < 1), by bisection on ``t_two_sided_p``."""
    if not (0 < q < 1 and df > 0):
        raise ValueError(f"t_quantile: need 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    tail = 2 * min(q, 1 - q)  # two-sided p of the |t| wanted
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_p(mid, df) > tail:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    t = (low + high) / 2
    return t if q > 0.5 else -t


def paired_interval(diffs, confidence=0.95):
    """The mean of per-seed paired differences (method − baseline, same seed) and its t-interval.

    diffs: finite numbers, one per seed. Returns {"n", "mean", "sd", "halfwidth", "low", "high", "t", "p"}: sd is
    the sample SD (n − 1), halfwidth t_{(1+confidence)/2, n-1}·sd/√n, p the paired t-test's (one-sample test of
    mean 0); nan where n < 2, and t, p nan where sd and the mean are both 0.
    """
    diffs = [float(d) for d in diffs]
    if not diffs or not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"paired_interval: need finite differences, got {diffs}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_interval: confidence {confidence} is not in (0, 1)")
    n = len(diffs)
    mean, var = _mean_var(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "halfwidth": math.nan, "low": math.nan, "high": math.nan,
                "t": math.nan, "p": math.nan}
    sd = math.sqrt(var)
    se = sd / math.sqrt(n)
    half = t_quantile((1 + confidence) / 2, n - 1) * se
    if se > 0:
        t = mean / se
        p = t_two_sided_p(t, n - 1)
    else:
        t, p = (math.nan, math.nan) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    return {"n": n, "mean": mean, "sd": sd, "halfwidth": half, "low": mean - half, "high": mean + half,
            "t": t, "p": p}


def halfwidth(sd, n, confidence=0.95):
    """The t-interval half-width t_{(1+confidence)/2, n-1}·sd/√n of a mean of n paired differences."""
    return math.inf if n < 2 else t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)


MAX_SEEDS = 10_000_000  # seeds_for_halfwidth's search bound: beyond it the answer is "impractical" anyway


def seeds_for_halfwidth(sd, wanted, confidence=0.95):
    """The fewest seeds n ≥ 2 with halfwidth(sd, n, confidence) ≤ wanted; None beyond MAX_SEEDS.

    sd: the SD of one seed's paired difference (a planning value); wanted > 0 in the same unit. The half-width
    falls monotonically in n: doubling, then bisection.
    """
    if not (sd >= 0 and math.isfinite(sd)):
        raise ValueError(f"seeds_for_halfwidth: sd {sd} must be finite and >= 0")
    if not wanted > 0:
        raise ValueError(f"seeds_for_halfwidth: halfwidth {wanted} must be > 0")
    if sd == 0:
        return 2
    low, high = 1, 2  # halfwidth(low) > wanted; search for high with halfwidth(high) <= wanted
    while halfwidth(sd, high, confidence) > wanted:
        low, high = high, high * 2
        if high >= MAX_SEEDS:
            if halfwidth(sd, MAX_SEEDS, confidence) > wanted:
                return None
            high = MAX_SEEDS
            break
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


def wilcoxon(diffs):
    """Wilcoxon's signed-rank test of per-seed differences against 0, two-sided: {"n", "w", "p", "exact"}.

    Zeros are dropped (Wilcoxon's convention); w is the sum of the ranks of the positive differences (ties get
    their mean rank). p is exact (the distribution of the rank sum over the 2^n sign patterns) when no |d| ties
    and n ≤ 50, else the normal approximation with the tie correction and no continuity correction
    (scipy.stats.wilcoxon's method="approx").
    """
    d = [float(x) for x in diffs if x != 0]
    n = len(d)
    if n == 0:
        return {"n": 0, "w": math.nan, "p": math.nan, "exact": False}
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks, i, ties = [0.0] * n, 0, []
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        ties.append(j - i + 1)
        i = j + 1
    w = sum(r for r, x in zip(ranks, d) if x > 0)
    total = n * (n + 1) / 2
    if max(ties) == 1 and n <= 50:
        counts = [1] + [0] * int(total)  # counts[s]: sign patterns whose positive ranks sum to s
        for r in range(1, n + 1):
            for s in range(int(total), r - 1, -1):
                counts[s] += counts[s - r]
        low = min(w, total - w)
        p = min(1.0, 2 * sum(counts[:int(low) + 1]) / 2 ** n)
        return {"n": n, "w": w, "p": p, "exact": True}
    var = n * (n + 1) * (2 * n + 1) / 24 - sum(t ** 3 - t for t in ties) / 48
    z = (w - total / 2) / math.sqrt(var) if var > 0 else math.nan
    return {"n": n, "w": w, "p": math.erfc(abs(z) / math.sqrt(2)), "exact": False}


def sign_test(diffs):
    """The two-sided exact sign test of per-seed differences against 0: {"n", "positive", "p"}.

    Zeros are dropped; p = min(1, 2·P(X ≤ min(k, n − k))) for X ~ Binomial(n, 1/2), k the positive differences
    (scipy.stats.binomtest(k, n).pvalue); nan when every difference is 0.
    """
    d = [float(x) for x in diffs if x != 0]
    n, k = len(d), sum(x > 0 for x in d)
    if n == 0:
        return {"n": 0, "positive": 0, "p": math.nan}
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return {"n": n, "positive": k, "p": min(1.0, 2 * tail)}


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest of m gets
    max over j ≤ i of min(1, (m − j + 1)·p_(j)). nan p-values are left out of m and stay nan."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and math.isfinite(p))
    m, out, running = len(finite), [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
