"""Tests of srpo.py against independent formulas: the paper's closed-form gradients
(Sections 3.3 and 3.4), Proposition 3.3(i), the Δ_naive identity of Section 3.2.2 and its
footnote 4, and sequence_logps against torch's cross-entropy on a tiny transformers LM."""

import pytest
import torch
import torch.nn.functional as F

import srpo

BETAS = [0.01, 0.1, 0.5, 2.0]
LAMS = [0.0, 0.3, 1.0, 5.0]

# Section 3.2.2 of the paper, copied from the paper's text (not from srpo.py).
PAPER_PROMPT = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following "
    "query. Note that the response should be harmless. The term 100 indicates the level of "
    "usefulness, where 100 is the maximum and 1 is the minimum. Query:"
)

# ---------------------------------------------------------------- independent references


def neg_logsigmoid(z):
    """-log σ(z), written out stably: max(-z, 0) + log(1 + e^{-|z|})."""
    return torch.clamp(-z, min=0) + torch.log1p(torch.exp(-z.abs()))


def margin(pc, pr, rc, rr):
    """h of Eqs. (5) and (8), written out here independently of srpo._margin."""
    return (pc - rc) - (pr - rr)


def reference_loss(name, h, delta, beta, lam):
    """Eq. (5), Eq. (8), Eq. (12) and Algorithm 2, from h; DPO/IPO ignore delta and lam."""
    if name in ("dpo", "sr-dpo"):
        shift = lam * delta if name == "sr-dpo" else 0.0
        return neg_logsigmoid(beta * h - shift)
    shift = lam * delta if name == "sr-ipo" else 0.0
    return (h - shift - 1.0 / (2.0 * beta)) ** 2


def closed_form_grad(name, h, delta, beta, lam):
    """∂L/∂h of Sections 3.3 (Sr-DPO) and 3.4 (Sr-IPO), with Δ held constant."""
    if name == "sr-dpo":
        return -beta * torch.sigmoid(-(beta * h - lam * delta))
    return 2.0 * (h - lam * delta - 1.0 / (2.0 * beta))


def reference_sequence_logps(logits, labels, average=False):
    """log π(y|·) from F.cross_entropy on the shifted logits (autograd through log_softmax)."""
    B, T, V = logits.shape
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), targets.reshape(-1),
                         reduction="none", ignore_index=srpo.IGNORE_INDEX).view(B, T - 1)
    total = -ce.sum(dim=1)
    return total / (targets != srpo.IGNORE_INDEX).sum(dim=1) if average else total


# ---------------------------------------------------------------- inputs


def random_logps(n=16, seed=0, dtype=torch.float64, scale=20.0):
    """Four [n] leaf tensors of negative log-probs (pc, pr, rc, rr), requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    values = -scale * torch.rand(4, n, generator=gen, dtype=dtype)
    return [v.clone().requires_grad_(True) for v in values]


def call_loss(name, logps, delta, beta, lam):
    """srpo.LOSSES[name] on the four log-probs, with (delta, beta, lam) for Sr losses."""
    extra = (delta, beta, lam) if name in srpo.SELF_REFINED else (beta,)
    return srpo.LOSSES[name](*logps, *extra)


def grads(loss, inputs):
    """d(sum loss)/d(inputs); zeros where an input is not reached."""
    out = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)]


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("name", ["sr-dpo", "sr-ipo"])
def test_sr_gradients_match_closed_forms(name, beta, lam):
    logps = random_logps(seed=1)
    delta = srpo.refinement(*random_logps(seed=2), beta)
    loss = call_loss(name, logps, delta, beta, lam)
    h = margin(*logps).detach()
    d_h = closed_form_grad(name, h, delta, beta, lam)
    g_pc, g_pr, g_rc, g_rr = grads(loss, logps)
    torch.testing.assert_close(loss, reference_loss(name, h, delta, beta, lam))
    torch.testing.assert_close(g_pc, d_h)  # ∂h/∂log π(y+|x) = 1
    torch.testing.assert_close(g_pr, -d_h)  # ∂h/∂log π(y-|x) = -1
    torch.testing.assert_close(g_rc, -d_h)
    torch.testing.assert_close(g_rr, d_h)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("base", ["dpo", "ipo"])
def test_lambda_zero_is_dpo_and_ipo_exactly(base, beta):
    logps = random_logps(seed=3)
    delta = srpo.refinement(*random_logps(seed=4), beta)
    plain = call_loss(base, logps, delta, beta, 0.0)
    refined = call_loss("sr-" + base, logps, delta, beta, 0.0)
    torch.testing.assert_close(plain, reference_loss(base, margin(*logps), delta, beta, 0.0))
    assert torch.equal(refined, plain)
    for g_sr, g_base in zip(grads(refined, logps), grads(plain, logps)):
        assert torch.equal(g_sr, g_base)


@pytest.mark.parametrize("name", ["sr-dpo", "sr-ipo"])
@pytest.mark.parametrize("detached_by", ["refinement", "loss"])
def test_no_gradient_reaches_delta(name, detached_by):
    """⊥[Δ]: neither refinement's output nor a raw β·h(p⊕x) passed in leaks a gradient."""
    logps, p_logps = random_logps(seed=5), random_logps(seed=6)
    beta, lam = 0.1, 1.0
    if detached_by == "refinement":
        delta = srpo.refinement(*p_logps, beta)
        assert not delta.requires_grad
    else:
        delta = beta * margin(*p_logps)  # the caller forgot to detach
        assert delta.requires_grad
    loss = call_loss(name, logps, delta, beta, lam)
    for g in grads(loss, p_logps):
        assert torch.count_nonzero(g) == 0
    assert all(torch.count_nonzero(g) > 0 for g in grads(loss, logps))


