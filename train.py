"""train.py: SFT, DPO, IPO, Sr-DPO and Sr-IPO in one hand-written FSDP2 loop.

    python train.py                                  # the embedded default: tiny model, SFT then Sr-DPO
    torchrun --nproc_per_node=8 train.py --model EleutherAI/pythia-2.8b --data Anthropic/hh-rlhf ...

One process or many, the loop is the same: the model is sharded with FSDP2's ``fully_shard``
(each transformer block, then the root), over a process group of one when not under torchrun.
Owns: main, the run from top to bottom (``train``: set-up, each stage, each step, held-out evaluation, logging,
checkpoints, export), what each stage trains on and with, the step (train_step, get_lr) and metrics.jsonl.
Does not own: the flags (training/config.py), the math (srpo.py), the data (data.py), model loading and sharding
(training/models.py), scoring passes (training/scoring.py), the metrics a step logs (training/metrics.py), the
process group and failures (training/distributed.py), checkpoints (training/checkpoint.py), the logged lines and
TensorBoard/W&B (training/tracking.py), or writing a model folder (export.py). From ``main`` to the loss is four
calls: main -> train -> train_step -> preference_terms -> srpo.LOSSES[...]. A step:

    for each micro-batch of this rank's share of the global batch
        policy log π(y±|x)            one forward of chosen and rejected together, with grad
        reference log π_ref(y±|x)     no grad (or read from the --precompute_ref cache)
        Sr losses only: Δπ            policy and reference on p ⊕ x, no grad (Eq. 11)
        loss · world / global_batch   backward (SFT: / the global batch's response tokens); gradient sync last
    clip the gradient norm, RMSprop step, log, checkpoint atomically every --save_every steps.
"""

import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist

import data
from base import common
from base.common import ConfigError
from base.embedded import embedded_sft_pairs
from base.formats import source_records
from export import export
from srpo import LOSSES, REFINE_PROMPTS, SELF_REFINED, refinement
from training import checkpoint, lora, metrics, model_card
from training.checkpoint import CHECKPOINT, FINAL, METRICS, SFT_DIR, load_checkpoint, save_checkpoint
from training.config import (
    LR_SCHEDULERS,
    OPTIMIZERS,
    Config,  # noqa: F401 - train.Config, for the benchmarks and tests that name it
    command_flags,
    parse_config,
    resolved,
    validate,
)
from training.distributed import REQUEUE_EXIT, SIGNALS, Failures, Preemption, all_sum, log, setup_distributed
from training.models import (
    DTYPES,
    check_model,
    check_models,
    frozen_copy,
    load_sharded,
    load_tokenizer,
    mixed_precision,
    model_record,
    source_config,
    source_dtype,
)
from training.scoring import choose_packing, pair_logps, view_logps
from training.tracking import Tracker, logged_heldout, progress_line, stage_line, summary, tracker_backend


class NonFiniteError(common.SrpoError):
    """A non-finite loss or gradient norm: the step is not applied; the message says which checkpoint is kept."""


class CollectiveTimeoutError(common.SrpoError):
    """A collective that not every rank joined within --collective_timeout (a rank hung or stopped)."""


def timed_out(err):
    """Whether `err` is a collective's timeout, in gloo's or NCCL's words (DistBackendError is a RuntimeError)."""
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in ("timed out", "timeout"))


def main(argv=None):
    """Parse the flags, train, return the exit code: 0, or 2 with one line ``train.py: error: ...`` (rank 0)
    for the project's own errors (common.SrpoError) and running out of memory. Any other exception keeps its
    traceback. Under torchrun, a failure on any rank stops every rank (``Failures``)."""
    cfg = parse_config(argv)
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}  # restored on return, for callers in-process
    rank, world, device = setup_distributed(cfg.device, cfg.collective_timeout)
    failures = Failures(rank, world)
    try:
        validate(cfg, world)
        return train(resolved(cfg), rank, world, device)
    except (common.SrpoError, torch.OutOfMemoryError) as err:
        return failures.fail(str(err).strip().splitlines()[0], 2)
    except Exception as err:  # a bug: its traceback here; under torchrun also the one line, and every rank stopped
        if timed_out(err):  # outside a step (a step's own names the step): loading, evaluation, a checkpoint
            return failures.fail(f"a collective timed out (--collective_timeout {cfg.collective_timeout:g}s): "
                                 f"another rank hung or stopped; {str(err).strip().splitlines()[0][:200]}", 2)
        if failures.store is None:
            raise
        traceback.print_exc()
        return failures.fail(f"{type(err).__name__}: {err}", 1)
    finally:
        failures.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the run, top to bottom


