"""experiments/premise.py: the premise: when does self-refinement help? SFT made quality-aware with a share q
of rated pairs, then the methods; at the q where Δπ is most informative, the λ curve, Figure 1, Table 4 and the
corollary beside q = 0 (`python -m experiments premise`)."""

import math

from base.common import num, pct
from experiments import ExperimentError
from experiments.compare import COMPARE_HEADERS, compare, compare_cells
from experiments.context import BASELINE, LABELS, LOSSES, baseline_run, method_run, sr_run
from experiments.jobs import prepare
from experiments.markdown import markdown_table, mean_std, pct_std, pvalue
from experiments.plots import finite, label_axes
from experiments.stats import spread, stat, t_test, t_two_sided_p
from experiments.table4 import TABLE4
from mtbench import judge
from training.metrics import spearman

TITLE = "The premise: when does self-refinement help?"
PREMISE_LAMBDAS = (0.1, 0.5, 1.0)  # the premise's λ curve, Sr-DPO's (λ = 0 is the baseline itself)
SFT_KEYS = ("accuracy", "p_accuracy", "sign_agreement", "naive_spearman", "spearman", "concordance")
FINAL_KEYS = SFT_KEYS + ("naive_concordance",)


def premise_row(ctx):
    """One q of the grid: the SFT models' margins; each method's last held-out evaluation; Sr against its
    baseline (answers by true score, accuracy), with Δπ's informativeness in the Sr run and the gain."""
    margins = [ctx.sft_margins(seed) for seed in ctx.seeds]
    row = {"q": ctx.sft_q, "seeds": ctx.seeds, "sft": {k: stat([m.get(k) for m in margins]) for k in SFT_KEYS},
           "methods": {}, "pairs": []}
    for loss in LOSSES:
        finals = [ctx.final_eval(seed, method_run(loss)) for seed in ctx.seeds]
        row["methods"][LABELS[loss]] = {k: stat([f.get(k) for f in finals]) for k in FINAL_KEYS}
    for sr, base in BASELINE.items():
        cell = compare(ctx, method_run(sr), baseline_run(base), LABELS[sr], LABELS[base])
        acc = [row["methods"][LABELS[m]]["accuracy"]["per_seed"] for m in (sr, base)]
        test = t_test(*acc)
        during = [spread([v for _, v in ctx.curve(seed, method_run(sr), "eval_spearman")])[0] for seed in ctx.seeds]
        row["pairs"].append({**cell, "accuracy_p": test["p"], "accuracy_t": test["t"],
                             "accuracy_diff": test["mean_diff"], "informativeness": stat(during),
                             "gain": stat([s["score_a_mean"] - s["score_b_mean"] for s in cell["per_seed"]])})
    return row


def gain_vs_informativeness(rows, index):
    """Across every (q, seed) run of one Sr method (pairs[index]), Spearman's ρ of its gain over the baseline
    with Δπ's informativeness in that run, and the two-sided p of ρ = 0 (t = ρ·√((n − 2)/(1 − ρ²)), df n − 2)."""
    gains = [g for r in rows for g in r["pairs"][index]["gain"]["per_seed"]]
    informed = [v for r in rows for v in r["pairs"][index]["informativeness"]["per_seed"]]
    rho, n = spearman(gains, informed), len(gains)
    if n < 3 or not math.isfinite(rho):
        return {"rho": rho, "n": n, "p": math.nan}
    t = math.inf if abs(rho) >= 1 else rho * math.sqrt((n - 2) / (1 - rho * rho))
    return {"rho": rho, "n": n, "p": 0.0 if math.isinf(t) else t_two_sided_p(t, n - 2)}


VIEW_PROMPTS = {"p": "100", "neutral": "neutral", "opposite": "opposite"}  # srpo.REFINE_PROMPTS keys; "none": x
# The pre-stated rule for the q of the verdict's miniature (issue 32, item 1), on validation pairs only: the smallest q
# > 0 of the grid whose SFT models' own margin under p ⊕ x has a mean Spearman of at least Q_RULE with the true score
# gap on embedded_pairs("test", seed=1); if none reaches it, the q with the largest mean. (q > 0: an SFT model that
# never read p cannot test what p does.)
Q_RULE = 0.5


