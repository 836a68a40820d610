"""training/models.py: the tiny model's tokenizer, and sharding that keeps a CPU model on the CPU."""

import torch

from training import distributed, models

TEXTS = ["Copy: ABDEF\n", "café 日本 🙂  x</s>y <pad> z", "", "a  b\t\n", "<extra_id_3>hi", " </s> "]


def test_tiny_tokenizer_is_byt5_without_the_appended_eos():
    from transformers import ByT5Tokenizer

    tiny, byt5 = models.load_tokenizer(models.TINY), ByT5Tokenizer()
    assert len(tiny) == len(byt5) and (tiny.pad_token_id, tiny.eos_token_id, tiny.bos_token_id) == (0, 1, None)
    for text in TEXTS:
        assert tiny(text).input_ids == tiny.encode(text) == byt5.encode(text, add_special_tokens=False)  # no EOS
        assert tiny.encode(text, split_special_tokens=True) == [b + 3 for b in text.encode()]
        for literal in (True, False):  # literal: "</s>" is text (data.py); else ByT5's special tokens are parsed
            ids = tiny.encode(text, add_special_tokens=False, split_special_tokens=literal)
            assert ids == byt5.encode(text, add_special_tokens=False, split_special_tokens=literal)
            assert tiny.decode(ids) == byt5.decode(ids)
            assert tiny.decode(ids, skip_special_tokens=True) == byt5.decode(ids, skip_special_tokens=True)
    assert byt5("a").input_ids == [100, byt5.eos_token_id] and tiny("a").input_ids == [100]


def test_shard_keeps_a_cpu_model_on_the_cpu_of_a_gpu_machine(monkeypatch):
    # FSDP2's default mesh is on the machine's accelerator: --device cpu on a GPU machine moved the model to cuda
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    rank, world, device = distributed.setup_distributed("cpu")
    try:
        model = models.load_sharded(models.TINY, None, device, torch.float32, models.mixed_precision("auto", device)[0])
        assert {p.device_mesh.device_type for p in model.parameters()} == {"cpu"}
        assert {p.to_local().device.type for p in model.parameters()} == {"cpu"}
    finally:
        models.dist.destroy_process_group()
