"""train.py: SFT, DPO, IPO, Sr-DPO and Sr-IPO in one hand-written FSDP2 loop.

    python train.py                                  # the embedded default: tiny model, SFT then Sr-DPO
    torchrun --nproc_per_node=8 train.py --model EleutherAI/pythia-2.8b --data Anthropic/hh-rlhf ...

One process or many, the loop is the same: the model is sharded with FSDP2's ``fully_shard``
(each transformer block, then the root), over a process group of one when not under torchrun.
The math lives in srpo.py, the data in data.py; this file only runs them:

    per step: for each micro-batch of this rank's share of the global batch
        policy log π(y±|x)            one forward of chosen and rejected together, with grad
        reference log π_ref(y±|x)     no grad (or read from the --precompute_ref cache)
        Sr losses only: Δπ            policy and reference on p ⊕ x, no grad (Eq. 11)
        loss · world / global_batch   backward; gradient sync on the last micro-batch only
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
import typing

import torch
import torch.distributed as dist

import data
from srpo import LOSSES, REFINE_PROMPTS, SELF_REFINED, implicit_reward, refinement, sequence_logps

TINY = "tiny"
OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
CHECKPOINT, FINAL, SFT_DIR, METRICS = "checkpoint", "final", "sft", "metrics.jsonl"


@dataclasses.dataclass
class Config:
    loss: str = "sr-dpo"          # sft | dpo | ipo | sr-dpo | sr-ipo
    beta: float = 0.1             # β of Eqs. (4)-(14); the paper's 0.1
    lam: float | None = None      # λ of Eq. (12) / Algorithm 2; Sr losses only; unset: 0.5, from the paper's grid
    refine: str = "prompt"        # prompt: Δπ under p ⊕ x, Eq. (11); naive: Δ_naive under x, Eq. (10) (Table 4)
    refine_prompt: str = "100"    # rating scale of the prompt p: 100 (the paper's) or 10 (Table 4)
    model: str = TINY             # transformers name or local folder; "tiny": a small Pythia-shaped model from a config
    ref_model: str = ""           # reference π_ref; unset: the starting policy (after the SFT stage, if any)
    data: str = "embedded"        # "embedded", a .jsonl/.jsonl.gz/.json file, or a hub dataset name
    eval_data: str = ""           # held-out pairs; unset: the test split of --data
    max_pairs: int = 0            # train on the first N pairs of --data only (0: all)
    out_dir: str = "out"          # metrics.jsonl, checkpoint/, sft/, final/
    sft_steps: int | None = None  # SFT steps on the chosen responses before alignment; unset: 300 for tiny, else 0
    lr: float | None = None       # peak learning rate; unset: the paper's 5e-7, or 1e-3 for the randomly initialised tiny model
    warmup_steps: int = 10        # linear warm-up of the learning rate, in steps (each stage)
    batch_size: int = 64          # global pairs per optimizer step, split over ranks and micro-batches
    micro_batch_size: int = 0     # pairs per forward pass on one rank; 0: the rank's whole share (no accumulation)
    max_length: int = 512         # tokens per sequence, the longer p ⊕ x view included
    epochs: float = 1.0           # alignment epochs over --data ...
    max_steps: int = -1           # ... or this many alignment steps, whichever ends first (-1: no limit)
    max_grad_norm: float = 10.0   # gradient-norm clipping
    optimizer: str = "rmsprop"    # rmsprop (the paper's), adamw or sgd
    precompute_ref: bool = False  # one pass of the reference model before training, then free it
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    average_logps: bool = False   # per-token mean log-probs instead of the paper's sums (Appendix C)
    eval_every: int = 25          # held-out evaluation every this many steps (0: only at the end)
    eval_pairs: int = 200         # held-out pairs evaluated (0: all)
    save_every: int = 50          # checkpoint every this many steps (0: only on SIGTERM and at stage ends)
    resume: bool = False          # continue from out_dir/checkpoint
    seed: int = 0                 # data order and tiny-model initialisation
    device: str = "auto"          # auto: cuda when this machine has a GPU for every local rank, else cpu
    log_every: int = 1            # progress line every this many steps
    fault_nan_step: int = -1      # testing only: make the loss NaN at this step (steps count from 1)


def parse_config(argv=None):
    """Config from --flags: one flag per field, its comment as help. Raises SystemExit on bad flags."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        kind = f.type if isinstance(f.type, type) else typing.get_args(f.type)[0]  # `float | None` -> float
        help_text = comments.get(f.name, "")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        validate(cfg)
    except ValueError as err:
        parser.exit(2, f"train.py: error: {err}\n")
    return cfg


