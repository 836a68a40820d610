"""evaluate.py: what the paper measures, as commands and as importable functions.

Commands (``python evaluate.py COMMAND --help`` for every option):
    accuracy  preference accuracy and reward margins under x and p ⊕ x, Δπ, and, where the data
              has scores, how well Δπ ranks pairs by their true score gap (Section 4.1, Figure 1,
              Corollary 3.3.1). One JSON document, plus a short table.
    generate  answers of a model to MT-Bench/Vicuna-Bench style questions (JSONL with
              ``question_id`` and ``turns``), turn by turn; greedy or seeded sampling.
    judge     win/tie/lose rates of two answer files under an LLM judge (a local causal LM or an
              OpenAI-compatible endpoint), each game judged in both answer orders (Table 2,
              footnote 2). Resumable; every verdict kept in a JSONL.
    exact     the same rates on the embedded dataset with its true score as a perfect judge.
    table     Table 2's layout from summaries written by ``judge`` and ``exact``.

Importable (train.py, experiments/):
    pair_logps(policy, ref, examples, pad_token_id, batch_size=8, progress=False) -> dict[str, Tensor]
    pair_metrics(logps, beta, score_chosen=None, score_rejected=None) -> dict[str, float]
    spearman(x, y), kendall_tau_b(x, y), concordance(x, y) -> float
    parse_verdict(text) -> (verdict | None, reason)
    both_orders(first, second) -> "win" | "tie" | "lose" | None
    rates(outcomes) -> dict
"""

import argparse
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
import train
from srpo import REFINE_PROMPTS, implicit_reward


class EvalError(ValueError):
    """Bad input or an unrecoverable fault, in one line that names the file (and line) at fault."""


# ----------------------------------------------------------------------------------------------
# Rank statistics (numpy, float64). Pure functions of two equally long 1-D sequences.
# ----------------------------------------------------------------------------------------------

def _vector(x):
    """A float64 numpy copy of a 1-D tensor, array or list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _ranks(x):
    """1-based ranks, ties given the mean of the ranks they span. Shape: x [n] -> [n]."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def _pearson(x, y):
    """Pearson correlation; nan when either side is constant or n < 2. Shape: x [n], y [n]."""
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denom if denom > 0 else math.nan


