"""Sr-DPO / Sr-IPO inside TRL: a DPOTrainer whose loss is srpo.py's.

    python examples/trl_sr_dpo.py --max_steps 2          # tiny model from a config, embedded pairs, CPU
    python examples/trl_sr_dpo.py --model EleutherAI/pythia-410m --data Anthropic/hh-rlhf --loss sr-ipo ...

Tested with trl 1.16.0, transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0, torch 2.13 (TRL >= 1.0 API:
DPOTrainer tokenises into prompt_ids / chosen_ids / rejected_ids and collates chosen rows then rejected rows).

What this subclass changes, and nothing else:
  * the p ⊕ x view. Rule: p_prompt_ids = the tokens of srpo.REFINE_PROMPT (encoded alone, no special token)
    directly before TRL's own prompt_ids (after the BOS, where TRL's prompt starts with one), as srpo's data.py
    puts p directly before the query's tokens. The responses' tokens are TRL's (it appends EOS to plain-text
    responses). For chat prompts the same rule puts p before the chat template's first token, not inside the
    first user message as data.py does. Each view is truncated by TRL's collator to --max_length on its own.
  * compute_loss: log π(y|·) is the sum of the response's token log-probs (srpo.sequence_logps) of the policy
    (with grad) and of the reference (no grad) under x; Δπ (srpo.refinement, Eq. 11) from the current policy and
    the reference under p ⊕ x, without grad; then srpo.sr_dpo_loss / sr_ipo_loss (or dpo_loss / ipo_loss),
    averaged over the batch. Unlike TRL's loss_type="ipo", Sr-IPO here uses the paper's summed log-probs.
Not supported here: precompute_ref_log_probs, a PEFT adapter as its own reference (pass a reference model).
"""

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # srpo.py, data.py, models.py

import srpo  # noqa: E402
from base import defaults  # noqa: E402
from base.common import ConfigError  # noqa: E402
from training.config import Config, validate  # noqa: E402

TESTED_WITH = {"trl": "1.16.0", "transformers": "5.24.0"}


def p_prompt_ids(prompt_ids, p_ids, bos_token_id):
    """p ⊕ x in tokens: p's tokens directly before the prompt's, after its BOS if it starts with one."""
    if bos_token_id is not None and prompt_ids[:1] == [bos_token_id]:
        return [bos_token_id] + p_ids + prompt_ids[1:]
    return p_ids + prompt_ids


@dataclasses.dataclass
class PViewCollator:
    """TRL's DataCollatorForPreference, applied twice: the x view, and the p ⊕ x view under the keys p_*."""
    base: object

    def __call__(self, examples):
        batch = self.base(examples)
        p_view = self.base([{**e, "prompt_ids": e["p_prompt_ids"]} for e in examples])
        batch.update({f"p_{k}": p_view[k] for k in ("input_ids", "attention_mask", "completion_mask")})
        return batch


def view_logps(model, inputs, prefix=""):
    """(log π(y+|·), log π(y-|·)) [B] each: summed response-token log-probs of a collated view (chosen rows first)."""
    ids = inputs[prefix + "input_ids"]
    labels = ids.masked_fill(inputs[prefix + "completion_mask"] == 0, srpo.IGNORE_INDEX)
    logits = model(input_ids=ids, attention_mask=inputs[prefix + "attention_mask"], use_cache=False).logits
    return srpo.sequence_logps(logits, labels).chunk(2)


