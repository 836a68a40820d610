"""LoRA (Issue 23): adapters start at zero, π_ref is the base with adapters off, only adapters train, the merged
export and the adapter folder give the policy's log-probs, resume, two ranks, and the error without peft.

Every run is a few steps of the tiny model on the CPU (tests/test_train.py's FAST flags).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_train import FAST, ROOT, env, final_weights, metrics, run

import checkpoint
import data
import lora
import models
import train
from srpo import REFINE_PROMPTS

PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not PEFT, reason="needs peft (pip install peft)")
LORA = ["--lora_r", "8"]
TARGETS = lora.FAMILY_TARGETS["gpt_neox"]


def examples(n=4):
    tokenizer = models.load_tokenizer()
    pairs = data.load_pairs("embedded", "train")[:n]
    return data.tokenize_pairs(pairs, tokenizer, 256, REFINE_PROMPTS["100"])


def logps(model, batch):
    with torch.no_grad():
        return models.view_logps(model, batch, 2 * batch["index"].numel())


def nonzero_adapters(model, seed=1):
    """B set to random values, so the adapters change the output (they start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@needs_peft
def test_adapters_start_at_zero_and_the_reference_view_is_the_base():
    batch = data.collate(examples(), 0)
    base = models.load_model()
    policy = lora.add_adapters(models.load_model(), 8, targets=list(TARGETS))
    expected = logps(base, batch)
    assert torch.equal(logps(policy, batch), expected)  # B = 0
    nonzero_adapters(policy)
    assert not torch.allclose(logps(policy, batch), expected)
    policy.train()
    with lora.reference_view(policy):
        assert torch.equal(logps(policy, batch), expected)
    assert policy.training  # the mode it had
    assert torch.equal(logps(lora.Reference(policy), batch), expected)
    assert all(p.requires_grad for p in lora.trainable(policy)) and len(lora.trainable(policy)) == 2 * 4 * 2


@needs_peft
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


@needs_peft
def test_default_targets_per_family():
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    assert lora.default_targets(models.tiny_config(models.load_tokenizer())) == list(TARGETS)
    assert "gate_proj" in lora.default_targets(LlamaConfig())
    assert lora.default_targets(GPT2Config()) == ["c_attn", "c_proj", "c_fc"]
    assert "out_proj" in lora.default_targets(OPTConfig())
    assert lora.default_targets(object()) == lora.ALL_LINEAR
    assert lora.parse_targets("q_proj, v_proj", LlamaConfig()) == ["q_proj", "v_proj"]


@needs_peft
def test_step_one_equals_full_fine_tuning_and_only_adapters_change(tmp_path):
    flags = ["--loss", "sr-dpo", "--max_steps", "2", "--optimizer", "sgd", "--lr", "0.5"]
    assert run(tmp_path / "full", *flags)[0] == 0
    code, ms = run(tmp_path / "lora", *flags, *LORA)
    assert code == 0
    full = metrics(tmp_path / "full")
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


@needs_peft
def test_export_merged_and_adapter_give_the_policys_logps(tmp_path):
    from peft import PeftModel
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    assert run(tmp_path, "--loss", "dpo", "--max_steps", "2", "--optimizer", "sgd", "--lr", "0.5", *LORA)[0] == 0
    batch = data.collate(examples(), 0)
    dcp_to_torch_save(str(tmp_path / checkpoint.CHECKPOINT), str(tmp_path / "ckpt.pt"))
    policy = lora.add_adapters(models.load_model(), 8, targets=list(TARGETS))
    policy.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    expected = logps(policy.eval(), batch)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / checkpoint.FINAL).eval()
    torch.testing.assert_close(logps(merged, batch), expected, atol=1e-4, rtol=0)
    adapter = PeftModel.from_pretrained(models.load_model(), tmp_path / checkpoint.FINAL / lora.ADAPTER_DIR).eval()
    torch.testing.assert_close(logps(adapter, batch), expected, atol=0, rtol=0)


@needs_peft
def test_sft_adapter_is_merged_before_alignment_and_resume_is_bitwise(tmp_path):
    flags = ["--loss", "sr-dpo", "--sft_steps", "2", *LORA, "--lora_dropout", "0.1"]
    _, whole = run(tmp_path / "whole", *flags, "--max_steps", "4")
    align = [m for m in whole if m["stage"] == "sr-dpo"]
    # π_ref is the SFT model (its adapter merged into sft/): alignment starts at ln 2 with Δπ 0, dropout or not
    assert align[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and align[0]["delta_mean"] == 0
    assert os.path.isfile(tmp_path / "whole" / checkpoint.SFT_DIR / lora.ADAPTER_DIR / "adapter_config.json")
    run(tmp_path / "cut", *flags, "--max_steps", "2")
    _, resumed = run(tmp_path / "cut", *flags, "--max_steps", "4", "--resume")
    key = [(m["stage"], m["step"], m["loss"]) for m in whole]
    assert [(m["stage"], m["step"], m["loss"]) for m in resumed] == key  # bitwise in one process


@needs_peft
def test_precomputed_reference_matches_live_with_lora(tmp_path):
    flags = ["--loss", "sr-dpo", "--max_steps", "2", *LORA]
    _, live = run(tmp_path / "live", *flags)
    _, cached = run(tmp_path / "cached", *flags, "--precompute_ref")
    for a, b in zip(live, cached, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


@needs_peft
def test_two_ranks_match_one_with_lora(tmp_path):
    flags = ["--loss", "sr-dpo", "--max_steps", "2", "--optimizer", "sgd", "--lr", "0.5", *LORA]
    assert run(tmp_path / "one", *flags)[0] == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "two"), *FAST, *flags]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


def test_without_peft_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(lora.LoraError, match="pip install peft"):
        lora.require_peft()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out_dir", str(tmp_path), *FAST, *LORA])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error: --lora_r needs the peft package: pip install peft"]
    assert train.main(["--out_dir", str(tmp_path), *FAST, "--max_steps", "1"]) == 0  # not needed without LoRA


@needs_peft
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


@needs_peft
def test_unknown_targets_are_a_one_line_error(tmp_path, capsys):
    assert train.main(["--out_dir", str(tmp_path), *FAST, *LORA, "--lora_targets", "nosuch"]) == 2
    assert "train.py: error: --lora_targets: Target modules {'nosuch'} not found" in capsys.readouterr().err
