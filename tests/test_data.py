"""data.py: the two views, formats, truncation, order, resume and bad input. No network."""
import functools
import math
import os
import random
import string
from collections import Counter

import pytest
import torch

import data
from base import embedded
from base.common import DataError
from base.formats import Pair
from srpo import IGNORE_INDEX, REFINE_PROMPT, sequence_logps

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
P = REFINE_PROMPT
CHAT_BOS = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT_PLAIN = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant] {% endif %}")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "Human", "Assistant", "café", "naïve", "日本", "!", "?", "\n",
         "  ", "Query:", "100", "x", "ünïcode", "🙂", "tab\t", "<s>", "</s>"]
HH_TEXT = "\n\nHuman: How do I bake bread?\n\nAssistant: I'm not sure, the oven is hot. I'd knead it."


def fixture(name):
    return os.path.join(FIXTURES, name)


# ----------------------------------------------------------------------------- tokenizers


def byte_tokenizer(template=None):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE trained in memory that prepends <s> (id 1) and has EOS </s> (id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([P, " ".join(WORDS), "Copy: ABDEF\n the cat sat on the mat"] * 4, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def bpe_chat(bpe):
    import copy

    tok = copy.deepcopy(bpe)
    tok.chat_template = CHAT_BOS
    return tok


ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def spm():
    """A sentencepiece-style BPE in Llama-2's layout: a normalizer prepends '▁' and writes spaces as '▁'
    (pieces only start with '▁', as sentencepiece's do); BOS <s> (1), EOS </s> (2), zephyr's role tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)  # for training only
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<|user|>",
                                                                  "<|assistant|>", "<|system|>"],
                                  initial_alphabet=list(string.printable + "".join(WORDS)))
    core.train_from_iterator([P, " ".join(WORDS), HH_TEXT] * 4, trainer)
    core.pre_tokenizer = None
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def spm_chat(spm):
    import copy

    tok = copy.deepcopy(spm)
    tok.chat_template = "{{ bos_token }}" + ZEPHYR
    return tok


def test_fixture_tokenizers_are_what_the_tests_assume(bpe):
    assert bpe.encode("the cat", add_special_tokens=True)[0] == bpe.bos_token_id == 1
    assert bpe.bos_token_id not in bpe.encode("the cat", add_special_tokens=False)
    assert len(bpe.encode("the cat sat", add_special_tokens=False)) < len("the cat sat")  # real merges
    assert byte_tokenizer().bos_token_id is None and byte_tokenizer().eos_token_id == 1


# ----------------------------------------------------------------------------- random pairs


def random_text(rng, lo=1, hi=12):
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", " "]) for _ in range(rng.randint(lo, hi)))


def random_pair(rng, chat, lo=1, hi=12):
    """A random Pair: plain text, or a chat (optionally with a system message and earlier turns).

    Chat contents start with a non-space, so a BPE encodes the rendered chat the same whole or
    split where a message's content begins (data.py encodes it split there; see full_query).
    """
    if chat:
        # special-token text in a chat is parsed as special tokens, as apply_chat_template does
        say = lambda role, lo=1, hi=12: {  # noqa: E731
            "role": role, "content": "x" + random_text(rng, lo, hi).replace("<s>", "").replace("</s>", "")}
        turns = [say("system")] if rng.random() < 0.4 else []
        for _ in range(rng.randint(0, 2)):
            turns += [say("user", lo, hi), say("assistant")]
        prompt = tuple(turns + [say("user", lo, hi)])
    else:
        prompt = random_text(rng, lo, hi)
    chosen = random_text(rng, lo, hi)
    return Pair(prompt, chosen, "~" + chosen + random_text(rng), rng.random(), None)  # differ in the first token


def scored(labels):
    return [t for t in labels if t != IGNORE_INDEX]


def split_example(ids, labels):
    """(prompt ids, response ids) of one sequence; checks labels copy ids on the response suffix."""
    n = sum(t == IGNORE_INDEX for t in labels)
    assert all(t == IGNORE_INDEX for t in labels[:n]), "prompt labels must be one -100 prefix"
    assert labels[n:] == ids[n:], "response labels must equal the response ids"
    return ids[:n], ids[n:]


def without(seq, part, at):
    assert seq[at:at + len(part)] == part, "p's tokens are not where they belong"
    return seq[:at] + seq[at + len(part):]


def literal(tok, text):
    """Token ids of text with special-token text kept as text."""
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def hh(messages):
    """A chat as an HH transcript, written out here independently of data.py."""
    roles = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{roles[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def full_query(tok, prompt):
    """The query ids independently of data.py: the template via apply_chat_template, or the text."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if isinstance(prompt, str) or not tok.chat_template:
        text = prompt if isinstance(prompt, str) else hh(prompt)
        return bos + literal(tok, text)
    ids = tok.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return ids if ids[:1] == bos else bos + ids


def continuation(tok, prompt, text):
    """(ids, apart): text's tokens as they follow the prompt's text (after a template's last special token);
    where a token spans that boundary (apart), as they follow a newline. A chat without a template is an HH
    transcript, the reply after a space."""
    if isinstance(prompt, str) or not tok.chat_template:
        context = prompt if isinstance(prompt, str) else hh(prompt)
        text = text if isinstance(prompt, str) else " " + text
    else:
        rendered = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        special = [t for t in tok.added_tokens_encoder if t in rendered]
        context = rendered[max((rendered.rfind(t) + len(t) for t in special), default=0):] or "\n"
    for apart, anchor in enumerate((context, "\n")):
        before, joint = literal(tok, anchor), literal(tok, anchor + text)
        if joint[:len(before)] == before:
            return joint[len(before):], bool(apart)
    return literal(tok, text), True


def p_position(tok, prompt, bos):
    """Where p's tokens start in the untruncated p view: after BOS, or at the first user message's content."""
    if isinstance(prompt, str) or not tok.chat_template:
        return len(bos)
    first = next(i for i, m in enumerate(prompt) if m["role"] == "user")
    probe = [dict(m, content="\x01") if i == first else m for i, m in enumerate(prompt)]
    text = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    head = tok.encode(text[:text.index("\x01")], add_special_tokens=False)
    return len(bos) + len([t for t in head if t != tok.bos_token_id])


def check_example(ex, pair, tok, max_length, refine=True):
    """All the invariants of one tokenised example, against independently computed token ids."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = tok.eos_token_id
    p = literal(tok, P) if refine else []
    query = full_query(tok, pair.prompt)[len(bos):]
    full = {side: continuation(tok, pair.prompt, text)[0] + [eos]
            for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected))}
    longest_full = max(map(len, full.values()))
    longest = max(len(scored(ex["chosen_labels"])), len(scored(ex["rejected_labels"])))
    for side, response in full.items():
        x_prompt, x_resp = split_example(ex[f"{side}_ids"], ex[f"{side}_labels"])
        assert x_resp and response[:len(x_resp)] == x_resp, "scored tokens are a prefix of response + EOS"
        assert x_prompt[:len(bos)] == bos, "BOS first"
        assert query[len(query) - len(x_prompt) + len(bos):] == x_prompt[len(bos):], "oldest query tokens go first"
        assert len(x_prompt) - len(bos) == min(len(query), max_length - len(bos) - longest), "x view keeps all it can"
        if len(bos) + len(query) + longest_full <= max_length:
            assert x_prompt == bos + query, "the query is not cut when it fits"
        if len(bos) + len(p) + len(query) + longest_full <= max_length:
            assert x_resp == response, "the response is not cut when the longest view fits"
        for key in ("", "p_") if refine else ("",):
            ids = ex[f"{key}{side}_ids"]
            assert len(ids) <= max_length
            assert not bos or ids[1:].count(bos[0]) == 0, "BOS exactly once"
        if not refine:
            continue
        p_prompt, p_resp = split_example(ex[f"p_{side}_ids"], ex[f"p_{side}_labels"])
        assert scored(ex[f"p_{side}_labels"]) == scored(ex[f"{side}_labels"]), "the two views score different tokens"
        assert p_resp == x_resp
        kept = len(p_prompt) - len(bos) - len(p)
        at = max(len(bos), p_position(tok, pair.prompt, bos) - (len(query) - kept))
        rest = without(p_prompt, p, at)
        assert rest[:len(bos)] == bos and x_prompt[len(x_prompt) - len(rest) + len(bos):] == rest[len(bos):], \
            "the p view's query must be the newest tokens of the x view's query"
        if len(x_prompt) + len(p) + longest <= max_length:
            assert rest == x_prompt, "the p view must be the x view with p inserted when it fits"


TOKENIZERS = {"byte": lambda req: byte_tokenizer(), "bpe": lambda req: req.getfixturevalue("bpe"),
              "bpe-chat": lambda req: req.getfixturevalue("bpe_chat"), "spm": lambda req: req.getfixturevalue("spm"),
              "spm-chat": lambda req: req.getfixturevalue("spm_chat"),
              "byte-chat": lambda req: byte_tokenizer(CHAT_PLAIN)}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_two_views_score_the_same_tokens_and_p_comes_first(name, request):
    tok = TOKENIZERS[name](request)
    rng = random.Random(name)
    pairs = [random_pair(rng, chat=i % 2 == 1) for i in range(24)]
    examples = data.tokenize_pairs(pairs, tok, 512, P, log=None)
    assert [e["pair_index"] for e in examples] == list(range(len(pairs)))
    p = tok.encode(P, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for pair, ex in zip(pairs, examples):
        check_example(ex, pair, tok, 512)
        if isinstance(pair.prompt, str) or not tok.chat_template:
            assert ex["p_chosen_ids"][:len(bos) + len(p)] == bos + p, "p ⊕ x must start with p's tokens"
    if tok.chat_template:  # p at the start of the first user message, after the system turn
        chat = ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"})
        ids = data.encode_prompt(chat, tok, P)
        render = functools.partial(tok.apply_chat_template, tokenize=False, add_generation_prompt=True)
        if tok.decode(full_query(tok, chat)) == render(list(chat)):  # where decoding is exact (not spm)
            assert tok.decode(ids) == render([chat[0], {"role": "user", "content": P + "Hi"}])
        at = p_position(tok, chat, bos)
        assert at > len(bos) and without(ids, p, at) == full_query(tok, chat)


def test_x_view_is_the_same_with_or_without_p(bpe_chat):
    """...unless a response had to be cut to fit the p view (module docstring, truncation rule)."""
    rng = random.Random(1)
    pairs = [random_pair(rng, chat=i % 2 == 0, hi=40) for i in range(30)]
    p_len = len(literal(bpe_chat, P))
    cases = Counter()
    for max_length in (512, p_len + 60):
        with_p = data.tokenize_pairs(pairs, bpe_chat, max_length, P, log=None)
        plain = {e["pair_index"]: e for e in data.tokenize_pairs(pairs, bpe_chat, max_length, None, log=None)}
        assert "p_chosen_ids" not in plain[0]
        for e in with_p:
            pair = pairs[e["pair_index"]]
            cut = scored(e["chosen_labels"]) != literal(bpe_chat, pair.chosen) + [bpe_chat.eos_token_id]
            cut |= scored(e["rejected_labels"]) != literal(bpe_chat, pair.rejected) + [bpe_chat.eos_token_id]
            same = all(e[k] == plain[e["pair_index"]][k] for k in ("chosen_ids", "chosen_labels", "rejected_ids",
                                                                   "rejected_labels"))
            assert same or cut
            cases[same, len(e["chosen_ids"]) - len(scored(e["chosen_labels"]))
                  < len(full_query(bpe_chat, pair.prompt))] += 1
    assert cases[True, True] and cases[True, False] and cases[False, True], cases


@pytest.mark.parametrize("name", TOKENIZERS)
def test_truncation_keeps_the_scored_tokens_identical(name, request):
    tok = TOKENIZERS[name](request)
    rng = random.Random("cut" + name)
    pairs = [random_pair(rng, chat=i % 2 == 1, lo=5, hi=60) for i in range(24)]
    bos = int(tok.bos_token_id is not None)
    p_len = len(literal(tok, P))
    cases = Counter()
    for max_length in (p_len + 40, p_len + 120, p_len + 600):
        lines = []
        examples = data.tokenize_pairs(pairs, tok, max_length, P, log=lines.append)
        assert len(lines) == 1 and len(examples) == len(pairs)
        floor = (max_length - bos - p_len) // 2
        for ex in examples:
            pair = pairs[ex["pair_index"]]
            check_example(ex, pair, tok, max_length)
            n = len(full_query(tok, pair.prompt)) - bos
            full = max(len(continuation(tok, pair.prompt, t)[0]) + 1 for t in (pair.chosen, pair.rejected))
            longest = max(len(scored(ex["chosen_labels"])), len(scored(ex["rejected_labels"])))
            kept_p = len(ex["p_chosen_ids"]) - len(scored(ex["p_chosen_labels"])) - bos - p_len
            if longest < full:  # a response was cut: the p view is full and its query at the floor
                assert max(len(ex["p_chosen_ids"]), len(ex["p_rejected_ids"])) == max_length
                assert kept_p == min(n, floor)
            else:
                assert kept_p == min(n, max_length - bos - p_len - longest)
            cases[longest < full, kept_p < n] += 1
    assert cases[True, True] and cases[False, True] and cases[False, False], cases


def test_truncation_rule_by_hand():
    """Byte tokenizer, so token counts are byte counts: a 30-byte query and responses of 9 and 4 bytes."""
    tok = byte_tokenizer()
    pair = Pair("abcdefghijklmnopqrstuvwxyz0123", "RESPONSE1", "RESP")
    q = len(P.encode())

    def views(max_length, refine=None, min_prompt_length=None):
        (ex,) = data.tokenize_pairs([pair], tok, max_length, refine, log=None, min_prompt_length=min_prompt_length)
        return [tok.decode(ex[k]) for k in ex if k.endswith("_ids")]

    # 20 tokens: the longer response + EOS is 10, so the query keeps its newest 10 bytes
    assert views(20, min_prompt_length=4) == ["uvwxyz0123RESPONSE1</s>", "uvwxyz0123RESP</s>"]
    # 16 tokens, floor 8: the query keeps 8 bytes and the responses are cut to 8 (EOS goes first)
    assert views(16, min_prompt_length=8) == ["wxyz0123RESPONSE", "wxyz0123RESP</s>"]
    # with p and 14 tokens after it: floor 8, responses cut to 6; the x view keeps the whole query
    assert views(q + 14, P, 8) == [pair.prompt + "RESPON", pair.prompt + "RESP</s>",
                                   P + "wxyz0123RESPON", P + "wxyz0123RESP</s>"]
    # the default floor is half the room after p: 7
    assert views(q + 14, P) == [pair.prompt + "RESPONS", pair.prompt + "RESP</s>",
                                P + "xyz0123RESPONS", P + "xyz0123RESP</s>"]
    # 20 tokens after p: the responses fit, the p view's query loses 20 of 30, the x view's none
    assert views(q + 20, P) == [pair.prompt + "RESPONSE1</s>", pair.prompt + "RESP</s>",
                                P + "uvwxyz0123RESPONSE1</s>", P + "uvwxyz0123RESP</s>"]
    assert views(q + 40, P) == [pair.prompt + "RESPONSE1</s>", pair.prompt + "RESP</s>",
                                P + pair.prompt + "RESPONSE1</s>", P + pair.prompt + "RESP</s>"]


def test_truncation_drops_are_counted():
    tok = byte_tokenizer()
    p_len = len(P.encode())
    pairs = [Pair("q" * 12, "a" * 30, "b"), Pair("q" * 10, "a", "b")]
    lines = []
    examples = data.tokenize_pairs(pairs, tok, p_len + 12, P, log=lines.append, min_prompt_length=0)
    # pair 0: 12 tokens after p, a 31-token response: floor 0 leaves the query nothing
    assert [e["pair_index"] for e in examples] == [1] and [e["index"] for e in examples] == [0]
    assert lines == [f"tokenized (max_length={p_len + 12}, with p): kept 1 of 2 pairs; "
                     f"dropped 1 no room for the query"]
    lines.clear()
    examples = data.tokenize_pairs(pairs, tok, 12, None, log=lines.append, min_prompt_length=12)
    # pair 0: the query keeps its 12 bytes (the floor), which leaves no room for a response
    assert [e["pair_index"] for e in examples] == [1]
    assert lines == ["tokenized (max_length=12): kept 1 of 2 pairs; dropped 1 response truncated away"]
    lines.clear()
    assert len(data.tokenize_pairs(pairs, tok, 20, None, log=lines.append)) == 2
    assert lines == ["tokenized (max_length=20): kept 2 of 2 pairs; truncated 1 prompts, 1 responses"]
    lines.clear()
    data.tokenize_pairs(pairs, tok, p_len + 8, P, log=lines.append)
    # 8 tokens after p, floor 4: pair 0 keeps 4 query tokens and 4 of its response; pair 1 keeps 6 of 10
    # query tokens; both x views keep their whole query
    assert lines == [f"tokenized (max_length={p_len + 8}, with p): kept 2 of 2 pairs; truncated 1 responses, "
                     f"2 more prompts in the p view"]
    with pytest.raises(DataError, match="kept 0 of 1 pairs; dropped 1 response truncated away; nothing left"):
        data.tokenize_pairs(pairs[:1], tok, 12, None, log=None, min_prompt_length=12)
    with pytest.raises(DataError, match="leaves no room"):
        data.tokenize_pairs(pairs, tok, p_len + 1, P, log=None)


def test_bos_exactly_once_even_when_the_template_writes_it(bpe, bpe_chat):
    import copy

    messages = ({"role": "user", "content": "the cat"},)
    no_bos_template = copy.deepcopy(bpe)  # a BOS tokenizer whose template does not write it (zephyr-like)
    no_bos_template.chat_template = CHAT_PLAIN
    for tok, prompt in ((bpe, "the cat"), (bpe_chat, messages), (no_bos_template, messages)):
        for refine in (None, P):
            ids = data.encode_prompt(prompt, tok, refine)
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert data.encode_prompt(messages, bpe_chat) == full_query(bpe_chat, messages)
    assert data.encode_prompt("ab", byte_tokenizer()) == [ord("a") + 3, ord("b") + 3]


def test_special_token_text_in_the_data_stays_text(bpe):
    for tok in (bpe, byte_tokenizer()):
        (ex,) = data.tokenize_pairs([Pair("say <s>", "a</s>", "b")], tok, 512, P, log=None)
        assert scored(ex["chosen_labels"]) == literal(tok, "a</s>") + [tok.eos_token_id]
        assert scored(ex["chosen_labels"]).count(tok.eos_token_id) == 1
        assert ex["p_chosen_ids"].count(tok.bos_token_id) == (tok.bos_token_id is not None)


def test_encode_prompt_is_the_prompt_of_the_example(bpe_chat):
    rng = random.Random(5)
    for tok in (bpe_chat, byte_tokenizer(), byte_tokenizer(CHAT_PLAIN)):
        pairs = [random_pair(rng, chat=i % 2 == 0) for i in range(6)]
        for pair, ex in zip(pairs, data.tokenize_pairs(pairs, tok, 4096, P, log=None)):  # nothing cut
            n = len(ex["chosen_ids"]) - len(scored(ex["chosen_labels"]))
            n_p = len(ex["p_chosen_ids"]) - len(scored(ex["p_chosen_labels"]))
            assert data.encode_prompt(pair.prompt, tok) == ex["chosen_ids"][:n]
            assert data.encode_prompt(pair.prompt, tok, P) == ex["p_chosen_ids"][:n_p]


def test_chat_without_template_is_an_hh_transcript():
    tok = byte_tokenizer()
    single = ({"role": "user", "content": "How do I bake bread?"},)
    assert tok.decode(data.encode_prompt(single, tok)) == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    (ex,) = data.tokenize_pairs([Pair(single, "Knead it.", "No.")], tok, 512, log=None)
    assert tok.decode(scored(ex["chosen_labels"])) == " Knead it.</s>"  # the reply after a space, as in HH
    multi = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Yo"},
             {"role": "user", "content": "Bye"})
    assert tok.decode(data.encode_prompt(multi, tok)) == "\n\nHuman: Hi\n\nAssistant:  Yo\n\nHuman: Bye\n\nAssistant:"


def test_sentencepiece_scores_the_tokens_the_model_would_continue_with(spm):
    """No lone '▁' before the response: the scored tokens are the joint tokens after the prompt's."""
    prompt, response = HH_TEXT[:HH_TEXT.index(" I'm")], " I'm not sure"
    assert literal(spm, response)[0] == spm.convert_tokens_to_ids("▁")  # what a separate encoding would score
    (ex,) = data.tokenize_pairs([Pair(prompt, response, " No.")], spm, 512, P, log=None)
    joint = [spm.bos_token_id] + literal(spm, prompt + response) + [spm.eos_token_id]
    assert ex["chosen_ids"] == joint and scored(ex["chosen_labels"]) == joint[-4:]
    assert scored(ex["p_chosen_labels"]) == scored(ex["chosen_labels"])


@pytest.mark.parametrize("name", ["spm_chat", "bpe_chat"])
def test_template_prompt_is_apply_chat_template_and_the_reply_continues_it(name, request):
    tok = request.getfixturevalue(name)
    chat = ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Knead it."}, {"role": "user", "content": "And then?"})
    template = tok.apply_chat_template(list(chat), tokenize=True, add_generation_prompt=True)
    template = list(template["input_ids"] if hasattr(template, "keys") else template)
    assert data.encode_prompt(chat, tok) == template
    (ex,) = data.tokenize_pairs([Pair(chat, "I'm not sure, the oven is hot.", "No.")], tok, 512, P, log=None)
    rendered = tok.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)
    whole = tok.encode(rendered + "I'm not sure, the oven is hot.", add_special_tokens=False)
    assert ex["chosen_ids"] == whole + [tok.eos_token_id]  # the template's BOS, once
    assert scored(ex["p_chosen_labels"]) == scored(ex["chosen_labels"])
    assert without(ex["p_chosen_ids"][:len(ex["p_chosen_ids"]) - len(scored(ex["p_chosen_labels"]))],
                   literal(tok, P), p_position(tok, chat, [tok.bos_token_id])) == template


def test_a_token_across_the_boundary_falls_back_and_is_counted(bpe):
    import copy

    """'ca' + 't' is one token jointly: the response is then encoded as it follows a newline. Under a
    template, p goes before a token that spans the start of the first user message. Both are counted."""
    assert literal(bpe, "the ca")[-1] not in literal(bpe, "the cat")
    lines = []
    pairs = [Pair("the ca", "t sat", "t"), Pair("the cat", " sat", " on")]
    first, second = data.tokenize_pairs(pairs, bpe, 512, P, log=lines.append)
    for side, text in (("chosen", "t sat"), ("rejected", "t")):
        expected = literal(bpe, "\n" + text)[len(literal(bpe, "\n")):] + [bpe.eos_token_id]
        assert scored(first[f"{side}_labels"]) == scored(first[f"p_{side}_labels"]) == expected
    assert second["chosen_ids"] == [bpe.bos_token_id] + literal(bpe, "the cat sat") + [bpe.eos_token_id]
    assert "2 responses encoded apart (a token spans the boundary)" in lines[0]
    plain = copy.deepcopy(bpe)  # "[user] the cat": " the" is one token across the start of the user's text
    plain.chat_template = CHAT_PLAIN
    chat = ({"role": "user", "content": "the cat"},)
    rendered = plain.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)
    assert literal(plain, "[user] the")[-1] not in literal(plain, "[user] ")
    (ex,) = data.tokenize_pairs([Pair(chat, "sat", "on")], plain, 512, P, log=lines.append)
    assert "1 p placed before a token spanning the first user message" in lines[1]
    n = len(ex["chosen_ids"]) - len(scored(ex["chosen_labels"]))
    assert ex["chosen_ids"][:n] == [plain.bos_token_id] + plain.encode(rendered, add_special_tokens=False)
    assert without(ex["p_chosen_ids"][:n + len(literal(plain, P))], literal(plain, P),
                   1 + len(literal(plain, "[user]"))) == ex["chosen_ids"][:n]


