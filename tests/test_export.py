"""export.py: a run's checkpoint written out as the model folder that the run exported."""

import torch
from helpers import run_train

import data
from training import checkpoint, models


def test_export_loads_and_matches_the_checkpoint(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    assert run_train(tmp_path, "--loss", "dpo", "--max_steps", "2")[0] == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / checkpoint.FINAL).eval()
    dcp_to_torch_save(str(tmp_path / checkpoint.CHECKPOINT), str(tmp_path / "ckpt.pt"))
    trained = models.load_model(models.TINY).eval()
    trained.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits)
    # The exported tokenizer, loaded as lm-evaluation-harness loads it, encodes a context as training did.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / checkpoint.FINAL)
    for prompt in ("Copy: ABDEF\n", "café 🙂 日本"):
        assert tokenizer(prompt).input_ids == data.encode_prompt(prompt, models.load_tokenizer())
