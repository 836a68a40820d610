"""training/lora.py: LoRA adapters (peft) on the policy; π_ref as the same model with its adapters off; merged export.

Owns: the one-line error when peft is missing (``require_peft``), the default target modules of each model
family (``default_targets``), adding adapters that start at zero so the model's output is unchanged
(``add_adapters``, or ``adapter(...)`` as the hook that models.load_sharded applies to every rank's skeleton
and to rank 0's full copy), the reference view (``reference_view``, ``Reference``: the policy's base with
adapters and adapter dropout off; ``adapters_off`` skips them by peft's flag alone, which FSDP2 needs),
deterministic no-grad passes (``eval_mode``), the trainable parameters (``trainable``, ``reshard``), and
turning a gathered full state dict into a plain merged transformers state dict and a peft adapter folder
(``merged_state``, ``adapter_state``, ``save_adapter``; ``merge`` for an unsharded model). Does not own:
loading, sharding and export (models.py), each stage's models or the loop (train.py), checkpoints
(checkpoint.py). peft is imported
only inside functions: without --lora_r it is never needed.

    adapt = adapter(r, alpha, dropout, targets, seed)   model -> peft model (B = 0: the output is unchanged)
    with reference_view(policy): ...                      π_ref passes: adapters skipped, adapter dropout off
    with eval_mode(policy): ...                           policy no-grad passes (Δπ): adapter dropout off
    reshard(policy); trainable(policy)                    FSDP2: reshard before building the optimizer on these
    ref = Reference(policy)                               the same, as a module view_logps / pair_logps can take
    merged_state(full_state, peft_config) -> plain state  W + (α/r)·B·A; the keys of the base model
    save_adapter(full_state, peft_config, folder)         PeftModel.from_pretrained(base, folder) loads it
"""

import contextlib
import json
import math
import os

import torch

from base.common import SrpoError

ADAPTER_DIR = "adapter"  # beside final/'s merged weights: final/adapter
ADAPTER_NAME = "default"  # peft's name of the one adapter
# The attention and MLP projections of each family (config.model_type); others: every linear layer but the head.
FAMILY_TARGETS = {
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    **{family: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
                      "olmo2", "smollm3")},
}
ALL_LINEAR = "all-linear"


class LoraError(SrpoError):
    """A LoRA flag that cannot work, or peft missing, in one line."""


def require_peft(flag="--lora_r"):
    """The peft module, or a one-line LoraError with the pip command."""
    try:
        import peft
    except ImportError:
        raise LoraError(f"{flag} needs the peft package: pip install peft") from None
    return peft


def default_targets(model_or_config):
    """The attention and MLP projections of the model's family (FAMILY_TARGETS), else "all-linear"."""
    config = getattr(model_or_config, "config", model_or_config)
    return list(FAMILY_TARGETS.get(getattr(config, "model_type", None), ())) or ALL_LINEAR


def parse_targets(text, model_or_config):
    """--lora_targets: "" (the family's default), "all-linear", or comma-separated module names."""
    text = (text or "").strip()
    if not text:
        return default_targets(model_or_config)
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LoraError(f"--lora_targets {text!r}: expected module names separated by commas, or all-linear")
    return names


def lora_config(r, alpha=None, dropout=0.0, targets=ALL_LINEAR):
    """peft's LoraConfig: rank r, scaling alpha / r (alpha unset or 0: 2·r), B initialised to zero."""
    peft = require_peft()
    if r < 1:
        raise LoraError(f"--lora_r {r}: must be at least 1 (0: no LoRA)")
    if not 0 <= dropout < 1:
        raise LoraError(f"--lora_dropout {dropout}: must be in [0, 1)")
    return peft.LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=targets,
                           bias="none", task_type="CAUSAL_LM", init_lora_weights=True)


def add_adapters(model, r, alpha=None, dropout=0.0, targets=None, seed=0):
    """`model` (a transformers causal LM) wrapped in a peft model with fresh adapters: A random from `seed`
    (the global RNG is left as it was), B zero, so the output equals the base's. The base is frozen.
    A model on the meta device stays there (``models._sharded_skeleton``; the weights come later)."""
    peft = require_peft()
    config = lora_config(r, alpha, dropout, targets if targets is not None else default_targets(model))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module that the model does not have
        raise LoraError(f"--lora_targets: {str(e).strip().splitlines()[0][:300]}") from None
    wrapped.config.use_cache = False
    return wrapped


def adapter(r, alpha=None, dropout=0.0, targets="", seed=0):
    """The hook that models.load_sharded applies to each rank's meta skeleton (before sharding) and to rank
    0's full copy (whose adapter weights are then broadcast): model -> ``add_adapters``. None when r is 0."""
    if not r:
        return None
    require_peft()
    return lambda model: add_adapters(model, r, alpha, dropout, parse_targets(targets, model), seed)


