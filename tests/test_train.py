"""train.py on CPU: distributed against one process, accumulation, resume, reference cache, learning,
export and faults. Every run is a few steps of the tiny model on the embedded data."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import FAST, ROOT, assert_close_weights, env, final_weights, read_metrics, run_train, signalled_run

import data
import train
from base import embedded
from training import checkpoint, models, scoring

# RMSprop's first steps are sign-like, so float noise in a near-zero gradient flips whole updates:
# the equivalence tests use SGD, whose weights are linear in the gradient.


def test_four_processes_match_one(tmp_path):
    flags = ["--loss", "sr-dpo", "--max_steps", "3", "--optimizer", "sgd", "--lr", "0.5"]
    code, _ = run_train(tmp_path / "one", *flags)
    assert code == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "two"), *FAST, *flags]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=1e-5)
    assert_close_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), atol=1e-5)


def test_accumulation_matches_full_batch(tmp_path):
    flags = ["--loss", "sr-ipo", "--max_steps", "2", "--optimizer", "sgd", "--lr", "0.01"]
    assert run_train(tmp_path / "full", *flags)[0] == 0
    assert run_train(tmp_path / "micro", *flags, "--micro_batch_size", "2")[0] == 0
    assert_close_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "micro"), atol=1e-6)


def test_resume_gives_the_same_losses(tmp_path):
    flags = ["--loss", "sr-dpo", "--sft_steps", "2"]
    _, whole = run_train(tmp_path / "whole", *flags, "--max_steps", "4")
    # Stop after alignment step 2 (the stage's end writes a checkpoint), then continue to step 4.
    run_train(tmp_path / "cut", *flags, "--max_steps", "2")
    _, resumed = run_train(tmp_path / "cut", *flags, "--max_steps", "4", "--resume")
    key = [(m["stage"], m["step"], m["loss"]) for m in whole]
    assert [(m["stage"], m["step"], m["loss"]) for m in resumed] == key  # bitwise in one process


def test_resume_with_sft_saved_in_bf16_gives_the_same_losses_and_weights(tmp_path):
    """sft/ in bf16: the uninterrupted run's π_ref (the SFT policy in memory) is the one a resumed run loads."""
    flags = ["--loss", "sr-dpo", "--sft_steps", "2", "--save_dtype", "bfloat16"]
    _, whole = run_train(tmp_path / "whole", *flags, "--max_steps", "3")
    run_train(tmp_path / "cut", *flags, "--max_steps", "1")
    _, resumed = run_train(tmp_path / "cut", *flags, "--max_steps", "3", "--resume")
    assert [(m["stage"], m["step"], m["loss"]) for m in resumed] == [(m["stage"], m["step"], m["loss"]) for m in whole]
    assert_close_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"), atol=0)


