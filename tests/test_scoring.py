"""training/scoring.py: fused scoring (srpo.hidden_token_logps inside the model's own forward) and pair_logps
against an independent reference: the model's full logits, log_softmax in float64, gather. Several transformers
families, fp32 and bf16, every layout of data.collate, held-out metrics, the fallback for models that change their
logits after the head, and two FSDP2 ranks against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import data
from base import common, formats
from srpo import IGNORE_INDEX, REFINE_PROMPTS
from training import metrics, models, scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(autouse=True)
def fused_for_small_vocabularies(monkeypatch):
    """The tiny models here have small vocabularies, which models.py leaves to the full logits by default."""
    monkeypatch.setattr(scoring, "FUSED_MIN_VOCAB", 0)


def build(family, dtype=torch.float32, **extra):
    """A random tiny model of a transformers family, dropout off, in eval mode."""
    import transformers as tf

    llama = dict(SMALL, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=128)
    configs = {
        "gpt_neox": lambda: models.tiny_config(models.load_tokenizer("tiny")),
        "llama": lambda: tf.LlamaConfig(**llama, tie_word_embeddings=False),
        "llama_tied": lambda: tf.LlamaConfig(**llama, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**llama, tie_word_embeddings=False),
        "gemma": lambda: tf.GemmaConfig(**llama, head_dim=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
        "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**llama, head_dim=8),
        "granite": lambda: tf.GraniteConfig(**llama),
        "cohere": lambda: tf.CohereConfig(**llama),
    }
    config = configs[family]()
    for key, value in extra.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    models._dropout_off(model)
    model.config.use_cache = False
    return model.eval()


def examples(vocab=VOCAB, n=3, seed=1):
    """Pairs of random tokens of different lengths, prompts masked, with a p ⊕ x view."""
    gen = torch.Generator().manual_seed(seed)
    tokens = lambda k: torch.randint(3, vocab, (k,), generator=gen).tolist()  # noqa: E731
    p = tokens(5)
    out = []
    for i in range(n):
        x = tokens(4 + 3 * i)
        ex = {"index": i, "score_chosen": float(i), "score_rejected": float(-i)}
        for side, k in (("chosen", 6 + i), ("rejected", 9 - i)):
            y = tokens(k)
            ex[f"{side}_ids"], ex[f"{side}_labels"] = x + y, [IGNORE_INDEX] * len(x) + y
            ex[f"p_{side}_ids"], ex[f"p_{side}_labels"] = p + x + y, [IGNORE_INDEX] * (len(p) + len(x)) + y
        out.append(ex)
    return out


def reference_logps(model, batch, prefix=""):
    """Σ log π of each padded row: the model's full logits, log_softmax in float64, gather (not srpo.py)."""
    ids, mask, labels = (batch[prefix + k] for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0).sum(1)


def values_and_grads(model, fn):
    """fn()'s value and the gradient of a weighted sum of it w.r.t. every parameter (by name)."""
    model.zero_grad(set_to_none=True)
    out = fn()
    (out * torch.linspace(-1.0, 2.0, len(out), dtype=out.dtype)).sum().backward()
    grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach().double(), grads


def assert_grads_close(ours, ref, rel=1e-5, what=""):
    """Same parameters; each gradient within rel x its largest entry (float32 rounding of sums that differ in
    order, relative to the tensor, since single entries may be near 0)."""
    assert ours.keys() == ref.keys(), what
    for key in ref:
        atol = rel * ref[key].abs().max().item() + 1e-8
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=atol, msg=f"{what} {key}")


def fused_on(model):
    assert scoring.fused_logps(model), "expected the fused path"


