"""models.py: loading, sharding and running the causal LMs; the process group and devices.

Owns: the tokenizer and model loaders (the built-in "tiny" model, or transformers without remote code),
dropout off, ``forward_logps`` (log π of each row), FSDP2 sharding, the process group, device and dtype
helpers, and rank-0 logging. Does not own: the losses (srpo.py), batches (data.py), what is measured
(metrics.py) or the training loop (train.py).
"""

import os

import torch
import torch.distributed as dist

from srpo import sequence_logps

TINY = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_tokenizer():
    """The built-in byte-level tokenizer: ByT5's ids, with no special token added on a default encode.

    Byte b is id b + 3; <pad> 0, </s> 1, <unk> 2 and ByT5's 125 <extra_id_i> follow (384 ids). Unlike
    ByT5Tokenizer, tokenizer(text).input_ids does not end in </s>, so the exported final/ scores a
    context as lm-evaluation-harness reads it; training appends EOS to responses itself (data.py).
    Invalid UTF-8 decodes to U+FFFD (ByT5 drops it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials, extra = ["<pad>", "</s>", "<unk>"], [f"<extra_id_{i}>" for i in range(125)]
    chars = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(specials + [chars[b] for b in range(256)] + extra)}
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, special=True) for t in specials]
                            + [AddedToken(t, special=True) for t in extra])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=extra)


def load_tokenizer(name=TINY):
    """The built-in byte-level tokenizer for "tiny", else a transformers tokenizer (no remote code)."""
    from transformers import AutoTokenizer

    if name == TINY:
        return tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    _dropout_off(model)
    model.config.use_cache = False
    return model.eval()


def _dropout_off(model):
    """Dropout off everywhere: both models must be deterministic functions of their weights."""
    for key in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def forward_logps(model, input_ids, attention_mask, labels, average=False):
    """log π(y|·) of each row. Shape: input_ids, attention_mask, labels [R, T]. Returns [R] float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, labels, average=average)


def block_class(model):
    """The transformer block class: the type repeated in the model's largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    layers = max(lists, key=len)
    kinds = {type(m) for m in layers}
    if len(kinds) != 1:
        raise ValueError(f"cannot find one transformer block class in {type(model).__name__}: {kinds}")
    return kinds.pop()


def shard(model, device, activation_checkpointing=False):
    """FSDP2: fully_shard each transformer block, then the root (bf16 compute, fp32 reduce on CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    # the mesh on `device`: left out, FSDP2 puts it on the machine's accelerator, even for --device cpu
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    block = block_class(model)
    for module in model.modules():
        if isinstance(module, block):
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def setup_distributed(device="auto"):
    """A process group under torchrun (RANK set), else one of size 1. Returns (rank, world, device)."""
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "cpu"
    cuda = device == "cuda"
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(values, device):
    """Sum a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def to_device(batch, device):
    """A collated batch's tensors moved to device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def log(rank, *args):
    """print on rank 0 only, flushed."""
    if rank == 0:
        print(*args, flush=True)


def model_device(model):
    """The device of the model's first parameter (its local shard under FSDP2)."""
    return next(model.parameters()).device


def frozen_dtype(device):
    """The dtype of a model that is never updated (π_ref): bf16 on CUDA, else float32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_lm(name, dtype="float32", device="cpu"):
    """(model, tokenizer) of a name, the model in DTYPES[dtype] on device."""
    tokenizer = load_tokenizer(name)
    return load_model(name, tokenizer, dtype=DTYPES[dtype]).to(device), tokenizer
