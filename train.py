"""train.py: SFT, DPO, IPO, Sr-DPO and Sr-IPO in one hand-written FSDP2 loop.

    python train.py                                  # the embedded default: tiny model, SFT then Sr-DPO
    torchrun --nproc_per_node=8 train.py --model EleutherAI/pythia-2.8b --data Anthropic/hh-rlhf ...

One process or many, the loop is the same: the model is sharded with FSDP2's ``fully_shard``
(each transformer block, then the root), over a process group of one when not under torchrun.
Owns: main, the loop over the stages (train_stages and the named parts of a step's bookkeeping), the step
(train_step, get_lr) and metrics.jsonl. Does not own: the flags (config.py), the math (srpo.py), the data
(data.py), each stage's models, optimizer and batches (stages.py), model loading, sharding and export
(models.py), the process group and failures (distributed.py), checkpoints (checkpoint.py), the logged lines
and TensorBoard/W&B (tracking.py), or what is measured on held-out pairs (metrics.py). The functions below
come in the order they are called:

    per step: for each micro-batch of this rank's share of the global batch
        policy log π(y±|x)            one forward of chosen and rejected together, with grad
        reference log π_ref(y±|x)     no grad (or read from the --precompute_ref cache)
        Sr losses only: Δπ            policy and reference on p ⊕ x, no grad (Eq. 11)
        loss · world / global_batch   backward (SFT: / the global batch's response tokens); gradient sync last
    clip the gradient norm, RMSprop step, log, checkpoint atomically every --save_every steps.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
import typing

import torch
import torch.distributed as dist

import checkpoint
import common
import data
import lora
import metrics
import model_card
from checkpoint import CHECKPOINT, FINAL, METRICS, SFT_DIR, save_checkpoint
from common import ConfigError
from config import LR_SCHEDULERS, Config, command_flags, parse_config, resolved, validate  # noqa: F401 - train.Config
from distributed import REQUEUE_EXIT, SIGNALS, Failures, Stop, all_sum, log, setup_distributed
from embedded import embedded_sft_pairs
from export import export
from formats import source_records
from models import (
    DTYPES,
    check_model,
    check_models,
    load_tokenizer,
    model_record,
    source_config,
    source_dtype,
    to_device,
)
from scoring import view_logps
from srpo import LOSSES, REFINE_PROMPTS, SELF_REFINED, refinement
from stages import load_examples, plan, setup_stage, step_batches, uses_p_view
from tracking import Tracker, logged_heldout, progress_line, stage_line, step_metrics, summary, tracker_backend


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
        return run(resolved(cfg), rank, world, device)
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
    may have its own out_dir), under the lock, once every flag, model and adapter is checked (train_stages)."""
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


def train_stages(cfg, rank, world, device, resume, backend, say):
    """Train cfg's stages (an optional SFT stage, then the alignment loss) and export out_dir/final.

    Rank 0 writes metrics.jsonl (a line per step, the held-out eval_* keys every --eval_every steps) and the
    progress lines. Every --save_every steps, at each stage's end and on SIGTERM or SIGUSR1 a checkpoint is
    written; on either the run then returns early (rerun with --resume): 0 after SIGTERM, REQUEUE_EXIT after SIGUSR1.
    """
    run = prepare_run(cfg, rank, world, device, resume, say)
    if cfg.resume == "auto" and finished(cfg, run, resume):
        say(f"--resume auto: the run in {cfg.out_dir} has finished ({os.path.join(cfg.out_dir, FINAL)} is written); "
            f"nothing to do")
        return 0
    start_stage, logged = resume_bookkeeping(cfg, run, resume)
    tracker = Tracker(cfg, backend, logged + 1) if backend else None
    policy, last, s = None, None, None
    for stage_index in range(start_stage, len(run.stages)):
        stage, n_steps = run.stages[stage_index]
        policy, s = (None, None) if cfg.lora_r else (policy, s)  # LoRA: the SFT policy freed; sft/ reloaded
        s = setup_stage(cfg, run, stage_index, policy, resume if stage_index == start_stage else None)
        if cfg.overwrite and stage_index == start_stage:  # every flag, model and adapter checked: then remove
            start_over(cfg.out_dir, rank, world, say)
        policy, step = s.policy, s.step
        say(stage_line(cfg, run, stage, n_steps, s.packing))
        batches = step_batches(run.sft_examples if stage == "sft" else run.examples, cfg, run.micro,
                               run.tokenizer.pad_token_id, rank, world, step, n_steps, s.packing,
                               chosen_only=stage == "sft")
        for micro_batches in batches:
            m = timed_step(cfg, run, s, micro_batches, stage_index, step)
            step += 1
            last = heldout_eval(cfg, run, s, m, n_steps) or last
            log_step(cfg, run, m, n_steps, tracker)
            preempted = save_if_due(cfg, run, s, stage_index, step)
            if preempted:  # SIGTERM or SIGUSR1: checkpoint written, stop here
                requeue = preempted == "SIGUSR1"
                say(f"{preempted}: checkpoint written at {stage} step {step}; " + (
                    f"exiting with status {REQUEUE_EXIT} (requeue me); --resume auto continues" if requeue else
                    "rerun with --resume to continue"))
                if tracker:
                    tracker.close()
                return REQUEUE_EXIT if requeue else 0
        end_stage(cfg, run, s, stage_index, step)
    final = os.path.join(cfg.out_dir, FINAL)
    last = last or logged_heldout(os.path.join(cfg.out_dir, METRICS), run.stages[-1][0])  # resumed at the end
    if policy is not None:
        export(policy, run.tokenizer, final, rank, run.config, run.save_dtype,
               model_record(reference_name(cfg), cfg.seed, dataclasses.asdict(cfg)), run.card(stages=run.stages,
                                                                                            heldout=last),
               adapter_base=lora_base(cfg, run))
    if tracker:
        tracker.close()
    say(summary(cfg, run.stages, last, final, reference_name(cfg), len(run.examples)))
    return 0


