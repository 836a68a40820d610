"""training/models.py: loading and sharding the causal LMs.

Owns: the tokenizer and model loaders (the built-in "tiny" model, or transformers without remote code), the
checks of a model folder and of a tokenizer against a model, dropout off, FSDP2 sharding, and device and dtype
helpers.
Does not own: scoring sequences (scoring.py), writing model folders (export.py), the process group
(distributed.py), the losses (srpo.py), batches (data.py) or the training loop (train.py).
"""

import json
import os
import pickle

import torch
import torch.distributed as dist

from base.common import SrpoError

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


def check_compatible(name, tokenizer, max_length, flag="--model", policy_name=None):
    """ModelError unless model `name` takes the ids of `tokenizer` (the policy's) up to max_length tokens: its
    embedding covers every id, its positions (max_position_embeddings, GPT-2's n_positions) cover max_length,
    and, where policy_name is given (a reference), its own tokenizer maps the same text to the same ids."""
    config = source_config(name, tokenizer)
    rows, n = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", 0), len(tokenizer)
    if rows < n:
        raise ModelError(f"{flag} {name}: its embedding has {rows} rows, the tokenizer {n} ids; use a model of "
                         f"the policy's tokenizer")
    limit = position_limit(config)
    if limit and max_length > limit:
        raise ModelError(f"--max_length {max_length}: more than the {limit} positions of {flag} {name} "
                         f"(max_position_embeddings); use --max_length {limit} or less")
    if policy_name is not None and policy_name != name:
        own = load_tokenizer(name)
        if own.get_vocab() != tokenizer.get_vocab() or own.eos_token_id != tokenizer.eos_token_id:
            raise ModelError(f"{flag} {name}: its tokenizer ({len(own)} ids) is not the policy's ({n} ids, "
                             f"{policy_name}); both models must share one vocabulary")


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
    folder = os.path.expanduser(name)
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ModelError(f"{name}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the base "
                         "model's tokenizer into the folder, or name one with --tokenizer where the command has it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise _load_error(name, "tokenizer", e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# the files of which a tokenizer folder holds one (transformers otherwise builds an empty tokenizer from config.json)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")  # byte-level ones: the config alone


def _load_error(name, what, e):
    """A one-line ModelError for an exception raised by transformers loading a model or tokenizer."""
    text = " ".join(str(e).split())
    if "trust_remote_code" in text or "remote code" in text:
        return ModelError(f"{name}: its {what} needs remote code (trust_remote_code), which srpo never runs; "
                          "use a model whose architecture transformers has")
    if "weights_only" in text or "Weights only load failed" in text:
        return ModelError(f"{name}: refused its pickled weights (pytorch_model.bin holds code, not only tensors); "
                          "srpo loads weights only: use the model's .safetensors files")
    return ModelError(f"{name}: cannot load its {what} ({type(e).__name__}: {text[:200]})")


def _check_safetensors(name):
    """ModelError naming the first .safetensors file of a local model folder whose header or size is broken
    (a half-written or truncated copy); nothing for hub names."""
    folder = os.path.expanduser(name)
    if not os.path.isdir(folder):
        return
    from safetensors import safe_open

    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        path = os.path.join(folder, file)
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError is no OSError subclass
            raise ModelError(f"{path}: not a whole safetensors file ({' '.join(str(e).split())[:200]}); "
                             "copy or export it again") from None


def position_limit(config):
    """The most positions the model was built for (max_position_embeddings, GPT-2's n_positions or n_ctx),
    or None where its config names none."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tiny_config(tokenizer):
    """The config of the small Pythia-shaped model that "tiny" names."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=1024, rotary_pct=0.25,
        attention_dropout=0.0, hidden_dropout=0.0, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, dtype="float32")


def source_config(name=TINY, tokenizer=None):
    """The model's config as its source has it (dropout and use_cache included): what an export writes."""
    from transformers import AutoConfig

    if name == TINY:
        return tiny_config(tokenizer or load_tokenizer(TINY))
    return AutoConfig.from_pretrained(name, trust_remote_code=False)


