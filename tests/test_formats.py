"""formats.py: each record format, file and hub reader, and the rules that drop a pair (docs/data.md)."""
import gzip
import json
import random
import sys

import pytest
from test_data import fixture

import data
from base import formats
from base.common import DataError
from base.formats import Pair

# ----------------------------------------------------------------------------- formats


def load(name, lines=None):
    return data.load_pairs(fixture(name), log=(lines.append if lines is not None else None))


def test_hh_transcripts():
    lines = []
    pairs = load("hh.jsonl", lines)
    H, A = "\n\nHuman: ", "\n\nAssistant:"
    assert pairs == [
        Pair(H + "What is the capital of France?" + A, " Paris.", " I don't know."),
        Pair(H + "Hi" + A + " Hello!" + H + "Tell me a joke." + A, " Why did the chicken cross the road?", " No."),
    ]
    assert lines == [f"{fixture('hh.jsonl')}: kept 2 of 6 pairs; dropped 1 empty response, 1 prompt mismatch, "
                     f"1 irregular transcript, 1 identical responses"]


def test_ultrafeedback_both_layouts():
    question = lambda q: ({"role": "user", "content": q},)  # noqa: E731
    argilla = load("ultrafeedback_argilla.jsonl")
    assert argilla == [Pair(question("Name a primary colour."), "Red.", "Green.", 5.0, 2.5),
                       Pair(question("What is 3 times 4?"), "12", "7", 4.75, 1.0),
                       Pair(question("Greet me."), "Hello there!", "Go away.", None, None)]
    lines = []
    h4 = load("ultrafeedback_h4.jsonl", lines)
    assert h4 == [Pair(question("Name a primary colour."), "Red.", "Green.", 9.0, 4.0),
                  Pair(question("What is 3 times 4?"), "12", "7", 10.0, 1.0)]
    assert lines[0].endswith("kept 2 of 4 pairs; dropped 2 prompt mismatch")


def test_generic_text_and_messages():
    assert load("generic_text.json") == [Pair("2 + 2 =", " 4", " 5", 1.0, 0.0),
                                         Pair("The opposite of hot is", " cold", " warm"),
                                         Pair("Capital of Italy:", " Rome", " Milan", 0.9, None)]
    lines = []
    pairs = load("generic_messages.jsonl", lines)
    assert pairs == [
        Pair(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}),
             "Mars.", "The Sun.", 7.0, 2.0),
        Pair(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye"}), "Goodbye!", "What?"),
    ]
    assert lines[0].endswith("kept 2 of 3 pairs; dropped 1 prompt not ending in a user turn")


def test_whole_conversations_without_a_prompt_field(tmp_path):
    def chat(*turns):
        return [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, turns)]

    records = [{"chosen": chat("Hi", "Hello!", "Bye", "Goodbye!"), "rejected": chat("Hi", "Hello!", "Bye", "What?")},
               {"chosen": chat("Hi", "Hello!"), "rejected": chat("Yo", "Hey")}]
    path = write(tmp_path, "conv.jsonl", "\n".join(map(json.dumps, records)))
    lines = []
    assert data.load_pairs(path, log=lines.append) == [Pair(tuple(chat("Hi", "Hello!", "Bye")), "Goodbye!", "What?")]
    assert lines == [f"{path}: kept 1 of 2 pairs; dropped 1 prompt mismatch"]


def test_sharegpt_layout_of_llama_factory():
    def chat(*turns):
        return tuple({"role": role, "content": text} for role, text in turns)

    lines = []
    assert load("sharegpt.json", lines) == [
        Pair(chat(("user", "Name a planet.")), "Mars.", "The Sun."),
        Pair(chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")),
             "Goodbye!", "What?"),
        Pair(chat(("system", "Be kind."), ("user", "Greet me.")), "Hello there!", "Go away."),
    ]
    assert lines == [f"{fixture('sharegpt.json')}: kept 3 of 5 pairs; dropped 1 prompt not ending in a user turn, "
                     f"1 no assistant turn"]


def test_implicit_prompt_by_hand(tmp_path):
    records = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},  # TRL's documented example
               {"chosen": "Q: 2+2?\nA=4", "rejected": "Q: 2+2?\nA=5", "score_chosen": 1, "score_rejected": 0},
               {"chosen": "Say hi: hi", "rejected": "Say hi: hi there"},  # one is the start of the other
               {"chosen": "same", "rejected": "same"}]
    path = write(tmp_path, "implicit.jsonl", "\n".join(map(json.dumps, records)))
    lines = []
    assert data.load_pairs(path, log=lines.append) == [Pair("The sky is", " blue.", " green."),
                                                       Pair("Q: 2+2?\nA=", "4", "5", 1.0, 0.0)]
    assert lines == [f"{path}: kept 2 of 4 pairs; dropped 1 empty response, 1 identical responses"]


