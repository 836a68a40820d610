"""evaluate.py: the paper's measurements as commands.

Owns: the command line. ``accuracy`` is the paper's own measurement (training/metrics.py does the work);
``generate``, ``judge``, ``exact`` and ``table`` run the MT-Bench machinery of mtbench/.
Does not own: any statistic (training/metrics.py), model loading (training/models.py) or judging logic
(mtbench/judge.py).

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
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import data
from base import common, defaults, embedded
from base.common import EvalError, num
from mtbench import answers, judge
from srpo import REFINE_PROMPTS
from training import metrics, scoring
from training.models import (
    DTYPES,
    TINY,
    ModelError,
    check_compatible,
    check_model,
    load_model,
    load_tokenizer,
    recorded_reference,
)

# ----------------------------------------------------------------------------------------------
# Tables for people
# ----------------------------------------------------------------------------------------------


def load_lm(name, dtype="float32", device="cpu"):
    """(model, tokenizer) of a name, the model in DTYPES[dtype] on device."""
    check_model(name)
    tokenizer = load_tokenizer(name)
    return load_model(name, tokenizer, dtype=DTYPES[dtype]).to(device), tokenizer


def accuracy_table(m):
    """A few lines for people from ``pair_metrics``."""
    lines = [f"{'query':<6} {'accuracy':>9} {'ties':>6} {'r(y+)':>9} {'r(y-)':>9}   reward margin",
             f"{'x':<6} {num(m['accuracy'], '.4f'):>9} {num(m['tie_rate'], '.3f'):>6} "
             f"{num(m['reward_chosen_mean'], '+.4f'):>9} {num(m['reward_rejected_mean'], '+.4f'):>9}   "
             f"Δ_naive {num(m['margin_mean'], '+.4f')} ± {num(m['margin_std'], '.4f')}"]
    if "delta_mean" in m:
        lines.append(f"{'p⊕x':<6} {num(m['p_accuracy'], '.4f'):>9} {num(m['p_tie_rate'], '.3f'):>6} "
                     f"{num(m['p_reward_chosen_mean'], '+.4f'):>9} {num(m['p_reward_rejected_mean'], '+.4f'):>9}   "
                     f"Δπ {num(m['delta_mean'], '+.4f')} ± {num(m['delta_std'], '.4f')}")
        lines.append(f"pairs ranked alike under x and p⊕x (Assumption 3.2): {num(m['sign_agreement'], '.4f')}")
    if "n_scored" in m:
        for name, prefix in (("Δπ", ""), ("Δ_naive", "naive_")):
            if prefix + "spearman" in m:
                lines.append(f"{name} vs true score gap ({m['n_scored']} scored pairs): "
                             f"Spearman {num(m[prefix + 'spearman'], '+.3f')}, "
                             f"Kendall τb {num(m[prefix + 'kendall_tau_b'], '+.3f')}, "
                             f"ranking concordance {num(m[prefix + 'concordance'], '.3f')}")
    lines.append(f"{m['n_pairs']} pairs")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def _stderr(message):
    print(message, file=sys.stderr)


def _decoding(args):
    return answers.Decoding(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.max_length,
                            getattr(args, "num_choices", 1))


def _chat(args):
    """data.ChatOptions of --chat_template_kwargs and --system_prompt."""
    return data.ChatOptions.of(data.parse_template_kwargs(args.chat_template_kwargs), args.system_prompt)


def _answers_from_model(name, questions, args, out_path=None):
    """Generate answers with a model (appended to out_path, resuming it); notes capped turns on stderr."""
    model, tokenizer = load_lm(name, args.dtype, args.device)
    answers.check_context(name, model, args.max_length)
    decoding = _decoding(args)
    records, capped = answers.generate_answers(model, tokenizer, questions, decoding,
                                               getattr(args, "model_id", None) or name, out_path, progress=True,
                                               chat=_chat(args))
    if capped:
        _stderr(f"{name}: {capped} answer turn(s) had room for fewer than --max_new_tokens "
                f"{decoding.max_new_tokens} new tokens after the whole prompt in the context")
    return records


def run_generate(args):
    questions = answers.load_questions(args.questions, args.split)
    records = _answers_from_model(args.model, questions, args, args.out)
    _stderr(f"{args.out}: {len(records)} answers")
    return 0


def reference_of(model, ref_model=None):
    """(π_ref, seed of a "tiny" π_ref): --ref_model; else the reference recorded in a model folder that
    train.py exported (final/, sft/); else "tiny" for the tiny policy. Any other policy needs --ref_model:
    a random model is never taken as the reference."""
    if ref_model:
        return ref_model, 0
    recorded = recorded_reference(model)
    if recorded:
        _stderr(f"reference: {recorded[0]}" + (f" (seed {recorded[1]})" if recorded[0] == TINY else "")
                + f", as recorded in {model}")
        return recorded
    if model == TINY:
        return TINY, 0
    raise ModelError(f"--ref_model: required for --model {model} (not a model folder written by train.py, "
                     f"which records its reference)")


def run_accuracy(args):
    ref_model, ref_seed = reference_of(args.model, args.ref_model)
    check_model(args.model, "--model")
    check_model(ref_model, "--ref_model")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    check_compatible(args.model, tokenizer, args.max_length)
    check_compatible(ref_model, tokenizer, args.max_length, "--ref_model", args.tokenizer or args.model)
    policy = load_model(args.model, tokenizer, dtype=DTYPES[args.dtype]).to(args.device)
    ref = policy if (ref_model, ref_seed) == (args.model, 0) else \
        load_model(ref_model, tokenizer, dtype=DTYPES[args.dtype], seed=ref_seed).to(args.device)
    for name, model in ((args.model, policy), (ref_model, ref)):
        answers.check_context(name, model, args.max_length)
    pairs = data.load_pairs(args.data, args.split, log=_stderr)
    examples = data.tokenize_pairs(pairs, tokenizer, args.max_length, REFINE_PROMPTS[args.refine_prompt],
                                   log=_stderr, chat=_chat(args))
    if args.limit:
        examples = examples[:args.limit]
        _stderr(f"scoring the first {len(examples)} pairs (--limit)")
    score = lambda model: scoring.pair_logps(model, examples, tokenizer.pad_token_id, args.batch_size,  # noqa: E731
                                             with_p=True, progress=True)
    policy_logps = score(policy)
    ref_logps = policy_logps if ref is policy else score(ref)
    m = metrics.heldout_metrics(policy_logps, ref_logps, examples, args.beta)
    config = {k: getattr(args, k) for k in ("model", "data", "split", "beta", "refine_prompt", "max_length", "limit")}
    config.update(ref_model=ref_model, ref_seed=ref_seed)
    common.emit({"config": config, "loaded_pairs": len(pairs), "metrics": m}, accuracy_table(m), args.out)
    if args.pairs_out:
        logps = metrics.preference_logps(policy_logps, ref_logps)
        common.write_jsonl(args.pairs_out, metrics.per_pair_rows(logps, args.beta, examples))
    return 0


def _side_answers(args, side, questions):
    """One side's answers: read from --answers_X, or generated by --model_X."""
    path, model = getattr(args, f"answers_{side}"), getattr(args, f"model_{side}", None)
    if path:
        return answers.load_answers(path)
    records = _answers_from_model(model, questions, args)
    return answers.index_answers([(f"<answers of {model}>:{i}", r) for i, r in enumerate(records, 1)], model)


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
        return judge.http_judge(args.judge_url, args.judge_name, args.api_key_env, args.max_retries,
                          args.retry_wait, args.timeout, args.judge_max_tokens), args.judge_name
    model, tokenizer = load_lm(args.judge_model, args.dtype, args.device)
    return judge.local_judge(model, tokenizer, args.judge_max_tokens), args.judge_model


