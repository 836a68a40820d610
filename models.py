"""models.py: loading, sharding and running the causal LMs; the process group and devices.

Owns: the tokenizer and model loaders (the built-in "tiny" model, or transformers without remote code),
dropout off, ``forward_logps`` (log π of each row), FSDP2 sharding, the process group, device and dtype
helpers, and rank-0 logging. Does not own: the losses (srpo.py), batches (data.py), what is measured
(metrics.py) or the training loop (train.py).
"""

import json
import os

import torch
import torch.distributed as dist

from data import SrpoError
from srpo import sequence_logps

TINY = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_RECORD = "srpo_run.json"  # in a model folder train.py exported (final/, sft/): its reference, the run's flags


class ModelError(SrpoError):
    """A model name or folder that cannot be loaded, or a model record that cannot be read, in one line."""


def check_model(name, flag="--model"):
    """ModelError unless `name` is "tiny", a transformers model folder, or a hub model whose config loads (from
    the cache when offline). Reads config.json only, so every model is checked before any work."""
    from transformers import AutoConfig

    if name == TINY:
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.listdir(path):
            raise ModelError(f"{flag} {name}: an empty folder, not a model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"{flag} {name}: not a transformers model folder (no config.json)")
    elif os.path.exists(path) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{flag} {name}: no such model folder")
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, damaged config: one line, not a traceback
        first = str(e).strip().splitlines()
        raise ModelError(f"{flag} {name}: cannot load its config ({type(e).__name__}: "
                         f"{first[0][:200] if first else ''})") from None


def model_record(reference, seed, run):
    """What a model folder train.py exports records: its reference π_ref (a folder as an absolute path; "tiny"
    with the seed it was built from) and the run's flags."""
    if reference != TINY and os.path.isdir(os.path.expanduser(reference)):
        reference = os.path.abspath(os.path.expanduser(reference))
    return {"ref_model": reference, "ref_seed": seed, "run": run}


def recorded_reference(model):
    """(π_ref, seed) recorded in a model folder train.py exported, or None for any other model."""
    path = os.path.join(os.path.expanduser(model), MODEL_RECORD)
    if model == TINY or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        return str(record["ref_model"]), int(record.get("ref_seed", 0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: cannot read the model's reference ({type(e).__name__}: {e}); "
                         f"give --ref_model") from None


def load_tokenizer(name=TINY):
    """The built-in byte-level tokenizer for "tiny", else a transformers tokenizer (no remote code)."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name == TINY:
        return ByT5Tokenizer()
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
    check_model(name)
    tokenizer = load_tokenizer(name)
    return load_model(name, tokenizer, dtype=DTYPES[dtype]).to(device), tokenizer
