"""models.py: loading, sharding, running and exporting the causal LMs.

Owns: the tokenizer and model loaders (the built-in "tiny" model, or transformers without remote code),
dropout off, ``forward_logps`` (log π of each row) and ``view_logps`` (of each sequence, in any of
data.collate's layouts), scored from the hidden states without the [rows, tokens, vocab] logits where the model
allows it (``fused_logps``), with the check of which layouts a model supports (``choose_packing``), FSDP2
sharding, and device and dtype helpers.
Does not own: writing model folders (export.py), the process group (distributed.py), the losses (srpo.py),
batches (data.py), what is measured (metrics.py) or the training loop (train.py).
"""

import json
import os
import pickle
import weakref

import torch
import torch.distributed as dist

import data
from common import SrpoError
from srpo import IGNORE_INDEX, hidden_token_logps, packed_sequence_logps, sequence_logps, sum_token_logps

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


# Score through srpo.hidden_token_logps (never the [R, T, V] logits) where a model passes its checks; False: always
# the full logits (benchmarks and tests compare the two).
FUSED_LOGPS = True
# Vocabularies below this keep the full logits: they are small there, and the full path's float rounding is the one
# the project's recorded results (README: 0.950 / 0.970, Spearman +0.854 of `python train.py`) were made with;
# fused and full differ at float32 rounding, which a 300-step run of the tiny model amplifies.
FUSED_MIN_VOCAB = 4096
# Config fields by which a transformers model changes its logits after the head (Gemma 2/3 softcapping, Granite's
# divisor, Cohere's factor, Falcon-H1's multiplier), with their neutral values: any other value keeps the full path.
POST_HEAD_FIELDS = {"final_logit_softcapping": (None, 0), "logit_softcapping": (None, 0), "logits_scaling": (None, 1),
                    "logit_scale": (None, 1), "lm_head_multiplier": (None, 1), "output_multiplier_scale": (None, 1)}
_FUSED = weakref.WeakKeyDictionary()  # model -> bool, decided on its first scoring
_SAID = set()  # fallback reasons logged already


def forward_logps(model, input_ids, attention_mask, labels, average=False):
    """log π(y|·) of each row. Shape: input_ids, attention_mask, labels [R, T]. Returns [R] float32."""
    return _logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels, None, None, average)


def _logps(model, inputs, labels, segment_ids, n_sequences, average):
    """log π(y|·) of each row (segment_ids None) or packed sequence, fused where the model allows it."""
    if fused_logps(model):
        per_token = _fused_token_logps(model, inputs, labels, segment_ids)
        return sum_token_logps(per_token, labels, segment_ids, n_sequences, average)
    logits = model(**inputs, use_cache=False).logits
    if segment_ids is None:
        return sequence_logps(logits, labels, average=average)
    return packed_sequence_logps(logits, labels, segment_ids, n_sequences, average)


def _fused_token_logps(model, inputs, labels, segment_ids, capture=None):
    """Per-token log-probs [R, T] float32 from one call of the model whose head, for that call, scores the hidden
    states with srpo.hidden_token_logps instead of making logits. The call goes through the root module, so FSDP2
    has gathered the head's weight (a root parameter) as for any forward, and its backward reduces the gradient.

    capture: a list, for the probe: the head runs as itself and its logits are appended (nothing fused).
    """
    head = model.get_output_embeddings()
    calls = []

    def head_forward(hidden):
        calls.append(tuple(hidden.shape))
        if capture is not None:
            capture.append(torch.nn.Linear.forward(head, hidden))
            return capture[-1]
        if hidden.shape[:2] != labels.shape:
            raise ValueError(f"the head got hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}")
        # [R, T, 1]: a shape no reshape to the vocabulary takes silently; a copy, not a view (FSDP2 hooks it)
        return hidden_token_logps(hidden, head.weight, labels, head.bias, segment_ids).unsqueeze(-1).clone()

    head.forward = head_forward
    try:
        out = model(**inputs, use_cache=False).logits
    finally:
        del head.forward
    if len(calls) != 1:
        raise ValueError(f"the head ran {len(calls)} times in one forward")
    return out if capture is not None else out.squeeze(-1).float()


