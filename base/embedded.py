"""base/embedded.py: the embedded copy task, the preference data that needs no download (docs/data.md, The
embedded dataset).

Owns: its pairs (embedded_pairs), the quality-aware SFT pairs (embedded_sft_pairs), the true score of any
response (embedded_score) and the rating -> corrupted letters rule (rating_k).
Does not own: reading other sources (formats.py) or tokenisation (data.py).
"""

import random
import re
import zlib

from base.common import DataError
from base.formats import Pair
from srpo import rating_prompt

EMBEDDED_TEMPLATE = "Copy: {}\n"
EMBEDDED_ALPHABET = "ABDEFGHIJKLMORSUVWXYZ"
EMBEDDED_LENGTH = 5
EMBEDDED_SIZES = {"train": 2000, "test": 200}
EMBEDDED_RATING_SCALE = 100  # R in [1, 100] of the quality-aware SFT pairs, as in p
_EMBEDDED_PROMPT = re.compile(r"Copy: ([A-Z]+)\n\Z")


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