FAMILIES = ["gpt_neox", "llama", "llama_tied", "qwen2", "gemma", "gpt2", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_full_logits_fp32_values_and_grads(family):
    model = build(family)
    fused_on(model)
    batch = data.collate(examples(), 0)
    fused, g_fused = values_and_grads(model, lambda: scoring.view_logps(model, batch, 6, "p_"))
    ref, g_ref = values_and_grads(model, lambda: reference_logps(model, batch, "p_"))
    torch.testing.assert_close(fused, ref, rtol=0, atol=2e-5)
    head = [k for k, p in model.named_parameters() if p is model.get_output_embeddings().weight]
    assert head and head[0] in g_fused  # the head's weight did get its gradient (through the fused path)
    assert_grads_close(g_fused, g_ref)


@pytest.mark.parametrize("family", ["gpt_neox", "llama_tied", "qwen2"])
def test_fused_equals_full_logits_bf16(family, monkeypatch):
    """bf16 weights: the same bf16 logits, scored in float32 either way; gradients within bf16 rounding."""
    model = build(family, torch.bfloat16)
    fused_on(model)
    batch = data.collate(examples(), 0)
    fused, g_fused = values_and_grads(model, lambda: scoring.view_logps(model, batch, 6))
    ref, g_ref = values_and_grads(model, lambda: reference_logps(model, batch))
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-4)
    assert_grads_close(g_fused, g_ref, rel=2e-2)
    monkeypatch.setattr(scoring, "FUSED_LOGPS", False)
    full, g_full = values_and_grads(model, lambda: scoring.view_logps(model, batch, 6))
    torch.testing.assert_close(fused, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
@pytest.mark.parametrize("average", [False, True])
def test_every_layout_fused_equals_full(family, average, monkeypatch):
    model = build(family)
    supported = scoring.supported_packings(model, torch.device("cpu"))
    assert supported[0] == "padded"
    padded = data.collate(examples(), 0)
    for packing in supported:
        batch = data.collate(examples(), 0, packing, 64)
        monkeypatch.setattr(scoring, "FUSED_LOGPS", True)
        fused, g_fused = values_and_grads(model, lambda: scoring.view_logps(model, batch, 6, "", average))
        monkeypatch.setattr(scoring, "FUSED_LOGPS", False)
        full, g_full = values_and_grads(model, lambda: scoring.view_logps(model, batch, 6, "", average))
        torch.testing.assert_close(fused, full, rtol=0, atol=2e-5, msg=packing)
        assert_grads_close(g_fused, g_full, what=packing)
        if not average:
            with torch.no_grad():
                torch.testing.assert_close(fused, reference_logps(model, padded), rtol=0, atol=5e-5, msg=packing)


def test_heldout_metrics_unchanged(monkeypatch):
    policy, ref = build("gpt_neox"), build("llama")
    pairs = examples(n=5)
    scores = {}
    for fused in (True, False):
        monkeypatch.setattr(scoring, "FUSED_LOGPS", fused)
        pol = scoring.pair_logps(policy, pairs, 0, batch_size=2, with_p=True)
        ref_ = scoring.pair_logps(ref, pairs, 0, batch_size=2, with_p=True)
        scores[fused] = (pol, metrics.heldout_metrics(pol, ref_, pairs, beta=0.1))
    for key in scores[True][0]:
        torch.testing.assert_close(scores[True][0][key], scores[False][0][key], rtol=0, atol=2e-5)
    assert scores[True][1].keys() == scores[False][1].keys()
    for key, value in scores[True][1].items():
        assert value == pytest.approx(scores[False][1][key], rel=1e-4, abs=1e-5, nan_ok=True), key


# Config fields that change the logits after the head: planted on a tiny config, each must be applied exactly
# or send the model to the full-logits path with a line in the log.
PLANTED = [("gemma2", {"final_logit_softcapping": 3.0}), ("granite", {"logits_scaling": 8.0}),
           ("cohere", {"logit_scale": 0.25}), ("llama", {"lm_head_multiplier": 0.5}),
           ("llama", {"output_multiplier_scale": 2.0}), ("llama", {"logit_softcapping": 5.0})]


@pytest.mark.parametrize("family,field", PLANTED, ids=[f"{f}-{next(iter(c))}" for f, c in PLANTED])
@pytest.mark.parametrize("probe_only", [False, True], ids=["field", "probe"])
def test_post_head_changes_fall_back_with_a_log_line(family, field, probe_only, monkeypatch, capsys):
    """Named by its config field, or (probe_only: the field list emptied) caught by the probe, whose check is
    that the model returns its head's output unchanged. Either way the log-probs are the full logits'."""
    if probe_only:
        monkeypatch.setattr(scoring, "POST_HEAD_FIELDS", {})
    monkeypatch.setattr(scoring, "_SAID", set())
    model = build(family, **field)
    key, value = next(iter(field.items()))
    batch = data.collate(examples(), 0)
    with torch.no_grad():
        ours = scoring.view_logps(model, batch, 6)
        ref = reference_logps(model, batch)
    out = capsys.readouterr().out
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-5)
    applied = family in ("gemma2", "granite", "cohere")  # the others' forward ignores the planted field
    if probe_only and not applied:
        assert scoring.fused_logps(model) and out == ""  # nothing changes the logits: fused is exact
        return
    assert not scoring.fused_logps(model)
    lines = [line for line in out.splitlines() if "full [rows, tokens, vocab] logits" in line]
    assert len(lines) == 1, out
    assert (f"config.{key} = {value}" if not probe_only else "changes its head's logits") in lines[0]
    scoring.view_logps(model, batch, 6)
    assert "full [rows" not in capsys.readouterr().out  # named once


