"""experiments/lambdas.py: Figure 2a: the win rate against λ (`python -m experiments lambda`)."""

from experiments.compare import COMPARE_HEADERS, compare, compare_cells
from experiments.context import BASELINE, LABELS, baseline_run, sr_run
from experiments.markdown import markdown_table
from experiments.plots import label_axes, plot_seeds

TITLE = "Figure 2a: win rate against λ"
LAMBDAS = (0.0, 0.1, 0.3, 0.5, 1.0)  # Figure 2a's grid


def run(ctx):
    """Figure 2a: Sr-DPO against DPO and Sr-IPO against IPO for each λ of the grid."""
    rows = []
    for lam in LAMBDAS:
        for loss, base in BASELINE.items():
            cell = compare(ctx, sr_run(loss, lam), baseline_run(base), LABELS[loss], LABELS[base])
            rows.append({"lambda": lam, **cell})
    return {"rows": rows}


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    rows = [[f"{r['lambda']:g}", f"{r['model_a']} vs {r['model_b']}"] + compare_cells(r) for r in result["rows"]]
    return ["Win/tie/lose against the baseline for each λ (λ = 0 is the baseline's loss, so its games "
            "should all be ties).", markdown_table(["λ", "A vs B"] + COMPARE_HEADERS, rows)]


def plot(plt, result):
    """The figure of a result."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (loss, base), color in zip(BASELINE.items(), ("tab:blue", "tab:orange")):
        rows = [r for r in result["rows"] if r["model_a"] == LABELS[loss]]
        xs = [r["lambda"] for r in rows]
        ax.plot(xs, [100 * r["win_rate"] for r in rows], "-o", color=color, markersize=4,
                label=f"{LABELS[loss]} vs {LABELS[base]}: win")
        ax.plot(xs, [100 * r["lose_rate"] for r in rows], ":", color=color, label="lose")
        plot_seeds(ax, xs, [[100 * s["win_rate"] for s in r["per_seed"]] for r in rows], color)
    label_axes(ax, "λ", "% of test prompts", "Win rate against λ (Figure 2a)")
    return fig
