"""metrics.py, judge.py and evaluate.py's commands: metrics against hand-worked and brute-force answers, the judge
against a local server."""
import http.server
import itertools
import json
import math
import threading
import uuid

import numpy as np
import pytest
import torch

import common
import data
import embedded
import evaluate as ev
import formats
import judge
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


# ------------------------------------------------------------------ verdicts

def test_parse_verdict_needs_one_explicit_marker():
    assert judge.parse_verdict("A is clearer.\n[[A]]") == ("A", None)
    assert judge.parse_verdict("[[B]] ... as said, [[B]]") == ("B", None)
    assert judge.parse_verdict("Final verdict: [[C]]")[0] == "C"
    for text in ("Assistant A is better.", "[A]", "[[D]]", "", None, "[[a]]"):
        verdict, reason = judge.parse_verdict(text)
        assert verdict is None and "no" in reason
    verdict, reason = judge.parse_verdict("[[A]] or maybe [[B]]")
    assert verdict is None and "conflicting" in reason


def test_both_orders_rule():
    # footnote 2: a win only when preferred in both orders; the "ba" order shows model_b as A.
    for first, second in itertools.product(("A", "B", "C", None), repeat=2):
        if first is None or second is None:
            expected = None
        elif (first, second) == ("A", "B"):
            expected = "win"
        elif (first, second) == ("B", "A"):
            expected = "lose"
        else:
            expected = "tie"
        assert judge.both_orders(first, second) == expected, (first, second)
    r = judge.rates(["win", "win", "tie", "lose", None])
    assert (r["games"], r["decided"], r["unparseable"]) == (5, 4, 1)
    assert (r["win_rate"], r["tie_rate"], r["lose_rate"]) == (0.5, 0.25, 0.25)


