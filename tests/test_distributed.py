"""Loading that scales, bf16 on CPU, export, several nodes on one machine, and one rank's fault stopping all.

Every run is a few steps of the tiny model (or of a tiny Llama with tied embeddings) on the CPU.
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import FAST, ROOT, env, read_metrics, run_train

import train
from training import checkpoint, distributed, models

LAUNCH = [sys.executable, "-m", "torch.distributed.run"]
ALIGN = ["--loss", "sr-dpo", "--sft_steps", "2", "--max_steps", "2", "--optimizer", "sgd", "--lr", "0.5"]


def save_source(path, dtype=torch.bfloat16, **config):
    """A tiny Llama (tied embeddings, rotary buffers) saved in `dtype` with the byte-level tokenizer."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id, dtype=str(dtype).split(".")[-1], **config)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sharded_loading_matches_from_pretrained(tmp_path):
    """The meta skeleton, filled from rank 0's copy: tied weights stay tied, the rotary buffers are real."""
    from transformers import AutoModelForCausalLM

    path = save_source(tmp_path / "src")
    _, _, device = distributed.setup_distributed("cpu")
    try:
        mp, _ = models.mixed_precision("fp32", device)
        model = models.load_sharded(str(path), models.load_tokenizer(str(path)), device, torch.float32, mp)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)
    finally:
        torch.distributed.destroy_process_group()


# bf16 compute on the CPU: a bf16 step changes the tiny model's losses by about 1e-2 against fp32's.
BF16_TOLERANCE = 0.05


@pytest.mark.slow  # four bf16 runs on the CPU
def test_bf16_on_cpu_learns_resumes_bitwise_and_tracks_fp32(tmp_path):
    flags = ["--loss", "sr-dpo", "--sft_steps", "2", "--max_pairs", "16", "--epochs", "8"]
    _, bf16 = run_train(tmp_path / "bf16", *flags, "--mixed_precision", "bf16", "--max_steps", "8")
    _, fp32 = run_train(tmp_path / "fp32", *flags, "--mixed_precision", "fp32", "--max_steps", "8")
    losses = [m["loss"] for m in bf16 if m["stage"] == "sr-dpo"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in fp32], abs=BF16_TOLERANCE)
    assert [m["loss"] for m in bf16] != [m["loss"] for m in fp32]  # bf16 compute did run
    run_train(tmp_path / "cut", *flags, "--mixed_precision", "bf16", "--max_steps", "4")
    _, resumed = run_train(tmp_path / "cut", *flags, "--mixed_precision", "bf16", "--max_steps", "8", "--resume")
    assert [(m["stage"], m["step"], m["loss"]) for m in resumed] == [(m["stage"], m["step"], m["loss"]) for m in bf16]


