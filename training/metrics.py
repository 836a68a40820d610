"""training/metrics.py: what the paper measures, from per-pair log-probs. Pure: no model, no pass over data.

Owns: rank statistics (Spearman, Kendall τ_b, concordance), implicit rewards, accuracy and Δ statistics
(one definition each, used by a training step's metrics and by held-out evaluation), one training step's logged
metrics (``preference_sums`` per micro-batch, ``step_metrics`` of the sums over ranks), and ``pair_metrics``.
Does not own: the losses (srpo.py), the scoring pass (scoring.pair_logps), the training loop (train.py) or
MT-Bench judging (mtbench/judge.py).
"""

import math

import numpy as np
import torch

from base import common
from base.common import EvalError
from srpo import implicit_reward

# ----------------------------------------------------------------------------------------------
# Rank statistics (numpy, float64). Pure functions of two equally long 1-D sequences.
# ----------------------------------------------------------------------------------------------


def _vector(x):
    """A float64 numpy copy of a 1-D tensor, array or list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _ranks(x):
    """1-based ranks, ties given the mean of the ranks they span. Shape: x [n] -> [n]."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def _pearson(x, y):
    """Pearson correlation; nan when either side is constant or n < 2. Shape: x [n], y [n]."""
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denom if denom > 0 else math.nan


