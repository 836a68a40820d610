"""answers.py and evaluate.py's generate command: seeded, resumable generation framed as in training; bad
question files."""
import json

import pytest
import torch

import data
import evaluate as ev
from base import common, embedded, formats
from mtbench import answers
from training import models

# ------------------------------------------------------------------ generate


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

    monkeypatch.setattr(answers, "generate_reply", fake_reply)
    turns = ["How do I bake bread?", "And then?"]
    assert answers.answer_turns(None, tok, turns, answers.Decoding(), 0)[0] == replies
    chat = ({"role": "user", "content": turns[0]}, {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": turns[1]})
    for k, prompt in enumerate((chat[:1], chat)):
        (ex,) = data.tokenize_pairs([formats.Pair(prompt, replies[k], "No.")], tok, 4096, log=None)
        n = sum(t == -100 for t in ex["chosen_labels"])
        assert seen[k] == ex["chosen_ids"][:n] and n < len(ex["chosen_ids"])
    if template is None:
        assert tok.decode(seen[0]) == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    seen.clear()
    questions = answers.embedded_questions("test")[:3]  # text prompts, trained on as text
    answers.generate_answers(None, tok, questions, answers.Decoding(), "m")
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
    calls, answer_turns = [], answers.answer_turns

    def interrupted_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if stopped while answering the third question
        calls.append(args[2])
        return answer_turns(*args)

    out = tmp_path / "model_answer" / "tiny-sft.jsonl"  # the folder is made
    monkeypatch.setattr(answers, "answer_turns", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv(out, "--model_id", "tiny-sft"))
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == ["q0", "q1"]
    with open(out, "a") as f:
        f.write('{"question_id": "q2", "answer_id"')  # a write cut short by the interruption
    calls.clear()
    monkeypatch.setattr(answers, "answer_turns", lambda *a: calls.append(a[2]) or answer_turns(*a))
    assert ev.main(argv(out, "--model_id", "tiny-sft")) == 0
    assert calls == [["Copy: ABDEH\n"], ["Copy: ABDEI\n"], ["Copy: ABDEJ\n"]]  # only those not yet answered
    assert "unfinished last line" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert _answers(out) == _answers(whole) and len(records) == 5
    assert len({r["answer_id"] for r in records}) == 5 and all(r["model_id"] == "tiny-sft" for r in records)
    assert all(isinstance(r["tstamp"], float) for r in records)
    assert answers.load_answers(out)[json.dumps("q0")].model_id == "tiny-sft" == out.stem  # FastChat: file = model
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


# ------------------------------------------------------------------ bad input

def test_bad_question_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "text": "no turns"}\n')
    assert ev.main(["generate", "--model", "tiny", "--questions", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{path}:2: field 'turns' missing" in err
    path.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 1, "turns": ["again"]}\n')
    with pytest.raises(common.EvalError, match=r"q.jsonl:2: question_id 1 repeats .*q.jsonl:1$"):
        answers.load_questions(str(path))


def test_generation_prompts_carry_the_chat_template_options(monkeypatch):

    tokenizer, model = models.load_tokenizer(), models.load_model()
    tokenizer.chat_template = ("{% if enable_thinking is defined and not enable_thinking %}NOTHINK {% endif %}"
                               "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    seen = []
    monkeypatch.setattr(answers, "generate_reply", lambda m, t, ids, d: (seen.append(t.decode(ids)), ("ok", 1))[1])
    questions = [{"question_id": 1, "turns": ["hi", "more"]}]
    chat = data.ChatOptions.of('{"enable_thinking": false}', "Be brief.")
    answers.generate_answers(model, tokenizer, questions, answers.Decoding(max_new_tokens=1), "m", chat=chat)
    assert seen == ["NOTHINK [system] Be brief.\n[user] hi\n[assistant] ",
                    "NOTHINK [system] Be brief.\n[user] hi\n[assistant] ok\n[user] more\n[assistant] "]
    seen.clear()
    answers.generate_answers(model, tokenizer, questions, answers.Decoding(max_new_tokens=1), "m")
    assert seen[0] == "[user] hi\n[assistant] "


def test_a_resumed_answers_file_keeps_one_prompt_framing(tmp_path, monkeypatch):
    """Case 8: generate resuming into an answers file made under another --system_prompt or
    --chat_template_kwargs is refused (naming file and line), as a changed decoding is; the same framing resumes."""
    tokenizer, model = models.load_tokenizer(), models.load_model()
    monkeypatch.setattr(answers, "generate_reply", lambda m, t, ids, d: ("ok", 1))
    out = tmp_path / "a.jsonl"
    first = data.ChatOptions.of('{"enable_thinking": false}', "Be brief.")
    decoding = answers.Decoding(max_new_tokens=1)
    two = [{"question_id": 1, "turns": ["hi"]}, {"question_id": 2, "turns": ["more"]}]
    answers.generate_answers(model, tokenizer, two[:1], decoding, "m", str(out), chat=first)
    for other in (None, data.ChatOptions.of('{"enable_thinking": false}', "Be long."),
                  data.ChatOptions.of("", "Be brief.")):
        with pytest.raises(common.EvalError, match=f"{out}:1: answer made with chat"):
            answers.generate_answers(model, tokenizer, two, decoding, "m", str(out), chat=other)
    records, _ = answers.generate_answers(model, tokenizer, two, decoding, "m", str(out), chat=first)
    assert [r["chat"] for r in records] == [{"system_prompt": "Be brief.", "chat_template_kwargs": {
        "enable_thinking": False}}] * 2


def test_num_choices_samples_answers_in_one_batch_and_resumes_only_alike(tmp_path, capsys):
    """--num_choices K: K sampled answers per question, the first what the judge reads. One turn: one batch, the
    same K answers for the same seed and independent of the other questions; two turns: choice i is the
    conversation that one choice from seed + i gives. A file made with another K is refused; one from before the
    flag (no "choices" in its decoding) resumes with K = 1. Greedy decoding with K > 1 is one line."""
    questions = tmp_path / "q.jsonl"
    common.write_jsonl(questions, [{"question_id": "x1", "turns": ["Hello there"]},
                                   {"question_id": "x2", "turns": ["One", "Two"]}])
    sampled = ["--temperature", "1.0", "--max_new_tokens", "6", "--seed", "3"]

    def run(name, *extra, qfile=questions):
        out = tmp_path / name
        assert ev.main(["generate", "--model", "tiny", "--questions", str(qfile), "--out", str(out), *sampled,
                        *extra]) == 0
        return answers.load_answers(out)

    four, again = run("a.jsonl", "--num_choices", "4"), run("b.jsonl", "--num_choices", "4")
    assert {k: a.choices for k, a in four.items()} == {k: a.choices for k, a in again.items()}
    assert [len(four[k].choices) for k in four] == [4, 4] and all(a.turns == a.choices[0] for a in four.values())
    assert len({c[0] for c in four[json.dumps("x1")].choices}) > 1  # sampled, not one answer four times
    tokenizer, model = models.load_tokenizer(), models.load_model()
    decoding = answers.Decoding(max_new_tokens=6, temperature=1.0, seed=3)
    seed = answers.question_seed(3, "x2")
    assert list(four[json.dumps("x2")].choices) == [
        answers.answer_turns(model, tokenizer, ["One", "Two"], decoding, seed + i)[0] for i in range(4)]
    only_x1 = tmp_path / "q1.jsonl"
    common.write_jsonl(only_x1, [{"question_id": "x1", "turns": ["Hello there"]}])
    assert run("c.jsonl", "--num_choices", "4", qfile=only_x1)[json.dumps("x1")].choices == \
        four[json.dumps("x1")].choices
    assert ev.main(["generate", "--model", "tiny", "--questions", str(questions), "--out",
                    str(tmp_path / "a.jsonl"), *sampled, "--num_choices", "2"]) == 2
    assert "a.jsonl:1: answer made with decoding" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    run("one.jsonl")
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    for row in rows:
        del row["decoding"]["choices"]
    common.write_jsonl(one, rows[:1])
    assert run("one.jsonl")[json.dumps("x2")].turns == [r for r in rows if r["question_id"] == "x2"][0][
        "choices"][0]["turns"]
    capsys.readouterr()
    assert ev.main(["generate", "--model", "tiny", "--questions", str(questions), "--out", str(tmp_path / "g"),
                    "--num_choices", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--num_choices 2 with --temperature 0" in err
