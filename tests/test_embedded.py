"""embedded.py: the copy task's pairs, its quality-aware SFT pairs and true scores (docs/data.md)."""
import math

import pytest
from test_data import P

import data
from base import embedded
from base.common import DataError
from base.formats import Pair
from srpo import REFINE_PROMPTS, rating_prompt

# ----------------------------------------------------------------------------- embedded dataset


def test_embedded_is_deterministic_split_and_scored():
    train, test = embedded.embedded_pairs("train"), embedded.embedded_pairs("test")
    assert (len(train), len(test)) == (2000, 200)
    assert train == embedded.embedded_pairs("train", seed=0) and train != embedded.embedded_pairs("train", seed=1)
    prompts = {p.prompt for p in train}
    assert len(prompts) == 2000 and not prompts & {p.prompt for p in test + embedded.embedded_pairs("test", seed=1)}
    gaps = set()
    for pair in train + test:
        word = pair.prompt[len("Copy: "):-1]
        assert pair.prompt == f"Copy: {word}\n" and len(pair.prompt.encode()) <= 24
        for response, score in ((pair.chosen, pair.score_chosen), (pair.rejected, pair.score_rejected)):
            assert len(response.encode()) <= 12 and len(response) == len(word)
            wrong = sum(a != b for a, b in zip(word, response))
            assert score == pytest.approx(1 - wrong / len(word)) == embedded.embedded_score(pair.prompt, response)
        assert pair.score_chosen > pair.score_rejected
        gaps.add(round(pair.score_chosen - pair.score_rejected, 6))
    assert gaps == {0.2, 0.4, 0.6, 0.8, 1.0}
    assert data.load_pairs("embedded", "test", log=None) == test
    with pytest.raises(DataError, match="no split 'valid'"):
        embedded.embedded_pairs("valid")
    # the letters to copy occur neither in the template nor in either refinement prompt
    assert not set(embedded.EMBEDDED_ALPHABET) & set("Copy: " + "".join(REFINE_PROMPTS.values()))


def test_embedded_sft_pairs_rate_a_share_q_with_matching_responses():
    import re

    plain = embedded.embedded_pairs("train")
    assert embedded.embedded_sft_pairs(0.0) == plain  # q = 0: today's SFT data, exactly
    rated_at = {}
    for q in (0.1, 0.3, 1.0):
        pairs = embedded.embedded_sft_pairs(q)
        assert len(pairs) == len(plain)
        rated_at[q] = set()
        for i, (pair, base) in enumerate(zip(pairs, plain)):
            if pair == base:
                continue
            rated_at[q].add(i)
            rating = int(re.match(r"Please generate a response with a usefulness rating of (\d+) out of 100 ",
                                  pair.prompt).group(1))
            assert 1 <= rating <= 100 and pair.prompt == rating_prompt(rating) + base.prompt
            wrong = sum(a != b for a, b in zip(base.prompt[len("Copy: "):-1], pair.chosen))
            assert wrong == round((1 - rating / 100) * 5 + 1e-9)  # halves round up
            assert pair.score_chosen == embedded.embedded_score(base.prompt, pair.chosen) \
                == pytest.approx(1 - wrong / 5)
            assert abs(pair.score_chosen - rating / 100) <= 0.1 + 1e-12
        share = len(rated_at[q]) / len(plain)
        assert abs(share - q) < 4 * math.sqrt(q * (1 - q) / len(plain)) + 1e-12  # binomial, 4 sigma
    assert rated_at[0.1] <= rated_at[0.3] <= rated_at[1.0]  # nested: the same draws whatever q
    ratings = [int(re.search(r"rating of (\d+)", p.prompt).group(1)) for p in embedded.embedded_sft_pairs(1.0)]
    assert min(ratings) == 1 and max(ratings) == 100 and abs(sum(ratings) / len(ratings) - 50.5) < 2
    with pytest.raises(DataError, match="q must be in"):
        embedded.embedded_sft_pairs(1.5)


def test_rated_prompt_of_100_is_the_p_view_token_for_token():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    base = embedded.embedded_pairs("train")[0]
    rated = Pair(rating_prompt(100) + base.prompt, base.chosen, base.rejected)
    [x_view] = data.tokenize_pairs([rated], tok, 512, log=None)
    [p_view] = data.tokenize_pairs([base], tok, 512, P, log=None)
    assert x_view["chosen_ids"] == p_view["p_chosen_ids"] and x_view["chosen_labels"] == p_view["p_chosen_labels"]


@pytest.mark.parametrize("response,score", [("ABDEF", 1.0), ("ABDEX", 0.8), ("ABDE", 0.8), ("ABDEFG", 5 / 6),
                                            ("", 0.0), ("FEDBA", 0.2), ("XABDEF", 0.0)])
def test_embedded_score_of_any_response(response, score):
    assert embedded.embedded_score("Copy: ABDEF\n", response) == pytest.approx(score)


def test_embedded_score_rejects_other_prompts():
    with pytest.raises(DataError, match="not an embedded prompt"):
        embedded.embedded_score("What is 2 + 2?", "4")
