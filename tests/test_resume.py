"""--resume auto, --overwrite, the refusal to start over a run silently, and SIGUSR1 (checkpoint, exit
distributed.REQUEUE_EXIT). One process on CPU, the tiny model."""

import hashlib
import os
import shutil
import signal

import pytest
import torch
from helpers import read_metrics, run_train, signalled_run

from training import checkpoint, config, distributed

STEPS = ("--loss", "dpo", "--max_steps", "2")


def snapshot(folder):
    """Every file under folder with its bytes' digest and modification time."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def test_resume_flag_takes_an_optional_value():
    assert config.parse_config([]).resume == ""
    assert config.parse_config(["--resume"]).resume == "yes"
    assert config.parse_config(["--resume", "--seed", "1"]).resume == "yes"
    assert config.parse_config(["--resume", "auto"]).resume == "auto"
    with pytest.raises(SystemExit) as e:
        config.parse_config(["--resume", "later"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        config.parse_config(["--resume", "--overwrite"])
    assert e.value.code == 2


def test_resume_auto_starts_fresh_then_says_a_finished_run_is_done(tmp_path, capsys):
    code, ms = run_train(tmp_path, *STEPS, "--resume", "auto")
    assert code == 0 and [m["step"] for m in ms] == [1, 2]
    assert f"--resume auto: no checkpoint in {tmp_path}; starting from the beginning" in capsys.readouterr().out
    before = snapshot(tmp_path)
    code, ms = run_train(tmp_path, *STEPS, "--resume", "auto")
    assert code == 0 and "has finished" in capsys.readouterr().out
    assert snapshot(tmp_path) == before  # nothing trained, nothing written
    # A longer run of the same flags is not finished: --resume auto continues it.
    code, ms = run_train(tmp_path, "--loss", "dpo", "--max_steps", "3", "--resume", "auto")
    assert code == 0 and [m["step"] for m in ms] == [1, 2, 3]
    # ... and refuses a changed run-defining flag, as --resume does.
    assert run_train(tmp_path, "--loss", "dpo", "--max_steps", "3", "--resume", "auto", "--beta", "0.2")[0] == 2
    assert "--resume: --beta is 0.2" in capsys.readouterr().err


def test_rerun_without_resume_is_refused_and_changes_nothing(tmp_path, capsys):
    assert run_train(tmp_path, *STEPS)[0] == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert run_train(tmp_path, *STEPS)[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out_dir {tmp_path} holds a run (checkpoint/)" in err[0], err
    assert "--resume auto" in err[0] and "--overwrite" in err[0]
    assert snapshot(tmp_path) == before
    # final/ and metrics.jsonl alone (the checkpoint deleted) are a run too.
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINT)
    assert run_train(tmp_path, *STEPS)[0] == 2
    assert "holds a run (final/)" in capsys.readouterr().err


def test_overwrite_starts_over(tmp_path, capsys):
    assert run_train(tmp_path, "--loss", "dpo", "--max_steps", "3")[0] == 0
    (tmp_path / "notes.txt").write_text("mine")
    code, ms = run_train(tmp_path, *STEPS, "--overwrite")
    assert code == 0 and [m["step"] for m in ms] == [1, 2]
    assert "--overwrite: removed checkpoint, final, metrics.jsonl" in capsys.readouterr().out
    extra = torch.load(tmp_path / checkpoint.CHECKPOINT / "extra_rank0.pt", weights_only=True)
    assert extra["step"] == 2 and (tmp_path / "notes.txt").read_text() == "mine"


def test_sigusr1_checkpoints_and_exits_with_the_requeue_code(tmp_path):
    returncode, out = signalled_run(tmp_path, signal.SIGUSR1, "--resume", "auto")
    assert returncode == distributed.REQUEUE_EXIT == 3, out[-2000:]
    assert "SIGUSR1: checkpoint written at dpo step" in out and "exiting with status 3" in out
    extra = torch.load(tmp_path / checkpoint.CHECKPOINT / "extra_rank0.pt", weights_only=True)
    assert extra["step"] == len(read_metrics(tmp_path)) >= 2
    code, ms = run_train(tmp_path, "--loss", "dpo", "--max_steps", str(extra["step"] + 1), "--epochs", "100",
                         "--resume", "auto")
    assert code == 0 and ms[-1]["step"] == extra["step"] + 1
