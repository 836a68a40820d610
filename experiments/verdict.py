"""experiments/verdict.py: the verdict (issues 25, 32): Sr-DPO and Sr-IPO against baselines whose β is tuned on
validation prompts, and controls for what the prompt p says; per comparison the paired 95% t-interval over seeds,
Wilcoxon's and the sign test's p, and the t-test's p Holm-adjusted within its family (the main comparisons; the
controls); the verdict words of ``verdict``; the paper's numbers beside, never a threshold; the Δ_naive identity
(two runs that are the same loss up to a gradient factor) first, as the noise floor
(`python -m experiments verdict`)."""

import dataclasses
import json
import math

from base import defaults, embedded
from base.common import num
from experiments.context import NotTrained, Run, baseline_run, sr_run
from experiments.jobs import prepare
from experiments.markdown import markdown_table, pvalue
from experiments.stats import holm, paired_interval, seeds_for_halfwidth, sign_test, spread, wilcoxon

TITLE = "The verdict: Sr against tuned baselines, and what the prompt does"
BETA = defaults.BETA  # the paper's β, where the prompt controls run
# The paper's win − lose (points, GPT-4 judge, Pythia 2.8B on HH-RLHF): Table 2 (MT-Bench, Vicuna-Bench), Table 4.
PAPER = {"sr-dpo": (45.62 - 20.62, 63.75 - 22.50), "sr-ipo": (38.75 - 26.25, 60.00 - 31.25),
         "naive": (38.75 - 19.37, None)}
CONTROL_NAMES = {"neutral": "Sr-DPO, neutral text", "opposite": "Sr-DPO, opposite prompt",
                 "naive": "Sr-DPO, Δ_naive (no text)"}
POWER_HALFWIDTHS = (5, 10, 25)  # points of win − lose
# The smallest effect the power analysis planned for (docs/verdict.md §3: a 95% half-width of 25 points of win − lose,
# reachable at 9-14 seeds; the verdict's 16 seeds plan ±23): an interval below it is "not detected".
PLANNED_EFFECT = 25.0
ALPHA = 0.05  # of the Holm-adjusted paired t-test
MAIN_ROWS = 5  # result_of's first comparisons after the noise floor: one Holm family; the controls are another


def beta_run(loss, beta, validate=False):
    """loss at β (its folder gets "-bβ" unless β is the paper's, where it is the other claims' run)."""
    base = baseline_run(loss) if loss in ("dpo", "ipo") else sr_run(loss)
    if beta == BETA:
        return dataclasses.replace(base, validate=validate)
    return Run(f"{base.name}-b{beta:g}", loss, base.flags + ("--beta", f"{beta:g}"), validate)


def control_run(control):
    """Sr-DPO at the paper's β and λ with a prompt control: a srpo.REFINE_PROMPTS text, or "naive" (Δ_naive)."""
    return sr_run("sr-dpo", refine="naive") if control == "naive" else sr_run("sr-dpo", refine_prompt=control)


def scores(ctx, seed, run, split="test"):
    """The true score of each of the run's answers to the split's prompts, in question order."""
    questions = ctx.questions if split == "test" else ctx.validation_questions()
    found = ctx.answers(seed, run, split)
    return [embedded.embedded_score(q["turns"][0], found[json.dumps(q["question_id"])].turns[0]) for q in questions]


def have(ctx, seed, runs, split="test"):
    """Whether every run of the seed is trained (always, training it, unless ctx.train_nothing: --finished)."""
    try:
        for run in runs:
            scores(ctx, seed, run, split)
    except NotTrained:
        return False
    return True


def mean(values):
    return sum(values) / len(values)


