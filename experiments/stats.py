"""experiments/stats.py: the statistics of the tables, in float64 with the standard library alone.

Owns: the regularized incomplete beta function, Student's t p-value, the paired and Welch t-tests, the mean and
sample standard deviation (n - 1) over seeds (``spread``, ``stat``) and curves pooled over seeds.
Does not own: rank correlations (metrics.py) or any model.
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
