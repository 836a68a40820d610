"""experiments/noise_floor.py: a learning rate and step count at which mathematically identical runs agree
(issue 32, item 2).

Sr-DPO-naive at (β 0.1, λ 0.5) and DPO at β 0.05 are the same loss up to a gradient factor (docs/verdict.md §1);
RMSprop removes most of that factor, clipping and float rounding do not, and a large learning rate amplifies what is
left. For each candidate (learning rate, steps), per seed: the win − lose of the pair's answers to the test prompts
(the verdict's unit, points) and the difference of their mean true score; and, for scale, DPO's gain in mean true
score over its SFT model (a setting where nothing moves agrees trivially). Each setting has its own work folder
(runs/experiments/noise-floor/lrL-sS, each with its own SFT models, trained as the default size's).

    python -m experiments.noise_floor --settings 1e-3:20,2e-4:100 --seeds 7,8,14
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

from base import common
from experiments import ROOT, provenance, sizes
from experiments.context import Context
from experiments.markdown import markdown_table
from experiments.stats import paired_interval
from experiments.verdict import beta_run, control_run, mean, scores

OUT = os.path.join(ROOT, "experiments", "results", "default-noise-floor")


def parse_settings(text):
    """[(lr, steps)] of "LR:STEPS,LR:STEPS"."""
    out = []
    for item in text.split(","):
        lr, steps = item.split(":")
        out.append((float(lr), int(steps)))
    return out


def setting_row(ctx, suffix=""):
    """Per seed: win − lose (points) and score difference of Sr-DPO-naive (β 0.1, λ 0.5) against DPO (β 0.05), and
    DPO's gain over SFT in mean true score; with paired intervals over seeds. suffix: of the runs' folder names."""
    per_seed = []
    naive, dpo = (dataclasses.replace(run, name=run.name + suffix) for run in (control_run("naive"),
                                                                                beta_run("dpo", 0.05)))
    for seed in ctx.seeds:
        a, b = scores(ctx, seed, naive), scores(ctx, seed, dpo)
        sft = scores(ctx, seed, None)
        per_seed.append({"seed": seed, "winlose": 100 * (sum(x > y for x, y in zip(a, b)) - sum(x < y for x, y in
                                                                                                  zip(a, b))) / len(a),
                         "score_diff": mean(a) - mean(b), "dpo_gain_over_sft": mean(b) - mean(sft)})
    return {"per_seed": per_seed, "winlose": paired_interval([e["winlose"] for e in per_seed]),
            "max_abs_winlose": max(abs(e["winlose"]) for e in per_seed),
            "score_diff": paired_interval([e["score_diff"] for e in per_seed]),
            "dpo_gain_over_sft": paired_interval([e["dpo_gain_over_sft"] for e in per_seed])}


def markdown(result):
    rows = []
    for r in result["settings"]:
        w, g = r["winlose"], r["dpo_gain_over_sft"]
        rows.append([f"{r['lr']:g}", r["steps"], ", ".join(str(e["seed"]) for e in r["per_seed"]),
                     f"{w['mean']:+.1f} [{w['low']:+.1f}, {w['high']:+.1f}]", f"{r['max_abs_winlose']:.1f}",
                     ", ".join(f"{e['winlose']:+.1f}" for e in r["per_seed"]),
                     f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"])
    return "\n".join([
        "### The noise floor: Sr-DPO-naive (β 0.1, λ 0.5) against DPO (β 0.05), per learning rate and steps",
        "",
        "The same loss up to a gradient factor: a setting whose identical runs disagree cannot show a smaller effect.",
        "",
        markdown_table(["lr", "steps", "seeds", "win − lose, points [95% CI]", "largest abs(win − lose) of a seed",
                        "per seed", "DPO − SFT, mean true score [95% CI]"], rows),
        "",
        f"Took {result['seconds']:.0f}s; {provenance.line(result['provenance'])}.",
        ""])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.noise_floor", description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="1e-3:20,1e-4:200", help="LR:STEPS,... (alignment learning rate, steps)")
    p.add_argument("--seeds", default="0,1,2,3", help="seeds, comma-separated (the 16-seed verdict's runs "
                   "disagreed most on 7, 8 and 14)")
    p.add_argument("--smoke", action="store_true", help="the smoke size, two settings: for tests")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "experiments", "noise-floor"))
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    t0, made = time.time(), provenance.record()
    torch.set_num_threads(1)  # the tiny model: as cli.py runs it
    seeds = [int(x) for x in args.seeds.split(",")]
    base = sizes.size_for("default", smoke=args.smoke)
    settings = []
    for lr, steps in parse_settings(args.settings):  # one work folder: the SFT models are shared
        size = dataclasses.replace(base, lr=lr, steps=steps, eval_every=steps)
        ctx = Context(size, args.work, args.out, log=lambda m: None).variant(0.0, seeds)
        same = (lr, steps) == (base.lr, base.steps)  # the verdict's own runs' names
        row = dict(lr=lr, steps=steps, **setting_row(ctx, "" if same else f"-lr{lr:g}-s{steps}"))
        settings.append(row)
        print(f"lr {lr:g}, {steps} steps: win − lose {row['winlose']['mean']:+.1f} "
              f"[{row['winlose']['low']:+.1f}, {row['winlose']['high']:+.1f}], per seed "
              + ", ".join(f"{e['winlose']:+.1f}" for e in row["per_seed"]), flush=True)
    result = {"experiment": "noise_floor", "settings": settings, "seeds": seeds, "smoke": args.smoke,
              "seconds": time.time() - t0, "provenance": made}
    os.makedirs(args.out, exist_ok=True)
    common.emit(result, markdown(result), os.path.join(args.out, "noise_floor.json"))
    with open(os.path.join(args.out, "noise_floor.md"), "w") as fh:
        fh.write(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
