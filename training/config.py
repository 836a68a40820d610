"""training/config.py: train.py's flags, one Config dataclass: each field's default, --help text and choices,
and the checks.

Owns: Config, parse_config (flags -> Config), validate (one-line ConfigErrors for values and combinations that
would fail later), resolved (the defaults that depend on the model, filled in) and command_flags (the flags
that give a resolved config again). Every default value shared
with another command comes from base/defaults.py. Does not own: what the flags do (train.py).
"""

import dataclasses
import math
import os
import typing

import torch

import data
from base import common, defaults
from base.common import ConfigError
from srpo import LOSSES, REFINE_PROMPTS, SELF_REFINED
from training import lora
from training.distributed import environment_report
from training.models import DTYPES, TINY

PACKING_CHOICES = ("auto", *data.PACKINGS)  # --packing: data.PACKINGS or "auto" (scoring.choose_packing)
LR_SCHEDULERS = ("constant", "linear", "cosine")  # --lr_scheduler, get_lr's kind
OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # --optimizer
RESUMES = ("", "yes", "auto")  # --resume: "" not given, "yes" bare --resume (must resume), "auto" (--resume auto)


def _sci(x):
    """5e-07 as 5e-7, for --help."""
    return f"{x:.0e}".replace("e-0", "e-")


def _flag(default, help_text, choices=None):
    """A Config field: its default, its --help text and, where it takes one of a few values, the choices."""
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


