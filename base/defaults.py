"""base/defaults.py: every default value that more than one command uses, defined once; imports nothing.

Owns: the paper's hyperparameters as the commands' defaults (β, λ, max_length, the prompt p's scale), the
tiny model's training schedule, the paper's learning-rate schedule, decoding and the judge's reply length.
train.py's Config, evaluate.py, mtbench/judge.py and experiments/ read them from here; tests/test_architecture.py
fails if one of these values is written again as a default elsewhere.
Does not own: the formulas (srpo.py) or the text of p (srpo.REFINE_PROMPTS).
"""

BETA = 0.1                 # β of Eqs. (4)-(14), the paper's
LAM = 0.5                  # λ of Eq. (12) / Algorithm 2 for the Sr losses, from the paper's grid {0.1, 0.3, 0.5, 1}
REFINE_PROMPT = "100"      # the prompt p's rating scale: the paper's [1, 100] (Table 4 also has [1, 10])
MAX_LENGTH = 512           # tokens per sequence, the p ⊕ x view included (the paper's 512)

LR = 5e-7                  # the paper's RMSprop learning rate
WARMUP_STEPS = 150         # the DPO reference code's linear warm-up
# The randomly initialised tiny model's learning rate, warm-up and SFT stage (`python train.py`'s default run).
# At 1e-4 a 1e-6 perturbation of the weights is still ~2e-6 after the SFT stage and 5e-6 at the end, and the
# held-out figures agree to 7 digits: thread count and float reduction order do not move the printed figures.
# At 2e-4 the same perturbation grows 1000-fold, at 3e-4 to 0.5% and at 1e-3 (until issue 35) to 10%: RMSprop,
# whose steps are about lr per weight whatever the gradient's size, amplifies float rounding where the model
# learns to copy, so each thread count printed its own figures. Gradient clipping (10) is never reached at 1e-4.
TINY_LR = 1e-4
TINY_WARMUP_STEPS = 30     # ... its warm-up
TINY_SFT_STEPS = 300       # ... and its SFT stage before alignment

MAX_NEW_TOKENS = 512       # generation: new tokens per answer turn
TEMPERATURE = 0.0          # 0: greedy
TOP_P = 1.0
JUDGE_MAX_TOKENS = 2048    # the judge's reply length, HTTP or local
COLLECTIVE_TIMEOUT = 600   # seconds a collective waits for every rank (torchtitan's comm.init_timeout_seconds)