def choose_beta(ctx, loss):
    """loss's β chosen on the validation prompts by 2-fold cross-fitting over seeds: a seed gets the β with the
    highest mean validation score over the seeds of the other parity (all seeds when there are none); ties go to
    the paper's β, then the smaller β. Only seeds with the whole β sweep choose. Also the validation score of each
    β and the β all seeds would pick; per_seed has None where no seed could choose."""
    betas = ctx.size.verdict_betas
    sweep = [beta_run(loss, b, True) for b in betas]
    choosers = [s for s in ctx.seeds if have(ctx, s, sweep, "valid")]
    valid = {b: {s: mean(scores(ctx, s, beta_run(loss, b, True), "valid")) for s in choosers} for b in betas}

    def pick(seeds):
        if not seeds:
            return None
        return max(betas, key=lambda b: (mean([valid[b][s] for s in seeds]), b == BETA, -b))

    folds = {parity: [s for s in choosers if s % 2 != parity] or choosers for parity in (0, 1)}
    return {"validation": {f"{b:g}": {"mean": spread(list(v.values()))[0], "std": spread(list(v.values()))[1],
                                      "per_seed": v} for b, v in valid.items()},
            "choosers": choosers, "even_seeds_get": pick(folds[0]), "odd_seeds_get": pick(folds[1]),
            "all_seeds_pick": pick(choosers), "per_seed": {str(s): pick(folds[s % 2]) for s in ctx.seeds}}


def summary(diffs):
    """A paired difference over seeds: the t-interval, Wilcoxon's and the sign test's p, the seeds won, tied, lost."""
    iv = paired_interval(diffs) if diffs else {"n": 0, "mean": math.nan, "p": math.nan}
    return {**iv, "wilcoxon_p": wilcoxon(diffs)["p"], "sign_p": sign_test(diffs)["p"], "won": sum(d > 0 for d in diffs),
            "tied": sum(d == 0 for d in diffs), "lost": sum(d < 0 for d in diffs), "per_seed": list(diffs)}


