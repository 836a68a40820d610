"""export.py: a model as a plain transformers folder: the training policy (export, train.py's sft/ and final/),
or any checkpoint, on one process, no GPU.

The command:

    python export.py out/checkpoint out/step-900 [--dtype bfloat16]

Reads a checkpoint that any number of ranks wrote (training/checkpoint.py: verified against its checksums, the
DCP metadata read without running code, the model's tensors only), builds the model from its run's
--model (run.json), merges LoRA adapters where the run had them (W + alpha/r · B·A), and writes the
weights in the source's dtype (or --dtype), the source's config, the tokenizer and models.MODEL_RECORD.
Owns: export, write_folder and the command. Does not own: checkpoints (training/checkpoint.py) or loading models
(training/models.py).
"""

import argparse
import functools
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed as dist

from base.common import SrpoError, atomic_path, check_output, disk_full, disk_full_message
from training import checkpoint, lora, models
from training.models import MODEL_RECORD, ModelError


def export(policy, tokenizer, path, rank, config, dtype, record, card=None, adapter_base=None):
    """A plain transformers folder (save_pretrained with the tokenizer), written atomically by rank 0 alone.

    The weights are gathered to rank 0's CPU and cast to `dtype` one tensor at a time; config.json is the
    source's `config` (use_cache and dropout as it had them) with `dtype` recorded; `record` is written as
    models.MODEL_RECORD (the model's reference and the run's flags); `card`, the text of README.md
    (training/model_card.py).
    LoRA: the weights are merged (lora.merged_state) and the adapter is written beside them in peft's format
    (lora.ADAPTER_DIR), its base `adapter_base`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if lora.is_lora(policy):  # merged weights, and the adapter beside them
            adapter = functools.partial(lora.save_adapter, state, policy, base_model=adapter_base)
            write_folder(policy.get_base_model(), lora.merged_state(state, policy), tokenizer, path, config, dtype,
                         record, card, adapter)
        else:
            write_folder(policy, state, tokenizer, path, config, dtype, record, card)
    del state
    dist.barrier()


def write_folder(model, state, tokenizer, path, config, dtype, record, card=None, adapter=None):
    """export's folder from a full state dict on this process (export.py's too); a full disk is one line.
    adapter: LoRA's ``adapter(folder)``, which writes the adapter in peft's format (in lora.ADAPTER_DIR)."""
    import copy

    for key in state:
        state[key] = state[key].to(dtype)
    try:
        with atomic_path(path) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            if adapter is not None:
                adapter(os.path.join(tmp, lora.ADAPTER_DIR))
            config = copy.deepcopy(config)
            config.dtype = dtype
            config.save_pretrained(tmp)  # replaces the training config that save_pretrained wrote
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, MODEL_RECORD), "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=1)
            if card:
                with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
                    fh.write(card)
    except Exception as e:  # noqa: BLE001 - a full disk or an unwritable place is one line; anything else is a bug
        shutil.rmtree(path + ".tmp", ignore_errors=True)  # nothing half-written is left behind
        size = sum(v.numel() * v.element_size() for v in state.values())
        if disk_full(e, os.path.dirname(os.path.abspath(path)), size):
            raise ModelError(disk_full_message(path, size, "model folder")) from None
        if isinstance(e, OSError):
            raise ModelError(f"{path}: cannot write the model folder ({e.strerror or e}"
                             f"{': ' + e.filename if e.filename else ''}); nothing was written") from None
        raise


def model_state(folder):
    """{name: tensor} of the model part of a verified checkpoint, loaded on this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = checkpoint.read_metadata(folder)
    state = {"model": {key.removeprefix("model."): torch.empty(tuple(item.size), dtype=item.properties.dtype)
                       for key, item in meta.state_dict_metadata.items()
                       if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}}
    if not state["model"]:
        raise checkpoint.CheckpointError(f"{folder}: holds no model weights (not a training checkpoint)")
    reader, planner = checkpoint._reader_and_planner(folder)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
    except checkpoint.CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        raise checkpoint.CheckpointError(f"{folder}: cannot load ({checkpoint._first_failure(e)})") from None
    return state["model"]


