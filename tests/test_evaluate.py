"""evaluate.py's commands: accuracy against the functions it runs, and its one-line errors. The metrics:
tests/test_metrics.py; the judge: tests/test_judge.py; questions, answers and generation: tests/test_answers.py."""
import json
import math

import numpy as np
import pytest
import torch

import data
import evaluate as ev
from base import embedded
from srpo import REFINE_PROMPTS
from training import metrics, models, scoring

# ------------------------------------------------------------------ accuracy and margins


# ------------------------------------------------------------------ rank statistics


# ------------------------------------------------------------------ the model pass


def test_accuracy_command_matches_the_functions(tmp_path, capsys):
    tok = models.load_tokenizer("tiny")
    policy_dir = tmp_path / "policy"
    models.load_model("tiny", tok, seed=3).save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    out, pairs_out = tmp_path / "acc.json", tmp_path / "pairs.jsonl"
    argv = ["accuracy", "--model", str(policy_dir), "--ref_model", "tiny", "--limit", "4", "--max_length", "300",
            "--beta", "0.2", "--out", str(out), "--pairs_out", str(pairs_out)]
    assert ev.main(argv) == 0
    doc = json.loads(out.read_text())
    examples = data.tokenize_pairs(embedded.embedded_pairs("test"), tok, 300, REFINE_PROMPTS["100"], log=None)[:4]
    expected = metrics.heldout_metrics(
        *(scoring.pair_logps(m, examples, tok.pad_token_id, with_p=True)
          for m in (models.load_model(str(policy_dir)), models.load_model("tiny", tok))), examples, 0.2)
    assert doc["metrics"].keys() == expected.keys() and doc["metrics"]["n_pairs"] == 4
    for key, value in expected.items():
        assert doc["metrics"][key] == (None if math.isnan(value) else pytest.approx(value, abs=1e-5)), key
    assert doc["metrics"]["tie_rate"] == 0  # two different models: no reward is exactly 0
    rows = [json.loads(line) for line in pairs_out.read_text().splitlines()]
    assert np.mean([r["delta"] for r in rows]) == pytest.approx(expected["delta_mean"], abs=1e-5)
    assert "Δπ" in capsys.readouterr().out


# ------------------------------------------------------------------ bad flags, outputs, summaries, model folders


def _one_error(capsys, *parts):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert all(p in err[-1] for p in parts), err[-1]
    return err[-1]


@pytest.mark.parametrize("argv,flag", [
    (["generate", "--model", "tiny", "--questions", "embedded", "--out", "a.jsonl", "--max_new_tokens", "0"],
     "--max_new_tokens"),
    (["generate", "--model", "tiny", "--questions", "embedded", "--out", "a.jsonl", "--top_p", "0"], "--top_p"),
    (["generate", "--model", "tiny", "--questions", "embedded", "--out", "a.jsonl", "--temperature", "-1"],
     "--temperature"),
    (["generate", "--model", "tiny", "--questions", "embedded", "--out", "a.jsonl", "--max_length", "0"],
     "--max_length"),
    (["accuracy", "--batch_size", "0"], "--batch_size"),
    (["accuracy", "--limit", "-1"], "--limit"),
    (["accuracy", "--beta", "nan"], "--beta"),
    (["judge", "--answers_a", "a", "--answers_b", "b", "--questions", "q", "--out", "v", "--judge_url", "u",
      "--timeout", "0"], "--timeout"),
    (["judge", "--answers_a", "a", "--answers_b", "b", "--questions", "q", "--out", "v", "--judge_url", "u",
      "--max_retries", "-1"], "--max_retries"),
])
def test_numeric_flags_out_of_range_are_refused_at_parsing(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        ev.main(argv)
    assert info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_outputs_a_folder_is_refused_and_missing_parents_are_created(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    argv = ["generate", "--model", "tiny", "--questions", "embedded", "--max_new_tokens", "2"]
    assert ev.main([*argv, "--out", str(tmp_path / "taken")]) == 2
    _one_error(capsys, f"--out {tmp_path / 'taken'}: a folder")
    assert ev.main(["accuracy", "--limit", "2", "--out", str(tmp_path / "taken")]) == 2
    _one_error(capsys, "--out", "a folder")
    assert (tmp_path / "taken").is_dir()  # an atomic write would have replaced the folder by a file
    out = tmp_path / "new" / "deeper" / "acc.json"
    assert ev.main(["accuracy", "--limit", "2", "--max_length", "300", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["n_pairs"] == 2


def test_table_of_a_file_that_is_no_summary(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "b", "model_a": "a"}))
    assert ev.main(["table", str(tmp_path / "list.json")]) == 2
    _one_error(capsys, "list.json: not a summary of judge or exact (a JSON list, not an object)")
    assert ev.main(["table", str(tmp_path / "other.json")]) == 2
    _one_error(capsys, "other.json: not a summary of judge or exact (no model_b, games, decided")


def _saved_tiny(path):
    tok = models.load_tokenizer("tiny")
    models.load_model("tiny", tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_model_folders_that_cannot_load_fail_in_one_line(tmp_path, capsys):
    import os
    tok = _saved_tiny(tmp_path / "whole")
    argv = ["generate", "--questions", "embedded", "--max_new_tokens", "2", "--out", str(tmp_path / "a.jsonl")]
    notok = tmp_path / "notok"
    models.load_model("tiny", tok, seed=1).save_pretrained(notok)
    assert ev.main([*argv, "--model", str(notok)]) == 2
    _one_error(capsys, f"{notok}: no tokenizer files (none of tokenizer_config.json")
    half = tmp_path / "half"
    _saved_tiny(half)
    weights = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    assert ev.main([*argv, "--model", str(half)]) == 2
    _one_error(capsys, f"{half / 'model.safetensors'}: not a whole safetensors file")
    pickled = tmp_path / "pickled"
    _saved_tiny(pickled)
    os.remove(pickled / "model.safetensors")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never run",))

    torch.save({"x": Payload()}, pickled / "pytorch_model.bin")
    assert ev.main([*argv, "--model", str(pickled)]) == 2
    line = _one_error(capsys, f"{pickled}: refused its pickled weights", "use the model's .safetensors")
    assert "weights_only=False" not in line
    remote = tmp_path / "remote"
    _saved_tiny(remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="custom_thing",
                  auto_map={"AutoConfig": "code.Config", "AutoTokenizer": ["code.Tok", "code.Tok"]})
    (remote / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((remote / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="Tok", auto_map={"AutoTokenizer": ["code.Tok", "code.Tok"]})
    (remote / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    os.remove(remote / "tokenizer.json")
    (remote / "vocab.json").write_text("{}")
    (remote / "code.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(models.ModelError, match=r"remote: its tokenizer needs remote code \(trust_remote_code\), "
                                                r"which srpo never runs"):
        models.load_tokenizer(str(remote))


def test_max_length_above_the_models_positions_is_refused_at_start(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = models.load_tokenizer("tiny")
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        folder)
    tok.save_pretrained(folder)
    assert models.position_limit(GPT2Config(n_positions=64)) == 64
    out = tmp_path / "a.jsonl"
    assert ev.main(["generate", "--model", str(folder), "--questions", "embedded", "--max_new_tokens", "2",
                    "--max_length", "100", "--out", str(out)]) == 2
    _one_error(capsys, "--max_length 100: more than the 64 positions of", "use 64 or less")
    assert ev.main(["accuracy", "--model", str(folder), "--ref_model", str(folder), "--limit", "2",
                    "--max_length", "100"]) == 2
    _one_error(capsys, "--max_length 100: more than the 64 positions of")