def train(cfg, rank, world, device):
    """Train cfg's stages (an optional SFT stage, then the alignment loss) and export out_dir/final.

    cfg: a ``resolved`` Config. Checks every path and model first (``check_start``) and holds out_dir's lock.
    Rank 0 writes metrics.jsonl (a line per step, the held-out eval_* keys every --eval_every steps) and the
    progress lines. Every --save_every steps, at each stage's end and on SIGTERM or SIGUSR1 a checkpoint is
    written; on either the run then returns early (rerun with --resume): 0 after SIGTERM, REQUEUE_EXIT after SIGUSR1.
    Returns 0; raises common.SrpoError subclasses for bad input, a checkpoint that cannot be resumed, another run
    on out_dir, and a non-finite loss.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    say = functools.partial(log, rank)
    backend = tracker_backend(cfg.report_to) if rank == 0 else None  # before the long passes: fail fast
    resume = check_start(cfg, rank, world, device, say)
    lock = checkpoint.Lock(cfg.out_dir, rank, world, log=say)
    try:
        # ---- set-up: the pairs, the stages, what sft/ and final/ are written with
        preemption = Preemption()  # SIGTERM, SIGUSR1: checkpoint at the step's end and return
        tokenizer = load_tokenizer(cfg.model)
        examples, eval_examples = load_examples(cfg, tokenizer, say, progress=rank == 0 and sys.stdout)
        sft_examples = examples if not cfg.sft_quality_q else data.tokenize_pairs(
            embedded_sft_pairs(cfg.sft_quality_q)[:cfg.max_pairs or None], tokenizer, cfg.max_length, log=say)
        if resume and not cfg.resume_force:
            checkpoint.check_record(checkpoint.read_record(resume), {"train_pairs": len(examples)}, resume)
        micro = cfg.micro_batch_size or cfg.batch_size // world
        # log π of every pair under a frozen model: the reference cache and the held-out scores
        score = functools.partial(pair_logps, pad_token_id=tokenizer.pad_token_id, batch_size=micro, rank=rank,
                                  world=world, average=cfg.average_logps, pack_length=cfg.pack_length,
                                  progress=sys.stdout)  # rank 0
        stages = plan(cfg, len(examples))
        data.steps_per_epoch(len(examples), cfg.batch_size, log=say)  # the pairs each epoch leaves out, said once
        record = checkpoint.run_record(cfg, train_pairs=len(examples))
        if cfg.lr_scheduler != "constant":  # the decay's length is run-defining too
            record["stage_steps"] = [n for _, n in stages]
            if resume and not cfg.resume_force:
                checkpoint.check_record(checkpoint.read_record(resume), {"stage_steps": record["stage_steps"]}, resume)
        first_step = [sum(n for _, n in stages[:i]) for i in range(len(stages))]  # global step = first_step + step
        config = source_config(cfg.model, tokenizer)  # what sft/ and final/ write as their config.json
        card = functools.partial(model_card.model_card, dataclasses.asdict(cfg), train_pairs=len(examples),
                                 dropped_pairs=sum(examples.dropped.values()),
                                 refine_prompt=REFINE_PROMPTS[cfg.refine_prompt],
                                 command=model_card.command_line(command_flags(cfg)))  # the flags that give cfg
        save_dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype != "auto" else source_dtype(config)
        if cfg.resume == "auto" and finished(cfg, stages, resume, rank, device):
            say(f"--resume auto: the run in {cfg.out_dir} has finished ({os.path.join(cfg.out_dir, FINAL)} is "
                f"written); nothing to do")
            return 0
        start_stage, logged, last_saved = resume_point(cfg, stages, first_step, resume, rank, world, say)
        tracker = Tracker(cfg, backend, logged + 1) if backend else None

        policy, last = None, None
        for stage_index in range(start_stage, len(stages)):
            # ---- each stage: its policy, reference, reference cache, held-out reference scores, optimizer
            stage, n_steps = stages[stage_index]
            if cfg.lora_r:  # LoRA: the SFT policy and what holds it freed; sft/ reloaded
                policy = ref = cache = eval_ref = optimizer = None
            policy, ref, packing = stage_models(cfg, stage, stage_index, policy, tokenizer, device, save_dtype, say)
            if cfg.overwrite and stage_index == start_stage:  # every flag, model and adapter checked: then remove
                start_over(cfg.out_dir, rank, world, say)
            cache, eval_ref = None, None  # the reference cache (--precompute_ref), the held-out reference scores
            if ref is not None:
                if eval_examples:  # π_ref is frozen: score the held-out pairs once
                    eval_ref = score(ref, eval_examples, with_p=data.with_p_view(eval_examples), packing=packing)
                if cfg.precompute_ref:
                    t0 = time.time()
                    cache = score(ref, examples, with_p=uses_p_view(cfg), packing=packing)
                    ref = None
                    gc.collect()
                    say(f"precomputed reference log-probs of {len(examples):,} pairs in {time.time() - t0:.1f}s; "
                        f"reference model freed")
            policy.train()
            lora.reshard(policy)  # the reference passes above may have been the policy's own forwards (LoRA)
            optimizer = OPTIMIZERS[cfg.optimizer](lora.trainable(policy), lr=cfg.lr)  # with LoRA, the adapters only
            step = 0
            if resume and stage_index == start_stage:
                step = load_checkpoint(resume, policy, optimizer, rank)["step"]
                say(f"resumed {stage} at step {step} from {resume}")
            say(stage_line(cfg, world, micro, stage, n_steps, packing))
            batches = step_batches(sft_examples if stage == "sft" else examples, cfg, micro, tokenizer.pad_token_id,
                                   rank, world, step, n_steps, packing, chosen_only=stage == "sft")
            for micro_batches in batches:
                # ---- each step: the update, its metrics (metrics.step_metrics) at their global step
                t0 = time.time()
                try:
                    summed = train_step(policy, ref, cache, optimizer, micro_batches, cfg, stage, step, world, device,
                                        n_steps)
                except (NonFiniteError, RuntimeError) as err:
                    failure = step_failure(err, cfg, stage, step, last_saved)
                    if failure is None:
                        raise
                    raise failure from None
                step += 1
                m = metrics.step_metrics(summed, stage, step, time.time() - t0)
                m["global_step"] = first_step[stage_index] + step

                # ---- held-out metrics every --eval_every steps and at the stage's end, as eval_* keys
                if eval_ref is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == n_steps):
                    policy.eval()
                    scores = score(policy, eval_examples, with_p=data.with_p_view(eval_examples), packing=packing)
                    last = metrics.heldout_metrics(scores, eval_ref, eval_examples, cfg.beta)
                    policy.train()
                    m.update({f"eval_{k}": v for k, v in last.items() if isinstance(v, (int, float))})

                # ---- rank 0 logs: metrics.jsonl, the progress line every --log_every steps, the tracker
                if rank == 0:
                    with open(os.path.join(cfg.out_dir, METRICS), "a") as fh:
                        fh.write(json.dumps(m) + "\n")
                    if m["step"] % cfg.log_every == 0 or m["step"] == n_steps:
                        print(progress_line(m, n_steps), flush=True)
                    if tracker:
                        tracker.log(m)

                # ---- a checkpoint every --save_every steps, and after SIGTERM or SIGUSR1 on any rank
                got = all_sum([float(sig in preemption.received) for sig in SIGNALS], device)
                preempted = next((sig.name for sig, n in reversed(list(zip(SIGNALS, got))) if n > 0), "")
                if preempted or (cfg.save_every and step % cfg.save_every == 0):
                    last_saved = save_checkpoint(cfg.out_dir, policy, optimizer, stage, stage_index, step, record,
                                                 rank, world)
                if preempted:  # SIGUSR1 on any rank asks for a requeue
                    requeue = preempted == "SIGUSR1"
                    say(f"{preempted}: checkpoint written at {stage} step {step}; " + (
                        f"exiting with status {REQUEUE_EXIT} (requeue me); --resume auto continues" if requeue else
                        "rerun with --resume to continue"))
                    if tracker:
                        tracker.close()
                    return REQUEUE_EXIT if requeue else 0

            # ---- the stage's end: its last checkpoint; after an SFT stage that another follows, out_dir/sft
            last_saved = save_checkpoint(cfg.out_dir, policy, optimizer, stage, stage_index, step, record, rank,
                                         world)
            if stage == "sft" and stage_index < len(stages) - 1:
                export(policy, tokenizer, os.path.join(cfg.out_dir, SFT_DIR), rank, config, save_dtype,
                       model_record(cfg.model, cfg.seed, dataclasses.asdict(cfg)), card(stages=stages[:1]),
                       adapter_base=cfg.model)
                say(f"SFT model written to {os.path.join(cfg.out_dir, SFT_DIR)}")

        # ---- the run's end: final/, the summary
        final = os.path.join(cfg.out_dir, FINAL)
        last = last or logged_heldout(os.path.join(cfg.out_dir, METRICS), stages[-1][0])  # resumed at the end
        if policy is not None:
            lora_base = os.path.join(cfg.out_dir, SFT_DIR) if len(stages) > 1 else cfg.model  # final/adapter's base
            export(policy, tokenizer, final, rank, config, save_dtype,
                   model_record(reference_name(cfg), cfg.seed, dataclasses.asdict(cfg)), card(stages=stages,
                                                                                            heldout=last),
                   adapter_base=lora_base)
        if tracker:
            tracker.close()
        say(summary(cfg, stages, last, final, reference_name(cfg), len(examples)))
        return 0
    finally:
        lock.release()


# ----------------------------------------------------------------------------- set-up


def check_start(cfg, rank, world, device, say):
    """Every path and model of the run, checked before any work; returns the checkpoint to resume from
    (verified, and its run-defining flags the same as cfg's unless --resume_force), or None."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out_dir {cfg.out_dir}: cannot create the folder ({e.strerror})") from None
    check_models(cfg.model, cfg.ref_model, cfg.max_length)
    for source in (cfg.data, cfg.eval_data):
        if source and source != "embedded":
            source_records(os.path.expanduser(source))  # a local path that is no data file fails here
    found = checkpoint.find(cfg.out_dir)
    resume = found if cfg.resume else None
    checkpoint.check_out_dir(cfg, found, all_sum([float(bool(checkpoint.run_entries(cfg.out_dir)))], device)[0] > 0)
    if cfg.resume and all_sum([float(resume is not None)], device)[0] not in (0, world):
        raise ConfigError(f"--resume: {os.path.join(cfg.out_dir, CHECKPOINT)} is not seen by every rank; to "
                          f"resume on several nodes, --out_dir must be a folder that all of them share")
    if cfg.resume and resume is None:
        say(f"--resume{' auto' if cfg.resume == 'auto' else ''}: no checkpoint in {cfg.out_dir}; starting from the "
            f"beginning")
    if resume:
        checkpoint.verify(resume, rank, world)
        if not cfg.resume_force:
            checkpoint.check_record(checkpoint.read_record(resume), checkpoint.run_record(cfg), resume)
    return resume


def start_over(out_dir, rank, world, say):
    """--overwrite: the previous run's entries (checkpoint.run_entries) removed (one process per node, as each node
    may have its own out_dir), under the lock, once every flag, model and adapter is checked (train)."""
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        gone = checkpoint.run_entries(out_dir)
        for name in gone:
            path = os.path.join(out_dir, name)
            try:  # another node's process may remove a shared out_dir's entries at the same time
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            except FileNotFoundError:
                pass
        if gone:
            say(f"--overwrite: removed {', '.join(gone)} from {out_dir}; starting over")
    if world > 1:
        dist.barrier()


def uses_p_view(cfg):
    """Whether the loss needs log-probs under p ⊕ x: the Sr losses with --refine prompt (Eq. 11)."""
    return cfg.loss in SELF_REFINED and cfg.refine == "prompt"


def load_examples(cfg, tokenizer, say, progress=False):
    """(training examples, held-out examples) tokenized. The held-out ones have the p ⊕ x view (its metrics)
    where p fits in --max_length, as the Sr losses need anyway; a run that does not need p otherwise
    evaluates under x only.

    The training examples have the p ⊕ x view only where the loss uses it, but every loss is cut to
    --max_length as the Sr losses are (``data.tokenize_pairs``' p_view=False), so that at the same --max_length
    all losses see the same x-view tokens (unless --truncate_x_only).
    """
    refine_prompt = REFINE_PROMPTS[cfg.refine_prompt]
    chat = data.ChatOptions.of(cfg.chat_template_kwargs, cfg.system_prompt)
    loaded = data.load_pairs(cfg.data, "train", log=say)
    pairs = loaded[:cfg.max_pairs or None]
    fit_p = uses_p_view(cfg) or not cfg.truncate_x_only
    try:
        examples = data.tokenize_pairs(pairs, tokenizer, cfg.max_length, refine_prompt if fit_p else None, log=say,
                                       p_view=uses_p_view(cfg), progress=progress, chat=chat)
    except common.DataError as err:
        if uses_p_view(cfg):
            raise
        raise common.DataError(f"{err} (--loss {cfg.loss} is cut as if p ⊕ x were there, as the Sr losses are; "
                             f"--truncate_x_only fits x alone)") from None
    examples.dropped.update(loaded.dropped)  # what the model card reports: dropped reading or tokenizing
    eval_source = cfg.eval_data or (None if os.path.isfile(cfg.data) else cfg.data)  # a file has one split
    if eval_source is None:
        say(f"no --eval_data for the file {cfg.data}: held-out evaluation is skipped")
        return examples, []
    eval_pairs = data.load_pairs(eval_source, "test", log=say)[:cfg.eval_pairs or None]
    try:
        return examples, data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, refine_prompt, log=say,
                                             progress=progress, chat=chat)
    except common.DataError as err:
        if uses_p_view(cfg):
            raise
        say(f"held-out pairs under x only: with p they do not fit ({err})")
        return examples, data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, None, log=say, chat=chat)


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


