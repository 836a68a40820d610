"""checkpoint.py: a run's state on disk: atomic checkpoints that cannot run code, the resume record, the lock.

Owns: saving and loading DCP checkpoints (atomic, checksummed, read without unpickling arbitrary
objects), the record of the run-defining flags checked on --resume, cutting metrics.jsonl back to the
checkpoint, the one-run-per-out_dir lock, the names of out_dir's entries, and a training run's state
(save_checkpoint, load_checkpoint: the policy's and optimizer's DCP state dicts). Does not own: when to
save (train.py), models (models.py) or the exported model folders (models.export, models.MODEL_RECORD).

    save(out_dir, state, extra, record, rank, world)   out_dir/checkpoint, written atomically
    find(out_dir) -> folder | None                      the checkpoint to resume from
    verify(folder, rank, world)                         every file against SHA256SUMS
    load(folder, state, rank) -> extra                  restores `state` in place (DCP), the rank's extra dict
    read_record(folder), check_record(saved, now)       the flags that define the run, checked on --resume
    trim_metrics(path, keep, log)                       metrics.jsonl cut back to the checkpoint's step
    Lock(out_dir, rank)                                 one run per out_dir (out_dir/run.lock holds the PID)

A checkpoint folder holds torch.distributed.checkpoint's files (.metadata and __R_I.distcp), one
extra_rankR.pt per rank (step, stage, RNG; loaded with weights_only=True), run.json (the record) and
SHA256SUMS (``sha256sum -c`` format) of all of them. Nothing in it is unpickled freely: .metadata is
read by an unpickler that builds only the classes DCP's metadata is made of, and the byte items of
the .distcp files (the optimizer's param_groups) load with weights_only=True. A file whose checksum
differs, a missing or unlisted file, or a .metadata that needs any other class is a one-line
CheckpointError naming the file.
"""

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import socket
import sys

import torch
import torch.distributed as dist

import common
from common import SrpoError

CHECKPOINT, CHECKSUMS, RECORD, LOCK = "checkpoint", "SHA256SUMS", "run.json", "run.lock"
FINAL, SFT_DIR, METRICS = "final", "sft", "metrics.jsonl"  # out_dir's other entries: models and the metrics log
METADATA = ".metadata"
# The flags that define a run: a resumed run must have the same, or it would mix two runs' data order or math.
RUN_FLAGS = ("loss", "beta", "lam", "refine", "refine_prompt", "model", "ref_model", "data", "max_pairs",
             "sft_steps", "lr", "warmup_steps", "lr_scheduler", "batch_size", "max_length", "max_grad_norm",
             "optimizer", "average_logps", "seed", "truncate_x_only", "sft_quality_q", "mixed_precision",
             "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


class CheckpointError(SrpoError):
    """A checkpoint, record or lock that cannot be used, in one line naming the file."""


# ----------------------------------------------------------------------------- checksums


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder):
    """The checkpoint's files, sorted; SHA256SUMS itself excluded."""
    return sorted(name for name in os.listdir(folder) if name != CHECKSUMS)


def _shared(values, world):
    """Every rank's list, concatenated in rank order (the list itself when world is 1)."""
    if world == 1:
        return values
    gathered = [None] * world
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def write_checksums(folder, rank=0, world=1):
    """SHA256SUMS of every file in folder; the ranks hash a share of the files each, rank 0 writes."""
    names = _files(folder)
    sums = _shared([(name, _sha256(os.path.join(folder, name))) for name in names[rank::world]], world)
    if rank == 0:
        with open(os.path.join(folder, CHECKSUMS), "w") as fh:
            fh.writelines(f"{digest}  {name}\n" for name, digest in sorted(sums))


def read_checksums(folder):
    """{file name: sha256 hex} of the folder's SHA256SUMS."""
    path = os.path.join(folder, CHECKSUMS)
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint's checksums ({e.strerror}); a checkpoint of an "
                              f"older version cannot be resumed: start again without --resume") from None
    sums = {}
    for number, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name:
            raise CheckpointError(f"{path}:{number}: not a '<sha256>  <file>' line")
        sums[name] = digest
    return sums