def export_checkpoint(folder, out, dtype=None, log=print):
    """Write checkpoint `folder` as the transformers folder `out` (atomically); returns out."""
    from transformers import AutoModelForCausalLM

    folder = os.path.normpath(folder)
    if not os.path.isdir(folder):
        raise checkpoint.CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.exists(os.path.join(folder, checkpoint.CHECKSUMS)):
        why = "an unfinished checkpoint (a save was interrupted)" if folder.endswith(".tmp") else \
            "not a finished checkpoint (no SHA256SUMS; a save was interrupted, or an older version wrote it)"
        raise checkpoint.CheckpointError(f"{folder}: {why}; export the run's {checkpoint.CHECKPOINT}/ (or "
                                         f"{checkpoint.CHECKPOINT}.old/) instead")
    run = os.path.dirname(os.path.abspath(folder))
    check_output(out, "OUT", reads=[folder, *(os.path.join(run, n) for n in checkpoint.run_entries(run))],
                            ours=exported)
    checkpoint.verify(folder)
    record = checkpoint.read_record(folder)
    extra = checkpoint.read_extra(folder)
    name = record.get("model")
    if not isinstance(name, str):
        raise checkpoint.CheckpointError(f"{os.path.join(folder, checkpoint.RECORD)}: has no 'model'")
    models.check_model(name, f"{os.path.join(folder, checkpoint.RECORD)}: its model")
    tokenizer = models.load_tokenizer(name)
    config = models.source_config(name, tokenizer)
    state = model_state(folder)
    if record.get("lora_r"):
        state = merged(folder, state, config, record)
    elif any(key.endswith(".base_layer.weight") for key in state):
        raise checkpoint.CheckpointError(f"{folder}: holds LoRA adapters but its run.json has no lora_r; "
                                         f"cannot merge them")
    dtype = models.DTYPES[dtype] if dtype else models.source_dtype(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - _tied(model))
    unknown = sorted(set(state) - expected)
    if missing or unknown:
        raise checkpoint.CheckpointError(
            f"{folder}: its weights do not fit {name} ({len(missing)} missing, e.g. {missing[:1]}; "
            f"{len(unknown)} unknown, e.g. {unknown[:1]})")
    try:
        model.load_state_dict(state, strict=False)  # cast to dtype by copy; tied weights filled by their twin
    except RuntimeError as e:
        why = str(e).strip().splitlines()[-1].strip()[:300]
        raise checkpoint.CheckpointError(f"{folder}: its weights do not fit {name} ({why})") from None
    stage = extra.get("stage_index", 0)
    sft = record.get("sft_steps") and stage > 0
    reference = record.get("ref_model") or (
        os.path.join(os.path.dirname(os.path.abspath(folder)), checkpoint.SFT_DIR) if sft else name)
    made = {"folder": os.path.abspath(folder), "stage_index": stage, "step": extra.get("step")}
    write_folder(model, dict(model.state_dict()), tokenizer, out, config, dtype,
                        dict(models.model_record(reference, record.get("seed", 0), record), checkpoint=made))
    log(f"{out}: the model of {folder} (stage {stage}, step {extra.get('step')}), {str(dtype).split('.')[-1]}")
    return out


def merged(folder, state, config, record):
    """A LoRA checkpoint's state with its adapters merged (lora.merged_state): peft adds adapters to the modules
    that had them (those with a base_layer) with the run's r and alpha, loads the state, and says what it added."""
    from transformers import AutoModelForCausalLM

    targets = sorted({key.removeprefix("base_model.model.").removesuffix(".base_layer.weight") for key in state
                      if key.endswith(".base_layer.weight")})
    if not targets:
        raise checkpoint.CheckpointError(f"{folder}: its run.json has lora_r {record['lora_r']} but it holds no "
                                         f"LoRA adapters")
    model = lora.add_adapters(AutoModelForCausalLM.from_config(config, dtype=torch.float32), record["lora_r"],
                              record.get("lora_alpha"), targets=targets)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise checkpoint.CheckpointError(f"{folder}: its LoRA weights do not fit {record.get('model')} with "
                                         f"lora_r {record['lora_r']} ({why})") from None
    return lora.merged_state(state, model)


def exported(folder):
    """Whether `folder` is a model folder that export.py wrote (its MODEL_RECORD names a checkpoint): the only
    non-empty folder it replaces."""
    try:
        with open(os.path.join(folder, MODEL_RECORD), encoding="utf-8") as fh:
            return "checkpoint" in json.load(fh)
    except (OSError, ValueError, TypeError):
        return False


def _tied(model):
    """The state-dict keys that tie_weights fills (e.g. lm_head.weight with tied embeddings)."""
    names = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    return {key for keys in names.values() for key in keys[1:]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (out_dir/checkpoint)")
    parser.add_argument("out", help="the transformers folder to write")
    parser.add_argument("--dtype", choices=sorted(models.DTYPES), help="the weights' dtype (default: the source's)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the intent
    try:
        export_checkpoint(args.checkpoint, args.out, args.dtype)
    except SrpoError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