def finished(cfg, stages, resume, rank, device):
    """Whether the checkpoint `resume` is at the last step of the last stage and final/ is written (rank 0's
    answer, which every rank takes: final/ is on rank 0's node)."""
    saved = checkpoint.read_extra(resume, rank) if resume else None
    done = bool(saved) and (saved["stage_index"], saved["step"]) == (len(stages) - 1, stages[-1][1]) and \
        os.path.exists(os.path.join(cfg.out_dir, FINAL, "config.json"))
    return all_sum([float(done and rank == 0)], device)[0] > 0


def resume_point(cfg, stages, first_step, resume, rank, world, say):
    """(the stage to start at, the global steps already logged, what the checkpoint holds: "STAGE step N" or None)
    from the checkpoint `resume` (None: 0, 0, None). Cuts metrics.jsonl back to it and, past the SFT stage, checks
    the SFT model."""
    saved = checkpoint.read_extra(resume, rank) if resume else None
    names = before = [name for name, _ in stages]
    if saved and cfg.resume_force:  # the checkpoint's run may have had other stages (another --loss, --sft_steps)
        try:
            before = checkpoint.stage_names(checkpoint.read_record(resume))
        except checkpoint.CheckpointError:
            pass
        checkpoint.check_stage(resume, before, names, saved["stage_index"], saved["step"])
    if not saved:  # a new run: nothing to cut back (--overwrite removes metrics.jsonl once all is checked)
        return 0, 0, None
    position = {**{n: i for i, n in enumerate(names)}, **{n: i for i, n in enumerate(before)}}
    checkpoint.on_rank0(lambda: checkpoint.trim_metrics(
        os.path.join(cfg.out_dir, METRICS), lambda m: saved is not None and (position[m["stage"]], m["step"]) <= (
            saved["stage_index"], saved["step"]), say), rank, world)
    if saved["stage_index"] > 0:  # the alignment stage starts from the SFT model that the first stage exported
        check_model(os.path.join(cfg.out_dir, SFT_DIR), "--resume: the SFT model")
    return (saved["stage_index"], first_step[saved["stage_index"]] + saved["step"],
            f"{names[saved['stage_index']]} step {saved['step']}")


