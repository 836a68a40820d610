"""train.py: SFT, DPO, IPO, Sr-DPO and Sr-IPO in one hand-written FSDP2 loop.

    python train.py                                  # the embedded default: tiny model, SFT then Sr-DPO
    torchrun --nproc_per_node=8 train.py --model EleutherAI/pythia-2.8b --data Anthropic/hh-rlhf ...

One process or many, the loop is the same: the model is sharded with FSDP2's ``fully_shard``
(each transformer block, then the root), over a process group of one when not under torchrun.
Owns: the flags (Config), the stages, the step, checkpoints and export, metrics.jsonl. Does not own:
the math (srpo.py), the data (data.py), model loading and sharding (models.py), or what is measured on
held-out pairs (metrics.py). The functions below come in the order they are called:

    per step: for each micro-batch of this rank's share of the global batch
        policy log π(y±|x)            one forward of chosen and rejected together, with grad
        reference log π_ref(y±|x)     no grad (or read from the --precompute_ref cache)
        Sr losses only: Δπ            policy and reference on p ⊕ x, no grad (Eq. 11)
        loss · world / global_batch   backward (SFT: / the global batch's response tokens); gradient sync last
    clip the gradient norm, RMSprop step, log, checkpoint atomically every --save_every steps.
"""

import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import typing

import torch
import torch.distributed as dist

import checkpoint
import common
import data
import metrics
import model_card
from models import (
    DTYPES,
    MODEL_RECORD,
    TINY,
    all_sum,
    check_model,
    choose_packing,
    frozen_copy,
    load_sharded,
    load_tokenizer,
    log,
    mixed_precision,
    model_record,
    setup_distributed,
    source_config,
    source_dtype,
    to_device,
    view_logps,
)
from srpo import LOSSES, REFINE_PROMPTS, SELF_REFINED, refinement

PACKINGS = ("auto", *data.PACKINGS)  # --packing (a Config field named data hides the module there)
LR_SCHEDULERS = ("constant", "linear", "cosine")  # --lr_scheduler, get_lr's kind
OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
FINAL, SFT_DIR, METRICS = "final", "sft", "metrics.jsonl"
CHECKPOINT, LOCK = checkpoint.CHECKPOINT, checkpoint.LOCK


class ConfigError(common.SrpoError):
    """A flag or a combination of flags that cannot work, in one line."""


class NonFiniteError(common.SrpoError):
    """A non-finite loss or gradient norm: the step is not applied; the message says which checkpoint is kept."""


def _flag(default, help_text, choices=None):
    """A Config field: its default, its --help text and, where it takes one of a few values, the choices."""
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