def spearman(x, y):
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks. Shape: x [n], y [n]."""
    x, y = _vector(x), _vector(y)
    return _pearson(_ranks(x), _ranks(y))


def _sign_counts(x, y, budget=1 << 22):
    """Counts over the n(n-1)/2 unordered pairs {i, j} of positions.

    Shape: x [n], y [n] float64. Works in row blocks of about ``budget`` comparisons.
    Returns dict: concordant (x and y order i, j the same way), discordant (opposite ways),
    tied_x (x tied, y not), tied_y (y tied, x not), tied_both.
    """
    n = len(x)
    counts = dict.fromkeys(("concordant", "discordant", "tied_x", "tied_y", "tied_both"), 0)
    step = max(1, budget // max(n, 1))
    for a in range(0, n, step):
        rows = np.arange(a, min(a + step, n))
        upper = np.arange(n)[None, :] > rows[:, None]  # each unordered pair once
        sx = np.sign(x[None, :] - x[rows, None])[upper]
        sy = np.sign(y[None, :] - y[rows, None])[upper]
        counts["concordant"] += int((sx * sy > 0).sum())
        counts["discordant"] += int((sx * sy < 0).sum())
        counts["tied_x"] += int(((sx == 0) & (sy != 0)).sum())
        counts["tied_y"] += int(((sx != 0) & (sy == 0)).sum())
        counts["tied_both"] += int(((sx == 0) & (sy == 0)).sum())
    return counts


def kendall_tau_b(x, y):
    """Kendall's τ_b = (C - D) / sqrt((C + D + T_y)(C + D + T_x)); nan when a side is constant.

    C, D: concordant and discordant pairs; T_x (T_y): pairs tied in x only (y only).
    Shape: x [n], y [n].
    """
    c = _sign_counts(_vector(x), _vector(y))
    untied_x = c["concordant"] + c["discordant"] + c["tied_y"]
    untied_y = c["concordant"] + c["discordant"] + c["tied_x"]
    denom = math.sqrt(untied_x * untied_y)
    return (c["concordant"] - c["discordant"]) / denom if denom > 0 else math.nan


def concordance(x, y):
    """Pairwise ranking accuracy of x against the truth y (Harrell's C).

    Over all pairs {i, j} whose y differ, the share in which x orders i and j as y does;
    a tie in x counts one half. 1 is a perfect ranking, 0.5 chance, 0 exactly reversed; nan when
    every y is equal. Shape: x [n] (predicted, e.g. Δπ), y [n] (truth, e.g. the true score gap).
    """
    c = _sign_counts(_vector(x), _vector(y))
    comparable = c["concordant"] + c["discordant"] + c["tied_x"]
    return (c["concordant"] + 0.5 * c["tied_x"]) / comparable if comparable else math.nan


# ----------------------------------------------------------------------------------------------
# Preference accuracy, margins and Δπ (Sections 3.2 and 4.1)
# ----------------------------------------------------------------------------------------------

LOGP_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
P_PREFIX = "p_"  # the same four keys measured under p ⊕ x


def _mean(t):
    return float(t.mean()) if t.numel() else math.nan


def _std(t):
    """Sample standard deviation (n - 1); nan for fewer than two values."""
    return float(t.std()) if t.numel() > 1 else math.nan


def _rewards(logps, beta, prefix):
    """Implicit rewards of one view (x, or p ⊕ x with prefix "p_"), float64 on the CPU.

    Shape: logps[prefix + key] [B] float for key in LOGP_KEYS.
    Returns (chosen [B], rejected [B], margin [B]); the margin is Δ_naive (Eq. 10) under x and
    Δπ (Eq. 11) under p ⊕ x.
    """
    pc, pr, rc, rr = (_as_float64(logps[prefix + k]) for k in LOGP_KEYS)
    chosen = implicit_reward(pc, rc, beta)  # Eq. (4); c(x) cancels in the margin
    rejected = implicit_reward(pr, rr, beta)
    return chosen, rejected, chosen - rejected  # Eqs. (10) and (11)


def _view_metrics(logps, beta, prefix):
    """Accuracy and implicit rewards of one view (x, or p ⊕ x with prefix "p_").

    Shape: logps[prefix + key] [B] float for key in LOGP_KEYS.
    Returns (metrics dict with keys prefixed, margin [B] float64).
    """
    chosen, rejected, margin = _rewards(logps, beta, prefix)
    metrics = {
        "accuracy": _mean((margin > 0).double()),
        "tie_rate": _mean((margin == 0).double()),
        "reward_chosen_mean": _mean(chosen),
        "reward_rejected_mean": _mean(rejected),
    }
    return {prefix + k: v for k, v in metrics.items()}, margin


def _ranking_metrics(delta, gap, prefix):
    """Spearman, Kendall τ_b and concordance of a refinement against the true score gap.

    Shape: delta [n] float64, gap [n] float64 (scored pairs only).
    """
    return {
        prefix + "spearman": spearman(delta, gap),
        prefix + "kendall_tau_b": kendall_tau_b(delta, gap),
        prefix + "concordance": concordance(delta, gap),
    }


def pair_metrics(logps, beta, score_chosen=None, score_rejected=None):
    """All per-dataset numbers of ``accuracy`` from per-pair log-probs. Pure; no model involved.

    Shape: logps["policy_chosen"], ["policy_rejected"], ["ref_chosen"], ["ref_rejected"] [B]:
           log π(y+|x), log π(y-|x), log π_ref(y+|x), log π_ref(y-|x) (summed token log-probs).
    Shape: optional logps["p_policy_chosen"], ... (the same four under p ⊕ x) [B].
    Shape: beta float (β of Eq. 4). Other keys of ``logps`` are ignored.
    Shape: score_chosen, score_rejected [B] float true scores, nan where unknown; or None.

    Returns a flat dict of floats (nan where undefined), keys:
        n_pairs
        accuracy              share of pairs with r(y+|x) > r(y-|x) (strictly; Section 4.1)
        tie_rate              share with r(y+|x) == r(y-|x) (e.g. policy == reference)
        margin_mean, margin_std   r(y+|x) - r(y-|x) = Δ_naive, Eq. (10); std uses n - 1
        reward_chosen_mean, reward_rejected_mean   β·log π/π_ref of y+ and y- under x, Eq. (4)
      with the p ⊕ x view:
        p_accuracy, p_tie_rate, p_reward_chosen_mean, p_reward_rejected_mean   as above
        delta_mean, delta_std     Δπ, Eq. (11): the reward margin under p ⊕ x
        sign_agreement            share of pairs ranked the same way (y+ above y-, or not)
                                  under x and under p ⊕ x: Assumption 3.2 pair by pair
      with scores (pairs where both are known; the others counted in n_unscored):
        n_scored, n_unscored, gap_mean (mean true gap s(y+) - s(y-))
        spearman, kendall_tau_b, concordance   of Δπ against the true gap; concordance is the
            accuracy of Δπ's ranking of pairs by informativeness: over all pairs of pairs whose
            true gaps differ, the share that Δπ orders as the gaps do (a tie in Δπ counts 1/2);
            Corollary 3.3.1 predicts it above 0.5
        naive_spearman, naive_kendall_tau_b, naive_concordance   the same for Δ_naive (Eq. 10)
    """
    missing = [k for k in LOGP_KEYS if k not in logps]
    if missing:
        raise EvalError(f"pair_metrics: logps lacks {missing}; expected keys {list(LOGP_KEYS)}")
    out = {"n_pairs": int(logps["policy_chosen"].numel())}
    x_metrics, naive = _view_metrics(logps, beta, "")
    out.update(x_metrics)
    out["margin_mean"], out["margin_std"] = _mean(naive), _std(naive)
    delta = None
    if _has_p_view(logps):
        p_metrics, delta = _view_metrics(logps, beta, P_PREFIX)
        out.update(p_metrics)
        out["delta_mean"], out["delta_std"] = _mean(delta), _std(delta)
        out["sign_agreement"] = _mean(((naive > 0) == (delta > 0)).double())
    if score_chosen is not None and score_rejected is not None:
        gap = (_as_float64(score_chosen) - _as_float64(score_rejected))
        scored = torch.isfinite(gap)
        out["n_scored"], out["n_unscored"] = int(scored.sum()), int((~scored).sum())
        out["gap_mean"] = _mean(gap[scored])
        if delta is not None:
            out.update(_ranking_metrics(delta[scored], gap[scored], ""))
        out.update(_ranking_metrics(naive[scored], gap[scored], "naive_"))
    return out


def _as_float64(t):
    return torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)


def _has_p_view(logps):
    return all(P_PREFIX + k in logps for k in LOGP_KEYS)


# ----------------------------------------------------------------------------------------------
# Running the models over tokenized pairs
# ----------------------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: redrawn in place on a terminal (at most every 0.5 s), else one
    line every 30 s, so that logs stay short."""

    def __init__(self, total, label, enabled=True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.5 if self.tty else 30.0
        self.done, self.start, self.drawn = 0, time.monotonic(), None

    def update(self, n=1):
        self.done += n
        now = time.monotonic()
        due = self.drawn is None or now - self.drawn >= self.every or self.done >= self.total
        if self.enabled and due:
            self.drawn = now
            bar = "#" * int(30 * self.done / self.total) if self.total else ""
            line = f"{self.label} [{bar:<30}] {self.done}/{self.total} {now - self.start:.0f}s"
            self.stream.write("\r" + line if self.tty else line + "\n")
            self.stream.flush()

    def close(self):
        if self.enabled and self.tty and self.drawn is not None:
            self.stream.write("\n")
            self.stream.flush()


def _device(model):
    return next(model.parameters()).device


def _rows_logps(model, batch, prefix):
    """log π of every row of one collated view. Shape: batch[prefix + 'input_ids'] [2B, T] -> [2B]."""
    device = _device(model)
    return train.forward_logps(
        model, batch[prefix + "input_ids"].to(device), batch[prefix + "attention_mask"].to(device),
        batch[prefix + "labels"].to(device)).float().cpu()


def pair_logps(policy, ref, examples, pad_token_id, batch_size=8, progress=False):
    """Per-pair summed log-probs of chosen and rejected responses under policy and reference.

    policy, ref: causal LMs (``ref`` may be the same object: it is then run once). Their
    train/eval mode is left as it is; all runs are under ``torch.no_grad``; each batch is moved
    to the device of each model's first parameter.
    examples: ``data.tokenize_pairs`` output (with the p view when it was given refine_prompt).
    pad_token_id: for ``data.collate``. batch_size: pairs per forward pass (2·batch_size rows).
    progress: draw a bar on stderr.

    Returns dict of float32 CPU tensors, all [N] in the order of ``examples``:
        "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"   under x;
        "p_policy_chosen", "p_policy_rejected", "p_ref_chosen", "p_ref_rejected"   under p ⊕ x,
            when the examples have the p view;
        "score_chosen", "score_rejected" (nan where unknown); "index" int64.
    Feed it to ``pair_metrics(out, beta, out["score_chosen"], out["score_rejected"])``.
    """
    if not examples:
        raise EvalError("pair_logps: no examples to score")
    prefixes = ["", P_PREFIX] if "p_chosen_ids" in examples[0] else [""]
    parts = {}
    bar = Progress(len(examples), "scoring pairs", enabled=progress)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = data.collate(examples[start:start + batch_size], pad_token_id)
            n = batch["index"].numel()
            for prefix in prefixes:
                policy_rows = _rows_logps(policy, batch, prefix)
                ref_rows = policy_rows if ref is policy else _rows_logps(ref, batch, prefix)
                for role, rows in (("policy", policy_rows), ("ref", ref_rows)):
                    parts.setdefault(f"{prefix}{role}_chosen", []).append(rows[:n])
                    parts.setdefault(f"{prefix}{role}_rejected", []).append(rows[n:])
            for key in ("score_chosen", "score_rejected", "index"):
                parts.setdefault(key, []).append(batch[key].cpu())
            bar.update(n)
    bar.close()
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


def tables_to_logps(policy_table, ref_table, with_p=None):
    """The ``pair_metrics`` input from train.pair_table's [N, 4] tables of policy and reference.

    Shape: policy_table, ref_table [N, 4] float, columns log π(y+|x), log π(y-|x),
           log π(y+|p ⊕ x), log π(y-|p ⊕ x).
    with_p: include the p ⊕ x view; None decides from the data: absent when both tables' p
            columns are all exactly 0 (pair_table's filler without the p view; a summed log-prob
            of a non-empty response is never exactly 0).
    Returns dict with LOGP_KEYS (and the "p_" keys), each [N].
    """
    if with_p is None:
        with_p = bool(policy_table[:, 2:].any() or ref_table[:, 2:].any())
    columns = [("", 0, 1), (P_PREFIX, 2, 3)] if with_p else [("", 0, 1)]
    out = {}
    for prefix, c, r in columns:
        for role, table in (("policy", policy_table), ("ref", ref_table)):
            out[f"{prefix}{role}_chosen"] = table[:, c]
            out[f"{prefix}{role}_rejected"] = table[:, r]
    return out


# ----------------------------------------------------------------------------------------------
# Files: JSONL in, JSON/JSONL out
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


def _jsonable(value):
    """nan/inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def emit(document, table, out=None):
    """The JSON document to ``out`` (or stdout when None or "-"), the table to the other stream."""
    text = json.dumps(_jsonable(document), indent=2, ensure_ascii=False) + "\n"
    if out in (None, "-"):
        sys.stdout.write(text)
        sys.stderr.write(table + "\n")
    else:
        Path(out).write_text(text, encoding="utf-8")
        sys.stdout.write(table + "\n")


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
    ids = torch.tensor([prompt_ids[cut:]], device=_device(model))
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
    bar = Progress(len(questions), f"generating ({model_id})", enabled=progress)
    for q in questions:
        answers, n_cut = answer_turns(model, tokenizer, q["turns"], decoding,
                                      question_seed(decoding.seed, q["question_id"]))
        cut += n_cut
        records.append({"question_id": q["question_id"], "model_id": model_id,
                        "choices": [{"index": 0, "turns": answers}], "decoding": asdict(decoding)})
        bar.update()
    bar.close()
    return records, cut


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _load_lm(name, dtype, device):
    tokenizer = train.load_tokenizer(name)
    model = train.load_model(name, tokenizer, dtype=DTYPES[dtype]).to(device)
    return model, tokenizer


def _decoding(args):
    return Decoding(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.max_length)


def _answers_from_model(name, questions, args):
    """Generate answers with a model; returns the records and reports cut prompts on stderr."""
    model, tokenizer = _load_lm(name, args.dtype, args.device)
    records, cut = generate_answers(model, tokenizer, questions, _decoding(args),
                                    getattr(args, "model_id", None) or name, progress=True)
    if cut:
        print(f"{name}: {cut} prompt tokens cut from the left to fit the context", file=sys.stderr)
    return records


def run_generate(args):
    records = _answers_from_model(args.model, load_questions(args.questions, args.split), args)
    write_jsonl(args.out, records)
    print(f"wrote {len(records)} answers to {args.out}", file=sys.stderr)
    return 0


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


def _verdict_key(question_id, turn, order):
    return json.dumps(question_id), int(turn), order


def _drop_unfinished_line(path):
    """Cut an unfinished last line (an interrupted write) from a JSONL file; True if cut."""
    raw = Path(path).read_bytes()
    if not raw or raw.endswith(b"\n"):
        return False
    Path(path).write_bytes(raw[:raw.rfind(b"\n") + 1])
    return True


def load_verdicts(path, identity):
    """{(question_id json, turn, order): record} already in a verdict file (none if absent).

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
                           _field(where, record, "order", str))
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
    order ("ab": model_a shown as A), model_a, model_b, judge, prompt, verdict ("A"/"B"/"C" or
    None), preferred ("model_a"/"model_b"/"tie" or None), parse_error, judgment (the reply).
    """
    done = load_verdicts(out_path, identity)
    todo = [(q, t, o) for q, t in game_list for o in ORDERS
            if _verdict_key(q["question_id"], t, o) not in done]
    if any(t > 1 for _, t, _ in todo) and prompts[1] is None:
        raise EvalError(f"{prompts[0].source}: no multi-turn judge prompt for the questions of "
                        f"more than one turn (--prompt_multi)")
    bar = Progress(len(todo), "judging", enabled=progress)
    with open(out_path, "a", encoding="utf-8") as out:
        for q, turn, order in todo:
            key = json.dumps(q["question_id"])
            first, second = answers_a[key].turns, answers_b[key].turns
            shown = (first, second) if order == "ab" else (second, first)
            prompt = prompts[0] if turn == 1 else prompts[1]
            reply = ask(*render_prompt(prompt, prompt_fields(q, *shown, turn)))
            verdict, error = parse_verdict(reply)
            record = {"question_id": q["question_id"], "turn": turn, "order": order, **identity,
                      "prompt": prompt.name, "verdict": verdict,
                      "preferred": _PREFERRED[order].get(verdict), "parse_error": error,
                      "judgment": reply}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            done[_verdict_key(q["question_id"], turn, order)] = record
            bar.update()
    bar.close()
    return [done[_verdict_key(q["question_id"], t, o)] for q, t in game_list for o in ORDERS]


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

def _pct(value):
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _num(value, fmt="+.4f"):
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


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
            parts.append(" ".join(f"{_pct(s.get(k + '_rate')):>9}" for k in OUTCOMES))
        lines.append(f"{row:<{width}}  " + " ".join(parts))
    for (row, b), s in cells.items():
        lacking = {k: v for k, v in s.get("missing_answers", {}).items() if v}
        if s["unparseable"] or lacking:
            lines.append(f"note: {row} on {b}: {s['decided']} of {s['games']} games decided "
                         f"({s['unparseable']} with an unparseable verdict); questions unanswered: "
                         f"{lacking or 'none'}")
    return "\n".join(lines)


def accuracy_table(m):
    """A few lines for people from ``pair_metrics``."""
    lines = [f"{'query':<6} {'accuracy':>9} {'ties':>6} {'r(y+)':>9} {'r(y-)':>9}   reward margin",
             f"{'x':<6} {_num(m['accuracy'], '.4f'):>9} {_num(m['tie_rate'], '.3f'):>6} "
             f"{_num(m['reward_chosen_mean']):>9} {_num(m['reward_rejected_mean']):>9}   "
             f"Δ_naive {_num(m['margin_mean'])} ± {_num(m['margin_std'], '.4f')}"]
    if "delta_mean" in m:
        lines.append(f"{'p⊕x':<6} {_num(m['p_accuracy'], '.4f'):>9} {_num(m['p_tie_rate'], '.3f'):>6} "
                     f"{_num(m['p_reward_chosen_mean']):>9} {_num(m['p_reward_rejected_mean']):>9}   "
                     f"Δπ {_num(m['delta_mean'])} ± {_num(m['delta_std'], '.4f')}")
        lines.append(f"pairs ranked alike under x and p⊕x (Assumption 3.2): {_num(m['sign_agreement'], '.4f')}")
    if "n_scored" in m:
        for name, prefix in (("Δπ", ""), ("Δ_naive", "naive_")):
            if prefix + "spearman" in m:
                lines.append(f"{name} vs true score gap ({m['n_scored']} scored pairs): "
                             f"Spearman {_num(m[prefix + 'spearman'], '+.3f')}, "
                             f"Kendall τb {_num(m[prefix + 'kendall_tau_b'], '+.3f')}, "
                             f"ranking concordance {_num(m[prefix + 'concordance'], '.3f')}")
    lines.append(f"{m['n_pairs']} pairs")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _stderr(message):
    print(message, file=sys.stderr)


def run_accuracy(args):
    tokenizer = train.load_tokenizer(args.tokenizer or args.model)
    policy = train.load_model(args.model, tokenizer, dtype=DTYPES[args.dtype]).to(args.device)
    ref = policy if args.ref_model == args.model else \
        train.load_model(args.ref_model, tokenizer, dtype=DTYPES[args.dtype]).to(args.device)
    pairs = data.load_pairs(args.data, args.split, log=_stderr)
    examples = data.tokenize_pairs(pairs, tokenizer, args.max_length, REFINE_PROMPTS[args.refine_prompt],
                                   log=_stderr)
    if args.limit:
        examples = examples[:args.limit]
        _stderr(f"scoring the first {len(examples)} pairs (--limit)")
    logps = pair_logps(policy, ref, examples, tokenizer.pad_token_id, args.batch_size, progress=True)
    metrics = pair_metrics(logps, args.beta, logps["score_chosen"], logps["score_rejected"])
    config = {k: getattr(args, k) for k in ("model", "ref_model", "data", "split", "beta",
                                            "refine_prompt", "max_length", "limit")}
    emit({"config": config, "loaded_pairs": len(pairs), "metrics": metrics}, accuracy_table(metrics), args.out)
    if args.pairs_out:
        write_jsonl(args.pairs_out, per_pair_rows(logps, args.beta))
    return 0


def per_pair_rows(logps, beta):
    """One row per pair for plots: index, Δ_naive (margin under x), Δπ, true score gap."""
    rows = {"index": logps["index"].tolist(), "delta_naive": _rewards(logps, beta, "")[2].tolist(),
            "score_gap": (_as_float64(logps["score_chosen"]) - _as_float64(logps["score_rejected"])).tolist()}
    if _has_p_view(logps):
        rows["delta"] = _rewards(logps, beta, P_PREFIX)[2].tolist()
    return [_jsonable(dict(zip(rows, values))) for values in zip(*rows.values())]


def _side_answers(args, side, questions):
    """One side's answers: read from --answers_X, or generated by --model_X."""
    path, model = getattr(args, f"answers_{side}"), getattr(args, f"model_{side}", None)
    if path:
        return load_answers(path)
    records = _answers_from_model(model, questions, args)
    return index_answers([(f"<answers of {model}>:{i}", r) for i, r in enumerate(records, 1)], model)


def _comparison(args, questions):
    """(answers_a, answers_b, {"model_a", "model_b"}) of --answers_X (or --model_X) and --name_X.

    A name defaults to the model_id of its answers; equal names get " (a)" and " (b)".
    """
    answers_a, answers_b = (_side_answers(args, side, questions) for side in ("a", "b"))
    name_a = args.name_a or next(iter(answers_a.values())).model_id
    name_b = args.name_b or next(iter(answers_b.values())).model_id
    if name_a == name_b:
        name_a, name_b = name_a + " (a)", name_b + " (b)"
    return answers_a, answers_b, {"model_a": name_a, "model_b": name_b}


def _report_missing(args, missing, n_questions):
    for side, n in missing.items():
        if n:
            _stderr(f"{getattr(args, side, None) or side}: no answer to {n} of {n_questions} questions; "
                    f"those are left out")


def _benchmark(args):
    """--benchmark, else "embedded-SPLIT" or the question file's name."""
    if args.benchmark:
        return args.benchmark
    return f"embedded-{args.split}" if args.questions == "embedded" else Path(args.questions).stem


def _judge(args):
    """(ask, judge id) of --judge_url or --judge_model."""
    if args.judge_url:
        return http_judge(args.judge_url, args.judge_name, args.api_key_env, args.max_retries,
                          args.retry_wait, args.timeout, args.judge_max_tokens), args.judge_name
    model, tokenizer = _load_lm(args.judge_model, args.dtype, args.device)
    return local_judge(model, tokenizer, args.judge_max_tokens), args.judge_model


def run_judge(args):
    questions = load_questions(args.questions, args.split)
    answers_a, answers_b, names = _comparison(args, questions)
    prompts = load_judge_prompts(args.judge_prompt, args.prompt_single, args.prompt_multi)
    game_list, missing = games(questions, answers_a, answers_b)
    _report_missing(args, missing, len(questions))
    ask, judge_id = _judge(args)
    identity = {**names, "judge": judge_id}
    records = judge_games(game_list, answers_a, answers_b, ask, prompts, args.out, identity, progress=True)
    summary = judge_summary(records, identity, _benchmark(args), missing)
    emit(summary, format_table([summary]), args.summary)
    return 0


def run_exact(args):
    questions = load_questions(args.questions, args.split)
    answers_a, answers_b, names = _comparison(args, questions)
    identity = {**names, "judge": "true score (data.embedded_score)"}
    records, missing = exact_records(questions, answers_a, answers_b, data.embedded_score)
    _report_missing(args, missing, len(questions))
    if args.out:
        write_jsonl(args.out, records)
    summary = exact_summary(records, identity, _benchmark(args), missing)
    emit(summary, format_table([summary]), args.summary)
    return 0


def run_table(args):
    summaries = []
    for path in args.summaries:
        try:
            summaries.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: cannot read a summary: {e}") from None
    print(format_table(summaries))
    return 0


def _device_args(p):
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _decoding_args(p):
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed repeats the answers")
    p.add_argument("--max_length", type=int, default=None,
                   help="context limit in tokens (default: the model's); longer prompts lose their start")


def _questions_args(p, default=None):
    p.add_argument("--questions", default=default, required=default is None,
                   help='JSONL with question_id and turns, or "embedded" (the embedded dataset\'s prompts)')
    p.add_argument("--split", default="test", help='split of "embedded"')


def _compare_args(p):
    p.add_argument("--name_a", help="row label of side a (default: its answers' model_id)")
    p.add_argument("--name_b")
    p.add_argument("--benchmark", help="column label (default: the question file's name)")
    p.add_argument("--summary", help="JSON summary file (default: stdout, the table then to stderr)")


def _accuracy_args(p):
    p.add_argument("--model", default=train.TINY, help='policy: "tiny" or a model folder / hub name')
    p.add_argument("--ref_model", default=train.TINY, help='reference π_ref (default "tiny")')
    p.add_argument("--tokenizer", help="default: the policy's")
    p.add_argument("--data", default="embedded", help="a data.load_pairs source")
    p.add_argument("--split", default="test")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--refine_prompt", choices=sorted(REFINE_PROMPTS), default="100")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--limit", type=int, default=0, help="score only the first N kept pairs (0: all)")
    p.add_argument("--out", help="JSON file (default: stdout, the table then to stderr)")
    p.add_argument("--pairs_out", help="also a JSONL of per-pair Δ_naive, Δπ and true score gap")
    _device_args(p)


