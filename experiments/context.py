"""experiments/context.py: the runs and their cache: which train.py runs a claim needs, trained once and reused.

Owns: Run (a folder name, a loss, its flags) and the methods' runs, the labels of the losses, Context (where
runs and results go: SFT once per seed, alignment runs from it, their answers, held-out metrics and curves,
the SFT models' own margins), reading a run's metrics.jsonl and JSON files.
Does not own: training (train.py), generation (mtbench/answers.py), judging (mtbench/judge.py, compare.py), the claims.
"""

import contextlib
import copy
import dataclasses
import functools
import json
import os
import shutil
import time

import torch

import data
import srpo
import train
from base import common, defaults, embedded
from experiments import ExperimentError, provenance
from mtbench import answers
from training import checkpoint, models
from training.metrics import heldout_metrics
from training.scoring import pair_logps

LABELS = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "sr-dpo": "Sr-DPO", "sr-ipo": "Sr-IPO"}
LOSSES = ("dpo", "ipo", "sr-dpo", "sr-ipo")  # the four methods, baselines first
BASELINE = {"sr-dpo": "dpo", "sr-ipo": "ipo"}
VALIDATION_SEED = 1  # the validation prompts: embedded_pairs("test", seed=1), disjoint from test and train prompts
RATED_MICRO_BATCH = 8  # SFT micro-batches with --sft_quality_q (the rated rows are ~14x longer)


class NotTrained(ExperimentError):
    """A run that --finished would have had to train."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One alignment run from the seed's SFT model: a folder name, a loss and its extra flags."""
    name: str
    loss: str
    flags: tuple = ()
    validate: bool = False  # also answer the validation prompts (Context.validation_questions; choosing β)


def baseline_run(loss):
    return Run(loss, loss)