def test_x_view_is_the_same_for_every_loss(spm):
    """p_view=False cuts as with the p view: a DPO run sees the x-view tokens a Sr-DPO run sees."""
    rng = random.Random(7)
    pairs = [random_pair(rng, chat=i % 3 == 0, lo=5, hi=60) for i in range(30)]
    p_len = len(literal(spm, P))
    lines = []
    for max_length in (p_len + 50, p_len + 150):
        sr = data.tokenize_pairs(pairs, spm, max_length, P, log=None)
        dpo = data.tokenize_pairs(pairs, spm, max_length, P, log=lines.append, p_view=False)
        uncut = data.tokenize_pairs(pairs, spm, max_length, None, log=None)
        x_keys = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
        assert [{k: e[k] for k in x_keys} for e in sr] == [{k: e[k] for k in x_keys} for e in dpo]
        assert not any(k.startswith("p_") for e in dpo for k in e)
        assert any(a[k] != b[k] for a, b in zip(dpo, uncut) for k in x_keys)  # without p, other cuts
    assert "cut as with p" in lines[0]


def test_template_that_mangles_the_user_text_is_an_error():
    tok = byte_tokenizer("{% for m in messages %}{{ m['content'][3:] }}{% endfor %}")
    with pytest.raises(DataError, match="chat template"):
        data.encode_prompt(({"role": "user", "content": "hello"},), tok, P)


