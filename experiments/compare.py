"""experiments/compare.py: one comparison of two runs' answers under the true score, and its table cells.

Owns: compare (win/tie/lose pooled over seeds, per seed, and a paired t-test of the mean true score) and the
Markdown cells of such a comparison.
Does not own: the judging itself (judge.exact_records / exact_summary), the runs (context.py).
"""

from base import embedded
from base.common import num, pct
from experiments.markdown import pvalue
from experiments.stats import spread, t_test
from mtbench import judge

RATES = tuple(k + "_rate" for k in judge.OUTCOMES)  # win_rate, tie_rate, lose_rate


def compare(ctx, run_a, run_b, label_a, label_b):
    """Win/tie/lose of run_a's answers against run_b's under the true score: pooled over seeds (the
    table's cell), per seed, and a paired t-test over seeds of the mean true score of the answers.

    The cell's rates are pooled over every seed's games; each rate's "_std" (the ± of the tables) is the sample
    standard deviation (n - 1) of the per-seed rates, as every ± of the tables is one over seeds."""
    identity = {"model_a": label_a, "model_b": label_b, "judge": "true score (embedded.embedded_score)"}
    per_seed, pooled, lacking = [], [], {"answers_a": 0, "answers_b": 0}
    for seed in ctx.seeds:
        records, missing = judge.exact_records(ctx.questions, ctx.answers(seed, run_a), ctx.answers(seed, run_b),
                                                  embedded.embedded_score)
        summary = judge.exact_summary(records, identity, "embedded-test", missing)
        per_seed.append({"seed": seed, **{k: summary[k] for k in (
            *RATES, "score_a_mean", "score_b_mean", "games", "decided")}})
        pooled += records
        lacking = {side: lacking[side] + missing[side] for side in lacking}
    cell = judge.exact_summary(pooled, identity, "embedded-test", lacking)
    test = t_test([s["score_a_mean"] for s in per_seed], [s["score_b_mean"] for s in per_seed])
    for key in RATES:
        cell[key + "_std"] = spread([s[key] for s in per_seed])[1]
    cell.update(per_seed=per_seed, score_t=test["t"], score_df=test["df"], score_p=test["p"])
    return cell


def rate_cells(cell):
    return [pct(cell[k + "_rate"], cell.get(k + "_rate_std")) for k in judge.OUTCOMES]


COMPARE_HEADERS = ["Win Rate", "Tie Rate", "Lose Rate", "mean true score (A / B)", "p (score, paired t)"]


def compare_cells(cell):
    return rate_cells(cell) + [f"{num(cell['score_a_mean'])} / {num(cell['score_b_mean'])}", pvalue(cell["score_p"])]
