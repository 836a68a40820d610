"""Issue 12, case by case: every bad input, flag and fault ends in a clear one-line error or a correct run.

Each test names the case of the issue's list it covers. Runs are a few steps of the tiny model on CPU.
"""
import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import data
import evaluate
import train
from base import common
from base.formats import Pair
from mtbench import answers, judge
from srpo import IGNORE_INDEX, REFINE_PROMPT
from training import checkpoint, models

FAST = ["--device", "cpu", "--batch_size", "8", "--max_pairs", "32", "--sft_steps", "0", "--eval_every", "0",
        "--eval_pairs", "8", "--save_every", "0", "--lr", "3e-3", "--warmup_steps", "1"]


def byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # uses no BOS


def train_main(out_dir, *flags, fast=True):
    """train.main in this process; its exit code (argparse's SystemExit included)."""
    try:
        return train.main(["--out_dir", str(out_dir), *(FAST if fast else []), *map(str, flags)])
    except SystemExit as e:
        return e.code


def evaluate_main(*args):
    try:
        return evaluate.main([*map(str, args)])
    except SystemExit as e:
        return e.code


def one_error(capsys, *words):
    """The one error line on stderr (no traceback), which must contain every word; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def metrics(out_dir):
    with open(os.path.join(out_dir, checkpoint.METRICS)) as fh:
        return [json.loads(line) for line in fh]


def scored(labels):
    """The scored tokens of one row: labels[1:] that are not -100 (a token is predicted from the one before)."""
    return [t for t in labels[1:] if t != IGNORE_INDEX]


def tiny_folder(path):
    """A tiny model saved as a plain transformers folder that is not a run of this project."""
    tokenizer = models.load_tokenizer(models.TINY)
    models.load_model(models.TINY, tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- 1. identical after truncation


@pytest.mark.parametrize("refine", [None, REFINE_PROMPT], ids=["x", "p"])
def test_1_pairs_identical_after_truncation_are_dropped_and_counted(refine):
    opening = "The answer, considered with care and at length, " * 9  # 441 characters
    pairs = [Pair(f"Question {i}?", opening + "yes.", opening + "no!") for i in range(16)]
    pairs += [Pair(f"Short {i}?", f"good {i}", f"bad {i}") for i in range(2)]
    lines = []
    examples = data.tokenize_pairs(pairs, byte_tokenizer(), 256 if refine is None else 512, refine,
                                   log=lines.append)
    assert [e["pair_index"] for e in examples] == [16, 17]
    assert "kept 2 of 18 pairs; dropped 16 identical after truncation" in lines[0]
    for e in examples:
        for view in ("", "p_") if refine else ("",):
            assert scored(e[f"{view}chosen_labels"]) != scored(e[f"{view}rejected_labels"])


# ----------------------------------------------------------------------------- 2. --max_grad_norm


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_2_max_grad_norm_must_be_positive(tmp_path, capsys, value):
    assert train_main(tmp_path, "--max_grad_norm", value) == 2
    one_error(capsys, "--max_grad_norm")
    assert not os.path.exists(tmp_path / checkpoint.METRICS)


def test_2_max_grad_norm_inf_turns_clipping_off():
    assert train.parse_config(["--max_grad_norm", "inf"]).max_grad_norm == float("inf")


# ----------------------------------------------------------------------------- 3. accuracy's reference


def test_3_accuracy_needs_the_reference_of_a_model_folder(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "policy")
    assert evaluate_main("accuracy", "--model", folder, "--device", "cpu", "--limit", "8") != 0
    one_error(capsys, "--ref_model")


def test_3_accuracy_reads_the_reference_of_a_final_model(tmp_path):
    """final/ of a run, no --ref_model: the run's own reference (the tiny model of --seed 3), so evaluate.py
    reproduces the run's last held-out numbers, which a seed-0 "tiny" reference does not."""
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "1", "--seed", "3") == 0
    trained = metrics(tmp_path)[-1]
    args = ["accuracy", "--model", tmp_path / checkpoint.FINAL, "--device", "cpu", "--limit", "8"]
    assert evaluate_main(*args, "--out", tmp_path / "recorded.json") == 0
    assert evaluate_main(*args, "--out", tmp_path / "seed0.json", "--ref_model", "tiny") == 0
    recorded, seed0 = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("recorded.json", "seed0.json"))
    for key in ("reward_chosen_mean", "reward_rejected_mean", "p_reward_chosen_mean"):
        assert recorded[key] == pytest.approx(trained[f"eval_{key}"], rel=1e-4, abs=1e-5)
        assert seed0[key] != pytest.approx(trained[f"eval_{key}"], rel=1e-2, abs=1e-3)


