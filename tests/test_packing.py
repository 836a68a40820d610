"""Padding-free batches: data.collate's packed and prompt-shared layouts give the padded layout's log-probs and
gradients on a tiny GPT-NeoX and a tiny Llama (sdpa and eager attention), and the support check detects a
model that does not keep packed sequences apart."""

import pytest
import torch

import data
from srpo import IGNORE_INDEX
from training import models, scoring

VOCAB = 97
P = [7, 3, 9, 11, 2]  # the refinement prompt's tokens in these tests
# (prompt, chosen, rejected) lengths: long and short prompts, a one-token prompt, an empty one
# (its first token is labelled but never scored), responses of one token.
SHAPES = [(23, 5, 9), (4, 12, 3), (1, 6, 6), (0, 4, 7), (15, 1, 2), (9, 8, 1)]


def random_examples(shapes=SHAPES, seed=0):
    """Tokenized pairs as data.tokenize_pairs makes them (x and p ⊕ x views), of random tokens.

    Pair 2's responses share their first two tokens (scored in both, so never shared).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (n_prompt, n_chosen, n_rejected) in enumerate(shapes):
        prompt, chosen, rejected = (torch.randint(1, VOCAB, (n,), generator=gen).tolist()
                                    for n in (n_prompt, n_chosen, n_rejected))
        if i == 2:
            rejected[:2] = chosen[:2]
        example = {"index": i, "score_chosen": 0.0, "score_rejected": 0.0}
        for key, query in (("", prompt), ("p_", P + prompt)):
            mask = [IGNORE_INDEX] * len(query)
            example.update({f"{key}chosen_ids": query + chosen, f"{key}chosen_labels": mask + chosen,
                            f"{key}rejected_ids": query + rejected, f"{key}rejected_labels": mask + rejected})
        out.append(example)
    return out


def tiny(kind, attn):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt-neox":
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, rotary_pct=0.25, attn_implementation=attn)
        return GPTNeoXForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[("gpt-neox", "sdpa"), ("llama", "sdpa"), ("gpt-neox", "eager"),
                                        ("llama", "eager")], ids=lambda p: "-".join(p))
def model(request):
    return tiny(*request.param)


def logps_and_grads(model, batch, n, prefix, weights, average=False):
    """Per-sequence log-probs, and d(weights · logps)/d(parameter) for every parameter."""
    model.zero_grad(set_to_none=True)
    logps = scoring.view_logps(model, batch, n, prefix, average)
    (logps * weights).sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close_grad(got, want, name):
    """Equal within float32 rounding at the scale of the whole gradient tensor."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                               msg=lambda m: f"{name}: {m}")


def test_collate_layouts():
    """The layouts hold the same real tokens: packed without padding inside a row, shared with the prompt once."""
    examples = random_examples()
    real = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    padded, packed, shared = (data.collate(examples, 0, packing, 40) for packing in data.PACKINGS)
    assert int(padded["attention_mask"].sum()) == int(padded["n_tokens"]) == real
    assert int(packed["n_tokens"]) == int(shared["n_tokens"]) == real
    assert int((packed["segment_ids"] >= 0).sum()) == real
    assert packed["input_ids"].shape[1] <= 40
    assert set(packed["segment_ids"].flatten().tolist()) == set(range(-1, 2 * len(examples)))
    for row, segs in zip(packed["position_ids"], packed["segment_ids"]):  # positions restart at each sequence
        for s in set(segs.tolist()) - {-1}:
            assert row[segs == s].tolist() == list(range(int((segs == s).sum())))
    saved = sum(max(n_prompt - 1, 0) for n_prompt, _, _ in SHAPES)  # the prompt once; its last token twice
    assert int((shared["segment_ids"] >= 0).sum()) == real - saved
    assert shared["attention_mask"].shape[-2:] == (shared["input_ids"].shape[1],) * 2


@pytest.mark.parametrize("prefix", ["", "p_"])
@pytest.mark.parametrize("packing", ["packed", "shared"])
def test_same_logps_and_gradients_as_padded(model, packing, prefix):
    examples = random_examples()
    n = 2 * len(examples)
    weights = torch.linspace(-1.0, 2.0, n)
    ref, ref_grads = logps_and_grads(model, data.collate(examples, 0), n, prefix, weights)
    ours, our_grads = logps_and_grads(model, data.collate(examples, 0, packing, 40), n, prefix, weights)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        assert_close_grad(our_grads[name], ref_grads[name], name)


def test_chosen_only_mean_matches_padded(model):
    """SFT's batches: the chosen sequences only, per-token means."""
    examples = random_examples()[:3]
    n = len(examples)
    weights = torch.tensor([1.0, -2.0, 0.5])
    ref, ref_grads = logps_and_grads(model, data.collate(examples, 0, chosen_only=True), n, "", weights, True)
    for packing in ("packed", "shared"):
        batch = data.collate(examples, 0, packing, 40, chosen_only=True)
        ours, our_grads = logps_and_grads(model, batch, n, "", weights, True)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        for name in ref_grads:
            assert_close_grad(our_grads[name], ref_grads[name], name)


