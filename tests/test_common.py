"""common.py: atomic writes, number formatting and the progress line."""
import os
import sys

import pytest

from base import common


def test_atomic_writes_keep_the_old_file_or_folder_whole(tmp_path):
    path = tmp_path / "result.json"
    with common.atomic_open(path) as fh:
        fh.write("old")
    with pytest.raises(RuntimeError):
        with common.atomic_open(path) as fh:
            fh.write("new")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    folder = tmp_path / "final"
    for version in ("1", "2"):
        with common.atomic_path(folder) as tmp:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "weights"), "w") as fh:
                fh.write(version)
    assert (folder / "weights").read_text() == "2" and not (tmp_path / "final.old").exists()


def test_number_formatting():
    assert common.pct(0.462, 0.295) == "46.2% ± 29.5" and common.pct(0.5, digits=2) == "50.00%"
    assert common.num(0.1234, "+.3f", 0.01) == "+0.123 ± 0.010" and common.num(2.0, ".1f") == "2.0"
    assert common.num(float("nan")) == common.pct(None) == "-"


# ----------------------------------------------------------------------------- progress


def test_progress_is_one_throttled_line_with_rate_and_time_left():
    import io

    now = [100.0]
    out = io.StringIO()
    bar = common.Progress(2000, "tokenizing", "pairs", stream=out, clock=lambda: now[0])
    for t, n in ((1, 100), (10, 300), (31, 100), (40, 500), (61, 1000)):  # seconds after start, pairs done
        now[0] = 100.0 + t
        bar.update(n)
    lines = out.getvalue().splitlines()
    # at the first update, 30 s after it, and at the end; nothing in between
    assert lines == ["tokenizing 100/2,000 pairs | 100.0/s | 1s elapsed, ~19s left",
                     "tokenizing 500/2,000 pairs | 16.1/s | 31s elapsed, ~1m33s left",
                     "tokenizing 2,000/2,000 pairs | 32.8/s | 1m01s elapsed, ~0s left"]
    rate = 500 / 31  # the rate so far, and the time the rest takes at that rate
    assert lines[1].endswith(f"{rate:.1f}/s | 31s elapsed, ~1m{round(1500 / rate) - 60}s left")
    silent, given = io.StringIO(), io.StringIO()
    list(common.Progress(3, "x", enabled=False, stream=silent).iterate(range(3)))
    list(common.Progress(3, "x", enabled=given).iterate(range(3)))  # a stream as `progress` writes there
    assert silent.getvalue() == "" and given.getvalue().startswith("x 1/3 | ")


def test_package_version_keeps_the_build_label_of_an_imported_module(monkeypatch):
    """A CUDA wheel's metadata says "2.14.1" where torch.__version__ says "2.14.1+cu130": the record keeps the
    label; a package never imported falls back to its metadata, a missing one to `missing`."""
    import types
    from importlib import metadata

    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="9.9.9+build7"))
    assert common.package_version("numpy") == "9.9.9+build7"
    monkeypatch.delitem(sys.modules, "numpy")
    assert common.package_version("numpy") == metadata.version("numpy")
    assert common.package_version("no-such-package-srpo", missing="absent") == "absent"