def is_lora(model):
    """Whether `model` carries peft adapters (sharded or not)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def reshard(model):
    """Every FSDP2 module of `model` resharded. A forward without backward leaves FSDP2's root unsharded (and,
    over one rank, the blocks too): an optimizer built then would hold the wrong parameters. The reference
    passes of a LoRA run are the policy's own forwards, so the policy is resharded before its optimizer is built."""
    for module in model.modules():
        if hasattr(module, "reshard"):
            module.reshard()


def trainable(model):
    """The parameters the optimizer updates: those with requires_grad (with LoRA, the adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block, then back in the mode it had: adapter dropout (the only dropout
    models._dropout_off leaves) off, so no-grad passes such as Δπ stay deterministic functions of the weights."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextlib.contextmanager
def adapters_off(model):
    """The adapters of `model` skipped in its forwards for the block; nothing else changes.

    Not peft's disable_adapter(): that also sets requires_grad False on the adapters and True again on exit,
    and under FSDP2 it reaches whichever parameters the module holds at that moment (the unsharded ones
    after a forward without backward), so the sharded adapters that the optimizer is given can stay frozen.
    This sets only the flag that each peft layer's forward reads (BaseTunerLayer._disable_adapters).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, w in zip(layers, was):
            m._disable_adapters = w


@contextlib.contextmanager
def reference_view(model):
    """π_ref passes of a LoRA policy: its base with the adapters skipped (``adapters_off``), in eval mode,
    without grad. A model without adapters is used as it is (no grad, eval mode)."""
    off = adapters_off(model) if is_lora(model) else contextlib.nullcontext()
    with torch.no_grad(), eval_mode(model), off:
        yield model


class Reference(torch.nn.Module):
    """π_ref as a module: the LoRA policy with its adapters disabled (``reference_view``) on every call.

    It holds no weights of its own: the policy's base is the reference, so it costs no memory. What the
    loop asks of a reference (``view_logps``, ``scoring.pair_logps``, ``scoring.choose_packing``) works on it:
    calls, .config, .get_output_embeddings() (the fused head), .parameters() (for the device) and .modules()
    (for resharding). Never call
    requires_grad_(False) on it: that would freeze the policy's adapters.
    """

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def get_output_embeddings(self):
        """The policy's head (not a LoRA target by default), which scoring.fused_logps scores through."""
        return self.policy.get_output_embeddings()

    def forward(self, *args, **kwargs):
        with reference_view(self.policy):
            return self.policy(*args, **kwargs)


# ----------------------------------------------------------------------------- export


def _peft_config(model_or_config):
    """The adapter's LoraConfig, from a peft model or the config itself."""
    if hasattr(model_or_config, "peft_config"):
        return model_or_config.peft_config[ADAPTER_NAME]
    return model_or_config


def _base_key(key):
    """A peft model's state-dict key as the base model's: 'base_model.model.' and '.base_layer' dropped."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


def merged_state(state, peft_config):
    """A peft model's full state dict (gathered, e.g. on rank 0's CPU) as a plain transformers state dict with
    the adapters merged: W + scaling · B·A (transposed for Conv1D's fan_in_fan_out), in W's dtype, computed in
    float32. peft_config: the LoraConfig (or the peft model)."""
    config = _peft_config(peft_config)
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout." in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[:-len("base_layer.weight")]
            a = state.get(f"{prefix}lora_A.{ADAPTER_NAME}.weight")
            b = state.get(f"{prefix}lora_B.{ADAPTER_NAME}.weight")
            if a is not None and b is not None:
                delta = (b.float() @ a.float()) * scaling
                value = (value.float() + (delta.T if config.fan_in_fan_out else delta)).to(value.dtype)
        out[_base_key(key)] = value
    return out


def adapter_state(state):
    """The adapter's weights from a peft model's full state dict, keyed as peft saves them (no adapter name)."""
    return {key.replace(f".{ADAPTER_NAME}.", "."): value for key, value in state.items()
            if ".lora_A." in key or ".lora_B." in key}


def save_adapter(state, peft_config, folder, base_model=None):
    """The adapter in peft's folder format (adapter_config.json, adapter_model.safetensors), from a full state
    dict: ``PeftModel.from_pretrained(base, folder)`` loads it. base_model: recorded as the config's
    base_model_name_or_path (the model the adapters were added to)."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(_peft_config(peft_config))
    if base_model is not None:
        config.base_model_name_or_path = base_model
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state(state).items()},
              os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def merge(model):
    """An unsharded peft model as a plain transformers model with the adapters merged into its weights (peft's
    merge_and_unload; the peft model is consumed)."""
    return model.merge_and_unload()


def describe(model):
    """'LoRA r R, alpha A, dropout D on N modules: X of Y parameters trainable (P%)' for the progress log."""
    config = _peft_config(model)
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in trainable(model))
    modules = sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) \
        else config.target_modules
    return (f"LoRA r {config.r}, alpha {config.lora_alpha}, dropout {config.lora_dropout} on {json.dumps(modules)}: "
            f"{train:,} of {total:,} parameters trainable ({100 * train / max(total, 1):.2f}%)")
