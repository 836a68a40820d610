"""data.py: preference pairs in, exact token batches out, for the plain query x and the
prompt-augmented query p ⊕ x (paper, Section 3.2.2 and Appendix C).

    load_pairs(source, split) -> [Pair] -> tokenize_pairs(...) -> [example] -> collate(...) -> tensors
    schedule(n, global_batch, seed, ...) -> which examples each step takes, on each rank

Owns: the pipeline: load_pairs (from base/formats.py's readers or base/embedded.py), what it keeps and drops,
counted and reported (Kept, keep_all, report_kept), tokenization of both views, collate (base/packing.py packs
the rows), moving a batch to a device (to_device) and the batch order (steps_per_epoch, batch_indices, schedule).
Does not own: record formats and file or hub readers (base/formats.py), the embedded task (base/embedded.py),
row packing (base/packing.py), models (training/models.py), losses (srpo.py) or any metric (training/metrics.py).

Sources, record formats, tokenisation of the two views, the embedded dataset and the batch order: see
docs/data.md (one place; tests/test_data.py, test_formats.py and test_embedded.py check each rule).

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

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from base.common import ConfigError, DataError, Progress
from base.defaults import MAX_LENGTH
from base.embedded import embedded_pairs
from base.formats import HH_ASSISTANT, Dropped, record_to_pair, source_records
from base.packing import pack, sequence_piece, shared_piece
from srpo import IGNORE_INDEX

_TRANSCRIPT_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_MARK = "\ue000srpo-p\ue000"  # placed where p goes in a chat; never left in any output

PACKINGS = ("padded", "packed", "shared")  # batch layouts of collate


# ----------------------------------------------------------------------------- kept and dropped, counted


def kept_line(kept, dropped, what="pairs"):
    """'kept 2,304 of 2,312 pairs; dropped 4 empty response, 4 prompt mismatch' (dropped: reason -> count)."""
    line = f"kept {kept:,} of {kept + sum(dropped.values()):,} {what}"
    if dropped:
        line += "; dropped " + ", ".join(f"{n:,} {reason}" for reason, n in dropped.items())
    return line


class Kept(list):
    """The items kept (a list), with ``dropped``: a Counter of reasons -> how many were dropped."""

    def __init__(self, items=(), dropped=()):
        super().__init__(items)
        self.dropped = Counter(dropped)


def keep_all(items, convert):
    """([convert(item) for each item], Counter of reasons) without the items that raise Dropped."""
    kept, dropped = [], Counter()
    for item in items:
        try:
            kept.append(convert(item))
        except Dropped as d:
            dropped[d.args[0]] += 1
    return kept, dropped


def report_kept(label, kept, dropped, log, extra=""):
    """Log the one summary line; DataError (with that line) when nothing was kept."""
    line = f"{label}: {kept_line(len(kept), dropped)}{extra}"
    if not kept:
        raise DataError(f"{line}; nothing left")
    if log:
        log(line)


def load_pairs(source="embedded", split="train", log=print):
    """Preference pairs of a source (docs/data.md, Sources), with one summary line of kept/dropped.

    source: "embedded", a local .jsonl/.jsonl.gz/.json path (split ignored), or a hub dataset name.
    Returns list[Pair] (a Kept: .dropped counts the records dropped, by reason). Raises DataError on
    bad input or when no pair is left.
    """
    if source == "embedded":
        pairs, dropped = embedded_pairs(split), Counter()
        label = f"embedded/{split}"
    else:
        source = os.path.expanduser(os.fspath(source))
        pairs, dropped = keep_all(source_records(source, split), lambda item: record_to_pair(item[1], item[0]))
        label = source if os.path.isfile(source) else f"{source} [{split}]"
    report_kept(label, pairs, dropped, log)
    return Kept(pairs, dropped)


@dataclass(frozen=True)
class _Tokens:
    """What tokenisation needs to know about a tokenizer."""
    bos: "int | None"  # prepended once when the tokenizer uses a BOS
    eos: int
    template: bool     # has a chat template
    added: tuple       # the text of its added tokens (no token spans one)
    chat: "ChatOptions | None" = None  # options of the chat template (None: none)


@dataclass(frozen=True)
class ChatOptions:
    """Options of chat-templated prompts (train.py's and evaluate.py's --chat_template_kwargs, --system_prompt).

    template_kwargs: extra variables for every apply_chat_template call (e.g. {"enable_thinking": False}),
    as (name, value) pairs. system: a system message put first in chat prompts that have none. Neither
    touches plain-text prompts or the HH transcript of a tokenizer without a template.
    """
    template_kwargs: tuple = ()
    system: "str | None" = None

    @classmethod
    def of(cls, template_kwargs=None, system=None):
        """ChatOptions of a JSON object text (or dict) and a system text; None when both are empty."""
        if isinstance(template_kwargs, str):
            template_kwargs = parse_template_kwargs(template_kwargs)
        if not template_kwargs and not system:
            return None
        return cls(tuple(sorted((template_kwargs or {}).items())), system or None)


def parse_template_kwargs(text, flag="--chat_template_kwargs"):
    """A JSON object of a flag's text ("" or None: {}); DataError in one line otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise DataError(f"{flag} {text!r}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{flag} {text!r}: expected a JSON object such as '{{\"enable_thinking\": false}}'")
    return value


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


def _inspect(tokenizer, chat=None):
    """The _Tokens of a tokenizer: it uses BOS iff it prepends bos_token_id when asked for special tokens."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no EOS token; set tokenizer.eos_token")
    bos = tokenizer.bos_token_id
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    uses_bos = bos is not None and with_special[:1] == [bos] and _encode(tokenizer, "a")[:1] != [bos]
    added = tuple(t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t)
    return _Tokens(bos if uses_bos else None, tokenizer.eos_token_id, bool(getattr(tokenizer, "chat_template", None)),
                   added, chat)


def _transcript(messages):
    """Chat messages as an HH transcript: "\\n\\nHuman: ...\\n\\nAssistant: ...", ending in "\\n\\nAssistant:"."""
    turns = "".join(f"\n\n{_TRANSCRIPT_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}"
                    for m in messages)
    return turns + HH_ASSISTANT


def _template_halves(messages, tokenizer, chat=None):
    """The rendered chat (with generation prompt), split where the first user message's content begins.

    The split is found by rendering once more with a marker before that content; the text itself is
    the plain rendering, so templates that trim or otherwise touch the content render as they would.
    """
    kwargs = dict(chat.template_kwargs) if chat else {}

    def render(messages):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError (raise_exception), or an error in the template
            first = " ".join(str(e).split())[:200]
            raise DataError(f"the chat template failed ({type(e).__name__}: {first})") from None

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
    system = bool(tokens.chat and tokens.chat.system and not any(m["role"] == "system" for m in prompt))
    if system:
        prompt = ({"role": "system", "content": tokens.chat.system}, *prompt)
    try:
        head_text, tail_text = _template_halves(prompt, tokenizer, tokens.chat)
    except DataError as err:
        if not system:
            raise
        _template_halves(prompt[1:], tokenizer, tokens.chat)  # fails too: the chat itself, not the system role
        raise ConfigError(f"--system_prompt: the tokenizer's chat template refuses a system message ({err}); "
                          f"give no --system_prompt") from None
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


def encode_prompt(prompt, tokenizer, refine_prompt=None, chat=None):
    """The query's token ids, as trained on and as given to generation (no truncation).

    prompt: text (encoded literally), or chat messages (the chat template with generation prompt
    where the tokenizer has one, else an HH transcript ending in "\\n\\nAssistant:").
    refine_prompt: p; its tokens go directly before the query's (for a chat: at the start of the first
    user message). BOS, where used, exactly once and first. chat: ChatOptions. Returns list[int].
    """
    query = _query(prompt, tokenizer, _inspect(tokenizer, chat))
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
    """One pair's example (module docstring), or Dropped; counts what truncation cut into `cut`."""
    query = _query(pair.prompt, tokenizer, tokens)
    notes["p placed before a token spanning the first user message"] += query.p_moved and p is not None
    chosen, rejected = (ids + [tokens.eos] for ids in _responses(pair, tokenizer, query, notes))
    prefix, x = query.prefix, query.ids
    longest = max(len(chosen), len(rejected))
    keep_p, room = _fit(len(prefix) + len(p or []), len(x), longest, max_length, min(len(x), min_prompt))
    chosen, rejected = chosen[:max(room, 0)], rejected[:max(room, 0)]
    if not chosen or not rejected:
        raise Dropped("response truncated away")
    if keep_p == 0 < len(x):
        raise Dropped("no room for the query")
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


