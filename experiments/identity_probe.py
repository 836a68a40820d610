"""experiments/identity_probe.py: how near Sr-DPO with Δ_naive at (β, λ) trains to DPO at β(1 − λ), step by step
(issue 25; docs/verdict.md §1).

Compares two train.py runs' metrics.jsonl from the same SFT model, seed and batches, on β-free quantities:
the mean log π(y±|x) of the batch, h = margin / β, the loss (equal in value by the identity), the accuracy,
the gradient-norm ratio (1/(1 − λ) by the identity, before clipping); and the held-out eval_* rows
(margins and rewards divided by β: h and log-ratios).

    # default-size settings (experiments/sizes.py SIZES["default"]); OMP_NUM_THREADS=1 as experiments/cli.py
    # runs the tiny model on one thread
    python train.py --loss sft --model tiny --max_steps 300 --lr 1e-3 --eval_every 0 --batch_size 64 \\
        --seed 0 --warmup_steps 9 --epochs 1000 --save_every 0 --out_dir /tmp/vp/sft
    A="--model /tmp/vp/sft/final --ref_model /tmp/vp/sft/final --sft_steps 0 --max_steps 20 --lr 1e-3 \\
        --eval_every 5 --eval_pairs 100 --batch_size 32 --seed 0 --warmup_steps 9 --epochs 1000 --save_every 0"
    python train.py --loss sr-dpo --refine naive --lam 0.5 --beta 0.1 $A --out_dir /tmp/vp/a
    python train.py --loss dpo --beta 0.05 $A --out_dir /tmp/vp/b
    python -m experiments.identity_probe /tmp/vp/a 0.1 /tmp/vp/b 0.05 [/tmp/vp/d 0.1]

The optional third run (DPO at β) shows how far apart two β's of the grid are, for scale.
"""

import json
import os
import sys


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    train = {r["step"]: r for r in records if r.get("stage") != "sft" and "loss" in r}
    evals = {r["step"]: r for r in records if "eval_accuracy" in r}
    return train, evals


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(run_a, beta_a, run_b, beta_b):
    """{quantity: [per-step relative difference]} and the per-step gradient-norm ratio a / b."""
    (ta, ea), (tb, eb) = rows(run_a), rows(run_b)
    steps = sorted(set(ta) & set(tb))
    out = {k: [] for k in ("logps_chosen", "logps_rejected", "h", "loss")}
    out["accuracy_abs"] = []
    ratio = []
    for s in steps:
        a, b = ta[s], tb[s]
        out["logps_chosen"].append(rel(a["logps_chosen"], b["logps_chosen"]))
        out["logps_rejected"].append(rel(a["logps_rejected"], b["logps_rejected"]))
        if s > 1:  # step 1: h = 0 in both (policy = reference)
            out["h"].append(rel(a["margin"] / beta_a, b["margin"] / beta_b))
        out["loss"].append(rel(a["loss"], b["loss"]))
        out["accuracy_abs"].append(abs(a["accuracy"] - b["accuracy"]))
        ratio.append(a["grad_norm"] / b["grad_norm"])
    evals = []
    for s in sorted(set(ea) & set(eb)):
        a, b = ea[s], eb[s]
        scaled = ("eval_margin_mean", "eval_reward_chosen_mean", "eval_reward_rejected_mean")  # β·(...): divide
        evals.append((s, {k: (a[k] / beta_a, b[k] / beta_b) if k in scaled else (a[k], b[k])
                          for k in ("eval_accuracy", "eval_p_accuracy", *scaled) if k in a and k in b}))
    return steps, out, ratio, evals


def main(argv):
    if len(argv) not in (4, 6):
        print(__doc__)
        return 2
    run_a, beta_a, run_b, beta_b = argv[0], float(argv[1]), argv[2], float(argv[3])
    pairs = [(run_b, beta_b)] + ([(argv[4], float(argv[5]))] if len(argv) == 6 else [])
    for other, beta_o in pairs:
        steps, out, ratio, evals = compare(run_a, beta_a, other, beta_o)
        print(f"== {run_a} (β {beta_a:g}) vs {other} (β {beta_o:g}): {len(steps)} steps")
        for k, v in out.items():
            print(f"  {k:15s} max {max(v):.3g}  mean {sum(v) / len(v):.3g}  last {v[-1]:.3g}")
        print(f"  grad_norm a/b   min {min(ratio):.4f} max {max(ratio):.4f} (identity: 1/(1-λ))")
        for s, kv in evals:
            print(f"  eval step {s}: " + ", ".join(f"{k[5:]} {x:.5g} vs {y:.5g}" for k, (x, y) in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
