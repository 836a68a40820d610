"""Checkpoints: export.py on any checkpoint, the run lock, --resume_force, and a full disk."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import FAST, ROOT, env, read_metrics, run_train

import export
from base import common
from training import checkpoint, distributed, models


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """A one-process run whose last checkpoint is its final step: out_dir/checkpoint and final/ hold one model."""
    out = tmp_path_factory.mktemp("one")
    assert run_train(out, "--loss", "dpo", "--max_steps", "2")[0] == 0
    return out


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def copy_run(source, dest):
    shutil.copytree(source, dest)
    return dest


# ----------------------------------------------------------------------------- export.py


def test_export_of_a_one_process_checkpoint_is_the_final_model(one_run, tmp_path):
    assert export.main([str(one_run / checkpoint.CHECKPOINT), str(tmp_path / "exp")]) == 0
    torch.testing.assert_close(logits(tmp_path / "exp", IDS), logits(one_run / checkpoint.FINAL, IDS), rtol=0, atol=0)
    record = json.loads((tmp_path / "exp" / models.MODEL_RECORD).read_text())
    assert record["checkpoint"]["step"] == 2 and record["run"]["loss"] == "dpo" and record["ref_model"] == "tiny"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "exp")("Copy: AB").input_ids == \
        AutoTokenizer.from_pretrained(one_run / checkpoint.FINAL)("Copy: AB").input_ids


def test_export_of_a_two_rank_checkpoint_on_one_process(tmp_path):
    """Written by two ranks (torchrun, gloo), exported by one process with no process group: the policy of the
    last step, as the run's own final/ holds it; --dtype bfloat16 casts it."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--out_dir", str(out), *FAST, "--loss", "dpo", "--max_steps", "2"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / checkpoint.CHECKPOINT / "__1_0.distcp").exists()  # both ranks wrote shards
    done = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), str(out / checkpoint.CHECKPOINT),
                           str(tmp_path / "exp")], env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(logits(tmp_path / "exp", IDS), logits(out / checkpoint.FINAL, IDS), rtol=0, atol=0)
    assert export.main([str(out / checkpoint.CHECKPOINT), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_export_refuses_a_truncated_shard_in_one_line(one_run, tmp_path, capsys):
    folder = copy_run(one_run / checkpoint.CHECKPOINT, tmp_path / "ckpt")
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert export.main([str(folder), str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(shard) in err and "checksum mismatch" in err, err
    assert not (tmp_path / "exp").exists()


def test_merge_lora_adds_the_scaled_product():
    torch.manual_seed(0)
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    state = {"base_model.model.layer.q.base_layer.weight": w, "base_model.model.layer.q.lora_A.default.weight": a,
             "base_model.model.layer.q.lora_B.default.weight": b, "base_model.model.layer.q.bias": torch.ones(6)}
    merged = export.merge_lora(state, alpha=8, r=2)
    assert set(merged) == {"layer.q.weight", "layer.q.bias"}
    torch.testing.assert_close(merged["layer.q.weight"], w + 4 * b @ a)
    conv = export.merge_lora({k: (v.T if k.endswith("base_layer.weight") else v) for k, v in state.items()},
                             alpha=8, r=2, transpose=True)
    torch.testing.assert_close(conv["layer.q.weight"], (w + 4 * b @ a).T)


def test_export_merges_lora_adapters_as_peft_does(tmp_path):
    """A checkpoint of a peft model (as a --lora_r run writes it): exported with W + alpha/r · B·A merged, it
    gives the logits of peft's own merge_and_unload."""
    peft = pytest.importorskip("peft")
    tokenizer = models.load_tokenizer()
    model = peft.get_peft_model(models.load_model(models.TINY, tokenizer), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"], init_lora_weights=False))
    record = {"model": models.TINY, "loss": "dpo", "sft_steps": 0, "seed": 0, "lora_r": 2, "lora_alpha": 8}
    distributed.setup_distributed("cpu")
    try:
        checkpoint.save_state(str(tmp_path), {"model": model.state_dict()}, {"stage_index": 0, "step": 3}, record)
    finally:
        torch.distributed.destroy_process_group()
    assert export.main([str(tmp_path / checkpoint.CHECKPOINT), str(tmp_path / "exp")]) == 0
    with torch.no_grad():
        expected = model.merge_and_unload()(IDS).logits
    torch.testing.assert_close(logits(tmp_path / "exp", IDS), expected)


# ----------------------------------------------------------------------------- the lock


def test_a_lock_whose_pid_is_now_another_process_is_stale(tmp_path):
    """A PID reused (after a container restart PIDs start again at 1): the recorded start time differs."""
    (tmp_path / checkpoint.LOCK).write_text(f"{os.getpid()} {socket.gethostname()} 1 {checkpoint._boot_id() or '-'}\n")
    notes = []
    lock = checkpoint.Lock(str(tmp_path), log=notes.append)
    assert lock.held and "is now another process" in notes[0]
    pid, host, start, _ = (tmp_path / checkpoint.LOCK).read_text().split()
    assert (int(pid), host, start) == (os.getpid(), socket.gethostname(), checkpoint._start_time(os.getpid()))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LOCK]  # its temporary file is gone
    lock.release()
    assert not (tmp_path / checkpoint.LOCK).exists()


def test_a_lock_from_before_the_last_reboot_is_stale(tmp_path):
    if not checkpoint._boot_id():
        pytest.skip("no /proc/sys/kernel/random/boot_id")
    (tmp_path / checkpoint.LOCK).write_text(f"{os.getpid()} {socket.gethostname()} - another-boot\n")
    notes = []
    assert checkpoint.Lock(str(tmp_path), log=notes.append).held and "before the last reboot" in notes[0]


def test_a_live_lock_says_what_to_do(tmp_path):
    held = checkpoint.Lock(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.Lock(str(tmp_path))
    message = str(e.value)
    assert f"PID {os.getpid()}" in message and "wait for it to end" in message
    assert f"remove {tmp_path / checkpoint.LOCK}" in message and "\n" not in message
    held.release()


def test_an_empty_lock_is_held_while_young_and_stale_when_old(tmp_path):
    path = tmp_path / checkpoint.LOCK
    path.write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="being written"):
        checkpoint.Lock(str(tmp_path))
    old = time.time() - 2 * checkpoint.LOCK_GRACE_S
    os.utime(path, (old, old))
    notes = []
    assert checkpoint.Lock(str(tmp_path), log=notes.append).held and "empty or unreadable" in notes[0]


def test_a_lock_without_hard_links_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    lock = checkpoint.Lock(str(tmp_path))
    assert lock.held and (tmp_path / checkpoint.LOCK).read_text().split()[0] == str(os.getpid())
    with pytest.raises(checkpoint.CheckpointError, match="wait for it to end"):
        checkpoint.Lock(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LOCK]


# ----------------------------------------------------------------------------- --resume_force


def test_resume_force_continues_after_a_changed_loss(one_run, tmp_path):
    out = copy_run(one_run, tmp_path / "out")
    code, ms = run_train(out, "--loss", "ipo", "--max_steps", "3", "--resume", "--resume_force")
    assert code == 0
    assert [(m["stage"], m["step"]) for m in ms] == [("dpo", 1), ("dpo", 2), ("ipo", 3)]


def test_resume_force_refuses_a_stage_the_plan_lacks(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(out, "--loss", "dpo", "--sft_steps", "1", "--max_steps", "1")[0] == 0
    capsys.readouterr()
    assert run_train(out, "--loss", "dpo", "--sft_steps", "0", "--max_steps", "1", "--resume", "--resume_force")[0] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a stage this run's plan (dpo) lacks" in err and "sft, dpo" in err, err
    assert [(m["stage"], m["step"]) for m in read_metrics(out)] == [("sft", 1), ("dpo", 1)]  # kept


def test_resume_force_refuses_another_model_in_one_line(one_run, tmp_path, capsys):
    from test_distributed import save_source

    out = copy_run(one_run, tmp_path / "out")
    source = save_source(tmp_path / "llama", dtype=torch.float32)
    capsys.readouterr()
    assert run_train(out, "--loss", "dpo", "--max_steps", "2", "--model", source, "--resume", "--resume_force")[0] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err and str(out / checkpoint.CHECKPOINT) in err, err


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    state = {"model": {"w": torch.arange(1000.0)}}
    distributed.setup_distributed("cpu")
    try:
        checkpoint.save_state(str(tmp_path), state, {"step": 1}, {"loss": "dpo"})
        before = {p.name: p.read_bytes() for p in (tmp_path / checkpoint.CHECKPOINT).iterdir()}

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(filesystem, "_write_item", full)
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.save_state(str(tmp_path), {"model": {"w": torch.zeros(1000)}}, {"step": 2}, {"loss": "dpo"})
    finally:
        torch.distributed.destroy_process_group()
    message = str(e.value)
    where = tmp_path / checkpoint.CHECKPOINT
    assert message.startswith(f"No space left on device writing {where}; the previous checkpoint is kept whole")
    assert "free about 0.1 GB" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in (tmp_path / checkpoint.CHECKPOINT).iterdir()} == before
    checkpoint.verify(str(tmp_path / checkpoint.CHECKPOINT))
    assert not (tmp_path / (checkpoint.CHECKPOINT + ".tmp")).exists()


def test_a_full_disk_while_exporting_is_one_line(tmp_path, monkeypatch):
    tokenizer = models.load_tokenizer()
    model = models.load_model(models.TINY, tokenizer)
    config = models.source_config(models.TINY, tokenizer)
    path = tmp_path / "final"
    export.write_folder(model, dict(model.state_dict()), tokenizer, str(path), config, torch.float32, {})
    before = sorted(p.name for p in path.iterdir())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with pytest.raises(common.SrpoError) as e:
        export.write_folder(model, dict(model.state_dict()), tokenizer, str(path), config, torch.float32, {})
    assert str(e.value).startswith(f"No space left on device writing {path}; the previous model folder is kept whole")
    assert sorted(p.name for p in path.iterdir()) == before and not (tmp_path / "final.tmp").exists()
