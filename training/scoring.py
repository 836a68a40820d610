"""training/scoring.py: log π of each sequence of a batch under a model, in any of data.collate's layouts.

Owns: ``forward_logps`` (log π of each row) and ``view_logps`` (of each sequence of one view of a batch), scored
from the hidden states through srpo.hidden_token_logps, never the [rows, tokens, vocab] logits, where the model
allows it (``fused_logps``, which checks and says why not), which layouts a model supports
(``supported_packings``, ``choose_packing``), with ``reset_fsdp`` for a probe that raised, and ``pair_logps``: the
one pass that scores every pair of a dataset under one model, in both views, rank-sharded (the reference cache,
held-out evaluation, ``evaluate.py accuracy``). Does not own: loading and sharding models (models.py), the losses
(srpo.py), batches (data.py), or what is measured (metrics.py).
"""

import math
import weakref

import torch
import torch.distributed as dist

import data
from base import common
from base.common import EvalError
from srpo import IGNORE_INDEX, hidden_token_logps, packed_sequence_logps, sequence_logps, sum_token_logps
from training.models import model_device

# Score through srpo.hidden_token_logps (never the [R, T, V] logits) where a model passes its checks; False: always
# the full logits (benchmarks and tests compare the two).
FUSED_LOGPS = True
# Vocabularies below this keep the full logits: they are small there, and the full path's float rounding is the one
# the project's recorded results (README: 0.950 / 0.970, Spearman +0.854 of `python train.py`) were made with;
# fused and full differ at float32 rounding, which a 300-step run of the tiny model amplifies.
FUSED_MIN_VOCAB = 4096
# Config fields by which a transformers model changes its logits after the head (Gemma 2/3 softcapping, Granite's
# divisor, Cohere's factor, Falcon-H1's multiplier), with their neutral values: any other value keeps the full path.
POST_HEAD_FIELDS = {"final_logit_softcapping": (None, 0), "logit_softcapping": (None, 0), "logits_scaling": (None, 1),
                    "logit_scale": (None, 1), "lm_head_multiplier": (None, 1), "output_multiplier_scale": (None, 1)}
_FUSED = weakref.WeakKeyDictionary()  # model -> bool, decided on its first scoring
_SAID = set()  # fallback reasons logged already


def forward_logps(model, input_ids, attention_mask, labels, average=False):
    """log π(y|·) of each row. Shape: input_ids, attention_mask, labels [R, T]. Returns [R] float32."""
    return _logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels, None, None, average)


def _logps(model, inputs, labels, segment_ids, n_sequences, average):
    """log π(y|·) of each row (segment_ids None) or packed sequence, fused where the model allows it."""
    if fused_logps(model):
        per_token = _fused_token_logps(model, inputs, labels, segment_ids)
        return sum_token_logps(per_token, labels, segment_ids, n_sequences, average)
    logits = model(**inputs, use_cache=False).logits
    if segment_ids is None:
        return sequence_logps(logits, labels, average=average)
    return packed_sequence_logps(logits, labels, segment_ids, n_sequences, average)


def _fused_token_logps(model, inputs, labels, segment_ids, capture=None):
    """Per-token log-probs [R, T] float32 from one call of the model whose head, for that call, scores the hidden
    states with srpo.hidden_token_logps instead of making logits. The call goes through the root module, so FSDP2
    has gathered the head's weight (a root parameter) as for any forward, and its backward reduces the gradient.

    capture: a list, for the probe: the head runs as itself and its logits are appended (nothing fused).
    """
    head = model.get_output_embeddings()
    calls = []

    def head_forward(hidden):
        calls.append(tuple(hidden.shape))
        if capture is not None:
            capture.append(torch.nn.Linear.forward(head, hidden))
            return capture[-1]
        if hidden.shape[:2] != labels.shape:
            raise ValueError(f"the head got hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}")
        # [R, T, 1]: a shape no reshape to the vocabulary takes silently; a copy, not a view (FSDP2 hooks it)
        return hidden_token_logps(hidden, head.weight, labels, head.bias, segment_ids).unsqueeze(-1).clone()

    head.forward = head_forward
    try:
        out = model(**inputs, use_cache=False).logits
    finally:
        del head.forward
    if len(calls) != 1:
        raise ValueError(f"the head ran {len(calls)} times in one forward")
    return out if capture is not None else out.squeeze(-1).float()