def test_precomputed_reference_matches_live(tmp_path):
    flags = ["--loss", "sr-dpo", "--max_steps", "3"]
    _, live = run_train(tmp_path / "live", *flags)
    _, cached = run_train(tmp_path / "cached", *flags, "--precompute_ref")
    for a, b in zip(live, cached, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["delta_mean"] == pytest.approx(b["delta_mean"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loss", ["sft", "dpo", "ipo", "sr-dpo", "sr-ipo"])
def test_every_loss_learns(tmp_path, loss):
    extra = ["--lam", "0.5"] if loss.startswith("sr-") else []
    # 16 pairs seen 8 times: each loss must fit them.
    code, ms = run_train(tmp_path, "--loss", loss, "--max_pairs", "16", "--epochs", "8", "--batch_size", "8", *extra)
    assert code == 0
    losses = [m["loss"] for m in ms]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, nan_at_step):
    nan_at_step(3)
    code, ms = run_train(tmp_path, "--loss", "sr-dpo", "--max_steps", "6", "--save_every", "2")
    assert code == 2
    extra = torch.load(tmp_path / checkpoint.CHECKPOINT / "extra_rank0.pt", weights_only=True)
    assert extra["step"] == 2
    assert [m["step"] for m in ms] == [1, 2]
    assert not (tmp_path / checkpoint.FINAL).exists()


def test_nan_message_names_the_step(tmp_path, capsys, nan_at_step):
    nan_at_step(2)
    run_train(tmp_path, "--loss", "dpo", "--max_steps", "3")
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "dpo step 2" in err and len(err.strip().splitlines()) == 1


def test_only_project_errors_become_one_line(tmp_path, monkeypatch):
    def bug(*args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(train, "preference_terms", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_train(tmp_path, "--loss", "dpo", "--max_steps", "1")


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path):
    returncode, out = signalled_run(tmp_path, signal.SIGTERM)
    assert returncode == 0, out[-2000:]
    assert "SIGTERM" in out
    extra = torch.load(tmp_path / checkpoint.CHECKPOINT / "extra_rank0.pt", weights_only=True)
    assert extra["step"] == len(read_metrics(tmp_path)) >= 2
    code, ms = run_train(tmp_path, "--loss", "dpo", "--max_steps", str(extra["step"] + 1), "--epochs", "100",
                         "--resume")
    assert code == 0 and ms[-1]["step"] == extra["step"] + 1
    assert [m["global_step"] for m in ms] == list(range(1, len(ms) + 1))


def test_get_lr_is_the_dpo_reference_ramp():
    reference = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                  lambda step: min(1.0, (step + 1) / (4 + 1)))
    expected = []
    for _ in range(7):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [train.get_lr(s, 1.0, 4) for s in range(7)] == pytest.approx(expected)
    assert expected[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert train.get_lr(0, 1.0, 0) == 1.0
    assert train.resolved(train.Config(model="EleutherAI/pythia-2.8b")).warmup_steps == 150
    assert train.resolved(train.Config(warmup_steps=3)).warmup_steps == 3


def test_every_loss_sees_the_same_x_view_batches(tmp_path):
    """At the same --max_length, DPO, IPO and SFT are cut as Sr-DPO is: identical x-view batches."""
    words = "the cat sat on a mat and then it ran far away from the dog".split()
    path = tmp_path / "long.jsonl"
    with open(path, "w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": " ".join(words[i % 5:]) * 3, "chosen": " ".join(words[:8 + i % 6]) * 4,
                                 "rejected": " ".join(words[i % 4:]) * 3}) + "\n")
    tokenizer = models.load_tokenizer()

    def batches(loss, *flags):
        cfg = train.resolved(train.parse_config(["--loss", loss, "--max_length", "400", "--batch_size", "8",
                                                 "--data", str(path), *flags]))
        examples, _ = train.load_examples(cfg, tokenizer, lambda line: None)
        return list(train.step_batches(examples, cfg, 4, 0, 0, 1, 0, 2))

    def x_view(steps):
        return [[{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in step] for step in steps]

    def same(a, b):
        return all(torch.equal(u[k], v[k]) for s, t in zip(a, b, strict=True) for u, v in zip(s, t, strict=True)
                   for k in u)

    sr = batches("sr-dpo")
    assert "p_input_ids" in sr[0][0]
    for loss in ("dpo", "ipo", "sft"):
        other = batches(loss)
        assert "p_input_ids" not in other[0][0] and same(x_view(sr), x_view(other)), loss
    assert not same(x_view(sr), x_view(batches("dpo", "--truncate_x_only")))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt"])
def test_delta_is_deterministic_with_dropout_in_the_config(tmp_path, arch):
    """Attention dropout 0.1 in the config: Δπ of the same batch is bitwise repeatable in train mode and
    equals its eval-mode value (the attention modules copy the rate into a float when built)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from srpo import REFINE_PROMPT, refinement

    tokenizer = models.load_tokenizer()
    rates = {"llama": {"attention_dropout": 0.1}, "gpt_neox": {"attention_dropout": 0.1, "hidden_dropout": 0.1},
             "opt": {"attention_dropout": 0.1, "dropout": 0.1}}[arch]
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, ffn_dim=64, word_embed_proj_dim=32,
                                  max_position_embeddings=512, **rates)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    examples = data.tokenize_pairs(embedded.embedded_pairs("test")[:4], tokenizer, 512, REFINE_PROMPT, log=None)
    batch = data.collate(examples, 0)
    view = (batch["p_input_ids"], batch["p_attention_mask"], batch["p_labels"])

    def delta(policy, ref):
        with torch.no_grad():
            pol, rf = scoring.forward_logps(policy, *view), scoring.forward_logps(ref, *view)
        return refinement(pol[:4], pol[4:], rf[:4], rf[4:], 0.1)

    raw = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    with torch.no_grad():
        assert not torch.equal(scoring.forward_logps(raw, *view), scoring.forward_logps(raw, *view))  # dropout is live
    policy, ref = models.load_model(str(tmp_path)).train(), models.load_model(str(tmp_path))
    first = delta(policy, ref)
    assert torch.equal(first, delta(policy, ref))
    assert torch.equal(scoring.forward_logps(policy, *view), scoring.forward_logps(policy, *view))  # the grad pass too
    assert torch.equal(first, delta(policy.eval(), ref.eval()))


def test_sft_loss_is_the_mean_over_the_global_batch_tokens(tmp_path):
    """SFT's gradient is that of the mean NLL over every response token of the global batch: the same in one
    process, in two (torchrun) and in 4 micro-batches, and equal to an independent F.cross_entropy."""
    import torch.nn.functional as F

    path = tmp_path / "sft.jsonl"
    with open(path, "w") as fh:  # responses of 5 to 130 bytes: a per-sequence mean would weigh them otherwise
        for i in range(8):
            fh.write(json.dumps({"prompt": f"Say {i}:", "chosen": " yes" * (1 + 4 * i) + "!", "rejected": "no"}) + "\n")
    flags = ["--data", str(path), "--max_pairs", "8", "--loss", "sft", "--max_steps", "1", "--optimizer", "sgd",
             "--lr", "1", "--warmup_steps", "0", "--max_grad_norm", "1e9"]
    assert run_train(tmp_path / "one", *flags)[0] == 0
    assert run_train(tmp_path / "micro", *flags, "--micro_batch_size", "2")[0] == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "two"), *FAST, *flags]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    tokenizer = models.load_tokenizer()
    examples = data.tokenize_pairs(data.load_pairs(str(path), "train", log=None), tokenizer, 512, log=None)

    def gradient(per_sequence_mean):
        model = models.load_model(models.TINY, tokenizer, seed=0)
        nll, tokens = [], 0
        for e in examples:
            logits = model(input_ids=torch.tensor([e["chosen_ids"]])).logits[0, :-1]
            labels = torch.tensor(e["chosen_labels"][1:])
            n = int((labels != -100).sum())
            total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            nll.append(total / n if per_sequence_mean else total)
            tokens += n
        (torch.stack(nll).sum() / (len(nll) if per_sequence_mean else tokens)).backward()
        return {k: p.detach() - p.grad for k, p in model.named_parameters()}

    expected = gradient(per_sequence_mean=False)
    for run_dir in ("one", "micro", "two"):
        got = final_weights(tmp_path / run_dir)
        assert_close_weights({k: got[k] for k in expected}, expected, atol=1e-5)
    other = gradient(per_sequence_mean=True)
    assert max((other[k] - expected[k]).abs().max() for k in expected) > 1e-3  # the test tells the two apart


def test_packed_and_shared_runs_match_padded(tmp_path, capsys):
    """SFT then Sr-DPO, held-out scoring at the end: the same metrics and weights in every batch layout,
    one process (shared) and two (packed), as with padded batches."""
    flags = ["--loss", "sr-dpo", "--sft_steps", "2", "--max_steps", "2", "--optimizer", "sgd", "--lr", "0.5",
             "--micro_batch_size", "2"]
    code, padded = run_train(tmp_path / "padded", *flags, "--packing", "padded")
    assert code == 0
    capsys.readouterr()
    code, shared = run_train(tmp_path / "shared", *flags, "--packing", "auto")
    assert code == 0
    assert "; shared batches" in capsys.readouterr().out  # auto: shared on this model
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "packed"), *FAST, *flags, "--packing", "packed"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "; packed batches" in done.stdout
    for other in (shared, read_metrics(tmp_path / "packed")):
        assert len(other) == len(padded) == 4
        for want, got in zip(padded, other):
            timed = {"examples_per_s", "tokens_per_s"}
            assert got.keys() == want.keys()
            numbers = [k for k in want.keys() - timed if not isinstance(want[k], str)]
            assert all(got[k] == want[k] for k in want.keys() - timed - set(numbers))  # the stage's name
            assert {k: got[k] for k in numbers} == pytest.approx({k: want[k] for k in numbers}, rel=1e-4, abs=1e-6)
    for name in ("shared", "packed"):
        assert_close_weights(final_weights(tmp_path / "padded"), final_weights(tmp_path / name), atol=1e-5)


def test_quality_aware_sft_trains_on_the_rated_pairs(tmp_path):
    """The first SFT step's loss against an independent one: F.cross_entropy on embedded.embedded_sft_pairs(1)'s
    first batch, one pair at a time; micro-batches of 2 change nothing."""
    import torch.nn.functional as F

    import data

    code, m = run_train(tmp_path, "--loss", "sft", "--max_steps", "1", "--sft_quality_q", "1",
                        "--micro_batch_size", "2")
    assert code == 0
    tok = models.load_tokenizer(models.TINY)
    model = models.load_model(models.TINY, tok, seed=0)
    pairs = embedded.embedded_sft_pairs(1.0)[:32]
    nll = []
    for i in data.batch_indices(len(pairs), 8, epoch=0, seed=0)[0]:
        prompt = tok.encode(pairs[i].prompt, add_special_tokens=False)
        response = tok.encode(pairs[i].chosen, add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        nll.append(F.cross_entropy(logits, torch.tensor(response)).item())
    assert pairs[0].prompt.startswith("Please generate a response with a usefulness rating of ")
    assert m[0]["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
