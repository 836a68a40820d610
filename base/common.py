"""base/common.py: what every other module of srpo shares, and nothing else; it imports nothing of the project.

Owns: the project's base error SrpoError and the error kinds that several modules raise (ConfigError,
DataError, EvalError), atomic writes (atomic_path, atomic_open, replace_path), where a command may write
(check_output, inside), the project's git state and package versions (git, package_version), JSON/JSONL
output (write_jsonl, jsonable, emit), records read from files (field: a checked field; cut_unfinished_line: a
file an interrupted write left), number formatting for tables (num, pct) and the progress bar (Progress).
Does not own: any data format (data.py), model (training/models.py) or metric (training/metrics.py).
"""

import contextlib
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata


class SrpoError(Exception):
    """The project's own errors: bad input, flags or files, told in one line (``error: ...``, exit code 2)
    by the commands' main(). Any other exception is a bug and keeps its traceback."""


class ConfigError(SrpoError):
    """A flag or a combination of flags that cannot work, in one line."""


class DataError(SrpoError):
    """Bad input or an unusable dataset, in one line that names the file and line where known."""


class EvalError(SrpoError):
    """Bad input or an unrecoverable fault, in one line that names the file (and line) at fault."""


# ----------------------------------------------------------------------------- files out, progress


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds srpo.py


