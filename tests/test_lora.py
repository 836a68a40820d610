"""LoRA (Issue 23): adapters start at zero, π_ref is the base with adapters off, only adapters train, step 1 equals
full fine-tuning (fused head and full logits), the merged export and the adapter folder give the policy's log-probs,
resume, --precompute_ref, every batch layout, two ranks, and the one-line errors.

Every run is a few steps of the tiny model on the CPU (tests/helpers.py's FAST flags); runs are shared between
assertions. peft is a test dependency (requirements-test.txt): nothing here is skipped.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import FAST, ROOT, assert_close_weights, env, final_weights, read_metrics, run_train

import data
import train
from srpo import REFINE_PROMPTS
from training import checkpoint, lora, models, scoring

LORA = ["--lora_r", "8"]
TARGETS = lora.FAMILY_TARGETS["gpt_neox"]
SGD = ["--optimizer", "sgd", "--lr", "0.5"]  # weights linear in the gradient: comparisons stay tight


def examples(n=4):
    tokenizer = models.load_tokenizer()
    pairs = data.load_pairs("embedded", "train")[:n]
    return data.tokenize_pairs(pairs, tokenizer, 256, REFINE_PROMPTS["100"])


def logps(model, batch):
    with torch.no_grad():
        return scoring.view_logps(model, batch, 2 * batch["index"].numel())


def nonzero_adapters(model, seed=1):
    """B set to random values, so the adapters change the output (they start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_adapters_start_at_zero_and_the_reference_view_is_the_base(fused, monkeypatch):
    monkeypatch.setattr(scoring, "FUSED_MIN_VOCAB", 0 if fused else scoring.FUSED_MIN_VOCAB)
    batch = data.collate(examples(), 0)
    base = models.load_model()
    policy = lora.add_adapters(models.load_model(), 8, targets=list(TARGETS))
    ref = lora.Reference(policy)
    # the head is found through the peft wrapper and the reference view: both scored as the base model is
    assert scoring.fused_logps(policy) == scoring.fused_logps(ref) == scoring.fused_logps(base) == fused
    expected = logps(base, batch)
    assert torch.equal(logps(policy, batch), expected)  # B = 0
    nonzero_adapters(policy)
    assert not torch.allclose(logps(policy, batch), expected)
    policy.train()
    with lora.reference_view(policy):
        assert torch.equal(logps(policy, batch), expected)
    assert policy.training  # the mode it had
    assert torch.equal(logps(ref, batch), expected)
    assert type(policy.get_output_embeddings().forward).__name__ == "method"  # the fused head's patch undone
    assert all(p.requires_grad for p in lora.trainable(policy)) and len(lora.trainable(policy)) == 2 * 4 * 2


def test_merged_state_is_peft_merge_and_the_adapter_folder_loads(tmp_path):
    from peft import PeftModel

    batch = data.collate(examples(), 0)
    policy = nonzero_adapters(lora.add_adapters(models.load_model(), 4, alpha=12, targets=list(TARGETS))).eval()
    expected = logps(policy, batch)
    state = policy.state_dict()
    plain = models.load_model()
    plain.load_state_dict(lora.merged_state(state, policy))
    torch.testing.assert_close(logps(plain, batch), expected, atol=1e-4, rtol=0)
    lora.save_adapter(state, policy, tmp_path / "adapter", base_model="tiny")
    loaded = PeftModel.from_pretrained(models.load_model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logps(loaded, batch), expected, atol=0, rtol=0)
    torch.testing.assert_close(logps(lora.merge(policy), batch), expected, atol=1e-4, rtol=0)


def test_default_targets_per_family():
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    assert lora.default_targets(models.tiny_config(models.load_tokenizer())) == list(TARGETS)
    assert "gate_proj" in lora.default_targets(LlamaConfig())
    assert lora.default_targets(GPT2Config()) == ["c_attn", "c_proj", "c_fc"]
    assert "out_proj" in lora.default_targets(OPTConfig())
    assert lora.default_targets(object()) == lora.ALL_LINEAR
    assert lora.parse_targets("q_proj, v_proj", LlamaConfig()) == ["q_proj", "v_proj"]
    assert lora.parse_targets("all-linear", LlamaConfig()) == lora.ALL_LINEAR


def test_fused_step_one_equals_full_fine_tuning_only_adapters_change_and_the_export(tmp_path, monkeypatch):
    """Through the fused head (the path of every real vocabulary): LoRA's first step is full fine-tuning's (DPO
    loss ln 2, Δπ 0, the same rewards and log-probs); then only the adapted modules move; final/ (merged) and
    final/adapter give the trained policy's log-probs."""
    from peft import PeftModel
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(scoring, "FUSED_MIN_VOCAB", 0)
    flags = ["--loss", "sr-dpo", "--max_steps", "2", *SGD]
    assert run_train(tmp_path / "full", *flags)[0] == 0
    code, ms = run_train(tmp_path / "lora", *flags, *LORA)
    assert code == 0
    full = read_metrics(tmp_path / "full")
    assert ms[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert ms[0]["delta_mean"] == 0 and ms[0]["delta_std"] == 0
    for key in ("loss", "reward_chosen", "reward_rejected", "delta_mean", "logps_chosen", "logps_rejected"):
        assert ms[0][key] == pytest.approx(full[0][key], abs=1e-6), key
    assert ms[1]["loss"] != ms[0]["loss"]  # the adapters learned
    # final/ is merged: only the adapted modules' weights moved; embeddings, norms, biases, head as they were
    base = models.load_model().state_dict()
    trained = final_weights(tmp_path / "lora")
    assert trained.keys() == base.keys()
    moved = {k for k in base if not torch.equal(base[k], trained[k])}
    assert moved and all(k.endswith(".weight") and k.split(".")[-2] in TARGETS for k in moved), moved
    # the checkpoint's policy, rebuilt unsharded, against both exports
    batch = data.collate(examples(), 0)
    dcp_to_torch_save(str(tmp_path / "lora" / checkpoint.CHECKPOINT), str(tmp_path / "ckpt.pt"))
    policy = lora.add_adapters(models.load_model(), 8, targets=list(TARGETS))
    policy.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    expected = logps(policy.eval(), batch)
    final = tmp_path / "lora" / checkpoint.FINAL
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    torch.testing.assert_close(logps(merged, batch), expected, atol=1e-4, rtol=0)
    adapter = PeftModel.from_pretrained(models.load_model(), final / lora.ADAPTER_DIR).eval()
    torch.testing.assert_close(logps(adapter, batch), expected, atol=0, rtol=0)
    assert json.loads((final / lora.ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "tiny"


def test_sft_adapter_merged_before_alignment_resume_bitwise_and_precompute_ref(tmp_path):
    flags = ["--loss", "sr-dpo", "--sft_steps", "2", *LORA, "--lora_dropout", "0.1"]
    _, whole = run_train(tmp_path / "whole", *flags, "--max_steps", "4")
    align = [m for m in whole if m["stage"] == "sr-dpo"]
    # π_ref is the SFT model (its adapter merged into sft/): alignment starts at ln 2 with Δπ 0, dropout or not
    assert align[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and align[0]["delta_mean"] == 0
    sft_adapter = tmp_path / "whole" / checkpoint.SFT_DIR / lora.ADAPTER_DIR / "adapter_config.json"
    assert json.loads(sft_adapter.read_text())["base_model_name_or_path"] == "tiny"
    final_adapter = tmp_path / "whole" / checkpoint.FINAL / lora.ADAPTER_DIR / "adapter_config.json"
    assert json.loads(final_adapter.read_text())["base_model_name_or_path"] == str(tmp_path / "whole" / "sft")
    run_train(tmp_path / "cut", *flags, "--max_steps", "2")
    _, resumed = run_train(tmp_path / "cut", *flags, "--max_steps", "4", "--resume")
    key = [(m["stage"], m["step"], m["loss"]) for m in whole]
    assert [(m["stage"], m["step"], m["loss"]) for m in resumed] == key  # bitwise in one process
    assert_close_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"), atol=0)
    # π_ref's log-probs read from the cache (the reference view scored once) give the live run's losses
    _, cached = run_train(tmp_path / "cached", *flags, "--max_steps", "4", "--precompute_ref")
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in whole], rel=1e-5, abs=1e-6)


def test_every_layout_and_two_ranks_match_one_padded_process(tmp_path, capsys):
    """Padded and shared batches in one process, packed over two ranks: the same metrics and final weights."""
    flags = ["--loss", "sr-dpo", "--max_steps", "2", *SGD, *LORA, "--micro_batch_size", "2"]
    code, padded = run_train(tmp_path / "padded", *flags, "--packing", "padded")
    assert code == 0
    capsys.readouterr()
    code, shared = run_train(tmp_path / "shared", *flags, "--packing", "shared")
    assert code == 0 and "; shared batches" in capsys.readouterr().out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "packed"), *FAST, *flags, "--packing", "packed"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "; packed batches" in done.stdout and "2 rank(s)" in done.stdout
    for other in (shared, read_metrics(tmp_path / "packed")):
        assert [m["loss"] for m in other] == pytest.approx([m["loss"] for m in padded], rel=1e-5)
        assert [m["reward_chosen"] for m in other] == pytest.approx([m["reward_chosen"] for m in padded], abs=1e-6)
    for name in ("shared", "packed"):
        assert_close_weights(final_weights(tmp_path / "padded"), final_weights(tmp_path / name), atol=1e-5)


def test_without_peft_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(lora.LoraError, match="pip install peft"):
        lora.require_peft()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out_dir", str(tmp_path), *FAST, *LORA])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error: --lora_r needs the peft package: pip install peft"]
    assert not os.path.exists(tmp_path / checkpoint.METRICS)  # refused before any work


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "-1"], "--lora_r -1, --lora_alpha 0.0, --lora_dropout 0.0: need r >= 0"),
    (["--lora_r", "8", "--lora_dropout", "1"], "dropout in [0, 1)"),
])
def test_bad_lora_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out_dir", str(tmp_path), *FAST, *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and message in err[0]