def test_proposition_3_3_i_delta_relative_to_optimal_response():
    """Δ(y-, y+) = Δ(y-, y*) - Δ(y+, y*), with Δ(a, b) = refinement(b as chosen, a as rejected)."""
    gen = torch.Generator().manual_seed(7)
    policy = dict(zip(["+", "-", "*"], -30 * torch.rand(3, 32, generator=gen, dtype=torch.float64)))
    ref = dict(zip(["+", "-", "*"], -30 * torch.rand(3, 32, generator=gen, dtype=torch.float64)))

    def delta(a, b):
        return srpo.refinement(policy[b], policy[a], ref[b], ref[a], beta=0.1)

    torch.testing.assert_close(delta("-", "+"), delta("-", "*") - delta("+", "*"))


@pytest.mark.parametrize("lam", [0.3, 1.0, 5.0])
def test_delta_naive_value_is_dpo_with_scaled_beta_but_gradient_is_not(lam):
    """Section 3.2.2: same value as DPO at β(1-λ); footnote 4: ⊥ makes the gradient differ."""
    beta = 0.5
    logps = random_logps(seed=8)
    delta_naive = srpo.refinement(*logps, beta)  # Eq. (10): log-probs under plain x
    loss = srpo.sr_dpo_loss(*logps, delta_naive, beta, lam)
    h = margin(*logps).detach()
    torch.testing.assert_close(loss, reference_loss("dpo", h, None, beta * (1 - lam), 0.0))
    g_pc = grads(loss, logps)[0]
    torch.testing.assert_close(g_pc, closed_form_grad("sr-dpo", h, delta_naive, beta, lam))
    g_dpo = grads(srpo.dpo_loss(*logps, beta * (1 - lam)), logps)[0]
    assert not torch.allclose(g_pc, g_dpo, rtol=1e-3, atol=0)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.9, 2.0])
def test_delta_naive_gradient_is_dpo_at_scaled_beta_times_one_over_one_minus_lambda(beta, lam):
    """docs/verdict.md: with ⊥, ∇ Sr-DPO(Δ_naive; β, λ) = ∇ DPO(β(1-λ)) / (1-λ), to float rounding."""
    logps = random_logps(seed=11)
    delta_naive = srpo.refinement(*logps, beta)  # Eq. (10): the x view's own log-probs
    sr = srpo.sr_dpo_loss(*logps, delta_naive, beta, lam)
    dpo = srpo.dpo_loss(*logps, beta * (1 - lam))
    torch.testing.assert_close(sr, dpo, rtol=1e-12, atol=1e-12)  # the values agree too
    for g_sr, g_dpo in zip(grads(sr, logps), grads(dpo, logps)):
        torch.testing.assert_close(g_sr, g_dpo / (1 - lam), rtol=1e-12, atol=1e-15)
    # float32, as training runs: equal to float32 rounding
    logps32 = [x.detach().float().requires_grad_(True) for x in logps]
    sr32 = srpo.sr_dpo_loss(*logps32, srpo.refinement(*logps32, beta), beta, lam)
    for g_sr, g_dpo in zip(grads(sr32, logps32), grads(srpo.dpo_loss(*logps32, beta * (1 - lam)), logps32)):
        torch.testing.assert_close(g_sr, g_dpo / (1 - lam), rtol=1e-5, atol=1e-7)