def fused_logps(model):
    """Whether `model` is scored through srpo.hidden_token_logps (decided once per model, logged when not).

    Yes when: FUSED_LOGPS; a vocabulary of FUSED_MIN_VOCAB or more; the output embedding is a plain
    torch.nn.Linear; no config field of POST_HEAD_FIELDS has a non-neutral value; and a probe batch shows
    that the model returns its head's output unchanged (no
    softcapping or scaling under any name) and that the fused log-probs match the full-logits ones. Under
    torch.distributed every rank must score its first batch alike (the probe runs FSDP forwards); ranks agree.
    """
    if not FUSED_LOGPS or model.config.vocab_size < FUSED_MIN_VOCAB:
        return False
    if model not in _FUSED:
        reason = _fused_refusal(model)
        ok = torch.tensor([reason is None], dtype=torch.int32, device=model_device(model))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            reason = reason or (None if ok.item() else "another rank's probe failed")
        _FUSED[model] = reason is None
        if reason and reason not in _SAID:
            _SAID.add(reason)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"log-probs: {type(model).__name__} scored through the full [rows, tokens, vocab] logits, not "
                      f"the fused head: {reason}", flush=True)
    return _FUSED[model]


def _fused_refusal(model):
    """Why `model` cannot be scored fused, in words, or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "it has no output embedding (get_output_embeddings)"
    if type(head) is not torch.nn.Linear:
        return f"its output embedding is a {type(head).__name__}, not a plain torch.nn.Linear"
    configs = [model.config, model.config.get_text_config()]
    for key, neutral in POST_HEAD_FIELDS.items():
        for config in configs:
            value = getattr(config, key, None)
            if value not in neutral:
                return f"config.{key} = {value} changes the logits after the head"
    return _probe_refusal(model)


@torch.no_grad()
def _probe_refusal(model):
    """The probe of fused_logps: None, or what differed."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 1000), (2, 12), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": mask}
    try:
        captured = []
        logits = _fused_token_logps(model, inputs, labels, None, capture=captured)
        if not torch.equal(logits, captured[0].to(logits.dtype)):
            return "the model changes its head's logits before returning them (softcapping or scaling)"
        fused = sum_token_logps(_fused_token_logps(model, inputs, labels, None), labels)
    except (RuntimeError, ValueError, TypeError) as err:
        return f"the fused head failed on a probe batch ({str(err).splitlines()[0][:200]})"
    full = sequence_logps(logits, labels)
    err = (fused - full).abs().max().item()
    if not err <= 1e-2 * (1 + full.abs().max().item()):
        return f"fused and full log-probs differ by {err:.3g} on a probe batch"
    return None


def _model_mask(model, mask):
    """A layout's 4D bool mask as the model's attention takes it: bool for sdpa, additive float for eager."""
    if mask is None or mask.dim() != 4 or getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


def view_logps(model, batch, n_sequences, prefix="", average=False):
    """log π(y|·) of each sequence of one view of a ``data.collate`` batch, in any of its layouts.

    Shape: batch[prefix + ...] as ``data.collate`` makes them; n_sequences int S (2B, or B for chosen_only).
    Returns [S] float32, sequence s as numbered by collate (chosen first).
    """
    if prefix + "segment_ids" not in batch:
        return forward_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                             batch[prefix + "labels"], average)
    # packed: no mask, positions restarting per sequence (transformers keeps the sequences apart);
    # shared: the 4D mask of packing.shared_attention_mask.
    inputs = {"input_ids": batch[prefix + "input_ids"], "position_ids": batch[prefix + "position_ids"],
              "attention_mask": _model_mask(model, batch.get(prefix + "attention_mask"))}
    return _logps(model, inputs, batch[prefix + "labels"], batch[prefix + "segment_ids"], n_sequences, average)


