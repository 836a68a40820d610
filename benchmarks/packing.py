"""Packing: padded, packed and prompt-shared batches (train.py --packing) on real-shaped preference pairs.

    python benchmarks/packing.py                                   # tiny and neox-4x256 on the CPU
    python benchmarks/packing.py --models neox-4x256 --device cuda --rounds 5

Pairs: prompt and response lengths in tokens drawn from log-normals fitted (least squares on the log
quantiles) to the HH-RLHF harmless-base test split's p10..p99 (issue 14), tokenized by data.tokenize_pairs
at --max_length with the paper's p (a word-level tokenizer: one word, one token), so truncation is train.py's.
Models: "tiny" (train.py's) and "neox-4x256", a random GPT-NeoX of 4 layers, width 256, vocab 50304.
A step is train.train_step on --pairs pairs in micro-batches of --micro, collation included (as in train.py).

Tokens: real tokens (the sequences' own, prompt counted once per sequence) / tokens computed (the rows'
size), per view. Time: per model, one process takes every (layout, loss) in turn, a step each (after a
warm-up step of one micro-batch each), for --rounds rounds; the table gives medians, the ratios the
median over rounds of each round's ratio to the padded step of the same loss, so a change in the
machine's load (other jobs on a shared CPU) cancels.
Memory: each (layout, loss) alone in a fresh process (step_cost.py's way: CPU peak RSS with glibc's mmap
threshold at 64 KiB, CUDA max_memory_allocated): one micro-batch to warm up, then the peak over a step.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from statistics import NormalDist

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import step_cost  # noqa: E402  (peak memory and device helpers)

import data  # noqa: E402
import train  # noqa: E402
from base import defaults, formats  # noqa: E402
from srpo import REFINE_PROMPT  # noqa: E402
from training import distributed, models  # noqa: E402

# issue 14: HH-RLHF harmless-base test split, tokens (~4 characters a token)
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90, 0.99)
LENGTHS = {"prompt": (16, 30, 91, 167, 275, 549), "chosen": (8, 14, 28, 56, 96, 207),
           "rejected": (9, 18, 36, 71, 115, 256)}
MODELS = ("tiny", "neox-4x256")
LOSSES = ("dpo", "sr-dpo")
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--pairs", type=int, default=64, help="pairs per step")
    p.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--max_length", type=int, default=defaults.MAX_LENGTH,
                   help="tokenize_pairs' max_length, and the pack length")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (a step of every layout and loss each)")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {', '.join(LOSSES)}")
    p.add_argument("--no_warmup", action="store_true", help="skip the warm-up steps (a slow CPU: first calls cost "
                                                            "little beside a step)")
    p.add_argument("--no_memory", action="store_true", help="time only")
    p.add_argument("--max_seconds", type=float, default=0, help="start no round that would end after this many "
                                                                "seconds of timing (0: no limit; 1 round at least)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--jobs", type=int, default=1, help="memory processes at a time (CPU: 2 cores each, pinned)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "packing"), help="writes OUT.md and OUT.json")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "time:MODEL" or "memory:MODEL:LAYOUT:LOSS"
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- pairs and models


def lognormal(quantiles):
    """(mu, sigma) of the log-normal whose quantiles fit `quantiles` at QUANTILES best (least squares in log)."""
    z = [NormalDist().inv_cdf(q) for q in QUANTILES]
    sigma, mu = np.polyfit(z, np.log(quantiles), 1)
    return float(mu), float(sigma)


def word_tokenizer(vocab):
    """A word-level tokenizer of `vocab` ids: [PAD] 0, [UNK] 1, [EOS] 2, then words w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def real_shaped_pairs(n, vocab, seed):
    """n formats.Pair of random words whose token lengths follow LENGTHS' log-normals (at least 1 token)."""
    rng = np.random.default_rng(seed)

    def text(kind):
        k = max(1, round(float(rng.lognormal(*lognormal(LENGTHS[kind])))))
        return " ".join(f"w{i}" for i in rng.integers(3, vocab, k))

    return [formats.Pair(text("prompt"), text("chosen"), text("rejected")) for _ in range(n)]


def build_model(name, tokenizer, seed=0):
    """train.py's tiny model, or the random GPT-NeoX 4 x 256 with vocab 50304; dropout off."""
    if name == "tiny":
        return models.load_model(models.TINY, tokenizer, seed=seed)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=2048, rotary_pct=0.25,
                           attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False,
                           eos_token_id=2, pad_token_id=0, bos_token_id=2)
    model = GPTNeoXForCausalLM(config)
    model.config.use_cache = False
    return model.eval()