@pytest.mark.parametrize("family,field", [("granite", {"logits_scaling": 1.0}), ("cohere", {"logit_scale": 1.0}),
                                          ("gemma2", {"final_logit_softcapping": None})])
def test_neutral_post_head_fields_stay_fused_and_exact(family, field):
    model = build(family, **field)
    fused_on(model)
    batch = data.collate(examples(), 0)
    fused, g_fused = values_and_grads(model, lambda: scoring.view_logps(model, batch, 6))
    ref, g_ref = values_and_grads(model, lambda: reference_logps(model, batch))
    torch.testing.assert_close(fused, ref, rtol=0, atol=2e-5)
    assert_grads_close(g_fused, g_ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_readme_three_lines(family):
    """README's recipe: the base model's last hidden states, the output embedding, srpo.hidden_sequence_logps."""
    from srpo import hidden_sequence_logps

    model = build(family)
    batch = data.collate(examples(), 0)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    h = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    head = model.get_output_embeddings()
    logps = hidden_sequence_logps(h, head.weight, labels, head.bias)
    torch.testing.assert_close(logps.double(), reference_logps(model, batch).detach(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("switch", ["FUSED_LOGPS", "FUSED_MIN_VOCAB"])
def test_switch_off_uses_full_logits(monkeypatch, switch):
    model = build("gpt_neox")
    monkeypatch.setattr(scoring, switch, False if switch == "FUSED_LOGPS" else model.config.vocab_size + 1)
    calls = []
    monkeypatch.setattr(scoring, "hidden_token_logps", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        scoring.view_logps(model, data.collate(examples(), 0), 6)
    assert not calls


DIST_HARNESS = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, data
from training import distributed, models, scoring
from test_scoring import examples

calls, fused_head = [], scoring.hidden_token_logps
scoring.hidden_token_logps = lambda *a, **k: calls.append(1) or fused_head(*a, **k)
scoring.FUSED_MIN_VOCAB = 0
rank, world, device = distributed.setup_distributed("cpu")
tokenizer = models.load_tokenizer("tiny")
out = {{}}
for mode in ("fp32", "bf16"):
    mp, _ = models.mixed_precision(mode, device)
    model = models.load_sharded("tiny", tokenizer, device, torch.float32, mp, activation_checkpointing=True).train()
    for packing in ("padded", "packed", "shared"):
        batch = data.to_device(data.collate(examples(tokenizer.vocab_size), 0, packing, 64), device)
        for fused in (True, False):
            scoring.FUSED_LOGPS = fused
            calls.clear()
            for module in model.modules():  # after a no-grad forward FSDP2 leaves modules unsharded: the sharded
                if hasattr(module, "reshard"):  # parameters (and their .grad) are the ones to clear
                    module.reshard()
            model.zero_grad(set_to_none=True)
            logps = scoring.view_logps(model, batch, 6, "p_")
            (logps * torch.linspace(-1.0, 2.0, 6)).sum().backward()
            grads = {{k: p.grad.full_tensor().tolist() for k, p in model.named_parameters()
                      if "embed_out" in k or "layers.1.mlp" in k}}
            with torch.no_grad():
                ref = scoring.view_logps(model, batch, 6)  # a no-grad pass too
            out[f"{{mode}} {{packing}} {{fused}}"] = {{"logps": logps.tolist(), "grads": grads,
                                                     "ref": ref.tolist(), "calls": len(calls)}}
if rank == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh)
torch.distributed.destroy_process_group()
"""


def test_two_fsdp2_ranks_equal_one(tmp_path):
    """FSDP2 with activation checkpointing, fp32 and bf16 mixed precision, every layout: fused over two gloo
    ranks equals fused over one, and the full-logits path."""
    harness = tmp_path / "harness.py"
    harness.write_text(DIST_HARNESS.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               HF_HUB_OFFLINE="1")
    results = {}
    for world in (1, 2):
        path = tmp_path / f"world{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(harness), str(path)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        results[world] = json.loads(path.read_text())
    for key, one in results[1].items():
        two, full = results[2][key], results[2][key.replace("True", "False")]
        atol = 2e-5 if key.startswith("fp32") else 2e-3
        if key.endswith("True"):  # the grad and no-grad passes fused (and the probe, on the first)
            assert one["calls"] >= 2 and two["calls"] >= 2 and full["calls"] == 0, key
        else:
            assert one["calls"] == two["calls"] == 0, key
        for name in ("logps", "ref"):
            torch.testing.assert_close(torch.tensor(two[name]), torch.tensor(one[name]), rtol=0, atol=atol, msg=key)
        torch.testing.assert_close(torch.tensor(two["logps"]), torch.tensor(full["logps"]), rtol=0, atol=atol,
                                   msg=key)
        grads = {k: torch.tensor(v) for k, v in two["grads"].items()}
        for what, other in (("one rank", one), ("full logits", full)):
            ref = {k: torch.tensor(v) for k, v in other["grads"].items()}
            assert_grads_close(grads, ref, rel=1e-4 if key.startswith("fp32") else 2e-2, what=f"{key} vs {what}")


def test_pair_logps_matches_forward_logps_one_pair_at_a_time():
    tok = models.load_tokenizer("tiny")
    model = models.load_model("tiny", tok, seed=0)
    pairs = [formats.Pair("Copy: ABDEF\n", "ABDEF", "AB"), formats.Pair("Say hi\n", "hi there, friend", "no"),
             formats.Pair("Q\n", "x", "yyyyyyyy", 1.0, 0.5)]  # unequal lengths: padding in every batch
    examples = data.tokenize_pairs(pairs, tok, 300, REFINE_PROMPTS["100"], log=None)
    out = scoring.pair_logps(model, examples, tok.pad_token_id, batch_size=2, with_p=True)
    assert sorted(out) == ["chosen", "p_chosen", "p_rejected", "rejected"]
    for i, example in enumerate(examples):
        batch = data.collate([example], tok.pad_token_id)
        for prefix in ("", "p_"):
            with torch.no_grad():
                rows = scoring.forward_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                            batch[prefix + "labels"])
            assert out[prefix + "chosen"][i] == pytest.approx(float(rows[0]), abs=1e-4)
            assert out[prefix + "rejected"][i] == pytest.approx(float(rows[1]), abs=1e-4)
    x_only = scoring.pair_logps(model, examples, tok.pad_token_id, batch_size=5)
    assert sorted(x_only) == ["chosen", "rejected"] and torch.equal(x_only["chosen"], out["chosen"])
    score_chosen, _ = metrics.true_scores(examples)
    assert torch.isnan(score_chosen[:2]).all() and score_chosen[2] == 1.0
    no_p = data.tokenize_pairs(pairs, tok, 300, None, log=None)
    with pytest.raises(common.EvalError, match="no p ⊕ x view"):
        scoring.pair_logps(model, no_p, tok.pad_token_id, with_p=True)