def verify(folder, rank=0, world=1):
    """Every file of the checkpoint against SHA256SUMS (the ranks share the work), and its .metadata readable
    without running code; CheckpointError if not."""
    sums = read_checksums(folder)
    names = _files(folder)
    problems = [f"{os.path.join(folder, n)}: not listed in {CHECKSUMS}" for n in names if n not in sums]
    problems += [f"{os.path.join(folder, n)}: missing (listed in {CHECKSUMS})" for n in sums if n not in names]
    if not problems:
        problems = _shared([f"{os.path.join(folder, n)}: checksum mismatch (corrupt or changed since it was saved)"
                            for n in sorted(sums)[rank::world] if _sha256(os.path.join(folder, n)) != sums[n]],
                           world)
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    read_metadata(folder)  # only DCP's own classes: a tampered file that kept its checksum stops here


# ----------------------------------------------------------------------------- reading without running code


def _allowed():
    """(module, name) -> object: the only globals a DCP .metadata pickle may name."""
    from torch.distributed.checkpoint import filesystem, metadata

    classes = {("torch.distributed.checkpoint.metadata", n): getattr(metadata, n)
               for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                         "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
               if hasattr(metadata, n)}
    classes[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    classes[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout by its name
    classes[("torch", "Size")] = torch.Size
    classes[("pathlib", "PosixPath")] = pathlib.PurePosixPath  # the checkpoint_id it was saved under
    classes[("pathlib", "WindowsPath")] = pathlib.PureWindowsPath
    return classes


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is an error, so no pickled call can run."""

    def __init__(self, fh, where):
        super().__init__(fh)
        self.where, self.allowed = where, _allowed()

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[module, name]
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.where}: refers to {module}.{name}, which checkpoint metadata never "
                              f"holds; not loaded (a tampered or foreign file)")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.where}: has a persistent id; not loaded (a tampered or foreign file)")


def read_metadata(folder):
    """The DCP Metadata of a checkpoint folder, unpickled with only its own classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(folder, METADATA)
    try:
        with open(path, "rb") as fh:
            meta = _MetadataUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure of a damaged file: one line, not a traceback
        raise CheckpointError(f"{path}: not checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: holds a {type(meta).__name__}, not checkpoint metadata")
    return meta


def _reader_and_planner(folder):
    """A FileSystemReader whose metadata is read by read_metadata, and a load planner whose byte items
    (non-tensor state such as the optimizer's param_groups) load with weights_only=True."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta = read_metadata(folder)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # the default unpickles with weights_only=False
            safe = io.BytesIO()
            torch.save(torch.load(value, weights_only=True), safe)
            safe.seek(0)
            super().load_bytes(read_item, safe)

    return Reader(folder), Planner()


# ----------------------------------------------------------------------------- save and load


def save(out_dir, state, extra, record, rank=0, world=1):
    """Write out_dir/checkpoint atomically: a temporary folder, checksummed, renamed once every rank has written.

    state: DCP state dict (e.g. {"model": ..., "optim": ...}); extra: this rank's small dict (the RNG
    state is added); record: the run's flags (run.json).
    """
    import torch.distributed.checkpoint as dcp

    final, tmp = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, CHECKPOINT + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    torch.save(dict(extra, rng=torch.get_rng_state()), os.path.join(tmp, f"extra_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, RECORD), "w") as fh:
            json.dump(record, fh, indent=1, sort_keys=True)
    dist.barrier()
    write_checksums(tmp, rank, world)
    dist.barrier()
    if rank == 0:
        common.replace_path(tmp, final)
    dist.barrier()


def find(out_dir):
    """The checkpoint to resume from (a crash between the two renames leaves it as checkpoint.old), or None."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(path, CHECKSUMS)) or os.path.exists(os.path.join(path, METADATA)):
            return path
    return None


def read_extra(folder, rank=0):
    """This rank's extra dict (step, stage, rng), loaded with weights_only=True."""
    path = os.path.join(folder, f"extra_rank{rank}.pt")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load(folder, state, rank=0):
    """Restore the DCP `state` dict in place from a verified folder; set the RNG; return this rank's extra."""
    import torch.distributed.checkpoint as dcp

    reader, planner = _reader_and_planner(folder)
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps failures of every rank in one exception
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{folder}: cannot load ({type(e).__name__}: {first[-1][:300] if first else ''})") \
            from None
    extra = read_extra(folder, rank)
    torch.set_rng_state(extra.pop("rng"))
    return extra


# ----------------------------------------------------------------------------- the record of the run


def run_record(cfg, **derived):
    """The run-defining values of a config (RUN_FLAGS), and derived ones (e.g. the number of training pairs)."""
    return {**{name: getattr(cfg, name) for name in RUN_FLAGS}, **derived}


def read_record(folder):
    path = os.path.join(folder, RECORD)
    try:
        with open(path) as fh:
            return json.load(fh)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the run's record ({e.strerror}); "
                              f"--resume_force resumes without checking the flags") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def check_record(saved, now, where):
    """CheckpointError naming the first run-defining value that differs between the checkpoint and this run."""
    for name, value in now.items():
        if name in saved and saved[name] != value:
            flag = f"--{name}" if name in RUN_FLAGS else name
            raise CheckpointError(f"--resume: {flag} is {value!r}, but the checkpoint's run had {saved[name]!r} "
                                  f"({where}); use the same value, or --resume_force to resume anyway")


