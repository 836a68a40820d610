"""Sr-DPO and Sr-IPO: the losses of "Direct Alignment of Language Models via
Quality-Aware Self-Refinement", as pure functions of log-probabilities.

Copy this file alone into another trainer: it needs torch and nothing else, holds no
state, and does nothing at import.
Owns the math only: data, models, training and measurements live in data.py, training/models.py,
train.py and training/metrics.py.

Notation (paper, Sections 2-3):
    x       the query;  p ⊕ x  the prompt-augmented query (p = REFINE_PROMPT, prepended)
    y+, y-  the preferred ("chosen") and rejected responses
    h       (log π(y+|x) - log π_ref(y+|x)) - (log π(y-|x) - log π_ref(y-|x))
    Δπ      β·h measured under p ⊕ x instead of x, Eq. (11)
    ⊥[·]    stop-gradient (``.detach()``)

Choices that are the paper's:
    * log π(y|x) is the SUM of token log-probs of the response (Appendix C, step iii:
      a product of token probabilities). ``sequence_logps(..., average=True)`` gives the
      per-token mean instead, which some libraries use for IPO; it is not the paper's.
    * Δπ is computed on the fly with the current policy and detached (Algorithm 1, step 3).
    * Sr-IPO subtracts λ·⊥[Δπ] inside IPO's square (Algorithm 2), with Δπ still carrying
      its factor β from Eq. (11).

Choices that are this module's:
    * Losses are returned per example, shape [B], unreduced: the caller chooses the mean
      (the paper's 1/N in Algorithms 1 and 2) or a sum scaled for gradient accumulation.
    * ``sequence_logps`` never materialises a float32 copy of the whole logits tensor: it
      scores the tokens in chunks (gather minus logsumexp) and recomputes the softmax,
      chunk by chunk, in its backward pass. ``packed_sequence_logps`` does the same for rows that
      hold several sequences back to back (padding-free batches), summing by segment id.
    * ``hidden_sequence_logps`` never builds the logits at all: from the last hidden states and the LM
      head's weight it sends only the scored positions through the head, one chunk of logits at a time
      in the forward pass and again (recomputed) in the backward pass, scored in float32.
    * The loss mapping ``LOSSES`` and the set ``SELF_REFINED`` let a trainer pick by name.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# The prompt p of Section 3.2.2, verbatim, as a template: rating_prompt(100) is p itself.
RATING_TEMPLATE = (
    "Please generate a response with a usefulness rating of {rating} out of {scale} for the "
    "following query. Note that the response should be harmless. The term {rating} indicates "
    "the level of usefulness, where {scale} is the maximum and 1 is the minimum. Query:"
)


def rating_prompt(rating, scale=100):
    """The paper's prompt asking for a response rated `rating` out of `scale` (1 is the minimum)."""
    if not 1 <= rating <= scale:
        raise ValueError(f"rating_prompt: need 1 <= rating <= scale, got rating={rating}, scale={scale}")
    return RATING_TEMPLATE.format(rating=rating, scale=scale)


REFINE_PROMPT = rating_prompt(100)
# Table 4's variant: ratings in [1, 10] instead of [1, 100].
REFINE_PROMPT_10 = rating_prompt(10, scale=10)
# Controls for what p says (docs/verdict.md); Δ_naive (no text at all) is ``--refine naive``.
# The opposite instruction: p's words asking for a rating of 1 out of 100 (4 tokens shorter than p
# under the byte-level tiny tokenizer: "1" for "100", twice).
REFINE_PROMPT_OPPOSITE = rating_prompt(1)
# A neutral text about the weather, no instruction and no rating, ending like p in "Query:": as many
# characters as p (so as many tokens under the byte-level tiny tokenizer) and as many words. Its
# capitals are only those absent from base/embedded.py's EMBEDDED_ALPHABET, like p's.
REFINE_PROMPT_NEUTRAL = (
    "The weather this morning is calm and mild, with a gentle breeze from the west and some thin clouds "
    "drifting over the hills. The forecast calls for clear skies in the afternoon, a cooler evening, "
    "and no rain likely until the weekend. Query:"
)
REFINE_PROMPTS = {"100": REFINE_PROMPT, "10": REFINE_PROMPT_10,
                  "neutral": REFINE_PROMPT_NEUTRAL, "opposite": REFINE_PROMPT_OPPOSITE}

