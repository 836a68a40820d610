"""experiments/table4.py: Table 4: Δ_naive against Δπ, and the rating scale (`python -m experiments table4`)."""

from base import defaults
from experiments.compare import COMPARE_HEADERS, compare, compare_cells
from experiments.context import baseline_run, sr_run
from experiments.markdown import markdown_table
from experiments.plots import plot_compare_bars

TITLE = "Table 4: Δ_naive against Δπ, and the rating scale"
TABLE4 = (("proposed Sr-DPO", {}), ("ratings in [1, 10]", {"refine_prompt": "10"}),
          ("replace Δπ by Δ_naive", {"refine": "naive"}))


def run(ctx):
    """Table 4: Sr-DPO variants against DPO: the proposed one, rating scale 10, and Δ_naive."""
    return {"rows": [{"variant": variant, **compare(ctx, sr_run("sr-dpo", **kw), baseline_run("dpo"),
                                                     f"Sr-DPO ({variant})", "DPO")}
                     for variant, kw in TABLE4]}


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    rows = [[r["variant"]] + compare_cells(r) for r in result["rows"]]
    return [f"Sr-DPO variants against DPO (λ = {defaults.LAM:g}).",
            markdown_table(["Sr-DPO variant (vs DPO)"] + COMPARE_HEADERS, rows)]


def plot(plt, result):
    """The figure of a result."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    plot_compare_bars(ax, result["rows"], [r["variant"] for r in result["rows"]])
    ax.set_title("Sr-DPO variants against DPO (Table 4)")
    return fig
