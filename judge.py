"""judge.py: MT-Bench-style pairwise judging, nothing Sr-specific.

Owns: question and answer files (FastChat layout), answer generation, judge prompts, verdict parsing and
the both-orders rule (the paper's footnote 2), an OpenAI-compatible HTTP judge and a local-LM judge, the
resumable run over all games, the exact judge (a true score as a perfect judge) and Table 2's layout.
Does not own: the command line (evaluate.py), preference accuracy and Δπ (metrics.py), or models.py.
"""

import hashlib
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import data
from metrics import EvalError
from models import model_device

# ----------------------------------------------------------------------------------------------
# Questions and answers: JSONL in
# ----------------------------------------------------------------------------------------------

def read_jsonl(path):
    """[(where "FILE:LINE", record dict)] of a JSONL file (``data.read_records``: also .json, .gz)."""
    rows = []
    for where, record in data.read_records(os.fspath(path)):
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rows.append((where, record))
    return rows


def _field(where, record, name, kind):
    """record[name], checked to be of type ``kind``; a one-line error naming file, line and field."""
    if name not in record:
        raise EvalError(f"{where}: field '{name}' missing; fields present: {sorted(record)}")
    value = record[name]
    if not isinstance(value, kind):
        raise EvalError(f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _turns(where, value, name):
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
    ``data.embedded_pairs(split)``, numbered from 0 in order of first appearance.
    """
    if spec == "embedded":
        return embedded_questions(split)
    questions = [dict(record, turns=_turns(where, _field(where, record, "turns", list), "turns"))
                 for where, record in _unique_ids(read_jsonl(spec)).values()]
    if not questions:
        raise EvalError(f"{spec}: no questions")
    return questions


def _prompt_text(prompt):
    """The query text of a data.Pair prompt: itself, or the last user message of a chat."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def embedded_questions(split="test"):
    """The distinct prompts of the embedded dataset's split as single-turn questions."""
    seen = {}
    for pair in data.embedded_pairs(split):
        seen.setdefault(_prompt_text(pair.prompt), len(seen))
    return [{"question_id": qid, "turns": [text]} for text, qid in seen.items()]


@dataclass(frozen=True)
class Answer:
    """One question's answers in an answer file, and where they were read ("FILE:LINE")."""
    model_id: str
    turns: list
    where: str


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
        choices = _field(where, record, "choices", list)
        if not choices or not isinstance(choices[0], dict):
            raise EvalError(f"{where}: field 'choices' must be a non-empty list of objects")
        turns = _turns(where, choices[0].get("turns"), "choices[0].turns")
        answers[key] = Answer(str(record.get("model_id", default_id)), turns, where)
    return answers


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoding:
    """How to decode: greedy when temperature is 0, else sampling with temperature and top_p."""
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_length: int | None = None  # context limit; None: the model's max_position_embeddings


def _context_limit(model, decoding):
    return decoding.max_length or getattr(model.config, "max_position_embeddings", None)


def generate_reply(model, tokenizer, prompt_ids, decoding):
    """The decoded continuation of one prompt (special tokens dropped, outer whitespace stripped).

    Shape: prompt_ids list[int]. A prompt longer than the context limit less max_new_tokens
    keeps its last tokens; returns (text, number of prompt tokens cut).
    """
    limit = _context_limit(model, decoding)
    keep = max(1, limit - decoding.max_new_tokens) if limit else len(prompt_ids)
    cut = max(0, len(prompt_ids) - keep)
    ids = torch.tensor([prompt_ids[cut:]], device=model_device(model))
    sampling = decoding.temperature > 0
    options = dict(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p) \
        if sampling else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=decoding.max_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **options)
    text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return text.strip(), cut


def question_seed(seed, question_id):
    """A per-question seed: answers do not depend on which other questions are in the file."""
    return (seed * 1_000_003 + zlib.crc32(json.dumps(question_id).encode())) % (2 ** 31)


def answer_turns(model, tokenizer, turns, decoding, seed):
    """Answers to a conversation, turn by turn, each given the earlier questions and answers.

    The prompt of each turn is ``data.encode_prompt`` of the chat so far (the tokenizer's chat
    template where it has one). Returns (answers list[str], prompt tokens cut).
    """
    torch.manual_seed(seed)
    messages, answers, cut = (), [], 0
    for question in turns:
        messages += ({"role": "user", "content": question},)
        reply, n_cut = generate_reply(model, tokenizer, data.encode_prompt(messages, tokenizer), decoding)
        messages += ({"role": "assistant", "content": reply},)
        answers.append(reply)
        cut += n_cut
    return answers, cut