def make_trainer_class():
    """The DPOTrainer subclass (built on call, so that importing this file does not import trl)."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class SrDPOTrainer(DPOTrainer):
        """DPOTrainer with srpo.py's loss: sr-dpo (default), sr-ipo, dpo or ipo; λ = lam, p = refine_prompt."""

        def __init__(self, *args, srpo_loss="sr-dpo", lam=0.5, refine_prompt=srpo.REFINE_PROMPT, **kwargs):
            if srpo_loss not in srpo.LOSSES:
                raise ValueError(f"srpo_loss {srpo_loss!r}: expected one of {', '.join(srpo.LOSSES)}")
            self.srpo_loss, self.lam, self.refine_prompt = srpo_loss, lam, refine_prompt
            tokenizer = kwargs.get("processing_class")
            if kwargs.get("data_collator") is None and tokenizer is not None:
                targs = kwargs.get("args")
                kwargs["data_collator"] = PViewCollator(DataCollatorForPreference(
                    pad_token_id=tokenizer.pad_token_id, max_length=targs.max_length,
                    truncation_mode=targs.truncation_mode, pad_to_multiple_of=targs.pad_to_multiple_of))
            super().__init__(*args, **kwargs)
            if self.ref_model is None:
                raise ValueError("SrDPOTrainer needs a reference model (ref_model=...); precompute_ref_log_probs "
                                 "and a PEFT adapter as its own reference are not supported")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            p_ids = self._tokenizer(self.refine_prompt, add_special_tokens=False)["input_ids"]
            bos = self._tokenizer.bos_token_id
            return dataset.map(lambda e: {"p_prompt_ids": p_prompt_ids(e["prompt_ids"], p_ids, bos)})

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "p_prompt_ids" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_prompt_ids"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            beta = self.beta
            pc, pr = view_logps(model, inputs)
            with torch.no_grad():
                rc, rr = view_logps(self.ref_model, inputs)
                if self.srpo_loss in srpo.SELF_REFINED:  # Δπ, Eq. (11): current policy and π_ref on p ⊕ x
                    delta = srpo.refinement(*view_logps(model, inputs, "p_"), *view_logps(self.ref_model, inputs,
                                                                                          "p_"), beta)
                else:
                    delta = torch.zeros_like(rc)
            fn = srpo.LOSSES[self.srpo_loss]
            losses = fn(pc, pr, rc, rr, delta, beta, self.lam) if self.srpo_loss in srpo.SELF_REFINED \
                else fn(pc, pr, rc, rr, beta)
            loss = losses.mean()
            mode = "train" if model.training else "eval"
            chosen, rejected = srpo.implicit_reward(pc.detach(), rc, beta), srpo.implicit_reward(pr.detach(), rr, beta)
            gather = self.accelerator.gather_for_metrics
            for key, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                               ("rewards/margins", chosen - rejected),
                               ("rewards/accuracies", (chosen > rejected).float()), ("delta/mean", delta)):
                self._metrics[mode][key].append(gather(value).float().mean().item())
            if return_outputs:
                return loss, {"losses": losses.detach(), "delta": delta}
            return loss

    return SrDPOTrainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help='transformers name or folder; "tiny": models.py\'s small '
                                                        'model from a config (seeded by --seed)')
    parser.add_argument("--ref_model", default="", help="unset: a second copy of --model")
    parser.add_argument("--data", default="embedded", help="data.load_pairs source: embedded, a file, a hub name")
    parser.add_argument("--max_pairs", type=int, default=256)
    parser.add_argument("--loss", default="sr-dpo", choices=tuple(srpo.LOSSES))
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=None, help="λ, Sr losses only; unset: 0.5")
    parser.add_argument("--refine_prompt", default="100", choices=tuple(srpo.REFINE_PROMPTS), help="Sr losses only")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="unset: 1e-3 for tiny, else 5e-7")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--output_dir", default="out-trl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # the flags checked as train.py checks them: λ >= 0 and λ, p only with an Sr loss, sizes, β, lr
        validate(Config(loss=args.loss, beta=args.beta, lam=args.lam, refine_prompt=args.refine_prompt,
                        model=args.model, ref_model=args.ref_model, data=args.data, max_pairs=args.max_pairs,
                        max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                        seed=args.seed))
    except ConfigError as e:
        parser.exit(2, f"examples/trl_sr_dpo.py: error: {e}\n")
    args.lam = args.lam if args.lam is not None else defaults.LAM
    return args


def build_trainer(args, model=None, ref_model=None):
    """The SrDPOTrainer of args on CPU in float32 (models / tokenizer loaded unless given). The pairs are those
    that data.tokenize_pairs keeps at --max_length (a DataError when none is)."""
    from datasets import Dataset
    from trl import DPOConfig

    import data
    from base.common import DataError
    from training.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    pairs = data.load_pairs(args.data)[:args.max_pairs or None]
    if any(not isinstance(p.prompt, str) for p in pairs):
        raise DataError("this example feeds plain-text prompts to TRL; chat pairs are not converted here")
    refine_prompt = srpo.REFINE_PROMPTS[args.refine_prompt] if args.loss in srpo.SELF_REFINED else None
    try:
        kept = data.tokenize_pairs(pairs, tokenizer, args.max_length, refine_prompt, log=None)
    except DataError as e:
        raise DataError(f"--max_length {args.max_length}: {e}") from None
    pairs = [pairs[e["pair_index"]] for e in kept]
    model = model if model is not None else load_model(args.model, tokenizer, seed=args.seed)
    if ref_model is None:
        ref_model = load_model(args.ref_model or args.model, tokenizer, seed=args.seed)
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    config = DPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr if args.lr is not None else (1e-3 if args.model == "tiny" else 5e-7),
        beta=args.beta, max_length=args.max_length, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=args.seed, dataset_num_proc=None)
    trainer = make_trainer_class()(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                                   processing_class=tokenizer, srpo_loss=args.loss,
                                   lam=args.lam,
                                   refine_prompt=srpo.REFINE_PROMPTS[args.refine_prompt])
    if len(trainer.train_dataset) == 0:
        raise DataError(f"--max_length {args.max_length}: TRL kept none of the {len(pairs)} pairs; give a larger "
                        f"--max_length")
    return trainer


def main(argv=None):
    """Train; a user error (common.SrpoError: a flag, a model, the data) is one line on stderr and exit status 2."""
    from base.common import SrpoError
    from training.models import check_models

    args = parse_args(argv)
    try:
        check_models(args.model, args.ref_model, args.max_length)  # as train.py checks them
        trainer = build_trainer(args)
    except SrpoError as e:
        print(f"examples/trl_sr_dpo.py: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    trainer.train()
    for entry in trainer.state.log_history:
        print(entry)
    return trainer


if __name__ == "__main__":
    main()
