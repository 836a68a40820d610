"""Peak extra memory of srpo.sequence_logps against the naive log_softmax + gather, and of the fused head.

Run:  python benchmarks/logps_memory.py [--shape 8,512,50304] [--hidden 2048] [--device cpu|cuda] [--dtype bf16]
      [--json F]

How it counts:
  * Every (method, dtype, pass) is measured in a fresh subprocess, so no run inherits
    another's allocations or allocator state.
  * The logits [B, T, V] (fp32 or bf16, requiring grad as in training) and the labels
    (a quarter of each row masked as prompt) are allocated first; a tiny warm-up call
    runs; then the peak counter is reset. "Extra peak" is the highest memory reached
    during the call minus the memory held just before it.
  * forward: logps = method(logits, labels), kept alive with its autograd graph.
    forward+backward: then logps.sum().backward(). The gradient of the logits (same
    size and dtype as the logits, kept in logits.grad) is needed by any method and is
    subtracted; everything else the backward pass allocates is counted.
  * CPU: resident memory, peak VmHWM (reset via /proc/self/clear_refs) minus VmRSS.
    CUDA: torch.cuda.max_memory_allocated minus memory_allocated.
  * Percentages are of the fp32 logits' size (B*T*V*4 bytes), for bf16 logits too.
  * fused: srpo.hidden_sequence_logps from hidden states [B, T, --hidden] and a head [V, --hidden] (the path
    training/models.py takes): the logits never exist. Its inputs (and in backward their gradients) are subtracted
    as the logits are for the others; the naive and srpo columns leave out the logits themselves (and their
    gradient), which a model makes for them, so that "logits + extra" is what they cost and "extra" what fused costs.
"""

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import srpo  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("forward", "forward+backward")
GOAL_SRPO, GOAL_NAIVE = 0.25, 1.0  # extra peak as a fraction of the fp32 logits (issue 2)
MIB = 2.0**20


def naive_logps(logits, labels):
    """Summed log-probs through a full float32 log_softmax. Shape: logits [B,T,V], labels [B,T]."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != srpo.IGNORE_INDEX)).sum(dim=-1)


METHODS = {"naive": naive_logps, "srpo": srpo.sequence_logps, "fused": srpo.hidden_sequence_logps}


def make_inputs(shape, dtype, device):
    """Logits filled in place (no temporary) and labels with the first quarter of each row masked."""
    B, T, V = shape
    logits = torch.empty(shape, dtype=dtype, device=device).normal_().requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, : T // 4] = srpo.IGNORE_INDEX
    return logits, labels


def _proc_status_bytes(field):
    """A 'kB' field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


