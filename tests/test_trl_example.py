"""examples/trl_sr_dpo.py: srpo.py's loss inside TRL's DPOTrainer, against srpo's own pipeline.

Two steps of the tiny model on 8 embedded pairs (one batch: the step sees all of them, in any order). The
reference model is a differently seeded tiny model, so that at step 1 Δπ ≠ 0 and the loss is not ln 2.
TRL's tokens are checked to be srpo's data.py tokens (x and p ⊕ x views); TRL's logged step-1 loss and mean Δπ
are checked against srpo's pipeline (data.collate, scoring.view_logps, srpo.refinement and the loss) and against a
full-logits log_softmax computation per sequence, without padding.
"""

import importlib.util
import math
import os

import pytest
import torch

import data
import srpo
from training import models, scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_module():
    spec = importlib.util.spec_from_file_location("trl_sr_dpo", os.path.join(ROOT, "examples", "trl_sr_dpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_logits_logps(model, prompt, completion):
    """log π(completion | prompt): one unpadded sequence, log_softmax over the full logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt) - 1:].sum().item()


@pytest.mark.parametrize("loss", ["sr-dpo", "sr-ipo"])
def test_trl_step_one_matches_srpo(tmp_path, loss):
    ex = example_module()
    args = ex.parse_args(["--max_pairs", "8", "--batch_size", "8", "--max_steps", "2", "--loss", loss,
                          "--output_dir", str(tmp_path)])
    tokenizer = models.load_tokenizer("tiny")
    policy = models.load_model("tiny", tokenizer, seed=0)
    ref = models.load_model("tiny", tokenizer, seed=1)  # π_ref ≠ π at step 1
    trainer = ex.build_trainer(args, model=policy, ref_model=ref)
    rows = list(trainer.train_dataset)
    assert len(rows) == 8

    # 1. TRL's x and p ⊕ x tokens are srpo's (data.py: EOS after each response, p directly before the query).
    pairs = data.load_pairs("embedded", log=None)[:8]
    examples = data.tokenize_pairs(pairs, tokenizer, args.max_length, srpo.REFINE_PROMPT, log=None)
    for row, e in zip(rows, examples, strict=True):
        for view, prompt in (("", row["prompt_ids"]), ("p_", row["p_prompt_ids"])):
            assert prompt + row["chosen_ids"] == e[f"{view}chosen_ids"]
            assert prompt + row["rejected_ids"] == e[f"{view}rejected_ids"]

    # 2. srpo's own computation on those pairs, before training (π at step 1 is the initial policy).
    beta, lam = args.beta, args.lam
    batch = data.collate(examples, tokenizer.pad_token_id, "padded")
    with torch.no_grad():
        pol_x, ref_x = (scoring.view_logps(m, batch, 16, "") for m in (policy, ref))
        pol_p, ref_p = (scoring.view_logps(m, batch, 16, "p_") for m in (policy, ref))
    delta = srpo.refinement(pol_p[:8], pol_p[8:], ref_p[:8], ref_p[8:], beta)
    want_loss = srpo.LOSSES[loss](pol_x[:8], pol_x[8:], ref_x[:8], ref_x[8:], delta, beta, lam).mean().item()
    want_delta = delta.mean().item()

    # 3. An independent reference: full logits per unpadded sequence, Eq. (11), (12) and Algorithm 2 written out.
    def lp(model, prompt, completion):
        return full_logits_logps(model, prompt, completion)

    h, d = [], []
    for row in rows:
        for out, key in ((h, "prompt_ids"), (d, "p_prompt_ids")):
            out.append((lp(policy, row[key], row["chosen_ids"]) - lp(ref, row[key], row["chosen_ids"]))
                       - (lp(policy, row[key], row["rejected_ids"]) - lp(ref, row[key], row["rejected_ids"])))
    deltas = [beta * x for x in d]
    if loss == "sr-dpo":
        independent = [math.log1p(math.exp(-(beta * x - lam * dl))) for x, dl in zip(h, deltas)]
    else:
        independent = [(x - lam * dl - 1 / (2 * beta)) ** 2 for x, dl in zip(h, deltas)]
    assert want_loss == pytest.approx(sum(independent) / 8, abs=1e-5)
    assert want_delta == pytest.approx(sum(deltas) / 8, abs=1e-5)
    assert abs(want_delta) > 1e-3 and abs(want_loss - math.log(2)) > 1e-3  # not the trivial step 1

    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2]
    assert logged[0]["loss"] == pytest.approx(want_loss, abs=1e-5)
    assert logged[0]["delta/mean"] == pytest.approx(want_delta, abs=1e-5)
    assert all(math.isfinite(e["loss"]) for e in logged)


def test_the_example_runs_with_no_arguments_but_max_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = example_module().main(["--max_steps", "2", "--max_pairs", "16"])
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref at step 1: DPO's ln 2
    assert logged[0]["delta/mean"] == 0.0


def other_tokenizer_model(path):
    """A tiny Llama whose tokenizer has one id more than the policy's (models.TINY's)."""
    from test_distributed import save_source
    from transformers import AutoTokenizer

    save_source(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<other>"])
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("flags, words", [
    (["--lam", "-1"], "--lam -1.0: must be >= 0"),
    (["--loss", "dpo", "--refine_prompt", "10"], "--refine_prompt 10 is used only by the Sr losses"),
    (["--loss", "dpo", "--lam", "0.3"], "--lam is used only by the Sr losses"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--max_length", "5"], "--max_length 5: "),
    (["--max_length", "5", "--loss", "dpo"], "--max_length 5: "),
    (["--model", "no/such-model"], "--model no/such-model"),
    (["--data", "no_such_pairs.jsonl"], "no_such_pairs.jsonl: not a file"),
    (["--ref_model", "OTHER"], "its tokenizer"),
])
def test_bad_input_is_one_line_as_train_py_says_it(tmp_path, capsys, flags, words):
    """Cases 13 and 15: the example checks its flags, models and data with the project's own checks (a reference
    of another vocabulary, λ < 0, λ or p without an Sr loss, a missing model or file, --batch_size 0, a too small
    --max_length): one line, exit status 2, before any training."""
    ex = example_module()
    flags = [other_tokenizer_model(tmp_path / "other") if f == "OTHER" else f for f in flags]
    with pytest.raises(SystemExit) as e:
        ex.main(["--max_steps", "1", "--max_pairs", "8", "--output_dir", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()  # after datasets' progress bars, where TRL itself drops every pair
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("examples/trl_sr_dpo.py: error: ") and words in last, err