def run_judge(args):
    questions = answers.load_questions(args.questions, args.split)
    answers_a, answers_b, names = _comparison(args, questions)
    prompts = judge.load_judge_prompts(args.judge_prompt, args.prompt_single, args.prompt_multi)
    math_prompts = None
    if args.reference_answers:  # as FastChat: math, reasoning, coding judged against the reference answer
        questions = judge.with_references(questions, answers.load_answers(args.reference_answers),
                                          args.reference_answers)
        math = args.prompt_math
        math_prompts = judge.load_judge_prompts(args.judge_prompt, math, math and f"{math}-multi-turn", math=True)
    game_list, missing = judge.games(questions, answers_a, answers_b)
    _report_missing(args, missing, len(questions))
    ask, judge_id = _judge(args)
    identity = {**names, "judge": judge_id}
    records = judge.judge_games(game_list, answers_a, answers_b, ask, prompts, args.out, identity, progress=True,
                                math_prompts=math_prompts)
    if args.fastchat_out:
        judge.write_fastchat_judgments(args.fastchat_out, judge.fastchat_judgments(records))
    summary = judge.judge_summary(records, identity, _benchmark(args), missing)
    common.emit(summary, judge.format_table([summary]), args.summary)
    return 0


def run_exact(args):
    questions = answers.load_questions(args.questions, args.split)
    answers_a, answers_b, names = _comparison(args, questions)
    identity = {**names, "judge": "true score (embedded.embedded_score)"}
    records, missing = judge.exact_records(questions, answers_a, answers_b, embedded.embedded_score)
    _report_missing(args, missing, len(questions))
    if args.out:
        common.write_jsonl(args.out, records)
    summary = judge.exact_summary(records, identity, _benchmark(args), missing)
    common.emit(summary, judge.format_table([summary]), args.summary)
    return 0


