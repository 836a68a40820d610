"""mtbench/answers.py: MT-Bench-style questions and answers, and answer generation; nothing Sr-specific, no judging.

Owns: question and answer files (FastChat layout), reading them with errors naming file, line and field, the
decoding settings (``Decoding``) and ``generate_answers``, resumable, one JSONL line per question.
Does not own: judging (judge.py), the command line (evaluate.py), model loading (training/models.py).
"""

import contextlib
import json
import os
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
from base import common, defaults, embedded, formats
from base.common import EvalError
from training.models import model_device, position_limit

# ----------------------------------------------------------------------------------------------
# Questions and answers: JSONL in
# ----------------------------------------------------------------------------------------------


def read_jsonl(path):
    """[(where "FILE:LINE", record dict)] of a JSONL file (``formats.read_records``: also .json, .gz)."""
    rows = []
    for where, record in formats.read_records(os.fspath(path)):
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rows.append((where, record))
    return rows


def field(record, name, where, kind):
    """record[name], checked to be of type ``kind``; a one-line EvalError naming file, line and field
    (``common.field``)."""
    return common.field(record, name, where, kind, EvalError, f"fields present: {sorted(record)}")


def _turns(value, name, where):
    """A non-empty list of strings (questions or answers of the turns of one conversation)."""
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise EvalError(f"{where}: field '{name}' must be a non-empty list of strings")
    return list(value)


def _unique_ids(rows):
    """{json.dumps(question_id): (where, record)} of [(where, record)]; a repeated id is an error."""
    by_id = {}
    for where, record in rows:
        if record.get("question_id") is None:
            raise EvalError(f"{where}: field 'question_id' missing")
        key = json.dumps(record["question_id"])
        if key in by_id:
            raise EvalError(f"{where}: question_id {key} repeats {by_id[key][0]}")
        by_id[key] = (where, record)
    return by_id


def load_questions(spec, split="test"):
    """Questions as [{"question_id", "turns": [str, ...], ...}] in file order.

    spec: a JSONL path (MT-Bench / Vicuna-Bench layout: ``question_id``, ``turns``, optional
    ``category`` and ``reference``), or "embedded": the distinct prompts of
    ``embedded.embedded_pairs(split)``, numbered from 0 in order of first appearance.
    """
    if spec == "embedded":
        return embedded_questions(split)
    questions = [dict(record, turns=_turns(field(record, "turns", where, list), "turns", where))
                 for where, record in _unique_ids(read_jsonl(spec)).values()]
    if not questions:
        raise EvalError(f"{spec}: no questions")
    return questions


