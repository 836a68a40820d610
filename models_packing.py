"""Model side of data.collate's layouts (to be folded into models.py once arch lands)."""

import torch

import data
from srpo import IGNORE_INDEX, packed_sequence_logps, sequence_logps


def forward_logps(model, input_ids, attention_mask, labels, average=False):
    """log π(y|·) of each row. Shape: input_ids, attention_mask, labels [R, T]. Returns [R] float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, labels, average=average)


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
    # shared: the 4D mask of data.shared_attention_mask.
    logits = model(input_ids=batch[prefix + "input_ids"], position_ids=batch[prefix + "position_ids"],
                   attention_mask=_model_mask(model, batch.get(prefix + "attention_mask")), use_cache=False).logits
    return packed_sequence_logps(logits, batch[prefix + "labels"], batch[prefix + "segment_ids"], n_sequences,
                                 average)


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
    padded = view_logps(model, {k: v.to(device) for k, v in data.collate(examples, 0).items()}, 4)
    ok = ["padded"]
    for packing in data.PACKINGS[1:]:
        batch = {k: v.to(device) for k, v in data.collate(examples, 0, packing, 64).items()}
        leaky = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
        try:
            err = (view_logps(model, batch, 4) - padded).abs().max()
        except (RuntimeError, ValueError, TypeError):  # an attention that cannot take this layout's inputs
            continue
        leak = (view_logps(model, leaky, 4) - padded).abs().max()
        if err <= 0.1 * leak:
            ok.append(packing)
    return tuple(ok)