def vocab_of(name):
    return 384 if name == "tiny" else 50304


def examples_for(args, name):
    tokenizer = word_tokenizer(vocab_of(name))
    pairs = real_shaped_pairs(args.pairs, vocab_of(name), args.seed)
    return tokenizer, data.tokenize_pairs(pairs, tokenizer, args.max_length, REFINE_PROMPT, log=None)


def batches(args, examples, packing):
    """One step's micro-batches, as stages.step_batches collates them."""
    return [data.collate(examples[a:a + args.micro], 0, packing, args.max_length)
            for a in range(0, len(examples), args.micro)]


def token_counts(args, examples):
    """Per layout and view: real tokens, tokens computed (rows x row length)."""
    padded = batches(args, examples, "padded")
    out = {}
    for packing in data.PACKINGS:
        for view in ("", "p_"):
            real = sum(int(b[view + "attention_mask"].sum()) for b in padded)
            computed = sum(b[view + "input_ids"].numel() for b in batches(args, examples, packing))
            out[f"{packing} {view or 'x_'}tokens"] = {"real": real, "computed": computed}
    return out


# ----------------------------------------------------------------------------- one process


class Kit:
    """A process group of one, the FSDP2 policy and reference, the optimizer, the examples."""

    def __init__(self, args, name):
        self.rank, self.world, self.device = distributed.setup_distributed(args.device)
        tokenizer, self.examples = examples_for(args, name)
        mp, ref_dtype = models.mixed_precision("auto", self.device)  # as train.py's default
        self.policy = models.shard(build_model(name, tokenizer).to(self.device), self.device, mp).train()
        ref = build_model(name, tokenizer).to(self.device, ref_dtype)
        self.ref = models.shard(ref, self.device, mp).requires_grad_(False)
        self.optimizer = torch.optim.RMSprop(self.policy.parameters(), lr=1e-6)

    def step(self, args, packing, loss, i, micro_batches=None):
        cfg = train.resolved(train.Config(loss=loss, batch_size=args.pairs, micro_batch_size=args.micro,
                                          warmup_steps=0, packing=packing, model="bench"))
        micro_batches = micro_batches or batches(args, self.examples, packing)  # collation is part of the step
        train.train_step(self.policy, self.ref, None, self.optimizer, micro_batches, cfg, loss, i, self.world,
                         self.device)


def measure_time(args, name):
    kit = Kit(args, name)
    keys = [(packing, loss) for loss in args.losses.split(",") for packing in data.PACKINGS]
    seconds = {key: [] for key in keys}
    for packing, loss in [] if args.no_warmup else keys:  # warm-up: a step of one micro-batch each
        kit.step(args, packing, loss, 0, batches(args, kit.examples, packing)[:1])
    start = time.perf_counter()
    for i in range(args.rounds):
        t_round = time.perf_counter()
        for packing, loss in keys:
            step_cost.sync(kit.device)
            t0 = time.perf_counter()
            kit.step(args, packing, loss, i)
            step_cost.sync(kit.device)
            seconds[packing, loss].append(time.perf_counter() - t0)
        now = time.perf_counter()
        print(f"{name}: round {i + 1}/{args.rounds} took {now - t_round:.1f}s", file=sys.stderr, flush=True)
        with open(f"{args.out}.{name}.partial.json", "w") as fh:  # what is done so far, should the run be cut
            json.dump({f"{p} {loss}": t for (p, loss), t in seconds.items()}, fh)
        if args.max_seconds and now - start + (now - t_round) > args.max_seconds:
            break
    return {"tokens": token_counts(args, kit.examples),
            "time": [{"packing": p, "loss": loss, "seconds": s} for (p, loss), s in seconds.items()]}


def measure_memory(args, name, packing, loss):
    kit = Kit(args, name)
    micro_batches = batches(args, kit.examples, packing)
    kit.step(args, packing, loss, 0, micro_batches[:1])  # warm-up: one micro-batch
    base = step_cost.reset_peak(kit.device)
    kit.step(args, packing, loss, 1, micro_batches)
    step_cost.sync(kit.device)
    top = step_cost.peak(kit.device)
    return {"packing": packing, "loss": loss, "peak_bytes": top, "step_bytes": top - base}


# ----------------------------------------------------------------------------- all of them (parent)