class PeakMeter:
    """Peak memory growth since reset(): resident memory on CPU, allocated memory on CUDA."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        except OSError as err:
            raise SystemExit(f"logps_memory.py: cannot reset the peak RSS ({err}); needs Linux /proc")
        self.base = _proc_status_bytes("VmRSS")

    def extra(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_bytes("VmHWM") - self.base


def make_head_inputs(shape, hidden, dtype, device):
    """Hidden states [B, T, hidden] and a head [V, hidden] (both requiring grad), labels as make_inputs'."""
    B, T, V = shape
    h = torch.empty(B, T, hidden, dtype=dtype, device=device).normal_().requires_grad_(True)
    weight = torch.empty(V, hidden, dtype=dtype, device=device).normal_(std=hidden ** -0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, : T // 4] = srpo.IGNORE_INDEX
    return (h, weight), labels


def run_pass(method, inputs, labels, backward):
    """The measured work; returns the output so that the caller keeps the graph alive."""
    out = srpo.hidden_sequence_logps(inputs[0], inputs[1], labels) if method == "fused" else \
        METHODS[method](inputs, labels)
    if backward:
        out.sum().backward()
    return out


def measure(method, dtype, pass_name, shape, device, hidden):
    """Extra peak bytes of one method and pass; runs inside the child process."""
    backward = pass_name == "forward+backward"
    make = (lambda s: make_head_inputs(s, hidden, DTYPES[dtype], device)) if method == "fused" else \
        (lambda s: make_inputs(s, DTYPES[dtype], device))
    small, small_labels = make((2, 8, 16))
    run_pass(method, small, small_labels, backward)  # warm-up
    inputs, labels = make(shape)
    meter = PeakMeter(device)
    meter.reset()
    out = run_pass(method, inputs, labels, backward)
    extra = meter.extra()
    del out
    leaves = inputs if method == "fused" else (inputs,)
    return extra - (sum(x.numel() * x.element_size() for x in leaves) if backward else 0)


def measure_in_subprocess(method, dtype, pass_name, args):
    """Runs this script with --child and returns the extra peak bytes it prints."""
    cmd = [sys.executable, os.path.abspath(__file__), "--shape", args.shape, "--device", args.device,
           "--hidden", str(args.hidden), "--child", method, dtype, pass_name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"logps_memory.py: child {method} {dtype} {pass_name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def parse_shape(text):
    """'8,512,50304' -> (8, 512, 50304)."""
    shape = tuple(int(n) for n in text.split(","))
    if len(shape) != 3 or min(shape) < 2:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected B,T,V, each >= 2")
    return shape


def format_row(dtype, pass_name, naive, ours, fused, fp32_bytes):
    """One table line: extra peak in MiB and % of the fp32 logits, naive/srpo; fused's extra peak."""
    ratio = f"{naive / ours:8.1f}x" if ours > 0 else "      inf"
    return (f"{dtype:5} {pass_name:17} {naive / MIB:9.0f} {100 * naive / fp32_bytes:7.1f}% "
            f"{ours / MIB:9.0f} {100 * ours / fp32_bytes:7.1f}% {ratio}  {fused / MIB:9.0f} "
            f"{100 * fused / fp32_bytes:7.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,512,50304", help="B,T,V of the logits")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size D of the fused head's inputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("all", *DTYPES), default="all", help="logits dtype(s) to measure")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "DTYPE", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = parse_shape(args.shape)
    if args.child:
        print(json.dumps({"extra_bytes": measure(*args.child, shape, args.device, args.hidden)}))
        return
    fp32_bytes = 4 * shape[0] * shape[1] * shape[2]
    print(f"logits {list(shape)} on {args.device}; fp32 logits = {fp32_bytes / MIB:.0f} MiB; "
          f"srpo chunk = {srpo._CHUNK_ELEMENTS * 4 / MIB:.0f} MiB of fp32 scratch")
    print(f"  naive and srpo: extra beyond the logits (and their gradient) a model makes first; fused: from hidden "
          f"states [.., {args.hidden}] and the head, no logits at all")
    print(f"{'dtype':5} {'pass':17} {'naive MiB':>9} {'% fp32':>8} {'srpo MiB':>9} {'% fp32':>8} naive/srpo "
          f"{'fused MiB':>9} {'% fp32':>8}")
    worst_srpo, least_naive, rows = 0.0, float("inf"), []
    for dtype in DTYPES if args.dtype == "all" else (args.dtype,):
        for pass_name in PASSES:
            naive, ours, fused = (measure_in_subprocess(m, dtype, pass_name, args) for m in METHODS)
            print(format_row(dtype, pass_name, naive, ours, fused, fp32_bytes), flush=True)
            worst_srpo, least_naive = max(worst_srpo, ours / fp32_bytes), min(least_naive, naive / fp32_bytes)
            rows.append({"dtype": dtype, "pass": pass_name, "naive_bytes": naive, "srpo_bytes": ours,
                         "srpo_fraction": ours / fp32_bytes, "naive_fraction": naive / fp32_bytes,
                         "fused_bytes": fused, "fused_fraction": fused / fp32_bytes})
    met = worst_srpo <= GOAL_SRPO and least_naive >= GOAL_NAIVE
    print(f"goal (srpo <= {GOAL_SRPO:.0%}, naive >= {GOAL_NAIVE:.0%} of fp32 logits): "
          f"{'met' if met else 'NOT met'} (srpo worst {worst_srpo:.1%}, naive least {least_naive:.1%})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": list(shape), "hidden": args.hidden, "device": args.device,
                       "fp32_logits_bytes": fp32_bytes,
                       "goal_srpo_fraction": GOAL_SRPO, "rows": rows, "srpo_worst_fraction": worst_srpo,
                       "met": met}, fh, indent=1)


if __name__ == "__main__":
    main()