# ----------------------------------------------------------------------------- 4. --resume checks the flags


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished two-step DPO run with its checkpoint (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("run")
    assert train_main(out, "--loss", "dpo", "--max_steps", "2") == 0
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("flag,value", [("--batch_size", "16"), ("--loss", "sr-dpo"), ("--beta", "0.2"),
                                        ("--seed", "1"), ("--max_length", "256"), ("--max_pairs", "24")])
def test_4_resume_refuses_changed_run_flags(checkpointed, tmp_path, capsys, flag, value):
    out = copy_run(checkpointed, tmp_path / "run")
    assert train_main(out, "--loss", "dpo", "--max_steps", "3", "--resume", flag, value) != 0
    one_error(capsys, flag)
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_4_resume_force_overrides_and_max_steps_may_grow(checkpointed, tmp_path):
    out = copy_run(checkpointed, tmp_path / "run")
    assert train_main(out, "--loss", "dpo", "--max_steps", "3", "--resume") == 0
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert train_main(out, "--loss", "dpo", "--max_steps", "4", "--resume", "--beta", "0.2", "--resume_force") == 0
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 5. half-written metrics line


def test_5_half_written_metrics_line_is_dropped_with_a_note(checkpointed, tmp_path, capsys):
    out = copy_run(checkpointed, tmp_path / "run")
    with open(out / checkpoint.METRICS, "a") as fh:
        fh.write('{"stage": "dpo", "step": 3, "lo')  # kill -9 mid-write
    assert train_main(out, "--loss", "dpo", "--max_steps", "3", "--resume") == 0
    captured = capsys.readouterr()
    assert str(out / checkpoint.METRICS) in captured.out + captured.err
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


# ----------------------------------------------------------------------------- 6. one run per --out_dir


def lock_path(out):
    return os.path.join(out, checkpoint.LOCK)


def test_6_a_second_run_on_one_out_dir_is_refused(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(lock_path(tmp_path), "w") as fh:
            fh.write(f"{holder.pid}\n")
        assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "1") != 0
        one_error(capsys, str(holder.pid), str(tmp_path))
        assert not os.path.exists(tmp_path / checkpoint.METRICS)
    finally:
        holder.kill()
        holder.wait()


def test_6_a_stale_lock_is_taken_over_and_the_lock_released(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock_path(tmp_path), "w") as fh:
        fh.write(f"{dead.pid}\n")
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "1") == 0
    assert "stale" in capsys.readouterr().out
    assert not os.path.exists(lock_path(tmp_path))


# ----------------------------------------------------------------------------- 7. checkpoints cannot run code


class Payload:
    """Unpickling this runs os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(checkpoint_dir, marker, resign):
    """Replace the checkpoint's .metadata with a pickle whose loading would run code."""
    path = os.path.join(checkpoint_dir, ".metadata")
    with open(path, "wb") as fh:
        pickle.dump(Payload(str(marker)), fh)
    if resign:  # an attacker who also rewrites the checksums
        checkpoint.write_checksums(checkpoint_dir)


