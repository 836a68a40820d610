"""What several test files share: running train.py small and fast, in this process or as a command, and reading
what a run wrote (metrics.jsonl, final/'s weights)."""

import json
import os
import subprocess
import sys
import time

import torch

import train
from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast: 8 pairs a step, no SFT stage, no held-out evaluation until the end.
FAST = ["--device", "cpu", "--batch_size", "8", "--max_pairs", "32", "--sft_steps", "0", "--eval_every", "0",
        "--eval_pairs", "8", "--save_every", "0", "--lr", "3e-3", "--warmup_steps", "1"]


def run_train(out_dir, *flags):
    """train.main in this process; returns its exit code and the metrics it wrote."""
    code = train.main(["--out_dir", str(out_dir), *FAST, *map(str, flags)])
    return code, read_metrics(out_dir)


def read_metrics(out_dir):
    """The records of out_dir's metrics.jsonl ([] when there is none)."""
    path = os.path.join(out_dir, checkpoint.METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def final_weights(out_dir):
    """The exported final/ folder's weights, loaded with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, checkpoint.FINAL))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def env():
    """The environment of a train.py command: one thread, the project importable, no hub."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def signalled_run(out_dir, sig, *flags):
    """(exit status, output) of a long DPO run of train.py sent `sig` once it has logged 2 steps."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(out_dir), *FAST,
           "--loss", "dpo", "--max_steps", "200", "--epochs", "100", *flags]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(read_metrics(out_dir)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out
