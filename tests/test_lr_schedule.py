"""--lr_scheduler: train.get_lr against an independent formula and transformers' schedulers, the lr that a run
logs, the flag's place among the run-defining flags, and a resumed cosine run that ends on the same weights."""

import math

import pytest
import torch
from helpers import assert_close_weights, final_weights, run_train

import train
from training import checkpoint


def expected_lr(step, peak, warmup, total, kind):
    """Written out again, case by case: the warm-up ramp, then the decay over what is left of the stage."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if kind == "constant":
        return peak
    left = total - warmup
    done = step - warmup
    if kind == "linear":
        return peak * (left - done) / left
    return peak * (1 + math.cos(math.pi * done / left)) / 2


@pytest.mark.parametrize("kind", train.LR_SCHEDULERS)
@pytest.mark.parametrize("warmup,total", [(0, 5), (3, 10), (9, 40)])
def test_get_lr_matches_the_formula(kind, warmup, total):
    got = [train.get_lr(s, 2.0, warmup, total, kind) for s in range(total)]
    assert got == pytest.approx([expected_lr(s, 2.0, warmup, total, kind) for s in range(total)], rel=1e-12)
    assert max(got) == pytest.approx(2.0)  # the peak is reached at step warmup
    assert got[min(warmup, total - 1)] == pytest.approx(2.0)
    if kind != "constant":  # decreasing after the peak, 0 one step after the last
        assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))
        assert 0 < got[-1] < 2.0
        assert train.get_lr(total, 2.0, warmup, total, kind) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_get_lr_is_transformers_schedule_shifted_by_one(kind):
    """transformers counts the warm-up from a factor 0 at step 0; ours from 1/(warmup + 1). With its warm-up and
    total one longer, its factor at step s + 1 is ours at step s, for every step."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[kind]
    warmup, total = 4, 17
    scheduler = make(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup + 1, total + 1)
    factor = scheduler.lr_lambdas[0]
    assert [train.get_lr(s, 1.0, warmup, total, kind) for s in range(total)] == \
        pytest.approx([factor(s + 1) for s in range(total)], rel=1e-12, abs=1e-15)


def test_constant_is_the_old_ramp_and_the_default():
    assert train.Config().lr_scheduler == "constant"
    assert [train.get_lr(s, 1.0, 4) for s in range(7)] == [train.get_lr(s, 1.0, 4, 7, "constant") for s in range(7)]
    assert "lr_scheduler" in checkpoint.RUN_FLAGS
    with pytest.raises(ValueError, match="unknown kind"):
        train.get_lr(5, 1.0, 0, 10, "step")


def test_a_run_logs_the_schedule(tmp_path):
    code, ms = run_train(tmp_path, "--loss", "dpo", "--max_steps", "4", "--lr_scheduler", "linear")
    assert code == 0
    assert [m["lr"] for m in ms] == pytest.approx([train.get_lr(s, 3e-3, 1, 4, "linear") for s in range(4)])
    assert ms[-1]["lr"] < ms[1]["lr"]


def test_resume_continues_the_cosine_schedule_exactly(tmp_path, nan_at_step, monkeypatch):
    flags = ["--loss", "sr-dpo", "--max_steps", "4", "--lr_scheduler", "cosine", "--save_every", "2"]
    code, whole = run_train(tmp_path / "whole", *flags)
    assert code == 0
    nan_at_step(3)  # the same run fails at step 3: the checkpoint of step 2 is kept
    assert run_train(tmp_path / "cut", *flags)[0] == 2
    monkeypatch.undo()
    code, resumed = run_train(tmp_path / "cut", *flags, "--resume")
    assert code == 0
    assert [(m["step"], m["lr"], m["loss"]) for m in resumed] == [(m["step"], m["lr"], m["loss"]) for m in whole]
    assert_close_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"), atol=0)
    # A resume that would change the decay's length is refused, as a changed flag is.
    # (32 pairs, 8 a step: one epoch is 4 steps)
    assert run_train(tmp_path / "cut", *flags, "--max_steps", "6", "--epochs", "2", "--resume")[0] == 2