@dataclasses.dataclass
class Config:
    loss: str = _flag("sr-dpo", "the loss of the alignment stage (sft: SFT only)", ("sft", *LOSSES))
    beta: float = _flag(0.1, "β of Eqs. (4)-(14); the paper's 0.1")
    lam: float | None = _flag(None, "λ of Eq. (12) / Algorithm 2; Sr losses only; unset: 0.5, from the paper's grid")
    refine: str = _flag("prompt", "prompt: Δπ under p ⊕ x, Eq. (11); naive: Δ_naive under x, Eq. (10) (Table 4)",
                        ("prompt", "naive"))
    refine_prompt: str = _flag("100", "rating scale of the prompt p: 100 (the paper's) or 10 (Table 4)",
                               tuple(REFINE_PROMPTS))
    model: str = _flag(TINY, 'transformers name or local folder; "tiny": a small Pythia-shaped model from a config')
    ref_model: str = _flag("", "reference π_ref; unset: the starting policy (after the SFT stage, if any)")
    data: str = _flag("embedded", '"embedded", a .jsonl/.jsonl.gz/.json file, or a hub dataset name')
    eval_data: str = _flag("", "held-out pairs; unset: the test split of --data")
    max_pairs: int = _flag(0, "train on the first N pairs of --data only (0: all)")
    out_dir: str = _flag("out", "metrics.jsonl, checkpoint/, sft/, final/")
    sft_steps: int | None = _flag(None, "SFT steps on the chosen responses before alignment; unset: 300 for tiny, "
                                        "else 0")
    sft_quality_q: float = _flag(0.0, "--data embedded only: this share of the SFT pairs ask for a usefulness rating "
                                      "R in p's words, answered to match (data.embedded_sft_pairs)")
    lr: float | None = _flag(None, "peak learning rate; unset: the paper's 5e-7, or 1e-3 for the randomly "
                                   "initialised tiny model")
    warmup_steps: int | None = _flag(None, "linear warm-up of the learning rate, in steps (each stage); unset: 150 "
                                           "as the DPO reference code, or 9 for tiny")
    lr_scheduler: str = _flag("constant", "after the warm-up: constant (the paper's), or linear or cosine decay that "
                                          "reaches 0 one step after the stage's last (train.get_lr)", LR_SCHEDULERS)
    batch_size: int = _flag(64, "global pairs per optimizer step, split over ranks and micro-batches")
    micro_batch_size: int = _flag(0, "pairs per forward pass on one rank; 0: the rank's whole share (no "
                                     "accumulation)")
    max_length: int = _flag(512, "tokens per sequence, the longer p ⊕ x view included")
    truncate_x_only: bool = _flag(False, "DPO/IPO/SFT: fit --max_length to x alone, not to p ⊕ x as the Sr losses "
                                         "do (then the losses see different x-view tokens)")
    packing: str = _flag("auto", "batch layout: padded; packed (sequences back to back, no padding); shared (also "
                                 "each pair's prompt once); auto: the fastest that gives this model the padded "
                                 "log-probs (checked at start)", PACKINGS)
    pack_length: int = _flag(0, "tokens per packed row; 0: --max_length")
    epochs: float = _flag(1.0, "alignment epochs over --data ...")
    max_steps: int = _flag(-1, "... or this many alignment steps, whichever ends first (-1: no limit)")
    max_grad_norm: float = _flag(10.0, "gradient-norm clipping (> 0; inf: no clipping)")
    optimizer: str = _flag("rmsprop", "rmsprop (the paper's), adamw or sgd", tuple(OPTIMIZERS))
    precompute_ref: bool = _flag(False, "one pass of the reference model before training, then free it")
    activation_checkpointing: bool = _flag(False, "recompute block activations in backward to save memory")
    average_logps: bool = _flag(False, "per-token mean log-probs instead of the paper's sums (Appendix C)")
    eval_every: int = _flag(25, "held-out evaluation every this many steps (0: only at the end)")
    eval_pairs: int = _flag(200, "held-out pairs evaluated (0: all)")
    save_every: int = _flag(50, "checkpoint every this many steps (0: only on SIGTERM and at stage ends)")
    resume: bool = _flag(False, "continue from out_dir/checkpoint (its run-defining flags must be the same)")
    resume_force: bool = _flag(False, "with --resume: continue even where the run-defining flags differ")
    seed: int = _flag(0, "data order and tiny-model initialisation")
    device: str = _flag("auto", "auto: cuda when this machine has a GPU for every local rank, else cpu",
                        ("auto", "cuda", "cpu"))
    mixed_precision: str = _flag("auto", "bf16: bf16 compute, fp32 gradient reduction and master weights; fp32; "
                                         "auto: bf16 on CUDA, else fp32", ("auto", "bf16", "fp32"))
    save_dtype: str = _flag("auto", "dtype of sft/ and final/; auto: that of the model loaded", ("auto", *DTYPES))
    log_every: int = _flag(1, "progress line every this many steps")
    report_to: str = _flag("none", "also send every metrics.jsonl value to TensorBoard or W&B (rank 0; "
                                   "docs/tracking.md)", ("none", "tensorboard", "wandb"))


def main(argv=None):
    """Parse the flags, train, return the exit code: 0, or 2 with one line ``train.py: error: ...`` (rank 0)
    for the project's own errors (common.SrpoError) and running out of memory. Any other exception keeps its
    traceback. Under torchrun, a failure on any rank stops every rank (``Failures``)."""
    cfg = parse_config(argv)
    previous = signal.getsignal(signal.SIGTERM)  # restored on return, for callers of main() in-process
    rank, world, device = setup_distributed(cfg.device)
    failures = Failures(rank, world)
    try:
        validate(cfg, world)
        return run(resolved(cfg), rank, world, device)
    except (common.SrpoError, torch.OutOfMemoryError) as err:
        return failures.fail(str(err).strip().splitlines()[0], 2)
    except Exception as err:  # a bug: its traceback here; under torchrun also the one line, and every rank stopped
        if failures.store is None:
            raise
        traceback.print_exc()
        return failures.fail(f"{type(err).__name__}: {err}", 1)
    finally:
        failures.stop()
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


class Failures:
    """One rank's failure stops every rank within a second, its one-line error printed once, by rank 0.

    The failing rank posts its message to the process group's key-value store. A thread on every rank
    polls the store, so a rank blocked in a collective that the failed rank never joins sees it too:
    rank 0 prints the line, and every rank exits with the failure's status, without waiting on collectives.
    """

    KEY = f"srpo_failure_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def __init__(self, rank, world):
        self.rank = rank
        self.store = dist.distributed_c10d._get_default_store() if world > 1 else None
        self.done = threading.Event()
        if self.store is not None:
            threading.Thread(target=self._watch, daemon=True).start()

    def fail(self, message, status):
        """Report this rank's failure; returns `status` where the process is not ended for it (one process)."""
        if self.store is None:
            print(f"train.py: error: {message}", file=sys.stderr, flush=True)
            return status
        self.store.compare_set(self.KEY, "", f"{status} rank {self.rank}: {message}")  # the first one counts
        self.done.wait(30)  # the watching thread ends the process
        return status

    def stop(self):
        self.done.set()

    def _watch(self):
        while not self.done.wait(0.2):
            try:
                failed = self.store.check([self.KEY])
            except Exception:  # noqa: BLE001 (the store has closed: the run is over)
                return
            if failed:
                self._exit()

    def _exit(self):
        status = 1
        try:
            status, message = self.store.get(self.KEY).decode().split(" ", 1)
            if self.rank == 0:
                print(f"train.py: error: {message}", file=sys.stderr, flush=True)
                self.store.set(self.KEY + "_printed", "1")
            else:  # give rank 0 the moment it needs to print, unless it is gone
                self.store.wait([self.KEY + "_printed"], datetime.timedelta(seconds=5))
        finally:
            os._exit(int(status))


