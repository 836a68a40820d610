"""train.py --config FILE (issue 35): recipes/ validated without training, the CPU recipe run here, command-line flags
over the file's, and bad recipes refused in one line naming the file, line and key."""
import dataclasses
import glob
import json
import os
import re

import pytest

import train
from training import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
CPU_RECIPE = os.path.join(ROOT, "recipes", "sr-dpo-tiny-embedded-cpu.yaml")


def layout(path):
    """The world size of the command a recipe names in its comments (torchrun's --nnodes x --nproc_per_node, or 1
    for `python train.py`), which must name the recipe itself."""
    with open(path, encoding="utf-8") as fh:
        comments = " ".join(line for line in fh if line.startswith("#"))
    command = re.search(r"(torchrun [^#]*|python train\.py )--config recipes/(\S+)", comments)
    assert command and command.group(2) == os.path.basename(path), f"{path}: no command that runs it"
    nodes = re.search(r"--nnodes[= ](\d+)", command.group(1))
    per_node = re.search(r"--nproc_per_node[= ](\d+)", command.group(1))
    return (int(nodes.group(1)) if nodes else 1) * (int(per_node.group(1)) if per_node else 1)


def test_the_recipes_are_there():
    names = [os.path.basename(p) for p in RECIPES]
    assert CPU_RECIPE in RECIPES
    assert any("pythia-2.8b-hh-rlhf" in n and n.startswith("sft") for n in names)
    assert any("pythia-2.8b-hh-rlhf" in n and n.startswith("sr-dpo") for n in names)
    assert any("zephyr-7b" in n and "ultrafeedback" in n for n in names)
    assert any("lora" in n for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_validates_on_its_layout(path):
    """Every key a flag, every value of its type and choices, and --batch_size divisible on the GPUs it names."""
    world = layout(path)
    cfg = config.parse_config(["--config", path])
    config.validate(cfg, world)
    flags = config.read_recipe(path)
    assert flags and all(getattr(cfg, k) == v for k, v in flags.items())
    assert cfg != config.Config(), path


def test_the_cpu_recipe_is_the_default_run_written_out():
    """`python train.py --config recipes/sr-dpo-tiny-embedded-cpu.yaml` is `python train.py`: every value it gives is
    the one the default run resolves to, so the recipe shows the default's settings."""
    flags = config.read_recipe(CPU_RECIPE)
    default = dataclasses.asdict(config.resolved(config.Config()))
    assert {k: default[k] for k in flags} == flags
    assert config.resolved(config.parse_config(["--config", CPU_RECIPE])) == config.resolved(config.Config())
    assert {"model", "data", "loss", "lr", "warmup_steps", "sft_steps", "batch_size"} <= set(flags)


def test_the_cpu_recipe_runs_here_and_the_command_line_overrides_it(tmp_path, capsys):
    out = tmp_path / "out"
    code = train.main(["--config", CPU_RECIPE, "--out_dir", str(out), "--sft_steps", "2", "--max_steps", "2",
                       "--eval_pairs", "8", "--seed", "3"])
    assert code == 0
    assert "trained: sft (2 steps) -> sr-dpo (2 steps)" in capsys.readouterr().out
    with open(out / "final" / "srpo_run.json") as fh:  # the resolved config, saved beside the model as before
        saved = json.load(fh)["run"]
    recipe = config.read_recipe(CPU_RECIPE)
    assert saved["seed"] == 3 and saved["sft_steps"] == 2 and saved["out_dir"] == str(out)  # the command line's
    assert all(saved[k] == v for k, v in recipe.items() if k not in ("sft_steps", "out_dir"))  # the file's
    with open(out / "checkpoint" / "run.json") as fh:  # and the run-defining ones beside the checkpoint
        record = json.load(fh)
    assert record["seed"] == 3 and record["lr"] == recipe["lr"] and record["loss"] == recipe["loss"]


def test_command_line_flags_override_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("loss: sr-ipo\nlr: 5e-7\nbeta: 0.2\nrefine_prompt: 10\nmax_grad_norm: .inf\nsft_steps: null\n"
                    "precompute_ref: true\n")
    cfg = config.parse_config(["--config", str(path), "--beta", "0.3"])
    assert (cfg.loss, cfg.lr, cfg.beta, cfg.refine_prompt, cfg.max_grad_norm, cfg.sft_steps, cfg.precompute_ref) == \
        ("sr-ipo", 5e-7, 0.3, "10", float("inf"), None, True)  # YAML's 5e-7 is a string, 10 an int: both converted
    assert config.parse_config(["--beta", "0.3", "--config", str(path)]).beta == 0.3  # wherever --config stands


@pytest.mark.parametrize("text, words", [
    ("loss: sr-dpo\nlearning_rate: 1e-3\n", ["line 2", "unknown key 'learning_rate'"]),
    ("batch_size: 2.5\n", ["line 1", "batch_size", "not an integer"]),
    ("lr: fast\n", ["line 1", "lr", "not a number"]),
    ("precompute_ref: 1\n", ["precompute_ref", "not true or false"]),
    ("loss: [dpo, ipo]\n", ["loss", "one value"]),
    ("loss: dpo\nloss: ipo\n", ["line 2", "loss", "given twice"]),
    ("- loss\n", ["line 1", "flag: value"]),
    ("loss: dpo\n  beta: 0.1\n", ["line 2", "not YAML"]),
    ("loss: fancy\n", ["--loss fancy", "expected one of"]),  # choices and combinations: validate's own errors
])
def test_a_bad_recipe_is_one_line_naming_the_file(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as done:
        config.parse_config(["--config", str(path)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    for word in words + ([str(path)] if "expected one of" not in words else []):
        assert word in err, err


def test_a_missing_recipe_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--config", str(tmp_path / "none.yaml")])
    assert "none.yaml: cannot read the file" in capsys.readouterr().err
