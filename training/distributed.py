"""training/distributed.py: the process group and what every rank must agree on.

Owns: starting the process group (one process, or torchrun's), summing values over ranks (all_sum), printing
on rank 0 (log), Failures: one rank's failure stops every rank, its one-line error printed once, and Preemption:
the preemption signals (SIGTERM, SIGUSR1) received, which the loop reads at each step's end; REQUEUE_EXIT, the
status after SIGUSR1 that asks a launcher (scripts/slurm.sbatch) to requeue the job; environment_report,
train.py --env: the versions, devices and backends a run would use, for bug reports.
Does not own: sharding models (models.py), the training loop (train.py) or checkpoints (checkpoint.py).
See docs/distributed.md.
"""

import datetime
import os
import platform
import signal
import sys
import threading

import torch
import torch.distributed as dist

from base import common


def setup_distributed(device="auto", timeout=None):
    """A process group under torchrun (RANK set), else one of size 1. Returns (rank, world, device).

    timeout: seconds a collective waits for every rank before it raises (None: the backend's, 30 minutes for
    gloo); train.py's --collective_timeout."""
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "cpu"
    cuda = device == "cuda"
    backend = "nccl" if cuda else "gloo"
    wait = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
    if "RANK" in os.environ:
        dist.init_process_group(backend, **wait)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **wait)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def environment_report():
    """train.py --env: one block to paste into a bug report. The versions of Python and the packages a run uses
    (or "not installed"), srpo's git commit, the devices --device auto picks from, CUDA and NCCL, the backend and
    the dtype path --mixed_precision auto takes there."""
    commit = common.git("rev-parse", "--short=12", "HEAD", timeout=10)
    dirty = bool(common.git("status", "--porcelain", "--untracked-files=no", timeout=10))
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda and dist.is_nccl_available() else "not available"
    lines = [
        f"python: {platform.python_version()} ({platform.python_implementation()}, {platform.platform()})",
        f"srpo: {commit + (' (dirty: uncommitted changes)' if dirty else '') if commit else 'not a git checkout'}",
        *(f"{package}: {common.package_version(package)}" for package in
          ("torch", "transformers", "numpy", "peft", "trl", "pyyaml", "tensorboard", "wandb")),
        f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"cuda: {'; '.join(f'{len(gpus)} x {name}' for name in sorted(set(gpus))) if gpus else 'no GPU'} "
        f"(torch built with CUDA {torch.version.cuda or 'none'}), NCCL {nccl}",
        f"--device auto: {'cuda, backend nccl' if cuda else 'cpu, backend gloo'}; --mixed_precision auto: " + (
            f"bf16 compute, fp32 gradient reduction and master weights (bf16 "
            f"{'supported' if torch.cuda.is_bf16_supported() else 'NOT supported by this GPU'})" if cuda
            else "fp32"),
    ]
    return "\n".join(["srpo environment (train.py --env)", *("- " + line for line in lines)])


def all_sum(values, device):
    """Sum a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def log(rank, *args):
    """print on rank 0 only, flushed."""
    if rank == 0:
        print(*args, flush=True)


class Failures:
    """One rank's failure stops every rank within a second, its one-line error printed once, by rank 0.

    The failing rank posts its message to the process group's key-value store. A thread on every rank
    polls the store, so a rank blocked in a collective that the failed rank never joins sees it too:
    rank 0 prints the line, and every rank exits with the failure's status, without waiting on collectives.
    """

    KEY = f"srpo_failure_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def __init__(self, rank, world):
        self.rank = rank
        self.store = dist.distributed_c10d._get_default_store() if world > 1 else None
        self.done = threading.Event()
        self.watcher = None
        if self.store is not None:
            self.watcher = threading.Thread(target=self._watch, daemon=True)
            self.watcher.start()

    def fail(self, message, status):
        """Report this rank's failure; returns `status` where the process is not ended for it (one process)."""
        if self.store is None:
            print(f"train.py: error: {message}", file=sys.stderr, flush=True)
            return status
        self.store.compare_set(self.KEY, "", f"{status} rank {self.rank}: {message}")  # the first one counts
        self.done.wait(30)  # the watching thread ends the process
        return status

    def stop(self):
        """End the watching thread, and wait for it: the process group (and its store) is destroyed next, and a
        thread still inside a store call then aborts the process ("terminate called without an active exception")."""
        self.done.set()
        if self.watcher is not None:
            self.watcher.join(timeout=10)

    def _watch(self):
        while not self.done.wait(0.2):
            try:
                failed = self.store.check([self.KEY])
            except Exception:  # noqa: BLE001 (the store has closed: the run is over)
                return
            if failed:
                self._exit()

    def _exit(self):
        status = 1
        try:
            status, message = self.store.get(self.KEY).decode().split(" ", 1)
            if self.rank == 0:
                print(f"train.py: error: {message}", file=sys.stderr, flush=True)
                self.store.set(self.KEY + "_printed", "1")
            else:  # give rank 0 the moment it needs to print, unless it is gone
                self.store.wait([self.KEY + "_printed"], datetime.timedelta(seconds=5))
        finally:
            os._exit(int(status))


REQUEUE_EXIT = 3  # exit status after SIGUSR1: checkpoint written, requeue me (0: done, 1: a bug, 2: one-line error)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGTERM: stop and exit 0, as before; SIGUSR1: stop and exit REQUEUE_EXIT


class Preemption:
    """SIGTERM or SIGUSR1 (how preemption arrives) recorded; the loop checkpoints and exits at the step's end.
    `received`: the signals seen, as their numbers."""

    def __init__(self):
        self.received = set()
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received.add(signum)
