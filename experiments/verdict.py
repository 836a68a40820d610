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
from experiments import premise, sizes
from experiments.context import LABELS, LOSSES, NotTrained, Run, baseline_run, sr_run
from experiments.jobs import prepare
from experiments.markdown import markdown_table, pvalue
from experiments.stats import holm, paired_interval, seeds_for_halfwidth, sign_test, spread, t_test, wilcoxon

TITLE = "The verdict: Sr against tuned baselines, and what the prompt does"
BETA = defaults.BETA  # the paper's β, where the prompt controls run
# The paper's win − lose (points, GPT-4 judge, Pythia 2.8B on HH-RLHF): Table 2 (MT-Bench, Vicuna-Bench), Table 4.
PAPER = {"sr-dpo": (45.62 - 20.62, 63.75 - 22.50), "sr-ipo": (38.75 - 26.25, 60.00 - 31.25),
         "naive": (38.75 - 19.37, None)}
CONTROL_NAMES = {"neutral": "Sr-DPO, neutral text", "opposite": "Sr-DPO, opposite prompt",
                 "naive": "Sr-DPO, Δ_naive (no text)"}
POWER_HALFWIDTHS = {"score": (0.005, 0.01, 0.02), "winlose": (5, 10, 25)}
# The verdict words are said on the primary metric, the expected true score (issue 32, item 2), and beside it on
# win − lose for comparability with Table 2. The smallest effect each was planned for (docs/verdict.md §6); an
# interval that excludes it in the paper's direction, without a rejection, is "not detected":
# score: 0.02, a tenth of what DPO gains over SFT in this regime (+0.196, experiments/results/default-noise-floor);
# win − lose: 10 points, the 95% half-width 8 seeds reach at a per-seed SD of 12 points (t(7) · 12 / √8 = 10).
PLANNED_EFFECT = {"score": 0.02, "winlose": 10.0}
PRIMARY = "score"
UNITS = {"score": ("mean true score A − B", "+.4f"), "winlose": ("win − lose, points", "+.1f")}
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
    """The expected true score of the run's answer to each of the split's prompts, in question order: the mean over
    its sampled answers (size.samples)."""
    questions = ctx.questions if split == "test" else ctx.validation_questions()
    found = ctx.answers(seed, run, split)
    return [mean([embedded.embedded_score(q["turns"][0], choice[0])
                  for choice in found[json.dumps(q["question_id"])].choices]) for q in questions]


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


def choose_beta(ctx, loss, betas):
    """loss's β chosen from betas on the validation prompts by 2-fold cross-fitting over seeds: a seed gets the β
    with the highest mean validation score over the seeds of the other parity (all seeds when there are none); ties
    go to the paper's β, then the smaller β. Only seeds with the whole β sweep choose. Also the validation score of
    each β and the β all seeds would pick; per_seed has None where no seed could choose."""
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
            "betas": list(betas), "choosers": choosers, "even_seeds_get": pick(folds[0]),
            "odd_seeds_get": pick(folds[1]),
            "all_seeds_pick": pick(choosers), "per_seed": {str(s): pick(folds[s % 2]) for s in ctx.seeds}}


def beta_grid(ctx, loss):
    """loss's β grid and choose_beta's result on it: size.verdict_betas, widened (the lower end halved, the upper
    doubled, at most size.verdict_widenings times each) while a fold's or all seeds' pick lies at an end, so that
    the optimum is interior. Each grid's runs are trained first (with validation answers) unless ctx.train_nothing,
    where the grid widens only as far as runs exist."""
    start, most = sorted(ctx.size.verdict_betas), ctx.size.verdict_widenings
    betas = list(start)
    while True:
        if not ctx.train_nothing:
            prepare(ctx, [(ctx.sft_q, ctx.seeds, [beta_run(loss, b, True) for b in betas])])
        chosen = choose_beta(ctx, loss, betas)
        picks = {chosen[k] for k in ("even_seeds_get", "odd_seeds_get", "all_seeds_pick")} - {None}
        wider = ([betas[0] / 2] if betas[0] in picks and sum(b < start[0] for b in betas) < most else []) + (
            [betas[-1] * 2] if betas[-1] in picks and sum(b > start[-1] for b in betas) < most else [])
        wider = wider if len(start) > 1 else []  # one β: nothing to tune
        if not wider or (ctx.train_nothing and not any(have(ctx, s, [beta_run(loss, b, True) for b in wider], "valid")
                                                       for s in ctx.seeds)):
            return betas, chosen
        betas = sorted(betas + wider)


