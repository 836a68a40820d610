"""experiments/provenance.py: what made a result, and the key under which a training run is reused (issue 32, item 4).

Owns: ``record`` (git commit, whether the work tree was dirty, the library versions, the command) written into
every results JSON; ``run_key`` (the flags with paths made relative to the work folder, a hash of the code files
that define a run, the library versions), stamped into each run's run.json, so that a changed code file or library
retrains instead of reusing; ``code_files`` (train.py and every project module it imports, found by reading the
imports, so it follows modules into folders).
Does not own: the runs (context.py) or the results (cli.py, each claim).
"""

import ast
import hashlib
import os
import sys

from base import common
from experiments import ROOT

LIBRARIES = ("torch", "transformers", "numpy")  # the versions a result records and a run's key includes
ENTRY = "train.py"  # the code that defines a run: this file and the project modules it imports
SKIP = ("tests", "experiments", "benchmarks", "docs", "examples", "scripts", "runs")  # never code of a run


def versions():
    """{library: version} of LIBRARIES and Python ("absent" for a library not installed)."""
    out = {"python": sys.version.split()[0]}
    out.update({name: common.package_version(name, missing="absent") for name in LIBRARIES})
    return out


def record(command=None):
    """{commit, dirty, versions, command}: git's HEAD (None outside a git work tree), whether tracked or untracked
    files other than experiments/results/ differ from it, LIBRARIES' versions, and the command (default: this
    process's argv)."""
    status = common.git("status", "--porcelain", "--", ".", ":(exclude)experiments/results")
    return {"commit": common.git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
            "versions": versions(),
            "command": command if command is not None else " ".join(["python", *sys.argv])}


def line(prov):
    """One line for people: commit (dirty), versions."""
    commit = (prov.get("commit") or "no git")[:10] + (" (dirty)" if prov.get("dirty") else "")
    return f"commit {commit}, " + ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())


def _module_file(name, base):
    """The project file of an imported module name (a.b -> a/b.py or a/b/__init__.py), searched from ROOT and from
    the importing file's folder; None for anything outside the project."""
    parts = name.split(".")
    for folder in (ROOT, base):
        for path in (os.path.join(folder, *parts) + ".py", os.path.join(folder, *parts, "__init__.py")):
            if os.path.isfile(path):
                return os.path.normpath(path)
    return None


def _imports(path):
    """Module names a Python file imports anywhere in it (function-level imports too)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # from pkg import module


def code_files(entry=ENTRY):
    """Paths relative to ROOT of `entry` and every project module it imports, directly or not, sorted."""
    seen, todo = set(), [os.path.join(ROOT, entry)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            found = _module_file(name, os.path.dirname(path))
            if found and found not in seen and os.path.relpath(found, ROOT).split(os.sep)[0] not in SKIP:
                todo.append(found)
    return sorted(os.path.relpath(p, ROOT) for p in seen)


def code_hash(files=None):
    """sha256 (hex, 16 digits) over the names and bytes of the code files (default: code_files())."""
    digest = hashlib.sha256()
    for rel in files if files is not None else code_files():
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(ROOT, rel), "rb") as fh:
            digest.update(fh.read() + b"\0")
    return digest.hexdigest()[:16]


def relative_argv(argv, work):
    """The flags with every value under the work folder written relative to it ("@work/…"), so that the same runs
    moved or copied elsewhere keep their key."""
    work = os.path.abspath(work)
    out = []
    for arg in argv:
        full = os.path.abspath(arg) if os.sep in arg else None
        if full and (full == work or full.startswith(work + os.sep)):
            arg = os.path.join("@work", os.path.relpath(full, work))
        out.append(arg)
    return out


def run_key(argv, work, code=None):
    """What a run is reused by: its flags (paths relative to the work folder), the code hash and the versions."""
    return {"argv": relative_argv(argv, work), "code": code or code_hash(), "versions": versions()}