def parse_config(argv=None):
    """Config from --flags: one flag per field, its metadata as help and choices. Raises SystemExit on bad flags."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = f.type if isinstance(f.type, type) else typing.get_args(f.type)[0]  # `float | None` -> float
        help_text = f.metadata["help"].replace("%", "%%")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=f.metadata["choices"],
                                help=help_text)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        validate(cfg)
    except ConfigError as err:
        parser.exit(2, f"train.py: error: {err}\n")
    return cfg


def validate(cfg, world=1):
    """One-line ConfigErrors for flag values and combinations that would fail later."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"--{f.name} {value}: expected one of {', '.join(choices)}")
    if cfg.lam is not None and cfg.loss not in SELF_REFINED:
        raise ConfigError(f"--lam is used only by the Sr losses ({', '.join(sorted(SELF_REFINED))}), "
                          f"not --loss {cfg.loss}")
    if not cfg.beta > 0:
        raise ConfigError(f"--beta {cfg.beta}: must be positive")
    if not cfg.max_grad_norm > 0:
        raise ConfigError(f"--max_grad_norm {cfg.max_grad_norm}: must be positive (inf: no clipping); "
                          f"a negative norm would flip the gradient, 0 would zero it")
    if not cfg.epochs > 0:
        raise ConfigError(f"--epochs {cfg.epochs}: must be positive (--max_steps ends a run earlier)")
    for name, low in (("batch_size", 1), ("log_every", 1), ("max_length", 2), ("micro_batch_size", 0),
                      ("max_pairs", 0), ("eval_pairs", 0), ("eval_every", 0), ("save_every", 0),
                      ("warmup_steps", 0), ("sft_steps", 0)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name} {value}: must be at least {low}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"--lr {cfg.lr}: must be positive")
    if cfg.resume_force and not cfg.resume:
        raise ConfigError("--resume_force is used only with --resume")
    per_rank, rem = divmod(cfg.batch_size, world)
    micro = cfg.micro_batch_size or per_rank
    if rem or per_rank == 0 or per_rank % micro:
        raise ConfigError(f"--batch_size {cfg.batch_size} is not divisible by world size {world} x "
                          f"--micro_batch_size {micro}")
    no_sft = cfg.loss != "sft" and cfg.sft_steps == 0
    if cfg.sft_quality_q and (cfg.data != "embedded" or not 0 < cfg.sft_quality_q <= 1 or no_sft):
        raise ConfigError(f"--sft_quality_q {cfg.sft_quality_q}: needs a value in [0, 1], --data embedded "
                          f"(not {cfg.data}) and an SFT stage")
    if cfg.precompute_ref and cfg.loss == "sft":
        raise ConfigError("--precompute_ref needs a preference loss, not --loss sft")
    if cfg.pack_length < 0:
        raise ConfigError(f"--pack_length {cfg.pack_length}: must be >= 0")


def resolved(cfg):
    """The unset defaults filled in; the only place where they depend on the model."""
    tiny = cfg.model == TINY
    lam = cfg.lam if cfg.lam is not None else (0.5 if cfg.loss in SELF_REFINED else 0.0)
    return dataclasses.replace(
        cfg, lam=lam, pack_length=cfg.pack_length or cfg.max_length,
        lr=cfg.lr if cfg.lr is not None else (1e-3 if tiny else 5e-7),
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else (9 if tiny else 150),
        sft_steps=cfg.sft_steps if cfg.sft_steps is not None else (300 if tiny and cfg.loss != "sft" else 0))


def uses_p_view(cfg):
    """Whether the loss needs log-probs under p ⊕ x: the Sr losses with --refine prompt (Eq. 11)."""
    return cfg.loss in SELF_REFINED and cfg.refine == "prompt"


# ----------------------------------------------------------------------------- the run