def choose_q(ctx, qs, seeds):
    """(q, {q: mean validation Spearman}) by the pre-stated rule (Q_RULE), from the SFT models alone, trained q by q
    in increasing order (prepare) until one reaches the rule; a larger q is not trained."""
    means = {}
    for q in sorted(qs):
        if not ctx.train_nothing:
            prepare(ctx, [(q, seeds, [])])
        means[q] = spread([ctx.variant(q, seeds).sft_margins(seed, split="valid")["spearman"] for seed in seeds])[0]
        if means[q] >= Q_RULE:
            return q, means
    return max(means, key=lambda q: (means[q], -q)), means


def view_table(ctx, runs=True):
    """Per seed, the premise under p, the neutral text, the opposite prompt and no text: the SFT model's own margin
    (accuracy, Spearman with the true gap) on the test pairs, and, with runs, Δ's mean Spearman with the true gap
    over an Sr-DPO run refining with that view (Δπ under the text; Δ_naive with no text). The paper's reading
    predicts a negative Spearman under the opposite prompt and nothing more from the neutral text than from none."""
    rows = []
    for seed in ctx.seeds:
        row = {"seed": seed}
        for view, key in VIEW_PROMPTS.items():
            m = ctx.sft_margins(seed, key)
            row[view] = {"accuracy": m["p_accuracy"], "spearman": m["spearman"]}
            if runs:
                during = ctx.curve(seed, sr_run("sr-dpo", refine_prompt=key), "eval_spearman")
                row[view]["during"] = spread([v for _, v in during])[0]
        row["none"] = {"accuracy": m["accuracy"], "spearman": m["naive_spearman"]}
        if runs:
            during = ctx.curve(seed, sr_run("sr-dpo", refine="naive"), "eval_naive_spearman")
            row["none"]["during"] = spread([v for _, v in during])[0]
        rows.append(row)
    return rows


def view_markdown(rows):
    """The premise per seed and view, as a Markdown table."""
    views = (*VIEW_PROMPTS, "none")
    has_runs = "during" in rows[0]["p"]
    headers = ["seed"] + [f"{v}: {k}" for v in views for k in ("accuracy", "ρ") + (("ρ in Sr-DPO",) if has_runs
                                                                                   else ())]
    cells = [[r["seed"]] + [num(r[v][k], ".2f" if k != "accuracy" else ".3f") for v in views
                            for k in ("accuracy", "spearman") + (("during",) if has_runs else ())] for r in rows]
    return markdown_table(headers, cells)


def premise_waves(qs, seeds):
    """The order of work, so that early results already answer something: the grid's two ends for two
    seeds, then for the other seeds, then the q between them. [(qs, seeds)]."""
    ends = sorted({min(qs), max(qs)})
    middle = sorted(set(qs) - set(ends), reverse=True)
    waves = [(ends, seeds[:2]), (ends, seeds[2:]), (middle, seeds)]
    return [(q, some) for q, some in waves if q and some]


def best_q(rows):
    """The q > 0 where Δπ is most informative (mean Spearman in the Sr-DPO runs); the largest q if none > 0."""
    informed = [r for r in rows if r["q"] > 0] or rows
    return max(informed, key=lambda r: (r["pairs"][0]["informativeness"]["mean"], r["q"]))["q"]


