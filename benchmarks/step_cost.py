"""Step cost: time and peak memory of one training step of train.py, beside its bare compute floor.

    python benchmarks/step_cost.py                                   # tiny model, a couple of minutes on 2 CPU cores
    python benchmarks/step_cost.py --model PATH --device cuda --pairs 8 --steps 5 --json out.json \
        --memory loop --profile profile.txt

Three cases, on the same model and the same batch: DPO; Sr-DPO with the live reference; Sr-DPO with the
reference cache of --precompute_ref (built by scoring.pair_logps). Each runs two variants:
    loop   train.train_step, as train.py runs it;
    floor  the same passes written plainly: model(...).logits, a cross-entropy gather, the loss, backward,
           clip, RMSprop step, and nothing else.
Both use the same FSDP2-wrapped models (distributed.setup_distributed, a process group of one; models.load_sharded),
the reference in train.run's dtype (bf16 on CUDA, float32 on CPU).

Time: all six in one subprocess (sharing one policy), taking turns step by step for --warmup + --steps
rounds; the table gives each one's median, the ratios the median over rounds of each round's ratio, so
that a change in the machine's load (other jobs) between rounds cancels.
Memory: each case and variant alone in its own subprocess, one step after the warm-up; the peak over the
memory held between steps (weights, optimizer state, cache): CUDA max_memory_allocated after a reset; CPU
peak RSS (VmHWM, reset through /proc/self/clear_refs) with glibc's mmap threshold fixed at 64 KiB so that
freed tensors leave the RSS (that slows allocation, hence not in the timed run). CPU runs use one thread
unless OMP_NUM_THREADS says otherwise.
The batch is synthetic, of fixed lengths (the issue's scale: prompt 64 + response 64 tokens, p 40 tokens).

Expected Sr-DPO/DPO time, from the passes each step runs over the real token counts Tx (x view) and Tp
(p ⊕ x view) of the batch, at 2N FLOPs a token forward and 4N backward (attention's quadratic term and the
optimizer step left out): DPO = policy forward+backward on x + reference on x = 8N·Tx; live Sr-DPO adds the
policy and the reference on p ⊕ x, 4N·Tp; cached Sr-DPO = 6N·Tx + 2N·Tp (the policy on p ⊕ x only).
--profile: one more live Sr-DPO step under torch.profiler after the timing: its top kernels by time.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from srpo import IGNORE_INDEX, LOSSES, SELF_REFINED, refinement  # noqa: E402
from training import config, distributed, models, scoring  # noqa: E402

# name: (loss, precompute_ref)
CASES = {"dpo": ("dpo", False), "sr-dpo": ("sr-dpo", False), "sr-dpo cached": ("sr-dpo", True)}
VARIANTS = ("loop", "floor")
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="train.py's --model: tiny, a local folder or a hub name")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case and variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--prompt_tokens", type=int, default=64, help="tokens of the query x")
    p.add_argument("--response_tokens", type=int, default=64, help="tokens of each response")
    p.add_argument("--p_tokens", type=int, default=40, help="tokens of the refinement prompt p")
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--memory", choices=("all", "loop"), default="all",
                   help="variants whose memory is measured (each in its own process); loop: the ratios' only")
    p.add_argument("--profile", default="", help="write a torch.profiler table of one live Sr-DPO step here")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "case:variant", run in this process
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.pairs < 1:
        p.error("--warmup, --steps and --pairs must be at least 1")
    return args


# ----------------------------------------------------------------------------- one case and variant (subprocess)


def synthetic_examples(n, vocab, prompt, response, p_len, seed=0):
    """n pairs in data.tokenize_pairs' format, random tokens of fixed lengths; p is the same for all."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731 (ids 0-2: pad, eos, unk)
    p = tokens(p_len)
    examples = []
    for i in range(n):
        x = tokens(prompt)
        ex = {"index": i, "score_chosen": float("nan"), "score_rejected": float("nan")}
        for side in ("chosen", "rejected"):
            y = tokens(response)
            ex[f"{side}_ids"], ex[f"{side}_labels"] = x + y, [IGNORE_INDEX] * prompt + y
            ex[f"p_{side}_ids"], ex[f"p_{side}_labels"] = p + x + y, [IGNORE_INDEX] * (p_len + prompt) + y
        examples.append(ex)
    return examples