@pytest.mark.parametrize("resign", [False, True])
def test_7_planted_metadata_payload_does_not_run(checkpointed, tmp_path, capsys, resign):
    out = copy_run(checkpointed, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    plant(out / checkpoint.CHECKPOINT, marker, resign)
    assert train_main(out, "--loss", "dpo", "--max_steps", "3", "--resume") != 0
    assert not marker.exists()
    one_error(capsys, ".metadata")


def test_7_restricted_metadata_reader_loads_a_real_checkpoint(checkpointed):
    meta = checkpoint.read_metadata(str(checkpointed / checkpoint.CHECKPOINT))
    assert any(key.startswith("model.") for key in meta.state_dict_metadata)


def test_7_corrupt_checkpoint_is_a_one_line_error(checkpointed, tmp_path, capsys):
    out = copy_run(checkpointed, tmp_path / "run")
    shard = next(p for p in (out / checkpoint.CHECKPOINT).iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert train_main(out, "--loss", "dpo", "--max_steps", "3", "--resume") != 0
    one_error(capsys, shard.name)


# ----------------------------------------------------------------------------- 8. empty prompt, no BOS


def test_8_empty_prompt_scores_the_same_tokens_in_both_views():
    tok = byte_tokenizer()
    assert tok.bos_token_id is None
    [e] = data.tokenize_pairs([Pair("", "ab", "cde")], tok, 512, REFINE_PROMPT, log=None)
    for side, text in (("chosen", "ab"), ("rejected", "cde")):
        expected = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        assert scored(e[f"{side}_labels"]) == scored(e[f"p_{side}_labels"]) == expected


# ----------------------------------------------------------------------------- 9. held-out set and p


def test_9_dpo_with_max_length_shorter_than_p_runs_and_evaluates(tmp_path, capsys):
    # by default DPO is cut as Sr-DPO is (the same x-view tokens): p must fit, and the error says how not to
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "2", "--max_length", "64") != 0
    one_error(capsys, "--truncate_x_only")
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "2", "--max_length", "64", "--truncate_x_only") == 0
    assert "eval_accuracy" in metrics(tmp_path)[-1]


def test_9_sr_dpo_with_max_length_shorter_than_p_is_refused(tmp_path, capsys):
    assert train_main(tmp_path, "--loss", "sr-dpo", "--max_steps", "2", "--max_length", "64") != 0
    one_error(capsys, "max_length")


# ----------------------------------------------------------------------------- 10. start-up checks


def test_10_out_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    for out in (path, path / "below"):
        assert train_main(out, "--loss", "dpo", "--max_steps", "1") != 0
        one_error(capsys, str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_10_read_only_out_dir(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "1") != 0
        one_error(capsys, str(tmp_path))
    finally:
        tmp_path.chmod(0o755)


def test_10_unwritable_out_dir_even_as_root(tmp_path, capsys, monkeypatch):
    """The lock is the first file a run writes: a folder it cannot write into is a one-line error."""
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(checkpoint.LOCK):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "open", refuse)
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "1") != 0
    one_error(capsys, str(tmp_path), "not writable")
    assert not os.path.exists(tmp_path / checkpoint.METRICS)


@pytest.mark.parametrize("flag", ["--model", "--ref_model"])
def test_10_missing_model_is_found_before_any_work(tmp_path, capsys, flag):
    missing = tmp_path / "no-such-model"
    assert train_main(tmp_path / "out", "--loss", "dpo", "--sft_steps", "2", "--max_steps", "1", flag, missing) != 0
    one_error(capsys, flag, str(missing))
    assert not os.path.exists(tmp_path / "out" / checkpoint.SFT_DIR)
    assert not os.path.exists(tmp_path / "out" / checkpoint.METRICS)


@pytest.mark.parametrize("flag", ["--data", "--eval_data"])
def test_10_missing_data_file_is_found_before_any_work(tmp_path, capsys, flag):
    missing = tmp_path / "no-such-pairs.jsonl"
    assert train_main(tmp_path / "out", "--loss", "dpo", "--max_steps", "1", flag, missing) != 0
    one_error(capsys, str(missing))
    assert not os.path.exists(tmp_path / "out" / checkpoint.METRICS)


@pytest.mark.parametrize("flags,word", [(["--micro_batch_size", "-2"], "--micro_batch_size"),
                                        (["--log_every", "0"], "--log_every"),
                                        (["--max_pairs", "-1"], "--max_pairs"),
                                        (["--epochs", "0"], "--epochs")])
def test_10_12_bad_numbers_are_one_line_errors(tmp_path, capsys, flags, word):
    assert train_main(tmp_path, "--loss", "dpo", *flags) == 2
    one_error(capsys, word)