def run(ctx):
    """The premise (Assumption 3.2, Corollary 3.3.1): for each q of the grid, SFT with a share q of
    quality-aware pairs; the SFT models' margins before alignment; Sr-DPO, Sr-IPO against DPO, IPO; then,
    at the q where Δπ is most informative, the λ curve and Figure 1, Table 4, the corollary beside q = 0."""
    s = ctx.size
    if s.chat:
        raise ExperimentError(f"premise: the quality-aware SFT data is the embedded task's; not --size {s.name}")
    seeds, grid = list(range(s.premise_seeds)), [method_run(loss) for loss in LOSSES]
    variants = [sr_run("sr-dpo", **kw) for _, kw in TABLE4[1:]]
    done = {q: [] for q in s.premise_qs}  # the seeds trained so far, per q
    for qs, some in premise_waves(s.premise_qs, seeds):  # the results so far written after each wave
        prepare(ctx, [(q, some, grid + (variants if q == 0 else [])) for q in qs])
        for q in qs:
            done[q] += some
        ctx.interim({"qs": list(s.premise_qs), "seeds": seeds, "partial": f"seeds trained so far: {done}",
                     "rows": [premise_row(ctx.variant(q, done[q])) for q in s.premise_qs if done[q]]})
    rows = [premise_row(ctx.variant(q, seeds)) for q in s.premise_qs]
    q_best = best_q(rows)
    lam_runs = [sr_run("sr-dpo", lam) for lam in PREMISE_LAMBDAS]
    prepare(ctx, [(q_best, seeds, lam_runs + variants)])
    best = ctx.variant(q_best, seeds)
    lam_rows = [{"lambda": lam, **compare(best, run, baseline_run("dpo"), LABELS["sr-dpo"], LABELS["dpo"])}
                for lam, run in zip(PREMISE_LAMBDAS, lam_runs)]
    table4 = {f"{q:g}": [{"variant": variant, **compare(ctx.variant(q, seeds), sr_run("sr-dpo", **kw),
                                                       baseline_run("dpo"), f"Sr-DPO ({variant})", "DPO")}
                         for variant, kw in TABLE4] for q in sorted({0.0, q_best})}
    return {"qs": list(s.premise_qs), "best_q": q_best, "rows": rows, "lambda": lam_rows, "table4": table4,
            "seeds": seeds}


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    rows, q_best = result["rows"], result.get("best_q")
    by_q = {r["q"]: r for r in rows}
    sft = markdown_table(
        ["q", "accuracy (x)", "accuracy (p ⊕ x)", "ranked alike", "Spearman, margin under x",
         "Spearman, margin under p ⊕ x", "concordance (p ⊕ x)"],
        [[f"{r['q']:g}"] + [pct_std(r["sft"][k]) for k in ("accuracy", "p_accuracy", "sign_agreement")]
         + [mean_std(r["sft"][k]) for k in ("naive_spearman", "spearman", "concordance")] for r in rows])
    pay = markdown_table(
        ["q", "A vs B"] + COMPARE_HEADERS + ["gain in true score", "held-out accuracy A / B", "p (accuracy)",
                                            "Spearman Δπ in the Sr run"],
        [[f"{r['q']:g}", f"{c['model_a']} vs {c['model_b']}"] + compare_cells(c)
         + [num(c["gain"]["mean"], "+.3f", c["gain"]["std"]),
            " / ".join(pct(r["methods"][c[side]]["accuracy"]["mean"]) for side in ("model_a", "model_b")),
            pvalue(c["accuracy_p"]), mean_std(c["informativeness"])] for r in rows for c in r["pairs"]])
    intro = [
        "SFT with a share q of quality-aware pairs (embedded.embedded_sft_pairs: the paper's prompt p with a rating R "
        "in [1, 100] before the query, a response of true score about R/100), then DPO, IPO, Sr-DPO and Sr-IPO "
        "from each SFT model as in `methods`. Mean ± standard deviation over seeds.",
        "**The premise, before alignment.** The SFT model's own margin log π(y+|·) − log π(y−|·) on the held-out "
        "pairs (with π_ref the SFT model itself, Δπ and Δ_naive are exactly 0 there): the share of pairs it ranks "
        "right under x and under p ⊕ x (Figure 1's accuracies), and its rank correlation with the true gap "
        "(Corollary 3.3.1).", sft,
        "**The payoff.** Sr against its baseline from the same SFT model: answers judged by the true score "
        "(p: paired t-test over seeds of the mean true score), gain = mean true score of A − B, held-out "
        "accuracy at the last step (p: paired t-test), and Δπ's informativeness as the Sr run used it (Spearman "
        "with the true gap, mean over its held-out evaluations).", pay,
        "**Does a more informative Δπ pay?** Over every run (each q and seed), Spearman's ρ of the gain with "
        "Δπ's informativeness in that run: " + "; ".join(
            f"{c['model_a']} − {c['model_b']} ρ = {num(st['rho'], '+.2f')} (n = {st['n']}, p = {pvalue(st['p'])})"
            for c, st in ((c, gain_vs_informativeness(rows, i)) for i, c in enumerate(rows[0]["pairs"]))) + "."]
    reading = [f"**Reading.** {result['reading']}"] if result.get("reading") else []  # written into the JSON
    if q_best is None:
        return intro + [f"**Partial results** ({result.get('partial', '')}): the run goes on."] + reading
    lam = markdown_table(["λ", "A vs B"] + COMPARE_HEADERS,
                         [[f"{r['lambda']:g}", f"{r['model_a']} vs {r['model_b']}"] + compare_cells(r)
                          for r in result["lambda"]])
    sides = sorted({0.0, q_best})
    head = ["", *[f"q = {q:g}" for q in sides]]
    fig1 = [["SFT model, accuracy (x)", "sft", "accuracy"], ["SFT model, accuracy (p ⊕ x)", "sft", "p_accuracy"]] + [
        [f"{m}, accuracy ({v})", m, k] for m in ("Sr-DPO", "Sr-IPO") for v, k in (("x", "accuracy"),
                                                                                 ("p ⊕ x", "p_accuracy"))]
    figure1 = markdown_table(head, [[label] + [pct_std((by_q[q]["sft"] if src == "sft" else by_q[q]["methods"][src])[k])
                                               for q in sides] for label, src, k in fig1])
    corollary = markdown_table(head, [[f"{m}, {label}"] + [mean_std(by_q[q]["methods"][m][k]) for q in sides]
                                      for m in ("Sr-DPO", "Sr-IPO") for label, k in (
                                          ("Spearman Δπ", "spearman"), ("Spearman Δ_naive", "naive_spearman"),
                                          ("concordance Δπ", "concordance"),
                                          ("concordance Δ_naive", "naive_concordance"))])
    t4 = markdown_table(["Sr-DPO variant (vs DPO)"] + [f"q = {q:g}: win / tie / lose, p" for q in sides],
                        [[row["variant"]] + [
                            " / ".join(pct(c[k + "_rate"]) for k in judge.OUTCOMES) + ", "
                            + pvalue(c["score_p"]) for c in (result["table4"][f"{q:g}"][i] for q in sides)]
                         for i, row in enumerate(result["table4"][f"{sides[0]:g}"])])
    return intro + [
        f"**λ at q = {q_best:g}** (the q > 0 where Δπ is most informative in Sr-DPO; λ = 0 is the baseline).", lam,
        f"**Figure 1 at q = 0 and q = {q_best:g}**: held-out accuracy, last step of alignment (SFT: before it).",
        figure1, f"**Corollary 3.3.1 at q = 0 and q = {q_best:g}**: rank correlation with the true gap, last step.",
        corollary, f"**Table 4 at q = 0 and q = {q_best:g}**: Sr-DPO variants against DPO (p: score, paired t).", t4,
        *reading]


