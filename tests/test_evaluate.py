"""metrics.py and evaluate.py's accuracy command: metrics against hand-worked and brute-force answers.
The judge: tests/test_judge.py; questions, answers and generation: tests/test_answers.py."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import common
import data
import embedded
import evaluate as ev
import formats
import metrics
import models
import scoring
from srpo import REFINE_PROMPTS

# ------------------------------------------------------------------ accuracy and margins

def test_pair_metrics_hand_built_case():
    # β = 0.5. Rewards β·(log π - log π_ref):
    #   chosen   0.5·([-10, -12, -8] - [-11, -11, -9]) = [ 0.5, -0.5, 0.5]
    #   rejected 0.5·([-14, -11, -9] - [-12, -12, -9]) = [-1.0,  0.5, 0.0]
    #   margins Δ_naive = [1.5, -1.0, 0.5]: accuracy 2/3, mean 1/3
    # Under p ⊕ x the chosen log-probs are shifted so that Δπ = [2.0, 0.0, -1.0]:
    #   accuracy 1/3, one tie, signs agree with x on pairs 0 and 1 only.
    def t(*v):
        return torch.tensor(v, dtype=torch.float64)

    logps = {"policy_chosen": t(-10, -12, -8), "policy_rejected": t(-14, -11, -9),
             "ref_chosen": t(-11, -11, -9), "ref_rejected": t(-12, -12, -9),
             "p_policy_chosen": t(-9, -11, -11), "p_policy_rejected": t(-14, -11, -9),
             "p_ref_chosen": t(-11, -11, -9), "p_ref_rejected": t(-12, -11, -9)}
    m = metrics.pair_metrics(logps, beta=0.5)
    assert m["n_pairs"] == 3
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["tie_rate"] == 0
    assert m["margin_mean"] == pytest.approx(1 / 3)
    margins = [1.5, -1.0, 0.5]
    assert m["margin_std"] == pytest.approx(math.sqrt(sum((v - 1 / 3) ** 2 for v in margins) / 3))  # population
    assert m["reward_chosen_mean"] == pytest.approx((0.5 - 0.5 + 0.5) / 3)
    assert m["reward_rejected_mean"] == pytest.approx((-1.0 + 0.5 + 0.0) / 3)
    assert m["p_accuracy"] == pytest.approx(1 / 3)
    assert m["p_tie_rate"] == pytest.approx(1 / 3)
    assert m["delta_mean"] == pytest.approx(1 / 3)
    assert m["delta_std"] == pytest.approx(float(np.std([2.0, 0.0, -1.0], ddof=0)))
    assert m["sign_agreement"] == pytest.approx(2 / 3)
    assert "spearman" not in m  # no scores given


def test_pair_metrics_without_p_view_and_missing_keys():
    zeros = torch.zeros(2)
    m = metrics.pair_metrics({k: zeros for k in metrics.LOGP_KEYS}, beta=0.1)
    assert m["accuracy"] == 0 and m["tie_rate"] == 1 and "delta_mean" not in m
    with pytest.raises(common.EvalError, match="ref_rejected"):
        metrics.pair_metrics({k: zeros for k in metrics.LOGP_KEYS[:3]}, beta=0.1)


def test_preference_logps_names_both_models_and_views():
    pol = {"chosen": torch.tensor([1.0]), "rejected": torch.tensor([2.0]), "p_chosen": torch.tensor([3.0]),
           "p_rejected": torch.tensor([4.0])}
    ref = {k: -v for k, v in pol.items()}
    out = metrics.preference_logps(pol, ref)
    assert sorted(out) == sorted([*metrics.LOGP_KEYS, *("p_" + k for k in metrics.LOGP_KEYS)])
    assert out["policy_chosen"].tolist() == [1] and out["p_ref_rejected"].tolist() == [-4]
    no_p = metrics.preference_logps(pol, {k: ref[k] for k in ("chosen", "rejected")})
    assert sorted(no_p) == sorted(metrics.LOGP_KEYS)  # the p view only where both models were scored with it


def test_one_std_for_training_and_heldout():
    v = torch.tensor([0.5, -1.0, 2.0, 3.5], dtype=torch.float64)
    assert metrics.std_from_sums(float(v.sum()), float((v * v).sum()), 4) == pytest.approx(float(v.std(unbiased=False)))
    sums = metrics.preference_sums(v, v - 1, torch.ones(4), v, v, v)
    assert metrics.preference_means({k: float(t) for k, t in sums.items()}, 4)["delta_std"] == \
        pytest.approx(float(np.std(v.numpy())))


# ------------------------------------------------------------------ rank statistics

def _brute_ranks(v):
    return [sum(u < x for u in v) + (sum(u == x for u in v) + 1) / 2 for x in v]


def _brute_kendall_tau_b(x, y):
    c = d = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        c += sx * sy > 0
        d += sx * sy < 0
        tx += sx == 0 and sy != 0
        ty += sy == 0 and sx != 0
    return (c - d) / math.sqrt((c + d + ty) * (c + d + tx))


def _brute_concordance(pred, truth):
    hits = total = 0
    for i, j in itertools.permutations(range(len(pred)), 2):
        if truth[i] > truth[j]:
            total += 1
            hits += 1.0 if pred[i] > pred[j] else 0.5 if pred[i] == pred[j] else 0.0
    return hits / total


def test_rank_statistics_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 40).astype(float), rng.integers(0, 5, 40).astype(float)
    assert metrics.spearman(x, y) == pytest.approx(np.corrcoef(_brute_ranks(x), _brute_ranks(y))[0, 1])
    assert metrics.kendall_tau_b(x, y) == pytest.approx(_brute_kendall_tau_b(x, y))
    assert metrics.concordance(x, y) == pytest.approx(_brute_concordance(x, y))
    # the block size of the pair counting does not change the counts
    assert metrics._sign_counts(x, y, budget=7) == metrics._sign_counts(x, y)
    u = rng.normal(size=25)
    v = rng.normal(size=25)
    d = np.array(_brute_ranks(u)) - np.array(_brute_ranks(v))
    assert metrics.spearman(u, v) == pytest.approx(1 - 6 * (d ** 2).sum() / (25 * (25 ** 2 - 1)))
    assert math.isnan(metrics.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(metrics.concordance([1.0, 2.0], [3.0, 3.0]))


def _logps_with(delta, naive, beta):
    """logps whose Δπ and Δ_naive are the given vectors (only the policy's chosen side moves)."""
    z = torch.zeros(len(delta), dtype=torch.float64)
    return {"policy_chosen": torch.tensor(naive) / beta, "policy_rejected": z, "ref_chosen": z,
            "ref_rejected": z, "p_policy_chosen": torch.tensor(delta) / beta, "p_policy_rejected": z,
            "p_ref_chosen": z, "p_ref_rejected": z}


def test_delta_correlations_agree_then_disagree():
    rng = np.random.default_rng(1)
    sc = rng.uniform(5, 10, 30)
    sr = rng.uniform(0, 5, 30)
    gap = sc - sr
    agree = np.exp(gap) - 3.0   # strictly increasing in the gap
    m = metrics.pair_metrics(_logps_with(agree, -agree, 0.1), 0.1, torch.tensor(sc), torch.tensor(sr))
    assert m["spearman"] == pytest.approx(1) and m["kendall_tau_b"] == pytest.approx(1)
    assert m["concordance"] == pytest.approx(1)
    assert m["naive_spearman"] == pytest.approx(-1) and m["naive_concordance"] == pytest.approx(0)
    m = metrics.pair_metrics(_logps_with(-agree, agree, 0.1), 0.1, torch.tensor(sc), torch.tensor(sr))
    assert m["spearman"] == pytest.approx(-1) and m["kendall_tau_b"] == pytest.approx(-1)
    assert m["concordance"] == pytest.approx(0)
    assert m["n_scored"] == 30 and m["n_unscored"] == 0


def test_unscored_pairs_are_counted_and_left_out():
    delta = np.array([1.0, 2.0, 3.0, 100.0])
    sc, sr = torch.tensor([1.0, 2.0, 3.0, math.nan]), torch.zeros(4)
    m = metrics.pair_metrics(_logps_with(delta, delta, 0.1), 0.1, sc, sr)
    assert (m["n_scored"], m["n_unscored"]) == (3, 1)
    assert m["gap_mean"] == pytest.approx(2.0) and m["spearman"] == pytest.approx(1)


# ------------------------------------------------------------------ the model pass

def test_pair_logps_matches_forward_logps_one_pair_at_a_time():
    tok = models.load_tokenizer("tiny")
    model = models.load_model("tiny", tok, seed=0)
    pairs = [formats.Pair("Copy: ABDEF\n", "ABDEF", "AB"), formats.Pair("Say hi\n", "hi there, friend", "no"),
             formats.Pair("Q\n", "x", "yyyyyyyy", 1.0, 0.5)]  # unequal lengths: padding in every batch
    examples = data.tokenize_pairs(pairs, tok, 300, REFINE_PROMPTS["100"], log=None)
    out = metrics.pair_logps(model, examples, tok.pad_token_id, batch_size=2, with_p=True)
    assert sorted(out) == ["chosen", "p_chosen", "p_rejected", "rejected"]
    for i, example in enumerate(examples):
        batch = data.collate([example], tok.pad_token_id)
        for prefix in ("", "p_"):
            with torch.no_grad():
                rows = scoring.forward_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                            batch[prefix + "labels"])
            assert out[prefix + "chosen"][i] == pytest.approx(float(rows[0]), abs=1e-4)
            assert out[prefix + "rejected"][i] == pytest.approx(float(rows[1]), abs=1e-4)
    x_only = metrics.pair_logps(model, examples, tok.pad_token_id, batch_size=5)
    assert sorted(x_only) == ["chosen", "rejected"] and torch.equal(x_only["chosen"], out["chosen"])
    score_chosen, _ = metrics.true_scores(examples)
    assert torch.isnan(score_chosen[:2]).all() and score_chosen[2] == 1.0
    no_p = data.tokenize_pairs(pairs, tok, 300, None, log=None)
    with pytest.raises(common.EvalError, match="no p ⊕ x view"):
        metrics.pair_logps(model, no_p, tok.pad_token_id, with_p=True)


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
        *(metrics.pair_logps(m, examples, tok.pad_token_id, with_p=True)
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


def test_an_output_never_writes_into_what_the_command_reads(tmp_path, capsys):
    """Issue 36's rule for generate's answers file: not the --questions file, nor inside the --model folder (which
    train.py replaces whole); both kept as they were."""
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "turns": ["hi"]}\n')
    (tmp_path / "model").mkdir()
    for out, words in ((questions, f"--out {questions}: is --questions"),
                       (tmp_path / "model" / "a.jsonl", "lies inside --model")):
        assert ev.main(["generate", "--model", str(tmp_path / "model"), "--questions", str(questions), "--out",
                        str(out)]) == 2
        _one_error(capsys, words, "which this command reads")
    assert questions.read_text() == '{"question_id": 1, "turns": ["hi"]}\n'
    assert not (tmp_path / "model" / "a.jsonl").exists()


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