@pytest.mark.parametrize("content", ["empty", "not a model"])
def test_10_a_folder_that_is_not_a_model(tmp_path, capsys, content):
    folder = tmp_path / "folder"
    folder.mkdir()
    if content != "empty":
        (folder / "notes.txt").write_text("hello")
    assert evaluate_main("accuracy", "--model", folder, "--ref_model", "tiny", "--device", "cpu") != 0
    line = one_error(capsys, str(folder))
    assert "sentencepiece" not in line and "tiktoken" not in line
    assert train_main(tmp_path / "out", "--model", folder) != 0
    line = one_error(capsys, str(folder), "--model")
    assert "sentencepiece" not in line and "tiktoken" not in line


# ----------------------------------------------------------------------------- 11. stale judge verdicts


def answers_file(path, model_id, texts):
    common.write_jsonl(path, [{"question_id": qid, "model_id": model_id, "choices": [{"index": 0, "turns": [text]}]}
                            for qid, text in texts.items()])
    return answers.load_answers(str(path))


def test_11_changed_answers_are_judged_again(tmp_path):
    questions = [{"question_id": q, "turns": [f"Question {q}?"]} for q in (1, 2)]
    asked = []

    def ask(system, user):
        asked.append(user)
        return "[[A]]"

    prompts = judge.load_judge_prompts()
    identity = {"model_a": "a", "model_b": "b", "judge": "fake"}
    out = str(tmp_path / "verdicts.jsonl")

    def judge_all(texts_a):
        answers_a = answers_file(tmp_path / "a.jsonl", "a", texts_a)
        answers_b = answers_file(tmp_path / "b.jsonl", "b", {1: "b1", 2: "b2"})
        game_list, _ = judge.games(questions, answers_a, answers_b)
        return judge.judge_games(game_list, answers_a, answers_b, ask, prompts, out, identity)

    judge_all({1: "a1", 2: "a2"})
    assert len(asked) == 4  # 2 questions x 2 orders
    judge_all({1: "a1", 2: "a2"})
    assert len(asked) == 4  # resumed: nothing asked again
    records = judge_all({1: "a1", 2: "a2, regenerated"})
    assert len(asked) == 6 and all("a2, regenerated" in user for user in asked[4:])
    assert len(records) == 4


# ----------------------------------------------------------------------------- 12. small silent cases


def test_12_nan_stop_without_a_checkpoint_says_so(tmp_path, capsys, nan_at_step):
    nan_at_step(1)
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "3") != 0
    line = one_error(capsys, "non-finite", "no checkpoint")
    assert "last good checkpoint is kept" not in line


def test_12_nan_stop_with_a_checkpoint_names_its_step(tmp_path, capsys, nan_at_step):
    nan_at_step(3)
    assert train_main(tmp_path, "--loss", "dpo", "--max_steps", "4", "--save_every", "2") != 0
    one_error(capsys, "non-finite", "step 2")


def test_12_pretty_printed_data_object_json(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"data": records}, indent=2))
    assert [p.prompt for p in data.load_pairs(str(path), log=None)] == ["q0", "q1", "q2"]
    records[2] = {"prompt": "q2", "chosen": "good"}  # no rejected: the error names its line
    path.write_text(json.dumps({"data": records}, indent=2))
    text = path.read_text()
    line = text[:text.index('"q2"')].count("\n")  # the line of the record's "{"
    with pytest.raises(common.DataError, match=rf"pairs.json:{line}: field 'rejected' missing"):
        data.load_pairs(str(path), log=None)


def test_checksums_cover_every_checkpoint_file(checkpointed):
    folder = checkpointed / checkpoint.CHECKPOINT
    sums = checkpoint.read_checksums(str(folder))
    files = sorted(p.name for p in folder.iterdir() if p.name != checkpoint.CHECKSUMS)
    assert sorted(sums) == files
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_7_checkpoint_byte_items_load_without_running_code(tmp_path):
    """DCP's default planner unpickles byte items (the optimizer's param_groups) with weights_only=False."""
    import io

    buffer = io.BytesIO()
    torch.save(Payload(str(tmp_path / "payload-ran")), buffer)
    buffer.seek(0)
    _, planner = checkpoint._reader_and_planner(str(tmp_path))
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(None, buffer)
    assert not (tmp_path / "payload-ran").exists()