def test_judge_prompt_file_and_fields(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [{"name": "one", "system_prompt": "judge", "prompt_template": "Q {question} A {answer_a} B {answer_b}"},
               {"name": "two", "system_prompt": "judge turn {turn}",
                "prompt_template": "{question_1}|{answer_a_1}|{question_2}|{answer_b_2}|{ref_answer_1}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    single, multi = judge.load_judge_prompts(str(path), "one", "two")
    q = {"question_id": 1, "turns": ["q1", "q2"], "reference": ["r1", "r2"]}
    fields = judge.prompt_fields(q, ["a1", "a2"], ["b1", "b2"], 2)
    assert judge.render_prompt(multi, fields) == ("judge turn 2", "q1|a1|q2|b2|r1")
    assert judge.render_prompt(single, judge.prompt_fields(q, ["a1", "a2"], ["b1", "b2"], 1))[1] == "Q q1 A a1 B b1"
    with pytest.raises(common.EvalError, match="no judge prompt named 'three'"):
        judge.load_judge_prompts(str(path), "three")
    broken = judge.JudgePrompt("x", "", "{nope}", str(path))
    with pytest.raises(common.EvalError, match=r"prompts.jsonl: judge prompt 'x' uses \{nope\}"):
        judge.render_prompt(broken, fields)
    builtin = judge.load_judge_prompts()
    assert [p.name for p in builtin] == list(judge.BUILTIN_NAMES)
    system, user = judge.render_prompt(builtin[1], fields)
    assert "[[A]]" in system and "a1" in user and "b2" in user and "q2" in user


# ------------------------------------------------------------------ the HTTP judge

class FakeJudgeServer:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 that prefers "GOOD" answers.

    It answers [[A]] when the first "GOOD" in the prompt precedes the first "BAD" (or there is
    no BAD), [[B]] otherwise, and no marker for a question containing UNDECIDABLE. fail_next:
    that many coming requests get HTTP 500; fail_after: after that many replies, every request
    gets 500. The 500 body echoes the Authorization header, to show it is never written out.
    """

    def __init__(self):
        self.requests, self.replies, self.auth = 0, 0, []
        self.fail_next, self.fail_after = 0, None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.requests += 1
                server.auth.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                failing = server.fail_after is not None and server.replies >= server.fail_after
                if server.fail_next or failing:
                    server.fail_next = max(0, server.fail_next - 1)
                    return self._send(500, {"error": f"overloaded; you sent {self.headers.get('Authorization')}"})
                server.replies += 1
                self._send(200, {"choices": [{"message": {"role": "assistant",
                                                          "content": server.judge(body["messages"][-1]["content"])}}]})

            def _send(self, code, payload):
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def judge(text):
        if "UNDECIDABLE" in text:
            return "Both are fine, I cannot choose."
        good, bad = text.find("GOOD"), text.find("BAD")
        return "A is better.\n[[A]]" if bad < 0 or 0 <= good < bad else "B is better.\n[[B]]"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must be reached directly
    server = FakeJudgeServer()
    yield server
    server.close()


def _judge_files(tmp_path):
    questions = [{"question_id": 1, "turns": ["first question"]},
                 {"question_id": 2, "turns": ["second question", "a follow-up"]},
                 {"question_id": 3, "turns": ["UNDECIDABLE question"]},
                 {"question_id": 4, "turns": ["two good answers"]}]
    a = {1: ["GOOD one"], 2: ["GOOD two", "GOOD follow"], 3: ["GOOD three"], 4: ["GOOD four"]}
    b = {1: ["BAD one"], 2: ["BAD two", "BAD follow"], 3: ["BAD three"], 4: ["GOOD too"]}
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("q", "a", "b")}
    common.write_jsonl(paths["q"], questions)
    for name, answers in (("a", a), ("b", b)):
        common.write_jsonl(paths[name], [{"question_id": k, "model_id": f"model-{name}",
                                      "choices": [{"index": 0, "turns": v}]} for k, v in answers.items()])
    return paths


def _judge_argv(paths, url, out, summary, *extra):
    return ["judge", "--questions", str(paths["q"]), "--answers_a", str(paths["a"]), "--answers_b",
            str(paths["b"]), "--judge_url", url, "--judge_name", "fake-judge", "--api_key_env",
            "SRPO_TEST_JUDGE_KEY", "--retry_wait", "0.001", "--out", str(out), "--summary", str(summary),
            "--benchmark", "Fake-Bench", *extra]


def _expected_rates(summary):
    # 5 games: q1 win, q2 turn 1 win, q2 turn 2 win, q3 unparseable, q4 tie (both GOOD: each
    # order prefers whichever is shown first)
    assert (summary["games"], summary["decided"], summary["unparseable"]) == (5, 4, 1)
    assert (summary["win"], summary["tie"], summary["lose"]) == (3, 1, 0)
    assert summary["win_rate"] == 0.75 and summary["unparseable_replies"] == 2
    assert summary["per_turn"]["2"]["win"] == 1


def test_http_judge_retries_after_500_and_keeps_the_key_secret(tmp_path, judge_server, monkeypatch, capsys):
    key = "sk-test-" + uuid.uuid4().hex
    monkeypatch.setenv("SRPO_TEST_JUDGE_KEY", key)
    paths = _judge_files(tmp_path)
    out, summary = tmp_path / "verdicts.jsonl", tmp_path / "summary.json"
    judge_server.fail_next = 1
    assert ev.main(_judge_argv(paths, judge_server.url, out, summary)) == 0
    assert judge_server.requests == 10 + 1  # 5 games x 2 orders, plus the retried 500
    assert set(judge_server.auth) == {f"Bearer {key}"}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 10 and {r["order"] for r in records} == {"ab", "ba"}
    assert all(r["judgment"] for r in records)
    _expected_rates(json.loads(summary.read_text()))
    captured = capsys.readouterr()
    assert "retry 1/5" in captured.err and "HTTP 500" in captured.err
    for text in (out.read_text(), summary.read_text(), captured.out, captured.err):
        assert key not in text


def test_http_judge_resumes_after_an_interruption(tmp_path, judge_server, monkeypatch, capsys):
    monkeypatch.setenv("SRPO_TEST_JUDGE_KEY", "sk-resume")
    paths = _judge_files(tmp_path)
    out, summary = tmp_path / "verdicts.jsonl", tmp_path / "summary.json"
    judge_server.fail_after = 3
    assert ev.main(_judge_argv(paths, judge_server.url, out, summary, "--max_retries", "1")) == 2
    assert "after 2 tries" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3
    with open(out, "a") as f:
        f.write('{"question_id": 2, "turn"')  # a write cut short by the interruption
    judge_server.fail_after, judge_server.requests = None, 0
    assert ev.main(_judge_argv(paths, judge_server.url, out, summary)) == 0
    assert judge_server.requests == 7  # only the verdicts not yet in the file
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({(r["question_id"], r["turn"], r["order"]) for r in records}) == len(records) == 10
    _expected_rates(json.loads(summary.read_text()))
    assert "unfinished last line" in capsys.readouterr().err
    # a verdict file of another comparison is refused, naming file and line
    assert ev.main(_judge_argv(paths, judge_server.url, out, summary, "--name_a", "other")) == 2
    assert f"{out}:1: verdict made with model_a" in capsys.readouterr().err


def show_result_pairwise(path):
    """{model: [win, loss, tie]} as FastChat's show_result.py --mode pairwise-all tallies a judgment file:
    rows with an "error" winner left out, a tie or two orders that disagree a tie for both models."""
    tally = {}
    for row in map(json.loads, path.read_text().splitlines()):
        if "error" in (row["g1_winner"], row["g2_winner"]):
            continue
        models_ = (row["model_1"], row["model_2"])
        if row["g1_winner"] == "tie" or row["g1_winner"] != row["g2_winner"]:
            outcome = {models_[0]: 2, models_[1]: 2}
        else:
            winner = models_[0] if row["g1_winner"] == "model_1" else models_[1]
            outcome = {m: 0 if m == winner else 1 for m in models_}
        for m, k in outcome.items():
            tally.setdefault(m, [0, 0, 0])[k] += 1
    return tally


def test_fastchat_judgment_layout_reads_as_show_result_does(tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv("SRPO_TEST_JUDGE_KEY", "")
    paths = _judge_files(tmp_path)
    fastchat = tmp_path / "model_judgment" / "fake-judge_pair.jsonl"  # the folder is made
    summary = tmp_path / "s.json"
    argv = _judge_argv(paths, judge_server.url, tmp_path / "v.jsonl", summary, "--fastchat_out", str(fastchat))
    assert ev.main(argv) == 0
    s = json.loads(summary.read_text())
    _expected_rates(s)
    rows = [json.loads(line) for line in fastchat.read_text().splitlines()]
    assert len(rows) == 5 and {r["turn"] for r in rows} == {1, 2}
    assert all(r["judge"] == ["fake-judge", "srpo-pair" if r["turn"] == 1 else "srpo-pair-multi-turn"] for r in rows)
    assert all(r["g1_judgment"] and "GOOD" in r["g1_user_prompt"] and isinstance(r["tstamp"], float) for r in rows)
    # the unparseable game is an "error"; the both-orders rule and show_result count the same games
    assert show_result_pairwise(fastchat) == {"model-a": [s["win"], s["lose"], s["tie"]],
                                              "model-b": [s["lose"], s["win"], s["tie"]]}
    # another comparison into the same file is added; a rerun replaces its own rows
    other = _judge_argv(paths, judge_server.url, tmp_path / "w.jsonl", summary, "--fastchat_out", str(fastchat),
                        "--name_a", "other")
    assert ev.main(other) == 0 and ev.main(argv) == 0
    assert show_result_pairwise(fastchat) == {"model-a": [3, 0, 1], "other": [3, 0, 1], "model-b": [0, 6, 2]}
    try:  # show_result.py's own reading, where pandas is installed
        import pandas as pd
    except ImportError:
        return
    df_all = pd.read_json(fastchat, lines=True)
    df_all = df_all[(df_all["g1_winner"] != "error") & (df_all["g2_winner"] != "error")]
    assert len(df_all) == 8 and set(df_all["model_1"]) == {"model-a", "other"}


def test_reference_answers_choose_the_math_prompt_by_category(tmp_path):
    prompts_file = tmp_path / "judge_prompts.jsonl"  # the fields of FastChat's pair-v2 / pair-math-v1 prompts
    common.write_jsonl(prompts_file, [
        {"name": "pair-v2", "system_prompt": "s", "prompt_template": "{question}|{answer_a}|{answer_b}"},
        {"name": "pair-v2-multi-turn", "system_prompt": "s",
         "prompt_template": "{question_1}|{answer_a_1}|{answer_b_1}|{question_2}|{answer_a_2}|{answer_b_2}"},
        {"name": "pair-math-v1", "system_prompt": "m", "prompt_template": "{question}|{ref_answer_1}|{answer_a}"},
        {"name": "pair-math-v1-multi-turn", "system_prompt": "m",
         "prompt_template": "{question_2}|{ref_answer_1}|{ref_answer_2}|{answer_b_2}"}])
    questions = [{"question_id": 81, "category": "writing", "turns": ["w1", "w2"]},
                 {"question_id": 111, "category": "math", "turns": ["m1", "m2"]},
                 {"question_id": 121, "category": "coding", "turns": ["c1"]}]
    refs = judge.index_answers([(f"ref:{i}", {"question_id": q, "choices": [{"turns": t}]})
                                for i, (q, t) in enumerate([(111, ["R1", "R2"]), (121, ["RC"])], 1)], "gpt-4")
    questions = judge.with_references(questions, refs, "ref.jsonl")
    answers = {json.dumps(q["question_id"]): judge.Answer("m", [t.upper() for t in q["turns"]], "a")
               for q in questions}
    asked = []
    records = judge.judge_games(judge.games(questions, answers, answers)[0], answers, answers,
                                lambda system, user: asked.append(user) or "[[C]]",
                                judge.load_judge_prompts(str(prompts_file)), str(tmp_path / "v.jsonl"),
                                {"model_a": "x", "model_b": "y", "judge": "j"},
                                math_prompts=judge.load_judge_prompts(str(prompts_file), math=True))
    used = {(r["question_id"], r["turn"]): (r["prompt"], r["user_prompt"]) for r in records if r["order"] == "ab"}
    assert used == {(81, 1): ("pair-v2", "w1|W1|W1"), (81, 2): ("pair-v2-multi-turn", "w1|W1|W1|w2|W2|W2"),
                    (111, 1): ("pair-math-v1", "m1|R1|M1"), (111, 2): ("pair-math-v1-multi-turn", "m2|R1|R2|M2"),
                    (121, 1): ("pair-math-v1", "c1|RC|C1")}
    builtin = judge.load_judge_prompts(math=True)
    system, user = judge.render_prompt(builtin[1], judge.prompt_fields(questions[1], ["a1", "a2"], ["b1", "b2"], 2))
    assert "reference answer" in system and user.endswith("Reference answer to it:\nR2")
    with pytest.raises(common.EvalError, match=r"^ref.jsonl: no reference answer to question 121 "
                                                r"\(category coding\)$"):
        judge.with_references(questions, {k: v for k, v in refs.items() if k != "121"}, "ref.jsonl")


def test_http_judge_does_not_retry_a_client_error(judge_server):
    calls = []
    ask = judge.http_judge("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=2, sleep=calls.append)
    with pytest.raises(judge.JudgeError, match="127.0.0.1:9/v1/chat/completions"):
        ask("s", "u")   # nothing listens on port 9 (discard): a connection error, no retries left
    assert calls == []


def test_table_layout():
    rows = [{"benchmark": "MT-Bench", "model_a": "Sr-DPO", "model_b": "DPO", "unparseable": 0,
             "decided": 4, "games": 4, "win_rate": 0.5, "tie_rate": 0.25, "lose_rate": 0.25},
            {"benchmark": "Vicuna-Bench", "model_a": "Sr-DPO", "model_b": "DPO", "unparseable": 1,
             "decided": 1, "games": 2, "win_rate": 1.0, "tie_rate": 0.0, "lose_rate": 0.0}]
    lines = judge.format_table(rows).splitlines()
    assert "MT-Bench" in lines[0] and "Vicuna-Bench" in lines[0]
    assert lines[1].split() == ["Win", "Rate", "Tie", "Rate", "Lose", "Rate"] * 2
    assert lines[2].split() == ["Sr-DPO", "vs", "DPO", "50.00%", "25.00%", "25.00%", "100.00%", "0.00%", "0.00%"]
    assert lines[3].startswith("note: Sr-DPO vs DPO on Vicuna-Bench: 1 of 2 games decided")


# ------------------------------------------------------------------ generate and exact

def _answers(path):
    return {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, path.read_text().splitlines())}


def test_generate_is_repeatable_by_seed(tmp_path):
    questions = tmp_path / "q.jsonl"
    common.write_jsonl(questions, [{"question_id": "x1", "turns": ["Hello there"]},
                               {"question_id": "x2", "turns": ["One", "Two"]}])
    only_x2 = tmp_path / "q2.jsonl"
    common.write_jsonl(only_x2, [{"question_id": "x2", "turns": ["One", "Two"]}])

    def run(name, seed, qfile=questions, *extra):
        out = tmp_path / name
        argv = ["generate", "--model", "tiny", "--questions", str(qfile), "--out", str(out),
                "--max_new_tokens", "8", "--seed", str(seed), *extra]
        assert ev.main(argv) == 0
        return _answers(out)

    sampled = ("--temperature", "1.0", "--top_p", "0.95")
    first, again, other = run("a.jsonl", 7, questions, *sampled), run("b.jsonl", 7, questions, *sampled), \
        run("c.jsonl", 8, questions, *sampled)
    assert first == again and first != other
    assert len(first["x2"]) == 2
    assert run("d.jsonl", 7, only_x2, *sampled)["x2"] == first["x2"]  # independent of the other questions
    assert run("e.jsonl", 1, only_x2) == run("f.jsonl", 2, only_x2)  # greedy: the seed does not matter


CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.mark.parametrize("template", [None, CHAT])
def test_generation_prompts_are_the_training_prompts(monkeypatch, template):
    """Each turn's generation prompt is the prompt of the training sequence of the same conversation."""
    tok = models.load_tokenizer()
    tok.chat_template = template
    replies, seen = ["Knead it.", "Bake it."], []

    def fake_reply(model, tokenizer, prompt_ids, decoding):
        seen.append(list(prompt_ids))
        return (replies + ["ABDEF"] * 3)[len(seen) - 1], 0

    monkeypatch.setattr(judge, "generate_reply", fake_reply)
    turns = ["How do I bake bread?", "And then?"]
    assert judge.answer_turns(None, tok, turns, judge.Decoding(), 0)[0] == replies
    chat = ({"role": "user", "content": turns[0]}, {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": turns[1]})
    for k, prompt in enumerate((chat[:1], chat)):
        (ex,) = data.tokenize_pairs([formats.Pair(prompt, replies[k], "No.")], tok, 4096, log=None)
        n = sum(t == -100 for t in ex["chosen_labels"])
        assert seen[k] == ex["chosen_ids"][:n] and n < len(ex["chosen_ids"])
    if template is None:
        assert tok.decode(seen[0]) == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    seen.clear()
    questions = judge.embedded_questions("test")[:3]  # text prompts, trained on as text
    judge.generate_answers(None, tok, questions, judge.Decoding(), "m")
    trained = data.tokenize_pairs(embedded.embedded_pairs("test")[:3], tok, 512, log=None)
    assert seen == [e["chosen_ids"][:sum(t == -100 for t in e["chosen_labels"])] for e in trained]


def test_generate_appends_and_resumes_where_an_interrupted_run_stopped(tmp_path, monkeypatch, capsys):
    questions = tmp_path / "q.jsonl"
    common.write_jsonl(questions, [{"question_id": f"q{i}", "turns": [f"Copy: ABDE{c}\n"]}
                                 for i, c in enumerate("FGHIJ")])

    def argv(out, *extra):
        return ["generate", "--model", "tiny", "--questions", str(questions), "--out", str(out),
                "--max_new_tokens", "6", *extra]

    whole = tmp_path / "whole.jsonl"
    assert ev.main(argv(whole)) == 0
    calls, answer_turns = [], judge.answer_turns

    def interrupted_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if stopped while answering the third question
        calls.append(args[2])
        return answer_turns(*args)

    out = tmp_path / "model_answer" / "tiny-sft.jsonl"  # the folder is made
    monkeypatch.setattr(judge, "answer_turns", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv(out, "--model_id", "tiny-sft"))
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == ["q0", "q1"]
    with open(out, "a") as f:
        f.write('{"question_id": "q2", "answer_id"')  # a write cut short by the interruption
    calls.clear()
    monkeypatch.setattr(judge, "answer_turns", lambda *a: calls.append(a[2]) or answer_turns(*a))
    assert ev.main(argv(out, "--model_id", "tiny-sft")) == 0
    assert calls == [["Copy: ABDEH\n"], ["Copy: ABDEI\n"], ["Copy: ABDEJ\n"]]  # only those not yet answered
    assert "unfinished last line" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert _answers(out) == _answers(whole) and len(records) == 5
    assert len({r["answer_id"] for r in records}) == 5 and all(r["model_id"] == "tiny-sft" for r in records)
    assert all(isinstance(r["tstamp"], float) for r in records)
    assert judge.load_answers(out)[json.dumps("q0")].model_id == "tiny-sft" == out.stem  # FastChat: file = model
    # another run's file is refused, naming file and line
    assert ev.main(argv(out, "--model_id", "tiny-sft", "--max_new_tokens", "7")) == 2
    assert f"{out}:1: answer made with decoding" in capsys.readouterr().err


def test_generate_keeps_the_whole_prompt_and_caps_new_tokens(tmp_path, capsys):
    question = "Copy: ABDEF\n" * 2
    questions = tmp_path / "q.jsonl"
    common.write_jsonl(questions, [{"question_id": 1, "turns": [question]}])
    tokenizer, model = models.load_tokenizer(), models.load_model()
    ids = torch.tensor([data.encode_prompt([{"role": "user", "content": question}], tokenizer)])
    n = ids.shape[1]  # the prompt as training frames it (an HH transcript: the tiny tokenizer has no template)
    out = tmp_path / "a.jsonl"
    assert ev.main(["generate", "--model", "tiny", "--questions", str(questions), "--out", str(out),
                    "--max_length", str(n + 6)]) == 0  # --max_new_tokens 512: room for 6
    assert "1 answer turn(s) had room for fewer than --max_new_tokens 512" in capsys.readouterr().err
    direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert _answers(out)[1] == [tokenizer.decode(direct[0, n:], skip_special_tokens=True).strip()]
    refused = tmp_path / "r.jsonl"
    assert ev.main(["generate", "--model", "tiny", "--questions", str(questions), "--out", str(refused),
                    "--max_length", str(n)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: question 1: turn 1: the prompt's {n} tokens fill the context of {n} tokens "
                   "(--max_length or the model's max_position_embeddings): no room to generate")


def test_exact_on_the_embedded_dataset(tmp_path, capsys):
    questions = judge.embedded_questions("test")
    first_pair = {}
    for pair in embedded.embedded_pairs("test"):
        first_pair.setdefault(judge._prompt_text(pair.prompt), pair)
    rows = {"chosen": [], "rejected": []}
    expected = {"win": 0, "tie": 0, "lose": 0}
    for q in questions:
        pair = first_pair[q["turns"][0]]
        for side in rows:
            rows[side].append({"question_id": q["question_id"], "model_id": side,
                               "choices": [{"index": 0, "turns": [getattr(pair, side)]}]})
        diff = pair.score_chosen - pair.score_rejected
        expected["win" if diff > 0 else "lose" if diff < 0 else "tie"] += 1
    paths = {}
    for side, records in rows.items():
        paths[side] = tmp_path / f"{side}.jsonl"
        common.write_jsonl(paths[side], records)
    summary = tmp_path / "s.json"
    argv = ["exact", "--answers_a", str(paths["chosen"]), "--answers_b", str(paths["rejected"]),
            "--summary", str(summary)]
    assert ev.main(argv) == 0
    s = json.loads(summary.read_text())
    assert expected["win"] > 0 and s["games"] == len(questions)
    assert (s["win"], s["tie"], s["lose"]) == (expected["win"], expected["tie"], expected["lose"])
    assert "chosen vs rejected" in capsys.readouterr().out
    assert ev.main(argv[:2] + [str(paths["chosen"]), "--answers_b", str(paths["chosen"]),
                               "--summary", str(summary)]) == 0
    assert json.loads(summary.read_text())["tie_rate"] == 1.0


# ------------------------------------------------------------------ bad input

def test_bad_question_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "text": "no turns"}\n')
    assert ev.main(["generate", "--model", "tiny", "--questions", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{path}:2: field 'turns' missing" in err
    path.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 1, "turns": ["again"]}\n')
    with pytest.raises(common.EvalError, match=r"q.jsonl:2: question_id 1 repeats .*q.jsonl:1$"):
        judge.load_questions(str(path))