# Elements of float32 scratch per chunk in sequence_logps (64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def _shifted_targets(labels):
    """Targets aligned with logits: position t predicts labels[t + 1].

    Shape: labels [B, T] int64, IGNORE_INDEX where not scored.
    Returns [B*T] int64; the last position of each row is IGNORE_INDEX.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)


def _chunks(n_rows, vocab):
    """Row ranges of a [n_rows, vocab] matrix, each at most _CHUNK_ELEMENTS elements (or one row); with the
    arguments swapped, the column ranges."""
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _scored_chunks(scored, vocab):
    """The row ranges of _chunks holding a scored row: one host sync for all of them, not one per chunk."""
    chunks = _chunks(scored.numel(), vocab)
    if not chunks:
        return []
    keep = torch.stack([scored[a:b].any() for a, b in chunks]).tolist()
    return [chunk for chunk, k in zip(chunks, keep) if k]


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per position, chunked in float32 (Appendix C, step ii)."""

    @staticmethod
    def forward(ctx, logits, targets):
        # logits [N, V] any float dtype; targets [N] int64 with IGNORE_INDEX.
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 if given
        out = torch.zeros(targets.shape, dtype=acc, device=logits.device)
        scored = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        for a, b in _scored_chunks(scored, logits.shape[1]):
            # one fused kernel on CUDA, in float32; its [rows, V] output is freed right after the gather
            picked = torch.log_softmax(logits[a:b], dim=1, dtype=acc).gather(1, safe[a:b, None]).squeeze(1)
            # where, not a product: an unscored row's stand-in target may have a -inf logit
            out[a:b] = torch.where(scored[a:b], picked, 0.0)
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # d log p_target / d logits = onehot(target) - softmax(logits), per scored row.
        logits, targets = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        scored = targets != IGNORE_INDEX
        acc = torch.promote_types(logits.dtype, torch.float32)
        g = grad_out.to(acc) * scored
        safe = targets.clamp(min=0)
        for a, b in _scored_chunks(scored, logits.shape[1]):
            _softmax_grad_into(grad[a:b], logits[a:b], safe[a:b], g[a:b], acc)
        return grad, None


def _softmax_grad_into(out, logits, targets, g, acc):
    """out = g·(onehot(targets) - softmax(logits)), with one chunk of scratch in `acc`, freed on return.

    Shape: out [n, V] (written), logits [n, V] any float dtype, targets [n] int64 >= 0, g [n] acc.
    """
    scratch = torch.softmax(logits, dim=1, dtype=acc)
    scratch.mul_(-g[:, None]).scatter_add_(1, targets[:, None], g[:, None])
    out.copy_(scratch)  # converts to out's dtype without a second temporary


def token_logps(logits, labels):
    """Per-token log π(y_j | ·, y_<j) of the labelled tokens; 0 where not scored.

    Shape: logits [B, T, V] (float32, bfloat16 or float16) causal-LM outputs.
    Shape: labels [B, T] int64, IGNORE_INDEX (-100) where a token is not scored.
    Returns [B, T] float32 (float64 for float64 logits), aligned with the logits: entry t scores labels[t + 1].
    """
    B, T, V = logits.shape
    flat = logits.contiguous().view(B * T, V)
    return _TokenLogps.apply(flat, _shifted_targets(labels)).view(B, T)


def _scoring(labels, segment_ids):
    """(targets, owner) of every position, flat: what it scores and whose sum that goes to.

    Padded rows (segment_ids None): position t of row r scores labels[r, t + 1] for row r. Packed rows: it
    scores labels[r, t + 1] only where positions t and t + 1 belong to the same sequence, for that sequence.
    Shape: labels [R, T] int64 (IGNORE_INDEX where not scored); segment_ids [R, T] int64 (-1 for none) or None.
    Returns targets [R*T] int64 (IGNORE_INDEX where not scored), owner [R*T] int64 >= 0.
    """
    R, T = labels.shape
    targets = _shifted_targets(labels)
    if segment_ids is None:
        return targets, torch.arange(R, device=labels.device).repeat_interleave(T)
    following = torch.cat([segment_ids[:, 1:], torch.full_like(segment_ids[:, :1], -1)], dim=1).reshape(-1)
    same = (following == segment_ids.reshape(-1)) & (following >= 0)
    return targets.masked_fill(~same, IGNORE_INDEX), following.clamp(min=0)