def verdict(iv, adjusted_p, direction, floor=None, planned=PLANNED_EFFECT):
    """The verdict words of a comparison (win − lose over seeds), the paper's numbers playing no part:
    reproduced: the Holm-adjusted paired t-test rejects 0 (adjusted_p < ALPHA) and the mean lies in the paper's
    direction; reversed: it rejects 0 the other way; not detected: it does not, and the 95% interval excludes an
    effect of `planned` points in the paper's direction (the smallest the power analysis planned for); else
    inconclusive. A rejection whose mean is smaller than the noise floor (`floor`, points) is inconclusive too.
    direction 0: an identity that predicts 0 (consistent when the interval covers 0)."""
    low, high, mean = iv.get("low", math.nan), iv.get("high", math.nan), iv.get("mean", math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive (no interval)"
    if direction == 0:
        return "consistent (covers 0)" if low <= 0 <= high else "not consistent (excludes 0)"
    low, high, mean = (low, high, mean) if direction > 0 else (-high, -low, -mean)
    if adjusted_p is not None and adjusted_p < ALPHA:
        if floor is not None and abs(mean) < floor:
            return "inconclusive (within the noise floor)"
        return "reproduced" if mean > 0 else "reversed"
    if high < planned:
        return "not detected"
    return "inconclusive"


def noise_floor(row):
    """The noise floor in points of win − lose: the largest |difference| the identity row's 95% interval allows
    between runs that are the same loss up to a gradient factor; None without such a row."""
    if row is None or not math.isfinite(row["winlose"].get("low", math.nan)):
        return None
    return max(abs(row["winlose"]["low"]), abs(row["winlose"]["high"]))


def judge(rows):
    """Each row's Holm-adjusted p (within its family: the MAIN_ROWS main comparisons; the controls) and verdict,
    against the noise floor of the identity row (direction 0) where there is one. Changes rows in place."""
    floor = noise_floor(next((r for r in rows if r["direction"] == 0), None))
    tested = [r for r in rows if r["direction"] != 0]
    for family in (tested[:MAIN_ROWS], tested[MAIN_ROWS:]):
        for r, p in zip(family, holm([r["winlose"]["p"] for r in family])):
            r["winlose"]["holm_p"] = p
    for r in rows:
        r["verdict"] = verdict(r["winlose"], r["winlose"].get("holm_p"), r["direction"], floor)
    return floor


def paired(ctx, label, runs_a, runs_b, paper=(None, None), direction=1, note=""):
    """runs_a against runs_b ({seed: Run}), seed by seed on the test prompts (over the seeds that have both): the
    difference of mean true score and win − lose in points (win: a's answer scores higher than b's to the same
    prompt), with the verdict."""
    per_seed = []
    for seed in ctx.seeds:
        if runs_a.get(seed) is None or runs_b.get(seed) is None or not have(ctx, seed, [runs_a[seed], runs_b[seed]]):
            continue
        a, b = scores(ctx, seed, runs_a[seed]), scores(ctx, seed, runs_b[seed])
        per_seed.append({"seed": seed, "run_a": runs_a[seed].name, "run_b": runs_b[seed].name,
                         "score_a": mean(a), "score_b": mean(b), "win": sum(x > y for x, y in zip(a, b)) / len(a),
                         "lose": sum(x < y for x, y in zip(a, b)) / len(a)})
    score = summary([e["score_a"] - e["score_b"] for e in per_seed])
    winlose = summary([100 * (e["win"] - e["lose"]) for e in per_seed])
    return {"comparison": label, "paper_mt_bench": paper[0], "paper_vicuna_bench": paper[1], "direction": direction,
            "note": note, "seeds": [e["seed"] for e in per_seed], "score": score, "winlose": winlose,
            "per_seed": per_seed}


def restate(result):
    """A verdict result written before issue 32's statistics (no sign test, no Holm p, the identity row last), with
    each row's summaries recomputed from its per-seed numbers, the identity row moved first as the noise floor, and
    the verdict words of ``judge``: the same runs, today's statistics. A result that has them is returned as is."""
    rows = result["rows"]
    if all("sign_p" in r["winlose"] for r in rows):
        return result
    out = []
    for r in rows:
        r = dict(r, score=summary([e["score_a"] - e["score_b"] for e in r["per_seed"]]),
                 winlose=summary([100 * (e["win"] - e["lose"]) for e in r["per_seed"]]))
        if r["direction"] == 0 and not r["comparison"].startswith("noise floor"):
            r["comparison"] = "noise floor: " + r["comparison"]
        out.append(r)
    out.sort(key=lambda r: r["direction"] != 0)  # stable: the identity row first, the rest in their order
    floor = judge(out)
    return dict(result, rows=out, noise_floor=floor, planned_effect=PLANNED_EFFECT,
                restated="statistics and verdict words recomputed from the per-seed numbers of this result by "
                         "verdict.restate (issue 32); its runs are those of the original result")


def tiers(ctx):
    """The runs of every seed, most wanted first: (1) the four methods at the paper's β; (2) the prompt controls
    and DPO at β(1 − λ) (the Δ_naive identity); (3) the rest of the baselines' β sweep. Baselines answer the
    validation prompts too."""
    s, lam_beta = ctx.size, BETA * (1 - defaults.LAM)
    first = [beta_run(loss, BETA, loss in ("dpo", "ipo")) for loss in ("dpo", "ipo", "sr-dpo", "sr-ipo")]
    second = [control_run(c) for c in s.verdict_controls] + (
        [beta_run("dpo", lam_beta, True)] if lam_beta in s.verdict_betas and "naive" in s.verdict_controls else [])
    third = [beta_run(loss, b, True) for loss in ("dpo", "ipo") for b in s.verdict_betas
             if beta_run(loss, b, True) not in first + second]
    return [first, second, third]


def tuned_runs(ctx, chosen):
    """{loss: {seed: loss at the β chosen for the seed's baseline}} for the baselines and Sr (None: no choice)."""
    return {loss: {seed: None if chosen[base]["per_seed"][str(seed)] is None
                   else beta_run(loss, chosen[base]["per_seed"][str(seed)]) for seed in ctx.seeds}
            for base in ("dpo", "ipo") for loss in (base, "sr-" + base)}


def result_of(ctx):
    """The comparisons over ctx.seeds (each over the seeds that have its runs)."""
    s, seeds = ctx.size, ctx.seeds
    chosen = {loss: choose_beta(ctx, loss) for loss in ("dpo", "ipo")}
    tuned = tuned_runs(ctx, chosen)
    at = {loss: {seed: beta_run(loss, BETA) for seed in seeds} for loss in ("dpo", "ipo", "sr-dpo", "sr-ipo")}
    rows = [paired(ctx, "Sr-DPO vs DPO, both at DPO's tuned β", tuned["sr-dpo"], tuned["dpo"], PAPER["sr-dpo"],
                   note="β chosen for DPO on validation prompts (cross-fitted); Sr-DPO run at that β"),
            paired(ctx, "Sr-IPO vs IPO, both at IPO's tuned β", tuned["sr-ipo"], tuned["ipo"], PAPER["sr-ipo"],
                   note="β chosen for IPO on validation prompts (cross-fitted); Sr-IPO run at that β"),
            paired(ctx, f"Sr-DPO vs DPO, β {BETA:g}", at["sr-dpo"], at["dpo"], PAPER["sr-dpo"], note="the paper's β"),
            paired(ctx, f"Sr-IPO vs IPO, β {BETA:g}", at["sr-ipo"], at["ipo"], PAPER["sr-ipo"], note="the paper's β"),
            paired(ctx, f"Sr-DPO (β {BETA:g}) vs DPO at its tuned β", at["sr-dpo"], tuned["dpo"], PAPER["sr-dpo"],
                   note="the reviewers' untuned-baseline question")]
    for control in s.verdict_controls:
        runs = {seed: control_run(control) for seed in seeds}
        rows.append(paired(ctx, f"{CONTROL_NAMES[control]} vs p (β {BETA:g})", runs, at["sr-dpo"],
                           direction=-1, note="the paper's reading: p's content matters, so a control does worse"))
    if "naive" in s.verdict_controls:
        naive = {seed: control_run("naive") for seed in seeds}
        rows.append(paired(ctx, f"Sr-DPO-naive (β {BETA:g}, λ {defaults.LAM:g}) vs DPO, β {BETA:g}", naive,
                           at["dpo"], PAPER["naive"], note="Table 4's Δ_naive row"))
        identity_beta = BETA * (1 - defaults.LAM)
        if identity_beta in s.verdict_betas:  # the noise floor: first
            rows.insert(0, paired(ctx, f"noise floor: Sr-DPO-naive (β {BETA:g}, λ {defaults.LAM:g}) vs DPO, "
                                       f"β {identity_beta:g}", naive,
                                  {seed: beta_run("dpo", identity_beta) for seed in seeds}, direction=0,
                                  note="docs/verdict.md §1: the same loss up to a gradient factor; predicts 0"))
    floor = judge(rows)
    main = [r for r in rows if r["direction"] != 0][:MAIN_ROWS]
    power = [{"comparison": r["comparison"], "sd": r["winlose"].get("sd", math.nan),
              "seeds": {f"{w:g}": (seeds_for_halfwidth(r["winlose"]["sd"], w)
                                   if math.isfinite(r["winlose"].get("sd", math.nan)) else None)
                        for w in POWER_HALFWIDTHS}} for r in main[2:4]]
    return {"seeds": list(seeds), "betas": list(s.verdict_betas), "controls": list(s.verdict_controls),
            "noise_floor": floor, "planned_effect": PLANNED_EFFECT,
            "validation_prompts": len(ctx.validation_questions()), "chosen": chosen, "rows": rows, "power": power,
            "complete": all(len(r["seeds"]) == len(seeds) for r in rows)}


def run(ctx):
    """size.verdict_seeds seeds, in tiers (tiers()): each tier for every seed, then Sr at the β cross-fitting chose
    for its baseline; the results so far written after each tier (a cut-off run resumes when run again; with
    --finished it reports from the runs trained so far, each comparison over the seeds that have its runs)."""
    ctx = ctx.variant(0.0, range(ctx.size.verdict_seeds))
    if not ctx.train_nothing:
        step = max(2, ctx.jobs)
        for i, tier in enumerate(tiers(ctx)):
            waves = [ctx.seeds[k:k + step] for k in range(0, len(ctx.seeds), step)] if i == 0 else [ctx.seeds]
            for wave in waves:  # tier 1 seeds a wave at a time: SFT models and their runs, so that seeds finish
                prepare(ctx, [(0.0, wave, tier)])
                ctx.interim(dict(finished(ctx), partial=f"tier {i + 1} of 3 trained up to seed {wave[-1]}; "
                                                        "then the other tiers and Sr at the tuned β"))
        chosen = {loss: choose_beta(ctx, loss) for loss in ("dpo", "ipo")}
        tuned = tuned_runs(ctx, chosen)
        prepare(ctx, [(0.0, [seed], [tuned[loss][seed] for loss in ("sr-dpo", "sr-ipo") if tuned[loss][seed]])
                      for seed in ctx.seeds])
    return result_of(ctx)


def finished(ctx):
    """result_of from the runs trained so far, training nothing."""
    before, ctx.train_nothing = ctx.train_nothing, True
    try:
        return result_of(ctx)
    finally:
        ctx.train_nothing = before


def interval_cell(st, fmt="+.1f"):
    if not math.isfinite(st.get("low", math.nan)):
        return num(st.get("mean", math.nan), fmt)
    return f"{num(st['mean'], fmt)} [{num(st['low'], fmt)}, {num(st['high'], fmt)}]"


def paper_cell(row):
    if row["direction"] == 0:
        return "0 (identity)"
    if row["paper_mt_bench"] is None:
        return "< 0 (implied)"
    return f"{row['paper_mt_bench']:+.1f}" + (f" / {row['paper_vicuna_bench']:+.1f}"
                                              if row["paper_vicuna_bench"] is not None else "")


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    result = restate(result)
    rows = result["rows"]
    table = markdown_table(
        ["comparison (A vs B)", "seeds", "miniature: win − lose, points [95% CI]", "mean true score A − B [95% CI]",
         "t p", "Holm p", "Wilcoxon p", "sign p", "seeds A won / tied / lost", "verdict",
         "paper, beside (GPT-4 win − lose, MT-Bench / Vicuna)"],
        [[r["comparison"], len(r["seeds"]), interval_cell(r["winlose"]), interval_cell(r["score"], "+.3f"),
          pvalue(r["winlose"]["p"]), pvalue(r["winlose"].get("holm_p")), pvalue(r["winlose"]["wilcoxon_p"]),
          pvalue(r["winlose"]["sign_p"]), f"{r['winlose']['won']} / {r['winlose']['tied']} / {r['winlose']['lost']}",
          f"**{r['verdict']}**", paper_cell(r)] for r in rows])
    betas = result["betas"]
    choice = markdown_table(
        ["baseline", "seeds choosing"] + [f"β {b:g}" for b in betas] + ["even seeds get", "odd seeds get",
                                                                        "all seeds pick"],
        [[loss.upper(), len(c["choosers"])] + [num(c["validation"][f"{b:g}"]["mean"],
                                                    std=c["validation"][f"{b:g}"]["std"]) for b in betas]
         + ["-" if c[k] is None else f"{c[k]:g}" for k in ("even_seeds_get", "odd_seeds_get", "all_seeds_pick")]
         for loss, c in result["chosen"].items()])
    power = markdown_table(["comparison", "SD of win − lose per seed"] + [f"seeds for ±{w}" for w in POWER_HALFWIDTHS],
                           [[p["comparison"], num(p["sd"], ".1f")] + [p["seeds"][f"{w:g}"] for w in POWER_HALFWIDTHS]
                            for p in result["power"]])
    n = len(result["seeds"])
    parts = [
        f"Paired over up to {n} seeds, each comparison over the seeds that have both its runs (a seed: one SFT "
        "model, data order and answer sampling shared by both sides). "
        f"Each cell: the mean over seeds of the per-seed difference, with its 95% t-interval; win − lose in points of "
        f"the test prompts' answers judged by their true score. "
        "t p: the paired t-test; Holm p: the same, Holm-adjusted within its family (the main comparisons; the "
        "controls); Wilcoxon p: the signed-rank test; sign p: the exact sign test on the seeds won and lost. "
        "Verdict (on win − lose): **reproduced** when the Holm-adjusted test rejects 0 (p < 0.05) in the paper's "
        "direction; **reversed** when it rejects 0 the other way; **not detected** when it does not and the 95% "
        f"interval excludes an effect of {PLANNED_EFFECT:g} points in the paper's direction (the smallest effect "
        "the power analysis planned for); else **inconclusive**; a rejection smaller than the noise floor "
        f"({'none measured' if result.get('noise_floor') is None else num(result['noise_floor'], '.1f') + ' points'}"
        ": the largest difference the first row's interval allows between runs that are the same loss up to a "
        "gradient factor) is inconclusive too. Controls: the paper's reading (p's content matters) implies that a "
        "control does worse than p. The paper's numbers (a GPT-4 judge on MT-Bench, Pythia 2.8B) stand beside the "
        "rows for reference; they share no scale with a true-score win rate on a copy task and decide nothing.",
        table,
        f"**β of the baselines**, chosen on {result['validation_prompts']} validation prompts "
        "(embedded_pairs(\"test\", seed=1): disjoint from the test and training prompts) by 2-fold cross-fitting "
        f"over seeds (even seeds get the β the odd seeds' validation answers pick, and vice versa); mean validation "
        f"true score ± SD over seeds. Sr at the tuned β runs at its baseline's chosen β (Sr's own β sweep was not "
        "run: it would double the runs).", choice,
        "**Power**: seeds a 95% half-width of win − lose would need, planned from this run's per-seed SD.", power,
        "A miniature verdict speaks for the miniature only (a tiny model on a copy task, judged by a true score). "
        "What would carry it to the paper's setting: the same design on a real model at scale (Pythia 2.8B on "
        "HH-RLHF, as the paper), judged by GPT-4 or a comparable judge on MT-Bench and Vicuna-Bench, with several "
        "seeds per method and the baselines' β tuned the same way."]
    if result.get("partial"):
        parts.insert(0, f"**Partial results**: {result['partial']}; the run goes on (or resumes when run again).")
    if result.get("restated"):
        parts.insert(0, f"**Restated**: {result['restated']}.")
    return parts


def plot(plt, result):
    """Forest plot: each comparison's paired 95% interval of win − lose (left) and of the mean true score
    (right); 0 and the paper's effect (MT-Bench x, Vicuna-Bench +) marked."""
    rows = restate(result)["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.6), sharey=True)
    ys = list(range(len(rows)))[::-1]
    for ax, key, unit in ((axes[0], "winlose", "win − lose, points (A vs B)"),
                          (axes[1], "score", "mean true score, A − B")):
        for y, r in zip(ys, rows):
            st = r[key]
            color = {"reproduced": "tab:green", "reversed": "tab:red"}.get(r["verdict"].split(" ")[0], "tab:gray")
            if math.isfinite(st.get("low", math.nan)):
                ax.plot([st["low"], st["high"]], [y, y], color=color, linewidth=2)
            ax.plot([st["mean"]], [y], "o", color=color)
            if key == "winlose":
                for value, marker, name in ((r["paper_mt_bench"], "x", "paper, MT-Bench"),
                                            (r["paper_vicuna_bench"], "+", "paper, Vicuna-Bench")):
                    if value is not None:
                        ax.plot([value], [y], marker, color="black", markersize=9,
                                label=name if y == ys[0] else None)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel(unit)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([r["comparison"] for r in rows], fontsize=8)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Paired 95% intervals over {len(result['seeds'])} seeds (green: reproduced, red: reversed, "
                 "gray: inconclusive)", fontsize=10)
    return fig