def sr_run(loss, lam=defaults.LAM, refine="prompt", refine_prompt=defaults.REFINE_PROMPT):
    """An Sr run; its flags are always explicit, so one model serves every experiment that needs it.

    λ = 0 multiplies Δ by 0 (the baseline's loss, exactly): such a run takes --refine naive, which
    computes Δ from the log-probs under x that the step has anyway, sparing the two passes over p ⊕ x.
    """
    refine = "naive" if lam == 0 else refine
    name = loss + ("" if lam == defaults.LAM else f"-lam{lam:g}") + ("-naive" if refine == "naive" else "") \
        + ("" if refine_prompt == defaults.REFINE_PROMPT else f"-p{refine_prompt}")
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
        self.train_nothing = False  # --finished: a run not trained yet raises NotTrained instead of training
        self.code = provenance.code_hash()  # of train.py and the modules it imports: part of each run's key
        self.read = {}  # answer files read so far, by path (shared by variant())
        os.makedirs(work, exist_ok=True)
        os.makedirs(out, exist_ok=True)
        questions = answers.load_questions("embedded", "test")
        self.questions = questions[:size.test_prompts or None]
        self.seeds = list(range(size.seeds))

    def variant(self, sft_q, seeds, size=None):
        """This context for SFT models trained with --sft_quality_q sft_q (own folders seedN-qQ), these seeds and
        (if given) another size; it shares the record of runs and the questions."""
        other = copy.copy(self)
        other.sft_q, other.seeds, other.size = sft_q, list(seeds), size or self.size
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
                pairs = embedded.embedded_pairs(split)[:(s.train_pairs if split == "train" else s.eval_pairs) or None]
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
        return os.path.join(out_dir, checkpoint.FINAL)

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
        """train.main(argv) into out_dir, its output in out_dir/train.log; reused when already done: its run.json has
        the same key (provenance.run_key: the flags with paths relative to the work folder, the hash of the code
        that defines a run, the library versions), so a changed code file or library retrains."""
        argv = argv + ["--out_dir", out_dir]
        stamp = os.path.join(out_dir, "run.json")
        key = provenance.run_key(argv, self.work, self.code)
        if out_dir in self.done or (not self.fresh and (read_json(stamp) or {}).get("key") == key
                                    and os.path.exists(os.path.join(out_dir, checkpoint.FINAL, "config.json"))):
            self.runs.setdefault(out_dir, "reused")
            self.done.add(out_dir)
            return
        if self.train_nothing:
            raise NotTrained(f"{label}: not trained yet (--finished trains nothing)")
        shutil.rmtree(out_dir, ignore_errors=True)  # stale answers and metrics go with the old model
        for path in [p for p in self.read if p.startswith(os.path.join(out_dir, ""))]:
            del self.read[path]
        os.makedirs(out_dir)
        t0, cpu0 = time.time(), time.process_time()
        with open(os.path.join(out_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
            code = train.main(argv)
        if code != 0 or not os.path.exists(os.path.join(out_dir, checkpoint.FINAL, "config.json")):  # SIGTERM: none
            raise ExperimentError(f"{label}: train.py {' '.join(argv)} failed with exit code {code} or stopped "
                                  f"early; see {os.path.join(out_dir, 'train.log')}")
        shutil.rmtree(os.path.join(out_dir, checkpoint.CHECKPOINT), ignore_errors=True)  # final/ is all we use
        seconds, cpu = time.time() - t0, time.process_time() - cpu0
        write_json(stamp, {"argv": argv, "key": key, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})
        self.runs[out_dir] = "trained"
        self.done.add(out_dir)
        self.log(f"  {label}: trained in {seconds:.1f}s (CPU {cpu:.1f}s)")

    def validation_questions(self):
        """The validation prompts (size.validation_prompts of them, 0: all): the distinct prompts of
        embedded_pairs("test", seed=VALIDATION_SEED), none of them a test or training prompt."""
        pairs = embedded.embedded_pairs("test", seed=VALIDATION_SEED)
        taken = {q["turns"][0] for q in answers.embedded_questions("test")} | {
            p.prompt for p in embedded.embedded_pairs("train")}
        seen = {}
        for pair in pairs:
            if pair.prompt in taken:
                raise ExperimentError(f"validation prompt {pair.prompt!r} is also a test or training prompt")
            seen.setdefault(pair.prompt, len(seen))
        questions = [{"question_id": qid, "turns": [prompt], "data_prompt": prompt} for prompt, qid in seen.items()]
        return questions[:self.size.validation_prompts or None]

    def answers(self, seed, run, split="test"):
        """The run's answers to the test prompts (split "valid": the validation prompts), {question key:
        answers.Answer}, generated once, with the same decoding for both splits (size.samples choices each)."""
        folder = self.align(seed, run) if isinstance(run, Run) else os.path.dirname(self.sft(seed))
        s = self.size
        questions = self.questions if split == "test" else self.validation_questions()
        path = os.path.join(folder, f"answers{'' if split == 'test' else '-' + split}-q{len(questions)}"
                                    f"-n{s.max_new_tokens}-t{s.temperature:g}"
                                    f"{f'-k{s.samples}' if s.samples > 1 else ''}.jsonl")
        if not os.path.exists(path):
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model_dir = os.path.join(folder, checkpoint.FINAL)
            tokenizer = models.load_tokenizer(model_dir)
            model = models.load_model(model_dir, tokenizer).to(device)
            name = run.name if isinstance(run, Run) else "sft"
            decoding = answers.Decoding(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=seed,
                                        choices=s.samples)
            records, capped = answers.generate_answers(model, tokenizer, questions, decoding, name)
            if capped:
                self.log(f"  {self.label(seed)} {name}: {capped} answer turn(s) had fewer new tokens than asked, "
                         f"to fit the context")
            common.write_jsonl(path, records)
        if path not in self.read:  # the tables read each answer file many times; it does not change once written
            self.read[path] = answers.load_answers(path)
        return self.read[path]

    def final_eval(self, seed, run):
        """The held-out metrics of the run's last step (train.py's eval_* keys, prefix dropped)."""
        rows = [m for m in read_metrics(self.align(seed, run)) if "eval_accuracy" in m]
        if not rows:
            raise ExperimentError(f"{self.label(seed)} {run.name}: no held-out evaluation in its metrics.jsonl")
        return {k[len("eval_"):]: v for k, v in rows[-1].items() if k.startswith("eval_")}

    def curve(self, seed, run, key):
        """[(pairs trained, value)] of one eval_* key over the run's held-out evaluations."""
        return [(m["step"] * self.size.batch_size, m[key]) for m in read_metrics(self.align(seed, run)) if key in m]

    def sft_margins(self, seed, refine_prompt=defaults.REFINE_PROMPT, split="test"):
        """The seed's SFT model on the held-out pairs before any alignment, with log π_ref taken as 0:
        metrics.pair_metrics of its own margins log π(y+|·) - log π(y-|·) under x and under refine_prompt ⊕ x
        (a srpo.REFINE_PROMPTS key: p itself, or a control); split "valid": on the validation pairs
        (embedded_pairs("test", seed=VALIDATION_SEED)) instead of the test pairs. (With π_ref the SFT model
        itself, as in alignment, Δπ and Δ_naive are exactly 0 there.) Computed once, kept beside the model."""
        model_dir = self.sft(seed)
        tag = ("" if refine_prompt == defaults.REFINE_PROMPT else f"-p{refine_prompt}") + (
            "" if split == "test" else f"-{split}")
        path = os.path.join(os.path.dirname(model_dir), f"margins-e{self.size.eval_pairs}{tag}.json")
        found = read_json(path)
        if found is not None:
            return found
        tokenizer = models.load_tokenizer(model_dir)
        model = models.load_model(model_dir, tokenizer)
        pairs = embedded.embedded_pairs("test", seed=VALIDATION_SEED if split == "valid" else 0)
        examples = data.tokenize_pairs(pairs[:self.size.eval_pairs or None], tokenizer, defaults.MAX_LENGTH,
                                       srpo.REFINE_PROMPTS[refine_prompt], log=None)
        own = pair_logps(model, examples, tokenizer.pad_token_id, 25, with_p=True)
        found = heldout_metrics(own, {k: torch.zeros_like(v) for k, v in own.items()}, examples, defaults.BETA)
        write_json(path, found)
        return found


def pair_record(pair, chat=False):
    """An embedded pair as a generic record; with chat, its prompt is one user message."""
    prompt = [{"role": "user", "content": pair.prompt}] if chat else pair.prompt
    return {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected,
            "score_chosen": pair.score_chosen, "score_rejected": pair.score_rejected}


def read_metrics(run_dir):
    """The records of a run's metrics.jsonl (train.py's), in order."""
    with open(os.path.join(run_dir, checkpoint.METRICS)) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path):
    """The JSON document at path; None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path, document):
    with common.atomic_open(path) as fh:
        json.dump(document, fh, indent=2)