def _prompt_text(prompt):
    """The query text of a formats.Pair prompt: itself, or the last user message of a chat."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def embedded_questions(split="test"):
    """The distinct prompts of the embedded dataset's split as single-turn questions ("data_prompt": the text
    as trained on, so that generation frames it as training did)."""
    seen = {}
    for pair in embedded.embedded_pairs(split):
        seen.setdefault(pair.prompt, len(seen))
    return [{"question_id": qid, "turns": [_prompt_text(prompt)], "data_prompt": prompt}
            for prompt, qid in seen.items()]


@dataclass(frozen=True)
class Answer:
    """One question's answers in an answer file, and where they were read ("FILE:LINE"): turns, the first
    choice's (what the judge reads); choices, every choice's turns (``Decoding.choices`` samples)."""
    model_id: str
    turns: list
    where: str
    choices: tuple = ()


def load_answers(path):
    """{json.dumps(question_id): Answer} of a FastChat-layout answer file (``generate``'s output)."""
    answers = index_answers(read_jsonl(path), Path(path).stem)
    if not answers:
        raise EvalError(f"{path}: no answers")
    return answers


def index_answers(rows, default_id):
    """{json.dumps(question_id): Answer} of [(where, answer record)]; model_id defaults to default_id."""
    answers = {}
    for key, (where, record) in _unique_ids(rows).items():
        choices = field(record, "choices", where, list)
        if not choices or not all(isinstance(c, dict) for c in choices):
            raise EvalError(f"{where}: field 'choices' must be a non-empty list of objects")
        every = tuple(_turns(c.get("turns"), f"choices[{i}].turns", where) for i, c in enumerate(choices))
        answers[key] = Answer(str(record.get("model_id", default_id)), every[0], where, every)
    return answers


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoding:
    """How to decode: greedy when temperature is 0, else sampling with temperature and top_p; choices answers
    per question (FastChat's --num-choices: samples, for an expected score; the judge reads the first)."""
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    seed: int = 0
    max_length: int | None = None  # context limit; None: the model's max_position_embeddings
    choices: int = 1

    def __post_init__(self):
        if self.choices < 1:
            raise EvalError(f"--num_choices {self.choices}: must be at least 1")
        if self.choices > 1 and self.temperature == 0:
            raise EvalError(f"--num_choices {self.choices} with --temperature 0: greedy decoding gives every "
                            f"choice the same answer; sample (--temperature > 0) or ask for one choice")


def _context_limit(model, decoding):
    return decoding.max_length or position_limit(model.config)


def check_context(name, model, max_length, flag="--max_length"):
    """EvalError when ``max_length`` (a flag's value) exceeds the positions the model has."""
    limit = position_limit(model.config)
    if max_length and limit and max_length > limit:
        raise EvalError(f"{flag} {max_length}: more than the {limit} positions of {name} "
                        f"(its config's max_position_embeddings / n_positions); use {limit} or less")


def generate_reply(model, tokenizer, prompt_ids, decoding):
    """The decoded continuation of one prompt: ``generate_replies``'s one reply. Returns (text, new-token cap)."""
    replies, room = generate_replies(model, tokenizer, prompt_ids, decoding, 1)
    return replies[0], room


def generate_replies(model, tokenizer, prompt_ids, decoding, n):
    """n decoded continuations of one prompt, drawn in one batch (special tokens dropped, outer whitespace stripped).

    Shape: prompt_ids list[int]. The whole prompt is kept: new tokens are capped at the room that the
    context limit leaves after it, and a prompt that leaves no room is an EvalError. Returns (texts list[str],
    the new-token cap used: decoding.max_new_tokens or less).
    """
    limit = _context_limit(model, decoding)
    room = min(decoding.max_new_tokens, limit - len(prompt_ids)) if limit else decoding.max_new_tokens
    if room < 1:
        raise EvalError(f"the prompt's {len(prompt_ids)} tokens fill the context of {limit} tokens "
                        f"(--max_length or the model's max_position_embeddings): no room to generate")
    ids = torch.tensor([prompt_ids], device=model_device(model))
    sampling = decoding.temperature > 0
    options = dict(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p) \
        if sampling else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=room,
                             use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, num_return_sequences=n, **options)
    return [tokenizer.decode(row[ids.shape[1]:].tolist(), skip_special_tokens=True).strip() for row in out], room


def question_seed(seed, question_id):
    """A per-question seed: answers do not depend on which other questions are in the file."""
    return (seed * 1_000_003 + zlib.crc32(json.dumps(question_id).encode())) % (2 ** 31)


def turn_ids(tokenizer, messages, prompt=None, chat=None):
    """A turn's generation prompt: ``data.encode_prompt`` of the chat so far (messages), framed as in training;
    the first turn's is `prompt` as the training data holds it, where given."""
    return data.encode_prompt(prompt if prompt is not None and len(messages) == 1 else messages, tokenizer, chat=chat)


def answer_choices(model, tokenizer, turns, decoding, seed, prompt=None, chat=None):
    """decoding.choices answers to a conversation: [(answers, caps)] per choice (``answer_turns``). One turn: the
    choices are sampled in one batch from seed; several: choice i is its own conversation from seed + i."""
    if decoding.choices == 1 or len(turns) > 1:
        return [answer_turns(model, tokenizer, turns, decoding, seed + i, prompt, chat)
                for i in range(decoding.choices)]
    torch.manual_seed(seed)
    ids = turn_ids(tokenizer, ({"role": "user", "content": turns[0]},), prompt, chat)
    try:
        replies, cap = generate_replies(model, tokenizer, ids, decoding, decoding.choices)
    except EvalError as e:
        raise EvalError(f"turn 1: {e}") from None
    return [([reply], [cap]) for reply in replies]