def tokenize_pairs(pairs, tokenizer, max_length=MAX_LENGTH, refine_prompt=None, log=print, min_prompt_length=None,
                   p_view=True, progress=False, chat=None):
    """One example per kept pair: the x view, and the p ⊕ x view when refine_prompt is given and p_view.

    Keys: "index" (position in the returned list), "pair_index" (position in `pairs`),
    "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels" (list[int]; -100 on the prompt),
    with the p view also "p_chosen_ids", "p_chosen_labels", "p_rejected_ids", "p_rejected_labels";
    "score_chosen", "score_rejected" (float, nan if unknown). Truncation: module docstring; with
    refine_prompt and p_view=False it is the same as with the p view (the x view of a run without
    p equals a Sr run's), and only the x view is returned.
    min_prompt_length: a query is cut no shorter than this to make room for a response (default:
    half of max_length less BOS and p's tokens). Logs one summary line; DataError when no pair is left.
    progress: a ``Progress`` line while it works (True: on stderr; or a text stream). chat: ChatOptions.
    Returns a Kept list: .dropped counts the pairs dropped, by reason.
    """
    tokens = _inspect(tokenizer, chat)
    p = _encode(tokenizer, refine_prompt) if refine_prompt else None
    fixed = len(p or []) + (tokens.bos is not None)
    if max_length - fixed < 2:
        raise DataError(f"max_length={max_length} leaves no room for a query and a response "
                        f"after {fixed} tokens of BOS and refinement prompt")
    min_prompt = (max_length - fixed) // 2 if min_prompt_length is None else min_prompt_length
    cut, notes = Counter(), Counter()

    def convert(item):
        try:
            example = _tokenize_pair(item[1], tokenizer, tokens, max_length, p, min_prompt, cut, notes, p_view)
        except DataError as e:
            raise DataError(f"pair {item[0]} (0-based, of the loaded pairs): {e}") from None
        if example["chosen_labels"] == example["rejected_labels"]:  # e.g. a long shared opening cut at max_length
            raise Dropped("identical after truncation")
        example["pair_index"] = item[0]
        return example

    bar = Progress(len(pairs), "tokenizing", "pairs", enabled=progress)
    examples, dropped = keep_all(bar.iterate(enumerate(pairs)), convert)
    for i, example in enumerate(examples):
        example["index"] = i
    truncated = ", ".join(f"{n:,} {what}" for what, n in cut.items() if n)
    noted = "".join(f"; {n:,} {what}" for what, n in notes.items() if n)
    view = "" if p is None else ", with p" if p_view else ", cut as with p"
    report_kept(f"tokenized (max_length={max_length}{view})", examples, dropped, log,
            (f"; truncated {truncated}" if truncated else "") + noted)
    return Kept(examples, dropped)


# ----------------------------------------------------------------------------- batches and order


def _pad(rows, value):
    """Right-padded [len(rows), max length] int64 tensor of lists of ints."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


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
        pieces = [sequence_piece(ids, labels, s)
                  for s, (ids, labels) in enumerate(_view_sequences(examples, key, chosen_only))]
        view = pack(pieces, pack_length, pad_token_id, shared=False)
    else:
        pieces = [shared_piece(e[f"{key}chosen_ids"], e[f"{key}chosen_labels"], e[f"{key}rejected_ids"],
                                e[f"{key}rejected_labels"], i, len(examples)) for i, e in enumerate(examples)]
        view = pack(pieces, pack_length, pad_token_id, shared=True)
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


def to_device(batch, device):
    """A collated batch's tensors moved to device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
