"""training/tracking.py: what a training run tells: its progress lines and closing summary, and each step's metrics sent
to TensorBoard or W&B (--report_to; docs/tracking.md).

Owns: the stage and progress lines, the closing summary, the tracking backend (tracker_backend), the names each
metrics.jsonl key is logged under (TRL_NAMES, tracker_name: TRL's DPOTrainer names) and the Tracker that logs a
step at its global step.
Does not own: writing metrics.jsonl or when a step logs (train.py), or a step's metrics (metrics.step_metrics).
"""

import dataclasses
import json
import os
import shlex

from base import defaults
from base.common import ConfigError
from srpo import SELF_REFINED


def stage_line(cfg, world, micro, stage, n_steps, packing):
    """The line that opens a stage: its steps, batch split, learning rate, loss constants and batch layout."""
    return (f"stage {stage}: {n_steps} steps of {cfg.batch_size} pairs ({world} rank(s) x "
            f"{cfg.batch_size // world // micro} micro-batch(es) of {micro}), lr {cfg.lr:g}"
            + (f", beta {cfg.beta}, lambda {cfg.lam}, refine {cfg.refine}" if stage in SELF_REFINED else "")
            + f"; {packing} batches"
            + (f" (rows of up to {cfg.pack_length} tokens)" if packing != "padded" else ""))


def progress_line(m, n_steps):
    """A concise progress line for rank 0."""
    parts = [f"{m['stage']} {m['step']:>4}/{n_steps}", f"loss {m['loss']:.4f}"]
    if "accuracy" in m:
        parts += [f"r+ {m['reward_chosen']:+.3f}", f"r- {m['reward_rejected']:+.3f}", f"acc {m['accuracy']:.2f}",
                  f"Δ {m['delta_mean']:+.3f}±{m['delta_std']:.3f}"]
    parts += [f"|g| {m['grad_norm']:.2f}", f"lr {m['lr']:.2g}", f"{m['examples_per_s']:.0f} ex/s",
              f"{m['tokens_per_s']:.0f} tok/s"]
    if "eval_accuracy" in m:
        parts.append(f"eval acc {m['eval_accuracy']:.3f}")
    return " | ".join(parts)


def summary(cfg, stages, ev, final, reference, n_pairs=0):
    """The closing summary: what was trained, held-out results, where final/ is, what to run next (reference:
    the alignment stage's π_ref, for that command); n_pairs: the training pairs, to say how many each epoch leaves
    out."""
    lines = ["", "=" * 72, "trained: " + " -> ".join(f"{s} ({n} steps)" for s, n in stages)
             + f" on {cfg.data}, model {cfg.model}, beta {cfg.beta}"
             + (f", lambda {cfg.lam}" if cfg.loss in SELF_REFINED else "")]
    if n_pairs % cfg.batch_size:
        lines.append(f"left out: {n_pairs % cfg.batch_size} of {n_pairs} pairs each epoch (not a multiple of "
                     f"--batch_size {cfg.batch_size})")
    if ev:
        under_p = f", {ev['p_accuracy']:.3f} under p+x" if "p_accuracy" in ev else ""
        lines.append(f"held-out accuracy: {ev['accuracy']:.3f} under x{under_p} ({ev['n_pairs']} pairs)")
        if "spearman" in ev:
            lines.append(f"Δπ vs true score gap: Spearman {ev['spearman']:+.3f}, Kendall {ev['kendall_tau_b']:+.3f}, "
                         f"pairs ranked by informativeness {ev['concordance']:.3f} (0.5 is chance)")
    lines += [f"final model: {final}  (a plain transformers folder)", f"next: {next_command(cfg, final, reference)}",
              "=" * 72]
    return "\n".join(lines)


