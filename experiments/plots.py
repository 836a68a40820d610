"""experiments/plots.py: the helpers of the claims' plots (matplotlib, optional).

Owns: pyplot with the Agg backend (or None), curves with their spread over seeds, each seed's values as dots,
stacked win/tie/lose bars, axis labels.
Does not own: any claim's figure (its own file).
"""

import math

from mtbench import judge


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with one line) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib)", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_seeds(ax, xs, per_seed_values, color, offset=0.0):
    """Each seed's value as a small dot beside the mean: the seeds' spread."""
    for x, values in zip(xs, per_seed_values):
        shown = [v for v in values if v is not None and math.isfinite(v)]
        ax.scatter([x + offset] * len(shown), shown, s=10, color=color, alpha=0.5, linewidths=0)


def plot_curves(ax, curves, key, label, color, style="-"):
    """One pooled curve (``stats.pooled_curves``): the mean, a band of ± one standard deviation, the seeds."""
    xs = [p["pairs"] for p in curves[key]]
    mean = [p["mean"] for p in curves[key]]
    lo = [p["mean"] - (p["std"] if math.isfinite(p["std"]) else 0) for p in curves[key]]
    hi = [p["mean"] + (p["std"] if math.isfinite(p["std"]) else 0) for p in curves[key]]
    ax.plot(xs, mean, style, color=color, label=label, marker="o", markersize=3)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    plot_seeds(ax, xs, [p["per_seed"] for p in curves[key]], color)


def label_axes(ax, xlabel, ylabel, title, legend_size=8):
    """Axis labels, title, grid and legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_compare_bars(ax, cells, labels):
    """Stacked win/tie/lose bars, one per comparison, with each seed's win rate as a dot."""
    colors = {"win": "tab:green", "tie": "tab:gray", "lose": "tab:red"}
    ys = list(range(len(cells)))[::-1]
    left = [0.0] * len(cells)
    for k in judge.OUTCOMES:
        widths = [100 * c[k + "_rate"] for c in cells]
        ax.barh(ys, widths, left=left, color=colors[k], label=f"{k.capitalize()} Rate", height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    for y, c in zip(ys, cells):
        ax.scatter([100 * s["win_rate"] for s in c["per_seed"]], [y] * len(c["per_seed"]), s=14, color="black",
                   zorder=3, label="win rate of one seed" if y == ys[0] else None)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of test prompts (true-score judge)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, fontsize=7, frameon=False)


def finite(value, instead=0.0):
    """value, or `instead` where it is nan or None (JSON writes nan as null)."""
    return value if value is not None and math.isfinite(value) else instead