@dataclasses.dataclass
class Config:
    loss: str = _flag("sr-dpo", "the loss of the alignment stage (sft: SFT only)", ("sft", *LOSSES))
    beta: float = _flag(defaults.BETA, f"β of Eqs. (4)-(14); the paper's {defaults.BETA}")
    lam: float | None = _flag(None, f"λ of Eq. (12) / Algorithm 2; Sr losses only; unset: {defaults.LAM}, "
                                       "from the paper's grid")
    refine: str = _flag("prompt", "prompt: Δπ under p ⊕ x, Eq. (11); naive: Δ_naive under x, Eq. (10) (Table 4)",
                        ("prompt", "naive"))
    refine_prompt: str = _flag(defaults.REFINE_PROMPT, "the prompt p: 100 (the paper's), 10 (its [1, 10] scale, "
                                                       "Table 4); controls: neutral (a weather text of p's length), "
                                                       "opposite (p asking for a rating of 1)", tuple(REFINE_PROMPTS))
    model: str = _flag(TINY, 'transformers name or local folder; "tiny": a small Pythia-shaped model from a config')
    ref_model: str = _flag("", "reference π_ref; unset: the starting policy (after the SFT stage, if any)")
    data: str = _flag("embedded", '"embedded", a .jsonl/.jsonl.gz/.json file, or a hub dataset name')
    eval_data: str = _flag("", "held-out pairs; unset: the test split of --data")
    max_pairs: int = _flag(0, "train on the first N pairs of --data only (0: all)")
    chat_template_kwargs: str = _flag("", 'JSON object passed to every apply_chat_template, e.g. '
                                          '\'{"enable_thinking": false}\' (chat prompts, a tokenizer with a template)')
    system_prompt: str = _flag("", "a system message put first in chat prompts that have none (chat template only)")
    out_dir: str = _flag("out", "metrics.jsonl, checkpoint/, sft/, final/")
    sft_steps: int | None = _flag(None, f"SFT steps on the chosen responses before alignment; unset: "
                                        f"{defaults.TINY_SFT_STEPS} for tiny, else 0")
    sft_quality_q: float = _flag(0.0, "--data embedded only: this share of the SFT pairs ask for a usefulness rating "
                                      "R in p's words, answered to match (embedded.embedded_sft_pairs)")
    lr: float | None = _flag(None, f"peak learning rate; unset: the paper's {_sci(defaults.LR)}, or "
                                   f"{_sci(defaults.TINY_LR)} for the randomly initialised tiny model")
    warmup_steps: int | None = _flag(None, f"linear warm-up of the learning rate, in steps (each stage); unset: "
                                           f"{defaults.WARMUP_STEPS} as the DPO reference code, or "
                                           f"{defaults.TINY_WARMUP_STEPS} for tiny")
    lr_scheduler: str = _flag("constant", "after the warm-up: constant (the paper's), or linear or cosine decay that "
                                          "reaches 0 one step after the stage's last (train.get_lr)", LR_SCHEDULERS)
    batch_size: int = _flag(64, "global pairs per optimizer step, split over ranks and micro-batches")
    micro_batch_size: int = _flag(0, "pairs per forward pass on one rank; 0: the rank's whole share (no "
                                     "accumulation)")
    max_length: int = _flag(defaults.MAX_LENGTH, "tokens per sequence, the longer p ⊕ x view included")
    truncate_x_only: bool = _flag(False, "DPO/IPO/SFT: fit --max_length to x alone, not to p ⊕ x as the Sr losses "
                                         "do (then the losses see different x-view tokens)")
    packing: str = _flag("auto", "batch layout: padded; packed (sequences back to back, no padding); shared (also "
                                 "each pair's prompt once); auto: the fastest that gives this model the padded "
                                 "log-probs (checked at start)", PACKING_CHOICES)
    pack_length: int = _flag(0, "tokens per packed row; 0: --max_length")
    epochs: float = _flag(1.0, "alignment epochs over --data ...")
    max_steps: int = _flag(-1, "... or this many alignment steps, whichever ends first (-1: no limit)")
    max_grad_norm: float = _flag(10.0, "gradient-norm clipping (> 0; inf: no clipping)")
    optimizer: str = _flag("rmsprop", "rmsprop (the paper's), adamw or sgd", tuple(OPTIMIZERS))
    precompute_ref: bool = _flag(False, "one pass of the reference model before training, then free it")
    activation_checkpointing: bool = _flag(False, "recompute block activations in backward to save memory")
    average_logps: bool = _flag(False, "per-token mean log-probs instead of the paper's sums (Appendix C)")
    eval_every: int = _flag(25, "held-out evaluation every this many steps (0: only at the end)")
    eval_pairs: int = _flag(200, "held-out pairs evaluated (0: all)")
    save_every: int = _flag(50, "checkpoint every this many steps (0: only on SIGTERM and at stage ends)")
    resume: str = _flag("", "continue from out_dir/checkpoint (its run-defining flags must be the same); --resume "
                            "auto: continue if out_dir has a checkpoint, else start; a finished run exits 0",
                        RESUMES)
    overwrite: bool = _flag(False, "start over in an out_dir that holds a run (its checkpoint, sft/ and final/ go)")
    resume_force: bool = _flag(False, "with --resume: continue even where the run-defining flags differ")
    seed: int = _flag(0, "data order and tiny-model initialisation")
    device: str = _flag("auto", "auto: cuda when this machine has a GPU for every local rank, else cpu",
                        ("auto", "cuda", "cpu"))
    collective_timeout: float = _flag(defaults.COLLECTIVE_TIMEOUT, "seconds a collective (FSDP's gathers, a step's "
                                      "sums) waits for every rank; then the run ends in one line, its checkpoint "
                                      "kept (a rank hung or stopped; docs/distributed.md)")
    mixed_precision: str = _flag("auto", "bf16: bf16 compute, fp32 gradient reduction and master weights; fp32; "
                                         "auto: bf16 on CUDA, else fp32", ("auto", "bf16", "fp32"))
    save_dtype: str = _flag("auto", "dtype of sft/ and final/; auto: that of the model loaded", ("auto", *DTYPES))
    log_every: int = _flag(1, "progress line every this many steps")
    lora_r: int = _flag(0, "LoRA: train rank-r adapters on a frozen base, π_ref the base with adapters off (0: "
                           "full fine-tuning; needs peft; docs/training.md)")
    lora_alpha: float = _flag(0.0, "LoRA scaling alpha / r; 0: 2·r")
    lora_dropout: float = _flag(0.0, "dropout on the adapters' input (training passes only)")
    lora_targets: str = _flag("", "modules given adapters, comma-separated, or all-linear; unset: the attention and "
                                  "MLP projections of known families (lora.FAMILY_TARGETS), else all-linear")
    report_to: str = _flag("none", "also send every metrics.jsonl value to TensorBoard or W&B (rank 0; "
                                   "docs/tracking.md)", ("none", "tensorboard", "wandb"))


def _field_kind(f):
    """A Config field's value type: `float | None` -> float."""
    return f.type if isinstance(f.type, type) else typing.get_args(f.type)[0]


