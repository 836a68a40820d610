"""mtbench/judge.py: MT-Bench-style pairwise judging, nothing Sr-specific.

Owns: verdict parsing and the both-orders rule (the paper's footnote 2), loading and filling judge prompts
(their texts: judge_prompts.py), an OpenAI-compatible HTTP judge and a local-LM judge, the resumable run over
all games, FastChat's judgment layout, the exact judge (a true score as a perfect judge) and Table 2's layout.
Does not own: question and answer files or generation (answers.py), the command line (evaluate.py),
preference accuracy and Δπ (training/metrics.py), or training/models.py.
"""

import hashlib
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

import data
from base import common, defaults
from base.common import EvalError
from mtbench import answers, judge_prompts

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
# judge: prompts (their texts: judge_prompts.py)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    template: str
    source: str  # where it was read from, for error messages


def load_judge_prompts(path=None, single=None, multi=None, math=False):
    """(single-turn prompt, multi-turn prompt or None) by name, built in or from a JSONL file.

    path: None for the built-in prompts, else a JSONL of records with "name", "system_prompt"
    and "prompt_template" (the layout of MT-Bench's judge_prompts.jsonl). single, multi: record
    names; defaults srpo-pair / srpo-pair-multi-turn built in, pair-v2 / pair-v2-multi-turn
    from a file, and with math (the prompts shown a reference answer) srpo-pair-math /
    srpo-pair-math-multi-turn built in, pair-math-v1 / pair-math-v1-multi-turn from a file.
    A multi-turn prompt missing from the file is None (an error only if needed).
    """
    if path is None:
        records, source = judge_prompts.BUILTIN_PROMPTS, "built-in prompts"
        names = judge_prompts.BUILTIN_MATH_NAMES if math else judge_prompts.BUILTIN_NAMES
    else:
        records, source = {}, path
        names = judge_prompts.FASTCHAT_MATH_NAMES if math else judge_prompts.FASTCHAT_NAMES
        for where, record in answers.read_jsonl(path):
            records[answers.field(record, "name", where, str)] = {
                k: answers.field(record, k, where, str) for k in ("system_prompt", "prompt_template")}
    chosen = []
    for name, required in ((single or names[0], True), (multi or names[1], False)):
        if name not in records:
            if required:
                raise EvalError(f"{source}: no judge prompt named '{name}'; have {sorted(records)}")
            chosen.append(None)
            continue
        rec = records[name]
        chosen.append(JudgePrompt(name, rec["system_prompt"], rec["prompt_template"], source))
    return tuple(chosen)


def _conversation(questions, replies, label):
    return "\n\n".join(f"### User:\n{q}\n\n### Assistant {label}:\n{a}" for q, a in zip(questions, replies))


def prompt_fields(question, shown_a, shown_b, turn):
    """The fields a judge template may use, for the answers to turn ``turn`` (1-based).

    question: the question record (``turns``, optional ``reference`` list); shown_a, shown_b:
    the answers (one per turn) shown as Assistant A and B. Fields: turn, question, answer_a,
    answer_b (this turn); question_i, answer_a_i, answer_b_i, ref_answer_i for i <= turn;
    ref_answer (this turn's reference answer); conversation_a, conversation_b (the turns so far,
    as "### User:" / "### Assistant X:").
    """
    qs, a, b = question["turns"][:turn], shown_a[:turn], shown_b[:turn]
    fields = {"turn": turn, "question": qs[-1], "answer_a": a[-1], "answer_b": b[-1],
              "conversation_a": _conversation(qs, a, "A"), "conversation_b": _conversation(qs, b, "B")}
    for i in range(turn):
        fields.update({f"question_{i + 1}": qs[i], f"answer_a_{i + 1}": a[i], f"answer_b_{i + 1}": b[i]})
    for i, ref in enumerate(question.get("reference") or []):
        fields[f"ref_answer_{i + 1}"] = ref
    if turn <= len(question.get("reference") or []):
        fields["ref_answer"] = question["reference"][turn - 1]
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


