"""scripts/slurm.sbatch without Slurm: its environment variables faked, and fake `srun` (the command once per
"node", here on this machine, SIGUSR1 passed on as srun does) and `scontrol` (node names; requeue recorded) on
PATH. Two nodes of one CPU process each meet at a c10d rendezvous on 127.0.0.1."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import FAST, ROOT, env, read_metrics
from test_distributed import free_port

from training import distributed

SRUN = r"""#!/bin/bash
# fake srun: the command once per node, in the background, with SLURM_NODEID and SLURM_PROCID; SIGUSR1 passed
# on to every task; the status is the highest of the tasks', as srun's.
nodes=1
while [ $# -gt 0 ]; do
    case "$1" in --nodes) nodes=$2; shift 2;; --ntasks-per-node) shift 2;; --*) shift;; *) break;; esac
done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null; do wait "$p"; done
    wait "$p"; r=$?; [ "$r" -gt "$rc" ] && rc=$r
done
exit $rc
"""

SCONTROL = r"""#!/bin/bash
# fake scontrol: each call recorded; `show hostnames LIST` prints LIST's comma-separated names, one a line.
echo "$*" >> "$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then echo "$3" | tr ',' '\n'; fi
"""

# A train.py that takes 0.3 s longer a step, so that the signal comes mid-run on any machine.
SLOW_TRAIN = f"""import sys, time
sys.path.insert(0, {ROOT!r})
import train
step = train.train_step
train.train_step = lambda *a, **k: (time.sleep(0.3), step(*a, **k))[1]
sys.exit(train.main())
"""

FLAGS = [*FAST, "--loss", "dpo", "--max_steps", "8", "--epochs", "100", "--optimizer", "sgd"]


def launcher(tmp_path, port):
    """The repository's slurm.sbatch in a copy of the layout it expects (scripts/ beside a slowed train.py), fake
    srun and scontrol on PATH, and Slurm's variables for a job of two nodes."""
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    bin_.mkdir(exist_ok=True)
    shutil.copy(os.path.join(ROOT, "scripts", "slurm.sbatch"), repo / "scripts" / "slurm.sbatch")
    (repo / "train.py").write_text(SLOW_TRAIN)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    e = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "SRPO_"))}
    e.update(PATH=f"{bin_}:{e['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
             SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_SUBMIT_DIR=str(repo),
             SRPO_PYTHON=sys.executable, SRPO_PORT=str(port),
             FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"))
    return ["bash", str(repo / "scripts" / "slurm.sbatch")], e


def launch(tmp_path, out_dir, signal_after=None):
    cmd, e = launcher(tmp_path, free_port())
    proc = subprocess.Popen([*cmd, "--out_dir", str(out_dir), *FLAGS], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    if signal_after:
        deadline = time.time() + 180
        while len(read_metrics(out_dir)) < signal_after and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # as `#SBATCH --signal=B:USR1@120` does: to the batch shell
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def final_bytes(out_dir):
    with open(os.path.join(out_dir, "final", "model.safetensors"), "rb") as fh:
        return fh.read()


@pytest.mark.slow  # three launches of two nodes
def test_preempted_job_requeues_and_ends_on_the_uninterrupted_weights(tmp_path):
    log = tmp_path / "scontrol.log"
    code, out = launch(tmp_path, tmp_path / "cut", signal_after=1)
    assert code == distributed.REQUEUE_EXIT, out[-3000:]
    assert "SIGUSR1: checkpoint written at dpo step" in out
    assert "requeue 4242" in log.read_text().splitlines()
    stopped = len(read_metrics(tmp_path / "cut"))
    assert 1 <= stopped < 8 and not (tmp_path / "cut" / "final").exists()

    code, out = launch(tmp_path, tmp_path / "cut")  # the requeued job: the same command
    assert code == 0, out[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == list(range(1, 9))
    assert log.read_text().count("requeue") == 1

    code, out = launch(tmp_path, tmp_path / "whole")
    assert code == 0, out[-3000:]
    assert final_bytes(tmp_path / "cut") == final_bytes(tmp_path / "whole")
