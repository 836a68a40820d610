"""judge.py and evaluate.py's judge, exact and table commands: verdicts, prompts, the judge against a local
server, FastChat's layout, the exact judge."""
import http.server
import itertools
import json
import threading
import uuid

import pytest

import evaluate as ev
from base import common, embedded
from mtbench import judge, judge_prompts
from mtbench.answers import Answer, _prompt_text, embedded_questions, index_answers

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
    assert [p.name for p in builtin] == list(judge_prompts.BUILTIN_NAMES)
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
        self.garble_next, self.content = 0, None  # garbled status lines to send; a content to send instead
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
                if server.garble_next:
                    server.garble_next -= 1
                    self.wfile.write(b"garbage\r\n\r\n")  # http.client.BadStatusLine, no OSError
                    self.close_connection = True
                    return None
                server.replies += 1
                content = server.judge(body["messages"][-1]["content"])
                content = content if server.content is None else server.content(content)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

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
    refs = index_answers([(f"ref:{i}", {"question_id": q, "choices": [{"turns": t}]})
                                for i, (q, t) in enumerate([(111, ["R1", "R2"]), (121, ["RC"])], 1)], "gpt-4")
    questions = judge.with_references(questions, refs, "ref.jsonl")
    answers = {json.dumps(q["question_id"]): Answer("m", [t.upper() for t in q["turns"]], "a")
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


def test_exact_on_the_embedded_dataset(tmp_path, capsys):
    questions = embedded_questions("test")
    first_pair = {}
    for pair in embedded.embedded_pairs("test"):
        first_pair.setdefault(_prompt_text(pair.prompt), pair)
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


def test_http_judge_retries_transport_faults_that_are_not_oserror(judge_server):
    judge_server.garble_next = 2
    calls = []
    ask = judge.http_judge(judge_server.url, "m", max_retries=2, sleep=calls.append, log=lambda m: None)
    assert ask("s", "GOOD") == "A is better.\n[[A]]"
    assert len(calls) == 2 and judge_server.requests == 3


def test_http_judge_joins_a_multipart_content_and_refuses_other_types(tmp_path, judge_server, capsys):
    judge_server.content = lambda text: [{"type": "text", "text": text[:5]}, {"type": "image_url"},
                                         {"type": "text", "text": text[5:]}]
    ask = judge.http_judge(judge_server.url, "m", max_retries=0)
    assert ask("s", "GOOD") == "A is better.\n[[A]]"
    judge_server.content = lambda text: 7
    with pytest.raises(judge.JudgeError, match=r"content is int 7, not text"):
        ask("s", "GOOD")
    paths = _judge_files(tmp_path)
    assert ev.main(_judge_argv(paths, judge_server.url, tmp_path / "v.jsonl", tmp_path / "s.json")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and judge_server.url in err and "content is int 7" in err
    assert "; question " in err and "(after 1 tries)" in err and judge_server.requests == 3