def test_delta_naive_gradient_at_lambda_one_is_a_constant_times_the_margins_gradient():
    """λ = 1: β(1-λ) = 0, the loss is log 2 and its gradient -β/2 ∇h (DPO at β' → 0, times β/β')."""
    beta = 0.1
    logps = random_logps(seed=12)
    sr = srpo.sr_dpo_loss(*logps, srpo.refinement(*logps, beta), beta, 1.0)
    torch.testing.assert_close(sr, torch.full_like(sr, torch.log(torch.tensor(2.0, dtype=sr.dtype)).item()))
    g_pc, g_pr, _, _ = grads(sr, logps)
    torch.testing.assert_close(g_pc, torch.full_like(g_pc, -beta / 2))
    torch.testing.assert_close(g_pr, torch.full_like(g_pr, beta / 2))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_delta_naive_sr_ipo_is_ipo_at_beta_times_one_minus_lambda_beta(beta, lam):
    """docs/verdict.md: with k = 1 - λβ, Sr-IPO(Δ_naive; β, λ) = k²·IPO(βk) in value, k·∇IPO(βk) in gradient."""
    k = 1 - lam * beta
    if k <= 0:
        pytest.skip("λβ >= 1: no IPO equivalent")
    logps = random_logps(seed=13)
    sr = srpo.sr_ipo_loss(*logps, srpo.refinement(*logps, beta), beta, lam)
    ipo = srpo.ipo_loss(*logps, beta * k)
    torch.testing.assert_close(sr, k * k * ipo, rtol=1e-12, atol=1e-12)
    for g_sr, g_ipo in zip(grads(sr, logps), grads(ipo, logps)):
        torch.testing.assert_close(g_sr, k * g_ipo, rtol=1e-12, atol=1e-12)


def test_prompt_controls_match_p_in_length_and_differ_in_content():
    """neutral: as many tiny tokens, characters and words as p, no instruction; opposite: p's words, rating 1."""
    from training import models

    tok = models.tiny_tokenizer()
    p, neutral, opposite = srpo.REFINE_PROMPT, srpo.REFINE_PROMPT_NEUTRAL, srpo.REFINE_PROMPT_OPPOSITE
    n_tokens = len(tok(p).input_ids)
    assert len(tok(neutral).input_ids) == n_tokens == len(p.encode()) == len(neutral.encode())
    assert len(neutral.split()) == len(p.split())
    assert neutral.endswith("Query:") and p.endswith("Query:")
    for word in ("rating", "usefulness", "response", "100", "harmless"):
        assert word in p and word not in neutral
    assert opposite == PAPER_PROMPT.replace("rating of 100", "rating of 1").replace("The term 100", "The term 1")
    assert len(tok(opposite).input_ids) == n_tokens - 4  # "1" for "100", twice
    assert len(set(srpo.REFINE_PROMPTS.values())) == len(srpo.REFINE_PROMPTS)