def test_implicit_prompt_splits_at_the_first_difference():
    rng = random.Random(5)
    for _ in range(300):
        text = lambda n: "".join(rng.choice("ab ") for _ in range(n))  # noqa: E731
        shared = "x" + text(rng.randrange(6))
        chosen, rejected = shared + text(rng.randrange(1, 5)), shared + text(rng.randrange(1, 5))
        if chosen == rejected:
            continue
        prompt, reply_c, reply_r = formats._implicit_prompt(chosen, rejected)
        assert prompt + reply_c == chosen and prompt + reply_r == rejected
        first = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        assert len(prompt) == first - (chosen[first - 1] == " ")  # the space before the difference is a reply's
    assert formats._implicit_prompt([1, 2, 3], [1, 2, 4]) == ([1, 2], [3], [4])


def test_gzip_and_json_lines_in_a_json_file(tmp_path):
    records = [json.loads(line) for line in open(fixture("hh.jsonl"))]
    gz = tmp_path / "hh.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    as_json = tmp_path / "lines.json"
    as_json.write_text("\n".join(json.dumps(r) for r in records))
    assert data.load_pairs(str(gz), log=None) == data.load_pairs(str(as_json), log=None) == load("hh.jsonl")


def test_hh_from_the_hub_reads_each_subset(monkeypatch):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, repo_type=None, **kw):
        asked.append((repo_id, filename, repo_type))
        return fixture("hh.jsonl")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    lines = []
    pairs = data.load_pairs("Anthropic/hh-rlhf", "test", log=lines.append)
    assert asked == [("Anthropic/hh-rlhf", f"{s}/test.jsonl.gz", "dataset") for s in formats.HH_SUBSETS]
    assert len(pairs) == 8 and lines == ["Anthropic/hh-rlhf [test]: kept 8 of 24 pairs; dropped 4 empty response, "
                                         "4 prompt mismatch, 4 irregular transcript, 4 identical responses"]
    asked.clear()
    assert data.load_pairs("Anthropic/hh-rlhf/helpful-base", "train", log=None) == pairs[:2]
    assert asked == [("Anthropic/hh-rlhf", "helpful-base/train.jsonl.gz", "dataset")]