def plain_logps(model, batch, view=""):
    """Σ log π(y|·) of each row, written plainly. Shape: batch[view + ...] [R, T]. Returns [R] float32."""
    logits = model(input_ids=batch[view + "input_ids"], attention_mask=batch[view + "attention_mask"]).logits
    targets = F.pad(batch[view + "labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts t + 1
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # 0 where ignored
    return -nll.float().view_as(targets).sum(1)


def floor_step(policy, ref, ref_logps, optimizer, batch, cfg):
    """The passes of one train_step, plainly: policy with grad; reference and the Sr p ⊕ x passes without."""
    B, sr = batch["index"].numel(), cfg.loss in SELF_REFINED
    pol = plain_logps(policy, batch)
    with torch.no_grad():
        if ref is None:  # the cache's rows
            ref_x, ref_px = ref_logps
        else:
            ref_x, ref_px = plain_logps(ref, batch), (plain_logps(ref, batch, "p_") if sr else None)
        pol_px = plain_logps(policy, batch, "p_") if sr else None
    args = (pol[:B], pol[B:], ref_x[:B], ref_x[B:])
    if sr:
        delta = refinement(pol_px[:B], pol_px[B:], ref_px[:B], ref_px[B:], cfg.beta)
        losses = LOSSES[cfg.loss](*args, delta, cfg.beta, cfg.lam)
    else:
        losses = LOSSES[cfg.loss](*args, cfg.beta)
    losses.mean().backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _proc_status_bytes(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def reset_peak(device):
    """Reset the peak-memory counter; return the memory held now (bytes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux)
    return _proc_status_bytes("VmRSS")


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_bytes("VmHWM")


def setup(args, cached):
    """This process's run: process group of one, FSDP2 policy and reference, batch, optimizer, and with
    `cached` the reference cache (scoring.pair_logps, as --precompute_ref builds it)."""
    kit = types.SimpleNamespace()
    kit.rank, kit.world, kit.device = distributed.setup_distributed()
    tokenizer = models.load_tokenizer(args.model)
    mp, ref_dtype = models.mixed_precision("auto", kit.device)  # as train.run
    kit.policy = models.load_sharded(args.model, tokenizer, kit.device, torch.float32, mp).train()
    kit.ref = models.load_sharded(args.model, tokenizer, kit.device, ref_dtype, mp).requires_grad_(False)
    examples = synthetic_examples(args.pairs, min(len(tokenizer), kit.policy.config.vocab_size),
                                  args.prompt_tokens, args.response_tokens, args.p_tokens)
    kit.batch = data.collate(examples, tokenizer.pad_token_id)
    kit.on_device = data.to_device(kit.batch, kit.device)
    kit.cache = scoring.pair_logps(kit.ref, examples, tokenizer.pad_token_id, args.pairs,
                                   with_p=True) if cached else None
    cfg = train.resolved(train.Config(model=args.model))  # the optimizer and learning rate of train.run
    kit.optimizer = config.OPTIMIZERS[cfg.optimizer](kit.policy.parameters(), lr=cfg.lr)
    return kit


def step_fn(args, kit, case, variant):
    """One step of a case, as a function of the step index: train.train_step, or its floor."""
    loss, cached = CASES[case]
    cfg = train.Config(loss=loss, model=args.model, batch_size=args.pairs, warmup_steps=0, precompute_ref=cached)
    train.validate(cfg, kit.world)
    cfg = train.resolved(cfg)
    ref, cache = (None, kit.cache) if cached else (kit.ref, None)
    if variant == "loop":
        return lambda i: train.train_step(kit.policy, ref, cache, kit.optimizer, [kit.batch], cfg, loss, i,
                                          kit.world, kit.device)
    ref_logps = train.no_grad_logps(None, cache, kit.on_device, need_p=True) if cached else None
    return lambda i: floor_step(kit.policy, ref, ref_logps, kit.optimizer, kit.on_device, cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(args):
    """Seconds per step of every case and variant, in this one process, taking turns step by step so
    that a change in the machine's load falls on all of them alike."""
    kit = setup(args, cached=True)
    steps = {(case, variant): step_fn(args, kit, case, variant) for case in CASES for variant in VARIANTS}
    seconds = {key: [] for key in steps}
    for i in range(args.warmup + args.steps):
        for key, step in steps.items():
            sync(kit.device)
            t0 = time.perf_counter()
            step(i)
            sync(kit.device)
            if i >= args.warmup:
                seconds[key].append(time.perf_counter() - t0)
    if args.profile:
        profile_step(steps["sr-dpo", "loop"], args.warmup + args.steps, kit.device, args.profile)
    tokens = {"x_tokens": int(kit.batch["attention_mask"].sum()), "p_tokens": int(kit.batch["p_attention_mask"].sum())}
    return [{"case": c, "variant": v, "seconds": s, "step_s": statistics.median(s), **tokens}
            for (c, v), s in seconds.items()]


KERNEL_KINDS = {"matmul": ("gemm", "nvjet", "xmma", "cutlass", "cublas"), "attention": ("flash", "fmha", "attention")}


def profile_step(step, i, device, path):
    """One step under torch.profiler: where its time goes, and the top operators/kernels by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(i)
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [f"one live Sr-DPO step of train.train_step under torch.profiler: {wall * 1e3:.1f} ms wall "
             "(the profiler's overhead included)"]
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # not the CPU ops that launch them
        busy = sum(getattr(e, key) for e in kernels) / 1e6  # microseconds -> seconds
        kinds = {kind: sum(getattr(e, key) for e in kernels if any(w in e.key.lower() for w in words)) / 1e6
                 for kind, words in KERNEL_KINDS.items()}
        lines.append(f"GPU kernels busy {busy * 1e3:.1f} ms ({100 * busy / wall:.0f}% of the wall time); of that "
                     + ", ".join(f"{k} {100 * v / max(busy, 1e-12):.0f}%" for k, v in kinds.items())
                     + f", other {100 * (busy - sum(kinds.values())) / max(busy, 1e-12):.0f}%")
    lines.append(events.table(sort_by=key, row_limit=25, max_name_column_width=70))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def measure_memory(args, case, variant):
    """Peak memory of one case and variant, alone in this process: one step after the warm-up."""
    kit = setup(args, cached=CASES[case][1])
    if kit.cache is not None:
        kit.ref = None  # as train.run does after the precomputing pass: the reference model is freed
    step = step_fn(args, kit, case, variant)
    for i in range(args.warmup):
        step(i)
    base = reset_peak(kit.device)
    step(args.warmup)
    sync(kit.device)
    top = peak(kit.device)
    return {"case": case, "variant": variant, "peak_bytes": top, "step_bytes": top - base}


def run_child(args):
    try:
        if args.one == "time":
            return measure_time(args)
        return measure_memory(args, *args.one.split(":"))
    finally:
        models.dist.destroy_process_group()


# ----------------------------------------------------------------------------- all of them (parent)


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {threads} thread(s) per run, torch {torch.__version__}"


def measure_all(args, argv):
    """Time in one subprocess, memory in one subprocess per case and variant; results in CASES x VARIANTS order."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("step_cost.py: --device cuda, but torch sees no CUDA device")
    env = dict(os.environ)
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    print(f"  timing {len(CASES) * len(VARIANTS)} steps a round, {args.warmup} + {args.steps} rounds", flush=True)
    results = child(argv, "time", env)
    # glibc keeps freed tensors in its heap, out of sight of the RSS, unless every tensor is mmapped
    mem_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536") if device == "cpu" else env
    for r in results:
        if args.memory == "all" or r["variant"] == "loop":
            r.update(child(argv, f"{r['case']}:{r['variant']}", mem_env))
        print(f"  {r['case']:<14} {r['variant']:<5} {r['step_s'] * 1e3:9.1f} ms/step "
              f"{mib(r.get('step_bytes')):>8} MiB", flush=True)
    return device, results


def mib(n):
    return "-" if n is None else f"{n / MiB:.1f}"


def child(argv, one, env, script=__file__):
    """`script --one ONE` (run_child here; each benchmark's own measurement) in a fresh process: the JSON it
    prints last."""
    cmd = [sys.executable, os.path.abspath(script), *argv, "--one", one]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{os.path.basename(script)}: {one} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(results):
    """The issue's figures of merit. Time ratios: the median over rounds of each round's ratio (the steps
    of a round ran back to back, so a change in load between rounds cancels)."""
    get = {(r["case"], r["variant"]): r for r in results}

    def t(a, b, va="loop", vb="loop"):
        return statistics.median(x / y for x, y in zip(get[a, va]["seconds"], get[b, vb]["seconds"]))

    def m(a, key):
        return get[a, "loop"][key] / get["dpo", "loop"][key]

    out = {f"loop/floor {c}": t(c, c, vb="floor") for c in CASES}
    tx, tp = get["dpo", "loop"]["x_tokens"], get["dpo", "loop"]["p_tokens"]
    out.update({"sr-dpo/dpo time": t("sr-dpo", "dpo"), "sr-dpo cached/dpo time": t("sr-dpo cached", "dpo"),
                "expected sr-dpo/dpo time": (8 * tx + 4 * tp) / (8 * tx),
                "expected sr-dpo cached/dpo time": (6 * tx + 2 * tp) / (8 * tx),
                "sr-dpo/dpo step memory": m("sr-dpo", "step_bytes"),
                "sr-dpo cached/dpo step memory": m("sr-dpo cached", "step_bytes"),
                "sr-dpo/dpo peak memory": m("sr-dpo", "peak_bytes"),
                "sr-dpo cached/dpo peak memory": m("sr-dpo cached", "peak_bytes")})
    return out


def report(args, device, results, r):
    lines = [f"step cost: model {args.model}, {args.pairs} pairs/step (prompt {args.prompt_tokens} + response "
             f"{args.response_tokens} tokens, p {args.p_tokens}), {args.steps} steps after {args.warmup}, "
             f"on {machine(device)}",
             f"{'case':<14} {'variant':<7} {'ms/step':>9} {'step MiB':>9} {'peak MiB':>9}"]
    for x in results:
        lines.append(f"{x['case']:<14} {x['variant']:<7} {x['step_s'] * 1e3:9.1f} {mib(x.get('step_bytes')):>9} "
                     f"{mib(x.get('peak_bytes')):>9}")
    lines += ["step MiB: peak over the memory held between steps; peak MiB: "
              + ("max_memory_allocated" if device == "cuda" else "peak RSS of the process"),
              "loop / floor time:      " + ", ".join(f"{c} {r[f'loop/floor {c}']:.2f}" for c in CASES)
              + "   (goal <= 1.10)",
              f"Sr-DPO / DPO time:      live {r['sr-dpo/dpo time']:.2f}, cached {r['sr-dpo cached/dpo time']:.2f}"
              f"   (expected from the passes: {r['expected sr-dpo/dpo time']:.2f} and "
              f"{r['expected sr-dpo cached/dpo time']:.2f})",
              f"Sr-DPO / DPO step mem:  live {r['sr-dpo/dpo step memory']:.2f}, "
              f"cached {r['sr-dpo cached/dpo step memory']:.2f}   (goal <= 1.05); "
              f"peak memory live {r['sr-dpo/dpo peak memory']:.2f}, cached {r['sr-dpo cached/dpo peak memory']:.2f}"]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_child(args)))
        return
    device, results = measure_all(args, list(argv))
    r = ratios(results)
    print(report(args, device, results, r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(device), "args": vars(args), "results": results, "ratios": r}, fh, indent=1)


if __name__ == "__main__":
    main()
