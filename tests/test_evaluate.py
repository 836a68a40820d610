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
                rows = models.forward_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
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
