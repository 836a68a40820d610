"""The first five minutes: the README's two commands, and the main job end to end."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """The shell commands of the README's first code block."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands_and_they_name_real_files():
    run, test = readme_commands()[:2]
    assert run == "pip install -r requirements.txt && python train.py"
    assert test == "pip install -r requirements-test.txt && python -m pytest"
    for command in (run, test):
        for name in re.findall(r"[\w./-]+\.(?:txt|py)\b", command):
            assert os.path.isfile(os.path.join(ROOT, name)), name


def test_ci_runs_the_readmes_test_command():
    test = readme_commands()[1].split("&&")[-1].strip()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        lines = [line.strip() for line in fh]
    assert test in lines
    assert any("-r requirements-test.txt" in line for line in lines)
    with open(os.path.join(ROOT, "requirements-test.txt"), encoding="utf-8") as fh:
        assert "-r requirements.txt" in [line.strip() for line in fh]


def test_main_job_end_to_end(tmp_path):
    """`python train.py` with its defaults, cut short by the step flags."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path),
           "--sft_steps", "2", "--max_steps", "2", "--eval_pairs", "16"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for words in ("trained: sft (2 steps) -> sr-dpo (2 steps)", "held-out accuracy:", "under p+x",
                  "Δπ vs true score gap: Spearman", "final model:", "next: python evaluate.py accuracy",
                  "tokenizing 2,000/2,000 pairs | ", "scoring 16/16 pairs | "):  # the long passes' progress
        assert words in out, out[-2000:]
    with open(tmp_path / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("sr-dpo", 1), ("sr-dpo", 2)]
    assert "eval_accuracy" in rows[-1] and "delta_std" in rows[-1]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = tokenizer("Copy: ABDEF\n", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_readme_srpo_example_runs_and_matches_train_step():
    """The README's copy-srpo.py example gives train.py's Sr-DPO loss on the same batch."""
    import torch

    import data
    import train
    from base import embedded
    from srpo import REFINE_PROMPT
    from training import models

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        code = re.search(r"```python\n(.*?)```", fh.read(), re.S).group(1)
    namespace = {}
    exec(code, namespace)
    tokenizer = models.load_tokenizer()
    policy, ref = models.load_model(seed=1), models.load_model(seed=2)
    examples = data.tokenize_pairs(embedded.embedded_pairs("test")[:4], tokenizer, 512, REFINE_PROMPT, log=None)
    batch = data.collate(examples, tokenizer.pad_token_id)
    loss = namespace["sr_dpo_step"](policy, ref, batch, beta=0.1, lam=0.5)
    cfg = train.resolved(train.Config(loss="sr-dpo", lam=0.5))
    losses, _ = train.preference_terms(policy, ref, None, batch, cfg)
    torch.testing.assert_close(loss, losses.mean())


def test_readme_is_a_ten_minute_read_and_its_links_resolve():
    """At most 15 KB (details live in docs/ and beside their code), and every relative link points to a file."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert len(text.encode("utf-8")) <= 15 * 1024
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local and all(os.path.exists(os.path.join(ROOT, link)) for link in local), local


# ----------------------------------------------------------------------------- the first run's figures (slow tier)

SUMMARY_RULE = "=" * 72


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """`python train.py` as the README has it (no flags, in a fresh folder), with OMP_NUM_THREADS 1 and 2: the
    summary block each prints, {threads: [lines]}."""
    blocks = {}
    for threads in (1, 2):
        folder = tmp_path_factory.mktemp(f"threads{threads}")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")], env=env, capture_output=True,
                              text=True, timeout=1800, cwd=folder)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        first = lines.index(SUMMARY_RULE)
        blocks[threads] = lines[first + 1:lines.index(SUMMARY_RULE, first + 1)]
    return blocks


def figures(lines):
    return re.findall(r"[+-]?\d+\.\d+", "\n".join(lines))


@pytest.mark.slow
def test_the_default_run_prints_the_readme_block_on_1_and_2_threads(default_runs):
    """Every figure of the summary to its printed precision: a float-level difference of reduction order (thread
    count, CPU, library patch versions) does not move them (the default's settings: defaults.py, TINY_*); and the
    README's whole block is what both print. One test, so that the two default runs are made once per session
    (pytest-xdist gives each worker its own module fixture)."""
    assert len(figures(default_runs[1])) >= 5
    assert figures(default_runs[1]) == figures(default_runs[2])
    assert default_runs[1] == default_runs[2]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        block = re.search(r"ends with:\n\n```\n(.*?)```", fh.read(), re.S).group(1).splitlines()
    assert block == default_runs[2]
    assert block == default_runs[1]