def generate_answers(model, tokenizer, questions, decoding, model_id, progress=False):
    """FastChat-layout answer records for the questions, plus the number of prompt tokens cut.

    Each record: {"question_id", "model_id", "choices": [{"index": 0, "turns": [...]}],
    "decoding": {...}}.
    """
    records, cut = [], 0
    bar = data.Progress(len(questions), f"generating ({model_id})", enabled=progress)
    for q in questions:
        answers, n_cut = answer_turns(model, tokenizer, q["turns"], decoding,
                                      question_seed(decoding.seed, q["question_id"]))
        cut += n_cut
        records.append({"question_id": q["question_id"], "model_id": model_id,
                        "choices": [{"index": 0, "turns": answers}], "decoding": asdict(decoding)})
        bar.update()
    bar.close()
    return records, cut


# ----------------------------------------------------------------------------------------------
# judge: verdicts, the both-orders rule, rates
# ----------------------------------------------------------------------------------------------

_MARKER = re.compile(r"\[\[([ABC])\]\]")


def parse_verdict(text):
    """The verdict of a judge's reply: ("A" | "B" | "C", None) or (None, reason).

    Only an explicit [[A]], [[B]] or [[C]] counts. A reply with none, or with two different
    ones, is unparseable: nothing is guessed. The same marker repeated is one verdict.
    """
    found = set(_MARKER.findall(text or ""))
    if len(found) == 1:
        return found.pop(), None
    if not found:
        return None, "no [[A]]/[[B]]/[[C]] marker"
    return None, "conflicting markers " + " ".join(f"[[{m}]]" for m in sorted(found))


# Which model a verdict prefers, by the order the answers were shown in:
# "ab": model_a shown as Assistant A; "ba": model_b shown as Assistant A.
ORDERS = ("ab", "ba")
_PREFERRED = {"ab": {"A": "model_a", "B": "model_b", "C": "tie"},
              "ba": {"A": "model_b", "B": "model_a", "C": "tie"}}


def both_orders(first, second):
    """One game's outcome for model_a from its two verdicts (paper, footnote 2).

    first: verdict with model_a shown as A ("ab"); second: with model_b shown as A ("ba");
    each "A", "B", "C" or None (unparseable). A win (lose) needs model_a (model_b) preferred in
    both orders; any other pair of verdicts is a tie. None when either verdict is unparseable:
    the game is then reported as unparseable, not decided.
    """
    if first is None or second is None:
        return None
    one, two = _PREFERRED["ab"][first], _PREFERRED["ba"][second]
    if one == two == "model_a":
        return "win"
    if one == two == "model_b":
        return "lose"
    return "tie"


OUTCOMES = ("win", "tie", "lose")


def rates(outcomes):
    """Win/tie/lose counts and rates of model_a over decided games (None: unparseable game)."""
    counts = {k: sum(o == k for o in outcomes) for k in OUTCOMES}
    decided = sum(counts.values())
    out = {"games": len(outcomes), "decided": decided, "unparseable": len(outcomes) - decided}
    out.update(counts)
    out.update({f"{k}_rate": counts[k] / decided if decided else math.nan for k in OUTCOMES})
    return out


# ----------------------------------------------------------------------------------------------
# judge: prompts
# ----------------------------------------------------------------------------------------------

_JUDGE_RULES = (
    "Decide which answer serves the user better. Weigh, in this order: is it correct and honest; "
    "does it do what the user asked, helpfully; is it harmless; is it clear and well organised. "
    "Length is no merit in itself: prefer the better answer, not the longer one. The order in "
    "which the answers are shown and the assistants' labels must not influence you. First compare "
    "the two answers in a few sentences. Then end with one verdict marker on its own line: [[A]] if "
    "Assistant A's answer is better, [[B]] if Assistant B's answer is better, [[C]] if neither is "
    "better. Write no other marker of this form.")