def test_hub_failures_are_one_line(monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("offline mode is enabled\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match=r"^Anthropic/hh-rlhf/harmless-base \[train\]: cannot load from the hub "
                                        r"\(OSError: offline mode is enabled\)$"):
        data.load_pairs("Anthropic/hh-rlhf", log=None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install datasets$"):
        data.load_pairs("HuggingFaceH4/ultrafeedback_binarized", log=None)


# ----------------------------------------------------------------------------- bad input


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


GOOD = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", f"{GOOD}\n\n{{\"prompt\": \"q\", \n{GOOD}\n", r"bad.jsonl:3: malformed JSON"),
    ("bad.jsonl", f"{GOOD}\n{json.dumps({'prompt': 'q', 'chosen': 'a'})}\n",
     r"bad.jsonl:2: field 'rejected' missing; expected one of: HH-RLHF .*UltraFeedback"),
    ("bad.jsonl", f"{GOOD}\n{json.dumps({'instruction': 'q', 'chosen_response': 'a'})}\n",
     r"bad.jsonl:2: field 'rejected_response' missing; expected one of:"),
    ("bad.jsonl", f"{json.dumps({'text': 'q'})}\n", r"bad.jsonl:1: field 'chosen' missing; expected one of:"),
    ("bad.jsonl", json.dumps({"chosen": "a", "rejected": "b"}),
     r"bad.jsonl:1: field 'prompt' missing \(no HH transcript, and chosen and rejected share no prefix"),
    ("bad.jsonl", json.dumps({"chosen": " yes", "rejected": " no"}), r"bad.jsonl:1: field 'prompt' missing \(no HH"),
    ("bad.json", f"[\n  {GOOD},\n  {json.dumps({'conversations': 'hi', 'chosen': {}, 'rejected': {}})}\n]",
     r"bad.json:3: field 'conversations' must be a list of messages, got str"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "human"}]}),
     r"bad.jsonl:1: field 'conversations' message 1 must be \{\"from\": str, \"value\": str\}"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "observation", "value": "q"}]}),
     r"bad.jsonl:1: field 'conversations' message 0 has role 'observation'; expected one of: human, user, gpt"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt"}}),
     r"bad.jsonl:1: field 'chosen' must be \{\"from\": str, \"value\": str\}"),
    ("bad.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt",
                                                                                           "value": "a"}}),
     r"bad.jsonl:1: field 'rejected' missing; expected one of: .*ShareGPT"),
    ("bad.jsonl", json.dumps({"conversations": [], "system": 3, "chosen": {}, "rejected": {}}),
     r"bad.jsonl:1: field 'system' must be a string, got int"),
    ("bad.jsonl", json.dumps({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}),
     r"bad.jsonl:1: field 'prompt' missing; expected one of:"),
    ("bad.jsonl", f"{GOOD}\n".encode() + b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}\n',
     r"bad.jsonl:2: not valid UTF-8 \(byte 0xff at column 14\)"),
    ("bad.json", f"[\n  {GOOD},\n  {GOOD},\n  {{\"prompt\": 1, \"chosen\": \"a\", \"rejected\": \"b\"}}\n]",
     r"bad.json:4: field 'prompt' must be a string or a list of messages, got int"),
    ("bad.json", f"[\n  {GOOD},\n  {GOOD}\n  {GOOD}\n]", r"bad.json:4: malformed JSON \(expected ',' or ']'"),
    ("bad.json", f"[\n  {GOOD},\n  {{\"prompt\": \n]", r"bad.json:4: malformed JSON \(Expecting value"),
    ("bad.json", f"[\n  {GOOD},\n".encode() + b"  \"\xc3\"\n]",
     r"bad.json:3: not valid UTF-8 \(byte 0xc3 at column 4\)"),
    ("bad.jsonl", json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}),
     r"bad.jsonl:1: field 'chosen' must be a string or a list of messages, got int"),
    ("bad.jsonl", json.dumps({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}),
     r"bad.jsonl:1: field 'chosen' message 0 must be"),
    ("bad.jsonl", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high"}),
     r"bad.jsonl:1: field 'score_chosen' must be a number or null, got 'high'"),
    ("bad.jsonl", "[1, 2]", r"bad.jsonl:1: expected a JSON object, got list"),
    ("bad.jsonl.gz", b"not gzip", r"bad.jsonl.gz: cannot read"),
    ("bad.jsonl.gz", gzip.compress(GOOD.encode() * 50, mtime=0)[:-20], r"bad.jsonl.gz: cannot read \(EOFError"),
    ("bad.jsonl.gz",
     gzip.compress(GOOD.encode() * 50, mtime=0)[:20] + b"\0" * 40 + gzip.compress(GOOD.encode(), mtime=0)[60:],
     r"bad.jsonl.gz: cannot read \((error|BadGzipFile|EOFError)"),
    ("bad.jsonl", f"{GOOD}\n" + GOOD[:-1] + ', "score_chosen": 1' + "0" * 400 + "}",
     r"bad.jsonl:2: field 'score_chosen' must be a finite number, got inf"),
    ("bad.jsonl", GOOD[:-1] + ', "score_rejected": 1e400}', r"bad.jsonl:1: field 'score_rejected' must be a finite"),
    ("bad.jsonl", GOOD[:-1] + ', "score_rejected": NaN}', r"bad.jsonl:1: field 'score_rejected' must be a finite"),
    ("bad.json", f"[\n{GOOD},\n" + GOOD[:-1] + ', "score_chosen": ' + "7" * 5000 + "}]",
     r"bad.json:3: field 'score_chosen' must be a finite number, got inf"),
    ("bad.jsonl", f"{GOOD}\n" + "[" * 100_000 + "]" * 100_000, r"bad.jsonl:2: JSON nested too deeply to read$"),
    ("bad.json", "[\n" + "[" * 100_000 + "]" * 100_000 + "]", r"bad.json:2: JSON nested too deeply to read$"),
    ("bad.json", '{\n  "rows": [' + GOOD + "]\n}",
     r'bad.json: a JSON object with keys "rows"; expected a list of records, an object whose only key is "data"'),
    ("bad.json", '{"data": [' + GOOD + '], "version": 2}', r'bad.json: a JSON object with keys "data", "version"; '),
    ("bad.txt", GOOD, r"bad.txt: unsupported file type"),
])
def test_bad_input_messages(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as info:
        data.load_pairs(path, log=None)
    assert "\n" not in str(info.value) and str(info.value).startswith(path)


def test_missing_file_and_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: not a file"):
        data.load_pairs(str(tmp_path / "nothere.jsonl"), log=None)
    path = write(tmp_path, "empty.jsonl", json.dumps({"prompt": "q", "chosen": " ", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DataError, match=r"kept 0 of 2 pairs; dropped 1 empty response, 1 identical responses; "
                                        r"nothing left$"):
        data.load_pairs(path, log=None)
    with pytest.raises(DataError, match="kept 0 of 0 pairs"):
        data.load_pairs(write(tmp_path, "blank.jsonl", "\n\n"), log=None)


def test_summary_counts_for_many_drops(tmp_path):
    rng = random.Random(3)
    reasons = {"empty response": {"prompt": "q", "chosen": "", "rejected": "b"},
               "identical responses": {"prompt": "q", "chosen": "a", "rejected": "a"},
               "prompt mismatch": {"chosen": "\n\nHuman: a\n\nAssistant: x",
                                   "rejected": "\n\nHuman: b\n\nAssistant: y"},
               "no assistant turn": {"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": "b"},
               None: {"prompt": "q", "chosen": "a", "rejected": "b"}}
    chosen = [rng.choice(list(reasons)) for _ in range(2312)]
    write(tmp_path, "many.jsonl", "\n".join(json.dumps(reasons[r]) for r in chosen))
    lines = []
    pairs = data.load_pairs(str(tmp_path / "many.jsonl"), log=lines.append)
    counts = {r: chosen.count(r) for r in reasons}
    order = sorted((r for r in reasons if r), key=chosen.index)
    expected = (f"kept {counts[None]:,} of 2,312 pairs; dropped "
                + ", ".join(f"{counts[r]:,} {r}" for r in order))
    assert len(pairs) == counts[None] and lines == [f"{tmp_path / 'many.jsonl'}: {expected}"]
