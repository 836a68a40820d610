"""tracking.py: every metrics.jsonl value at its global step in TensorBoard and W&B, the logged step metrics."""
import json
import os
import sys

import pytest
import torch
from helpers import run_train

import data
import train
from base import embedded
from training import metrics, models, tracking


class StandInWriter:
    """torch.utils.tensorboard.SummaryWriter's calls, recorded."""
    calls = []

    def __init__(self, log_dir, purge_step=None):
        self.calls.append(("init", log_dir, purge_step))

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, text, step))

    def flush(self):
        pass

    def close(self):
        self.calls.append(("close",))


def numeric(row):
    return {k: v for k, v in row.items() if k not in ("step", "global_step") and isinstance(v, (int, float))}


def test_report_to_tensorboard_gets_every_metric_at_the_global_step(tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=StandInWriter))
    StandInWriter.calls = []
    code, ms = run_train(tmp_path, "--loss", "sr-dpo", "--sft_steps", "2", "--max_steps", "2",
                         "--report_to", "tensorboard")
    assert code == 0
    assert [(m["stage"], m["step"], m["global_step"]) for m in ms] == [("sft", 1, 1), ("sft", 2, 2),
                                                                         ("sr-dpo", 1, 3), ("sr-dpo", 2, 4)]
    calls = StandInWriter.calls
    assert calls[0] == ("init", os.path.join(str(tmp_path), tracking.TRACKER_DIR), 1) and calls[-1] == ("close",)
    config = json.loads(next(c[2] for c in calls if c[:2] == ("text", "config")))
    assert config["loss"] == "sr-dpo" and config["sft_steps"] == 2 and config["report_to"] == "tensorboard"
    scalars = [c[1:] for c in calls if c[0] == "scalar"]
    assert scalars == [(tracking.tracker_name(k), v, m["global_step"]) for m in ms for k, v in numeric(m).items()]
    last = {tag: value for tag, value, step in scalars if step == 4}
    for key, tag in (("reward_chosen", "train/rewards/chosen"), ("margin", "train/rewards/margins"),
                     ("accuracy", "train/rewards/accuracies"), ("logps_rejected", "train/logps/rejected"),
                     ("delta_mean", "train/delta_mean"), ("eval_accuracy", "eval/rewards/accuracies"),
                     ("eval_margin_mean", "eval/rewards/margins"), ("lr", "train/learning_rate")):
        assert last[tag] == ms[-1][key]
    assert ms[-1]["margin"] == pytest.approx(ms[-1]["reward_chosen"] - ms[-1]["reward_rejected"])
    assert ms[-1]["logps_chosen"] < 0 and ms[-1]["logps_rejected"] < 0


def test_logps_are_the_policys_mean_log_probs():
    """metrics.jsonl's logps_chosen/rejected (TRL's logps/chosen, logps/rejected) against F.cross_entropy."""

    tokenizer, policy, ref = models.load_tokenizer(), models.load_model(seed=1), models.load_model(seed=2)
    examples = data.tokenize_pairs(embedded.embedded_pairs("test")[:4], tokenizer, 64, log=None)
    batch = data.collate(examples, tokenizer.pad_token_id)
    cfg = train.resolved(train.Config(loss="dpo"))
    _, sums = train.preference_terms(policy, ref, None, batch, cfg)
    m = metrics.step_metrics({**{k: float(v) for k, v in sums.items()}, "loss": 0.0, "pairs": 4, "tokens": 1,
                            "grad_norm": 0.0, "lr": 0.0, "denominator": 4}, "dpo", 1, 1.0)
    with torch.no_grad():
        logits = policy(batch["input_ids"]).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    logps = -nll.sum(1)
    assert m["logps_chosen"] == pytest.approx(float(logps[:4].mean()), rel=1e-5)
    assert m["logps_rejected"] == pytest.approx(float(logps[4:].mean()), rel=1e-5)


def test_report_to_wandb_logs_each_step_with_the_config(tmp_path, monkeypatch):
    import types

    logged, inits = [], []
    stand_in = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or stand_in)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    code, ms = run_train(tmp_path, "--loss", "dpo", "--max_steps", "2", "--report_to", "wandb")
    assert code == 0 and inits[0]["config"]["loss"] == "dpo" and inits[0]["dir"] == str(tmp_path)
    assert logged == [(m["global_step"], {tracking.tracker_name(k): v for k, v in numeric(m).items()}) for m in ms]


def test_report_to_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert run_train(tmp_path, "--loss", "dpo", "--max_steps", "1", "--report_to", "wandb")[0] == 2
    assert capsys.readouterr().err.strip() == ("train.py: error: --report_to wandb needs the wandb package: "
                                               "pip install wandb")


def test_report_to_the_real_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _ = run_train(tmp_path, "--loss", "dpo", "--max_steps", "3", "--report_to", "tensorboard")
    assert code == 0  # resumed from its last checkpoint (step 3): step 4 is added, steps 1-3 stay visible
    code, ms = run_train(tmp_path, "--loss", "dpo", "--max_steps", "4", "--report_to", "tensorboard", "--resume")
    assert code == 0 and [m["global_step"] for m in ms] == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp_path / tracking.TRACKER_DIR)).Reload()
    for key in ("loss", "reward_chosen", "logps_chosen", "eval_accuracy"):
        points = [(e.step, e.value) for e in events.Scalars(tracking.tracker_name(key))]
        assert points == [(m["global_step"], pytest.approx(m[key], rel=1e-6)) for m in ms if key in m]