BUILTIN_PROMPTS = {
    "srpo-pair": {
        "system_prompt": "You are an impartial judge of two AI assistants' answers to the same user "
                         "question. " + _JUDGE_RULES,
        "prompt_template": "=== User question ===\n{question}\n\n"
                           "=== Answer of Assistant A ===\n{answer_a}\n=== End of Assistant A's answer ===\n\n"
                           "=== Answer of Assistant B ===\n{answer_b}\n=== End of Assistant B's answer ===",
    },
    "srpo-pair-multi-turn": {
        "system_prompt": "You are an impartial judge of two AI assistants, each holding the same "
                         "multi-turn conversation with a user. Judge only their answers to the final "
                         "user question; the earlier turns are context. " + _JUDGE_RULES,
        "prompt_template": "=== Conversation of Assistant A ===\n{conversation_a}\n"
                           "=== End of Assistant A's conversation ===\n\n"
                           "=== Conversation of Assistant B ===\n{conversation_b}\n"
                           "=== End of Assistant B's conversation ===\n\n"
                           "Judge the answers to the final user question (turn {turn}):\n{question}",
    },
}
BUILTIN_NAMES = ("srpo-pair", "srpo-pair-multi-turn")
FASTCHAT_NAMES = ("pair-v2", "pair-v2-multi-turn")  # MT-Bench's judge_prompts.jsonl


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    template: str
    source: str  # where it was read from, for error messages


def load_judge_prompts(path=None, single=None, multi=None):
    """(single-turn prompt, multi-turn prompt or None) by name, built in or from a JSONL file.

    path: None for the built-in prompts, else a JSONL of records with "name", "system_prompt"
    and "prompt_template" (the layout of MT-Bench's judge_prompts.jsonl). single, multi: record
    names; defaults srpo-pair / srpo-pair-multi-turn built in, pair-v2 / pair-v2-multi-turn
    from a file. A multi-turn prompt missing from the file is None (an error only if needed).
    """
    if path is None:
        records, source, defaults = BUILTIN_PROMPTS, "built-in prompts", BUILTIN_NAMES
    else:
        records, source, defaults = {}, path, FASTCHAT_NAMES
        for where, record in read_jsonl(path):
            records[_field(where, record, "name", str)] = {
                k: _field(where, record, k, str) for k in ("system_prompt", "prompt_template")}
    chosen = []
    for name, required in ((single or defaults[0], True), (multi or defaults[1], False)):
        if name not in records:
            if required:
                raise EvalError(f"{source}: no judge prompt named '{name}'; have {sorted(records)}")
            chosen.append(None)
            continue
        rec = records[name]
        chosen.append(JudgePrompt(name, rec["system_prompt"], rec["prompt_template"], source))
    return tuple(chosen)


def _conversation(questions, answers, label):
    return "\n\n".join(f"### User:\n{q}\n\n### Assistant {label}:\n{a}" for q, a in zip(questions, answers))


def prompt_fields(question, shown_a, shown_b, turn):
    """The fields a judge template may use, for the answers to turn ``turn`` (1-based).

    question: the question record (``turns``, optional ``reference`` list); shown_a, shown_b:
    the answers (one per turn) shown as Assistant A and B. Fields: turn, question, answer_a,
    answer_b (this turn); question_i, answer_a_i, answer_b_i, ref_answer_i for i <= turn;
    conversation_a, conversation_b (the turns so far, as "### User:" / "### Assistant X:").
    """
    qs, a, b = question["turns"][:turn], shown_a[:turn], shown_b[:turn]
    fields = {"turn": turn, "question": qs[-1], "answer_a": a[-1], "answer_b": b[-1],
              "conversation_a": _conversation(qs, a, "A"), "conversation_b": _conversation(qs, b, "B")}
    for i in range(turn):
        fields.update({f"question_{i + 1}": qs[i], f"answer_a_{i + 1}": a[i], f"answer_b_{i + 1}": b[i]})
    for i, ref in enumerate(question.get("reference") or []):
        fields[f"ref_answer_{i + 1}"] = ref
    return fields


def render_prompt(prompt, fields):
    """(system, user) texts of a judge prompt filled with ``prompt_fields``."""
    try:
        return prompt.system.format(**fields), prompt.template.format(**fields)
    except KeyError as e:
        raise EvalError(f"{prompt.source}: judge prompt '{prompt.name}' uses {{{e.args[0]}}}, which "
                        f"this question does not provide; fields: {sorted(fields)}") from None
    except (IndexError, ValueError) as e:
        raise EvalError(f"{prompt.source}: judge prompt '{prompt.name}' is not a valid format "
                        f"string ({e})") from None


# ----------------------------------------------------------------------------------------------
# judge: the two kinds of judge, each a function ask(system, user) -> reply text
# ----------------------------------------------------------------------------------------------

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeError(EvalError):
    """The judge could not be asked (after the retries); verdicts so far are kept."""


