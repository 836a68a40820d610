"""experiments/markdown.py: the helpers of the claims' Markdown tables.

Owns: p-values and mean ± standard deviation as cells, Markdown tables, curves as tables, and the footer of a
result (its size, its time, its runs).
Does not own: any claim's table (its own file), the cells of a comparison (compare.py).
"""

import math
import os

from base import defaults
from base.common import num, pct
from experiments import provenance
from training import models


def pvalue(p):
    """A p-value in 3 decimals (or 1e-4 style below 0.001), " *" where p < 0.05; "-" when undefined."""
    return "-" if p is None or not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}") + (
        " *" if p < 0.05 else "")


def markdown_table(headers, rows):
    """A Markdown table of a header row and rows of cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def md_curves(result, keys, headers):
    """One row per method and evaluation point of result["curves"]: each key's mean ± standard deviation."""
    rows = []
    for method, curves in result["curves"].items():
        for i, point in enumerate(curves[keys[0]]):
            rows.append([method, point["pairs"]] + [num(curves[k][i]["mean"], std=curves[k][i]["std"]) for k in keys])
    return markdown_table(["method", "pairs trained"] + headers, rows)


def mean_std(st, fmt=".3f"):
    """A ``stats.stat`` as "mean ± std"."""
    return num(st["mean"], fmt, st["std"])


def pct_std(st):
    """A ``stats.stat`` of fractions as "mean% ± std"."""
    return pct(st["mean"], st["std"])


def footer(result):
    """The last line of a claim's Markdown: its size, the time it took, the runs it trained and reused, and (results
    made since provenance was recorded) the commit and library versions."""
    c = result["config"]
    model = "tiny" if c["model"] == models.TINY else os.path.basename(c["model"])
    return (f"Size {c['name']}{' (smoke)' if c['smoke'] else ''}: model {model}, {len(c['seeds'])} seeds, "
            f"SFT {c['sft_steps']} steps of {c['sft_batch_size']} (lr {c['sft_lr']:g}), alignment {c['steps']} "
            f"steps of {c['batch_size']} pairs (lr {c['lr']:g}, β {defaults.BETA:g}, λ {defaults.LAM:g} unless "
            f"varied), {c['test_prompts']} test prompts, "
            + (f"{c['samples']} " if c.get("samples", 1) > 1 else "")
            + f"{'greedy' if c['temperature'] == 0 else 'sampled (temperature %g)' % c['temperature']} answers "
            + ("per prompt " if c.get("samples", 1) > 1 else "") + f"of at most {c['max_new_tokens']} tokens."
            f" Took {result['seconds']:.0f}s"
            + (f" ({result['cpu_seconds']:.0f} CPU-seconds)" if "cpu_seconds" in result else "")
            + f" ({result['runs_trained']} runs trained, {result['runs_reused']} reused)."
            + (f" Made at {provenance.line(result['provenance'])}." if "provenance" in result else ""))