SUMMARY_KEYS = ("benchmark", "model_a", "model_b", "games", "decided", "unparseable",
                *(f"{k}_rate" for k in judge.OUTCOMES))  # what format_table reads of a summary


def run_table(args):
    summaries = []
    for path in args.summaries:
        try:
            summary = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise EvalError(f"{path}: cannot read a summary: {' '.join(str(e).split())[:200]}") from None
        lacking = [k for k in SUMMARY_KEYS if k not in summary] if isinstance(summary, dict) else None
        if lacking != []:
            raise EvalError(f"{path}: not a summary of judge or exact (" + (
                f"no {', '.join(lacking)})" if lacking else f"a JSON {type(summary).__name__}, not an object)"))
        summaries.append(summary)
    print(judge.format_table(summaries))
    return 0


def _bounded(kind, low, strict=True, high=None):
    """An argparse type: ``kind`` of a value > low (>= low unless strict), <= high where given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or value < low or (strict and value == low) or (high is not None and value > high):
            bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


POSITIVE, COUNT = _bounded(int, 0), _bounded(int, 0, strict=False)
OUTPUTS = ("out", "pairs_out", "summary", "fastchat_out")  # the commands' output files


def prepare_outputs(args):
    """Each output file flag: EvalError if it names a folder, or is (or lies inside) a path that another flag
    reads (--questions, a --model folder, ...); its missing parent folders are created."""
    reads = {n: v for n, v in vars(args).items() if n not in OUTPUTS and isinstance(v, str) and v and os.path.exists(v)}
    for name in OUTPUTS:
        path = getattr(args, name, None)
        if not path:
            continue
        if os.path.isdir(path):
            raise EvalError(f"--{name} {path}: a folder; give a file path")
        for flag, read in reads.items():
            if common.inside(path, read):
                raise EvalError(f"--{name} {path}: {'is' if common.inside(read, path) else 'lies inside'} --{flag} "
                                f"{read}, which this command reads; give a path apart from it")
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise EvalError(f"--{name} {path}: cannot create its folder ({e.strerror or e})") from None


def _device_args(p):
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _decoding_args(p):
    p.add_argument("--max_new_tokens", type=POSITIVE, default=defaults.MAX_NEW_TOKENS,
                   help="at most this many, and no more than the context leaves after the whole prompt")
    p.add_argument("--temperature", type=_bounded(float, 0, strict=False), default=defaults.TEMPERATURE,
                   help="0: greedy (default)")
    p.add_argument("--top_p", type=_bounded(float, 0, high=1), default=defaults.TOP_P)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed repeats the answers")
    p.add_argument("--max_length", type=POSITIVE, default=None,
                   help="context limit in tokens (default: the model's); a prompt that fills it is refused")
    _chat_args(p)


def _chat_args(p):
    p.add_argument("--chat_template_kwargs", default="",
                   help='JSON object passed to every apply_chat_template, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--system_prompt", default="", help="a system message put first in chat prompts that have none")


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
    p.add_argument("--model", default=TINY, help='policy: "tiny" or a model folder / hub name')
    p.add_argument("--ref_model", help="reference π_ref; default: the one recorded in a model folder written by "
                   'train.py, or "tiny" for the tiny policy; required for any other model')
    p.add_argument("--tokenizer", help="default: the policy's")
    p.add_argument("--data", default="embedded", help="a data.load_pairs source")
    p.add_argument("--split", default="test")
    p.add_argument("--beta", type=_bounded(float, 0), default=defaults.BETA)
    p.add_argument("--refine_prompt", choices=sorted(REFINE_PROMPTS), default=defaults.REFINE_PROMPT)
    p.add_argument("--batch_size", type=POSITIVE, default=8)
    p.add_argument("--max_length", type=POSITIVE, default=defaults.MAX_LENGTH)
    p.add_argument("--limit", type=COUNT, default=0, help="score only the first N kept pairs (0: all)")
    p.add_argument("--out", help="JSON file (default: stdout, the table then to stderr)")
    p.add_argument("--pairs_out", help="also a JSONL of per-pair Δ_naive, Δπ and true score gap")
    _chat_args(p)
    _device_args(p)


def _generate_args(p):
    p.add_argument("--model", required=True, help='"tiny" or a model folder / hub name')
    p.add_argument("--model_id", help="the answers' model_id (default: --model); FastChat names a model by its "
                                      "answer file, so write to MODEL_ID.jsonl")
    _questions_args(p)
    p.add_argument("--out", required=True, help="answers JSONL, appended question by question; a rerun resumes it")
    p.add_argument("--num_choices", type=POSITIVE, default=1,
                   help="answers per question, sampled (FastChat's --num-choices; needs --temperature > 0): for "
                        "an expected score; the judge reads the first")
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
    p.add_argument("--prompt_multi",
                   help="multi-turn prompt name (default srpo-pair-multi-turn, or pair-v2-multi-turn)")
    p.add_argument("--reference_answers", help="FastChat reference-answer JSONL (reference_answer/gpt-4.jsonl): "
                                               "math, reasoning and coding questions are then judged against it")
    p.add_argument("--prompt_math", help="their prompt, NAME and NAME-multi-turn (default srpo-pair-math, or "
                                         "pair-math-v1 from a file)")
    p.add_argument("--fastchat_out", help="also the verdicts in FastChat's judgment layout (show_result.py "
                                          "--mode pairwise-all --input-file reads it); other comparisons kept")
    p.add_argument("--max_retries", type=COUNT, default=5)
    p.add_argument("--retry_wait", type=_bounded(float, 0, strict=False), default=2.0,
                   help="first backoff in seconds, doubled each retry")
    p.add_argument("--timeout", type=_bounded(float, 0), default=120.0)
    p.add_argument("--judge_max_tokens", type=POSITIVE, default=defaults.JUDGE_MAX_TOKENS)
    _device_args(p)


def _exact_args(p):
    _questions_args(p, default="embedded")
    for side in ("a", "b"):
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument(f"--answers_{side}", help=f"answers JSONL of side {side}")
        group.add_argument(f"--model_{side}", help="or a model whose greedy/seeded answers are judged")
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


# numeric flags of the commands: (the lowest value, what it excludes); nan and inf are refused too
NUMBERS = {"beta": (1e-300, "must be positive"), "batch_size": (1, "must be at least 1"),
           "max_length": (2, "must be at least 2"), "limit": (0, "must be >= 0 (0: all)"),
           "max_new_tokens": (1, "must be at least 1"), "temperature": (0, "must be >= 0 (0: greedy)"),
           "top_p": (1e-300, "must be in (0, 1]"), "max_retries": (0, "must be >= 0"),
           "retry_wait": (0, "must be >= 0"), "timeout": (1e-300, "must be positive"),
           "judge_max_tokens": (1, "must be at least 1")}


def check_numbers(args):
    """EvalError in one line for a numeric flag out of its range, non-finite, or top_p above 1."""
    for name, (low, rule) in NUMBERS.items():
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or value < low or (name == "top_p" and value > 1)):
            raise EvalError(f"--{name} {value}: {rule}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)
        prepare_outputs(args)
        data.parse_template_kwargs(getattr(args, "chat_template_kwargs", ""))  # bad JSON: before any model loads
        return COMMANDS[args.command][1](args)
    except common.SrpoError as e:  # the project's own errors, in one line; anything else keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