def summary(diffs):
    """A paired difference over seeds: the t-interval, Wilcoxon's and the sign test's p, the seeds won, tied, lost."""
    iv = paired_interval(diffs) if diffs else {"n": 0, "mean": math.nan, "p": math.nan}
    return {**iv, "wilcoxon_p": wilcoxon(diffs)["p"], "sign_p": sign_test(diffs)["p"], "won": sum(d > 0 for d in diffs),
            "tied": sum(d == 0 for d in diffs), "lost": sum(d < 0 for d in diffs), "per_seed": list(diffs)}


def verdict(iv, adjusted_p, direction, floor=None, planned=PLANNED_EFFECT[PRIMARY]):
    """The verdict words of a comparison (one metric's paired summary over seeds), the paper's numbers playing no
    part:
    reproduced: the Holm-adjusted paired t-test rejects 0 (adjusted_p < ALPHA) and the mean lies in the paper's
    direction; reversed: it rejects 0 the other way; not detected: it does not, and the 95% interval excludes an
    effect of `planned` in the paper's direction (the smallest the power analysis planned for); else
    inconclusive. A rejection whose mean is smaller than the noise floor (`floor`, same unit) is inconclusive too.
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


def noise_floor(row, key=PRIMARY):
    """The noise floor of one metric (key "score" or "winlose"): the largest |difference| the identity row's 95%
    interval allows between runs that are the same loss up to a gradient factor; None without such a row."""
    if row is None or not math.isfinite(row[key].get("low", math.nan)):
        return None
    return max(abs(row[key]["low"]), abs(row[key]["high"]))


def judge(rows, primary=PRIMARY):
    """Each row's Holm-adjusted p per metric (within its family: the MAIN_ROWS main comparisons; the controls), its
    verdict on the primary metric ("verdict") and on the other ("verdict_" + its key), each against the noise floor
    of the identity row (direction 0) where there is one. Changes rows in place; returns {metric: floor}."""
    identity = next((r for r in rows if r["direction"] == 0), None)
    floors = {key: noise_floor(identity, key) for key in UNITS}
    tested = [r for r in rows if r["direction"] != 0]
    for key in UNITS:
        for family in (tested[:MAIN_ROWS], tested[MAIN_ROWS:]):
            for r, p in zip(family, holm([r[key]["p"] for r in family])):
                r[key]["holm_p"] = p
        for r in rows:
            r["verdict" if key == primary else "verdict_" + key] = verdict(
                r[key], r[key].get("holm_p"), r["direction"], floors[key], PLANNED_EFFECT[key])
    return floors


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
    """The result with each row's summaries recomputed from its per-seed numbers and judged again (``judge``): the
    same runs, today's statistics. A result from before issue 32's statistics (no "primary": its verdict words were
    said on win − lose, its identity row last) gets its identity row moved first as the noise floor, and says so."""
    primary = result.get("primary", "winlose")
    out = []
    for r in result["rows"]:
        r = dict(r, score=summary([e["score_a"] - e["score_b"] for e in r["per_seed"]]),
                 winlose=summary([100 * (e["win"] - e["lose"]) for e in r["per_seed"]]))
        if r["direction"] == 0 and not r["comparison"].startswith("noise floor"):
            r["comparison"] = "noise floor: " + r["comparison"]
        out.append(r)
    out.sort(key=lambda r: r["direction"] != 0)  # stable: the identity row first, the rest in their order
    floors = judge(out, primary)
    old = {} if "primary" in result else {
        "restated": "statistics and verdict words recomputed from the per-seed numbers of this result by "
                    "verdict.restate (issue 32); its runs are those of the original result"}
    return dict(result, rows=out, noise_floor=floors, primary=primary, planned_effect=PLANNED_EFFECT, **old)


def tiers(ctx):
    """The runs of every seed, most wanted first: (1) the four methods at the paper's β; (2) the prompt controls
    and DPO at β(1 − λ) (the Δ_naive identity: the noise floor). Runs at the paper's β answer the validation
    prompts too (they are on every method's β grid). beta_grid then trains the rest of each method's grid."""
    s, lam_beta = ctx.size, BETA * (1 - defaults.LAM)
    first = [beta_run(loss, BETA, True) for loss in LOSSES]
    second = [control_run(c) for c in s.verdict_controls] + (
        [beta_run("dpo", lam_beta, lam_beta in s.verdict_betas)] if "naive" in s.verdict_controls else [])
    return [first, second]


def tuned_runs(ctx, chosen):
    """{loss: {seed: loss at the β cross-fitting chose for it on the seed's other fold}} (None: no choice)."""
    return {loss: {seed: None if chosen[loss]["per_seed"][str(seed)] is None
                   else beta_run(loss, chosen[loss]["per_seed"][str(seed)]) for seed in ctx.seeds}
            for loss in LOSSES}


def grids(ctx):
    """{loss: (its β grid, choose_beta on it)} of the four methods (beta_grid)."""
    return {loss: beta_grid(ctx, loss) for loss in LOSSES}


def views(ctx):
    """The premise under each view, per seed (premise.view_table), and the paper's prediction checked: the opposite
    prompt reverses the SFT margin's order (mean Spearman < 0 where p's is > 0), and the neutral text carries no
    more than no text (a paired t-test of neutral − none over seeds does not find it larger, one-sided 5%)."""
    try:
        rows = premise.view_table(ctx)
    except NotTrained:
        return None
    mean_of = {view: {k: spread([r[view][k] for r in rows])[0] for k in ("accuracy", "spearman", "during")}
               for view in (*premise.VIEW_PROMPTS, "none")}
    neutral = t_test([r["neutral"]["spearman"] for r in rows], [r["none"]["spearman"] for r in rows])
    return {"rows": rows, "mean": mean_of, "neutral_minus_none": neutral,
            "opposite_reverses": bool(mean_of["opposite"]["spearman"] < 0 < mean_of["p"]["spearman"]),
            "neutral_no_more_than_none": not (neutral["mean_diff"] > 0 and neutral["p"] < 2 * ALPHA)}


def result_of(ctx, q_rule=None):
    """The comparisons over ctx.seeds (each over the seeds that have its runs)."""
    s, seeds = ctx.size, ctx.seeds
    grid = grids(ctx)
    chosen = {loss: c for loss, (_, c) in grid.items()}
    tuned = tuned_runs(ctx, chosen)
    at = {loss: {seed: beta_run(loss, BETA) for seed in seeds} for loss in LOSSES}
    rows = [paired(ctx, "Sr-DPO vs DPO, each at its own tuned β", tuned["sr-dpo"], tuned["dpo"], PAPER["sr-dpo"],
                   note="each method's β chosen on validation prompts (cross-fitted)"),
            paired(ctx, "Sr-IPO vs IPO, each at its own tuned β", tuned["sr-ipo"], tuned["ipo"], PAPER["sr-ipo"],
                   note="each method's β chosen on validation prompts (cross-fitted)"),
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
        rows.insert(0, paired(ctx, f"noise floor: Sr-DPO-naive (β {BETA:g}, λ {defaults.LAM:g}) vs DPO, "
                                   f"β {identity_beta:g}", naive,
                              {seed: beta_run("dpo", identity_beta) for seed in seeds}, direction=0,
                              note="docs/verdict.md §1: the same loss up to a gradient factor; predicts 0"))
    floors = judge(rows)
    main = [r for r in rows if r["direction"] != 0][:MAIN_ROWS]
    power = [{"comparison": r["comparison"], "metric": key, "sd": r[key].get("sd", math.nan),
              "seeds": {f"{w:g}": (seeds_for_halfwidth(r[key]["sd"], w) if math.isfinite(r[key].get("sd", math.nan))
                                   else None) for w in POWER_HALFWIDTHS[key]}} for key in UNITS for r in main[2:4]]
    return {"size": dataclasses.asdict(s), "seeds": list(seeds), "q": ctx.sft_q, "q_rule": q_rule,
            "betas": {loss: g for loss, (g, _) in grid.items()}, "controls": list(s.verdict_controls),
            "primary": PRIMARY, "noise_floor": floors, "planned_effect": PLANNED_EFFECT, "views": views(ctx),
            "validation_prompts": len(ctx.validation_questions()), "chosen": chosen, "rows": rows, "power": power,
            "complete": all(len(r["seeds"]) == len(seeds) for r in rows)}


def setting(ctx):
    """The verdict's context and how its q was chosen: the verdict's size (sizes.verdict_size), its seeds, SFT
    models at the q premise.choose_q picks from size.verdict_qs on validation pairs (q = 0 without a grid)."""
    size, seeds = sizes.verdict_size(ctx.size), list(range(ctx.size.verdict_seeds))
    if not size.verdict_qs:
        return ctx.variant(0.0, seeds, size), None
    q, means = premise.choose_q(ctx.variant(0.0, seeds, size), size.verdict_qs, seeds)
    return ctx.variant(q, seeds, size), {"rule": f"the smallest q > 0 whose SFT models' mean validation Spearman "
                                                  f"under p ⊕ x reaches {premise.Q_RULE:g}",
                                         "validation_spearman": {f"{k:g}": v for k, v in means.items()}}


def run(ctx):
    """size.verdict_seeds seeds in the verdict's setting (setting()), in tiers (tiers()): each tier for every seed,
    then each method's β grid (beta_grid); the results so far written after each tier (a cut-off run resumes when
    run again; with --finished it reports from the runs trained so far, each comparison over the seeds that have
    its runs)."""
    ctx, q_rule = setting(ctx)
    if not ctx.train_nothing:
        step = max(2, ctx.jobs)
        for i, tier in enumerate(tiers(ctx)):
            waves = [ctx.seeds[k:k + step] for k in range(0, len(ctx.seeds), step)] if i == 0 else [ctx.seeds]
            for wave in waves:  # tier 1 seeds a wave at a time: SFT models and their runs, so that seeds finish
                prepare(ctx, [(ctx.sft_q, wave, tier)])
                ctx.interim(dict(finished(ctx, q_rule), partial=f"tier {i + 1} of 2 trained up to seed {wave[-1]}; "
                                                           "then each method's β grid"))
    return result_of(ctx, q_rule)


def finished(ctx, q_rule=None):
    """result_of from the runs trained so far, training nothing."""
    before, ctx.train_nothing = ctx.train_nothing, True
    try:
        return result_of(ctx, q_rule)
    finally:
        ctx.train_nothing = before


def view_parts(views):
    """The premise table (per seed and view) and the paper's prediction, as paragraphs; none without views."""
    if not views:
        return []
    mean_of, neutral = views["mean"], views["neutral_minus_none"]
    return [
        "**The premise, per seed and view.** The SFT model's own margin log π(y+|·) − log π(y−|·) on the held-out "
        "test pairs under p ⊕ x, the neutral text, the opposite prompt (rating 1 out of 100) and x alone: the share "
        "of pairs it ranks right and its Spearman ρ with the true score gap; and Δ's mean Spearman with the true gap "
        "over the Sr-DPO run that refines with that view (Δπ under the text; Δ_naive with none; Δ is 0 before "
        "alignment, where π = π_ref).", premise.view_markdown(views["rows"]),
        "**The paper's prediction.** Under the opposite prompt the SFT margin's order should reverse: mean ρ "
        f"{num(mean_of['opposite']['spearman'], '+.3f')} against {num(mean_of['p']['spearman'], '+.3f')} under p: "
        f"{'it reverses' if views['opposite_reverses'] else 'it does not reverse'}. The neutral text should carry "
        f"no more than no text: ρ neutral − none {num(neutral['mean_diff'], '+.3f')} (paired t p "
        f"{pvalue(neutral['p'])}): {'holds' if views['neutral_no_more_than_none'] else 'fails'}. During the Sr-DPO "
        "runs Δ's mean ρ is " + ", ".join(f"{v} {num(mean_of[v]['during'], '+.3f')}" for v in mean_of) + "."]


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
    rows, primary = result["rows"], result["primary"]
    other = next(k for k in UNITS if k != primary)
    (unit, fmt), (other_unit, other_fmt) = UNITS[primary], UNITS[other]
    table = markdown_table(
        ["comparison (A vs B)", "seeds", f"{unit} [95% CI]", "t p", "Holm p", "Wilcoxon p", "sign p",
         "seeds A won / tied / lost", "verdict", f"miniature: {other_unit} [95% CI]", "Holm p", "verdict on it",
         "paper, beside (GPT-4 win − lose, MT-Bench / Vicuna)"],
        [[r["comparison"], len(r["seeds"]), interval_cell(r[primary], fmt), pvalue(r[primary]["p"]),
          pvalue(r[primary].get("holm_p")), pvalue(r[primary]["wilcoxon_p"]), pvalue(r[primary]["sign_p"]),
          f"{r[primary]['won']} / {r[primary]['tied']} / {r[primary]['lost']}", f"**{r['verdict']}**",
          interval_cell(r[other], other_fmt), pvalue(r[other].get("holm_p")), r["verdict_" + other], paper_cell(r)]
         for r in rows])
    grid = result["betas"] if isinstance(result["betas"], dict) else {k: result["betas"] for k in result["chosen"]}
    betas = sorted({b for g in grid.values() for b in g})
    choice = markdown_table(
        ["method", "seeds choosing"] + [f"β {b:g}" for b in betas] + ["even seeds get", "odd seeds get",
                                                                      "all seeds pick"],
        [[LABELS[loss], len(c["choosers"])] + [num(c["validation"][f"{b:g}"]["mean"],
                                                    std=c["validation"][f"{b:g}"]["std"])
                                                if f"{b:g}" in c["validation"] else "-" for b in betas]
         + ["-" if c[k] is None else f"{c[k]:g}" for k in ("even_seeds_get", "odd_seeds_get", "all_seeds_pick")]
         for loss, c in result["chosen"].items()])
    power = markdown_table(["comparison", "metric", "SD per seed", "seeds for a 95% half-width of"],
                           [[p["comparison"], UNITS[p.get("metric", "winlose")][0],
                             num(p["sd"], UNITS[p.get("metric", "winlose")][1].lstrip("+"))]
                            + [", ".join(f"±{w}: {n}" for w, n in p["seeds"].items())] for p in result["power"]])
    floors, planned = result["noise_floor"], result["planned_effect"]
    n = len(result["seeds"])
    regime = (f"**The setting.** SFT with a share q = {result['q']:g} of rated pairs (the paper's p with a rating, "
              "embedded_sft_pairs: the model reads p)" + (
                  f", q chosen before any alignment by a rule stated in advance ({result['q_rule']['rule']}; "
                  "mean validation Spearman per q tried: " + ", ".join(
                      f"q {k}: {num(v, '.3f')}" for k, v in result["q_rule"]["validation_spearman"].items()) + ")"
                  if result.get("q_rule") else "") +
              f"; alignment at lr {result['config']['lr']:g} for {result['config']['steps']} steps (whether identical "
              f"runs agree there: the first row); each answer's score the expected true score, the mean of "
              f"{result['config']['samples']} sampled "
              "answers per prompt (win − lose compares these means prompt by prompt).") if "q" in result else None
    parts = [*([regime] if regime else []),
        f"Paired over up to {n} seeds, each comparison over the seeds that have both its runs (a seed: one SFT "
        "model, data order and answer sampling shared by both sides). "
        f"Each cell: the mean over seeds of the per-seed difference, with its 95% t-interval: the {unit} over the "
        f"test prompts (the primary metric), and beside it the {other_unit} (a game per prompt, judged by the "
        "true score). t p: the paired t-test; Holm p: the same, Holm-adjusted within its family (the main "
        "comparisons; the controls); Wilcoxon p: the signed-rank test; sign p: the exact sign test on the seeds "
        f"won and lost. Verdict (on the {unit}; beside it the same rule on the {other_unit}): **reproduced** when "
        "the Holm-adjusted test rejects 0 (p < 0.05) in the paper's direction; **reversed** when it rejects 0 the "
        "other way; **not detected** when it does not and the 95% interval excludes an effect of "
        f"{num(planned[primary], fmt.lstrip('+'))} ({num(planned[other], other_fmt.lstrip('+'))} in {other_unit}) "
        "in the paper's direction (the smallest effect the power analysis planned for); else **inconclusive**; a "
        "rejection smaller than the noise floor (" + ", ".join(
            f"{UNITS[k][0]} {'none measured' if floors.get(k) is None else num(floors[k], UNITS[k][1].lstrip('+'))}"
            for k in (primary, other)) + ": the largest difference the first row's interval allows between runs "
        "that are the same loss up to a gradient factor) is inconclusive too. Controls: the paper's reading (p's "
        "content matters) implies that a control does worse than p. The paper's numbers (a GPT-4 judge on "
        "MT-Bench, Pythia 2.8B) stand beside the rows for reference; they share no scale with a true score on a "
        "copy task and decide nothing.",
        table,
        f"**β of the baselines**, chosen on {result['validation_prompts']} validation prompts "
        "(embedded_pairs(\"test\", seed=1): disjoint from the test and training prompts) by 2-fold cross-fitting "
        f"over seeds (even seeds get the β the odd seeds' validation answers pick, and vice versa); mean validation "
        f"true score ± SD over seeds. Each method has its own grid, widened until its optimum is interior "
        f"(at most {result['config'].get('verdict_widenings', 4)} halvings or doublings; '-': not on that "
        "method's grid)." if isinstance(
            result["betas"], dict) else "**β of the baselines** (Sr at the tuned β ran at its baseline's β).",
        choice,
        "**Power**: seeds a 95% half-width would need, planned from this run's per-seed SD.", power,
        *view_parts(result.get("views")),
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