def fused_logps(model):
    """Whether `model` is scored through srpo.hidden_token_logps (decided once per model, logged when not).

    Yes when: FUSED_LOGPS; a vocabulary of FUSED_MIN_VOCAB or more; the output embedding is a plain
    torch.nn.Linear; no config field of POST_HEAD_FIELDS has a non-neutral value; and a probe batch shows
    that the model returns its head's output unchanged (no
    softcapping or scaling under any name) and that the fused log-probs match the full-logits ones. Under
    torch.distributed every rank must score its first batch alike (the probe runs FSDP forwards); ranks agree.
    """
    if not FUSED_LOGPS or model.config.vocab_size < FUSED_MIN_VOCAB:
        return False
    if model not in _FUSED:
        reason = _fused_refusal(model)
        ok = torch.tensor([reason is None], dtype=torch.int32, device=model_device(model))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            reason = reason or (None if ok.item() else "another rank's probe failed")
        _FUSED[model] = reason is None
        if reason and reason not in _SAID:
            _SAID.add(reason)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"log-probs: {type(model).__name__} scored through the full [rows, tokens, vocab] logits, not "
                      f"the fused head: {reason}", flush=True)
    return _FUSED[model]


def _fused_refusal(model):
    """Why `model` cannot be scored fused, in words, or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "it has no output embedding (get_output_embeddings)"
    if type(head) is not torch.nn.Linear:
        return f"its output embedding is a {type(head).__name__}, not a plain torch.nn.Linear"
    configs = [model.config, model.config.get_text_config()]
    for key, neutral in POST_HEAD_FIELDS.items():
        for config in configs:
            value = getattr(config, key, None)
            if value not in neutral:
                return f"config.{key} = {value} changes the logits after the head"
    return _probe_refusal(model)


@torch.no_grad()
def _probe_refusal(model):
    """The probe of fused_logps: None, or what differed."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 1000), (2, 12), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": mask}
    try:
        captured = []
        logits = _fused_token_logps(model, inputs, labels, None, capture=captured)
        if not torch.equal(logits, captured[0].to(logits.dtype)):
            return "the model changes its head's logits before returning them (softcapping or scaling)"
        fused = sum_token_logps(_fused_token_logps(model, inputs, labels, None), labels)
    except (RuntimeError, ValueError, TypeError) as err:
        return f"the fused head failed on a probe batch ({str(err).splitlines()[0][:200]})"
    full = sequence_logps(logits, labels)
    err = (fused - full).abs().max().item()
    if not err <= 1e-2 * (1 + full.abs().max().item()):
        return f"fused and full log-probs differ by {err:.3g} on a probe batch"
    return None


def _model_mask(model, mask):
    """A layout's 4D bool mask as the model's attention takes it: bool for sdpa, additive float for eager."""
    if mask is None or mask.dim() != 4 or getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


def view_logps(model, batch, n_sequences, prefix="", average=False):
    """log π(y|·) of each sequence of one view of a ``data.collate`` batch, in any of its layouts.

    Shape: batch[prefix + ...] as ``data.collate`` makes them; n_sequences int S (2B, or B for chosen_only).
    Returns [S] float32, sequence s as numbered by collate (chosen first).
    """
    if prefix + "segment_ids" not in batch:
        return forward_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                             batch[prefix + "labels"], average)
    # packed: no mask, positions restarting per sequence (transformers keeps the sequences apart);
    # shared: the 4D mask of packing.shared_attention_mask.
    inputs = {"input_ids": batch[prefix + "input_ids"], "position_ids": batch[prefix + "position_ids"],
              "attention_mask": _model_mask(model, batch.get(prefix + "attention_mask"))}
    return _logps(model, inputs, batch[prefix + "labels"], batch[prefix + "segment_ids"], n_sequences, average)