def run(cfg, rank, world, device):
    """Check every path and model (``check_start``), hold out_dir's lock, and train (``train_stages``).

    cfg: a ``resolved`` Config. Returns 0; raises common.SrpoError subclasses for bad input, a checkpoint that
    cannot be resumed, another run on out_dir, and a non-finite loss.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    say = functools.partial(log, rank)
    backend = tracker_backend(cfg.report_to) if rank == 0 else None  # before the long passes: fail fast
    resume = check_start(cfg, rank, world, device, say)
    lock = checkpoint.Lock(cfg.out_dir, rank, world, log=say)
    try:
        return train_stages(cfg, rank, world, device, resume, backend, say)
    finally:
        lock.release()


def check_start(cfg, rank, world, device, say):
    """Every path and model of the run, checked before any work; returns the checkpoint to resume from
    (verified, and its run-defining flags the same as cfg's unless --resume_force), or None."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out_dir {cfg.out_dir}: cannot create the folder ({e.strerror})") from None
    check_model(cfg.model, "--model")
    if cfg.ref_model:
        check_model(cfg.ref_model, "--ref_model")
    for source in (cfg.data, cfg.eval_data):
        if source and source != "embedded":
            data.source_records(os.path.expanduser(source))  # a local path that is no data file fails here
    resume = checkpoint.find(cfg.out_dir) if cfg.resume else None
    if cfg.resume and all_sum([float(resume is not None)], device)[0] not in (0, world):
        raise ConfigError(f"--resume: {os.path.join(cfg.out_dir, CHECKPOINT)} is not seen by every rank; to "
                          f"resume on several nodes, --out_dir must be a folder that all of them share")
    if cfg.resume and resume is None:
        say(f"--resume: no checkpoint in {cfg.out_dir}; starting from the beginning")
    if resume:
        checkpoint.verify(resume, rank, world)
        if not cfg.resume_force:
            checkpoint.check_record(checkpoint.read_record(resume), checkpoint.run_record(cfg), resume)
    return resume


def train_stages(cfg, rank, world, device, resume, backend, say):
    """Train cfg's stages (an optional SFT stage, then the alignment loss) and export out_dir/final.

    Rank 0 writes metrics.jsonl (a line per step, the held-out eval_* keys every --eval_every steps) and the
    progress lines. Every --save_every steps, at each stage's end and on SIGTERM a checkpoint is written; on
    SIGTERM the run then returns early (rerun with --resume).
    """
    stop = Stop()
    tokenizer = load_tokenizer(cfg.model)
    examples, eval_examples = load_examples(cfg, tokenizer, say, progress=rank == 0 and sys.stdout)
    sft_examples = examples if not cfg.sft_quality_q else data.tokenize_pairs(
        data.embedded_sft_pairs(cfg.sft_quality_q)[:cfg.max_pairs or None], tokenizer, cfg.max_length, log=say)
    record = checkpoint.run_record(cfg, train_pairs=len(examples))
    if resume and not cfg.resume_force:
        checkpoint.check_record(checkpoint.read_record(resume), {"train_pairs": len(examples)}, resume)
    micro = cfg.micro_batch_size or cfg.batch_size // world
    score = functools.partial(metrics.pair_logps, pad_token_id=tokenizer.pad_token_id, batch_size=micro, rank=rank,
                              world=world, average=cfg.average_logps, pack_length=cfg.pack_length,
                              progress=sys.stdout)  # rank 0
    stages = plan(cfg, len(examples))
    if cfg.lr_scheduler != "constant":  # the decay's length is run-defining too
        record["stage_steps"] = [n for _, n in stages]
        if resume and not cfg.resume_force:
            checkpoint.check_record(checkpoint.read_record(resume), {"stage_steps": record["stage_steps"]}, resume)
    names = [name for name, _ in stages]
    saved = checkpoint.read_extra(resume, rank) if resume else None
    start_stage = saved["stage_index"] if saved else 0
    metrics_path = os.path.join(cfg.out_dir, METRICS)
    checkpoint.on_rank0(lambda: checkpoint.trim_metrics(
        metrics_path, lambda m: saved is not None and (names.index(m["stage"]), m["step"]) <= (
            saved["stage_index"], saved["step"]), say), rank, world)
    last_saved = f"{names[start_stage]} step {saved['step']}" if saved else None
    if start_stage > 0:  # the alignment stage starts from the SFT model that the first stage exported
        check_model(os.path.join(cfg.out_dir, SFT_DIR), "--resume: the SFT model")
    first_step = [sum(n for _, n in stages[:i]) for i in range(len(stages))]  # global step = first_step + step
    resumed_at = first_step[start_stage] + saved["step"] if saved else 0  # global steps already logged
    tracker = Tracker(cfg, backend, resumed_at + 1) if backend else None

    config = source_config(cfg.model, tokenizer)  # what sft/ and final/ write as their config.json
    card = functools.partial(model_card.model_card, dataclasses.asdict(cfg), train_pairs=len(examples),
                             refine_prompt=REFINE_PROMPTS[cfg.refine_prompt], command=model_card.command_line(
                                 dataclasses.asdict(cfg), dataclasses.asdict(resolved(Config(
                                     model=cfg.model, loss=cfg.loss, max_length=cfg.max_length)))))
    save_dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype != "auto" else source_dtype(config)
    policy, last = None, None
    for stage_index, (stage, n_steps) in enumerate(stages):
        if stage_index < start_stage:
            continue
        s = setup_stage(cfg, stage, stage_index, policy, examples, eval_examples, tokenizer, score, device, rank,
                        resume if stage_index == start_stage else None, say)
        policy, step = s.policy, s.step
        say(f"stage {stage}: {n_steps} steps of {cfg.batch_size} pairs ({world} rank(s) x "
            f"{cfg.batch_size // world // micro} micro-batch(es) of {micro}), lr {cfg.lr:g}"
            + (f", beta {cfg.beta}, lambda {cfg.lam}, refine {cfg.refine}" if stage in SELF_REFINED else "")
            + f"; {s.packing} batches"
            + (f" (rows of up to {cfg.pack_length} tokens)" if s.packing != "padded" else ""))
        batches = step_batches(sft_examples if stage == "sft" else examples, cfg, micro, tokenizer.pad_token_id, rank,
                               world, step, n_steps, s.packing,
                               chosen_only=stage == "sft")
        for micro_batches in batches:
            t0 = time.time()
            try:
                summed = train_step(policy, s.ref, s.cache, s.optimizer, micro_batches, cfg, stage, step, world,
                                    device, n_steps)
            except NonFiniteError as err:
                raise NonFiniteError(f"{err}; " + (f"the last checkpoint ({last_saved}) is kept: --resume continues "
                                                   f"from it" if last_saved else
                                                   "no checkpoint has been written (--save_every)")) from None
            step += 1
            m = step_metrics(summed, stage, step, time.time() - t0)
            m["global_step"] = first_step[stage_index] + step
            if s.eval_ref is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == n_steps):
                policy.eval()
                scores = score(policy, eval_examples, with_p=data.with_p_view(eval_examples), packing=s.packing)
                last = metrics.heldout_metrics(scores, s.eval_ref, eval_examples, cfg.beta)
                policy.train()
                m.update({f"eval_{k}": v for k, v in last.items() if isinstance(v, (int, float))})
            if rank == 0:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(m) + "\n")
                if step % cfg.log_every == 0 or step == n_steps:
                    print(progress_line(m, n_steps), flush=True)
                if tracker:
                    tracker.log(m)
            preempted = all_sum([float(stop.requested)], device)[0] > 0
            if preempted or (cfg.save_every and step % cfg.save_every == 0):
                last_saved = save_checkpoint(cfg.out_dir, policy, s.optimizer, stage, stage_index, step, record, rank,
                                             world)
            if preempted:
                say(f"SIGTERM: checkpoint written at {stage} step {step}; rerun with --resume to continue")
                if tracker:
                    tracker.close()
                return 0
        last_saved = save_checkpoint(cfg.out_dir, policy, s.optimizer, stage, stage_index, step, record, rank, world)
        if stage == "sft" and stage_index < len(stages) - 1:
            export(policy, tokenizer, os.path.join(cfg.out_dir, SFT_DIR), rank, config, save_dtype,
                   model_record(cfg.model, cfg.seed, dataclasses.asdict(cfg)), card(stages=stages[:1]))
            say(f"SFT model written to {os.path.join(cfg.out_dir, SFT_DIR)}")
    final = os.path.join(cfg.out_dir, FINAL)
    if policy is not None:
        export(policy, tokenizer, final, rank, config, save_dtype,
               model_record(reference_name(cfg), cfg.seed, dataclasses.asdict(cfg)), card(stages=stages, heldout=last))
    if tracker:
        tracker.close()
    say(summary(cfg, stages, last, final))
    return 0