def package_version(name, missing="not installed"):
    """An installed package's version, or `missing`: what train.py --env and the experiments' results record.
    An imported module's own ``__version__`` comes first: it keeps the build label ("2.14.1+cu130") that the
    distribution's metadata may drop ("2.14.1")."""
    version = getattr(sys.modules.get(name), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return missing


def git(*args, timeout=30):
    """git's stripped output for `args` in the project's folder; None where git is missing, fails or times out,
    or the project is no git checkout."""
    try:
        done = subprocess.run(["git", "-C", PROJECT, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (file or folder); once the block ends without an error
    it replaces ``path`` by a rename, so a crash leaves either the old or the new one whole."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    _remove(tmp)
    yield tmp
    replace_path(tmp, path)


@contextlib.contextmanager
def atomic_open(path):
    """A UTF-8 text file opened for writing at ``path``, written atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yield fh


def replace_path(tmp, path):
    """Rename ``tmp`` onto ``path``. A folder at ``path`` is first renamed to path.old and removed after,
    so a crash between the renames leaves it whole as path.old."""
    if os.path.isdir(path):
        old = path + ".old"
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def check_output(path, flag, reads=(), ours=None, entries=None):
    """SrpoError in one line unless a command may write the folder `path` (export.py's OUT; train.py's out_dir,
    where it writes `entries` only): it is not "", nothing above it is a file, the folder it writes in is writable
    (not a read-only mount); what it writes (path, or its entries) is not the same as, inside or around anything
    it reads (`reads`: paths); and, without entries, a path that exists and is not empty is one that ours(path)
    says this command wrote (None: never), so that nothing else is ever replaced. Checked before anything is
    removed."""
    if not str(path).strip():
        raise SrpoError(f"{flag} is empty: give the folder to write")
    parent = os.path.abspath(path) if entries and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise SrpoError(f"{flag} {path}: {parent if not os.path.isdir(parent) else path} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise SrpoError(f"{flag} {path}: cannot write in {parent} (read-only or not yours)")
    for written in [path] if entries is None else [os.path.join(path, name) for name in entries]:
        for read in (r for r in reads if inside(written, r) or inside(r, written)):
            where = "holds" if not inside(written, read) else "is" if inside(read, written) else "lies inside"
            raise SrpoError(f"{flag} {path}: {'' if written == path else written + ' '}{where} {read}, which this "
                            f"command reads; give a folder apart from it")
    held = sorted(os.listdir(path)) if entries is None and os.path.isdir(path) else []
    if held and not (ours and ours(path)):
        raise SrpoError(f"{flag} {path}: holds files this command did not write ({', '.join(held[:3])}"
                        f"{', ...' if len(held) > 3 else ''}); give a new or empty folder")


def inside(a, b):
    """Whether path a is b or lies inside it (links resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def disk_full(error, folder, nbytes):
    """True if `error` came of a full disk: ENOSPC in it, its causes or (DCP's CheckpointException) any rank's
    failure, or, where none of them is an OSError of another cause, less free space in folder than the nbytes
    being written (torch.save's "unexpected pos")."""
    errors, seen, other = [error], set(), False
    while errors:
        e = errors.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "StorageFull" in str(e):
            return True
        other = other or isinstance(e, OSError) and e.errno is not None
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            errors += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        errors += [e.__cause__, e.__context__]
    if other:  # e.g. ENOENT under /proc, EROFS: the disk's free space is not the cause
        return False
    try:
        return shutil.disk_usage(folder).free < nbytes
    except OSError:
        return False


def disk_full_message(path, nbytes, kind="one"):
    """The one line for a full disk while writing `path` (the `kind` there before, if any, kept whole)."""
    kept = f"the previous {kind} is kept whole" if os.path.exists(path) else "nothing was written"
    return f"No space left on device writing {path}; {kept}; free about {max(nbytes / 1e9, 0.1):.1f} GB"


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def field(record, name, where, kind=object, error=SrpoError, missing="", what=None):
    """record[name] of a record read from a file, checked to be a `kind`: else `error` in one line naming file,
    line and field, "WHERE: field 'NAME' missing; MISSING" or "WHERE: field 'NAME' must be WHAT, got TYPE" (WHAT:
    kind's name unless given). The one rule for a field of formats.py's records and of mtbench's files."""
    if name not in record:
        raise error(f"{where}: field '{name}' missing; {missing}")
    value = record[name]
    if not isinstance(value, kind):
        raise error(f"{where}: field '{name}' must be {what or kind.__name__}, got {type(value).__name__}")
    return value


def cut_unfinished_line(raw):
    """(raw up to its last newline, whether an unfinished last line was cut): the bytes of a JSONL file that a
    run appends to, without the line an interrupted write left (the one place this rule is written)."""
    if not raw or raw.endswith(b"\n"):
        return raw, False
    return raw[:raw.rfind(b"\n") + 1], True


def write_jsonl(path, records):
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def num(value, fmt=".3f", std=None, unit=""):
    """``value`` in ``fmt`` (then ``unit``), with " ± std" where std is given; "-" when missing or not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    known = std is not None and math.isfinite(std)
    return format(value, fmt) + unit + (f" ± {format(std, fmt.lstrip('+'))}" if known else "")


def pct(value, std=None, digits=1):
    """A fraction as a percentage: pct(0.462, 0.295) == "46.2% ± 29.5"."""
    std = None if std is None else 100 * std
    return num(None if value is None else 100 * value, f".{digits}f", std, unit="%")


def jsonable(value):
    """nan/inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def emit(document, table, out=None):
    """The JSON document to ``out`` (or stdout when None or "-"), the table to the other stream."""
    text = json.dumps(jsonable(document), indent=2, ensure_ascii=False) + "\n"
    if out in (None, "-"):
        sys.stdout.write(text)
        sys.stderr.write(table + "\n")
    else:
        with atomic_open(out) as fh:
            fh.write(text)
        sys.stdout.write(table + "\n")


def _duration(seconds):
    """'12s', '3m05s', '2h07m'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One throttled progress line on stderr, in the style of train.py's step lines:

        tokenizing 1,200/2,000 pairs | 410.3/s | 2s elapsed, ~1s left

    Redrawn in place on a terminal (at most every 0.5 s); otherwise a new line at the first update, at
    most every `every` seconds (default 30) after it, and at the end, so that logs stay short.
    enabled: False (every rank but 0) prints nothing; True writes to `stream` (default stderr); a text
    stream (what a ``progress`` argument may be, e.g. sys.stdout) writes there. clock: for tests.
    """

    def __init__(self, total, label, unit="", enabled=True, stream=None, every=None, clock=time.monotonic):
        if hasattr(enabled, "write"):
            stream, enabled = enabled, True
        self.total, self.label, self.unit, self.enabled, self.clock = total, label, unit, bool(enabled), clock
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else 0.5 if self.tty else 30.0
        self.done, self.start, self.drawn = 0, clock(), None

    def line(self, now):
        """The progress line at time `now`: done/total, the rate so far and the time left at that rate."""
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else math.nan
        left = (self.total - self.done) / rate if rate > 0 else math.nan
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.label} {self.done:,}/{self.total:,}{unit} | {rate:,.1f}/s | "
                f"{_duration(elapsed)} elapsed, ~{_duration(left)} left")

    def update(self, n=1):
        self.done += n
        now = self.clock()
        due = self.drawn is None or now - self.drawn >= self.every or self.done >= self.total
        if self.enabled and due:
            self.drawn = now
            line = self.line(now)
            self.stream.write("\r" + line if self.tty else line + "\n")
            self.stream.flush()

    def iterate(self, items):
        """Yield the items, counting each one done when the next is asked for; close at the end."""
        for item in items:
            yield item
            self.update()
        self.close()

    def close(self):
        if self.enabled and self.tty and self.drawn is not None:
            self.stream.write("\n")
            self.stream.flush()
