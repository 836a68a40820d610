"""The verdict experiment's plan (issue 25), as numbers: the power analysis from the committed per-seed
results and the runs/minutes of candidate designs. A draft the experiments/ package split will fold into
the verdict claim; it trains nothing.

    python experiments/_verdict_plan_draft.py            # prints the power table and the designs
"""

import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_verdict_stats_draft", os.path.join(HERE, "_verdict_stats_draft.py"))
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

SEEDS8 = os.path.join(HERE, "results", "default-seeds8", "methods.json")
BETAS = (0.025, 0.05, 0.1, 0.2, 0.5)
SCORE_HALFWIDTHS = (0.01, 0.02, 0.05)   # of the mean true score (0..1)
WINLOSE_HALFWIDTHS = (5, 10, 25)        # points (percent) of win rate − lose rate

# Per-run cost at the default size, one thread, no other load (measured: see docs/verdict.md §4):
ALIGN_CORE_S = 11.3   # lambda: 24 alignment runs (incl. 200 sampled answers and 4 held-out evaluations) in 272 s
SFT_CORE_S = 19.0     # methods --seeds 8: 3 SFT + 12 alignment runs in 193 s, less 12 x 11.3 s
VALID_ANSWERS_S = 3.0  # 200 more answers per run for the validation split: measured 25 s under ~8x load here
CORES = 2             # paper.py --jobs 2 on the 2-core machine


def paired_diffs(path=SEEDS8):
    """{comparison: {"score": [per-seed a − b mean true score], "win-lose": [per-seed points]}}."""
    with open(path) as fh:
        table = json.load(fh)["table2"]
    out = {}
    for cell in table:
        if (cell["model_a"], cell["model_b"]) not in (("Sr-DPO", "DPO"), ("Sr-IPO", "IPO")):
            continue
        seeds = cell["per_seed"]
        out[f"{cell['model_a']} − {cell['model_b']}"] = {
            "score": [s["score_a_mean"] - s["score_b_mean"] for s in seeds],
            "win-lose": [100 * (s["win_rate"] - s["lose_rate"]) for s in seeds]}
    return out


def power_rows(diffs):
    rows = []
    for name, d in diffs.items():
        for unit, widths in (("score", SCORE_HALFWIDTHS), ("win-lose", WINLOSE_HALFWIDTHS)):
            iv = vs.paired_interval(d[unit])
            rows.append({"comparison": name, "unit": unit, "n": iv["n"], "mean": iv["mean"], "sd": iv["sd"],
                         "ci": (iv["low"], iv["high"]), "p": iv["p"],
                         "seeds": {w: vs.seeds_for_halfwidth(iv["sd"], w) for w in widths},
                         "halfwidth_at": {n: vs.halfwidth(iv["sd"], n) for n in (8, 16, 24, 32)}})
    return rows


def design(name, runs_per_seed, seeds, reused_runs=0, new_sft_seeds=None):
    """Minutes of a design on CORES cores: SFT per new seed plus its alignment runs, less the reused ones."""
    new_sft_seeds = seeds if new_sft_seeds is None else new_sft_seeds
    core_s = new_sft_seeds * SFT_CORE_S + (runs_per_seed * seeds - reused_runs) * (ALIGN_CORE_S + VALID_ANSWERS_S)
    return {"design": name, "runs_per_seed": runs_per_seed, "seeds": seeds, "runs": runs_per_seed * seeds,
            "reused": reused_runs, "minutes": core_s / CORES / 60}


def designs():
    full = 2 * len(BETAS) + 2 * len(BETAS) + 2 * 3     # DPO/IPO sweeps, Sr-DPO/Sr-IPO sweeps, 3 prompt controls x 2
    lean = 2 * len(BETAS) + 2 + 2 * 2                  # sweeps of the baselines, Sr at 0.1, neutral/opposite x 2
    # with a runs cache of the committed experiments: dpo, ipo, sr-dpo, sr-ipo (β 0.1) for seeds 0-7 and their SFT
    return [design("full grid, 16 seeds", full, 16),
            design("full grid, 16 seeds, seeds 0-7 cached", full, 16, reused_runs=4 * 8, new_sft_seeds=8),
            design("lean grid, 24 seeds", lean, 24),
            design("lean grid, 24 seeds, seeds 0-7 cached", lean, 24, reused_runs=4 * 8, new_sft_seeds=16),
            design("full grid, 8 seeds (what the power analysis calls inconclusive)", full, 8)]


def main():
    for row in power_rows(paired_diffs()):
        lo, hi = row["ci"]
        print(f"{row['comparison']:16s} {row['unit']:8s} n={row['n']} mean {row['mean']:+.4f} "
              f"95% CI [{lo:+.4f}, {hi:+.4f}] p={row['p']:.2f} sd {row['sd']:.4f} | seeds for half-width "
              + ", ".join(f"{w:g}: {n}" for w, n in row["seeds"].items())
              + " | half-width at n=" + ", ".join(f"{n}: {h:.3g}" for n, h in row["halfwidth_at"].items()))
    for d in designs():
        print(f"{d['design']:60s} {d['runs_per_seed']:2d} runs/seed, {d['runs']:3d} runs "
              f"({d['reused']} reused): {d['minutes']:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