def spearman(x, y):
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks. Shape: x [n], y [n]."""
    x, y = _vector(x), _vector(y)
    return _pearson(_ranks(x), _ranks(y))


def _sign_counts(x, y, budget=1 << 22):
    """Counts over the n(n-1)/2 unordered pairs {i, j} of positions.

    Shape: x [n], y [n] float64. Works in row blocks of about ``budget`` comparisons.
    Returns dict: concordant (x and y order i, j the same way), discordant (opposite ways),
    tied_x (x tied, y not), tied_y (y tied, x not), tied_both.
    """
    n = len(x)
    counts = dict.fromkeys(("concordant", "discordant", "tied_x", "tied_y", "tied_both"), 0)
    step = max(1, budget // max(n, 1))
    for a in range(0, n, step):
        rows = np.arange(a, min(a + step, n))
        upper = np.arange(n)[None, :] > rows[:, None]  # each unordered pair once
        sx = np.sign(x[None, :] - x[rows, None])[upper]
        sy = np.sign(y[None, :] - y[rows, None])[upper]
        counts["concordant"] += int((sx * sy > 0).sum())
        counts["discordant"] += int((sx * sy < 0).sum())
        counts["tied_x"] += int(((sx == 0) & (sy != 0)).sum())
        counts["tied_y"] += int(((sx != 0) & (sy == 0)).sum())
        counts["tied_both"] += int(((sx == 0) & (sy == 0)).sum())
    return counts


def kendall_tau_b(x, y):
    """Kendall's τ_b = (C - D) / sqrt((C + D + T_y)(C + D + T_x)); nan when a side is constant.

    C, D: concordant and discordant pairs; T_x (T_y): pairs tied in x only (y only).
    Shape: x [n], y [n].
    """
    c = _sign_counts(_vector(x), _vector(y))
    untied_x = c["concordant"] + c["discordant"] + c["tied_y"]
    untied_y = c["concordant"] + c["discordant"] + c["tied_x"]
    denom = math.sqrt(untied_x * untied_y)
    return (c["concordant"] - c["discordant"]) / denom if denom > 0 else math.nan


def concordance(x, y):
    """Pairwise ranking accuracy of x against the truth y (Harrell's C).

    Over all pairs {i, j} whose y differ, the share in which x orders i and j as y does;
    a tie in x counts one half. 1 is a perfect ranking, 0.5 chance, 0 exactly reversed; nan when
    every y is equal. Shape: x [n] (predicted, e.g. Δπ), y [n] (truth, e.g. the true score gap).
    """
    c = _sign_counts(_vector(x), _vector(y))
    comparable = c["concordant"] + c["discordant"] + c["tied_x"]
    return (c["concordant"] + 0.5 * c["tied_x"]) / comparable if comparable else math.nan


# ----------------------------------------------------------------------------------------------
# Preference accuracy, margins and Δπ (Sections 3.2 and 4.1); one training step's metrics
# ----------------------------------------------------------------------------------------------

LOGP_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
P_PREFIX = "p_"  # the same four keys measured under p ⊕ x


def _mean(t):
    return float(t.mean()) if t.numel() else math.nan


def std_from_sums(total, total_sq, n):
    """The population standard deviation sqrt(E[v²] - E[v]²) (divisor n, not n - 1) from the sum and the
    sum of squares of n values: the one definition of every std here (training's delta_std and
    held-out eval_delta_std, margin_std); sums add over micro-batches and ranks. nan when n is 0."""
    if n == 0:
        return math.nan
    mean = total / n
    return math.sqrt(max(0.0, total_sq / n - mean * mean))


def _std(t):
    """Population standard deviation of a tensor (``std_from_sums``)."""
    t = t.double()
    return std_from_sums(float(t.sum()), float((t * t).sum()), t.numel())


def rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Implicit rewards of chosen and rejected responses and their margin, in the inputs' dtype.

    Shape: each log-prob [B]. Returns (chosen [B], rejected [B], margin [B]); the margin is Δ_naive
    (Eq. 10) under x and Δπ (Eq. 11) under p ⊕ x. A pair counts as ranked right when margin > 0.
    """
    chosen = implicit_reward(policy_chosen, ref_chosen, beta)  # Eq. (4); c(x) cancels in the margin
    rejected = implicit_reward(policy_rejected, ref_rejected, beta)
    return chosen, rejected, chosen - rejected  # Eqs. (10) and (11)


def preference_sums(chosen, rejected, margin, delta, policy_chosen, policy_rejected):
    """Sums of one micro-batch, to be added over micro-batches and ranks, then ``preference_means``.

    Shape: chosen, rejected, margin (``rewards``), delta (the refinement Δ, zeros without one),
    policy_chosen, policy_rejected (log π(y±|x)) [B].
    Returns dict of 0-d tensors: reward_chosen, reward_rejected, accuracy (pairs with margin > 0),
    delta, delta_sq, logps_chosen, logps_rejected.
    """
    return {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
            "accuracy": (margin > 0).float().sum(), "delta": delta.sum(), "delta_sq": (delta * delta).sum(),
            "logps_chosen": policy_chosen.sum(), "logps_rejected": policy_rejected.sum()}


def preference_means(sums, n):
    """Per-pair means of ``preference_sums`` summed over n pairs (floats); delta_std by ``std_from_sums``."""
    return {"reward_chosen": sums["reward_chosen"] / n, "reward_rejected": sums["reward_rejected"] / n,
            "margin": (sums["reward_chosen"] - sums["reward_rejected"]) / n, "accuracy": sums["accuracy"] / n,
            "delta_mean": sums["delta"] / n, "delta_std": std_from_sums(sums["delta"], sums["delta_sq"], n),
            "logps_chosen": sums["logps_chosen"] / n, "logps_rejected": sums["logps_rejected"] / n}


def step_metrics(summed, stage, step, seconds):
    """The logged metrics of one step (one metrics.jsonl line), from ``train.train_step``'s stats summed over
    micro-batches and ranks: the loss over its denominator, grad_norm, lr, throughput and, past SFT,
    ``preference_means``."""
    n = summed["pairs"]
    m = {"stage": stage, "step": step, "loss": summed["loss"] / summed["denominator"], "grad_norm": summed["grad_norm"],
         "lr": summed["lr"], "examples_per_s": n / seconds, "tokens_per_s": summed["tokens"] / seconds}
    if stage != "sft":
        m.update(preference_means(summed, n))
    return m


def _view_rewards(logps, beta, prefix):
    """Implicit rewards of one view (x, or p ⊕ x with prefix "p_"), float64 on the CPU.

    Shape: logps[prefix + key] [B] float for key in LOGP_KEYS.
    Returns (chosen [B], rejected [B], margin [B]); the margin is Δ_naive (Eq. 10) under x and
    Δπ (Eq. 11) under p ⊕ x.
    """
    return rewards(*(_as_float64(logps[prefix + k]) for k in LOGP_KEYS), beta)


def _view_metrics(logps, beta, prefix):
    """Accuracy and implicit rewards of one view (x, or p ⊕ x with prefix "p_").

    Shape: logps[prefix + key] [B] float for key in LOGP_KEYS.
    Returns (metrics dict with keys prefixed, margin [B] float64).
    """
    chosen, rejected, margin = _view_rewards(logps, beta, prefix)
    metrics = {
        "accuracy": _mean((margin > 0).double()),
        "tie_rate": _mean((margin == 0).double()),
        "reward_chosen_mean": _mean(chosen),
        "reward_rejected_mean": _mean(rejected),
    }
    return {prefix + k: v for k, v in metrics.items()}, margin


def _ranking_metrics(delta, gap, prefix):
    """Spearman, Kendall τ_b and concordance of a refinement against the true score gap.

    Shape: delta [n] float64, gap [n] float64 (scored pairs only).
    """
    return {
        prefix + "spearman": spearman(delta, gap),
        prefix + "kendall_tau_b": kendall_tau_b(delta, gap),
        prefix + "concordance": concordance(delta, gap),
    }


def pair_metrics(logps, beta, score_chosen=None, score_rejected=None):
    """All per-dataset numbers of ``accuracy`` from per-pair log-probs. Pure; no model involved.

    Shape: logps["policy_chosen"], ["policy_rejected"], ["ref_chosen"], ["ref_rejected"] [B]:
           log π(y+|x), log π(y-|x), log π_ref(y+|x), log π_ref(y-|x) (summed token log-probs).
    Shape: optional logps["p_policy_chosen"], ... (the same four under p ⊕ x) [B].
    Shape: beta float (β of Eq. 4). Other keys of ``logps`` are ignored.
    Shape: score_chosen, score_rejected [B] float true scores, nan where unknown; or None.

    Returns a flat dict of floats (nan where undefined), keys:
        n_pairs
        accuracy              share of pairs with r(y+|x) > r(y-|x) (strictly; Section 4.1)
        tie_rate              share with r(y+|x) == r(y-|x) (e.g. policy == reference)
        margin_mean, margin_std   r(y+|x) - r(y-|x) = Δ_naive, Eq. (10); std: ``std_from_sums``
        reward_chosen_mean, reward_rejected_mean   β·log π/π_ref of y+ and y- under x, Eq. (4)
      with the p ⊕ x view:
        p_accuracy, p_tie_rate, p_reward_chosen_mean, p_reward_rejected_mean   as above
        delta_mean, delta_std     Δπ, Eq. (11): the reward margin under p ⊕ x
        sign_agreement            share of pairs ranked the same way (y+ above y-, or not)
                                  under x and under p ⊕ x: Assumption 3.2 pair by pair
      with scores (pairs where both are known; the others counted in n_unscored):
        n_scored, n_unscored, gap_mean (mean true gap s(y+) - s(y-))
        spearman, kendall_tau_b, concordance   of Δπ against the true gap; concordance is the
            accuracy of Δπ's ranking of pairs by informativeness: over all pairs of pairs whose
            true gaps differ, the share that Δπ orders as the gaps do (a tie in Δπ counts 1/2);
            Corollary 3.3.1 predicts it above 0.5
        naive_spearman, naive_kendall_tau_b, naive_concordance   the same for Δ_naive (Eq. 10)
    """
    missing = [k for k in LOGP_KEYS if k not in logps]
    if missing:
        raise EvalError(f"pair_metrics: logps lacks {missing}; expected keys {list(LOGP_KEYS)}")
    out = {"n_pairs": int(logps["policy_chosen"].numel())}
    x_metrics, naive = _view_metrics(logps, beta, "")
    out.update(x_metrics)
    out["margin_mean"], out["margin_std"] = _mean(naive), _std(naive)
    delta = None
    if _has_p_view(logps):
        p_metrics, delta = _view_metrics(logps, beta, P_PREFIX)
        out.update(p_metrics)
        out["delta_mean"], out["delta_std"] = _mean(delta), _std(delta)
        out["sign_agreement"] = _mean(((naive > 0) == (delta > 0)).double())
    if score_chosen is not None and score_rejected is not None:
        gap = (_as_float64(score_chosen) - _as_float64(score_rejected))
        scored = torch.isfinite(gap)
        out["n_scored"], out["n_unscored"] = int(scored.sum()), int((~scored).sum())
        out["gap_mean"] = _mean(gap[scored])
        if delta is not None:
            out.update(_ranking_metrics(delta[scored], gap[scored], ""))
        out.update(_ranking_metrics(naive[scored], gap[scored], "naive_"))
    return out


def _as_float64(t):
    return torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)


