"""experiments/corollary.py: Corollary 3.3.1: Δπ against the true score gap over training
(`python -m experiments corollary`)."""

from experiments.context import BASELINE, LABELS, method_run
from experiments.markdown import md_curves
from experiments.plots import label_axes, plot_curves
from experiments.stats import pooled_curves

TITLE = "Corollary 3.3.1: Δπ against the true score gap"
CORR_KEYS = ("spearman", "kendall_tau_b", "concordance", "naive_spearman")


def run(ctx):
    """Corollary 3.3.1: rank correlation of Δπ (and Δ_naive) with the true score gap over training."""
    curves = {}
    for loss in [name for pair in BASELINE.items() for name in pair]:  # each Sr, then its baseline
        per_seed = {seed: {key: ctx.curve(seed, method_run(loss), "eval_" + key) for key in CORR_KEYS}
                    for seed in ctx.seeds}
        curves[LABELS[loss]] = pooled_curves(per_seed)
    return {"curves": curves}


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    return ["Rank correlation over held-out pairs of the refinement with the true score gap s(y+) − s(y−): "
            "Δπ (Eq. 11: under p ⊕ x) and Δ_naive (Eq. 10: under x); concordance is the share of "
            "pairs of pairs ordered as their gaps are (0.5: chance). Mean ± standard deviation over seeds.",
            md_curves(result, CORR_KEYS,
                      ["Spearman Δπ", "Kendall τb Δπ", "concordance Δπ", "Spearman Δ_naive"])]


def plot(plt, result):
    """The figure of a result."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (method, curves), color in zip(result["curves"].items(), ("tab:blue", "tab:cyan", "tab:orange", "tab:red")):
        plot_curves(ax, curves, "spearman", f"{method}: Δπ", color)
    first = next(iter(result["curves"]))
    plot_curves(ax, result["curves"][first], "naive_spearman", f"{first}: Δ_naive", "tab:gray", ":")
    ax.axhline(0, color="black", linewidth=0.5)
    label_axes(ax, "number of training pairs", "Spearman with true score gap",
               "Δπ against the true score gap (Corollary 3.3.1)", legend_size=7)
    return fig
