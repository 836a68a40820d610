"""data.py: preference pairs in, exact token batches out, for the plain query x and the
prompt-augmented query p ⊕ x (paper, Section 3.2.2 and Appendix C).

    load_pairs(source, split) -> [Pair] -> tokenize_pairs(...) -> [example] -> collate(...) -> tensors
    schedule(n, global_batch, seed, ...) -> which examples each step takes, on each rank

Owns: reading and checking pair sources, the embedded dataset, tokenization of both views, batches and
their order.
Does not own: models (models.py), losses (srpo.py) or any metric (metrics.py).

Sources, record formats, tokenisation of the two views, the embedded dataset and the batch order: see
docs/data.md (one place; tests/test_data.py checks each rule).

Truncation to max_length (exact rule)
    Let n be the query's tokens (excluding BOS), r the longer response's tokens (with EOS), m =
    max_length, and the longest view be the p view when p is given, else the x view.
    1. Longest view: if [BOS] + p + n + r fits in m nothing is cut. Otherwise the query loses its
       oldest tokens, but keeps at least min(n, min_prompt_length) (default: half the room left
       after BOS and p); if that is still too long, both responses lose their last tokens (EOS first)
       down to the room left. p is never cut.
    2. x view (when p is given): the same, already truncated, responses after the newest
       min(n, m - [BOS] - r) query tokens: it keeps at least as much of the query as the p view
       (in a chat the p view loses the template head first, then the oldest turns).
    So both views score exactly the same response tokens, and without p the two steps are one.
    Runs without the p view (DPO, IPO, SFT) pass p with p_view=False: they are cut by the same rule,
    so every loss sees the same x-view tokens at the same max_length.
    3. Dropped and counted: a pair left with no response token ("response truncated away"), with
       no query token in the longest view ("no room for the query"; only with min_prompt_length=0), or
       whose two responses are the same tokens once cut ("identical after truncation": e.g. responses
       sharing a long opening; such a pair has no preference to learn).
    The summary line also counts the prompts and responses that were cut.
"""

import gzip
import itertools
import json
import os
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from common import DataError, Progress
from srpo import IGNORE_INDEX, rating_prompt

FORMATS = ("HH-RLHF {chosen, rejected} transcripts; "
           "{prompt, chosen, rejected[, score_chosen, score_rejected]} with text or message lists; "
           "{chosen, rejected} texts sharing the prompt as a prefix; "
           "ShareGPT {conversations, chosen, rejected[, system]}; "
           "UltraFeedback {instruction, chosen_response, rejected_response[, chosen_avg_rating, "
           "rejected_avg_rating]}")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
HH_REPO = "Anthropic/hh-rlhf"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_TRANSCRIPT_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARK = "\ue000srpo-p\ue000"  # placed where p goes in a chat; never left in any output

PACKINGS = ("padded", "packed", "shared")  # batch layouts of collate

EMBEDDED_TEMPLATE = "Copy: {}\n"
EMBEDDED_ALPHABET = "ABDEFGHIJKLMORSUVWXYZ"
EMBEDDED_LENGTH = 5
EMBEDDED_SIZES = {"train": 2000, "test": 200}
EMBEDDED_RATING_SCALE = 100  # R in [1, 100] of the quality-aware SFT pairs, as in p
_EMBEDDED_PROMPT = re.compile(r"Copy: ([A-Z]+)\n\Z")


@dataclass(frozen=True)
class Pair:
    """One preference pair: prompt (text, or chat messages ending in a user turn), two responses."""
    prompt: "str | tuple[dict, ...]"
    chosen: str
    rejected: str
    score_chosen: "float | None" = None
    score_rejected: "float | None" = None


class _Dropped(Exception):
    """A pair dropped by a documented rule; the argument is the reason counted in the summary."""


# ----------------------------------------------------------------------------- summaries


def summary(kept, dropped, what="pairs"):
    """'kept 2,304 of 2,312 pairs; dropped 4 empty response, 4 prompt mismatch' (dropped: reason -> count)."""
    line = f"kept {kept:,} of {kept + sum(dropped.values()):,} {what}"
    if dropped:
        line += "; dropped " + ", ".join(f"{n:,} {reason}" for reason, n in dropped.items())
    return line


def _keep_all(items, convert):
    """([convert(item) for each item], Counter of reasons) without the items that raise _Dropped."""
    kept, dropped = [], Counter()
    for item in items:
        try:
            kept.append(convert(item))
        except _Dropped as d:
            dropped[d.args[0]] += 1
    return kept, dropped


def _report(label, kept, dropped, log, extra=""):
    """Log the one summary line; DataError (with that line) when nothing was kept."""
    line = f"{label}: {summary(len(kept), dropped)}{extra}"
    if not kept:
        raise DataError(f"{line}; nothing left")
    if log:
        log(line)


# ----------------------------------------------------------------------------- records -> Pair


def _field(record, name, where):
    """record[name], or DataError naming the field and the accepted formats."""
    if name not in record:
        raise DataError(f"{where}: field '{name}' missing; expected one of: {FORMATS}")
    return record[name]


