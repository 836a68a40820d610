"""training/config.py: flags that cannot work are one-line errors, before any work."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, env

import train


def test_bad_flags_are_one_line_errors(tmp_path):
    for flags, words in ((["--loss", "dpo", "--lam", "0.3"], "--lam"),
                         (["--batch_size", "10", "--micro_batch_size", "4"], "not divisible"),
                         (["--warmup_steps", "-1"], "--warmup_steps")):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], env=env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("flags", [["--data", "x.jsonl"], ["--loss", "dpo", "--sft_steps", "0"],
                                   ["--sft_quality_q", "1.5"]])
def test_quality_aware_sft_needs_embedded_data_and_an_sft_stage(flags):
    with pytest.raises(SystemExit):
        train.parse_config(["--sft_quality_q", "0.5", *flags])