def _field_comments():
    """The one-line comment beside each Config field, read from this file."""
    comments = {}
    with open(os.path.abspath(__file__), encoding="utf-8") as fh:
        for line in fh:
            head, _, comment = line.partition("#")
            if ":" in head and comment and head.startswith("    ") and not head.strip().startswith(("def", "class")):
                comments[head.split(":")[0].strip()] = comment.strip().replace("%", "%%")
    return comments


def validate(cfg, world=1):
    """One-line errors for flag combinations that would fail later."""
    if cfg.loss not in ("sft", *LOSSES):
        raise ValueError(f"--loss {cfg.loss}: expected one of sft, {', '.join(LOSSES)}")
    if cfg.lam is not None and cfg.loss not in SELF_REFINED:
        raise ValueError(f"--lam is used only by the Sr losses ({', '.join(sorted(SELF_REFINED))}), not --loss {cfg.loss}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device {cfg.device}: expected auto, cuda or cpu")
    if cfg.refine not in ("prompt", "naive"):
        raise ValueError(f"--refine {cfg.refine}: expected prompt or naive")
    if cfg.refine_prompt not in REFINE_PROMPTS:
        raise ValueError(f"--refine_prompt {cfg.refine_prompt}: expected one of {', '.join(REFINE_PROMPTS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {cfg.optimizer}: expected one of {', '.join(OPTIMIZERS)}")
    if cfg.beta <= 0:
        raise ValueError(f"--beta {cfg.beta}: must be positive")
    per_rank, rem = divmod(cfg.batch_size, world)
    micro = cfg.micro_batch_size or per_rank
    if rem or per_rank == 0 or per_rank % micro:
        raise ValueError(f"--batch_size {cfg.batch_size} is not divisible by world size {world} x --micro_batch_size {micro}")
    if cfg.precompute_ref and cfg.loss == "sft":
        raise ValueError("--precompute_ref needs a preference loss, not --loss sft")


def resolved(cfg):
    """The unset defaults filled in; the only place where they depend on the model."""
    tiny = cfg.model == TINY
    lam = cfg.lam if cfg.lam is not None else (0.5 if cfg.loss in SELF_REFINED else 0.0)
    return dataclasses.replace(
        cfg, lam=lam,
        lr=cfg.lr if cfg.lr is not None else (1e-3 if tiny else 5e-7),
        sft_steps=cfg.sft_steps if cfg.sft_steps is not None else (300 if tiny and cfg.loss != "sft" else 0))


def get_lr(step, peak_lr, warmup_steps):
    """Linear warm-up from peak_lr / warmup_steps to peak_lr, then constant (as in the DPO authors' code)."""
    return peak_lr * min(1.0, (step + 1) / max(1, warmup_steps))


# ----------------------------------------------------------------------------- models


def load_tokenizer(name=TINY):
    """The built-in byte-level tokenizer for "tiny", else a transformers tokenizer (no remote code)."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name == TINY:
        return ByT5Tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name=TINY, tokenizer=None, dtype=torch.float32, seed=0):
    """A causal LM with dropout off: a tiny Pythia-shaped model built from a config, or pretrained."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    if name == TINY:
        tokenizer = tokenizer or load_tokenizer(TINY)
        config = GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=1024, rotary_pct=0.25,
            attention_dropout=0.0, hidden_dropout=0.0, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=False)
    _dropout_off(model)
    model.config.use_cache = False
    return model.eval()


def _dropout_off(model):
    """Dropout off everywhere: both models must be deterministic functions of their weights."""
    for key in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def forward_logps(model, input_ids, attention_mask, labels, average=False):
    """log π(y|·) of each row. Shape: input_ids, attention_mask, labels [R, T]. Returns [R] float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, labels, average=average)


def block_class(model):
    """The transformer block class: the type repeated in the model's largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    layers = max(lists, key=len)
    kinds = {type(m) for m in layers}
    if len(kinds) != 1:
        raise ValueError(f"cannot find one transformer block class in {type(model).__name__}: {kinds}")
    return kinds.pop()