def _chat_endpoint(url):
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _reply_text(raw):
    """choices[0].message.content of a chat-completions response body ("" when null)."""
    reply = json.loads(raw)
    return reply["choices"][0]["message"]["content"] or ""


def http_judge(url, model, api_key_env=None, max_retries=5, retry_wait=2.0, timeout=120.0,
               max_tokens=2048, sleep=time.sleep, log=None):
    """ask(system, user) -> reply text, from an OpenAI-compatible chat-completions endpoint.

    url: the API base (".../v1") or the full ".../chat/completions" address. model: the
    request's "model". api_key_env: the name of the environment variable holding the key, read
    at each request and sent only as "Authorization: Bearer ..."; unset or empty sends none (a
    local server). temperature 0. A connection fault, timeout, malformed body or HTTP status in
    RETRY_STATUS is retried up to max_retries times, waiting retry_wait·2^k seconds (or the
    server's Retry-After, up to 60 s); other statuses fail at once. Faults raise JudgeError,
    whose message never holds the key.
    """
    endpoint = _chat_endpoint(url)
    log = log or (lambda message: print(message, file=sys.stderr))

    def ask(system, user):
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = "Bearer " + key
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        for attempt in range(max_retries + 1):
            request = urllib.request.Request(endpoint, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return _reply_text(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read(300).decode("utf-8", "replace")
                fault, retry, wait = f"HTTP {e.code}: {detail}", e.code in RETRY_STATUS, e.headers.get("Retry-After")
            except (urllib.error.URLError, OSError) as e:
                fault, retry, wait = f"{type(e).__name__}: {getattr(e, 'reason', e)}", True, None
            except (ValueError, KeyError, IndexError, TypeError) as e:
                fault, retry, wait = f"malformed response ({type(e).__name__}: {e})", True, None
            fault = " ".join(fault.replace(key, "***").split()) if key else " ".join(fault.split())
            if not retry or attempt == max_retries:
                raise JudgeError(f"{endpoint}: {fault} (after {attempt + 1} tries)")
            delay = retry_wait * 2 ** attempt
            if wait and wait.strip().isdigit():
                delay = max(delay, min(60.0, float(wait)))
            log(f"{endpoint}: {fault}; retry {attempt + 1}/{max_retries} in {delay:.1f}s")
            sleep(delay)
        raise AssertionError("unreachable")

    return ask


def chat_prompt_ids(tokenizer, system, user):
    """Token ids of a system + user chat ending in the assistant's turn (``data.encode_prompt``).

    The tokenizer's chat template where it has one, the system text folded into the user message
    when the template refuses a system role; without a template, an HH-style transcript.
    """
    messages = ({"role": "system", "content": system}, {"role": "user", "content": user})
    try:
        return data.encode_prompt(messages, tokenizer)
    except Exception as e:  # jinja's TemplateError; only a refused system role is retried
        if "system" not in str(e).lower():
            raise
    return data.encode_prompt(({"role": "user", "content": f"{system}\n\n{user}"},), tokenizer)


def local_judge(model, tokenizer, max_new_tokens=1024):
    """ask(system, user) -> reply text, greedily decoded by a local causal LM."""
    decoding = Decoding(max_new_tokens=max_new_tokens)

    def ask(system, user):
        return generate_reply(model, tokenizer, chat_prompt_ids(tokenizer, system, user), decoding)[0]

    return ask


# ----------------------------------------------------------------------------------------------
# judge: the resumable run over all games
# ----------------------------------------------------------------------------------------------

IDENTITY = ("model_a", "model_b", "judge")  # a verdict file belongs to one comparison and judge


def answers_hash(turns_a, turns_b):
    """A short SHA-256 of the two answers' texts: a verdict holds only for the answers it judged."""
    text = json.dumps([list(turns_a), list(turns_b)], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _verdict_key(question_id, turn, order, answers):
    return json.dumps(question_id), int(turn), order, answers


def _drop_unfinished_line(path):
    """Cut an unfinished last line (an interrupted write) from a JSONL file; True if cut."""
    raw = Path(path).read_bytes()
    if not raw or raw.endswith(b"\n"):
        return False
    Path(path).write_bytes(raw[:raw.rfind(b"\n") + 1])
    return True


def load_verdicts(path, identity):
    """{(question_id json, turn, order, answers_sha256): record} already in a verdict file (none if absent).

    identity: {"model_a", "model_b", "judge"}; a record made for another comparison or judge is
    an error (naming file and line), so that two comparisons never mix in one file.
    """
    if not os.path.exists(path):
        return {}
    if _drop_unfinished_line(path):
        print(f"{path}: discarded an unfinished last line (an interrupted write); it is asked again",
              file=sys.stderr)
    done = {}
    for where, record in read_jsonl(path):
        for field in IDENTITY:
            if record.get(field) != identity[field]:
                raise EvalError(f"{where}: verdict made with {field} {record.get(field)!r}, "
                                f"not {identity[field]!r}; use another --out")
        key = _verdict_key(record.get("question_id"), _field(where, record, "turn", int),
                           _field(where, record, "order", str), record.get("answers_sha256"))
        done[key] = record
    return done


def answered(questions, answers_a, answers_b):
    """(the questions both answer files answer, {"answers_a": n, "answers_b": n} questions lacking)."""
    both, missing = [], {"answers_a": 0, "answers_b": 0}
    for q in questions:
        key = json.dumps(q["question_id"])
        lacking = [side for side, answers in (("answers_a", answers_a), ("answers_b", answers_b))
                   if key not in answers]
        for side in lacking:
            missing[side] += 1
        if not lacking:
            both.append(q)
    return both, missing


def games(questions, answers_a, answers_b):
    """The games to judge: (question, turn) for each turn of each question answered by both.

    answers_a, answers_b: ``load_answers`` results. Returns (games, missing) with missing from
    ``answered``. An answer with other than one answer per turn is an error.
    """
    both, missing = answered(questions, answers_a, answers_b)
    out = []
    for q in both:
        for answers in (answers_a, answers_b):
            a = answers[json.dumps(q["question_id"])]
            if len(a.turns) != len(q["turns"]):
                raise EvalError(f"{a.where}: {len(a.turns)} answer turns for a question of "
                                f"{len(q['turns'])} turns")
        out += [(q, turn) for turn in range(1, len(q["turns"]) + 1)]
    return out, missing


def judge_games(game_list, answers_a, answers_b, ask, prompts, out_path, identity, progress=False):
    """Ask the judge every (game, order) not yet in ``out_path``; append each verdict as it comes.

    prompts: (single-turn, multi-turn) JudgePrompt; turn 1 uses the first, later turns the second.
    Returns all verdict records of these games, old and new. Each record: question_id, turn,
    order ("ab": model_a shown as A), model_a, model_b, judge, answers_sha256 (``answers_hash`` of
    the two answers: a verdict of other answers, e.g. regenerated under the same model_id, is not
    reused), prompt, verdict ("A"/"B"/"C" or None), preferred ("model_a"/"model_b"/"tie" or None),
    parse_error, judgment (the reply).
    """
    done = load_verdicts(out_path, identity)
    digest = {}  # question id json -> hash of both answers' texts
    for q, _ in game_list:
        qid = json.dumps(q["question_id"])
        digest[qid] = answers_hash(answers_a[qid].turns, answers_b[qid].turns)

    def key(q, turn, order):
        return _verdict_key(q["question_id"], turn, order, digest[json.dumps(q["question_id"])])

    todo = [(q, t, o) for q, t in game_list for o in ORDERS if key(q, t, o) not in done]
    judged = {k[:3] for k in done}
    stale = sum(key(q, t, o)[:3] in judged for q, t, o in todo)
    if stale:
        print(f"{out_path}: {stale} verdicts were made for other answers (changed since); they are judged again",
              file=sys.stderr)
    if any(t > 1 for _, t, _ in todo) and prompts[1] is None:
        raise EvalError(f"{prompts[0].source}: no multi-turn judge prompt for the questions of "
                        f"more than one turn (--prompt_multi)")
    bar = data.Progress(len(todo), "judging", enabled=progress)
    with open(out_path, "a", encoding="utf-8") as out:
        for q, turn, order in todo:
            qid = json.dumps(q["question_id"])
            first, second = answers_a[qid].turns, answers_b[qid].turns
            shown = (first, second) if order == "ab" else (second, first)
            prompt = prompts[0] if turn == 1 else prompts[1]
            reply = ask(*render_prompt(prompt, prompt_fields(q, *shown, turn)))
            verdict, error = parse_verdict(reply)
            record = {"question_id": q["question_id"], "turn": turn, "order": order, **identity,
                      "answers_sha256": digest[qid], "prompt": prompt.name, "verdict": verdict,
                      "preferred": _PREFERRED[order].get(verdict), "parse_error": error,
                      "judgment": reply}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            done[key(q, turn, order)] = record
            bar.update()
    bar.close()
    return [done[key(q, t, o)] for q, t in game_list for o in ORDERS]


def judge_summary(records, identity, benchmark, missing=None):
    """Table 2's numbers from verdict records: overall and per turn, by the both-orders rule."""
    by_game = {}
    for r in records:
        by_game.setdefault((json.dumps(r["question_id"]), r["turn"]), {})[r["order"]] = r["verdict"]
    outcomes = {game: both_orders(v.get("ab"), v.get("ba")) for game, v in by_game.items()}
    turns = sorted({turn for _, turn in outcomes})
    return {"benchmark": benchmark, **identity, **rates(list(outcomes.values())),
            "per_turn": {str(t): rates([o for (_, turn), o in outcomes.items() if turn == t]) for t in turns},
            "replies": len(records), "unparseable_replies": sum(r["verdict"] is None for r in records),
            "missing_answers": missing or {}}


# ----------------------------------------------------------------------------------------------
# exact: the embedded dataset's true score as a perfect judge
# ----------------------------------------------------------------------------------------------

def exact_records(questions, answers_a, answers_b, score):
    """Per-question verdicts of a perfect judge, and the count of questions an answer file lacks.

    score(question_text, answer_text) -> float (``data.embedded_score``). model_a wins a
    question when its answer scores higher, loses when lower, ties when equal. Single-turn
    questions only. Returns (records [{question_id, score_a, score_b, outcome}], missing).
    """
    records = []
    both, missing = answered(questions, answers_a, answers_b)
    for q in both:
        key = json.dumps(q["question_id"])
        if len(q["turns"]) != 1:
            raise EvalError(f"question {key}: exact judges single-turn questions; it has {len(q['turns'])}")
        sa, sb = (score(q["turns"][0], answers[key].turns[0]) for answers in (answers_a, answers_b))
        outcome = "win" if sa > sb else "lose" if sa < sb else "tie"
        records.append({"question_id": q["question_id"], "score_a": sa, "score_b": sb, "outcome": outcome})
    return records, missing


def exact_summary(records, identity, benchmark, missing):
    """Table 2's numbers from ``exact_records``, with the mean true score of each side."""
    return {"benchmark": benchmark, **identity, **rates([r["outcome"] for r in records]),
            "score_a_mean": float(np.mean([r["score_a"] for r in records])) if records else math.nan,
            "score_b_mean": float(np.mean([r["score_b"] for r in records])) if records else math.nan,
            "missing_answers": missing}


# ----------------------------------------------------------------------------------------------
# Tables for people
# ----------------------------------------------------------------------------------------------

def format_table(summaries):
    """Table 2's layout: one row per comparison "A vs B", Win/Tie/Lose Rate per benchmark.

    summaries: ``judge_summary`` / ``exact_summary`` dicts. Notes below the table name every
    cell with undecided (unparseable) games or missing answers.
    """
    benches = list(dict.fromkeys(s["benchmark"] for s in summaries))
    rows = list(dict.fromkeys(f"{s['model_a']} vs {s['model_b']}" for s in summaries))
    cells = {}
    for s in summaries:
        cell = (f"{s['model_a']} vs {s['model_b']}", s["benchmark"])
        if cell in cells:
            raise EvalError(f"two results for {cell[0]} on {cell[1]}")
        cells[cell] = s
    width = max([len(r) for r in rows] + [10])
    group = " ".join(f"{'Win Rate':>9} {'Tie Rate':>9} {'Lose Rate':>9}" for _ in benches)
    lines = [" " * width + "  " + " ".join(f"{b[:29]:^29}" for b in benches), " " * width + "  " + group]
    for row in rows:
        parts = []
        for b in benches:
            s = cells.get((row, b), {})
            parts.append(" ".join(f"{data.pct(s.get(k + '_rate'), digits=2):>9}" for k in OUTCOMES))
        lines.append(f"{row:<{width}}  " + " ".join(parts))
    for (row, b), s in cells.items():
        lacking = {k: v for k, v in s.get("missing_answers", {}).items() if v}
        if s["unparseable"] or lacking:
            lines.append(f"note: {row} on {b}: {s['decided']} of {s['games']} games decided "
                         f"({s['unparseable']} with an unparseable verdict); questions unanswered: "
                         f"{lacking or 'none'}")
    return "\n".join(lines)