def test_5_a_damaged_metrics_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "dpo", "step": 1}\n{"stage": "dpo", "st\n{"stage": "dpo", "step": 3}\n')
    with pytest.raises(checkpoint.CheckpointError, match=rf"{path}:2: not a metrics record"):
        checkpoint.trim_metrics(str(path), lambda m: True, log=None)


# ----------------------------------------------------------------------------- issue 28: start-up checks


def gpt2_folder(path, tokenizer, vocab_size=None, n_positions=1024):
    """A tiny GPT-2 of `vocab_size` rows (default: the tokenizer's ids) and n_positions, saved with `tokenizer`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=1,
                        n_head=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def other_reference(path, kind):
    """A reference the tiny policy's ids do not fit: fewer embedding rows, or as many with another vocabulary."""
    from transformers import ByT5Tokenizer

    return gpt2_folder(path, ByT5Tokenizer(extra_ids=0), vocab_size=None if kind == "rows" else 400)


@pytest.mark.parametrize("kind,words", [("rows", "embedding has 259 rows"), ("vocab", "not the policy's")])
def test_28_3_a_reference_of_another_vocabulary_is_refused(tmp_path, capsys, kind, words):
    ref = other_reference(tmp_path / "ref", kind)
    assert train_main(tmp_path / "out", "--loss", "dpo", "--max_steps", "1", "--ref_model", ref) == 2
    one_error(capsys, "--ref_model", words)
    assert not os.path.exists(tmp_path / "out" / checkpoint.METRICS)
    assert evaluate_main("accuracy", "--model", "tiny", "--ref_model", ref, "--limit", "2") == 2
    one_error(capsys, "--ref_model", words)


def test_28_3_a_reference_with_the_same_vocabulary_passes(tmp_path):
    folder = tiny_folder(tmp_path / "same")
    models.check_compatible(folder, models.load_tokenizer(), 512, "--ref_model", "tiny")


def test_28_4_max_length_beyond_the_model_positions_is_refused(tmp_path, capsys):
    folder = gpt2_folder(tmp_path / "short", models.load_tokenizer(), n_positions=64)
    assert train_main(tmp_path / "out", "--model", folder, "--loss", "dpo", "--max_length", "128") == 2
    one_error(capsys, "--max_length 128", "64 positions")
    assert evaluate_main("accuracy", "--model", folder, "--ref_model", folder, "--max_length", "128") == 2
    one_error(capsys, "--max_length 128")


@pytest.mark.parametrize("flags,word", [(["--lam", "-1"], "--lam -1"), (["--lam", "nan"], "--lam nan"),
                                        (["--beta", "inf"], "--beta inf"), (["--lr", "inf"], "--lr inf"),
                                        (["--lr", "nan"], "--lr nan"), (["--epochs", "inf"], "--epochs inf"),
                                        (["--loss", "sft", "--sft_steps", "5"], "--sft_steps 5"),
                                        (["--loss", "dpo", "--refine", "naive"], "--refine naive"),
                                        (["--loss", "ipo", "--refine_prompt", "10"], "--refine_prompt 10"),
                                        (["--max_steps", "-2"], "--max_steps -2"),
                                        (["--collective_timeout", "0"], "--collective_timeout 0")])
def test_28_4_ignored_or_non_finite_flags_are_refused_before_any_work(tmp_path, capsys, flags, word):
    assert train_main(tmp_path, "--sft_steps", "3", *flags) == 2
    one_error(capsys, word)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("flags,word", [(["--beta", "-1"], "--beta"), (["--beta", "nan"], "--beta"),
                                        (["--limit", "-1"], "--limit"), (["--batch_size", "0"], "--batch_size"),
                                        (["--max_length", "0"], "--max_length")])
def test_28_4_evaluate_refuses_bad_numbers(capsys, flags, word):
    assert evaluate_main("accuracy", "--model", "tiny", *flags) == 2
    one_error(capsys, word)


def test_28_4_the_pairs_each_epoch_leaves_out_are_said(tmp_path, capsys):
    assert train_main(tmp_path, "--loss", "dpo", "--max_pairs", "28", "--max_steps", "1") == 0
    out = capsys.readouterr().out
    assert out.count("4 of 28 pairs are not used each epoch") == 1 and "left out: 4 of 28 pairs" in out