# ----------------------------------------------------------------------------- metrics.jsonl


def trim_metrics(path, keep, log=print):
    """Cut metrics.jsonl back to the lines keep(record) accepts (those up to the checkpoint's step).

    A last line without its newline (a write cut by kill -9) is dropped with a note; any other bad
    line is a CheckpointError naming the file and line.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    if lines and not lines[-1].endswith("\n"):
        if log:
            log(f"{path}: dropped an unfinished last line (an interrupted write)")
        lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            ok = keep(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}:{number}: not a metrics record ({e}); fix or remove the line") from None
        if ok:
            kept.append(line)
    with common.atomic_open(path) as fh:
        fh.writelines(kept)


# ----------------------------------------------------------------------------- one run per out_dir


def on_rank0(fn, rank=0, world=1):
    """fn() on rank 0 only; a CheckpointError it raises is raised on every rank (so none waits forever)."""
    error = None
    if rank == 0:
        try:
            fn()
        except CheckpointError as e:
            error = str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Lock:
    """out_dir/run.lock, taken by rank 0 for the whole run: "PID HOST" inside; a lock whose PID is not
    running on this host is stale and taken over (with a note). release() removes it."""

    def __init__(self, out_dir, rank=0, world=1, log=print):
        self.path, self.held = os.path.join(out_dir, LOCK), False
        on_rank0(lambda: self._take(log), rank, world)

    def _take(self, log):
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._holder()
                if pid is not None and (host != socket.gethostname() or _alive(pid)):
                    raise CheckpointError(f"{self.path}: another run (PID {pid}{' on ' + host if host else ''}) is "
                                          f"using this --out_dir; wait for it, or use another --out_dir") from None
                log(f"{self.path}: removed a stale lock (PID {pid} is not running)")
                os.remove(self.path)
                continue
            except OSError as e:
                raise CheckpointError(f"{os.path.dirname(self.path)}: --out_dir is not writable "
                                      f"({e.strerror})") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return

    def _holder(self):
        """(pid, host) written in the lock; (None, "") if unreadable (then taken over as stale)."""
        try:
            with open(self.path) as fh:
                parts = fh.read().split()
            return int(parts[0]), (parts[1] if len(parts) > 1 else socket.gethostname())
        except (OSError, ValueError, IndexError):
            return None, ""

    def release(self):
        if self.held:
            self.held = False
            try:
                if self._holder()[0] == os.getpid():
                    os.remove(self.path)
            except OSError:
                print(f"{self.path}: could not remove the lock", file=sys.stderr)


# ----------------------------------------------------------------------------- a training run's state



def _state(policy, optimizer):
    """The DCP state dict of policy and optimizer (sharded as they are)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}


def save_checkpoint(out_dir, policy, optimizer, stage, stage_index, step, record, rank, world):
    """out_dir/checkpoint, written atomically with its checksums and the run's record (save).
    Returns what it holds, "STAGE step N", for messages."""
    save(out_dir, _state(policy, optimizer), {"stage_index": stage_index, "step": step}, record, rank,
                    world)
    return f"{stage} step {step}"


def load_checkpoint(path, policy, optimizer, rank):
    """Restore model, optimizer and RNG in place from a verified checkpoint; return the saved extra dict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(policy, optimizer)
    extra = load(path, state, rank)
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    return extra
