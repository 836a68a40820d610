"""model_card.py: the README.md of final/ and sft/; pure, standard library and srpo.py only, nothing invented."""

import ast
import dataclasses
import os

from helpers import run_train

import srpo
import train
from training import model_card

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def front_matter(text):
    """{key: value or [values]} of the YAML front matter (the simple form model_card writes)."""
    assert text.startswith("---\n")
    block = text.split("---\n")[1]
    out, key = {}, None
    for line in block.splitlines():
        if line.startswith("- "):
            out[key].append(line[2:])
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            out[key] = value if value else []
    return out


def flags(**changes):
    return dataclasses.asdict(train.resolved(train.Config(**changes)))


def test_a_hub_run_names_its_base_model_and_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of these names
    f = flags(model="EleutherAI/pythia-2.8b", data="Anthropic/hh-rlhf",
              eval_data="HuggingFaceH4/ultrafeedback_binarized", lam=0.3, lr_scheduler="cosine")
    text = model_card.model_card(f, stages=[("sr-dpo", 100)], train_pairs=1000, dropped_pairs=7,
                                 heldout={"accuracy": 0.625, "n_pairs": 200, "note": "skipped"},
                                 command="python train.py --lam 0.3", refine_prompt=srpo.REFINE_PROMPT)
    meta = front_matter(text)
    assert meta["base_model"] == "EleutherAI/pythia-2.8b"
    assert meta["datasets"] == ["Anthropic/hh-rlhf", "HuggingFaceH4/ultrafeedback_binarized"]
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["srpo", "sr-dpo", "dpo"]
    body = text.split("---\n", 2)[2]
    for words in ("Sr-DPO, Eq. (12)", "- β: 0.1", "- λ: 0.3", srpo.REFINE_PROMPT, "- pairs kept: 1,000",
                  "- pairs dropped: 7", "- steps: 100 of Sr-DPO", "- learning rate after warm-up: cosine",
                  "| accuracy | 0.625 |", "| n_pairs | 200 |", "python train.py --lam 0.3",
                  model_card.PAPER):
        assert words in body, words
    assert "note" not in body and "arxiv" not in text.lower()


def test_the_tiny_model_and_local_data_are_not_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/sft")
    (tmp_path / "pairs.jsonl").write_text("")
    for name in ("tiny", "runs/sft", "pairs.jsonl", "embedded", "/abs/path", "", None):
        assert model_card.hub_name(name) is None, name
    assert model_card.hub_name("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    text = model_card.model_card(flags(loss="dpo", model="runs/sft", data="pairs.jsonl"), stages=[("dpo", 3)])
    meta = front_matter(text)
    assert "base_model" not in meta and "datasets" not in meta
    assert "λ" not in text and "The prompt p" not in text  # DPO has neither
    assert "pairs kept" not in text and "held-out metrics" not in text and "## Command" not in text  # unknown


def test_unknown_fields_are_left_out():
    text = model_card.model_card({})
    meta = front_matter(text)
    assert meta == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["srpo"]}
    assert "None" not in text


def test_command_line_repeats_only_what_differs():
    defaults = flags()
    f = {**defaults, "beta": 0.2, "precompute_ref": True, "resume": True, "out_dir": "my runs"}
    assert model_card.command_line(f, defaults) == "python train.py --beta 0.2 --out_dir 'my runs' --precompute_ref"
    dpo = flags(loss="dpo")  # lam resolves to 0.0 for DPO: not a flag the user gave
    assert model_card.command_line(dpo, flags(loss="dpo")) == "python train.py"


def test_model_card_imports_the_standard_library_and_srpo_only():
    with open(os.path.join(ROOT, "training", "model_card.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"os", "re", "shlex", "srpo"}, names


def test_a_run_writes_the_card_into_final_and_sft(tmp_path):
    code, _ = run_train(tmp_path, "--loss", "sr-dpo", "--max_steps", "2", "--sft_steps", "2", "--beta", "0.2")
    assert code == 0
    final = (tmp_path / train.FINAL / "README.md").read_text(encoding="utf-8")
    meta = front_matter(final)
    assert meta["library_name"] == "transformers" and "base_model" not in meta and "datasets" not in meta
    assert meta["tags"] == ["srpo", "sft", "sr-dpo", "dpo"]
    for words in ("Sr-DPO, Eq. (12)", "- β: 0.2", "- λ: 0.5", "- pairs kept: 32", "2 of SFT, then 2 of Sr-DPO",
                  "| accuracy |", "--beta 0.2", "--sft_steps 2"):
        assert words in final, words
    sft = (tmp_path / train.SFT_DIR / "README.md").read_text(encoding="utf-8")
    assert front_matter(sft)["tags"] == ["srpo", "sft"] and "Sr-DPO, Eq." not in sft and "- steps: 2 of SFT" in sft


def test_the_card_counts_the_pairs_dropped_reading_and_tokenizing(tmp_path):
    import json

    good = [{"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(16)]
    dropped = [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "", "rejected": "b"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + dropped), encoding="utf-8")
    code, _ = run_train(tmp_path / "run", "--data", path, "--loss", "dpo", "--max_steps", "1")
    assert code == 0
    card = (tmp_path / "run" / train.FINAL / "README.md").read_text(encoding="utf-8")
    assert "- pairs kept: 16" in card and "- pairs dropped: 2" in card