# ----------------------------------------------------------------------------- collate


def test_collate_pads_right_and_puts_chosen_first():
    tok = byte_tokenizer()
    pairs = [Pair("ab", "c", "dddd", 1.0, 0.5), Pair("abcdef", "gh", "i")]
    examples = data.tokenize_pairs(pairs, tok, 512, P, log=None)
    batch = data.collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 9)
    assert batch["p_input_ids"].shape == (4, len(P.encode()) + 9)
    rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    for r, ids in enumerate(rows):
        assert batch["input_ids"][r, :len(ids)].tolist() == ids
        assert batch["input_ids"][r, len(ids):].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][r].sum() == len(ids) and batch["attention_mask"][r, :len(ids)].all()
        assert batch["labels"][r, len(ids):].eq(IGNORE_INDEX).all()
    assert batch["index"].tolist() == [0, 1] and batch["index"].dtype == torch.int64
    assert batch["score_chosen"][0] == 1.0 and math.isnan(batch["score_chosen"][1])
    assert batch["score_rejected"].dtype == torch.float32
    # sequence_logps scores exactly the response tokens and EOS, in both views
    for key in ("", "p_"):
        labels = batch[f"{key}labels"]
        logits = torch.zeros(*labels.shape, 384)
        assert torch.allclose(sequence_logps(logits, labels), -torch.tensor([2.0, 3, 5, 2]) * math.log(384))
    assert "p_input_ids" not in data.collate(data.tokenize_pairs(pairs, tok, 64, log=None), 0)
    assert data.collate(examples, None)["input_ids"][0, -1] == 0  # no pad token: 0, masked


