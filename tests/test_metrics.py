"""training/metrics.py: the paper's measurements (rank statistics, rewards, accuracy, Δ statistics, a step's
metrics) against hand-worked and brute-force answers."""

import itertools
import math

import numpy as np
import pytest
import torch

from base import common
from training import metrics


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


def _logps_with(delta, naive, beta):
    """logps whose Δπ and Δ_naive are the given vectors (only the policy's chosen side moves)."""
    z = torch.zeros(len(delta), dtype=torch.float64)
    return {"policy_chosen": torch.tensor(naive) / beta, "policy_rejected": z, "ref_chosen": z,
            "ref_rejected": z, "p_policy_chosen": torch.tensor(delta) / beta, "p_policy_rejected": z,
            "p_ref_chosen": z, "p_ref_rejected": z}


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


def test_train_and_heldout_delta_std_are_one_definition():
    """metrics.jsonl's delta_std (sums over micro-batches, metrics.step_metrics) and eval_delta_std / evaluate's
    delta_std (metrics.pair_metrics) are the same number: the population std (numpy's ddof=0)."""
    import numpy as np

    from training import metrics

    delta = torch.tensor([0.3, -1.2, 2.5, 0.0, 0.7, 1.1, -0.4], dtype=torch.float64)
    beta, zeros = 0.1, torch.zeros_like(delta)
    summed = {"pairs": 7.0, "tokens": 70.0, "loss": 1.0, "grad_norm": 1.0, "lr": 1.0, "denominator": 7.0}
    for part in (delta[:3], delta[3:]):  # two micro-batches (or ranks), added as train_step adds them
        for key, value in metrics.preference_sums(part, part * 0, part, part, part * 0, part * 0).items():
            summed[key] = summed.get(key, 0.0) + float(value)
    logged = metrics.step_metrics(summed, "sr-dpo", 1, 1.0)["delta_std"]
    logps = {"policy_chosen": zeros, "policy_rejected": zeros, "ref_chosen": zeros, "ref_rejected": zeros,
             "p_policy_chosen": delta / beta, "p_policy_rejected": zeros, "p_ref_chosen": zeros,
             "p_ref_rejected": zeros}
    heldout = metrics.pair_metrics(logps, beta)["delta_std"]
    assert logged == pytest.approx(heldout, rel=1e-12) and heldout == pytest.approx(np.std(delta.numpy()), rel=1e-12)
    assert heldout != pytest.approx(np.std(delta.numpy(), ddof=1), rel=1e-3)