def answer_turns(model, tokenizer, turns, decoding, seed, prompt=None, chat=None):
    """Answers to a conversation, turn by turn, each given the earlier questions and answers.

    The prompt of each turn is ``data.encode_prompt`` of the chat so far, framed as in training (the
    tokenizer's chat template, else an HH transcript); prompt: the first turn's prompt as the training
    data holds it, where it is text (the embedded dataset's). Returns (answers list[str], the new-token cap
    of each turn list[int]).
    """
    torch.manual_seed(seed)
    messages, answers, caps = (), [], []
    for turn, question in enumerate(turns, 1):
        messages += ({"role": "user", "content": question},)
        ids = turn_ids(tokenizer, messages, prompt, chat)
        try:
            reply, cap = generate_reply(model, tokenizer, ids, decoding)
        except EvalError as e:
            raise EvalError(f"turn {turn}: {e}") from None
        messages += ({"role": "assistant", "content": reply},)
        answers.append(reply)
        caps.append(cap)
    return answers, caps


def _drop_unfinished_line(path):
    """Cut an unfinished last line (an interrupted write) from a JSONL file (``common.cut_unfinished_line``);
    True if cut."""
    kept, cut = common.cut_unfinished_line(Path(path).read_bytes())
    if cut:
        Path(path).write_bytes(kept)
    return cut


def appended_rows(path, what):
    """[(where, record)] already in a JSONL file that a run appends to (none if absent), after cutting an
    unfinished last line (an interrupted write); `what` says what happens to that line's item."""
    if not os.path.exists(path):
        return []
    if _drop_unfinished_line(path):
        print(f"{path}: discarded an unfinished last line (an interrupted write); {what}", file=sys.stderr)
    return read_jsonl(path)


def chat_record(chat):
    """The prompts' framing as an answer records it (data.ChatOptions: system prompt, template variables), or None
    for none."""
    return None if chat is None else {"system_prompt": chat.system, "chat_template_kwargs": dict(chat.template_kwargs)}


def load_generated(path, model_id, decoding, chat=None):
    """{json.dumps(question_id): record} of the answers already in ``generate``'s output file.

    An answer made by another model_id, with other decoding settings or another prompt framing (chat: the
    ChatOptions) is an error (naming file and line), so that one file never mixes two runs.
    """
    done, settings = {}, asdict(decoding)
    for key, (where, record) in _unique_ids(appended_rows(path, "that question is answered again")).items():
        made = record.get("decoding")
        made = {"choices": 1, **made} if isinstance(made, dict) else made  # a file from before --num_choices
        for field, found, expected in (("model_id", record.get("model_id"), model_id), ("decoding", made, settings),
                                       ("chat", record.get("chat"), chat_record(chat))):
            if found != expected:
                raise EvalError(f"{where}: answer made with {field} {found!r}, not {expected!r}; "
                                f"use another --out")
        done[key] = record
    return done


def generate_answers(model, tokenizer, questions, decoding, model_id, out_path=None, progress=False, chat=None):
    """FastChat-layout answer records for the questions, and how many turns had their new tokens capped.

    Each record: {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}],
    "tstamp", "decoding": {...}[, "chat": chat_record(chat)]}. out_path: each record is appended to this JSONL as
    soon as its question
    is answered, and questions already answered there (``load_generated``) are not asked again, so a
    rerun resumes where an interrupted one stopped. chat: data.ChatOptions of the prompts. Returns (records in
    question order, capped turns).
    """
    done = load_generated(out_path, model_id, decoding, chat) if out_path else {}
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)  # FastChat's model_answer/
    todo = [q for q in questions if json.dumps(q["question_id"]) not in done]
    capped = 0
    bar = common.Progress(len(todo), f"generating ({model_id})", "questions", enabled=progress)
    with open(out_path, "a", encoding="utf-8") if out_path else contextlib.nullcontext() as out:
        for q in bar.iterate(todo):
            try:
                choices = answer_choices(model, tokenizer, q["turns"], decoding,
                                         question_seed(decoding.seed, q["question_id"]), q.get("data_prompt"), chat)
            except EvalError as e:
                raise EvalError(f"question {json.dumps(q['question_id'])}: {e}") from None
            capped += sum(cap < decoding.max_new_tokens for _, caps in choices for cap in caps)
            record = {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                      "choices": [{"index": i, "turns": turns} for i, (turns, _) in enumerate(choices)],
                      "tstamp": time.time(),
                      "decoding": asdict(decoding), **({"chat": chat_record(chat)} if chat else {})}
            if out is not None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
            done[json.dumps(q["question_id"])] = record
    return [done[json.dumps(q["question_id"])] for q in questions], capped
