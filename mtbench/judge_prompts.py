"""mtbench/judge_prompts.py: the texts of the built-in judge prompts and the names of FastChat's; no logic.

Owns: BUILTIN_PROMPTS (system prompt and template of each built-in prompt, the fields of judge.prompt_fields),
the default prompt names, built in and in MT-Bench's judge_prompts.jsonl, and the categories judged against a
reference answer (NEED_REF_CATS).
Does not own: loading, filling or choosing a prompt (judge.py).
"""

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
_REFERENCE_RULE = ("A reference answer is given: check each answer's result against it; an answer whose result "
                   "differs from the reference answer's is incorrect. ")
BUILTIN_PROMPTS["srpo-pair-math"] = {
    "system_prompt": "You are an impartial judge of two AI assistants' answers to the same user question. "
                     + _REFERENCE_RULE + _JUDGE_RULES,
    "prompt_template": "=== User question ===\n{question}\n\n"
                       "=== Reference answer ===\n{ref_answer}\n=== End of the reference answer ===\n\n"
                       + BUILTIN_PROMPTS["srpo-pair"]["prompt_template"].split("\n\n", 1)[1],
}
BUILTIN_PROMPTS["srpo-pair-math-multi-turn"] = {
    "system_prompt": BUILTIN_PROMPTS["srpo-pair-multi-turn"]["system_prompt"].replace(
        "context. ", "context. " + _REFERENCE_RULE),
    "prompt_template": BUILTIN_PROMPTS["srpo-pair-multi-turn"]["prompt_template"]
                       + "\n\nReference answer to it:\n{ref_answer}",
}
BUILTIN_NAMES = ("srpo-pair", "srpo-pair-multi-turn")
FASTCHAT_NAMES = ("pair-v2", "pair-v2-multi-turn")  # MT-Bench's judge_prompts.jsonl
# With reference answers (--reference_answers), questions of these categories are judged with the math
# prompts and the reference answer, as FastChat judges MT-Bench (its NEED_REF_CATS and pair-math-v1).
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
BUILTIN_MATH_NAMES = ("srpo-pair-math", "srpo-pair-math-multi-turn")
FASTCHAT_MATH_NAMES = ("pair-math-v1", "pair-math-v1-multi-turn")