def read_recipe(path):
    """The flags of a recipe file (YAML: `flag: value` per line, the flags' names without --) as {field: value}.

    Each value is checked against its field's type here (YAML reads 5e-7 as a string, `yes` as true); the choices
    and combinations are checked by ``validate`` with the command line's flags. Raises ConfigError in one line
    naming the file, line and key: an unknown key, a value of the wrong type, a file that is no mapping.
    """
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"--config {path}: reading a recipe needs PyYAML (pip install pyyaml)") from None
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            text = fh.read()
        root, values = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)  # lines, then values
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read the file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"--config {path}{f', line {mark.line + 1}' if mark else ''}: not YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode) or not isinstance(values, dict):
        raise ConfigError(f"--config {path}, line {root.start_mark.line + 1}: expected `flag: value` lines")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    flags = {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        where = f"--config {path}, line {line}, {key}"
        if key not in fields:
            raise ConfigError(f"--config {path}, line {line}: unknown key '{key}' (the keys are train.py's flags "
                              f"without --; python train.py --help lists them)")
        if key in flags:
            raise ConfigError(f"{where}: given twice")
        if not isinstance(value_node, yaml.ScalarNode):
            raise ConfigError(f"{where}: expected one value, not a list or mapping")
        flags[key] = _recipe_value(fields[key], values[key], where)
    return flags


def _recipe_value(f, value, where):
    """A recipe's value as its field's type: null for the fields that may be unset, numbers for str fields
    (refine_prompt: 100), `resume: true` as bare --resume; ConfigError naming `where` for anything else."""
    kind = _field_kind(f)
    if value is None and f.default is None:
        return None
    if f.name == "resume" and isinstance(value, bool):
        return "yes" if value else ""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if kind in (int, float) and not isinstance(value, bool):
        try:
            number = kind(value)
        except (TypeError, ValueError):
            pass
        else:
            if kind is float or number == value:  # 2.5 is no int
                return number
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    raise ConfigError(f"{where}: {value!r} is not {expected}")


def parse_config(argv=None):
    """Config from --flags, and from a recipe file where --config FILE is given (``read_recipe``; the command
    line's flags override the file's): one flag per field, its metadata as help and choices. Raises SystemExit on
    bad flags and recipes."""
    import argparse

    parser = argparse.ArgumentParser(description="train.py: SFT, DPO, IPO, Sr-DPO and Sr-IPO in one hand-written FSDP2 "
                                                 "loop.")
    parser.add_argument("--env", action="store_true", help="print the versions, devices and backends (for a bug "
                                                           "report) and exit")
    parser.add_argument("--config", default="", help="a recipe: a YAML file of these flags, `flag: value` per line "
                                                      "(recipes/); flags given on the command line override it")
    for f in dataclasses.fields(Config):
        kind = _field_kind(f)
        help_text = f.metadata["help"].replace("%", "%%")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        elif f.name == "resume":  # bare --resume, or --resume auto
            parser.add_argument("--resume", nargs="?", const="yes", default="", choices=RESUMES, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=f.metadata["choices"],
                                help=help_text)
    known = parser.parse_known_args(argv)[0]
    if known.env:
        print(environment_report(), flush=True)
        parser.exit(0)
    recipe = known.config
    try:
        parser.set_defaults(**read_recipe(recipe) if recipe else {})
    except ConfigError as err:
        parser.exit(2, f"train.py: error: {err}\n")
    flags = vars(parser.parse_args(argv))
    del flags["env"], flags["config"]
    cfg = Config(**flags)
    try:
        validate(cfg)
    except ConfigError as err:
        parser.exit(2, f"train.py: error: {err}\n")
    return cfg


def validate(cfg, world=1):
    """One-line ConfigErrors for flag values and combinations that would fail later."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"--{f.name} {value}: expected one of {', '.join(choices)}")
    if cfg.lam is not None and cfg.loss not in SELF_REFINED:
        raise ConfigError(f"--lam is used only by the Sr losses ({', '.join(sorted(SELF_REFINED))}), "
                          f"not --loss {cfg.loss}")
    # floats: nan and inf pass `> 0` checks
    for name in ("beta", "lr", "epochs", "lam", "sft_quality_q", "collective_timeout"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name} {value}: must be a finite number")
    if cfg.lam is not None and cfg.lam < 0:
        raise ConfigError(f"--lam {cfg.lam}: must be >= 0 (the paper's grid is 0.1 to 1; 0 is DPO/IPO)")
    if cfg.loss == "sft" and cfg.sft_steps:
        raise ConfigError(f"--sft_steps {cfg.sft_steps} is the SFT stage before an alignment loss; with --loss sft "
                          f"the run's length is --max_steps / --epochs")
    if cfg.loss not in SELF_REFINED and (cfg.refine != "prompt" or cfg.refine_prompt != defaults.REFINE_PROMPT):
        flag = f"--refine {cfg.refine}" if cfg.refine != "prompt" else f"--refine_prompt {cfg.refine_prompt}"
        raise ConfigError(f"{flag} is used only by the Sr losses ({', '.join(sorted(SELF_REFINED))}), "
                          f"not --loss {cfg.loss}")
    if not cfg.beta > 0:
        raise ConfigError(f"--beta {cfg.beta}: must be positive")
    if not cfg.max_grad_norm > 0:
        raise ConfigError(f"--max_grad_norm {cfg.max_grad_norm}: must be positive (inf: no clipping); "
                          f"a negative norm would flip the gradient, 0 would zero it")
    if not cfg.epochs > 0:
        raise ConfigError(f"--epochs {cfg.epochs}: must be positive (--max_steps ends a run earlier)")
    for name, low in (("batch_size", 1), ("log_every", 1), ("max_length", 2), ("micro_batch_size", 0),
                      ("max_pairs", 0), ("eval_pairs", 0), ("eval_every", 0), ("save_every", 0),
                      ("warmup_steps", 0), ("sft_steps", 0),
                      ("max_steps", -1)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name} {value}: must be at least {low}")
    if not cfg.collective_timeout > 0:
        raise ConfigError(f"--collective_timeout {cfg.collective_timeout}: must be positive (seconds)")
    try:
        data.parse_template_kwargs(cfg.chat_template_kwargs)
    except common.DataError as err:
        raise ConfigError(str(err)) from None
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"--lr {cfg.lr}: must be positive")
    if cfg.resume_force and not cfg.resume:
        raise ConfigError("--resume_force is used only with --resume")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite starts over and --resume continues: give one of them")
    per_rank, rem = divmod(cfg.batch_size, world)
    micro = cfg.micro_batch_size or per_rank
    if rem or per_rank == 0 or per_rank % micro:
        raise ConfigError(f"--batch_size {cfg.batch_size} is not divisible by world size {world} x "
                          f"--micro_batch_size {micro}")
    no_sft = cfg.loss != "sft" and cfg.sft_steps == 0
    if cfg.sft_quality_q and (cfg.data != "embedded" or not 0 < cfg.sft_quality_q <= 1 or no_sft):
        raise ConfigError(f"--sft_quality_q {cfg.sft_quality_q}: needs a value in [0, 1], --data embedded "
                          f"(not {cfg.data}) and an SFT stage")
    if cfg.precompute_ref and cfg.loss == "sft":
        raise ConfigError("--precompute_ref needs a preference loss, not --loss sft")
    if cfg.pack_length < 0:
        raise ConfigError(f"--pack_length {cfg.pack_length}: must be >= 0")
    if cfg.lora_r < 0 or cfg.lora_alpha < 0 or not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora_r {cfg.lora_r}, --lora_alpha {cfg.lora_alpha}, --lora_dropout {cfg.lora_dropout}: "
                          f"need r >= 0, alpha >= 0 and dropout in [0, 1)")
    lora_flags = [f"--{n}" for n in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(cfg, n)]
    if lora_flags and not cfg.lora_r:
        raise ConfigError(f"{', '.join(lora_flags)} are used only with --lora_r (LoRA); without it the run is a "
                          f"full fine-tune")
    if cfg.lora_r:
        try:
            lora.require_peft()
        except lora.LoraError as err:
            raise ConfigError(str(err)) from None


def resolved(cfg):
    """The unset defaults filled in; the only place where they depend on the model."""
    tiny = cfg.model == TINY
    lam = cfg.lam if cfg.lam is not None else (defaults.LAM if cfg.loss in SELF_REFINED else 0.0)
    return dataclasses.replace(
        cfg, lam=lam, pack_length=cfg.pack_length or cfg.max_length,
        lr=cfg.lr if cfg.lr is not None else (defaults.TINY_LR if tiny else defaults.LR),
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else (
            defaults.TINY_WARMUP_STEPS if tiny else defaults.WARMUP_STEPS),
        sft_steps=cfg.sft_steps if cfg.sft_steps is not None else (
            defaults.TINY_SFT_STEPS if tiny and cfg.loss != "sft" else 0))


RESOLVED = ("lam", "lr", "warmup_steps", "sft_steps", "pack_length")  # the fields resolved() fills in


def command_flags(cfg):
    """{name: value} of the flags that repeat the resolved config `cfg` (resolved(parse_config(them)) == cfg, but
    --resume, --resume_force and --overwrite): each field that differs from its default, less a resolved field
    whose value resolved() gives anyway from the others (lam 0.0 for DPO, tiny's lr, ...)."""
    flags = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)
             if getattr(cfg, f.name) != f.default and f.name not in ("resume", "resume_force", "overwrite")}
    for name in RESOLVED:
        rest = {k: v for k, v in flags.items() if k != name}
        if name in flags and getattr(resolved(Config(**rest)), name) == flags[name]:
            flags = rest
    return flags
