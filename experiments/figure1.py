"""experiments/figure1.py: Figure 1: held-out accuracy under x and under p ⊕ x over training
(`python -m experiments figure1`)."""

from experiments.context import BASELINE, LABELS, sr_run
from experiments.markdown import md_curves
from experiments.plots import plot_curves
from experiments.stats import pooled_curves

TITLE = "Figure 1: accuracy under x and under p ⊕ x"


def run(ctx):
    """Figure 1: held-out accuracy under x and under p ⊕ x of Sr-DPO and Sr-IPO against pairs trained."""
    curves = {}
    for loss in BASELINE:
        per_seed = {seed: {key: ctx.curve(seed, sr_run(loss), "eval_" + key)
                           for key in ("accuracy", "p_accuracy", "sign_agreement")} for seed in ctx.seeds}
        curves[LABELS[loss]] = pooled_curves(per_seed)
    return {"curves": curves}


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    return ["Held-out preference accuracy under x and under p ⊕ x (Assumption 3.2), and the share of pairs "
            "ranked alike in both views; mean ± standard deviation over seeds.",
            md_curves(result, ("accuracy", "p_accuracy", "sign_agreement"),
                      ["accuracy (x)", "accuracy (p ⊕ x)", "ranked alike"])]


def plot(plt, result):
    """The figure of a result."""
    fig, axes = plt.subplots(1, len(result["curves"]), figsize=(9, 3.4), sharey=True)
    for ax, (method, curves) in zip(axes, result["curves"].items()):
        plot_curves(ax, curves, "accuracy", "original tuples (x)", "tab:blue")
        plot_curves(ax, curves, "p_accuracy", "augmented tuples (p ⊕ x)", "tab:orange", "--")
        ax.set_title(method)
        ax.set_xlabel("number of training pairs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out preference accuracy")
    axes[0].legend(fontsize=8)
    return fig
