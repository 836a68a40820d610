"""base/formats.py: preference records in, Pairs out: the accepted record formats and the readers of files and the hub.

    source_records(source, split) -> (where, record) ... -> record_to_pair(record, where) -> Pair

Owns: Pair, the record formats (HH-RLHF transcripts, {prompt, chosen, rejected}, shared-prefix texts,
ShareGPT, UltraFeedback) and their checks, reading .jsonl/.json(.gz) files and hub datasets, the rules that
drop a pair (Dropped).
Does not own: the embedded task (embedded.py), tokenisation or batches, or counting and reporting what was
dropped (data.py: Kept, report_kept). Rules: docs/data.md, Sources
and Record formats.
"""

import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass

from base import common
from base.common import DataError

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
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Pair:
    """One preference pair: prompt (text, or chat messages ending in a user turn), two responses."""
    prompt: "str | tuple[dict, ...]"
    chosen: str
    rejected: str
    score_chosen: "float | None" = None
    score_rejected: "float | None" = None


class Dropped(Exception):
    """A pair dropped by a documented rule; the argument is the reason counted in the summary."""


# ----------------------------------------------------------------------------- records -> Pair


def _field(record, name, where):
    """record[name], or DataError naming the field and the accepted formats (``common.field``)."""
    return common.field(record, name, where, error=DataError, missing=f"expected one of: {FORMATS}")


def _text(record, name, where):
    """A field that must be a string (``common.field``)."""
    return common.field(record, name, where, str, DataError, f"expected one of: {FORMATS}", "a string")


def _score(record, name, where):
    """An optional numeric field: None when absent or null."""
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field '{name}' must be a number or null, got {value!r:.40}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value} (too large, or NaN)")
    return value


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
        raise Dropped("no assistant turn")
    return messages[:-1], messages[-1]["content"]


def _make_pair(prompt, chosen, rejected, score_chosen, score_rejected):
    """A Pair, unless a rule drops it (empty response, identical responses, chat not ending in a user turn)."""
    if not chosen.strip() or not rejected.strip():
        raise Dropped("empty response")
    if chosen == rejected:
        raise Dropped("identical responses")
    if not isinstance(prompt, str) and (not prompt or prompt[-1]["role"] != "user"):
        raise Dropped("prompt not ending in a user turn")
    return Pair(prompt, chosen, rejected, score_chosen, score_rejected)


def _split_transcript(text):
    """(prompt up to and including the last '\\n\\nAssistant:', response) of an HH transcript."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise Dropped("no assistant turn")
    response = text[cut + len(HH_ASSISTANT):]
    if HH_HUMAN in response:
        raise Dropped("irregular transcript")
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
            raise Dropped("identical responses")
        prompt, chosen, rejected = _implicit_prompt(*transcripts)
        if not prompt:
            raise DataError(f"{where}: field 'prompt' missing (no HH transcript, and chosen and rejected share "
                            f"no prefix to take as the prompt); expected one of: {FORMATS}")
        return _make_pair(prompt, chosen, rejected, _score(record, "score_chosen", where),
                          _score(record, "score_rejected", where))
    (prompt_c, chosen), (prompt_r, rejected) = map(_split_transcript, transcripts)
    if prompt_c != prompt_r:
        raise Dropped("prompt mismatch")
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
        raise Dropped("no assistant turn")
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
            raise Dropped("prompt mismatch")
        return messages
    if not history:
        return ({"role": "user", "content": prompt},)
    if not any(m["role"] == "user" and m["content"] == prompt for m in history):
        raise Dropped("prompt mismatch")
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
        raise Dropped("prompt mismatch")
    chat = not isinstance(prompt, str) or isinstance(record["chosen"], list) or isinstance(record["rejected"], list)
    prompt = _chat_prompt(prompt, history_c, where) if chat else prompt
    return _make_pair(prompt, chosen, rejected,
                      _score(record, "score_chosen", where), _score(record, "score_rejected", where))


def record_to_pair(record, where):
    """One record of any accepted format as a Pair; DataError for bad input, Dropped by rule.

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
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut stream, EOFError
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _json_error(path, e, first_line=1):
    """DataError for a json.JSONDecodeError in text that starts on first_line of the file."""
    return DataError(f"{path}:{e.lineno + first_line - 1}: malformed JSON ({e.msg} at column {e.colno})")


def _parse_int(digits):
    """An integer literal; past Python's int-str limit, a float (inf), which a field check then refuses."""
    return int(digits) if len(digits) < 4000 else float(digits)


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _raw_decode(text, path, index=0, first_line=1):
    """json.JSONDecoder.raw_decode with its faults as DataError naming the file and line."""
    try:
        return _DECODER.raw_decode(text, index)
    except json.JSONDecodeError as e:
        raise _json_error(path, e, first_line) from None
    except RecursionError:
        line = first_line + text.count("\n", 0, index)
        raise DataError(f"{path}:{line}: JSON nested too deeply to read") from None


def _loads(text, path, first_line=1):
    """One JSON value filling ``text`` (json.loads), faults as in ``_raw_decode``."""
    start = len(text) - len(text.lstrip())
    value, end = _raw_decode(text, path, start, first_line)
    if text[end:].strip():
        raise _json_error(path, json.JSONDecodeError("Extra data", text, end), first_line)
    return value


def _json_lines(data, path):
    """(where, record) for each non-blank line of JSON Lines bytes."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        text = _decode(raw, path, number).removeprefix("\ufeff" if number == 1 else "")
        if not text.strip():
            continue
        yield f"{path}:{number}", _loads(text, path, number)


def _json_array(text, path, start=0, closing=""):
    """(where, record) for each element of the JSON array at text[start:], where = the line it starts on.

    closing: the text that must follow the array's "]" ("}" for the array of {"data": [...]}).
    """
    ws = re.compile(r"\s*")
    i = ws.match(text, start + 1).end()
    while not text.startswith("]", i):
        record, end = _raw_decode(text, path, i)
        yield f"{path}:{text.count(chr(10), 0, i) + 1}", record
        i = ws.match(text, end).end()
        if text.startswith(",", i):
            i = ws.match(text, i + 1).end()
        elif not text.startswith("]", i):
            raise _json_error(path, json.JSONDecodeError("expected ',' or ']'", text, i))
    i = ws.match(text, i + 1).end()
    if not text.startswith(closing, i) or text[i + len(closing):].strip():
        if closing:
            _not_records(text, path)  # an object with other keys beside "data"
        raise _json_error(path, json.JSONDecodeError(f"expected {closing or 'the end of the file'!r}", text, i))


_DATA_KEY = re.compile(r'\{\s*"data"\s*:\s*\[')


def _not_records(text, path):
    """DataError for a .json file holding one object that is neither {"data": [...]} nor a JSON Lines
    record (it spans lines, or has a "data" key); nothing when it is no single JSON value."""
    try:
        value = _loads(text, path)
    except DataError:
        return  # not one JSON value: read as JSON Lines, which names the line at fault
    if isinstance(value, dict) and ("data" in value or "\n" in text.strip()):
        keys = ", ".join(json.dumps(k) for k in list(value)[:5]) or "none"
        raise DataError(f"{path}: a JSON object with keys {keys}; expected a list of records, an object whose "
                        'only key is "data" holding that list, or JSON Lines (one record per line)')


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
        if text.startswith("{", start) and ("\n" in text.strip() or '"data"' in text):
            _not_records(text, path)
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
