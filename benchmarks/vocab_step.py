"""A large vocabulary's cost in one Sr-DPO step: fused log-probs (scoring.FUSED_LOGPS, never the [B, T, V] logits)
against the full logits, on a Qwen2-shaped random model (d 128, 2 layers) with vocabulary 151,936 and with 512.

    python benchmarks/vocab_step.py [--json benchmarks/results/vocab_step.json]   # about 14 minutes on 2 CPU cores

The step is train.train_step's Sr-DPO step with the live reference: 8 pairs of 512 tokens (prompt 256 + response
256; p 40 more), micro-batches of 4, padded, FSDP2 over a process group of one, RMSprop, float32 on the CPU.
Memory: each (vocabulary, path) alone in its own subprocess, one step after a warm-up step: "peak" is the
process's peak (the issue's measure), "step" the peak over the memory held between steps (weights, optimizer
state), the way benchmarks/step_cost.py counts it (CPU: peak RSS through /proc/self/clear_refs, glibc's mmap
threshold at 64 KiB so that freed tensors leave the RSS).
Time: vocabulary 151,936, both paths in one subprocess taking turns step by step (--steps each after a warm-up);
the ratio is the median of each round's fused/full.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import child, machine, peak, reset_peak, synthetic_examples  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from training import distributed, models, scoring  # noqa: E402
from training.config import OPTIMIZERS  # noqa: E402

LARGE, SMALL = 151936, 512
GOAL_MEMORY, GOAL_TIME = 3.0, 1.0  # large/small process peak with fused log-probs; fused/full step time
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=8, help="pairs per step")
    p.add_argument("--micro", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--response_tokens", type=int, default=256)
    p.add_argument("--p_tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=2, help="timed steps per path, after one warm-up")
    p.add_argument("--vocab", type=int, default=LARGE, help="the large vocabulary")
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "mem:VOCAB:fused|full" or "time"
    return p.parse_args(argv)


def setup(args, vocab):
    """Policy and reference (Qwen2-shaped, random, FSDP2 over one rank), optimizer, micro-batches, config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, world, device = distributed.setup_distributed("cpu")
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, use_cache=False)
    mp, _ = models.mixed_precision("fp32", device)
    pair = []
    for seed in (0, 0):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        models._dropout_off(model)
        pair.append(models.shard(model, device, mp))
    policy, ref = pair[0].train(), pair[1].eval().requires_grad_(False)
    cfg = train.resolved(train.Config(loss="sr-dpo", model="tiny", batch_size=args.pairs,
                                      micro_batch_size=args.micro, warmup_steps=0))
    optimizer = OPTIMIZERS[cfg.optimizer](policy.parameters(), lr=cfg.lr)
    examples = synthetic_examples(args.pairs, vocab, args.prompt_tokens, args.response_tokens, args.p_tokens)
    batches = [data.collate(examples[a:a + args.micro], 0) for a in range(0, args.pairs, args.micro)]
    return lambda i: train.train_step(policy, ref, None, optimizer, batches, cfg, "sr-dpo", i, world, device), device


def measure_memory(args, vocab, path):
    scoring.FUSED_LOGPS, scoring.FUSED_MIN_VOCAB = path == "fused", 0
    step, device = setup(args, vocab)
    step(0)
    base = reset_peak(device)
    step(1)
    top = peak(device)
    return {"vocab": vocab, "path": path, "peak_bytes": top, "step_bytes": top - base}


def measure_time(args):
    step, _ = setup(args, args.vocab)
    seconds = {"fused": [], "full": []}
    for i in range(1 + args.steps):
        for path in seconds:
            scoring.FUSED_LOGPS = path == "fused"
            t0 = time.perf_counter()
            step(2 * i + (path == "full"))
            if i:
                seconds[path].append(time.perf_counter() - t0)
    return {"seconds": seconds, "ratio": statistics.median(a / b for a, b in zip(seconds["fused"], seconds["full"]))}


def memory_ratios(rows, large):
    """Large/small vocabulary, each path against itself: the process's peak (the issue's measure: weights,
    optimizer state and the step), and the step's own memory (the peak over what is held between steps)."""
    out = {}
    for key, name in (("peak_bytes", "peak"), ("step_bytes", "step memory")):
        get = {(r["vocab"], r["path"]): r[key] for r in rows}
        for path, label in (("fused", "fused"), ("full", "full logits")):
            out[f"large/small {name}, {label}"] = get[large, path] / get[SMALL, path]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one:
        try:
            kind, *rest = args.one.split(":")
            out = measure_time(args) if kind == "time" else measure_memory(args, int(rest[0]), rest[1])
        finally:
            models.dist.destroy_process_group()
        print(json.dumps(out))
        return
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    mem_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for vocab in (args.vocab, SMALL):
        for path in ("fused", "full"):
            rows.append(child(argv, f"mem:{vocab}:{path}", mem_env, __file__))
            r = rows[-1]
            print(f"  vocab {vocab:>6} {path:<5} step {r['step_bytes'] / MiB:8.1f} MiB, peak RSS "
                  f"{r['peak_bytes'] / MiB:8.1f} MiB", flush=True)
    timing = child(argv, "time", env, __file__)
    ratios = memory_ratios(rows, args.vocab)
    ratios["fused/full step time, large vocab"] = timing["ratio"]
    tokens = args.prompt_tokens + args.response_tokens
    print(f"Sr-DPO step, Qwen2-shaped d 128 x 2 layers, {args.pairs} pairs x {tokens} tokens, "
          f"micro-batch {args.micro}, padded, on {machine('cpu')}")
    print(f"process peak vocab {args.vocab} / vocab {SMALL} (the issue's measure): fused "
          f"{ratios['large/small peak, fused']:.2f}x (goal <= {GOAL_MEMORY:.0f}x), full logits "
          f"{ratios['large/small peak, full logits']:.2f}x")
    print(f"step memory (peak over what is held between steps) vocab {args.vocab} / vocab {SMALL}: fused "
          f"{ratios['large/small step memory, fused']:.2f}x, "
          f"full logits {ratios['large/small step memory, full logits']:.2f}x")
    print(f"step time fused / full logits (vocab {args.vocab}): {timing['ratio']:.2f}x (goal <= {GOAL_TIME:.1f}x); "
          f"median s/step fused {statistics.median(timing['seconds']['fused']):.2f}, "
          f"full {statistics.median(timing['seconds']['full']):.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine("cpu"), "args": vars(args), "memory": rows, "time": timing,
                       "ratios": ratios}, fh, indent=1)


if __name__ == "__main__":
    main()