def next_command(cfg, final, reference):
    """The evaluate.py accuracy command that measures final/ as the run's held-out evaluation did: its pairs
    (--eval_data, else the test split of --data, the first --eval_pairs), --beta, p, --max_length and the
    prompts' framing (--system_prompt, --chat_template_kwargs), all from the resolved config that was trained."""
    flags = {"model": final, "ref_model": reference, "data": cfg.eval_data or cfg.data, "beta": cfg.beta,
             "refine_prompt": cfg.refine_prompt, "max_length": cfg.max_length, "limit": cfg.eval_pairs,
             "system_prompt": cfg.system_prompt, "chat_template_kwargs": cfg.chat_template_kwargs}
    same = {"beta": defaults.BETA, "refine_prompt": defaults.REFINE_PROMPT, "max_length": defaults.MAX_LENGTH}
    given = {name: value for name, value in flags.items() if value and value != same.get(name)}  # evaluate.py's
    return shlex.join(["python", "evaluate.py", "accuracy",  # own defaults (defaults.py) left out
                       *[part for name, value in given.items() for part in (f"--{name}", str(value))]])


def logged_heldout(path, stage):
    """The last held-out metrics (its eval_* values, without the prefix) that metrics.jsonl at `path` holds for
    `stage`, or None: what a run resumed at its last step reports, having no evaluation of its own to run."""
    last = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                m = json.loads(line)
                if m.get("stage") == stage and "eval_accuracy" in m:
                    last = {k.removeprefix("eval_"): v for k, v in m.items() if k.startswith("eval_")}
    return last


# ----------------------------------------------------------------------------- TensorBoard and W&B

TRACKER_DIR = "tensorboard"
# metrics.jsonl key -> the name TRL's DPOTrainer logs it under (a held-out key "eval_K" maps as K does);
# other keys keep their own name. In TensorBoard and W&B each name goes under train/ or eval/.
TRL_NAMES = {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected", "margin": "rewards/margins",
             "accuracy": "rewards/accuracies", "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected",
             "reward_chosen_mean": "rewards/chosen", "reward_rejected_mean": "rewards/rejected",
             "margin_mean": "rewards/margins", "lr": "learning_rate"}


def tracker_name(key):
    """A metrics.jsonl key's name in TensorBoard / W&B: "margin" -> "train/rewards/margins", "eval_x" -> "eval/x"."""
    split, name = ("eval", key[len("eval_"):]) if key.startswith("eval_") else ("train", key)
    return f"{split}/{TRL_NAMES.get(name, name)}"


def tracker_backend(kind):
    """torch's SummaryWriter class, the wandb module, or None for "none"; ConfigError when not installed."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        if kind == "wandb":
            import wandb
            return wandb
    except ImportError:
        raise ConfigError(f"--report_to {kind} needs the {kind} package: pip install {kind}") from None
    return None


class Tracker:
    """Every numeric metrics.jsonl value of a step, sent to TensorBoard or W&B at its global step.

    backend: ``tracker_backend``'s result; start_step: the first global step this run logs. The run's
    config is recorded once (TensorBoard: the text "config"; W&B: the run's config). Older TensorBoard
    events from start_step on are hidden (purge_step), as metrics.jsonl drops the lines after the
    checkpoint that a run resumes from.
    """

    def __init__(self, cfg, backend, start_step):
        self.tensorboard, config = cfg.report_to == "tensorboard", dataclasses.asdict(cfg)
        if self.tensorboard:
            self.writer = backend(os.path.join(cfg.out_dir, TRACKER_DIR), purge_step=start_step)
            self.writer.add_text("config", json.dumps(config), start_step)
        else:
            self.run = backend.init(config=config, dir=cfg.out_dir)

    def log(self, m):
        values = {tracker_name(k): v for k, v in m.items()
                  if k not in ("step", "global_step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, m["global_step"])
            self.writer.flush()  # a crash loses no logged step
        else:
            self.run.log(values, step=m["global_step"])

    def close(self):
        if self.tensorboard:
            self.writer.close()
        else:
            self.run.finish()
