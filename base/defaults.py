"""base/defaults.py: every default value that more than one command uses, defined once; imports nothing.

Owns: the paper's hyperparameters as the commands' defaults (β, λ, max_length, the prompt p's scale), the
tiny model's training schedule, the paper's learning-rate schedule, decoding and the judge's reply length.
train.py's Config, evaluate.py, judge.py and experiments/ read them from here; tests/test_architecture.py
fails if one of these values is written again as a default elsewhere.
Does not own: the formulas (srpo.py) or the text of p (srpo.REFINE_PROMPTS).
"""

BETA = 0.1                 # β of Eqs. (4)-(14), the paper's
LAM = 0.5                  # λ of Eq. (12) / Algorithm 2 for the Sr losses, from the paper's grid {0.1, 0.3, 0.5, 1}
REFINE_PROMPT = "100"      # the prompt p's rating scale: the paper's [1, 100] (Table 4 also has [1, 10])
MAX_LENGTH = 512           # tokens per sequence, the p ⊕ x view included (the paper's 512)

LR = 5e-7                  # the paper's RMSprop learning rate
WARMUP_STEPS = 150         # the DPO reference code's linear warm-up
TINY_LR = 1e-3             # the randomly initialised tiny model's learning rate
TINY_WARMUP_STEPS = 9      # ... its warm-up
TINY_SFT_STEPS = 300       # ... and its SFT stage before alignment

MAX_NEW_TOKENS = 512       # generation: new tokens per answer turn
TEMPERATURE = 0.0          # 0: greedy
TOP_P = 1.0
JUDGE_MAX_TOKENS = 2048    # the judge's reply length, HTTP or local
COLLECTIVE_TIMEOUT = 600   # seconds a collective waits for every rank (torchtitan's comm.init_timeout_seconds)