def _text(record, name, where):
    """A field that must be a string."""
    value = _field(record, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _score(record, name, where):
    """An optional numeric field: None when absent or null."""
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field '{name}' must be a number or null, got {value!r:.40}")
    return float(value)


def _messages(value, name, where):
    """A list of {"role", "content"} strings as a tuple of plain dicts."""
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field '{name}' message {i} must be {{\"role\": str, \"content\": str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _response(record, name, where):
    """(earlier messages, reply text) of a response field: text, or messages ending in the assistant's reply."""
    value = _field(record, name, where)
    if isinstance(value, str):
        return (), value
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a string or a list of messages, "
                        f"got {type(value).__name__}")
    messages = _messages(value, name, where)
    if not messages or messages[-1]["role"] != "assistant":
        raise _Dropped("no assistant turn")
    return messages[:-1], messages[-1]["content"]


def _make_pair(prompt, chosen, rejected, score_chosen, score_rejected):
    """A Pair, unless a rule drops it (empty response, identical responses, chat not ending in a user turn)."""
    if not chosen.strip() or not rejected.strip():
        raise _Dropped("empty response")
    if chosen == rejected:
        raise _Dropped("identical responses")
    if not isinstance(prompt, str) and (not prompt or prompt[-1]["role"] != "user"):
        raise _Dropped("prompt not ending in a user turn")
    return Pair(prompt, chosen, rejected, score_chosen, score_rejected)


def _split_transcript(text):
    """(prompt up to and including the last '\\n\\nAssistant:', response) of an HH transcript."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Dropped("no assistant turn")
    response = text[cut + len(HH_ASSISTANT):]
    if HH_HUMAN in response:
        raise _Dropped("irregular transcript")
    return text[:cut + len(HH_ASSISTANT)], response


def _implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected): the longest common prefix, its final space left to the responses (TRL's rule)."""
    n = len(os.path.commonprefix([chosen, rejected]))
    if n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _text_pair(record, where):
    """Two whole texts: HH-RLHF transcripts when they have a turn, else the prompt is their shared prefix."""
    transcripts = _text(record, "chosen", where), _text(record, "rejected", where)
    if not any(turn in text for text in transcripts for turn in (HH_HUMAN, HH_ASSISTANT)):
        if transcripts[0] == transcripts[1]:
            raise _Dropped("identical responses")
        prompt, chosen, rejected = _implicit_prompt(*transcripts)
        if not prompt:
            raise DataError(f"{where}: field 'prompt' missing (no HH transcript, and chosen and rejected share "
                            f"no prefix to take as the prompt); expected one of: {FORMATS}")
        return _make_pair(prompt, chosen, rejected, _score(record, "score_chosen", where),
                          _score(record, "score_rejected", where))
    (prompt_c, chosen), (prompt_r, rejected) = map(_split_transcript, transcripts)
    if prompt_c != prompt_r:
        raise _Dropped("prompt mismatch")
    return _make_pair(prompt_c, chosen, rejected, None, None)


def _sharegpt_message(value, name, where):
    """A ShareGPT message {"from", "value"} as {"role", "content"}; name is used in messages."""
    if not (isinstance(value, dict) and isinstance(value.get("from"), str) and isinstance(value.get("value"), str)):
        raise DataError(f"{where}: field {name} must be {{\"from\": str, \"value\": str}}")
    if value["from"] not in SHAREGPT_ROLES:
        raise DataError(f"{where}: field {name} has role '{value['from']:.40}'; "
                        f"expected one of: {', '.join(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[value["from"]], "content": value["value"]}


def _sharegpt_pair(record, where):
    """LLaMA-Factory's ShareGPT preference layout: conversations (the prompt), chosen and rejected messages."""
    conversations = _field(record, "conversations", where)
    if not isinstance(conversations, list):
        raise DataError(f"{where}: field 'conversations' must be a list of messages, "
                        f"got {type(conversations).__name__}")
    prompt = tuple(_sharegpt_message(m, f"'conversations' message {i}", where) for i, m in enumerate(conversations))
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    if system:
        prompt = ({"role": "system", "content": system},) + prompt
    replies = [_sharegpt_message(_field(record, name, where), f"'{name}'", where) for name in ("chosen", "rejected")]
    if any(reply["role"] != "assistant" for reply in replies):
        raise _Dropped("no assistant turn")
    return _make_pair(prompt, replies[0]["content"], replies[1]["content"],
                      _score(record, "score_chosen", where), _score(record, "score_rejected", where))


def _ultrafeedback_pair(record, where):
    """UltraFeedback, argilla layout: instruction, chosen_response, rejected_response, *_avg_rating."""
    prompt = ({"role": "user", "content": _text(record, "instruction", where)},)
    return _make_pair(prompt, _text(record, "chosen_response", where), _text(record, "rejected_response", where),
                      _score(record, "chosen_avg_rating", where), _score(record, "rejected_avg_rating", where))


def _chat_prompt(prompt, history, where):
    """The prompt of a chat record (history: the responses' earlier messages; prompt None if absent)."""
    if prompt is None:
        if not history:
            raise DataError(f"{where}: field 'prompt' missing; expected one of: {FORMATS}")
        return history
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt", where)
        if history and history != messages:
            raise _Dropped("prompt mismatch")
        return messages
    if not history:
        return ({"role": "user", "content": prompt},)
    if not any(m["role"] == "user" and m["content"] == prompt for m in history):
        raise _Dropped("prompt mismatch")
    return history


def _generic_pair(record, where):
    """{prompt, chosen, rejected[, score_chosen, score_rejected]}, text or messages (UltraFeedback H4 layout too).

    prompt may be absent when chosen and rejected are whole conversations (their shared earlier turns).
    """
    prompt = record.get("prompt")
    if not isinstance(prompt, (str, list, type(None))):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    history_c, chosen = _response(record, "chosen", where)
    history_r, rejected = _response(record, "rejected", where)
    if history_c != history_r:
        raise _Dropped("prompt mismatch")
    chat = not isinstance(prompt, str) or isinstance(record["chosen"], list) or isinstance(record["rejected"], list)
    prompt = _chat_prompt(prompt, history_c, where) if chat else prompt
    return _make_pair(prompt, chosen, rejected,
                      _score(record, "score_chosen", where), _score(record, "score_rejected", where))


def record_to_pair(record, where):
    """One record of any accepted format as a Pair; DataError for bad input, _Dropped by rule.

    where: "FILE:LINE", used in messages.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "instruction" in record or "chosen_response" in record:
        return _ultrafeedback_pair(record, where)
    if "conversations" in record:
        return _sharegpt_pair(record, where)
    if "prompt" in record or isinstance(record.get("chosen"), list):
        return _generic_pair(record, where)
    return _text_pair(record, where)


# ----------------------------------------------------------------------------- files and hub


def _decode(raw, path, line):
    """Bytes as UTF-8 text, or DataError naming the file, line and column (raw starts on `line`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line += raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start - start + 1})") from None


def _read_bytes(path):
    """The file's bytes, gunzipped for .gz; DataError if it cannot be read."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _json_error(path, e, first_line=1):
    """DataError for a json.JSONDecodeError in text that starts on first_line of the file."""
    return DataError(f"{path}:{e.lineno + first_line - 1}: malformed JSON ({e.msg} at column {e.colno})")


def _json_lines(data, path):
    """(where, record) for each non-blank line of JSON Lines bytes."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        text = _decode(raw, path, number).removeprefix("\ufeff" if number == 1 else "")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, number) from None
        yield f"{path}:{number}", record


def _json_array(text, path, start=0, closing=""):
    """(where, record) for each element of the JSON array at text[start:], where = the line it starts on.

    closing: the text that must follow the array's "]" ("}" for the array of {"data": [...]}).
    """
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    i = ws.match(text, start + 1).end()
    while not text.startswith("]", i):
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        yield f"{path}:{text.count(chr(10), 0, i) + 1}", record
        i = ws.match(text, end).end()
        if text.startswith(",", i):
            i = ws.match(text, i + 1).end()
        elif not text.startswith("]", i):
            raise _json_error(path, json.JSONDecodeError("expected ',' or ']'", text, i))
    i = ws.match(text, i + 1).end()
    if not text.startswith(closing, i) or text[i + len(closing):].strip():
        raise _json_error(path, json.JSONDecodeError(f"expected {closing or 'the end of the file'!r}", text, i))


_DATA_KEY = re.compile(r'\{\s*"data"\s*:\s*\[')


def read_records(path):
    """(where "FILE:LINE", record) of a .jsonl/.json file, optionally gzipped.

    A .json file is a JSON array of records, an object {"data": [records]} (its only key), or JSON Lines.
    """
    data = _read_bytes(path)
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.endswith((".json", ".json.gz")) and head.startswith((b"[", b"{")):
        text = _decode(data, path, 1).removeprefix("\ufeff")
        start = len(text) - len(text.lstrip())
        if text.startswith("[", start):
            yield from _json_array(text, path, start)
            return
        keyed = _DATA_KEY.match(text, start)
        if keyed:
            yield from _json_array(text, path, keyed.end() - 1, closing="}")
            return
    yield from _json_lines(data, path)


def _hub_error(label, e):
    """A one-line DataError for an exception raised while fetching from the hub."""
    first = str(e).splitlines()[0] if str(e) else ""
    return DataError(f"{label}: cannot load from the hub ({type(e).__name__}: {first})")


def _hh_hub_records(name, split):
    """HH-RLHF records of a split, downloaded with huggingface_hub (already installed with transformers)."""
    from huggingface_hub import hf_hub_download

    subset = name[len(HH_REPO):].strip("/")
    for part in [subset] if subset else HH_SUBSETS:
        try:
            path = hf_hub_download(HH_REPO, f"{part}/{split}.jsonl.gz", repo_type="dataset")
        except Exception as e:  # offline, unknown subset or split: one line, not a traceback
            raise _hub_error(f"{HH_REPO}/{part} [{split}]", e) from None
        yield from read_records(path)


def _datasets_hub_records(name, split):
    """Records of a hub dataset through the optional `datasets` package."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: loading a hub dataset needs the datasets package: pip install datasets") from None
    try:
        splits = datasets.get_dataset_split_names(name)
    except Exception as e:
        raise _hub_error(f"{name} [{split}]", e) from None
    chosen = split if split in splits else f"{split}_prefs"
    if chosen not in splits:
        raise DataError(f"{name}: no split '{split}' (has: {', '.join(splits)})")
    try:
        rows = datasets.load_dataset(name, split=chosen)
    except Exception as e:
        raise _hub_error(f"{name} [{chosen}]", e) from None
    for number, row in enumerate(rows, 1):
        yield f"{name}/{chosen}:{number}", row


def source_records(source, split="train"):
    """(where, record) of a local file or a hub dataset name."""
    if os.path.isfile(source):
        if not source.endswith(FILE_SUFFIXES):
            raise DataError(f"{source}: unsupported file type; expected {', '.join(FILE_SUFFIXES)}")
        return read_records(source)
    if os.path.exists(source) or source.endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: not a file; expected a {', '.join(FILE_SUFFIXES)} file, "
                        f"a hub dataset name or 'embedded'")
    if source.lower() == HH_REPO.lower() or source.lower().startswith(HH_REPO.lower() + "/"):
        return _hh_hub_records(HH_REPO + source[len(HH_REPO):], split)
    return _datasets_hub_records(source, split)


def load_pairs(source="embedded", split="train", log=print):
    """Preference pairs of a source (docs/data.md, Sources), with one summary line of kept/dropped.

    source: "embedded", a local .jsonl/.jsonl.gz/.json path (split ignored), or a hub dataset name.
    Returns list[Pair]. Raises DataError on bad input or when no pair is left.
    """
    if source == "embedded":
        pairs, dropped = embedded_pairs(split), Counter()
        label = f"embedded/{split}"
    else:
        source = os.path.expanduser(os.fspath(source))
        pairs, dropped = _keep_all(source_records(source, split), lambda item: record_to_pair(item[1], item[0]))
        label = source if os.path.isfile(source) else f"{source} [{split}]"
    _report(label, pairs, dropped, log)
    return pairs


# ----------------------------------------------------------------------------- embedded dataset


def _embedded_words(split, rng):
    """The split's distinct target words, in order (test iff crc32(word) % 10 == 0)."""
    words, seen = [], set()
    while len(words) < EMBEDDED_SIZES[split]:
        word = "".join(rng.sample(EMBEDDED_ALPHABET, EMBEDDED_LENGTH))
        if word not in seen and (zlib.crc32(word.encode()) % 10 == 0) == (split == "test"):
            seen.add(word)
            words.append(word)
    return words


def _corrupt(word, k, rng):
    """word with exactly k of its letters replaced by other letters of the alphabet."""
    letters = list(word)
    for i in rng.sample(range(len(word)), k):
        letters[i] = rng.choice([c for c in EMBEDDED_ALPHABET if c != word[i]])
    return "".join(letters)


def embedded_pairs(split="train", seed=0):
    """The embedded copy task's pairs of a split (docs/data.md), deterministic in (split, seed)."""
    if split not in EMBEDDED_SIZES:
        raise DataError(f"embedded: no split '{split}' (has: {', '.join(EMBEDDED_SIZES)})")
    rng = random.Random(f"srpo-embedded:{split}:{seed}")
    pairs = []
    for word in _embedded_words(split, rng):
        prompt = EMBEDDED_TEMPLATE.format(word)
        k_chosen, k_rejected = sorted(rng.sample(range(EMBEDDED_LENGTH + 1), 2))
        chosen, rejected = _corrupt(word, k_chosen, rng), _corrupt(word, k_rejected, rng)
        pairs.append(Pair(prompt, chosen, rejected, embedded_score(prompt, chosen), embedded_score(prompt, rejected)))
    return pairs


def embedded_sft_pairs(q=0.0, seed=0):
    """The embedded train pairs for SFT, a fraction q of them quality-aware (docs/data.md).

    Each pair draws (u, R, a response with rating_k(R) letters replaced) in turn, whatever q; it is
    quality-aware iff u < q: its prompt is rating_prompt(R) + "Copy: WORD\\n" and its chosen response
    the drawn one (the rejected one is the pair's, unused by SFT). So the quality-aware pairs at a
    smaller q are among those at a larger q, with the same R and response, and q = 0 is
    embedded_pairs("train", seed) itself.
    """
    if not 0.0 <= q <= 1.0:
        raise DataError(f"embedded_sft_pairs: q must be in [0, 1], got {q}")
    pairs = embedded_pairs("train", seed)
    if q == 0:
        return pairs
    rng = random.Random(f"srpo-embedded-quality:{seed}")
    out = []
    for pair in pairs:
        u, rating = rng.random(), rng.randint(1, EMBEDDED_RATING_SCALE)
        response = _corrupt(_EMBEDDED_PROMPT.match(pair.prompt).group(1), rating_k(rating), rng)
        out.append(pair if u >= q else Pair(rating_prompt(rating, EMBEDDED_RATING_SCALE) + pair.prompt, response,
                                            pair.rejected, embedded_score(pair.prompt, response), pair.score_rejected))
    return out


def rating_k(rating):
    """Letters replaced in a response rated `rating` of 100: round((1 - R/100)·5), halves up, so its
    true score 1 - k/5 is within 0.1 of R/100 (R 91-100: 0 letters; 71-90: 1; ...; 1-10: 5)."""
    return ((EMBEDDED_RATING_SCALE - rating) * EMBEDDED_LENGTH * 2 + EMBEDDED_RATING_SCALE) // (
        2 * EMBEDDED_RATING_SCALE)


def embedded_score(prompt, response):
    """The true score in [0, 1] of any response to an embedded prompt "Copy: WORD\\n".

    Positions where response matches WORD, divided by the longer of the two lengths.
    """
    match = _EMBEDDED_PROMPT.match(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise DataError(f"embedded_score: not an embedded prompt: {prompt!r:.60}")
    target = match.group(1)
    return sum(a == b for a, b in zip(target, response)) / max(len(target), len(response))


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class _Tokens:
    """What tokenisation needs to know about a tokenizer."""
    bos: "int | None"  # prepended once when the tokenizer uses a BOS
    eos: int
    template: bool     # has a chat template
    added: tuple       # the text of its added tokens (no token spans one)


class _Query(NamedTuple):
    """A prompt's tokens: the p view is prefix + ids[:p_at] + p + ids[p_at:], the x view prefix + ids."""
    prefix: list   # [BOS] or []
    ids: list      # the query's tokens
    p_at: int      # where p's tokens go
    p_moved: bool  # p_at is before the first user message's content: a token spans that boundary
    context: str   # the text each response continues: the prompt's after its last added token
    context_ids: list  # its tokens
    lead: str      # text written before each response (the space after an HH transcript's "Assistant:")


def _encode(tokenizer, text, literal=True):
    """Token ids of text, no special tokens added; literal: text such as "</s>" stays text, not EOS."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=literal)) if text else []


def _inspect(tokenizer):
    """The _Tokens of a tokenizer: it uses BOS iff it prepends bos_token_id when asked for special tokens."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no EOS token; set tokenizer.eos_token")
    bos = tokenizer.bos_token_id
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    uses_bos = bos is not None and with_special[:1] == [bos] and _encode(tokenizer, "a")[:1] != [bos]
    added = tuple(t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t)
    return _Tokens(bos if uses_bos else None, tokenizer.eos_token_id, bool(getattr(tokenizer, "chat_template", None)),
                   added)


def _transcript(messages):
    """Chat messages as an HH transcript: "\\n\\nHuman: ...\\n\\nAssistant: ...", ending in "\\n\\nAssistant:"."""
    turns = "".join(f"\n\n{_TRANSCRIPT_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}"
                    for m in messages)
    return turns + HH_ASSISTANT


def _template_halves(messages, tokenizer):
    """The rendered chat (with generation prompt), split where the first user message's content begins.

    The split is found by rendering once more with a marker before that content; the text itself is
    the plain rendering, so templates that trim or otherwise touch the content render as they would.
    """
    def render(chat):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    marked = render([dict(m, content=_MARK + m["content"]) if i == first else dict(m)
                     for i, m in enumerate(messages)])
    text = render([dict(m) for m in messages])
    head = marked[:marked.find(_MARK)]
    if marked.count(_MARK) != 1 or not text.startswith(head):
        raise DataError("the chat template did not keep the first user message's text in place; "
                        "cannot place the refinement prompt at its start")
    return head, text[len(head):]


def _after_added(text, added):
    """text after the last occurrence of any added token's text (all of it when there is none)."""
    ends = [text.rfind(t) + len(t) for t in added if t in text]
    return text[max(ends, default=0):]


def _start(tokens, x):
    """[BOS] where the tokenizer uses one; else [EOS] before an empty query (a token must precede the response
    for its first token to be scored in the x view, as it is after p); else []."""
    if tokens.bos is not None:
        return [tokens.bos]
    return [] if x else [tokens.eos]


def _query(prompt, tokenizer, tokens):
    """The _Query of a prompt (docs/data.md, Tokenisation): the one framing of training and generation."""
    if isinstance(prompt, str) or not tokens.template:
        text = prompt if isinstance(prompt, str) else _transcript(prompt)
        x = _encode(tokenizer, text)
        return _Query(_start(tokens, x), x, 0, False, text, x, "" if isinstance(prompt, str) else " ")
    head_text, tail_text = _template_halves(prompt, tokenizer)
    x = _encode(tokenizer, head_text + tail_text, literal=False)  # = apply_chat_template(tokenize=True)
    head = _encode(tokenizer, head_text, literal=False)
    at = len(os.path.commonprefix([head, x]))
    written = len(os.path.commonprefix([x, [tokenizer.bos_token_id] * len(x)])) if tokenizer.bos_token_id is not None \
        else 0
    prefix = [tokenizer.bos_token_id] if (tokens.bos is not None or written) else []
    context = _after_added(head_text + tail_text, tokens.added) or "\n"
    return _Query(prefix, x[written:], max(at - written, 0), at < len(head), context,
                  _encode(tokenizer, context), "")


def _with_p(query, p):
    """The p view's prompt: p directly before the query (plain text) or its first user message's content."""
    return query.prefix + query.ids[:query.p_at] + p + query.ids[query.p_at:]


def _continuation(tokenizer, context, context_ids, text):
    """(ids, apart): text's tokens as they continue context (whose own tokens are context_ids).

    They are the tokens of context + text after context_ids when those are its prefix. Otherwise a
    token spans the boundary (apart=True), and text is encoded as it continues a newline (or, should
    a token span that boundary too, alone).
    """
    if not context:
        return _encode(tokenizer, text), False
    for apart, (anchor, before) in enumerate(((context, context_ids), ("\n", None))):
        before = _encode(tokenizer, anchor) if before is None else before
        joint = _encode(tokenizer, anchor + text)
        if joint[:len(before)] == before:
            return joint[len(before):], bool(apart)
    return _encode(tokenizer, text), True


def encode_prompt(prompt, tokenizer, refine_prompt=None):
    """The query's token ids, as trained on and as given to generation (no truncation).

    prompt: text (encoded literally), or chat messages (the chat template with generation prompt
    where the tokenizer has one, else an HH transcript ending in "\\n\\nAssistant:").
    refine_prompt: p; its tokens go directly before the query's (for a chat: at the start of the first
    user message). BOS, where used, exactly once and first. Returns list[int].
    """
    query = _query(prompt, tokenizer, _inspect(tokenizer))
    return _with_p(query, _encode(tokenizer, refine_prompt)) if refine_prompt else query.prefix + query.ids


def _fit(n_fixed, n_query, n_response, max_length, min_prompt):
    """(query tokens kept, response room) of the longest view; rule 1 of the module docstring."""
    room = max_length - n_fixed
    if n_query + n_response <= room:
        return n_query, n_response
    keep = min(n_query, max(room - n_response, min_prompt))
    return keep, room - keep


def _views(query, chosen, rejected, key=""):
    """ids and labels of chosen and rejected after the same query tokens (labelled -100)."""
    ignore = [IGNORE_INDEX] * len(query)
    return {f"{key}chosen_ids": query + chosen, f"{key}chosen_labels": ignore + chosen,
            f"{key}rejected_ids": query + rejected, f"{key}rejected_labels": ignore + rejected}


def _responses(pair, tokenizer, query, notes):
    """The chosen and rejected tokens, each as it continues the prompt, plus EOS; counts fallbacks in notes."""
    out = []
    for text in (pair.chosen, pair.rejected):
        ids, apart = _continuation(tokenizer, query.context, query.context_ids, query.lead + text)
        notes["responses encoded apart (a token spans the boundary)"] += apart
        out.append(ids)
    return out


def _tokenize_pair(pair, tokenizer, tokens, max_length, p, min_prompt, cut, notes, p_view):
    """One pair's example (module docstring), or _Dropped; counts what truncation cut into `cut`."""
    query = _query(pair.prompt, tokenizer, tokens)
    notes["p placed before a token spanning the first user message"] += query.p_moved and p is not None
    chosen, rejected = (ids + [tokens.eos] for ids in _responses(pair, tokenizer, query, notes))
    prefix, x = query.prefix, query.ids
    longest = max(len(chosen), len(rejected))
    keep_p, room = _fit(len(prefix) + len(p or []), len(x), longest, max_length, min(len(x), min_prompt))
    chosen, rejected = chosen[:max(room, 0)], rejected[:max(room, 0)]
    if not chosen or not rejected:
        raise _Dropped("response truncated away")
    if keep_p == 0 < len(x):
        raise _Dropped("no room for the query")
    keep = min(len(x), max_length - len(prefix) - max(len(chosen), len(rejected)))
    cut["prompts"] += keep < len(x)
    cut["responses"] += room < longest
    example = _views(prefix + x[len(x) - keep:], chosen, rejected)
    if p is not None and p_view:
        cut["more prompts in the p view"] += keep_p < keep
        start = len(x) - keep_p
        kept = query._replace(ids=x[start:], p_at=max(0, query.p_at - start))
        example.update(_views(_with_p(kept, p), chosen, rejected, "p_"))
    nan = float("nan")
    example["score_chosen"] = nan if pair.score_chosen is None else float(pair.score_chosen)
    example["score_rejected"] = nan if pair.score_rejected is None else float(pair.score_rejected)
    return example


def tokenize_pairs(pairs, tokenizer, max_length=512, refine_prompt=None, log=print, min_prompt_length=None,
                   p_view=True, progress=False):
    """One example per kept pair: the x view, and the p ⊕ x view when refine_prompt is given and p_view.

    Keys: "index" (position in the returned list), "pair_index" (position in `pairs`),
    "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels" (list[int]; -100 on the prompt),
    with the p view also "p_chosen_ids", "p_chosen_labels", "p_rejected_ids", "p_rejected_labels";
    "score_chosen", "score_rejected" (float, nan if unknown). Truncation: module docstring; with
    refine_prompt and p_view=False it is the same as with the p view (the x view of a run without
    p equals a Sr run's), and only the x view is returned.
    min_prompt_length: a query is cut no shorter than this to make room for a response (default:
    half of max_length less BOS and p's tokens). Logs one summary line; DataError when no pair is left.
    progress: a ``Progress`` line while it works (True: on stderr; or a text stream).
    """
    tokens = _inspect(tokenizer)
    p = _encode(tokenizer, refine_prompt) if refine_prompt else None
    fixed = len(p or []) + (tokens.bos is not None)
    if max_length - fixed < 2:
        raise DataError(f"max_length={max_length} leaves no room for a query and a response "
                        f"after {fixed} tokens of BOS and refinement prompt")
    min_prompt = (max_length - fixed) // 2 if min_prompt_length is None else min_prompt_length
    cut, notes = Counter(), Counter()

    def convert(item):
        example = _tokenize_pair(item[1], tokenizer, tokens, max_length, p, min_prompt, cut, notes, p_view)
        if example["chosen_labels"] == example["rejected_labels"]:  # e.g. a long shared opening cut at max_length
            raise _Dropped("identical after truncation")
        example["pair_index"] = item[0]
        return example

    bar = Progress(len(pairs), "tokenizing", "pairs", enabled=progress)
    examples, dropped = _keep_all(bar.iterate(enumerate(pairs)), convert)
    for i, example in enumerate(examples):
        example["index"] = i
    truncated = ", ".join(f"{n:,} {what}" for what, n in cut.items() if n)
    noted = "".join(f"; {n:,} {what}" for what, n in notes.items() if n)
    view = "" if p is None else ", with p" if p_view else ", cut as with p"
    _report(f"tokenized (max_length={max_length}{view})", examples, dropped, log,
            (f"; truncated {truncated}" if truncated else "") + noted)
    return examples


# ----------------------------------------------------------------------------- batches and order


def _pad(rows, value):
    """Right-padded [len(rows), max length] int64 tensor of lists of ints."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


@dataclass
class _Piece:
    """Tokens that stay together in one packed row, with each token's position, sequence and branch."""
    ids: list
    labels: list
    positions: list
    segments: list
    branches: list

    def __len__(self):
        return len(self.ids)


def _sequence_piece(ids, labels, segment):
    """One sequence on its own: positions from 0, one segment, branch 0."""
    n = len(ids)
    return _Piece(list(ids), list(labels), list(range(n)), [segment] * n, [0] * n)


def _shared_piece(chosen_ids, chosen_labels, rejected_ids, rejected_labels, group, n_pairs):
    """One pair with its prompt once: prompt[:-1], then prompt[-1] + chosen, then prompt[-1] + rejected.

    The prompt is the longest unscored common prefix of the two sequences. Its last token is written
    twice, once before each response, so that each response's first token is predicted from its own copy
    (positions and attention as in the unshared sequence). Branch 0 is the shared prefix, 1 the chosen
    branch, 2 the rejected one; the chosen branch is segment `group`, the rejected branch `group + n_pairs`.
    """
    n = 0
    while (n < min(len(chosen_ids), len(rejected_ids)) and chosen_ids[n] == rejected_ids[n]
           and chosen_labels[n] == rejected_labels[n] == IGNORE_INDEX):
        n += 1
    head = max(n - 1, 0)
    c, r = len(chosen_ids) - head, len(rejected_ids) - head
    return _Piece(chosen_ids + rejected_ids[head:], chosen_labels + rejected_labels[head:],
                  list(range(len(chosen_ids))) + list(range(head, len(rejected_ids))),
                  [group] * (head + c) + [group + n_pairs] * r, [0] * head + [1] * c + [2] * r)


def _first_fit(lengths, capacity):
    """Indices grouped into bins of total length <= capacity, first-fit decreasing (stable, deterministic)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, left in enumerate(room) if lengths[i] <= left), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(capacity)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


def _balanced_bins(lengths, pack_length):
    """Bins of total length at most pack_length (a longer item gets its own), first-fit decreasing under the
    capacity that leaves the fewest padded tokens (bins x longest bin): rows padded to the longest row."""
    top = max(pack_length, max(lengths))
    first = _first_fit(lengths, top)
    low = max(max(lengths), -(-sum(lengths) // len(first)))
    step = max(1, (top - low) // 64)

    def padded_size(bins):
        return len(bins) * max(sum(lengths[i] for i in b) for b in bins)

    tighter = (_first_fit(lengths, capacity) for capacity in range(top - step, low - 1, -step))
    return min(itertools.chain([first], tighter), key=padded_size)


def _pack(pieces, pack_length, pad_token_id, shared):
    """Pieces in rows of at most pack_length tokens (a longer piece gets a row of its own), tail-padded.

    Returns input_ids, position_ids, labels, segment_ids [R, L] (the tail: pad id, positions restarting
    at 0, -100, segment -1), and when shared the 4D attention_mask [R, 1, L, L] bool (True: attend).
    """
    bins = _balanced_bins([len(p) for p in pieces], pack_length)
    width = max(sum(len(pieces[i]) for i in b) for b in bins)
    rows = [[pieces[i] for i in b] for b in bins]
    for row in rows:
        tail = width - sum(len(p) for p in row)
        if tail:
            row.append(_Piece([pad_token_id] * tail, [IGNORE_INDEX] * tail, list(range(tail)), [-1] * tail,
                              [0] * tail))
    t = {name: torch.tensor([[x for p in row for x in getattr(p, name)] for row in rows], dtype=torch.int64)
         for name in ("ids", "labels", "positions", "segments")}
    batch = {"input_ids": t["ids"], "position_ids": t["positions"], "labels": t["labels"], "segment_ids": t["segments"]}
    if shared:  # numpy: single-threaded, so small ops do not wait on torch's threads in a busy process
        mask = np.zeros((len(rows), 1, width, width), dtype=bool)
        for r, row in enumerate(rows):
            at = 0
            for p in row:  # the mask is block-diagonal: one block a pair (or the tail)
                mask[r, 0, at:at + len(p), at:at + len(p)] = shared_attention_mask(p.branches)
                at += len(p)
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch


def shared_attention_mask(branches):
    """Who attends to whom within one prompt-shared pair: causal, and a response branch sees the shared
    prefix (branch 0) and itself, never the other response.

    Shape: branches list of n ints (0 prefix, 1 chosen, 2 rejected), in row order.
    Returns [n, n] numpy bool, True where query token i may attend to key token j.
    """
    b = np.asarray(branches)
    causal = np.tri(len(b), dtype=bool)
    return causal & ((b[None, :] == 0) | (b[:, None] == b[None, :]))


def _view_sequences(examples, key, chosen_only):
    """(ids, labels) of one view's sequences: the chosen ones, then (unless chosen_only) the rejected ones."""
    sides = ("chosen",) if chosen_only else ("chosen", "rejected")
    return [(e[f"{key}{side}_ids"], e[f"{key}{side}_labels"]) for side in sides for e in examples]


def _pack_view(examples, pad_token_id, packing, pack_length, key, chosen_only):
    """One view of the batch in the given layout, its keys prefixed with `key`."""
    if packing == "padded":
        sequences = _view_sequences(examples, key, chosen_only)
        view = {"input_ids": _pad([ids for ids, _ in sequences], pad_token_id),
                "attention_mask": _pad([[1] * len(ids) for ids, _ in sequences], 0),
                "labels": _pad([labels for _, labels in sequences], IGNORE_INDEX)}
    elif packing == "packed" or chosen_only:
        pieces = [_sequence_piece(ids, labels, s)
                  for s, (ids, labels) in enumerate(_view_sequences(examples, key, chosen_only))]
        view = _pack(pieces, pack_length, pad_token_id, shared=False)
    else:
        pieces = [_shared_piece(e[f"{key}chosen_ids"], e[f"{key}chosen_labels"], e[f"{key}rejected_ids"],
                                e[f"{key}rejected_labels"], i, len(examples)) for i, e in enumerate(examples)]
        view = _pack(pieces, pack_length, pad_token_id, shared=True)
    return {key + name: value for name, value in view.items()}


def with_p_view(examples):
    """Whether tokenized examples (``tokenize_pairs``) have the p ⊕ x view."""
    return bool(examples) and "p_chosen_ids" in examples[0]


def collate(examples, pad_token_id, packing="padded", pack_length=None, chosen_only=False):
    """A batch of B examples as tensors, one view after another, in one of the PACKINGS layouts.

    Sequences are numbered chosen first (0..B-1), then rejected (B..2B-1); chosen_only keeps the first B (SFT).
    padded: "input_ids", "attention_mask", "labels" [S, T], right-padded (labels -100 on padding); row s is
        sequence s.
    packed: "input_ids", "position_ids", "labels", "segment_ids" [R, L]: the sequences back to back in rows
        of at most pack_length tokens (first-fit decreasing), positions restarting at 0 for each; segment_ids
        the sequence of each token, -1 on the row tails, the only padding.
    shared: as packed, but each pair's prompt once (chosen and rejected after one copy of it), with
        "attention_mask" [R, 1, L, L] bool that keeps the two responses apart.
    With the p view also the same keys prefixed "p_". Always "index" [B] int64; "n_tokens" (0-d int64: the x
    view's real tokens, prompts counted per sequence); with chosen_only "n_scored_chosen" (0-d
    int64: the chosen responses' scored tokens, SFT's denominator); "score_chosen", "score_rejected" [B] float32 (nan if
    unknown). pad_token_id None (a tokenizer without a pad token, e.g. Pythia's) pads with 0.
    """
    if not examples:
        raise ValueError("collate: no examples")
    if packing not in PACKINGS:
        raise ValueError(f"collate: packing {packing!r}: expected one of {', '.join(PACKINGS)}")
    if packing != "padded" and not (pack_length and pack_length > 0):
        raise ValueError(f"collate: packing {packing!r} needs a positive pack_length, got {pack_length!r}")
    pad_token_id = 0 if pad_token_id is None else pad_token_id  # any id: padding is masked and unscored
    with_p = {"p_chosen_ids" in e for e in examples}
    if len(with_p) > 1:
        raise ValueError("collate: some examples have the p view and some do not")
    batch = _pack_view(examples, pad_token_id, packing, pack_length, "", chosen_only)
    if with_p == {True}:
        batch.update(_pack_view(examples, pad_token_id, packing, pack_length, "p_", chosen_only))
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.int64)
    sequences = _view_sequences(examples, "", chosen_only)
    batch["n_tokens"] = torch.tensor(sum(len(ids) for ids, _ in sequences))
    if chosen_only:  # SFT's denominator, counted here in any layout
        batch["n_scored_chosen"] = torch.tensor(sum(sum(t != IGNORE_INDEX for t in labels[1:])
                                                    for _, labels in sequences))
    for key in ("score_chosen", "score_rejected"):
        batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