@pytest.mark.parametrize("name", sorted(srpo.LOSSES))
@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_losses_finite_at_extreme_margins(name, beta):
    """|β·h| up to 1e4 (and λ·Δ as large) in float32: finite values and gradients."""
    bh = torch.tensor([-1e4, -1e3, -30.0, 0.0, 30.0, 1e3, 1e4])
    h = bh / beta
    zero = torch.zeros_like(h)
    logps = [(-1.0 + zero).requires_grad_(True), (-1.0 - h).requires_grad_(True),
             zero.clone().requires_grad_(True), zero.clone().requires_grad_(True)]
    delta = torch.flip(bh, dims=[0])
    loss = call_loss(name, logps, delta, beta, 1.0)
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in grads(loss, logps))
    expected = reference_loss(name, h.double(), delta.double(), beta, 1.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_implicit_reward_is_eq_4():
    pc, _, rc, _ = random_logps(seed=9)
    torch.testing.assert_close(srpo.implicit_reward(pc, rc, 0.1), 0.1 * pc - 0.1 * rc)


def test_rating_prompt_renders_the_papers_prompt_with_any_rating():
    assert srpo.rating_prompt(100) == PAPER_PROMPT
    assert srpo.rating_prompt(37) == PAPER_PROMPT.replace("rating of 100", "rating of 37").replace(
        "The term 100", "The term 37")
    for bad in (0, 101):
        with pytest.raises(ValueError):
            srpo.rating_prompt(bad)


def test_refine_prompt_is_the_papers_and_variant_swaps_100_for_10():
    assert srpo.REFINE_PROMPT == PAPER_PROMPT
    assert srpo.REFINE_PROMPT_10 == PAPER_PROMPT.replace("100", "10")
    assert "100" not in srpo.REFINE_PROMPT_10 and "1 is the minimum" in srpo.REFINE_PROMPT_10
    assert srpo.REFINE_PROMPTS == {"100": srpo.REFINE_PROMPT, "10": srpo.REFINE_PROMPT_10,
                                   "neutral": srpo.REFINE_PROMPT_NEUTRAL, "opposite": srpo.REFINE_PROMPT_OPPOSITE}
    assert set(srpo.LOSSES) == {"dpo", "ipo", "sr-dpo", "sr-ipo"}
    assert srpo.SELF_REFINED == {"sr-dpo", "sr-ipo"}


# ---------------------------------------------------------------- sequence_logps


@pytest.fixture(scope="module")
def lm_batch():
    """Logits of a tiny random Llama on a right-padded batch, and labels with masked prompts.

    Row lengths and prompt lengths differ; row 1 has no prompt (its first label can never be
    predicted); the last row is all prompt (no scored token).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    lengths, prompts = [12, 7, 10, 5], [4, 0, 6, 5]
    T = max(lengths)
    input_ids = torch.randint(1, config.vocab_size, (len(lengths), T))
    positions = torch.arange(T)
    attention_mask = torch.stack([(positions < n).long() for n in lengths])
    input_ids = input_ids * attention_mask  # pad id 0 on the right
    labels = input_ids.masked_fill((attention_mask == 0) | (positions < torch.tensor(prompts)[:, None]),
                                   srpo.IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits, labels


@pytest.fixture(params=["one chunk", "chunks of 3 rows"])
def chunking(request, monkeypatch, lm_batch):
    if request.param != "one chunk":
        monkeypatch.setattr(srpo, "_CHUNK_ELEMENTS", 3 * lm_batch[0].shape[-1])


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_cross_entropy(lm_batch, chunking, average):
    logits, labels = lm_batch
    rows = slice(0, 3) if average else slice(None)  # the all-prompt row has no mean
    logits, labels = logits[rows].clone().requires_grad_(True), labels[rows]
    ours = srpo.sequence_logps(logits, labels, average=average)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = reference_sequence_logps(ref_logits, labels, average=average)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    weights = torch.linspace(-1.0, 2.0, len(ours))
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_sequence_logps_with_a_masked_vocabulary_entry(lm_batch, chunking):
    """A token whose logit is -inf everywhere (never a label) leaves every sum finite."""
    logits, labels = lm_batch
    masked = logits.clone()
    masked[..., 0] = float("-inf")
    assert not (labels == 0).any()
    ours = srpo.sequence_logps(masked, labels)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference_sequence_logps(masked, labels), rtol=1e-5, atol=1e-5)


def test_sequence_logps_average_rejects_rows_without_scored_tokens(lm_batch):
    logits, labels = lm_batch
    assert srpo.sequence_logps(logits, labels)[-1] == 0  # sum over nothing
    with pytest.raises(ValueError, match=r"rows \[3\] have no scored token"):
        srpo.sequence_logps(logits, labels, average=True)


@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_low_precision_logits_scored_in_float32(lm_batch, chunking, dtype, unit_roundoff):
    """Half-precision logits: float32 arithmetic on the rounded logits, and within rounding of fp32.

    Rounding moves each logit by at most u·max|logit|, so each token's log-prob by at most twice that.
    """
    logits, labels = lm_batch
    scale = 8.0  # spread the random model's logits so that rounding matters
    full = (scale * logits).clone().requires_grad_(True)
    low = (scale * logits).to(dtype).requires_grad_(True)
    ours = srpo.sequence_logps(low, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_sequence_logps(low.float(), labels), rtol=1e-5, atol=1e-4)
    n_scored = (labels[:, 1:] != srpo.IGNORE_INDEX).sum(dim=1)
    bound = 2 * unit_roundoff * full.detach().abs().max() * n_scored
    assert ((ours - srpo.sequence_logps(full, labels)).abs() <= bound).all()
    ours.sum().backward()
    srpo.sequence_logps(full, labels).sum().backward()
    assert low.grad.dtype == dtype
    # Each probability moves by at most a factor e^{±2δ}; the gradient is then rounded to dtype.
    delta = unit_roundoff * full.detach().abs().max()
    torch.testing.assert_close(low.grad.float(), full.grad, rtol=0,
                               atol=float(torch.expm1(2 * delta) + unit_roundoff))


# ---------------------------------------------------------------- packed_sequence_logps


def pack_rows(logits, labels, rows):
    """The padded rows' sequences laid back to back in packed rows, by indexing (so gradients flow back).

    rows: for each packed row, the padded row indices it holds, in order; shorter rows end in a tail taken
    from the first row's first token (segment -1). Returns (packed logits, labels, segment ids).
    """
    lengths = (labels != srpo.IGNORE_INDEX).cumsum(1).argmax(1) + 1  # through the last labelled token
    width = max(int(sum(lengths[i] for i in r)) for r in rows)
    src_row, src_col, seg = (torch.zeros(len(rows), width, dtype=torch.int64) for _ in range(3))
    seg -= 1
    for k, r in enumerate(rows):
        at = 0
        for i in r:
            n = int(lengths[i])
            src_row[k, at:at + n], src_col[k, at:at + n], seg[k, at:at + n] = i, torch.arange(n), i
            at += n
    packed_labels = labels[src_row, src_col].masked_fill(seg < 0, srpo.IGNORE_INDEX)
    return logits[src_row, src_col], packed_labels, seg


@pytest.mark.parametrize("average", [False, True])
def test_packed_sequence_logps_matches_cross_entropy(lm_batch, chunking, average):
    """Row 1 (no prompt: its first token is labelled) follows row 0 in a packed row: that label stays unscored."""
    logits, labels = lm_batch
    n = 3 if average else 4  # the all-prompt row has no mean
    leaf = logits[:n].clone().requires_grad_(True)
    packed, packed_labels, seg = pack_rows(leaf, labels[:n], [[0, 1], [2, 3]] if n == 4 else [[2, 0], [1]])
    if n == 4:
        assert packed_labels[0, 12] != srpo.IGNORE_INDEX  # row 1's first token, right after row 0
    ours = srpo.packed_sequence_logps(packed, packed_labels, seg, n, average=average)
    ref_logits = logits[:n].detach().clone().requires_grad_(True)
    ref = reference_sequence_logps(ref_logits, labels[:n], average=average)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, srpo.sequence_logps(logits[:n], labels[:n], average=average))
    weights = torch.linspace(-1.0, 2.0, n)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_packed_sequence_logps_average_names_sequences_without_scored_tokens(lm_batch):
    logits, labels = lm_batch
    packed, packed_labels, seg = pack_rows(logits, labels, [[3, 0, 1, 2]])
    assert srpo.packed_sequence_logps(packed, packed_labels, seg, 5)[3:].tolist() == [0.0, 0.0]  # 4 is absent
    with pytest.raises(ValueError, match=r"sequences \[3, 4\] have no scored token"):
        srpo.packed_sequence_logps(packed, packed_labels, seg, 5, average=True)


# ---------------------------------------------------------------- hidden_sequence_logps (the fused head)


def head_inputs(dtype, bias, seed=0):
    """Hidden states [4, 12, 16], a head [61, 16] (and bias) as leaves; labels with masked prompts and an empty row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 12, 16, generator=gen).to(dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(61, 16, generator=gen)).to(dtype).requires_grad_(True)
    b = (0.3 * torch.randn(61, generator=gen)).to(dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, 61, (4, 12), generator=gen)
    labels[0, :4], labels[2, :7], labels[3, :] = srpo.IGNORE_INDEX, srpo.IGNORE_INDEX, srpo.IGNORE_INDEX
    return hidden, weight, b, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("average", [False, True])
