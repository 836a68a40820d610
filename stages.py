"""stages.py: what each stage of a training run trains on and with.

Owns: the run's tokenized pairs (load_examples), its stages (plan, stage_steps), each stage's policy,
reference, reference cache, held-out reference scores and optimizer (Stage, setup_stage)
and each step's micro-batches on this rank (step_batches).
Does not own: the flags (train.Config), the step (train.train_step), the loop (train.train_stages), models
(models.py), the optimizers (config.OPTIMIZERS) or batches' layout and order (data.py).
"""

import dataclasses
import functools
import gc
import os
import time

import torch

import data
from base import common
from base.common import ConfigError
from srpo import REFINE_PROMPTS, SELF_REFINED
from training import lora
from training.checkpoint import SFT_DIR, load_checkpoint
from training.config import OPTIMIZERS
from training.models import frozen_copy, load_sharded, mixed_precision
from training.scoring import choose_packing


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


@dataclasses.dataclass
class Stage:
    """What one stage trains with: the FSDP2 policy, π_ref (None when cached or SFT), the reference cache
    and the held-out reference scores (``metrics.pair_logps``), the optimizer, the step to start at, and the batch
    layout (``scoring.choose_packing``)."""
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    cache: dict | None
    eval_ref: dict | None
    optimizer: torch.optim.Optimizer
    step: int
    packing: str


def setup_stage(cfg, run, stage_index, policy, resume):
    """Policy, reference, reference cache, held-out reference scores, optimizer, and the state resumed from the
    checkpoint `resume` (None: step 0).

    `policy`: the previous stage's (the SFT model, in memory), which this stage continues from and, unless
    --ref_model, takes as π_ref (rounded through --save_dtype, as sft/ holds it and a resumed run loads it); None
    for the run's first stage, which loads it (models.load_sharded).
    """
    stage, device, say = run.stages[stage_index][0], run.device, run.say
    start = os.path.join(cfg.out_dir, SFT_DIR) if stage_index > 0 else cfg.model
    mp, ref_dtype = mixed_precision(cfg.mixed_precision, device)
    load = functools.partial(load_sharded, tokenizer=run.tokenizer, device=device, mp_policy=mp, seed=cfg.seed)
    in_memory = policy is not None  # LoRA: train_stages passes None; alignment reloads sft/ (merged), fresh adapters
    if not in_memory:
        gc.collect()  # LoRA: the SFT policy, dropped by train_stages, freed before sft/ is loaded
        policy = load(start, dtype=torch.float32, activation_checkpointing=cfg.activation_checkpointing,
                      adapt=lora.adapter(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed))
        if cfg.lora_r:
            say(lora.describe(policy))
    ref, cache, eval_ref = None, None, None
    if stage != "sft" and cfg.lora_r and not cfg.ref_model:  # LoRA: π_ref is the base, adapters off
        ref = lora.Reference(policy)
    elif stage != "sft":  # π_ref is never updated
        ref = frozen_copy(policy, ref_dtype, mp, via=run.save_dtype) if in_memory and not cfg.ref_model \
            else load(cfg.ref_model or start, dtype=ref_dtype)
        ref.requires_grad_(False)
    packing = choose_packing(cfg.packing, [m for m in (policy, ref) if m is not None], device, say)
    if ref is not None:
        if run.eval_examples:  # π_ref is frozen: score the held-out pairs once
            eval_ref = run.score(ref, run.eval_examples, with_p=data.with_p_view(run.eval_examples),
                                 packing=packing)
        if cfg.precompute_ref:
            t0 = time.time()
            cache = run.score(ref, run.examples, with_p=uses_p_view(cfg), packing=packing)
            ref = None
            gc.collect()
            say(f"precomputed reference log-probs of {len(run.examples):,} pairs in {time.time() - t0:.1f}s; "
                f"reference model freed")
    policy.train()
    lora.reshard(policy)  # the reference passes above may have been the policy's own forwards (LoRA)
    optimizer = OPTIMIZERS[cfg.optimizer](lora.trainable(policy), lr=cfg.lr)  # with LoRA, the adapters only
    step = 0
    if resume:
        step = load_checkpoint(resume, policy, optimizer, run.rank)["step"]
        say(f"resumed {stage} at step {step} from {resume}")
    return Stage(policy, ref, cache, eval_ref, optimizer, step, packing)


def step_batches(examples, cfg, micro, pad_id, rank, world, start, end, packing="padded", chosen_only=False):
    """This rank's share of each step from `start` to `end` (stage-relative, from 0), collated into
    micro-batches of `micro` pairs in the `packing` layout (chosen_only: SFT's). The order is ``data.schedule``'s
    (reshuffled each epoch by --seed), so a resumed run takes exactly the batches of the uninterrupted run."""
    order = data.schedule(len(examples), cfg.batch_size, cfg.seed, rank=rank, world=world, start_step=start)
    for _, (_, _, indices) in zip(range(start, end), order):
        yield [data.collate([examples[i] for i in indices[a:a + micro]], pad_id, packing, cfg.pack_length, chosen_only)
               for a in range(0, len(indices), micro)]
