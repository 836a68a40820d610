"""training/checkpoint.py: a run's state on disk: atomic checkpoints that cannot run code, the resume record, the lock.

Owns: saving and loading DCP checkpoints (atomic, checksummed, read without unpickling arbitrary
objects), the record of the run-defining flags checked on --resume, cutting metrics.jsonl back to the
checkpoint, the one-run-per-out_dir lock, the names of out_dir's entries, and a training run's state
(save_checkpoint, load_checkpoint: the policy's and optimizer's DCP state dicts). Does not own: when to
save (train.py), models (models.py) or the exported model folders (export.py, models.MODEL_RECORD).

    save_state(out_dir, state, extra, record, rank, world)   out_dir/checkpoint, written atomically
    find(out_dir) -> folder | None                      the checkpoint to resume from
    verify(folder, rank, world)                         every file against SHA256SUMS
    load_state(folder, state, rank) -> extra            restores `state` in place (DCP), the rank's extra dict
    save_checkpoint(out_dir, policy, optimizer, ...)    save_state of a training run: policy, optimizer, stage, step
    load_checkpoint(path, policy, optimizer, rank)      load_state of it -> extra (its stage and step)
    read_record(folder), check_record(saved, now)       the flags that define the run, checked on --resume
    trim_metrics(path, keep, log)                       metrics.jsonl cut back to the checkpoint's step
    Lock(out_dir, rank)                                 one run per out_dir (run.lock: PID, host, start time, boot id)
    check_shapes(folder, model), check_stage(...)      what --resume_force cannot continue, in one line

A checkpoint folder holds torch.distributed.checkpoint's files (.metadata and __R_I.distcp), one
extra_rankR.pt per rank (step, stage, RNG; loaded with weights_only=True), run.json (the record) and
SHA256SUMS (``sha256sum -c`` format) of all of them. Nothing in it is unpickled freely: .metadata is
read by an unpickler that builds only the classes DCP's metadata is made of, and the byte items of
the .distcp files (the optimizer's param_groups) load with weights_only=True. A file whose checksum
differs, a missing or unlisted file, or a .metadata that needs any other class is a one-line
CheckpointError naming the file. A full disk while saving is one line too (common.disk_full); the
previous checkpoint stays whole. export.py writes any checkpoint as a model folder.
"""

import errno
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import socket
import sys
import time

import torch
import torch.distributed as dist

from base import common
from base.common import SrpoError

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


def save_state(out_dir, state, extra, record, rank=0, world=1):
    """Write out_dir/checkpoint atomically: a temporary folder, checksummed, renamed once every rank has written.

    state: DCP state dict (e.g. {"model": ..., "optim": ...}); extra: this rank's small dict (the RNG
    state is added); record: the run's flags (run.json).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    final, tmp = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, CHECKPOINT + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        dcp.save(state, checkpoint_id=tmp)
        torch.save(dict(extra, rng=torch.get_rng_state()), os.path.join(tmp, f"extra_rank{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, RECORD), "w") as fh:
                json.dump(record, fh, indent=1, sort_keys=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        size = state_bytes(state) * world
        full = common.disk_full(e, out_dir, size)
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays; the partial one frees its space
        if full:
            raise CheckpointError(common.disk_full_message(final, size, "checkpoint")) from None
        if isinstance(e, CheckpointException):
            raise CheckpointError(f"{tmp}: cannot write the checkpoint ({_first_failure(e)})") from None
        raise
    dist.barrier()
    write_checksums(tmp, rank, world)
    dist.barrier()
    if rank == 0:
        common.replace_path(tmp, final)
    dist.barrier()


def state_bytes(state):
    """The bytes of a (nested) state dict's tensors on this rank (a DTensor's local shard)."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _first_failure(e):
    """The last line of the first rank's failure in DCP's CheckpointException (or of e itself)."""
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        e = failure[0] if isinstance(failure, tuple) else failure
        break
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


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


def check_shapes(folder, model, prefix="model."):
    """CheckpointError unless the checkpoint holds every tensor of the `model` state dict, in its shape (a
    checkpoint of another --model, or of a run with or without LoRA, stops here, before DCP)."""
    saved = read_metadata(folder).state_dict_metadata
    for key, value in model.items():
        have = saved.get(prefix + key)
        if not isinstance(value, torch.Tensor):
            continue
        if have is None or not hasattr(have, "size"):
            raise CheckpointError(f"{folder}: has no weight {key} (a checkpoint of another --model, or of a run "
                                  f"with other LoRA flags); resume with the checkpoint's --model and flags")
        if tuple(have.size) != tuple(value.shape):
            raise CheckpointError(f"{folder}: {key} has shape {tuple(have.size)} there but {tuple(value.shape)} in "
                                  f"this run's --model; resume with the checkpoint's --model")