def _probe_examples(vocab):
    """Two pairs of deterministic tokens: a long prompt and responses that differ from their first token."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (64,), generator=gen).tolist()
    out = []
    for i, (n_prompt, n_chosen, n_rejected) in enumerate([(20, 6, 9), (5, 12, 4)]):
        prompt, rest = ids[32 * i:32 * i + n_prompt], ids[32 * i + n_prompt:]
        chosen, rejected = rest[:n_chosen], rest[n_chosen:n_chosen + n_rejected]
        mask = [IGNORE_INDEX] * n_prompt
        out.append({"index": i, "chosen_ids": prompt + chosen, "chosen_labels": mask + chosen,
                    "rejected_ids": prompt + rejected, "rejected_labels": mask + rejected,
                    "score_chosen": 0.0, "score_rejected": 0.0})
    return out


@torch.no_grad()
def supported_packings(model, device):
    """The layouts of data.PACKINGS whose log-probs match the padded ones on this model, checked, not assumed.

    A layout passes when its log-probs are much closer to the padded ones than to what a model computes when
    the sequences of a row are not kept apart (the same row under a plain causal mask): max error <= 0.1 x
    that leak. Returns a tuple of layout names, "padded" always first.
    """
    examples = _probe_examples(model.config.vocab_size)
    padded = view_logps(model, to_device(data.collate(examples, 0), device), 4)
    ok = ["padded"]
    for packing in data.PACKINGS[1:]:
        batch = to_device(data.collate(examples, 0, packing, 64), device)
        leaky = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
        try:
            err = (view_logps(model, batch, 4) - padded).abs().max()
        except (RuntimeError, ValueError, TypeError):  # an attention that cannot take this layout's inputs
            reset_fsdp(model)  # else the root's parameters stay unsharded: never trained, never checkpointed
            continue
        leak = (view_logps(model, leaky, 4) - padded).abs().max()
        if err <= 0.1 * leak:
            ok.append(packing)
    return tuple(ok)


def reset_fsdp(model):
    """FSDP2's state after a forward that raised midway, reset: every module back to idle, its parameters sharded.

    Without it, the root stays "in forward" with its parameters (embeddings, final norm, head) gathered as plain
    tensors; an optimizer built then holds those, which never update, and a checkpoint fails (KeyError: 0)."""
    if hasattr(model, "reset_iter_state"):  # torch >= 2.13
        model.reset_iter_state()
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for module in model.modules():  # older torch: the same, by hand
        if hasattr(module, "reshard"):
            state = module._get_fsdp_state()
            state._training_state = TrainingState.IDLE
            for group in state._fsdp_param_groups:
                group._training_state = TrainingState.IDLE
            module.reshard()


def choose_packing(requested, models, device, say=None):
    """The batch layout to train and score with: `requested` (or, for "auto", the fastest of
    data.PACKINGS) where every model supports it, else the next slower supported one, with a one-line note.

    requested: "auto" or one of data.PACKINGS. models: the live models (policy, reference). Under
    torch.distributed every rank must call it (the probe runs FSDP forwards); ranks agree on the minimum.
    """
    each = [supported_packings(m, device) for m in models]
    for module in (m for model in models for m in model.modules()):
        if hasattr(module, "reshard"):  # FSDP2 leaves the root unsharded after a forward without backward;
            module.reshard()            # an optimizer built then would hold the wrong parameters
    flags = torch.tensor([all(p in s for s in each) for p in data.PACKINGS], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    wanted = len(data.PACKINGS) - 1 if requested == "auto" else data.PACKINGS.index(requested)
    chosen = data.PACKINGS[max(i for i in range(wanted + 1) if flags[i])]  # "padded" always passes
    if say and chosen != data.PACKINGS[wanted]:
        say(f"--packing {requested}: this model does not give the padded log-probs with "
            f"{data.PACKINGS[wanted]} rows (checked on a probe batch); using {chosen}")
    return chosen


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


def to_device(batch, device):
    """A collated batch's tensors moved to device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_device(model):
    """The device of the model's first parameter (its local shard under FSDP2)."""
    return next(model.parameters()).device
