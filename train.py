"""train.py: SFT, DPO, IPO, Sr-DPO and Sr-IPO in one hand-written FSDP2 loop (work in progress)."""

import torch

from srpo import sequence_logps

TINY = "tiny"


def load_tokenizer(name=TINY):
    """The built-in byte-level tokenizer for "tiny", else a transformers tokenizer (no remote code)."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name == TINY:
        return ByT5Tokenizer()
    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)


def load_model(name=TINY, tokenizer=None, dtype=torch.float32, seed=0):
    """A causal LM with dropout off: a tiny Pythia-shaped model built from a config, or pretrained."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    if name == TINY:
        tokenizer = tokenizer or load_tokenizer(TINY)
        config = GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=1024, rotary_pct=0.25,
            attention_dropout=0.0, hidden_dropout=0.0, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=False)
    model.config.use_cache = False
    return model.eval()


def forward_logps(model, input_ids, attention_mask, labels, average=False):
    """log π(y|·) of each row. Shape: input_ids, attention_mask, labels [R, T]. Returns [R] float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, labels, average=average)