def stage_models(cfg, stage, stage_index, policy, tokenizer, device, save_dtype, say):
    """(policy, π_ref, batch layout) of one stage: π_ref is None for SFT; the layout is ``scoring.choose_packing``'s.

    `policy`: the previous stage's (the SFT model, in memory), which this stage continues from and, unless
    --ref_model, takes as π_ref (rounded through --save_dtype, as sft/ holds it and a resumed run loads it); None
    for the run's first stage, which loads it (models.load_sharded).
    """
    start = os.path.join(cfg.out_dir, SFT_DIR) if stage_index > 0 else cfg.model
    mp, ref_dtype = mixed_precision(cfg.mixed_precision, device)
    load = functools.partial(load_sharded, tokenizer=tokenizer, device=device, mp_policy=mp, seed=cfg.seed)
    in_memory = policy is not None  # LoRA: train passes None; alignment reloads sft/ (merged), fresh adapters
    if not in_memory:
        gc.collect()  # LoRA: the SFT policy, dropped by train, freed before sft/ is loaded
        policy = load(start, dtype=torch.float32, activation_checkpointing=cfg.activation_checkpointing,
                      adapt=lora.adapter(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed))
        if cfg.lora_r:
            say(lora.describe(policy))
    ref = None
    if stage != "sft" and cfg.lora_r and not cfg.ref_model:  # LoRA: π_ref is the base, adapters off
        ref = lora.Reference(policy)
    elif stage != "sft":  # π_ref is never updated
        ref = frozen_copy(policy, ref_dtype, mp, via=save_dtype) if in_memory and not cfg.ref_model \
            else load(cfg.ref_model or start, dtype=ref_dtype)
        ref.requires_grad_(False)
    packing = choose_packing(cfg.packing, [m for m in (policy, ref) if m is not None], device, say)
    return policy, ref, packing