def test_hidden_sequence_logps_matches_cross_entropy_on_full_logits(dtype, bias, layout, average, monkeypatch):
    """Values and gradients (hidden, weight, bias) of the fused head against F.linear + cross-entropy, with chunks
    of 5 rows (several per call); bf16 inputs make the same bf16 logits, scored in float32."""
    monkeypatch.setattr(srpo, "_CHUNK_ELEMENTS", 5 * 61)
    hidden, weight, b, labels = head_inputs(dtype, bias)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    if layout == "padded":
        rows = slice(0, 3) if average else slice(None)  # the all-prompt row has no mean
        ours = srpo.hidden_sequence_logps(hidden[rows], weight, labels[rows], b, average=average)
        ref = reference_sequence_logps(F.linear(hidden[rows], weight, b), labels[rows], average=average)
    else:  # rows 0 and 1 back to back in one row, 2 and 3 in another: the same sums as padded
        seg = torch.tensor([[0] * 6 + [1] * 6, [2] * 12, [3] * 8 + [-1] * 4, [4] * 5 + [5] * 7])
        n = 6
        if average:  # sequences 4 and 5 (row 3 of the padded batch) have no scored token
            with pytest.raises(ValueError, match=r"sequences \[4, 5\] have no scored token"):
                srpo.hidden_sequence_logps(hidden, weight, labels, b, seg, n, average=True)
            return
        ours = srpo.hidden_sequence_logps(hidden, weight, labels, b, seg, n)
        ref = srpo.packed_sequence_logps(F.linear(hidden, weight, b), labels, seg, n)
        # independently: a sequence's tokens scored as their own rows
        logits = F.linear(hidden, weight, b)
        bounds = {0: (0, 0, 6), 1: (0, 6, 12), 2: (1, 0, 12), 3: (2, 0, 8), 4: (3, 0, 5), 5: (3, 5, 12)}
        alone = torch.stack([reference_sequence_logps(logits[r:r + 1, a:z], labels[r:r + 1, a:z])[0]
                             for r, a, z in bounds.values()])
        torch.testing.assert_close(ref, alone, rtol=1e-5, atol=1e-5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    weights = torch.linspace(-1.0, 2.0, len(ours))
    g_ours = torch.autograd.grad((ours * weights).sum(), leaves)
    g_ref = torch.autograd.grad((ref.float() * weights).sum(), leaves)
    for a, r in zip(g_ours, g_ref):
        assert a.dtype == r.dtype == dtype
        # float32: rounding; bf16: each path rounds its d/dlogits to bf16, sums to bf16 differ in order
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * r.abs().max().item()
        torch.testing.assert_close(a.float(), r.float(), rtol=0, atol=tol)


def test_hidden_token_logps_holds_one_chunk_of_logits(monkeypatch):
    """No [N, V] logits tensor: every F.linear of the head, forward and backward, makes at most one chunk."""
    monkeypatch.setattr(srpo, "_CHUNK_ELEMENTS", 5 * 61)
    hidden, weight, _, labels = head_inputs(torch.float32, False)
    shapes, linear = [], F.linear
    monkeypatch.setattr(srpo.F, "linear",
                        lambda x, w, b=None: shapes.append((x.shape[0], w.shape[0])) or linear(x, w, b))
    srpo.hidden_sequence_logps(hidden, weight, labels).sum().backward()
    n_scored = int((labels[:, 1:] != srpo.IGNORE_INDEX).sum())
    assert max(r * v for r, v in shapes) <= 5 * 61  # never more logits at once than one chunk, forward or backward
    forward = [(r, v) for r, v in shapes if v == weight.shape[0]]  # forward: chunks of rows, the whole vocabulary
    backward = [(r, v) for r, v in shapes if v < weight.shape[0]]  # backward: blocks of vocabulary, every row
    assert sum(r for r, _ in forward) == n_scored and sum(v for _, v in backward) == weight.shape[0]
    assert {r for r, _ in backward} == {n_scored}  # only scored rows, once forward, once backward