def shard(model, device, activation_checkpointing=False):
    """FSDP2: fully_shard each transformer block, then the root (bf16 compute, fp32 reduce on CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    # the mesh on `device`: left out, FSDP2 puts it on the machine's accelerator, even for --device cpu
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    block = block_class(model)
    for module in model.modules():
        if isinstance(module, block):
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


# ----------------------------------------------------------------------------- distributed


def setup_distributed(device="auto"):
    """A process group under torchrun (RANK set), else one of size 1. Returns (rank, world, device)."""
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "cpu"
    cuda = device == "cuda"
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(values, device):
    """Sum a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- one step


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def reference_logps(ref, cache, batch, need_p, average=False):
    """log π_ref under x, and under p ⊕ x when need_p: from the cache, or a live no-grad pass.

    Shape: batch tensors [2B, T] (chosen rows first). Returns ([2B], [2B] or None).
    """
    if cache is not None:
        rows = cache[batch["index"].to(cache.device)].to(batch["input_ids"].device)  # [B, 4]
        return torch.cat([rows[:, 0], rows[:, 1]]), torch.cat([rows[:, 2], rows[:, 3]])
    with torch.no_grad():
        x = forward_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"], average)
        px = forward_logps(ref, batch["p_input_ids"], batch["p_attention_mask"], batch["p_labels"],
                           average) if need_p else None
    return x, px


def preference_terms(policy, ref, cache, batch, cfg):
    """Per-pair loss [B] and the summed statistics that the metrics need.

    The no-grad passes run first, so their scratch is freed before the policy's graph is held.
    """
    B = batch["index"].numel()
    need_p = cfg.loss in SELF_REFINED and cfg.refine == "prompt"
    ref_x, ref_px = reference_logps(ref, cache, batch, need_p, cfg.average_logps)
    if need_p:  # Δπ, Eq. (11): the current policy on p ⊕ x, without grad
        with torch.no_grad():
            pol_p = forward_logps(policy, batch["p_input_ids"], batch["p_attention_mask"], batch["p_labels"],
                                  cfg.average_logps)
        delta = refinement(pol_p[:B], pol_p[B:], ref_px[:B], ref_px[B:], cfg.beta)
    pol = forward_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"], cfg.average_logps)
    pc, pr, rc, rr = pol[:B], pol[B:], ref_x[:B], ref_x[B:]
    if cfg.loss in SELF_REFINED:
        if not need_p:  # Δ_naive, Eq. (10)
            delta = refinement(pc, pr, rc, rr, cfg.beta)
        losses = LOSSES[cfg.loss](pc, pr, rc, rr, delta, cfg.beta, cfg.lam)
    else:
        delta = torch.zeros_like(pc.detach())
        losses = LOSSES[cfg.loss](pc, pr, rc, rr, cfg.beta)
    chosen_r = implicit_reward(pc.detach(), rc, cfg.beta)
    rejected_r = implicit_reward(pr.detach(), rr, cfg.beta)
    stats = {"reward_chosen": chosen_r.sum(), "reward_rejected": rejected_r.sum(),
             "accuracy": (chosen_r > rejected_r).float().sum(),
             "delta": delta.sum(), "delta_sq": (delta ** 2).sum()}
    return losses, stats


def sft_terms(policy, batch, cfg):
    """Per-example SFT loss [B]: the mean negative log-likelihood of the chosen response's tokens."""
    B = batch["index"].numel()
    nll = -forward_logps(policy, batch["input_ids"][:B], batch["attention_mask"][:B], batch["labels"][:B],
                         average=True)
    return nll, {}