def child(argv, one, env, cores=None):
    """This script with --one in a fresh process (pinned to `cores` when given): a Popen."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", one]
    if cores:
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc, one):
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"packing.py: {one} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_model(args, argv, name, device, env):
    """Time (one process) and memory (a process per layout and loss, --jobs at a time), for one model."""
    cores = sorted(os.sched_getaffinity(0))
    pairs = [cores[i:i + 2] for i in range(0, len(cores) - 1, 2)] if device == "cpu" and args.jobs > 1 else [None]
    timing = child(argv, f"time:{name}", env, pairs[0])
    mem_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536") if device == "cpu" else env
    todo = [] if args.no_memory else [(p, loss) for loss in args.losses.split(",") for p in data.PACKINGS]
    memory = []
    if len(pairs) > 1:  # memory beside the timing process, on other cores
        while todo:
            wave = [(key, child(argv, f"memory:{name}:{key[0]}:{key[1]}", mem_env, c))
                    for key, c in zip(todo, pairs[1:1 + args.jobs])]
            todo = todo[len(wave):]
            memory += [result(proc, str(key)) for key, proc in wave]
    out = result(timing, f"time:{name}")
    for key in todo:  # one at a time, after the timing
        memory.append(result(child(argv, f"memory:{name}:{key[0]}:{key[1]}", mem_env), str(key)))
    out["memory"] = memory
    return out


def ratios(res):
    """Per (layout, loss): median seconds, the median over rounds of the per-round ratio to padded, memory."""
    t = {(r["packing"], r["loss"]): r["seconds"] for r in res["time"]}
    m = {(r["packing"], r["loss"]): r for r in res["memory"]}
    nan = float("nan")
    rows = []
    for loss in [name for name in LOSSES if ("padded", name) in t]:
        for p in data.PACKINGS:
            mem = m.get((p, loss))
            rows.append({"packing": p, "loss": loss, "step_s": statistics.median(t[p, loss]),
                         "time_ratio": statistics.median(a / b for a, b in zip(t[p, loss], t["padded", loss])),
                         "peak_mib": mem["peak_bytes"] / MiB if mem else nan,
                         "peak_ratio": mem["peak_bytes"] / m["padded", loss]["peak_bytes"] if mem else nan})
    return rows


def table(args, machine, results):
    lines = [(f"Packing benchmark: {args.pairs} pairs a step in micro-batches of {args.micro}, max_length "
              f"{args.max_length}, lengths drawn like HH-RLHF harmless-base (issue 14); {machine}."), ""]
    for name, res in results.items():
        tok = res["tokens"]
        lines += [f"### {name} ({len(res['time'][0]['seconds'])} timed rounds)", "",
                  "| layout | real/computed x | real/computed p ⊕ x | loss | s/step | × padded | peak MiB | × padded |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            x, px = tok[f"{r['packing']} x_tokens"], tok[f"{r['packing']} p_tokens"]
            lines.append(f"| {r['packing']} | {x['real'] / x['computed']:.2f} ({x['computed']:,}) | "
                         f"{px['real'] / px['computed']:.2f} ({px['computed']:,}) | {r['loss']} | {r['step_s']:.3f} | "
                         f"{r['time_ratio']:.2f} | {r['peak_mib']:.0f} | {r['peak_ratio']:.2f} |")
        lines.append("")
    lines += ["real/computed: the sequences' own tokens (a prompt counted once per sequence) over the tokens the "
              "model computes (in parentheses); above 1 when the prompt is shared. × padded: the median over "
              "rounds of the ratio to the padded step of the same loss (the layouts take turns step by step, so "
              "other jobs on a shared CPU slow them alike); peak: "
              + ("CUDA max_memory_allocated." if "CUDA" in machine or "H100" in machine or "GPU" in machine
                 else "the process's peak RSS, each layout and loss alone in a fresh process.")]
    return "\n".join(lines)


def machine(device, args):
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores on the machine; each process {threads} threads"
            + (", pinned to 2 cores" if args.jobs > 1 else "") + f"), torch {torch.__version__}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one:
        kind, name, *rest = args.one.split(":")
        try:
            out = measure_time(args, name) if kind == "time" else measure_memory(args, name, *rest)
        finally:
            torch.distributed.destroy_process_group()
        print(json.dumps(out))
        return
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    results = {}
    for name in args.models.split(","):
        print(f"{name}: timing {2 * len(data.PACKINGS)} steps a round, up to {args.rounds} rounds", flush=True)
        res = measure_model(args, list(argv), name, device, env)
        res["rows"] = ratios(res)
        results[name] = res
    text = table(args, machine(device, args), results)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as fh:
        fh.write(text + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"machine": machine(device, args), "args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
