"""Test configuration: no test may reach the network or a model hub; the suite's two tiers and its time.

- `python -m pytest` runs the default tier on two pytest-xdist workers where pytest-xdist is installed and no
  -n was given (`-n 0` or `-p no:xdist`: one process, the same tests and results); the default tier's workers
  run torch on one thread unless OMP_NUM_THREADS says otherwise.
- Tests marked `slow` (those that cannot be made cheap) run only with `-m slow` (CI's second command) or when
  named on the command line (`path::test`); any other -m expression decides by itself.
- Each test's seconds (setup, call and teardown; wall and CPU of this process and its children) are kept, and
  the summary warns, without failing, about a default-tier test past SLOW_TEST_S (the machine may be loaded).
"""
import os
import sys
import time

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORKERS = 2        # pytest-xdist workers when none were asked for: the 2 cores the suite is sized for
SLOW_TEST_S = 30   # a default-tier test longer than this (on 2 idle cores) belongs in `slow` or must get cheaper


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """-n WORKERS where pytest-xdist is installed and neither -n, --pdb nor --collect-only was given."""
    if (config.pluginmanager.hasplugin("xdist") and getattr(config.option, "numprocesses", 0) is None
            and not hasattr(config, "workerinput") and not config.option.usepdb and not config.option.collectonly):
        config.option.numprocesses = WORKERS


def pytest_configure(config):
    """The default tier's workers run torch on one thread each (unless OMP_NUM_THREADS says otherwise): 2 workers
    of 2 threads on 2 cores spent half their CPU time waiting (a training test took 41 CPU-seconds, not 21). Not
    the slow tier's: the bf16 test misses its bf16-vs-fp32 tolerance on one thread."""
    if hasattr(config, "workerinput") and not config.option.markexpr and not any("::" in a for a in config.args):
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # test modules, and so torch, are imported after this
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Without -m, and unless tests were named by node id, the `slow` tier is left out (deselected)."""
    if config.option.markexpr or any("::" in arg for arg in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)


def cpu_seconds():
    """CPU seconds of this process and of its children that have ended (theirs only once reaped)."""
    try:
        import resource
    except ImportError:  # not on Windows: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


CPU_AT_START = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[CPU_AT_START] = cpu_seconds()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The teardown report carries the test's CPU seconds (setup to teardown) to the controller."""
    outcome = yield
    if call.when == "teardown" and CPU_AT_START in item.stash:
        outcome.get_result().user_properties.append(("cpu_s", cpu_seconds() - item.stash[CPU_AT_START]))


_seconds = {}  # nodeid -> {"wall": seconds of its phases so far, "cpu": seconds, "slow": marked slow}


def pytest_runtest_logreport(report):
    seen = _seconds.setdefault(report.nodeid, {"wall": 0.0, "cpu": None, "slow": "slow" in report.keywords})
    seen["wall"] += report.duration
    if report.when == "teardown":
        seen["cpu"] = dict(report.user_properties).get("cpu_s")


def pytest_terminal_summary(terminalreporter):
    over = sorted((s["wall"], s["cpu"], nodeid) for nodeid, s in _seconds.items()
                  if s["wall"] > SLOW_TEST_S and not s["slow"])
    if not over:
        return
    terminalreporter.write_sep("=", f"warning: {len(over)} default-tier test(s) over {SLOW_TEST_S} s", yellow=True)
    for wall, cpu, nodeid in reversed(over):
        terminalreporter.write_line(f"{wall:6.1f} s wall" + (f", {cpu:6.1f} s CPU" if cpu is not None else "")
                                    + f"  {nodeid}")
    terminalreporter.write_line(f"On 2 idle cores no default-tier test may take over {SLOW_TEST_S} s: make it "
                                "cheaper, or mark it slow if it cannot be. A loaded machine inflates wall time; CPU "
                                "time counts every thread and finished child process.")


@pytest.fixture
def nan_at_step(monkeypatch):
    """nan_at_step(k): make the preference loss of step k NaN (steps count from 1; one micro-batch a step)."""
    def make(k):
        import train

        calls, terms = [], train.preference_terms

        def faulty(*args):
            losses, stats = terms(*args)
            calls.append(1)
            return (losses * float("nan") if len(calls) == k else losses), stats

        monkeypatch.setattr(train, "preference_terms", faulty)

    return make
