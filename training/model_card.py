"""training/model_card.py: the README.md of an exported model folder (final/, sft/), in the Hub's model-card format.

A pure function of what the run knows: its flags, its stages, the pairs kept (and dropped, where known), the last
held-out metrics and the command line. YAML front matter (base_model and datasets only where they are hub names,
tags, library_name), then the loss and its hyperparameters, the data, the steps, the metrics, the command and
the paper. Nothing is invented: a value the run does not know is left out.
Imports the standard library and srpo.py's SELF_REFINED only (no model, no other project module).
"""

import os
import re
import shlex

from srpo import SELF_REFINED

PAPER = "Direct Alignment of Language Models via Quality-Aware Self-Refinement"
LOSS_NAMES = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "sr-dpo": "Sr-DPO", "sr-ipo": "Sr-IPO"}
LOSS_TEXT = {
    "sft": "the mean negative log-likelihood of the chosen responses' tokens",
    "dpo": "DPO, Eq. (5): -log σ(β·h), h = log π(y+|x)/π_ref(y+|x) - log π(y-|x)/π_ref(y-|x)",
    "ipo": "IPO, Eq. (8): (h - 1/(2β))²",
    "sr-dpo": "Sr-DPO, Eq. (12) and Algorithm 1: -log σ(β·h - λ·⊥[Δπ])",
    "sr-ipo": "Sr-IPO, Algorithm 2: (h - λ·⊥[Δπ] - 1/(2β))²",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_name(source):
    """source when it names a Hub repository ("owner/name", not a folder or file here); else None."""
    if not source or not _HUB_NAME.match(source) or os.path.exists(os.path.expanduser(source)):
        return None
    return source


def command_line(flags, defaults, program="train.py", skip=("resume", "resume_force", "overwrite")):
    """The command that repeats the run: every flag whose value is not its default (True booleans bare), but
    those in skip. defaults: the values the run would have had with no flag given (resolved as the run's were)."""
    parts = ["python", program]
    for name, value in flags.items():
        if name in skip or name not in defaults or value == defaults[name] or value is None or value is False:
            continue
        parts += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _yaml_list(key, values):
    return [f"{key}:"] + [f"- {v}" for v in values] if values else []


def _number(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(flags, stages=(), train_pairs=None, dropped_pairs=None, heldout=None, command=None,
               refine_prompt=None):
    """README.md text of a model folder.

    flags: the run's resolved flags (config.Config as a dict: loss, beta, lam, refine, refine_prompt, model,
    ref_model, data, eval_data, lr, warmup_steps, lr_scheduler, batch_size, max_length, optimizer, seed, ...);
    a missing key is left out of the card. stages: [(name, steps)] that this folder was trained with.
    train_pairs / dropped_pairs: the training pairs kept / dropped (None: unknown). heldout: the last held-out
    metrics ({name: number}; others are skipped). command: the command line. refine_prompt: the text of p.
    """
    loss = flags.get("loss")
    trained = [name for name, _ in stages] or ([loss] if loss else [])
    final_loss = trained[-1] if trained else None
    base = hub_name(flags.get("model"))
    datasets = [d for d in dict.fromkeys((hub_name(flags.get("data")), hub_name(flags.get("eval_data")))) if d]
    tags = ["srpo", *dict.fromkeys(t for name in trained for t in (name, name.removeprefix("sr-")))]
    front = ["---"] + ([f"base_model: {base}"] if base else []) + _yaml_list("datasets", datasets) \
        + ["library_name: transformers", "pipeline_tag: text-generation"] + _yaml_list("tags", tags) + ["---"]

    title = " then ".join(LOSS_NAMES.get(n, n) for n in trained) or "a model"
    lines = ["", f"# {title} with srpo", "",
             f"A causal language model trained by srpo's `train.py`, the reference implementation of Sr-DPO and "
             f"Sr-IPO from *{PAPER}*."]
    if flags.get("model"):
        lines.append(f"It starts from `{flags['model']}`" + ("." if base else " (not a Hub model)."))

    lines += ["", "## Loss", ""]
    for name in trained:
        lines.append(f"- {LOSS_NAMES.get(name, name)}: {LOSS_TEXT.get(name, name)}")
    rows = []
    if final_loss and final_loss != "sft":
        rows.append(("β", flags.get("beta")))
        if final_loss in SELF_REFINED:
            rows.append(("λ", flags.get("lam")))
            refine = flags.get("refine")
            if refine == "naive":
                rows.append(("Δ", "Δ_naive, Eq. (10): the margin under x itself"))
            elif refine == "prompt":
                rows.append(("Δ", "Δπ, Eq. (11): β·h under p ⊕ x, the current policy's, without gradient"))
                if flags.get("refine_prompt"):
                    rows.append(("rating scale of p", f"1 to {flags['refine_prompt']}"))
        ref = flags.get("ref_model")
        rows.append(("reference π_ref", f"`{ref}`" if ref else "the starting policy (after SFT, if any)"))
        if flags.get("average_logps"):
            rows.append(("log π(y|x)", "per-token mean (not the paper's sum)"))
    lines += [f"- {k}: {_number(v)}" for k, v in rows if v is not None]
    if refine_prompt and final_loss in SELF_REFINED and flags.get("refine") == "prompt":
        lines += ["", "The prompt p, placed before each query for Δπ:", "", f"> {refine_prompt}"]

    lines += ["", "## Data", ""]
    if flags.get("data"):
        lines.append(f"- training pairs: `{flags['data']}`" + (" (srpo's embedded synthetic pairs)"
                                                             if flags["data"] == "embedded" else ""))
    if train_pairs is not None:
        lines.append(f"- pairs kept: {train_pairs:,}")
    if dropped_pairs is not None:
        lines.append(f"- pairs dropped: {dropped_pairs:,}")
    if flags.get("max_length"):
        lines.append(f"- tokens per sequence: at most {flags['max_length']}")
    if flags.get("eval_data"):
        lines.append(f"- held-out pairs: `{flags['eval_data']}`")

    lines += ["", "## Training", ""]
    if stages:
        lines.append("- steps: " + ", then ".join(f"{n} of {LOSS_NAMES.get(s, s)}" for s, n in stages))
    for key, label in (("batch_size", "pairs per step"), ("optimizer", "optimizer"), ("lr", "peak learning rate"),
                       ("warmup_steps", "warm-up steps"), ("lr_scheduler", "learning rate after warm-up"),
                       ("seed", "seed")):
        if flags.get(key) is not None:
            lines.append(f"- {label}: {_number(flags[key])}")

    numbers = {k: v for k, v in (heldout or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines += ["", "## Last held-out metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_number(v)} |" for k, v in numbers.items()]

    if command:
        lines += ["", "## Command", "", "```bash", command, "```"]
    lines += ["", "## Citation", "", f"*{PAPER}* (the paper of Sr-DPO and Sr-IPO).", ""]
    return "\n".join(front + lines)
