"""LoRA vs full fine-tuning: peak memory and step time of one Sr-DPO step of train.py, side by side (Issue 23).

    python benchmarks/lora.py                                   # Pythia-70M-shaped random model, 2 CPU cores
    python benchmarks/lora.py --hidden 768 --layers 12 --heads 12 --device cuda --pairs 8 --json out.json

The model: a randomly initialised GPT-NeoX of Pythia's shape (vocab 50304, intermediate 4 x hidden, rotary
25%), saved once to a temporary folder. Two cases on it, each as train.py runs it (FSDP2 over a process group
of one, train.train_step, RMSprop, the reference in train.run's dtype):
    full   the policy and a frozen reference copy (models.load_sharded twice), every weight trained;
    lora   one model with rank-r adapters (lora.adapter, default r 16, alpha 32, on the family's projections);
           π_ref is the same model with the adapters off (lora.Reference), only the adapters trained.
Time: both in one subprocess, taking turns step by step (--warmup + --steps rounds), each one's median and
the median of the per-round ratio lora/full. Memory: each alone in its own subprocess, one step after the
warm-up: the peak (CUDA max_memory_allocated; CPU peak RSS, VmHWM, with glibc's mmap threshold at 64 KiB as in
step_cost.py) minus the memory held before any model was loaded, i.e. weights, reference, gradients, optimizer
state and the step's activations. Goals: memory <= 0.5 x full, time <= 0.9 x full.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_cost import child, machine, peak, reset_peak, sync, synthetic_examples  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from training import config, distributed, lora, models  # noqa: E402

CASES = ("full", "lora")
GOALS = {"memory_ratio": 0.5, "time_ratio": 0.9}
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (Pythia-70M: 512, -160M: 768, -410M: 1024)")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary (Pythia's 50304)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (one micro-batch)")
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--response_tokens", type=int, default=64)
    p.add_argument("--p_tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--model_dir", default="", help=argparse.SUPPRESS)  # internal: the saved model
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "time" or a case, run in this process
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def save_model(args, folder):
    """A random Pythia-shaped GPT-NeoX saved with the byte-level tokenizer; returns its parameter count."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = models.load_tokenizer()
    config = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=4 * args.hidden, rotary_pct=0.25,
                           max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                           tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def setup(args, case):
    """This process's run of a case: process group of one, policy, reference, optimizer, batch, cfg."""
    kit = types.SimpleNamespace()
    if not distributed.dist.is_initialized():
        distributed.setup_distributed(args.device)
    kit.rank, kit.world = distributed.dist.get_rank(), distributed.dist.get_world_size()
    kit.device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    tokenizer = models.load_tokenizer(args.model_dir)
    mp, ref_dtype = models.mixed_precision("auto", kit.device)  # as train.run
    cfg = config.Config(loss="sr-dpo", model=args.model_dir, batch_size=args.pairs, warmup_steps=0,
                       lora_r=args.lora_r if case == "lora" else 0)
    config.validate(cfg, kit.world)
    kit.cfg = config.resolved(cfg)
    load = dict(tokenizer=tokenizer, device=kit.device, mp_policy=mp)
    if case == "lora":
        kit.policy = models.load_sharded(args.model_dir, dtype=torch.float32, **load,
                                         adapt=lora.adapter(args.lora_r, 0, 0.0, "", 0)).train()
        kit.ref = lora.Reference(kit.policy)
    else:
        kit.policy = models.load_sharded(args.model_dir, dtype=torch.float32, **load).train()
        kit.ref = models.load_sharded(args.model_dir, dtype=ref_dtype, **load).requires_grad_(False)
    kit.optimizer = config.OPTIMIZERS[kit.cfg.optimizer](lora.trainable(kit.policy), lr=kit.cfg.lr)
    examples = synthetic_examples(args.pairs, min(len(tokenizer), args.vocab), args.prompt_tokens,
                                  args.response_tokens, args.p_tokens)
    kit.batch = data.collate(examples, tokenizer.pad_token_id)
    kit.step = lambda i: train.train_step(kit.policy, kit.ref, None, kit.optimizer, [kit.batch], kit.cfg, "sr-dpo",
                                          i, kit.world, kit.device)
    return kit


def measure_time(args):
    """Seconds per step of both cases in this one process, taking turns step by step."""
    kits = {case: setup(args, case) for case in CASES}
    seconds = {case: [] for case in CASES}
    for i in range(args.warmup + args.steps):
        for case, kit in kits.items():
            sync(kit.device)
            t0 = time.perf_counter()
            kit.step(i)
            sync(kit.device)
            if i >= args.warmup:
                seconds[case].append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(seconds["lora"], seconds["full"]))
    return {"seconds": seconds, "step_s": {c: statistics.median(s) for c, s in seconds.items()}, "time_ratio": ratio}


def measure_memory(args, case):
    """Peak memory of one case alone in this process, above what the process held before any model."""
    device = torch.device("cuda") if args.device == "cuda" else torch.device("cpu")
    before = reset_peak(device)
    kit = setup(args, case)
    for i in range(args.warmup):
        kit.step(i)
    kit.step(args.warmup)
    sync(kit.device)
    return {"case": case, "peak_bytes": peak(kit.device), "bytes": peak(kit.device) - before,
            "trainable": sum(p.numel() for p in lora.trainable(kit.policy))}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        try:
            result = measure_time(args) if args.one == "time" else measure_memory(args, args.one)
        finally:
            distributed.dist.destroy_process_group()
        print(json.dumps(result))
        return 0
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory() as folder:
        n_params = save_model(args, folder)
        sub = [*argv, "--device", args.device, "--model_dir", folder]
        print(f"  {n_params / 1e6:.1f}M-parameter Pythia-shaped model; timing {args.warmup} + {args.steps} rounds",
              flush=True)
        timing = child(sub, "time", env, __file__)
        mem_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536") if args.device == "cpu" else env
        memory = {case: child(sub, case, mem_env, __file__) for case in CASES}
    result = {"machine": machine(args.device), "params": n_params, "args": vars(args), **timing,
              "memory": memory, "memory_ratio": memory["lora"]["bytes"] / memory["full"]["bytes"]}
    result["goals_met"] = {k: result[k] <= v for k, v in GOALS.items()}
    print("| case | step (s) | memory (MiB) | trainable params |\n|---|---|---|---|")
    for case in CASES:
        print(f"| {case} | {timing['step_s'][case]:.3f} | {memory[case]['bytes'] / MiB:.0f} | "
              f"{memory[case]['trainable']:,} |")
    print(f"lora/full: time {result['time_ratio']:.2f} (goal <= {GOALS['time_ratio']}), memory "
          f"{result['memory_ratio']:.2f} (goal <= {GOALS['memory_ratio']}); {result['machine']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