def source_dtype(config):
    """The dtype of the source's weights, as its config records it (float32 where it does not)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(name=TINY, tokenizer=None, dtype=torch.float32, seed=0):
    """A causal LM with dropout off: a tiny Pythia-shaped model built from a config, or pretrained."""
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    if name == TINY:
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(source_config(TINY, tokenizer)).to(dtype)
    else:
        _check_safetensors(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=dtype,
                                                         trust_remote_code=False)
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            raise _load_error(name, "model", e) from None
    _dropout_off(model)
    model.config.use_cache = False
    return model.eval()


def load_sharded(name, tokenizer, device, dtype, mp_policy, seed=0, activation_checkpointing=False, adapt=None):
    """Shard first, then fill, in the style of torchtitan: every rank builds the skeleton on the meta
    device, shards it and allocates its own shards only; rank 0 alone reads the weights (or, for tiny,
    initialises them from the seed) and they are broadcast into the shards. Buffers that no state dict
    holds (rotary inv_freq) are broadcast from rank 0's copy too. Returns the sharded model, in eval mode.
    adapt: model -> model, applied to the skeleton before sharding and to rank 0's full copy (lora.adapter).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = source_config(name, tokenizer)
    model = _sharded_skeleton(config, device, dtype, mp_policy, activation_checkpointing, adapt)
    full = load_model(name, tokenizer, source_dtype(config), seed) if dist.get_rank() == 0 else None
    full = adapt(full) if adapt and full is not None else full  # LoRA: rank 0's adapter weights are broadcast
    with torch.no_grad():
        set_model_state_dict(model, full.state_dict() if full else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        buffers = dict(full.named_buffers()) if full else {}
        for key, buffer in model.named_buffers():
            if full:
                buffer.copy_(buffers[key])
            dist.broadcast(buffer, src=0)
    del full
    return model.eval()


def frozen_copy(model, dtype, mp_policy, via=None):
    """A sharded copy of a sharded model in `dtype`, made shard by shard (no rank holds the whole model).

    via: a dtype the weights are rounded through first, as saving them in it and loading them back would (π_ref
    taken in memory equals π_ref loaded from the SFT model exported in --save_dtype, as a resumed run loads it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    copy = _sharded_skeleton(model.config, model_device(model), dtype, mp_policy)
    with torch.no_grad():
        state = get_model_state_dict(model)
        set_model_state_dict(copy, {k: v.to(via) for k, v in state.items()} if via else state)
        buffers = dict(model.named_buffers())
        for key, buffer in copy.named_buffers():
            buffer.copy_(buffers[key])
    return copy.eval()


def _sharded_skeleton(config, device, dtype, mp_policy, activation_checkpointing=False, adapt=None):
    """The model built on the meta device (dropout off, no KV cache), `adapt`ed (LoRA), sharded, then given
    uninitialised storage for this rank's shards."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)  # the source's stays as it was, for the export
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _dropout_off(model)
    model = adapt(model) if adapt else model
    shard(model, device, mp_policy, activation_checkpointing)
    return model.to_empty(device=device)


def _dropout_off(model):
    """Dropout off everywhere, so both models are deterministic functions of their weights in every pass,
    train mode included: each float "*dropout*"/"*pdrop*" of the config (and its sub-configs), each
    nn.Dropout, and each such float a module copied from the config when it was built (the attention of
    Llama, Mistral, GPT-NeoX and OPT keeps config.attention_dropout as a plain attribute)."""
    def is_rate(key, value):
        return ("dropout" in key or "pdrop" in key) and isinstance(value, float)

    configs = [model.config] + [v for v in vars(model.config).values() if hasattr(v, "to_dict")]
    for config in configs:
        for key, value in list(vars(config).items()):
            if is_rate(key, value):
                setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if is_rate(key, value):
                setattr(module, key, 0.0)


def block_class(model):
    """The transformer block class: the type repeated in the model's largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    layers = max(lists, key=len)
    kinds = {type(m) for m in layers}
    if len(kinds) != 1:
        raise ValueError(f"cannot find one transformer block class in {type(model).__name__}: {kinds}")
    return kinds.pop()


def shard(model, device, mp_policy, activation_checkpointing=False):
    """FSDP2: fully_shard each transformer block, then the root, in place, with a mesh on `device`.

    The model may sit on `device` or on the meta device (``_sharded_skeleton``); it is not moved.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the mesh on `device`: left out, FSDP2 puts it on the machine's accelerator, even for --device cpu
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    block = block_class(model)
    one_rank = dist.get_world_size() == 1  # resharding a block after its forward frees nothing over one rank
    for module in model.modules():
        if isinstance(module, block):
            fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not one_rank)
    # the root's parameters (embeddings, head) are needed again at once by backward: kept gathered (torchtitan)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def mixed_precision(mode, device):
    """(FSDP2 policy, dtype of the frozen reference's weights) for train.py's --mixed_precision.

    bf16: parameters cast to bf16 for compute, gradients reduced in fp32; the policy keeps fp32 master
    weights, the frozen reference is held in bf16. fp32: everything in fp32. auto: bf16 on CUDA, else fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), torch.bfloat16
    return MixedPrecisionPolicy(), torch.float32


def model_device(model):
    """The device of the model's first parameter (its local shard under FSDP2)."""
    return next(model.parameters()).device