class Stop:
    """SIGTERM (how preemption arrives) sets a flag; the loop checkpoints and exits at the step's end."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def load_examples(cfg, tokenizer, say, progress=False):
    """(training examples, held-out examples) tokenized. The held-out ones have the p ⊕ x view (its metrics)
    where p fits in --max_length, as the Sr losses need anyway; a run that does not need p otherwise
    evaluates under x only.

    The training examples have the p ⊕ x view only where the loss uses it, but every loss is cut to
    --max_length as the Sr losses are (``data.tokenize_pairs``' p_view=False), so that at the same --max_length
    all losses see the same x-view tokens (unless --truncate_x_only).
    """
    refine_prompt = REFINE_PROMPTS[cfg.refine_prompt]
    pairs = data.load_pairs(cfg.data, "train", log=say)[:cfg.max_pairs or None]
    fit_p = uses_p_view(cfg) or not cfg.truncate_x_only
    try:
        examples = data.tokenize_pairs(pairs, tokenizer, cfg.max_length, refine_prompt if fit_p else None, log=say,
                                       p_view=uses_p_view(cfg), progress=progress)
    except common.DataError as err:
        if uses_p_view(cfg):
            raise
        raise common.DataError(f"{err} (--loss {cfg.loss} is cut as if p ⊕ x were there, as the Sr losses are; "
                             f"--truncate_x_only fits x alone)") from None
    eval_source = cfg.eval_data or (None if os.path.isfile(cfg.data) else cfg.data)  # a file has one split
    if eval_source is None:
        say(f"no --eval_data for the file {cfg.data}: held-out evaluation is skipped")
        return examples, []
    eval_pairs = data.load_pairs(eval_source, "test", log=say)[:cfg.eval_pairs or None]
    try:
        return examples, data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, refine_prompt, log=say,
                                             progress=progress)
    except common.DataError as err:
        if uses_p_view(cfg):
            raise
        say(f"held-out pairs under x only: with p they do not fit ({err})")
        return examples, data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, None, log=say)


def plan(cfg, n_examples):
    """The run's stages as (name, steps): an optional SFT stage, then the alignment loss."""
    if cfg.loss == "sft":
        return [("sft", stage_steps(cfg, n_examples))]
    return ([("sft", cfg.sft_steps)] if cfg.sft_steps else []) + [(cfg.loss, stage_steps(cfg, n_examples))]


def stage_steps(cfg, n_examples):
    """Steps of the main stage (--loss): --epochs or --max_steps, whichever ends first (an SFT stage before an
    alignment loss runs --sft_steps)."""
    per_epoch = data.steps_per_epoch(n_examples, cfg.batch_size)
    if per_epoch == 0:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the {n_examples} training pairs")
    steps = int(cfg.epochs * per_epoch)
    return steps if cfg.max_steps < 0 else min(steps, cfg.max_steps)


@dataclasses.dataclass
class Stage:
    """What one stage trains with: the FSDP2 policy, π_ref (None when cached or SFT), the reference cache
    and the held-out reference scores (``metrics.pair_logps``), the optimizer, the step to start at, and the batch
    layout (``models.choose_packing``)."""
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    cache: dict | None
    eval_ref: dict | None
    optimizer: torch.optim.Optimizer
    step: int
    packing: str


def setup_stage(cfg, stage, stage_index, policy, examples, eval_examples, tokenizer, score, device, rank, resume,
                say):
    """Policy, reference, reference cache, held-out reference scores, optimizer, and the resumed state.

    `policy`: the previous stage's (the SFT model, in memory), which this stage continues from and, unless
    --ref_model, takes as π_ref; None for the run's first stage, which loads it (models.load_sharded).
    """
    start = os.path.join(cfg.out_dir, SFT_DIR) if stage_index > 0 else cfg.model
    mp, ref_dtype = mixed_precision(cfg.mixed_precision, device)
    load = functools.partial(load_sharded, tokenizer=tokenizer, device=device, mp_policy=mp, seed=cfg.seed)
    in_memory = policy is not None
    if not in_memory:
        policy = load(start, dtype=torch.float32, activation_checkpointing=cfg.activation_checkpointing)
    ref, cache, eval_ref = None, None, None
    if stage != "sft":  # π_ref is never updated
        ref = frozen_copy(policy, ref_dtype, mp) if in_memory and not cfg.ref_model \
            else load(cfg.ref_model or start, dtype=ref_dtype)
        ref.requires_grad_(False)
    packing = choose_packing(cfg.packing, [m for m in (policy, ref) if m is not None], device, say)
    score = functools.partial(score, packing=packing)
    if ref is not None:
        if eval_examples:  # π_ref is frozen: score the held-out pairs once
            eval_ref = score(ref, eval_examples, with_p=data.with_p_view(eval_examples))
        if cfg.precompute_ref:
            t0 = time.time()
            cache = score(ref, examples, with_p=uses_p_view(cfg))
            ref = None
            gc.collect()
            say(f"precomputed reference log-probs of {len(examples):,} pairs in {time.time() - t0:.1f}s; "
                f"reference model freed")
    policy.train()
    optimizer = OPTIMIZERS[cfg.optimizer](policy.parameters(), lr=cfg.lr)
    step = 0
    if resume:
        step = load_checkpoint(resume, policy, optimizer, rank)["step"]
        say(f"resumed {stage} at step {step} from {resume}")
    return Stage(policy, ref, cache, eval_ref, optimizer, step, packing)


def step_batches(examples, cfg, micro, pad_id, rank, world, start, stop, packing="padded", chosen_only=False):
    """This rank's share of each step from `start` to `stop` (stage-relative, from 0), collated into
    micro-batches of `micro` pairs in the `packing` layout (chosen_only: SFT's). The order is ``data.schedule``'s
    (reshuffled each epoch by --seed), so a resumed run takes exactly the batches of the uninterrupted run."""
    order = data.schedule(len(examples), cfg.batch_size, cfg.seed, rank=rank, world=world, start_step=start)
    for _, (_, _, indices) in zip(range(start, stop), order):
        yield [data.collate([examples[i] for i in indices[a:a + micro]], pad_id, packing, cfg.pack_length, chosen_only)
               for a in range(0, len(indices), micro)]


# ----------------------------------------------------------------------------- one step


def train_step(policy, ref, cache, optimizer, micro_batches, cfg, stage, step, world, device, n_steps=None):
    """One optimizer step over this rank's micro-batches (of a stage of n_steps). Returns its summed stats."""
    lr = get_lr(step, cfg.lr, cfg.warmup_steps, n_steps, cfg.lr_scheduler)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals = {}  # summed on the device; one host sync per step, not per micro-batch
    pairs = tokens = 0
    # The loss is summed over the global batch, then divided by `denominator`: its pairs, or for SFT its
    # response tokens (counted before any backward). FSDP averages gradients over ranks: hence the factor world.
    denominator = all_sum([sum(map(response_tokens, micro_batches))], device)[0] if stage == "sft" \
        else cfg.batch_size
    for i, batch in enumerate(micro_batches):
        pairs += batch["index"].numel()
        tokens += int(batch["n_tokens"])  # still on the CPU: no device sync
        batch = to_device(batch, device)
        policy.set_requires_gradient_sync(i == len(micro_batches) - 1)
        losses, stats = sft_terms(policy, batch, cfg) if stage == "sft" else \
            preference_terms(policy, ref, cache, batch, cfg)
        (losses.sum() * world / denominator).backward()
        for key, value in {"loss": losses.detach().sum(), **stats}.items():
            totals[key] = totals.get(key, 0.0) + value.double()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    keys = sorted(totals)
    local = torch.stack([totals[k] for k in keys] + [torch.tensor(float(pairs), dtype=torch.float64, device=device),
                                                     torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    dist.all_reduce(local)
    summed = dict(zip(keys + ["pairs", "tokens"], local.tolist()))
    summed["grad_norm"], summed["lr"], summed["denominator"] = grad_norm.item(), lr, denominator
    if not (math.isfinite(summed["loss"]) and math.isfinite(summed["grad_norm"])):
        raise NonFiniteError(
            f"non-finite loss ({summed['loss']:.4g}) or gradient norm ({summed['grad_norm']:.4g}) at {stage} "
            f"step {step + 1}; no update was applied")  # steps count from 1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return summed


def get_lr(step, peak_lr, warmup_steps, total_steps=None, kind="constant"):
    """The learning rate of step (from 0) of a stage of total_steps steps; pure, nanoGPT-style.

    Warm-up, steps 0 .. warmup_steps - 1: peak_lr * (step + 1) / (warmup_steps + 1), the DPO reference code's
    LambdaLR ramp, which reaches peak_lr at step warmup_steps. From there, with t = (step - warmup_steps) /
    max(1, total_steps - warmup_steps): constant peak_lr; linear peak_lr * max(0, 1 - t); cosine
    peak_lr * max(0, (1 + cos(π t)) / 2). The decays reach 0 at step total_steps, one after the stage's last.
    This is transformers' get_linear/cosine_schedule_with_warmup at step + 1 with warm-up warmup_steps + 1 and
    total_steps + 1 steps (tests/test_lr_schedule.py checks it).
    """
    if step < warmup_steps or kind == "constant":
        return peak_lr * min(1.0, (step + 1) / (warmup_steps + 1))
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return peak_lr * max(0.0, 1.0 - t)
    if kind == "cosine":
        return peak_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"get_lr: unknown kind {kind!r}; expected one of {', '.join(LR_SCHEDULERS)}")


def preference_terms(policy, ref, cache, batch, cfg):
    """Per-pair loss [B] and the summed statistics that the metrics need.

    The no-grad passes run first, so their scratch is freed before the policy's graph is held.
    """
    B = batch["index"].numel()
    need_p = uses_p_view(cfg)
    ref_x, ref_px = no_grad_logps(ref, cache, batch, need_p, cfg.average_logps)
    if need_p:  # Δπ, Eq. (11): the current policy on p ⊕ x, without grad
        with torch.no_grad():
            pol_p = view_logps(policy, batch, 2 * B, "p_", cfg.average_logps)
        delta = refinement(pol_p[:B], pol_p[B:], ref_px[:B], ref_px[B:], cfg.beta)
    pol = view_logps(policy, batch, 2 * B, "", cfg.average_logps)
    pc, pr, rc, rr = pol[:B], pol[B:], ref_x[:B], ref_x[B:]
    if cfg.loss in SELF_REFINED:
        if not need_p:  # Δ_naive, Eq. (10)
            delta = refinement(pc, pr, rc, rr, cfg.beta)
        losses = LOSSES[cfg.loss](pc, pr, rc, rr, delta, cfg.beta, cfg.lam)
    else:
        delta = torch.zeros_like(pc.detach())
        losses = LOSSES[cfg.loss](pc, pr, rc, rr, cfg.beta)
    return losses, metrics.preference_sums(*metrics.rewards(pc.detach(), pr.detach(), rc, rr, cfg.beta), delta,
                                           pc.detach(), pr.detach())


def response_tokens(batch):
    """The scored tokens of the batch's chosen responses (SFT's targets), counted by data.collate in any layout."""
    return int(batch["n_scored_chosen"])


def sft_terms(policy, batch, cfg):
    """Per-example SFT loss [B]: the summed negative log-likelihood of the chosen response's tokens.

    batch: collated with chosen_only (the B chosen sequences), in any layout. train_step divides by the global
    batch's response tokens: the loss is the mean NLL over all of them.
    """
    return -view_logps(policy, batch, batch["index"].numel(), ""), {}


def no_grad_logps(model, cache, batch, need_p, average=False):
    """log π_ref under x, and under p ⊕ x when need_p, without grad: rows of the --precompute_ref cache
    (``metrics.pair_logps`` of π_ref) when there is one, else a live pass of `model`.

    Shape: batch as ``data.collate`` makes it, B pairs, any layout. Returns ([2B], [2B] or None), chosen first.
    """
    if cache is not None:
        index, on = batch["index"].cpu(), batch["input_ids"].device

        def rows(view):
            return torch.cat([cache[view + "chosen"][index], cache[view + "rejected"][index]]).to(on)

        return rows(""), rows("p_") if need_p else None
    n = 2 * batch["index"].numel()
    with torch.no_grad():
        x = view_logps(model, batch, n, "", average)
        px = view_logps(model, batch, n, "p_", average) if need_p else None
    return x, px


def step_metrics(summed, stage, step, seconds):
    """The logged metrics of one step, from the stats summed over ranks (``metrics.preference_means``)."""
    n = summed["pairs"]
    m = {"stage": stage, "step": step, "loss": summed["loss"] / summed["denominator"], "grad_norm": summed["grad_norm"],
         "lr": summed["lr"], "examples_per_s": n / seconds, "tokens_per_s": summed["tokens"] / seconds}
    if stage != "sft":
        m.update(metrics.preference_means(summed, n))
    return m


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


def reference_name(cfg):
    """Where the reference model of the alignment stage comes from."""
    return cfg.ref_model or (os.path.join(cfg.out_dir, SFT_DIR) if cfg.sft_steps else cfg.model)


def summary(cfg, stages, ev, final):
    """The closing summary: what was trained, held-out results, where final/ is, what to run next."""
    lines = ["", "=" * 72, "trained: " + " -> ".join(f"{s} ({n} steps)" for s, n in stages)
             + f" on {cfg.data}, model {cfg.model}, beta {cfg.beta}"
             + (f", lambda {cfg.lam}" if cfg.loss in SELF_REFINED else "")]
    if ev:
        under_p = f", {ev['p_accuracy']:.3f} under p+x" if "p_accuracy" in ev else ""
        lines.append(f"held-out accuracy: {ev['accuracy']:.3f} under x{under_p} ({ev['n_pairs']} pairs)")
        if "spearman" in ev:
            lines.append(f"Δπ vs true score gap: Spearman {ev['spearman']:+.3f}, Kendall {ev['kendall_tau_b']:+.3f}, "
                         f"pairs ranked by informativeness {ev['concordance']:.3f} (0.5 is chance)")
    lines += [f"final model: {final}  (a plain transformers folder)",
              f"next: python evaluate.py accuracy --model {final} --ref_model {reference_name(cfg)} --data {cfg.data}",
              "=" * 72]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checkpoints


def _state(policy, optimizer):
    """The DCP state dict of policy and optimizer (sharded as they are)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}


def save_checkpoint(out_dir, policy, optimizer, stage, stage_index, step, record, rank, world):
    """out_dir/checkpoint, written atomically with its checksums and the run's record (checkpoint.save).
    Returns what it holds, "STAGE step N", for messages."""
    checkpoint.save(out_dir, _state(policy, optimizer), {"stage_index": stage_index, "step": step}, record, rank,
                    world)
    return f"{stage} step {step}"


def load_checkpoint(path, policy, optimizer, rank):
    """Restore model, optimizer and RNG in place from a verified checkpoint; return the saved extra dict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(policy, optimizer)
    extra = checkpoint.load(path, state, rank)
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    return extra


def export(policy, tokenizer, path, rank, config, dtype, record, card=None):
    """A plain transformers folder (save_pretrained with the tokenizer), written atomically by rank 0 alone.

    The weights are gathered to rank 0's CPU and cast to `dtype` one tensor at a time; config.json is the
    source's `config` (use_cache and dropout as it had them) with `dtype` recorded; `record` is written as
    models.MODEL_RECORD (the model's reference and the run's flags); `card`, the text of README.md (model_card.py).
    """
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for key in state:
            state[key] = state[key].to(dtype)
        with common.atomic_path(path) as tmp:
            policy.save_pretrained(tmp, state_dict=state)
            config = copy.deepcopy(config)
            config.dtype = dtype
            config.save_pretrained(tmp)  # replaces the training config that save_pretrained wrote
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, MODEL_RECORD), "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=1)
            if card:
                with common.atomic_open(os.path.join(tmp, "README.md")) as fh:
                    fh.write(card)
    del state
    dist.barrier()


# ----------------------------------------------------------------------------- experiment tracking

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


if __name__ == "__main__":
    sys.exit(main())