@dataclasses.dataclass
class Run:
    """What every stage of one run shares: the process (rank, world, device, say), the tokenized pairs, the
    stages as (name, steps) with the global step each starts at, the micro-batch size, the run's record for
    checkpoints, ``score`` (``metrics.pair_logps`` bound once to this run's batches), where sft/ and final/ get
    their config and dtype, the SIGTERM/SIGUSR1 flag, the model card's text, and what the last checkpoint holds
    ("STAGE step N", or None)."""
    rank: int
    world: int
    device: torch.device
    say: typing.Callable
    tokenizer: typing.Any
    examples: list
    sft_examples: list
    eval_examples: list
    stages: list
    first_step: list
    micro: int
    record: dict
    score: typing.Callable
    config: typing.Any
    save_dtype: torch.dtype
    preemption: Stop
    card: typing.Callable  # model_card.model_card with what the run knows; its stages and held-out metrics to come
    last_saved: str | None = None


def prepare_run(cfg, rank, world, device, resume, say):
    """The Run: the SIGTERM and SIGUSR1 handlers set, the tokenizer loaded, the pairs tokenized (their count
    checked against the checkpoint `resume`'s record), the stages planned."""
    preemption = Stop()
    tokenizer = load_tokenizer(cfg.model)
    examples, eval_examples = load_examples(cfg, tokenizer, say, progress=rank == 0 and sys.stdout)
    sft_examples = examples if not cfg.sft_quality_q else data.tokenize_pairs(
        embedded_sft_pairs(cfg.sft_quality_q)[:cfg.max_pairs or None], tokenizer, cfg.max_length, log=say)
    if resume and not cfg.resume_force:
        checkpoint.check_record(checkpoint.read_record(resume), {"train_pairs": len(examples)}, resume)
    micro = cfg.micro_batch_size or cfg.batch_size // world
    score = functools.partial(metrics.pair_logps, pad_token_id=tokenizer.pad_token_id, batch_size=micro, rank=rank,
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
    return Run(rank, world, device, say, tokenizer, examples, sft_examples, eval_examples, stages, first_step, micro,
               record, score, config, save_dtype, preemption, card)


def finished(cfg, run, resume):
    """Whether the checkpoint `resume` is at the last step of the last stage and final/ is written (rank 0's
    answer, which every rank takes: final/ is on rank 0's node)."""
    saved = checkpoint.read_extra(resume, run.rank) if resume else None
    done = bool(saved) and (saved["stage_index"], saved["step"]) == (len(run.stages) - 1, run.stages[-1][1]) and \
        os.path.exists(os.path.join(cfg.out_dir, FINAL, "config.json"))
    return all_sum([float(done and run.rank == 0)], run.device)[0] > 0


def resume_bookkeeping(cfg, run, resume):
    """(the stage to start at, the global steps already logged): from the checkpoint `resume` (None: 0, 0).
    Cuts metrics.jsonl back to it and, past the SFT stage, checks the SFT model."""
    saved = checkpoint.read_extra(resume, run.rank) if resume else None
    names = before = [name for name, _ in run.stages]
    if saved and cfg.resume_force:  # the checkpoint's run may have had other stages (another --loss, --sft_steps)
        try:
            before = checkpoint.stage_names(checkpoint.read_record(resume))
        except checkpoint.CheckpointError:
            pass
        checkpoint.check_stage(resume, before, names, saved["stage_index"], saved["step"])
    if not saved:  # a new run: nothing to cut back (--overwrite removes metrics.jsonl once all is checked)
        return 0, 0
    position = {**{n: i for i, n in enumerate(names)}, **{n: i for i, n in enumerate(before)}}
    checkpoint.on_rank0(lambda: checkpoint.trim_metrics(
        os.path.join(cfg.out_dir, METRICS), lambda m: saved is not None and (position[m["stage"]], m["step"]) <= (
            saved["stage_index"], saved["step"]), run.say), run.rank, run.world)
    run.last_saved = f"{names[saved['stage_index']]} step {saved['step']}"
    if saved["stage_index"] > 0:  # the alignment stage starts from the SFT model that the first stage exported
        check_model(os.path.join(cfg.out_dir, SFT_DIR), "--resume: the SFT model")
    return saved["stage_index"], run.first_step[saved["stage_index"]] + saved["step"]


def timed_step(cfg, run, s, micro_batches, stage_index, step):
    """``train_step`` of stage step `step` (from 0), as the metrics it logs (``step_metrics``) with its global
    step; a NonFiniteError also says which checkpoint --resume would continue from."""
    stage = run.stages[stage_index][0]
    t0 = time.time()
    try:
        summed = train_step(s.policy, s.ref, s.cache, s.optimizer, micro_batches, cfg, stage, step, run.world,
                            run.device, run.stages[stage_index][1])
    except (NonFiniteError, RuntimeError) as err:
        kept = (f"the last checkpoint ({run.last_saved}) is kept: --resume continues from it" if run.last_saved
                else "no checkpoint has been written (--save_every)")
        if isinstance(err, NonFiniteError):
            raise NonFiniteError(f"{err}; {kept}") from None
        if not timed_out(err):
            raise
        raise CollectiveTimeoutError(f"no reply from every rank within --collective_timeout "
                                     f"{cfg.collective_timeout:g}s at {stage} step {step + 1} (a rank hung or "
                                     f"stopped); {kept}") from None
    m = step_metrics(summed, stage, step + 1, time.time() - t0)
    m["global_step"] = run.first_step[stage_index] + step + 1
    return m


def heldout_eval(cfg, run, s, m, n_steps):
    """The held-out metrics (``metrics.heldout_metrics``) every --eval_every steps and at the stage's end, also
    added to m as eval_* keys; None at other steps and without held-out pairs or π_ref."""
    step = m["step"]
    if s.eval_ref is None or not ((cfg.eval_every and step % cfg.eval_every == 0) or step == n_steps):
        return None
    s.policy.eval()
    scores = run.score(s.policy, run.eval_examples, with_p=data.with_p_view(run.eval_examples), packing=s.packing)
    last = metrics.heldout_metrics(scores, s.eval_ref, run.eval_examples, cfg.beta)
    s.policy.train()
    m.update({f"eval_{k}": v for k, v in last.items() if isinstance(v, (int, float))})
    return last


def log_step(cfg, run, m, n_steps, tracker):
    """Rank 0: m as a metrics.jsonl line, the progress line every --log_every steps, and to the tracker."""
    if run.rank != 0:
        return
    with open(os.path.join(cfg.out_dir, METRICS), "a") as fh:
        fh.write(json.dumps(m) + "\n")
    if m["step"] % cfg.log_every == 0 or m["step"] == n_steps:
        print(progress_line(m, n_steps), flush=True)
    if tracker:
        tracker.log(m)


def save_if_due(cfg, run, s, stage_index, step):
    """A checkpoint every --save_every steps and after SIGTERM or SIGUSR1 on any rank; returns the signal's name
    ("SIGUSR1" where any rank had it, which asks for a requeue), or "" where none came."""
    got = all_sum([float(sig in run.preemption.received) for sig in SIGNALS], run.device)
    preempted = next((sig.name for sig, n in reversed(list(zip(SIGNALS, got))) if n > 0), "")
    if preempted or (cfg.save_every and step % cfg.save_every == 0):
        run.last_saved = save_checkpoint(cfg.out_dir, s.policy, s.optimizer, run.stages[stage_index][0], stage_index,
                                         step, run.record, run.rank, run.world)
    return preempted


def end_stage(cfg, run, s, stage_index, step):
    """The stage's last checkpoint; after an SFT stage that another follows, the SFT model in out_dir/sft."""
    stage = run.stages[stage_index][0]
    run.last_saved = save_checkpoint(cfg.out_dir, s.policy, s.optimizer, stage, stage_index, step, run.record,
                                     run.rank, run.world)
    if stage == "sft" and stage_index < len(run.stages) - 1:
        export(s.policy, run.tokenizer, os.path.join(cfg.out_dir, SFT_DIR), run.rank, run.config, run.save_dtype,
               model_record(cfg.model, cfg.seed, dataclasses.asdict(cfg)), run.card(stages=run.stages[:1]),
               adapter_base=cfg.model)
        run.say(f"SFT model written to {os.path.join(cfg.out_dir, SFT_DIR)}")


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


def lora_base(cfg, run):
    """LoRA: the model final/adapter was added to (sft/ after an SFT stage, else --model)."""
    return os.path.join(cfg.out_dir, SFT_DIR) if len(run.stages) > 1 else cfg.model


def reference_name(cfg):
    """Where the reference model of the alignment stage comes from."""
    return cfg.ref_model or (os.path.join(cfg.out_dir, SFT_DIR) if cfg.sft_steps else cfg.model)


if __name__ == "__main__":
    sys.exit(main())