class _ContentError(Exception):
    """A well-formed reply whose content is no text: asking again would not help."""


def _reply_text(raw):
    """choices[0].message.content of a chat-completions response body ("" when null): a string, or
    the concatenated "text" of a list of parts (OpenAI's multi-part form, other parts skipped)."""
    content = json.loads(raw)["choices"][0]["message"]["content"]
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = [part.get("text") for part in content if part.get("type", "text") == "text"]
        if all(isinstance(text, str) for text in texts):
            return "".join(texts)
    raise _ContentError(f"the reply's content is {type(content).__name__} {json.dumps(content)[:80]}, "
                        "not text or a list of text parts")


def http_judge(url, model, api_key_env=None, max_retries=5, retry_wait=2.0, timeout=120.0,
               max_tokens=defaults.JUDGE_MAX_TOKENS, sleep=time.sleep, log=None):
    """ask(system, user) -> reply text, from an OpenAI-compatible chat-completions endpoint.

    url: the API base (".../v1") or the full ".../chat/completions" address. model: the
    request's "model". api_key_env: the name of the environment variable holding the key, read
    at each request and sent only as "Authorization: Bearer ..."; unset or empty sends none (a
    local server). temperature 0. A connection fault (also http.client's, e.g. a bad status line or
    a cut body), timeout, malformed body or HTTP status in
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
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # BadStatusLine, IncompleteRead
                fault, retry, wait = f"{type(e).__name__}: {getattr(e, 'reason', e)}", True, None
            except _ContentError as e:
                fault, retry, wait = str(e), False, None
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


def local_judge(model, tokenizer, max_new_tokens=defaults.JUDGE_MAX_TOKENS):
    """ask(system, user) -> reply text, greedily decoded by a local causal LM."""
    decoding = answers.Decoding(max_new_tokens=max_new_tokens)

    def ask(system, user):
        return answers.generate_reply(model, tokenizer, chat_prompt_ids(tokenizer, system, user), decoding)[0]

    return ask


# ----------------------------------------------------------------------------------------------
# judge: the resumable run over all games
# ----------------------------------------------------------------------------------------------

IDENTITY = ("model_a", "model_b", "judge")  # a verdict file belongs to one comparison and judge


def answers_hash(turns_a, turns_b):
    """A short SHA-256 of the two answers' texts: a verdict holds only for the answers it judged."""
    text = json.dumps([list(turns_a), list(turns_b)], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _verdict_key(question_id, turn, order, digest):
    return json.dumps(question_id), int(turn), order, digest


def load_verdicts(path, identity):
    """{(question_id json, turn, order, answers_sha256): record} already in a verdict file (none if absent).

    identity: {"model_a", "model_b", "judge"}; a record made for another comparison or judge is
    an error (naming file and line), so that two comparisons never mix in one file.
    """
    done = {}
    for where, record in answers.appended_rows(path, "it is asked again"):
        for field in IDENTITY:
            if record.get(field) != identity[field]:
                raise EvalError(f"{where}: verdict made with {field} {record.get(field)!r}, "
                                f"not {identity[field]!r}; use another --out")
        key = _verdict_key(record.get("question_id"), answers.field(record, "turn", where, int),
                           answers.field(record, "order", where, str), record.get("answers_sha256"))
        done[key] = record
    return done


def answered(questions, answers_a, answers_b):
    """(the questions both answer files answer, {"answers_a": n, "answers_b": n} questions lacking)."""
    both, missing = [], {"answers_a": 0, "answers_b": 0}
    for q in questions:
        key = json.dumps(q["question_id"])
        lacking = [side for side, given in (("answers_a", answers_a), ("answers_b", answers_b))
                   if key not in given]
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
        for given in (answers_a, answers_b):
            a = given[json.dumps(q["question_id"])]
            if len(a.turns) != len(q["turns"]):
                raise EvalError(f"{a.where}: {len(a.turns)} answer turns for a question of "
                                f"{len(q['turns'])} turns")
        out += [(q, turn) for turn in range(1, len(q["turns"]) + 1)]
    return out, missing


def with_references(questions, references, source):
    """The questions, those of a NEED_REF_CATS category given their reference answers ("reference").

    references: ``load_answers`` of a reference-answer file (FastChat's reference_answer/gpt-4.jsonl
    layout); source names it in errors. A question of such a category without a reference is an error.
    """
    out = []
    for q in questions:
        if q.get("category") in judge_prompts.NEED_REF_CATS:
            ref = references.get(json.dumps(q["question_id"]))
            if ref is None:
                raise EvalError(f"{source}: no reference answer to question {json.dumps(q['question_id'])} "
                                f"(category {q['category']})")
            q = dict(q, reference=ref.turns)
        out.append(q)
    return out


def game_prompt(question, turn, prompts, math_prompts=None):
    """The judge prompt of one game: with math_prompts, those for a question of a NEED_REF_CATS category
    (FastChat's choice by category); else prompts. Each is (single-turn, multi-turn); turn 1 uses the first."""
    chosen = math_prompts if math_prompts and question.get("category") in judge_prompts.NEED_REF_CATS else prompts
    prompt = chosen[0] if turn == 1 else chosen[1]
    if prompt is None:
        raise EvalError(f"{chosen[0].source}: no multi-turn judge prompt for question "
                        f"{json.dumps(question['question_id'])} of {len(question['turns'])} turns (--prompt_multi)")
    return prompt


def judge_games(game_list, answers_a, answers_b, ask, prompts, out_path, identity, progress=False,
                math_prompts=None):
    """Ask the judge every (game, order) not yet in ``out_path``; append each verdict as it comes.

    prompts, math_prompts: (single-turn, multi-turn) JudgePrompt, chosen per game by ``game_prompt``.
    Returns all verdict records of these games, old and new. Each record: question_id, turn,
    order ("ab": model_a shown as A), model_a, model_b, judge, answers_sha256 (``answers_hash`` of
    the two answers: a verdict of other answers, e.g. regenerated under the same model_id, is not
    reused), prompt, verdict ("A"/"B"/"C" or None), preferred ("model_a"/"model_b"/"tie" or None),
    parse_error, judgment (the reply), user_prompt (what the judge was shown), tstamp.
    """
    done = load_verdicts(out_path, identity)
    digest = {}  # question id json -> hash of both answers' texts
    for q, _ in game_list:
        qid = json.dumps(q["question_id"])
        digest[qid] = answers_hash(answers_a[qid].turns, answers_b[qid].turns)

    def key(q, turn, order):
        return _verdict_key(q["question_id"], turn, order, digest[json.dumps(q["question_id"])])

    todo = [(q, t, o, game_prompt(q, t, prompts, math_prompts)) for q, t in game_list for o in ORDERS
            if key(q, t, o) not in done]
    judged = {k[:3] for k in done}
    stale = sum(key(q, t, o)[:3] in judged for q, t, o, _ in todo)
    if stale:
        print(f"{out_path}: {stale} verdicts were made for other answers (changed since); they are judged again",
              file=sys.stderr)
    bar = common.Progress(len(todo), "judging", "verdicts", enabled=progress)
    with open(out_path, "a", encoding="utf-8") as out:
        for q, turn, order, prompt in bar.iterate(todo):
            qid = json.dumps(q["question_id"])
            first, second = answers_a[qid].turns, answers_b[qid].turns
            shown = (first, second) if order == "ab" else (second, first)
            system, user = render_prompt(prompt, prompt_fields(q, *shown, turn))
            try:
                reply = ask(system, user)
            except JudgeError as e:
                raise JudgeError(f"{e}; question {qid}, turn {turn}, order {order}") from None
            verdict, error = parse_verdict(reply)
            record = {"question_id": q["question_id"], "turn": turn, "order": order, **identity,
                      "answers_sha256": digest[qid], "prompt": prompt.name, "verdict": verdict,
                      "preferred": _PREFERRED[order].get(verdict), "parse_error": error,
                      "judgment": reply, "user_prompt": user, "tstamp": time.time()}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            done[key(q, turn, order)] = record
    return [done[key(q, t, o)] for q, t in game_list for o in ORDERS]


_FASTCHAT_WINNER = {"model_a": "model_1", "model_b": "model_2", "tie": "tie", None: "error"}


def fastchat_judgments(records):
    """Verdict records as FastChat's pairwise judgment rows (model_judgment/<judge>_pair.jsonl), one per
    game judged in both orders: question_id, model_1 (model_a), model_2, g1_winner (model_a shown
    first), g2_winner (model_b shown first), each "model_1" | "model_2" | "tie" | "error" (unparseable),
    judge [judge, prompt name], g1/g2_user_prompt, g1/g2_judgment, turn, tstamp. show_result.py
    --mode pairwise-all reads them; it leaves out games with an "error" and counts orders that
    disagree as a tie, as ``both_orders`` does."""
    by_game = {}
    for r in records:
        by_game.setdefault((json.dumps(r["question_id"]), r["turn"]), {})[r["order"]] = r
    rows = []
    for g in by_game.values():
        if set(g) != set(ORDERS):
            continue
        g1, g2 = g["ab"], g["ba"]
        rows.append({"question_id": g1["question_id"], "model_1": g1["model_a"], "model_2": g1["model_b"],
                     "g1_winner": _FASTCHAT_WINNER[g1["preferred"]], "g2_winner": _FASTCHAT_WINNER[g2["preferred"]],
                     "judge": [g1["judge"], g1["prompt"]], "g1_user_prompt": g1.get("user_prompt", ""),
                     "g1_judgment": g1["judgment"], "g2_user_prompt": g2.get("user_prompt", ""),
                     "g2_judgment": g2["judgment"], "turn": g1["turn"],
                     "tstamp": max(g1.get("tstamp", 0.0), g2.get("tstamp", 0.0))})
    return rows


def write_fastchat_judgments(path, rows):
    """Merge rows into a FastChat judgment file: a row replaces the one of the same game, comparison and
    judge; the file's other rows (other comparisons) are kept. Written whole, atomically."""
    def key(row):
        return (json.dumps(row.get("question_id")), row.get("turn"), row.get("model_1"), row.get("model_2"),
                (row.get("judge") or [None])[0])

    new = {key(r) for r in rows}
    kept = [r for _, r in answers.appended_rows(path, "it is written again")]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # FastChat's model_judgment/
    common.write_jsonl(path, [r for r in kept if key(r) not in new] + rows)  # atomic: a temporary file, renamed


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

    score(question_text, answer_text) -> float (``embedded.embedded_score``). model_a wins a
    question when its answer scores higher, loses when lower, ties when equal. Single-turn
    questions only. Returns (records [{question_id, score_a, score_b, outcome}], missing).
    """
    records = []
    both, missing = answered(questions, answers_a, answers_b)
    for q in both:
        key = json.dumps(q["question_id"])
        if len(q["turns"]) != 1:
            raise EvalError(f"question {key}: exact judges single-turn questions; it has {len(q['turns'])}")
        sa, sb = (score(q["turns"][0], given[key].turns[0]) for given in (answers_a, answers_b))
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
            parts.append(" ".join(f"{common.pct(s.get(k + '_rate'), digits=2):>9}" for k in OUTCOMES))
        lines.append(f"{row:<{width}}  " + " ".join(parts))
    for (row, b), s in cells.items():
        lacking = {k: v for k, v in s.get("missing_answers", {}).items() if v}
        if s["unparseable"] or lacking:
            lines.append(f"note: {row} on {b}: {s['decided']} of {s['games']} games decided "
                         f"({s['unparseable']} with an unparseable verdict); questions unanswered: "
                         f"{lacking or 'none'}")
    return "\n".join(lines)