def step_batches(examples, cfg, micro, pad_id, rank, world, start, end, packing="padded", chosen_only=False):
    """This rank's share of each step from `start` to `end` (stage-relative, from 0), collated into
    micro-batches of `micro` pairs in the `packing` layout (chosen_only: SFT's). The order is ``data.schedule``'s
    (reshuffled each epoch by --seed), so a resumed run takes exactly the batches of the uninterrupted run."""
    order = data.schedule(len(examples), cfg.batch_size, cfg.seed, rank=rank, world=world, start_step=start)
    for _, (_, _, indices) in zip(range(start, end), order):
        yield [data.collate([examples[i] for i in indices[a:a + micro]], pad_id, packing, cfg.pack_length, chosen_only)
               for a in range(0, len(indices), micro)]


def step_failure(err, cfg, stage, step, last_saved):
    """The error that a failed step (stage step `step`, from 0) ends the run with, saying which checkpoint --resume
    would continue from: a NonFiniteError, a CollectiveTimeoutError, or None for another error (re-raised)."""
    kept = (f"the last checkpoint ({last_saved}) is kept: --resume continues from it" if last_saved
            else "no checkpoint has been written (--save_every)")
    if isinstance(err, NonFiniteError):
        return NonFiniteError(f"{err}; {kept}")
    if not timed_out(err):
        return None
    return CollectiveTimeoutError(f"no reply from every rank within --collective_timeout {cfg.collective_timeout:g}s "
                                  f"at {stage} step {step + 1} (a rank hung or stopped); {kept}")


# ----------------------------------------------------------------------------- one step


def train_step(policy, ref, cache, optimizer, micro_batches, cfg, stage, step, world, device, n_steps=None):
    """One optimizer step over this rank's micro-batches (of a stage of n_steps). Returns the step's stats summed
    over all ranks."""
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
        batch = data.to_device(batch, device)
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
        with torch.no_grad(), lora.eval_mode(policy):  # LoRA: no adapter dropout
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
    (``scoring.pair_logps`` of π_ref) when there is one, else a live pass of `model`.

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


def reference_name(cfg):
    """Where the reference model of the alignment stage comes from."""
    return cfg.ref_model or (os.path.join(cfg.out_dir, SFT_DIR) if cfg.sft_steps else cfg.model)


if __name__ == "__main__":
    sys.exit(main())