def _generate_args(p):
    p.add_argument("--model", required=True, help='"tiny" or a model folder / hub name')
    p.add_argument("--model_id", help="the answers' model_id (default: --model)")
    _questions_args(p)
    p.add_argument("--out", required=True, help="answers JSONL")
    _decoding_args(p)
    _device_args(p)


def _judge_args(p):
    _questions_args(p)
    p.add_argument("--answers_a", required=True)
    p.add_argument("--answers_b", required=True)
    p.add_argument("--out", required=True, help="verdicts JSONL; verdicts already there are not asked again")
    _compare_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--judge_model", help="a local causal LM folder / hub name")
    who.add_argument("--judge_url", help="OpenAI-compatible API base, e.g. https://api.openai.com/v1")
    p.add_argument("--judge_name", default="gpt-4", help="the endpoint's model name")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--judge_prompt", help="JSONL of judge prompts (MT-Bench judge_prompts.jsonl layout)")
    p.add_argument("--prompt_single", help="single-turn prompt name (default srpo-pair, or pair-v2 from a file)")
    p.add_argument("--prompt_multi", help="multi-turn prompt name (default srpo-pair-multi-turn, or pair-v2-multi-turn)")
    p.add_argument("--max_retries", type=int, default=5)
    p.add_argument("--retry_wait", type=float, default=2.0, help="first backoff in seconds, doubled each retry")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--judge_max_tokens", type=int, default=2048)
    _device_args(p)


def _exact_args(p):
    _questions_args(p, default="embedded")
    for side in ("a", "b"):
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument(f"--answers_{side}", help=f"answers JSONL of side {side}")
        group.add_argument(f"--model_{side}", help=f"or a model whose greedy/seeded answers are judged")
    p.add_argument("--out", help="per-question scores JSONL")
    _compare_args(p)
    _decoding_args(p)
    _device_args(p)


def _table_args(p):
    p.add_argument("summaries", nargs="+", help="summary JSON files of judge / exact")


COMMANDS = {
    "accuracy": (_accuracy_args, run_accuracy, "preference accuracy, margins, Δπ and its correlations"),
    "generate": (_generate_args, run_generate, "answers of a model to a question file"),
    "judge": (_judge_args, run_judge, "win/tie/lose rates of two answer files under an LLM judge"),
    "exact": (_exact_args, run_exact, "win/tie/lose rates under the embedded dataset's true score"),
    "table": (_table_args, run_table, "Table 2's layout from judge / exact summaries"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, run, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (EvalError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