def test_unknown_targets_are_a_one_line_error(tmp_path, capsys):
    assert train.main(["--out_dir", str(tmp_path), *FAST, *LORA, "--lora_targets", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [e for e in err if "train.py: error: --lora_targets: Target modules {'nosuch'} not found" in e]


def test_a_lora_run_does_not_resume_a_full_run(tmp_path, capsys):
    assert run_train(tmp_path, "--loss", "dpo", "--max_steps", "1")[0] == 0
    assert train.main(["--out_dir", str(tmp_path), *FAST, "--loss", "dpo", "--max_steps", "2", "--resume",
                       *LORA]) == 2
    assert "lora_r" in capsys.readouterr().err


def test_lora_benchmark_runs_both_cases(tmp_path):
    out = tmp_path / "lora.json"
    cmd = [sys.executable, "benchmarks/lora.py", "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "512",
           "--pairs", "1", "--prompt_tokens", "8", "--response_tokens", "8", "--p_tokens", "4", "--steps", "1",
           "--device", "cpu", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(env(), CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["step_s"]["full"] > 0 and result["step_s"]["lora"] > 0 and result["time_ratio"] > 0
    assert result["memory"]["lora"]["trainable"] < result["memory"]["full"]["trainable"]
    assert "| lora |" in done.stdout