def train_step(policy, ref, cache, optimizer, micro_batches, cfg, stage, step, world, device):
    """One optimizer step over this rank's micro-batches. Returns the step's summed stats (this rank)."""
    lr = get_lr(step, cfg.lr, cfg.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals = {}  # summed on the device; one host sync per step, not per micro-batch
    pairs = tokens = 0
    for i, batch in enumerate(micro_batches):
        pairs += batch["index"].numel()
        tokens += int(batch["attention_mask"].sum())  # still on the CPU: no device sync
        batch = to_device(batch, device)
        policy.set_requires_gradient_sync(i == len(micro_batches) - 1)
        losses, stats = sft_terms(policy, batch, cfg) if stage == "sft" else \
            preference_terms(policy, ref, cache, batch, cfg)
        if step + 1 == cfg.fault_nan_step:
            losses = losses * float("nan")
        # Sum over the global batch: FSDP averages gradients over ranks, so scale by world / batch_size.
        (losses.sum() * world / cfg.batch_size).backward()
        for key, value in {"loss": losses.detach().sum(), **stats}.items():
            totals[key] = totals.get(key, 0.0) + value.double()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    keys = sorted(totals)
    local = torch.stack([totals[k] for k in keys] + [torch.tensor(float(pairs), dtype=torch.float64, device=device),
                                                     torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    dist.all_reduce(local)
    summed = dict(zip(keys + ["pairs", "tokens"], local.tolist()))
    summed["grad_norm"], summed["lr"] = grad_norm.item(), lr
    if not (math.isfinite(summed["loss"]) and math.isfinite(summed["grad_norm"])):
        raise FloatingPointError(
            f"non-finite loss ({summed['loss']:.4g}) or gradient norm ({summed['grad_norm']:.4g}) at {stage} "
            f"step {step + 1}; no update was applied, and the last good checkpoint is kept")  # steps count from 1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return summed


def step_metrics(summed, stage, step, seconds):
    """The logged metrics of one step, from the stats summed over ranks."""
    n = summed["pairs"]
    m = {"stage": stage, "step": step, "loss": summed["loss"] / n, "grad_norm": summed["grad_norm"],
         "lr": summed["lr"], "examples_per_s": n / seconds, "tokens_per_s": summed["tokens"] / seconds}
    if stage != "sft":
        mean_delta = summed["delta"] / n
        m.update(reward_chosen=summed["reward_chosen"] / n, reward_rejected=summed["reward_rejected"] / n,
                 margin=(summed["reward_chosen"] - summed["reward_rejected"]) / n,
                 accuracy=summed["accuracy"] / n, delta_mean=mean_delta,
                 delta_std=math.sqrt(max(0.0, summed["delta_sq"] / n - mean_delta ** 2)))
    return m


# ----------------------------------------------------------------------------- data


def micro_batches(examples, indices, micro, pad_id):
    """This rank's share of one step, collated into micro-batches of `micro` pairs."""
    return [data.collate([examples[i] for i in indices[a:a + micro]], pad_id) for a in range(0, len(indices), micro)]


def stage_steps(cfg, n_examples, stage):
    """Steps of a stage: SFT runs --sft_steps; alignment runs --epochs or --max_steps, whichever ends first."""
    per_epoch = data.steps_per_epoch(n_examples, cfg.batch_size)
    if per_epoch == 0:
        raise ValueError(f"--batch_size {cfg.batch_size} is larger than the {n_examples} training pairs")
    if stage == "sft":
        return cfg.sft_steps
    steps = int(cfg.epochs * per_epoch)
    return steps if cfg.max_steps < 0 else min(steps, cfg.max_steps)


def step_indices(cfg, n_examples, step, rank, world):
    """This rank's pair indices for a stage-relative step (epoch order reshuffled by seed each epoch)."""
    per_epoch = data.steps_per_epoch(n_examples, cfg.batch_size)
    epoch, k = divmod(step, per_epoch)
    return _epoch_batches(n_examples, cfg.batch_size, epoch, cfg.seed, rank, world)[k]


# The epoch's shuffled order is computed once per epoch, not once per step.
_epoch_batches = functools.lru_cache(maxsize=1)(data.batch_indices)


@torch.no_grad()
def pair_table(model, examples, micro, pad_id, device, need_p, rank=0, world=1, average=False):
    """log π of every pair under `model`, no grad: columns x-chosen, x-rejected, p-chosen, p-rejected.

    Each rank scores an equal-sized share (FSDP's collectives need equal counts), then the shares are
    summed over ranks. The p columns are 0 when need_p is False. Returns [N, 4] float32 on the CPU.
    """
    n = len(examples)
    share = math.ceil(n / world)
    table = torch.zeros(n, 4, dtype=torch.float32, device=device)
    for a in range(rank * share, (rank + 1) * share, micro):
        idx = [min(i, n - 1) for i in range(a, min(a + micro, (rank + 1) * share))]
        batch = to_device(data.collate([examples[i] for i in idx], pad_id), device)
        x, px = reference_logps(model, None, batch, need_p, average)
        B = len(idx)
        px = px if need_p else torch.zeros_like(x)
        rows = torch.stack([x[:B], x[B:], px[:B], px[B:]], 1)
        owned = torch.tensor([a + j < n for j in range(B)], device=device)
        table[torch.tensor(idx, device=device)[owned]] = rows[owned]
    if world > 1:
        dist.all_reduce(table)
    return table.cpu()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir, policy, optimizer, extra, rank):
    """Write out_dir/checkpoint atomically: a temporary folder, renamed once every rank has written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final, tmp, old = (os.path.join(out_dir, name) for name in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old"))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    dcp.save(state, checkpoint_id=tmp)
    extra = dict(extra, rng=torch.get_rng_state())
    torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def checkpoint_dir(out_dir):
    """The checkpoint to resume from (a crash between the two renames leaves it as checkpoint.old)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(path, ".metadata")):
            return path
    return None


def load_checkpoint(path, policy, optimizer, rank):
    """Restore model, optimizer and RNG in place; return the saved extra dict (step, stage, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    extra = torch.load(os.path.join(path, f"extra_rank{rank}.pt"), weights_only=True)
    torch.set_rng_state(extra.pop("rng"))
    return extra


def export(policy, tokenizer, path, rank):
    """A plain transformers folder (save_pretrained with the tokenizer), written atomically by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


# ----------------------------------------------------------------------------- evaluation


def heldout(policy_table, ref_table, eval_examples, beta):
    """Held-out preference metrics from the [N, 4] log-prob tables of policy and reference."""
    import evaluate

    scores = [torch.tensor([e[k] for e in eval_examples], dtype=torch.float32)
              for k in ("score_chosen", "score_rejected")]
    return evaluate.pair_metrics(evaluate.tables_to_logps(policy_table, ref_table), beta, *scores)


# ----------------------------------------------------------------------------- main


class Stop:
    """SIGTERM (how preemption arrives) sets a flag; the loop checkpoints and exits at the step's end."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def log(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def main(argv=None):
    cfg = parse_config(argv)
    previous = signal.getsignal(signal.SIGTERM)  # restored on return, for callers of main() in-process
    rank, world, device = setup_distributed(cfg.device)
    try:
        validate(cfg, world)
        return run(resolved(cfg), rank, world, device)
    except (ValueError, FloatingPointError) as err:
        print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def plan(cfg, n_examples):
    """The run's stages as (name, steps): an optional SFT stage, then the alignment loss."""
    if cfg.loss == "sft":
        return [("sft", stage_steps(cfg, n_examples, "align"))]
    return ([("sft", cfg.sft_steps)] if cfg.sft_steps else []) + [(cfg.loss, stage_steps(cfg, n_examples, cfg.loss))]


def run(cfg, rank, world, device):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.makedirs(cfg.out_dir, exist_ok=True)
    stop = Stop()
    say = (lambda msg: log(rank, msg))
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    refine_prompt = REFINE_PROMPTS[cfg.refine_prompt]
    need_p = cfg.loss in SELF_REFINED and cfg.refine == "prompt"
    pairs = data.load_pairs(cfg.data, "train", log=say)[:cfg.max_pairs or None]
    examples = data.tokenize_pairs(pairs, tokenizer, cfg.max_length, refine_prompt if need_p else None, log=say)
    eval_examples = []
    eval_source = cfg.eval_data or (None if os.path.isfile(cfg.data) else cfg.data)  # a file has one split
    if eval_source is None:
        say(f"no --eval_data for the file {cfg.data}: held-out evaluation is skipped")
    else:
        eval_pairs = data.load_pairs(eval_source, "test", log=say)[:cfg.eval_pairs or None]
        eval_examples = data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, refine_prompt, log=say)
    micro = cfg.micro_batch_size or cfg.batch_size // world
    stages = plan(cfg, len(examples))
    table = functools.partial(pair_table, micro=micro, pad_id=pad_id, device=device, rank=rank, world=world,
                              average=cfg.average_logps)

    resume = checkpoint_dir(cfg.out_dir) if cfg.resume else None
    if cfg.resume and resume is None:
        say(f"--resume: no checkpoint in {cfg.out_dir}; starting from the beginning")
    saved = torch.load(os.path.join(resume, f"extra_rank{rank}.pt"), weights_only=True) if resume else None
    start_stage = saved["stage_index"] if saved else 0
    metrics_path = os.path.join(cfg.out_dir, METRICS)
    if rank == 0:
        keep_metrics(metrics_path, saved, [name for name, _ in stages])

    policy, last = None, None
    for stage_index, (stage, n_steps) in enumerate(stages):
        if stage_index < start_stage:
            continue
        start = os.path.join(cfg.out_dir, SFT_DIR) if stage_index > 0 else cfg.model
        policy = shard(load_model(start, tokenizer, seed=cfg.seed), device, cfg.activation_checkpointing)
        ref, cache, eval_ref = None, None, None
        if stage != "sft":
            frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # π_ref is never updated
            ref = shard(load_model(cfg.ref_model or start, tokenizer, frozen_dtype, cfg.seed), device)
            ref.requires_grad_(False)
            if eval_examples:  # π_ref is frozen: score the held-out pairs once
                eval_ref = table(ref, eval_examples, need_p=True)
            if cfg.precompute_ref:
                t0 = time.time()
                cache = table(ref, examples, need_p=need_p)
                del ref
                ref = None
                gc.collect()
                say(f"precomputed reference log-probs of {len(examples):,} pairs in {time.time() - t0:.1f}s; "
                    f"reference model freed")
        policy.train()
        optimizer = OPTIMIZERS[cfg.optimizer](policy.parameters(), lr=cfg.lr)
        step = 0
        if resume and stage_index == start_stage:
            step = load_checkpoint(resume, policy, optimizer, rank)["step"]
            say(f"resumed {stage} at step {step} from {resume}")
        say(f"stage {stage}: {n_steps} steps of {cfg.batch_size} pairs ({world} rank(s) x "
            f"{cfg.batch_size // world // micro} micro-batch(es) of {micro}), lr {cfg.lr:g}"
            + (f", beta {cfg.beta}, lambda {cfg.lam}, refine {cfg.refine}" if stage in SELF_REFINED else ""))
        while step < n_steps:
            t0 = time.time()
            idx = step_indices(cfg, len(examples), step, rank, world)
            summed = train_step(policy, ref, cache, optimizer, micro_batches(examples, idx, micro, pad_id), cfg,
                                stage, step, world, device)
            step += 1
            m = step_metrics(summed, stage, step, time.time() - t0)
            if eval_ref is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == n_steps):
                policy.eval()
                last = heldout(table(policy, eval_examples, need_p=True), eval_ref, eval_examples, cfg.beta)
                policy.train()
                m.update({f"eval_{k}": v for k, v in last.items() if isinstance(v, (int, float))})
            if rank == 0:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(m) + "\n")
                if step % cfg.log_every == 0 or step == n_steps:
                    print(progress_line(m, n_steps), flush=True)
            preempted = all_sum([float(stop.requested)], device)[0] > 0
            if preempted or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(cfg.out_dir, policy, optimizer, {"stage_index": stage_index, "step": step}, rank)
            if preempted:
                say(f"SIGTERM: checkpoint written at {stage} step {step}; rerun with --resume to continue")
                return 0
        save_checkpoint(cfg.out_dir, policy, optimizer, {"stage_index": stage_index, "step": step}, rank)
        if stage == "sft" and stage_index < len(stages) - 1:
            export(policy, tokenizer, os.path.join(cfg.out_dir, SFT_DIR), rank)
            say(f"SFT model written to {os.path.join(cfg.out_dir, SFT_DIR)}")
    final = os.path.join(cfg.out_dir, FINAL)
    if policy is not None:
        export(policy, tokenizer, final, rank)
    say(summary(cfg, stages, last, final))
    return 0


def keep_metrics(path, extra, stage_names):
    """Start metrics.jsonl afresh, or on resume keep only the lines up to the checkpoint's step."""
    lines = []
    if extra is not None and os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                m = json.loads(line)
                position = (stage_names.index(m["stage"]), m["step"])
                if position <= (extra["stage_index"], extra["step"]):
                    lines.append(line)
    with open(path, "w") as fh:
        fh.writelines(lines)


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
        lines.append(f"held-out accuracy: {ev['accuracy']:.3f} under x, {ev['p_accuracy']:.3f} under p+x "
                     f"({ev['n_pairs']} pairs)")
        if "spearman" in ev:
            lines.append(f"Δπ vs true score gap: Spearman {ev['spearman']:+.3f}, Kendall {ev['kendall_tau_b']:+.3f}, "
                         f"pairs ranked by informativeness {ev['concordance']:.3f} (0.5 is chance)")
    lines += [f"final model: {final}  (a plain transformers folder)",
              f"next: python evaluate.py accuracy --model {final} --ref_model {reference_name(cfg)} --data {cfg.data}",
              "=" * 72]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