def load_state(folder, state, rank=0):
    """Restore the DCP `state` dict in place from a verified folder; set the RNG; return this rank's extra."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    check_shapes(folder, state.get("model", {}))
    reader, planner = _reader_and_planner(folder)
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps every rank's failure in a BaseException
        raise CheckpointError(f"{folder}: cannot load ({_first_failure(e)})") from None
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


def stage_names(record):
    """The stages of the run a record describes, as train.plan names them: "sft" where it had an SFT stage,
    then its --loss."""
    loss = record.get("loss")
    return ["sft"] if loss == "sft" else (["sft"] if record.get("sft_steps") else []) + [loss]


def check_stage(folder, saved_names, names, index, step):
    """CheckpointError unless this run's stage at `index` is of the checkpoint's kind (SFT or an alignment loss):
    --resume_force continues a changed --loss, not a stage this run's plan lacks."""
    old = saved_names[index] if index < len(saved_names) else f"stage {index}"
    now = names[index] if index < len(names) else None
    if now is None or (old == "sft") != (now == "sft"):
        raise CheckpointError(f"--resume_force: {folder} is at {old} step {step}, a stage this run's plan "
                              f"({', '.join(names)}) lacks at that place; resume with that run's --sft_steps and "
                              f"--loss ({', '.join(saved_names)})")


# ----------------------------------------------------------------------------- metrics.jsonl


def trim_metrics(path, keep, log=print):
    """Cut metrics.jsonl back to the lines keep(record) accepts (those up to the checkpoint's step).

    A last line without its newline (a write cut by kill -9) is dropped with a note; any other bad
    line is a CheckpointError naming the file and line.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as fh:
        raw, cut = common.cut_unfinished_line(fh.read())
    if cut and log:
        log(f"{path}: dropped an unfinished last line (an interrupted write)")
    lines = io.StringIO(raw.decode("utf-8"), newline=None).readlines()
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


def _start_time(pid):
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _boot_id():
    """This kernel's boot id (a new one after every reboot), or "" where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _create(tmp, path, line):
    """path, made a hard link of the written file tmp (FileExistsError if it exists); where the filesystem has no
    hard links, created exclusively and written (empty for an instant)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as fh:
            fh.write(line)


LOCK_GRACE_S = 10  # an empty or unreadable lock this young is another run writing it: held


class Lock:
    """out_dir/run.lock, taken by rank 0 for the whole run: "PID HOST START BOOT_ID" inside (START: the
    process's start time, BOOT_ID: the kernel's, where /proc has them). A lock on this host whose PID is not
    running, or runs a process started at another time (a PID reused, e.g. after a container restart), or
    written before the last reboot, is stale and taken over (with a note). The lock appears whole (written
    to a temporary file, then linked), so an empty one is a run writing it: held for LOCK_GRACE_S.
    release() removes it."""

    def __init__(self, out_dir, rank=0, world=1, log=print):
        self.path, self.held = os.path.join(out_dir, LOCK), False
        on_rank0(lambda: self._take(log), rank, world)

    def _take(self, log):
        pid = os.getpid()
        tmp = os.path.join(os.path.dirname(self.path), f".{pid}.{LOCK}")
        line = f"{pid} {socket.gethostname()} {_start_time(pid) or '-'} {_boot_id() or '-'}\n"
        try:
            with os.fdopen(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644), "w") as fh:
                fh.write(line)
            for _ in range(2):
                try:
                    _create(tmp, self.path, line)  # fails if a lock exists; never seen empty where links work
                except FileExistsError:
                    stale = self._stale()
                    log(f"{self.path}: removed a stale lock ({stale})")
                    os.remove(self.path)
                    continue
                self.held = True
                return
        except OSError as e:
            raise CheckpointError(f"{os.path.dirname(self.path)}: --out_dir is not writable "
                                  f"({e.strerror})") from None
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)

    def _stale(self):
        """Why the existing lock is stale; CheckpointError (what to do) if another run may hold it."""
        held = (f"{self.path}: another run %s is using this --out_dir; wait for it to end, or, if no run is using "
                f"it (e.g. after a container restart), remove {self.path}")
        fields = self._holder()
        if fields is None:
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except OSError:
                return "it was removed meanwhile"
            if age < LOCK_GRACE_S:
                raise CheckpointError(held % "(starting now: the lock is being written)")
            return "empty or unreadable"
        pid, host, start, boot = fields
        who = f"(PID {pid}{' on ' + host if host != socket.gethostname() else ''})"
        if host != socket.gethostname():
            raise CheckpointError(held % who)
        if boot and _boot_id() and boot != _boot_id():
            return f"PID {pid} ran before the last reboot"
        if not _alive(pid):
            return f"PID {pid} is not running"
        if start and _start_time(pid) and start != _start_time(pid):
            return f"PID {pid} is now another process"
        raise CheckpointError(held % who)

    def _holder(self):
        """(pid, host, start, boot_id) written in the lock ("" where not recorded); None if empty or unreadable."""
        try:
            with open(self.path) as fh:
                parts = fh.read().split()
            pid, host = int(parts[0]), (parts[1] if len(parts) > 1 else socket.gethostname())
            start, boot = [(v if v != "-" else "") for v in (parts[2:4] + ["", ""])[:2]]
            return pid, host, start, boot
        except (OSError, ValueError, IndexError):
            return None

    def release(self):
        if self.held:
            self.held = False
            try:
                if (self._holder() or [None])[0] == os.getpid():
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
    save_state(out_dir, _state(policy, optimizer), {"stage_index": stage_index, "step": step}, record, rank,
                    world)
    return f"{stage} step {step}"


def load_checkpoint(path, policy, optimizer, rank):
    """Restore model, optimizer and RNG in place from a verified checkpoint; return the saved extra dict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(policy, optimizer)
    extra = load_state(path, state, rank)
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    return extra