# ----------------------------------------------------------------------------- order, shards, resume


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_cover_the_epoch(world):
    n, G = 50, 6
    for epoch in range(3):
        whole = data.batch_indices(n, G, epoch, seed=7)
        shards = [data.batch_indices(n, G, epoch, seed=7, rank=r, world=world) for r in range(world)]
        assert len(whole) == data.steps_per_epoch(n, G) == 8
        for step in range(len(whole)):
            parts = [shards[r][step] for r in range(world)]
            assert all(len(part) == G // world for part in parts)
            assert sum(parts, []) == whole[step]  # rank order = the global batch's order
        seen = sum(whole, [])
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(n))
    assert data.batch_indices(n, G, 0, 7) != data.batch_indices(n, G, 1, 7) != data.batch_indices(n, G, 1, 8)
    left = [set(range(n)) - set(sum(data.batch_indices(n, G, e, 7), [])) for e in range(4)]
    assert len(set(map(frozenset, left))) > 1, "the unused remainder must change between epochs"
    with pytest.raises(ValueError):
        data.batch_indices(n, 6, 0, 7, rank=0, world=4)


def test_steps_per_epoch_reports_the_remainder():
    lines = []
    assert data.steps_per_epoch(50, 6, log=lines.append) == 8
    assert lines == ["2 of 50 pairs are not used each epoch (8 steps of 6; each epoch draws a new order)"]
    assert data.steps_per_epoch(5, 6) == 0 and data.steps_per_epoch(48, 6, log=lines.append) == 8 and len(lines) == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_at_step_k_yields_the_uninterrupted_batches(world):
    n, G, epochs = 40, 6, 3
    for rank in range(world):
        full = list(data.schedule(n, G, seed=3, epochs=epochs, rank=rank, world=world))
        assert len(full) == epochs * 6 and [(e, s) for e, s, _ in full] == [(e, s) for e in range(3) for s in range(6)]
        assert [idx for e, s, idx in full if e == 1] == data.batch_indices(n, G, 1, 3, rank, world)
        for k in range(len(full) + 1):
            assert list(data.schedule(n, G, seed=3, epochs=epochs, rank=rank, world=world, start_step=k)) == full[k:]