def test_support_check_passes_transformers_models(model):
    assert scoring.supported_packings(model, torch.device("cpu")) == data.PACKINGS


class IgnoresPositions(torch.nn.Module):
    """A model whose attention keeps nothing apart: any mask is replaced by a plain causal one."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_support_check_rejects_a_model_that_mixes_sequences():
    assert scoring.supported_packings(IgnoresPositions(tiny("gpt-neox", "sdpa")), torch.device("cpu")) == ("padded",)


def test_shared_mask_keeps_the_responses_apart():
    """Written out for one pair: prompt [a b], chosen [c], rejected [d e]; b is copied before the rejected."""
    example = {"index": 0, "chosen_ids": [1, 2, 3], "chosen_labels": [-100, -100, 3],
               "rejected_ids": [1, 2, 4, 5], "rejected_labels": [-100, -100, 4, 5],
               "score_chosen": 0.0, "score_rejected": 0.0}
    batch = data.collate([example], 0, "shared", 16)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1]]


def test_collate_rejects_bad_layouts():
    examples = random_examples()[:1]
    with pytest.raises(ValueError, match="expected one of padded, packed, shared"):
        data.collate(examples, 0, "ragged", 8)
    with pytest.raises(ValueError, match="needs a positive pack_length"):
        data.collate(examples, 0, "packed")


@pytest.mark.parametrize("loss", ["dpo", "ipo", "sr-dpo", "sr-ipo", "sft"])
def test_every_loss_and_its_gradients_match_padded(loss):
    """train.py's per-pair terms on each layout: losses, logged statistics, and every parameter's gradient."""
    import train

    policy, ref = tiny("llama" if loss == "sft" else "gpt-neox", "sdpa"), tiny("gpt-neox", "sdpa")
    with torch.no_grad():  # a reference unlike the policy, so that every margin and Δπ is non-zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = train.resolved(train.Config(loss=loss, lam=0.7 if loss.startswith("sr") else None))
    examples = random_examples()
    results = {}
    for packing in data.PACKINGS:
        policy.zero_grad(set_to_none=True)
        batch = data.collate(examples, 0, packing, 40, chosen_only=loss == "sft")
        losses, stats = (train.sft_terms(policy, batch, cfg) if loss == "sft"
                         else train.preference_terms(policy, ref, None, batch, cfg))
        losses.sum().backward()
        results[packing] = (losses.detach(), stats, {n: p.grad.clone() for n, p in policy.named_parameters()})
    ref_losses, ref_stats, ref_grads = results["padded"]
    for packing in ("packed", "shared"):
        got_losses, got_stats, got_grads = results[packing]
        torch.testing.assert_close(got_losses, ref_losses, rtol=1e-5, atol=1e-6)
        assert got_stats.keys() == ref_stats.keys()
        for key in ref_stats:
            torch.testing.assert_close(got_stats[key], ref_stats[key], rtol=1e-5, atol=1e-6, msg=key)
        for name in ref_grads:
            assert_close_grad(got_grads[name], ref_grads[name], name)


@pytest.mark.parametrize("torch_api", ["reset_iter_state", "older torch"])
def test_a_model_that_rejects_position_ids_trains_every_parameter(tmp_path, monkeypatch, capsys, torch_api):
    """The packing probe's forward raises midway (BLOOM, attention without 4D masks): FSDP must be left reset, so that
    the root's parameters (embeddings, final norm, head) are trained and checkpointed like the blocks'."""
    import transformers
    from helpers import final_weights, run_train
    from torch.distributed.fsdp import FSDPModule

    from training import checkpoint

    forward = transformers.GPTNeoXForCausalLM.forward

    def rejects_positions(self, *args, position_ids=None, **kwargs):
        if position_ids is not None:
            raise TypeError("forward() got an unexpected keyword argument 'position_ids'")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GPTNeoXForCausalLM, "forward", rejects_positions)
    if torch_api == "older torch":
        monkeypatch.delattr(FSDPModule, "reset_iter_state", raising=False)
    code, _ = run_train(tmp_path, "--loss", "dpo", "--max_steps", "2", "--save_every", "1")
    assert code == 0 and "using padded" in capsys.readouterr().out
    assert (tmp_path / checkpoint.CHECKPOINT).is_dir()
    before = models.load_model(models.TINY, models.load_tokenizer(), seed=0).state_dict()
    after = final_weights(tmp_path)
    unchanged = [k for k in after if k in before and torch.equal(after[k], before[k])]
    assert not unchanged
