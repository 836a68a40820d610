"""experiments/methods.py: Tables 2 and 3: Sr-DPO and Sr-IPO against DPO and IPO (`python -m experiments methods`)."""

import json

from base import embedded
from base.common import num, pct
from experiments.compare import COMPARE_HEADERS, compare, compare_cells
from experiments.context import BASELINE, LABELS, LOSSES, method_run
from experiments.markdown import markdown_table, pvalue
from experiments.plots import plot_compare_bars
from experiments.stats import spread, t_test

TITLE = "Tables 2 and 3: Sr-DPO and Sr-IPO against DPO and IPO"
TABLE2 = (("sr-dpo", "dpo"), ("sr-ipo", "ipo"), ("sr-dpo", "ipo"), ("sr-ipo", "dpo"))  # Table 2's rows


def run(ctx):
    """Tables 2 and 3: the four methods from each seed's SFT model; Table 2's comparisons; held-out
    accuracy and the answers' true score per method, with a paired t-test against the baseline."""
    table2 = [compare(ctx, method_run(a), method_run(b), LABELS[a], LABELS[b]) for a, b in TABLE2]
    table3 = []
    for name in ("sft",) + LOSSES:
        row = {"method": LABELS[name], "per_seed": []}
        for seed in ctx.seeds:
            answers = ctx.answers(seed, method_run(name) if name != "sft" else "sft")
            scores = [embedded.embedded_score(q["turns"][0], answers[json.dumps(q["question_id"])].turns[0])
                      for q in ctx.questions]
            entry = {"seed": seed, "score": sum(scores) / len(scores),
                     "exact": sum(s == 1.0 for s in scores) / len(scores)}
            if name != "sft":
                final = ctx.final_eval(seed, method_run(name))
                entry.update(accuracy=final["accuracy"], p_accuracy=final["p_accuracy"])
            row["per_seed"].append(entry)
        for key in ("accuracy", "p_accuracy", "score", "exact"):
            row[key + "_mean"], row[key + "_std"] = spread([e.get(key) for e in row["per_seed"]])
        table3.append(row)
    by_method = {row["method"]: row for row in table3}
    for sr, base in BASELINE.items():
        row, base_row = by_method[LABELS[sr]], by_method[LABELS[base]]
        row["baseline"] = LABELS[base]
        for key in ("accuracy", "score"):
            test = t_test([e[key] for e in row["per_seed"]], [e[key] for e in base_row["per_seed"]])
            row[key + "_p"], row[key + "_t"] = test["p"], test["t"]
    return {"table2": table2, "table3": table3}


def markdown(result):
    """The Markdown of a result between its title and its footer, as a list of paragraphs."""
    t2 = markdown_table(["A vs B"] + COMPARE_HEADERS,
                        [[f"{c['model_a']} vs {c['model_b']}"] + compare_cells(c) for c in result["table2"]])
    t3 = markdown_table(
        ["method", "held-out accuracy (x)", "accuracy (p ⊕ x)", "mean true score", "exact copies",
         "p vs baseline (accuracy)", "p vs baseline (score)"],
        [[r["method"], pct(r["accuracy_mean"], r["accuracy_std"]), pct(r["p_accuracy_mean"], r["p_accuracy_std"]),
          num(r["score_mean"], std=r["score_std"]), pct(r["exact_mean"], r["exact_std"]),
          pvalue(r.get("accuracy_p")) + (f" (vs {r['baseline']})" if "baseline" in r else ""),
          pvalue(r.get("score_p"))] for r in result["table3"]])
    return ["Table 2's layout: answers to the embedded test prompts judged by their true score, pooled over "
            "seeds (± the standard deviation over seeds); p: paired t-test over seeds of the mean true score.",
            t2, "Table 3's layout: held-out preference accuracy (last step) and the answers' true score, "
            "mean ± standard deviation over seeds; p: paired t-test over seeds against the baseline "
            "(* p < 0.05).", t3]


def plot(plt, result):
    """The figure of a result."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    plot_compare_bars(ax, result["table2"], [f"{c['model_a']} vs {c['model_b']}" for c in result["table2"]])
    ax.set_title("Win / tie / lose rates (Table 2's comparisons)")
    return fig
