"""The benchmark scripts still run against the code they measure (smallest sizes, on the CPU).

They are not timed here: each runs once, and its output file is checked for the figures it promises.
A change in models.py or train.py that breaks a script fails here, not on the next GPU run.
"""
import json
import math
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, tmp_path, timeout=900, **env):
    """Run argv from the project root, on the CPU with one thread; fail with its output's tail. Past the timeout
    (a hang guard, wide: a loaded machine runs these ten times slower) its whole process group is killed, a
    script's children too."""
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    with subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{' '.join(argv)} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def test_packing_benchmark_writes_every_layout(tmp_path):
    out = tmp_path / "packing"
    run([sys.executable, "benchmarks/packing.py", "--models", "tiny", "--pairs", "4", "--micro", "2",
         "--max_length", "128", "--rounds", "1", "--losses", "sr-dpo", "--no_warmup", "--no_memory",
         "--out", str(out)], tmp_path)
    rows = json.loads((tmp_path / "packing.json").read_text())["results"]["tiny"]["rows"]
    assert sorted(r["packing"] for r in rows) == sorted(("padded", "packed", "shared"))
    assert all(r["step_s"] > 0 and r["time_ratio"] > 0 for r in rows)
    assert "| shared |" in (tmp_path / "packing.md").read_text()


def test_logps_memory_benchmark_measures_every_method(tmp_path):
    out = tmp_path / "logps.json"
    run([sys.executable, "benchmarks/logps_memory.py", "--shape", "2,16,64", "--hidden", "32", "--dtype", "fp32",
         "--device", "cpu", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["shape"] == [2, 16, 64] and result["fp32_logits_bytes"] == 4 * 2 * 16 * 64
    assert [r["pass"] for r in result["rows"]] == ["forward", "forward+backward"]
    # at so small a shape the resident-memory differences are noise (even negative): numbers, not sizes
    assert all(math.isfinite(r[f"{m}_bytes"]) for r in result["rows"] for m in ("naive", "srpo", "fused"))


@pytest.mark.slow  # six processes (each case alone), ~35 CPU-s
def test_vocab_step_benchmark_measures_both_paths(tmp_path):
    out = tmp_path / "vocab.json"
    run([sys.executable, "benchmarks/vocab_step.py", "--pairs", "2", "--micro", "1", "--prompt_tokens", "8",
         "--response_tokens", "8", "--p_tokens", "4", "--steps", "1", "--vocab", "1024", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert sorted((r["vocab"], r["path"]) for r in result["memory"]) == [
        (512, "full"), (512, "fused"), (1024, "full"), (1024, "fused")]
    assert set(result["ratios"]) == {f"large/small {m}, {p}" for m in ("peak", "step memory")
                                     for p in ("fused", "full logits")} | {"fused/full step time, large vocab"}
    memory = {(r["vocab"], r["path"]): r["peak_bytes"] for r in result["memory"]}
    assert result["ratios"]["large/small peak, fused"] == memory[1024, "fused"] / memory[512, "fused"]
    assert all(s > 0 for s in result["time"]["seconds"]["fused"] + result["time"]["seconds"]["full"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak memory")
def test_load_memory_benchmark_loads_both_ways(tmp_path):
    out = tmp_path / "load.json"
    run([sys.executable, "benchmarks/load_memory.py", "--ranks", "1", "--layers", "1", "--saved_dtypes", "float32",
         "--out", str(out)], tmp_path, timeout=900)
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["path"] for r in runs) == ["new", "old"]
    assert all(r["results"][0]["peak_bytes"] > 0 for r in runs)


@pytest.mark.slow  # about a dozen Python processes, ~50 CPU-s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash, timeout and /proc")
def test_gpu_check_script_runs_small_on_cpu(tmp_path):
    """SMALL=1 gpu_check.sh: the toy model through train.py, step_cost.py and logps_memory.py, then the
    summary with every goal (met or not: a CPU says nothing about a GPU's figures)."""
    run(["bash", "benchmarks/gpu_check.sh"], tmp_path, timeout=900, SMALL="1", PARTS="train step_cost logps",
        OUT=str(tmp_path), PYTHON=sys.executable)
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = {c["name"] for c in summary["checks"]}
    assert {"mfu", "sr-dpo/dpo peak memory", "loop/floor sr-dpo",
            "sequence_logps extra memory bf16 forward+backward"} <= names, names
    assert summary["tokens_per_s"] > 0