def _has_p_view(logps):
    return all(P_PREFIX + k in logps for k in LOGP_KEYS)


def preference_logps(policy, ref):
    """The ``pair_metrics`` input from ``scoring.pair_logps`` of the policy and of the reference.

    Returns LOGP_KEYS, and the same four with the "p_" prefix when both were scored with_p.
    """
    views = ("", P_PREFIX) if all(P_PREFIX + "chosen" in s for s in (policy, ref)) else ("",)
    return {f"{prefix}{role}_{side}": scores[prefix + side] for prefix in views
            for role, scores in (("policy", policy), ("ref", ref)) for side in ("chosen", "rejected")}


def true_scores(examples):
    """(score_chosen [N], score_rejected [N]) float32 of tokenized examples, nan where unknown."""
    return tuple(torch.tensor([e[key] for e in examples], dtype=torch.float32)
                 for key in ("score_chosen", "score_rejected"))


def heldout_metrics(policy_logps, ref_logps, examples, beta):
    """``pair_metrics`` of the examples from the ``scoring.pair_logps`` of policy and reference, with true scores."""
    return pair_metrics(preference_logps(policy_logps, ref_logps), beta, *true_scores(examples))


def per_pair_rows(logps, beta, examples):
    """One row per pair for plots: index, Δ_naive (margin under x), Δπ, true score gap."""
    score_chosen, score_rejected = true_scores(examples)
    rows = {"index": [e["index"] for e in examples], "delta_naive": _view_rewards(logps, beta, "")[2].tolist(),
            "score_gap": (_as_float64(score_chosen) - _as_float64(score_rejected)).tolist()}
    if _has_p_view(logps):
        rows["delta"] = _view_rewards(logps, beta, P_PREFIX)[2].tolist()
    return [common.jsonable(dict(zip(rows, values))) for values in zip(*rows.values())]
