"""Peak host memory of each rank while loading a model for training: the old path against the new one.

Run:  python benchmarks/load_memory.py [--ranks 1,2,4] [--layers 10] [--out load_memory.json]

What it does, in one run:
  * builds a random GPTNeoX model of 481 MiB of float32 weights (hidden 768, 16 layers, vocab 8192; its
    largest tensor, an embedding, is 5% of it, as in Pythia-2.8B) and saves it with save_pretrained, in
    float32 and, as released checkpoints mostly are, in bfloat16 (--saved_dtypes);
  * for N in --ranks and each path, starts N CPU processes under torchrun (gloo), each of which loads
    that model for training as train.py's policy (float32 master weights, sharded over the N ranks):
      old:  every rank reads the whole model (models.load_model), then fully_shard splits it;
      new:  models.load_sharded: the skeleton is built on the meta device and sharded, each rank allocates
            its shards only, rank 0 alone reads the weights, and they are broadcast into the shards;
  * reports, per rank, the peak resident memory during loading minus the resident memory just before:
    VmHWM, reset through /proc/self/clear_refs, minus VmRSS. Before that, each rank has started its
    process group and loaded a 1 MB model of the same architecture by the same path, so that imports
    and first-use caches (about 80 MB, a quarter of this model) are not counted against either path.

Goals (issue 13), as multiples of the model's size: every rank but 0 at most 1/N + 0.15; rank 0 at most
1 + 1/N + 0.15.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PATHS = ("old", "new")


def build_model(path, layers, hidden=768, vocab=8192, dtype="float32"):
    """A random GPTNeoX model saved in `dtype`; returns the size of its weights in float32, in bytes."""
    import torch
    from transformers import ByT5Tokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
                           intermediate_size=4 * hidden, max_position_embeddings=512, tie_word_embeddings=False,
                           dtype=dtype)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return sum(p.numel() * 4 for p in model.parameters())


def status_bytes(field):
    """A 'kB' field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def load(path, which, tokenizer, device):
    """The model at `path`, loaded for training as the policy, by the old or the new path."""
    import torch

    from training import models

    mp, _ = models.mixed_precision("fp32", device)
    if which == "old":
        return models.shard(models.load_model(path, tokenizer).to(device), device, mp)
    return models.load_sharded(path, tokenizer, device, torch.float32, mp)


def worker(path, which):
    """One rank: load the model by the old or the new path; rank 0 prints every rank's peak as JSON."""
    import torch.distributed as dist

    from training import distributed, models

    rank, world, device = distributed.setup_distributed("cpu")
    tokenizer = models.load_tokenizer(path)
    load(path + "-warmup", which, tokenizer, device)  # the same code on a 1 MB model: imports and caches
    dist.barrier()
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM, the peak resident memory, to the current resident memory
    t0 = time.time()
    model = load(path, which, tokenizer, device)
    dist.barrier()
    result = {"rank": rank, "peak_bytes": status_bytes("VmHWM") - before, "seconds": time.time() - t0}
    del model
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    # With torch 2.13 on the CPU, about 1 exit in 4 of this worker aborted in interpreter teardown ("terminate
    # called without an active exception", after the result was printed); nothing is left to tear down.
    os._exit(0)


def launch(path, which, n):
    """One torchrun launch of n ranks; returns the per-rank results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.abspath(__file__), "--worker", which, "--model_dir", path]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{which} path, {n} ranks failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(rows, model_bytes):
    """The markdown table: peaks as multiples of the model, against the goals."""
    out = ["| saved as | ranks N | path | rank 0 peak | goal rank 0 | other ranks' peak (max) | goal others | met | "
           + "load s |", "|---|---|---|---|---|---|---|---|---|"]
    for saved, n, which, results in rows:
        peaks = [r["peak_bytes"] / model_bytes for r in results]
        goal0, goal = 1 + 1 / n + 0.15, 1 / n + 0.15
        others = max(peaks[1:]) if n > 1 else None
        met = peaks[0] <= goal0 and (others is None or others <= goal)
        out.append(f"| {saved} | {n} | {which} | {peaks[0]:.3f}x | {goal0:.2f}x | "
                   + (f"{others:.3f}x | {goal:.2f}x" if others is not None else "- | -")
                   + f" | {'yes' if met else 'no'} | {max(r['seconds'] for r in results):.1f} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated numbers of processes")
    parser.add_argument("--layers", type=int, default=16, help="transformer blocks of the random model")
    parser.add_argument("--saved_dtypes", default="float32,bfloat16", help="dtypes the model is saved in")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.model_dir, args.worker)
    rows = []
    for saved in args.saved_dtypes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model")
            model_bytes = build_model(path, args.layers, dtype=saved)
            build_model(path + "-warmup", 1, hidden=96, vocab=512, dtype=saved)
            print(f"model: {model_bytes / 2**20:.0f} MiB of float32 weights, saved as {saved}", flush=True)
            for n in map(int, args.ranks.split(",")):
                for which in PATHS:
                    rows.append((saved, n, which, launch(path, which, n)))
                    print(f"N={n} {which}: " + ", ".join(f"rank {r['rank']} {r['peak_bytes'] / 2**20:.0f} MiB"
                                                         for r in rows[-1][3]), flush=True)
    print(f"\npeak resident memory while loading, minus that before, as multiples of the model "
          f"({model_bytes / 2**20:.0f} MiB):\n")
    print(table(rows, model_bytes))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model_bytes": model_bytes, "runs": [{"saved": s, "ranks": n, "path": w, "results": r}
                                                            for s, n, w, r in rows]}, fh, indent=1)


if __name__ == "__main__":
    main()