def sum_token_logps(per_token, labels, segment_ids=None, n_sequences=None, average=False):
    """log π(y|·) of each sequence from its token log-probs: their sum (Appendix C, step iii) or mean.

    Shape: per_token [R, T] float, entry t scoring labels[t + 1] (``token_logps``, ``hidden_token_logps``).
    Shape: labels [R, T] int64, IGNORE_INDEX (-100) where not scored.
    Shape: segment_ids [R, T] int64 for packed rows (-1 for none), or None for one sequence a row.
    Shape: n_sequences int S (packed rows only; R otherwise). average bool: the per-token mean instead.
    Returns [S] (or [R]) in per_token's dtype.
    """
    targets, owner = _scoring(labels, segment_ids)
    n = labels.shape[0] if segment_ids is None else n_sequences
    flat = per_token.reshape(-1) * (targets != IGNORE_INDEX)  # packed: a boundary position scores nothing
    total = flat.new_zeros(n).index_add(0, owner, flat)  # Appendix C, step iii: log of the product
    if not average:
        return total
    counts = torch.zeros(n, dtype=torch.int64, device=owner.device).index_add(
        0, owner, (targets != IGNORE_INDEX).long())
    what = "sequence_logps(average=True): rows" if segment_ids is None else \
        "packed_sequence_logps(average=True): sequences"
    return _per_token_mean(total, counts, what)


def sequence_logps(logits, labels, average=False):
    """log π(y|·): the summed (or mean) token log-probs of each row's scored tokens.

    Shape: logits [B, T, V] causal-LM outputs; bf16/fp16 are scored in float32.
    Shape: labels [B, T] int64, IGNORE_INDEX (-100) where not scored; shifted inside.
    Shape: average bool; True gives the per-token mean (not the paper's choice).
    Returns [B] float32 (float64 for float64 logits).
    """
    per_token = token_logps(logits, labels)
    total = per_token.sum(dim=1)  # Appendix C, step iii: log of the product
    if not average:
        return total
    return _per_token_mean(total, (labels[:, 1:] != IGNORE_INDEX).sum(dim=1), "sequence_logps(average=True): rows")


def _per_token_mean(total, counts, what):
    """total / counts, or ValueError naming the entries with no scored token. Shape: total [S], counts [S]."""
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"{what} {empty} have no scored token")
    return total / counts


def packed_sequence_logps(logits, labels, segment_ids, n_sequences, average=False):
    """log π(y|·) of sequences packed into rows: the summed (or mean) token log-probs of each segment.

    A token is scored when it is labelled and its predecessor in the row belongs to the same sequence,
    so each sequence's first token is never scored, as in a padded row.
    Shape: logits [R, L, V] causal-LM outputs of the packed rows; bf16/fp16 are scored in float32.
    Shape: labels [R, L] int64, IGNORE_INDEX (-100) where not scored; shifted inside.
    Shape: segment_ids [R, L] int64, the sequence (0 <= id < n_sequences) each token belongs to; -1 for none.
    Shape: n_sequences int, the number of sequences S.
    Shape: average bool; True gives the per-token mean (not the paper's choice).
    Returns [S] float32 (float64 for float64 logits).
    """
    R, L, V = logits.shape
    targets, _ = _scoring(labels, segment_ids)
    per_token = _TokenLogps.apply(logits.contiguous().view(R * L, V), targets)  # 0 where not scored
    return sum_token_logps(per_token.view(R, L), labels, segment_ids, n_sequences, average)