def test_bf16_source_exports_bf16_with_its_config_and_generates_alike(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    source = save_source(tmp_path / "src", attention_dropout=0.1, use_cache=True)
    prompt = torch.tensor([[1, 70, 80, 90, 100]])
    expected = {}
    export = train.export

    def export_and_generate(policy, *args, **kwargs):  # the in-memory policy's greedy answer, just before it is written
        with torch.no_grad():
            expected[os.path.basename(args[1])] = policy.generate(prompt, max_new_tokens=8, do_sample=False)
        return export(policy, *args, **kwargs)

    monkeypatch.setattr(train, "export", export_and_generate)
    code, _ = run_train(tmp_path / "out", "--model", source, "--loss", "dpo", "--sft_steps", "2", "--max_steps", "2",
                  "--mixed_precision", "bf16", "--lr", "1e-2")
    assert code == 0
    for name in (checkpoint.SFT_DIR, checkpoint.FINAL):
        folder = tmp_path / "out" / name
        config = AutoConfig.from_pretrained(folder)
        assert (config.dtype, config.use_cache, config.attention_dropout) == (torch.bfloat16, True, 0.1)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        answer = model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(answer, expected[name]), name
    assert run_train(tmp_path / "f32", "--model", source, "--loss", "sft", "--max_steps", "1",
               "--save_dtype", "float32")[0] == 0
    assert AutoConfig.from_pretrained(tmp_path / "f32" / checkpoint.FINAL).dtype == torch.float32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_without_a_shared_folder_match_one_process(tmp_path):
    """Two torchrun launches as two nodes (c10d rendezvous on 127.0.0.1), each with its own --out_dir:
    the SFT model reaches the alignment stage in memory, and rank 0 alone writes sft/ and final/."""
    code, one = run_train(tmp_path / "one", *ALIGN)
    assert code == 0
    port = free_port()
    procs = [subprocess.Popen(
        [*LAUNCH, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "srpo-test", os.path.join(ROOT, "train.py"),
         "--out_dir", str(tmp_path / f"node{n}"), *FAST, *ALIGN],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    writers = [n for n in (0, 1) if (tmp_path / f"node{n}" / checkpoint.FINAL).exists()]
    assert len(writers) == 1  # rank 0's node; c10d assigns ranks in rendezvous order
    two = read_metrics(tmp_path / f"node{writers[0]}")
    assert [(m["stage"], m["step"]) for m in two] == [(m["stage"], m["step"]) for m in one]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)


FAULT_HARNESS = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch, data, train
from base import common

fault, rank = sys.argv[1], int(os.environ["RANK"])
def mark():  # when the fault happened
    with open({mark!r}, "w") as fh:
        fh.write(str(time.time()))
if rank == 1 and fault == "data":
    def bad_data(*args, **kwargs):
        mark()
        raise common.DataError("pairs.jsonl line 3: 'chosen' is missing")
    data.load_pairs = bad_data
if rank == 1 and fault in ("oom", "nan"):
    forward, calls = train.view_logps, []
    def faulty(*args, **kwargs):
        calls.append(1)
        if len(calls) > 6:  # inside the second step
            mark()
            if fault == "oom":
                raise torch.OutOfMemoryError("out of memory: tried to allocate 20.00 GiB")
            return forward(*args, **kwargs) * float("nan")
        return forward(*args, **kwargs)
    train.view_logps = faulty
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fault,words", [("data", "rank 1: pairs.jsonl line 3"),
                                         ("oom", "rank 1: out of memory: tried to allocate"),
                                         ("nan", "non-finite loss")])
def test_a_fault_on_rank_1_stops_every_rank(tmp_path, fault, words):
    harness = tmp_path / "harness.py"
    harness.write_text(FAULT_HARNESS.format(root=ROOT, mark=str(tmp_path / "fault_at")))
    cmd = [*LAUNCH, "--standalone", "--nproc_per_node=2", str(harness), fault, "--out_dir", str(tmp_path / "out"),
           *FAST, "--loss", "sr-dpo", "--max_steps", "4"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("train.py: error:")]
    assert done.returncode != 0
    assert len(errors) == 1 and words in errors[0], done.stderr[-3000:]
    # Every rank gone within seconds of the fault (gloo's own timeout would be 30 minutes).
    assert time.time() - float((tmp_path / "fault_at").read_text()) < 20
    assert not (tmp_path / "out" / checkpoint.FINAL).exists()


HANG_HARNESS = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train

forward, calls = train.view_logps, []
def hangs(*args, **kwargs):
    calls.append(1)
    if int(os.environ["RANK"]) == 1 and len(calls) > 2:  # inside the second step (dpo: 2 calls a step): stopped
        with open({pid!r}, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    return forward(*args, **kwargs)
train.view_logps = hangs
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_hung_rank_ends_the_run_after_the_collective_timeout(tmp_path):
    """Rank 1 stops in the middle of step 2: rank 0 ends with one line naming the step within the timeout, not
    gloo's 30 minutes, and the checkpoint of step 1 is kept."""
    harness, pid = tmp_path / "harness.py", tmp_path / "pid"
    harness.write_text(HANG_HARNESS.format(root=ROOT, pid=str(pid)))
    cmd = [*LAUNCH, "--standalone", "--nproc_per_node=2", str(harness), "--out_dir", str(tmp_path / "out"), *FAST,
           "--loss", "dpo", "--max_steps", "4", "--save_every", "1", "--collective_timeout", "5"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not pid.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        stopped = time.time()
        assert pid.exists(), proc.communicate(timeout=60)
        stderr = ""
        while "train.py: error:" not in stderr and time.time() < stopped + 30:
            stderr += proc.stderr.readline()
        waited = time.time() - stopped
    finally:
        if pid.exists():
            os.kill(int(pid.read_text()), 9)  # rank 1, stopped by the harness (torchrun would wait to SIGKILL it)
        proc.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "--collective_timeout 5s at dpo step 2" in errors[0], stderr[-3000:]
    assert "dpo step 1) is kept" in errors[0]
    assert waited < 5 + 15 and proc.returncode != 0