def plot(plt, result):
    """Gain of Sr over its baseline against how informative Δπ is: before alignment (the SFT model's margin
    under p ⊕ x) and as used (Δπ in the Sr run); error bars: standard deviation over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("the SFT model's margin under p ⊕ x (before alignment)", lambda r, i: r["sft"]["spearman"]),
              ("Δπ in the Sr run (mean over its evaluations)", lambda r, i: r["pairs"][i]["informativeness"]))
    for ax, (what, x_of) in zip(axes, panels):
        for i, color in enumerate(("tab:blue", "tab:orange")):
            rows = result["rows"]
            xs, ys = [x_of(r, i) for r in rows], [r["pairs"][i]["gain"] for r in rows]
            ax.errorbar([finite(p["mean"], math.nan) for p in xs], [finite(p["mean"], math.nan) for p in ys],
                        xerr=[finite(p["std"]) for p in xs], yerr=[finite(p["std"]) for p in ys], fmt="o-",
                        color=color, capsize=3, label=f"{rows[0]['pairs'][i]['model_a']} − "
                                                      f"{rows[0]['pairs'][i]['model_b']}")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"q={r['q']:g}", (finite(x["mean"], math.nan), finite(y["mean"], math.nan)), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="black", linewidth=0.5)
        label_axes(ax, f"Spearman with the true gap: {what}", "gain in mean true score of answers" if
                   ax is axes[0] else "", "", legend_size=8)
        ax.xaxis.label.set_size(8)
    fig.suptitle("Gain of self-refinement against the informativeness of Δπ (quality-aware SFT share q)")
    return fig