class _HeadTokenLogps(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)[target] of scored rows, never more than one chunk of logits (Appendix C, step ii).

    Forward goes a chunk of rows at a time and keeps only each row's log Σ exp (lse). Backward recomputes the
    logits a block of vocabulary at a time, over all rows: d/dlogits = g·(onehot(target) − exp(logits − lse)),
    then d/dW and d/db of the block's rows of W and b at once, and d/dh summed over the blocks. So no gradient
    accumulator of W's size is needed (a float32 one would be 2× a bf16 head's weight). The logits are made as
    the head makes them (F.linear in the inputs' dtype), scored in float32, and d/dlogits is rounded to the
    logits' dtype before the products, as autograd's full path does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        # hidden [N, D], weight [V, D], bias [V] or None, all in one float dtype; targets [N] int64 >= 0.
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        lse = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        for a, b in _chunks(hidden.shape[0], weight.shape[0]):
            # log softmax in place on the chunk (x − max − log Σ exp(x − max)): one chunk of scratch, not two.
            logits = F.linear(hidden[a:b], weight, bias).to(acc)
            top = logits.amax(1, keepdim=True)
            picked = logits.gather(1, targets[a:b, None]).squeeze(1)
            lse[a:b] = logits.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
            out[a:b] = picked - lse[a:b]
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        acc = torch.promote_types(hidden.dtype, torch.float32)
        g = grad_out.to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None  # [N, D]
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b and bias is not None else None
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for v, z in _chunks(weight.shape[0], hidden.shape[0]):  # blocks of vocabulary: [N, z − v] logits each
            logits = F.linear(hidden, weight[v:z], None if bias is None else bias[v:z])
            d = logits.to(acc)  # the same tensor where the logits are float32 already
            d.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # −g·softmax
            hit = (targets >= v) & (targets < z)
            d.index_put_((rows[hit], targets[hit] - v), g[hit], accumulate=True)  # + g·onehot(target)
            d = d.to(logits.dtype)
            del logits
            if grad_w is not None:
                torch.mm(d.t(), hidden, out=grad_w[v:z])
            if grad_b is not None:
                grad_b[v:z] = d.sum(0, dtype=acc)
            if grad_h is not None:
                grad_h.add_(torch.mm(d, weight[v:z]))
            del d
        return None if grad_h is None else grad_h.to(hidden.dtype), grad_w, grad_b, None


def hidden_token_logps(hidden, weight, labels, bias=None, segment_ids=None):
    """Per-token log π(y_j | ·, y_<j) from the last hidden states and the LM head, never building [R, T, V].

    Only the scored positions go through the head, a chunk at a time (``_HeadTokenLogps``): at most one
    chunk of logits exists at once, in the forward pass and in the backward pass. Equals
    ``token_logps(F.linear(hidden, weight, bias), labels)`` (with packed rows' boundaries unscored).
    Shape: hidden [R, T, D] the base model's last hidden states (float32, bfloat16 or float16).
    Shape: weight [V, D] the output embedding's weight (tied or not), hidden's dtype; bias [V] or None.
    Shape: labels [R, T] int64, IGNORE_INDEX (-100) where not scored; shifted inside.
    Shape: segment_ids [R, T] int64 for packed rows (-1 for none), or None for one sequence a row.
    Returns [R, T] float32 (float64 for float64 inputs), entry t scoring labels[t + 1]; 0 where not scored.
    """
    R, T, D = hidden.shape
    targets, _ = _scoring(labels, segment_ids)
    rows = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    picked = _HeadTokenLogps.apply(hidden.reshape(R * T, D).index_select(0, rows), weight, bias,
                                   targets.index_select(0, rows))
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return torch.zeros(R * T, dtype=acc, device=hidden.device).index_put((rows,), picked).view(R, T)


def hidden_sequence_logps(hidden, weight, labels, bias=None, segment_ids=None, n_sequences=None, average=False):
    """log π(y|·) of each sequence from the last hidden states and the LM head: the sum (Appendix C,
    step iii) of the token log-probs of ``hidden_token_logps``, or their mean; never builds [R, T, V].

    Equals ``sequence_logps`` (segment_ids None) or ``packed_sequence_logps`` on the logits
    F.linear(hidden, weight, bias), in value and in gradient (w.r.t. hidden, weight and bias).
    Shape: hidden [R, T, D] the base model's last hidden states (float32, bfloat16 or float16).
    Shape: weight [V, D] the output embedding's weight, hidden's dtype; bias [V] or None.
    Shape: labels [R, T] int64, IGNORE_INDEX (-100) where not scored; shifted inside.
    Shape: segment_ids [R, T] int64 for packed rows (-1 for none), or None for one sequence a row.
    Shape: n_sequences int S (packed rows only). average bool: the per-token mean (not the paper's choice).
    Returns [S] (or [R]) float32 (float64 for float64 inputs).
    """
    per_token = hidden_token_logps(hidden, weight, labels, bias, segment_ids)
    return sum_token_logps(per_token, labels, segment_ids, n_sequences, average)


def implicit_reward(policy_logps, ref_logps, beta):
    """r(y|x) - c(x) = β·(log π(y|x) - log π_ref(y|x)), Eq. (4).

    Shape: policy_logps [B], ref_logps [B], beta float.
    Returns [B].
    """
    return beta * (policy_logps - ref_logps)  # Eq. (4)


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """h = log π(y+)/π_ref(y+) - log π(y-)/π_ref(y-), the bracket of Eqs. (5) and (8). Shape: [B]."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def refinement(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Δπ(y-, y+; x), Eq. (11), detached. With log-probs under plain x it is Δ_naive, Eq. (10).

    Shape: policy_chosen_logps [B]   log π(y+ | p ⊕ x)
    Shape: policy_rejected_logps [B] log π(y- | p ⊕ x)
    Shape: ref_chosen_logps [B]      log π_ref(y+ | p ⊕ x)
    Shape: ref_rejected_logps [B]    log π_ref(y- | p ⊕ x)
    Shape: beta float.
    Returns [B], with no gradient.
    """
    h_px = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (beta * h_px).detach()  # Eq. (11); ⊥ as in Algorithm 1, step 3


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO, Eq. (5): -log σ(β·h).

    Shape: policy_chosen_logps [B], policy_rejected_logps [B] (log π under x).
    Shape: ref_chosen_logps [B], ref_rejected_logps [B] (log π_ref under x).
    Shape: beta float.
    Returns [B].
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)  # Eq. (5)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO, Eq. (8): (h - 1/(2β))².

    Shape: policy_chosen_logps [B], policy_rejected_logps [B] (log π under x).
    Shape: ref_chosen_logps [B], ref_rejected_logps [B] (log π_ref under x).
    Shape: beta float.
    Returns [B].
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2  # Eq. (8)