def test_resumed_batches_are_identical_tensors():
    tok = byte_tokenizer()
    examples = data.tokenize_pairs(embedded.embedded_pairs("test")[:24], tok, 512, P, log=None)
    run = [data.collate([examples[i] for i in idx], 0) for _, _, idx in data.schedule(24, 4, 0, 2)]
    resumed = [data.collate([examples[i] for i in idx], 0) for _, _, idx in data.schedule(24, 4, 0, 2, start_step=5)]
    assert len(resumed) == len(run) - 5
    for a, b in zip(run[5:], resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenize_pairs_reports_progress(capsys):
    tok = byte_tokenizer()
    data.tokenize_pairs(embedded.embedded_pairs("test")[:5], tok, 64, log=None, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tokenizing 1/5 pairs | ") and err[-1].startswith("tokenizing 5/5 pairs | ")


# ----------------------------------------------------------------------------- chat template options (issue 26)

THINK = "{% if enable_thinking is defined and not enable_thinking %}NOTHINK {% endif %}" + CHAT_PLAIN


def test_chat_template_kwargs_reach_both_views_and_generation_prompts():
    tok = byte_tokenizer(THINK)
    pairs = [Pair(({"role": "user", "content": "hi"},), "yes", "no")]
    off = data.ChatOptions.of('{"enable_thinking": false}')
    for chat, present in ((None, False), (data.ChatOptions.of({"enable_thinking": True}), False), (off, True)):
        example = data.tokenize_pairs(pairs, tok, 1024, REFINE_PROMPT, log=None, chat=chat)[0]
        for key in ("chosen_ids", "rejected_ids", "p_chosen_ids", "p_rejected_ids"):
            assert ("NOTHINK" in tok.decode(example[key])) is present, (chat, key)
        assert ("NOTHINK" in tok.decode(data.encode_prompt(pairs[0].prompt, tok, chat=chat))) is present
    assert data.ChatOptions.of("", "") is None and data.ChatOptions.of("{}") is None
    ids = lambda examples: [{k: v for k, v in e.items() if "ids" in k or "labels" in k} for e in examples]  # noqa: E731
    plain = ids(data.tokenize_pairs(pairs, tok, 1024, REFINE_PROMPT, log=None))
    assert ids(data.tokenize_pairs(pairs, tok, 1024, REFINE_PROMPT, log=None, chat=data.ChatOptions.of("{}"))) == plain


def test_system_prompt_goes_first_in_chats_without_one_only():
    tok = byte_tokenizer(CHAT_PLAIN)
    chat = data.ChatOptions.of(system="Be brief.")
    bare = ({"role": "user", "content": "hi"},)
    own = ({"role": "system", "content": "Mine."}, *bare)
    assert tok.decode(data.encode_prompt(bare, tok, chat=chat)) == "[system] Be brief.\n[user] hi\n[assistant] "
    assert tok.decode(data.encode_prompt(own, tok, chat=chat)) == tok.decode(data.encode_prompt(own, tok))
    assert data.encode_prompt("plain text", tok, chat=chat) == data.encode_prompt("plain text", tok)
    example = data.tokenize_pairs([Pair(bare, "yes", "no")], tok, 1024, REFINE_PROMPT, log=None, chat=chat)[0]
    assert tok.decode(example["p_chosen_ids"]).startswith("[system] Be brief.\n[user] " + REFINE_PROMPT)


def test_a_chat_template_that_raises_names_the_pair():
    tok = byte_tokenizer("{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                         + CHAT_PLAIN)
    pairs = [Pair(({"role": "user", "content": "hi"},), "yes", "no"),
             Pair(({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}), "yes", "no")]
    with pytest.raises(DataError, match=r"^pair 1 \(0-based, of the loaded pairs\): the chat template failed "
                                        r"\(TemplateError: one message only\)$"):
        data.tokenize_pairs(pairs, tok, 256, None, log=None)


def test_a_template_that_refuses_the_system_role_names_system_prompt():
    """Case 16: a template that refuses a system message is a --system_prompt error (a ConfigError, not a pair's
    DataError that train.py would give a --truncate_x_only hint), in one line."""
    from base.common import ConfigError

    tok = byte_tokenizer("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + CHAT_PLAIN)
    pairs = [Pair(({"role": "user", "content": "hi"},), "yes", "no")]
    with pytest.raises(ConfigError, match=r"^--system_prompt: the tokenizer's chat template refuses a system message "
                                          r"\(the chat template failed \(TemplateError: System role not supported\)\); "
                                          r"give no --system_prompt$"):
        data.tokenize_pairs(pairs, tok, 256, None, log=None, chat=data.ChatOptions.of(system="Be brief."))
    assert len(data.tokenize_pairs(pairs, tok, 256, None, log=None)) == 1


@pytest.mark.parametrize("text", ["{bad", "[1]"])
def test_chat_template_kwargs_must_be_a_json_object(text):
    with pytest.raises(DataError, match="^--chat_template_kwargs "):
        data.parse_template_kwargs(text)