def steps_per_epoch(n, global_batch, log=None):
    """n // global_batch; the n % global_batch pairs left over are not used that epoch (logged if log)."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    steps, left = divmod(n, global_batch)
    if log and left:
        log(f"{left:,} of {n:,} pairs are not used each epoch ({steps:,} steps of {global_batch}; "
            f"each epoch draws a new order)")
    return steps


def batch_indices(n, global_batch, epoch, seed, rank=0, world=1):
    """For each step of the epoch, the pair indices this rank takes from that step's global batch.

    Deterministic in (n, global_batch, epoch, seed); ranks take disjoint contiguous slices
    [rank*G/world, (rank+1)*G/world) of each step's G shuffled indices. Returns list[list[int]].
    """
    if global_batch % world or not 0 <= rank < world:
        raise ValueError(f"global batch {global_batch} must split evenly over {world} ranks (rank {rank})")
    order = np.random.default_rng((seed, epoch)).permutation(n).tolist()
    share = global_batch // world
    return [order[s * global_batch + rank * share:s * global_batch + (rank + 1) * share]
            for s in range(steps_per_epoch(n, global_batch))]


def schedule(n, global_batch, seed, epochs=None, rank=0, world=1, start_step=0):
    """(epoch, step in epoch, indices) for global steps start_step, start_step + 1, ... of `epochs` epochs
    (None: without end). Each epoch's shuffled order is computed once, when the epoch starts.

    A run resumed at global step k yields exactly what the uninterrupted run yields from step k.
    """
    per_epoch = steps_per_epoch(n, global_batch)
    if per_epoch == 0:
        return
    for epoch in itertools.count(start_step // per_epoch) if epochs is None else range(start_step // per_epoch, epochs):
        steps = batch_indices(n, global_batch, epoch, seed, rank, world)
        for step in range(max(0, start_step - epoch * per_epoch), per_epoch):
            yield epoch, step, steps[step]