def sr_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                delta, beta, lam):
    """Sr-DPO, Eq. (12) and Algorithm 1: -log σ(β·h - λ·⊥[Δ]).

    Shape: policy_chosen_logps [B], policy_rejected_logps [B] (log π under x).
    Shape: ref_chosen_logps [B], ref_rejected_logps [B] (log π_ref under x).
    Shape: delta [B] Δπ from ``refinement``; detached here again, so no gradient leaks.
    Shape: beta float, lam float (λ).
    Returns [B].
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h - lam * delta.detach())  # Eq. (12), Algorithm 1 step 3


def sr_ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                delta, beta, lam):
    """Sr-IPO, Algorithm 2: (h - λ·⊥[Δ] - 1/(2β))².

    Shape: policy_chosen_logps [B], policy_rejected_logps [B] (log π under x).
    Shape: ref_chosen_logps [B], ref_rejected_logps [B] (log π_ref under x).
    Shape: delta [B] Δπ from ``refinement``; detached here again, so no gradient leaks.
    Shape: beta float, lam float (λ).
    Returns [B].
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - lam * delta.detach() - 1.0 / (2.0 * beta)) ** 2  # Algorithm 2 step 3; Eq. (14)


# A trainer picks the loss by name. Those in SELF_REFINED also take (delta, beta, lam).
LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "sr-dpo": sr_dpo_loss, "sr-ipo": sr_ipo_loss}
SELF_REFINED = frozenset({"sr-dpo", "sr-ipo"})