def _probe_examples(vocab):
    """Two pairs of deterministic tokens: a long prompt and responses that differ from their first token."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (64,), generator=gen).tolist()
    out = []
    for i, (n_prompt, n_chosen, n_rejected) in enumerate([(20, 6, 9), (5, 12, 4)]):
        prompt, rest = ids[32 * i:32 * i + n_prompt], ids[32 * i + n_prompt:]
        chosen, rejected = rest[:n_chosen], rest[n_chosen:n_chosen + n_rejected]
        mask = [IGNORE_INDEX] * n_prompt
        out.append({"index": i, "chosen_ids": prompt + chosen, "chosen_labels": mask + chosen,
                    "rejected_ids": prompt + rejected, "rejected_labels": mask + rejected,
                    "score_chosen": 0.0, "score_rejected": 0.0})
    return out


@torch.no_grad()
def supported_packings(model, device):
    """The layouts of data.PACKINGS whose log-probs match the padded ones on this model, checked, not assumed.

    A layout passes when its log-probs are much closer to the padded ones than to what a model computes when
    the sequences of a row are not kept apart (the same row under a plain causal mask): max error <= 0.1 x
    that leak. Returns a tuple of layout names, "padded" always first.
    """
    examples = _probe_examples(model.config.vocab_size)
    padded = view_logps(model, data.to_device(data.collate(examples, 0), device), 4)
    ok = ["padded"]
    for packing in data.PACKINGS[1:]:
        batch = data.to_device(data.collate(examples, 0, packing, 64), device)
        leaky = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
        try:
            err = (view_logps(model, batch, 4) - padded).abs().max()
        except (RuntimeError, ValueError, TypeError):  # an attention that cannot take this layout's inputs
            reset_fsdp(model)  # else the root's parameters stay unsharded: never trained, never checkpointed
            continue
        leak = (view_logps(model, leaky, 4) - padded).abs().max()
        if err <= 0.1 * leak:
            ok.append(packing)
    return tuple(ok)


def reset_fsdp(model):
    """FSDP2's state after a forward that raised midway, reset: every module back to idle, its parameters sharded.

    Without it, the root stays "in forward" with its parameters (embeddings, final norm, head) gathered as plain
    tensors; an optimizer built then holds those, which never update, and a checkpoint fails (KeyError: 0)."""
    if hasattr(model, "reset_iter_state"):  # torch >= 2.13
        model.reset_iter_state()
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for module in model.modules():  # older torch: the same, by hand
        if hasattr(module, "reshard"):
            state = module._get_fsdp_state()
            state._training_state = TrainingState.IDLE
            for group in state._fsdp_param_groups:
                group._training_state = TrainingState.IDLE
            module.reshard()


def choose_packing(requested, models, device, say=None):
    """The batch layout to train and score with: `requested` (or, for "auto", the fastest of
    data.PACKINGS) where every model supports it, else the next slower supported one, with a one-line note.

    requested: "auto" or one of data.PACKINGS. models: the live models (policy, reference). Under
    torch.distributed every rank must call it (the probe runs FSDP forwards); ranks agree on the minimum.
    """
    each = [supported_packings(m, device) for m in models]
    for module in (m for model in models for m in model.modules()):
        if hasattr(module, "reshard"):  # FSDP2 leaves the root unsharded after a forward without backward;
            module.reshard()            # an optimizer built then would hold the wrong parameters
    flags = torch.tensor([all(p in s for s in each) for p in data.PACKINGS], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    wanted = len(data.PACKINGS) - 1 if requested == "auto" else data.PACKINGS.index(requested)
    chosen = data.PACKINGS[max(i for i in range(wanted + 1) if flags[i])]  # "padded" always passes
    if say and chosen != data.PACKINGS[wanted]:
        say(f"--packing {requested}: this model does not give the padded log-probs with "
            f"{data.PACKINGS[wanted]} rows (checked on a probe batch); using {chosen}")
    return chosen


@torch.no_grad()
def pair_logps(model, examples, pad_token_id, batch_size=8, with_p=False, rank=0, world=1, average=False,
               progress=False, packing="padded", pack_length=None):
    """log π of the chosen and rejected response of every pair under one model, without grad.

    examples: ``data.tokenize_pairs`` output; with_p: also score the p ⊕ x view (the examples must have
    it: tokenize_pairs with a refine_prompt). batch_size: pairs per forward pass (2·batch_size rows).
    average: per-token mean log-probs instead of sums. packing, pack_length: ``data.collate``'s batch layout
    (the same log-probs in each; see ``scoring.choose_packing``). Each rank scores an equal-sized share (FSDP's
    collectives need equal counts; the last share repeats the last pair), then the shares are summed
    over ranks. The model's train/eval mode is left as it is; batches go to its first parameter's device.
    progress: a ``common.Progress`` line on rank 0 (True: on stderr; or a text stream).

    Returns dict of float32 CPU tensors [N] in the order of ``examples``: "chosen", "rejected" (under x)
    and, with_p, "p_chosen", "p_rejected" (under p ⊕ x).
    """
    if not examples:
        raise EvalError("pair_logps: no examples to score")
    if with_p and not data.with_p_view(examples):
        raise EvalError("pair_logps: with_p, but the examples have no p ⊕ x view (tokenize_pairs without "
                        "a refine_prompt)")
    n, device = len(examples), model_device(model)
    views = ("", "p_") if with_p else ("",)
    share = math.ceil(n / world)
    table = torch.zeros(2 * len(views), n, dtype=torch.float32, device=device)
    bar = common.Progress(min(share, n), "scoring", "pairs", enabled=progress if rank == 0 else False)
    for a in range(rank * share, (rank + 1) * share, batch_size):
        idx = [min(i, n - 1) for i in range(a, min(a + batch_size, (rank + 1) * share))]
        batch = data.to_device(data.collate([examples[i] for i in idx], pad_token_id, packing, pack_length), device)
        B = len(idx)
        owned = torch.tensor([a + j < n for j in range(B)], device=device)
        at = torch.tensor(idx, device=device)[owned]
        for v, prefix in enumerate(views):
            rows = view_logps(model, batch, 2 * B, prefix, average).float()
            table[2 * v, at] = rows[:B][owned]
            table[2 * v + 1, at] = rows[B:][owned]
        bar.update(int(owned.sum()))
    bar.close()
    if world > 1:
        dist.all_reduce(table)
    keys = [prefix + side for prefix in views for side in ("chosen", "rejected")]
    return dict(zip(keys, table.cpu()))
