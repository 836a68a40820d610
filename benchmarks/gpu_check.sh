#!/usr/bin/env bash
# The GPU check of issue 4, on one GPU, in under 8 minutes:
#   1. a randomly initialised Pythia-1B-sized model (GPTNeoX: hidden 2048, 16 layers, 8 heads, intermediate
#      8192, vocab 50304) saved with the byte-level tokenizer, and 1,344 synthetic pairs (~480 tokens a row);
#   2. about 20 Sr-DPO steps of train.py on it (bf16 FSDP2, batch 64 in micro-batches of 16):
#      tokens/s, model FLOP utilisation, peak memory;
#   3. benchmarks/step_cost.py on the same model: the Sr-DPO/DPO step ratios and loop/floor;
#   4. the test suite on CUDA (python -m pytest -x -q), in the time that is left of BUDGET_S.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   SMALL=1 bash benchmarks/gpu_check.sh      # a toy model, on CPU too: checks that every piece runs
#
# Everything goes to $OUT (else ./gpu_check_out): gpu_check.log, metrics.jsonl, step_cost.json,
# summary.json, summary.txt. Variables: PEAK_FLOPS (dense bf16 peak of the GPU, FLOP/s; default
# H100 SXM's 989e12), STEPS (20), BUDGET_S (450), PYTEST_ARGS (-x -q), STEP_COST_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PEAK_FLOPS=${PEAK_FLOPS:-989e12}
BUDGET_S=${BUDGET_S:-450}
PYTEST_ARGS=${PYTEST_ARGS:--x -q}
if [ "${SMALL:-0}" = 1 ]; then
  STEPS=${STEPS:-3}; BATCH=8; MICRO=4; EVAL_PAIRS=8; STEP_COST_ARGS=${STEP_COST_ARGS:---pairs 2 --steps 2 --warmup 1}
else
  STEPS=${STEPS:-20}; BATCH=64; MICRO=16; EVAL_PAIRS=64; STEP_COST_ARGS=${STEP_COST_ARGS:---pairs 16 --steps 5 --warmup 2}
fi
FAILED=()
step() { echo; echo "== $1 ($((SECONDS))s)"; }

main() {
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
                               torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

step "1. model and data in $WORK"
python - "$WORK" <<'EOF' || FAILED+=(model)
import json, os, random, sys
import torch
from transformers import ByT5Tokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

work, small = sys.argv[1], os.environ.get("SMALL") == "1"
tok = ByT5Tokenizer()  # byte level: needs no files
size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=len(tok))
        if small else
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192, vocab_size=50304))
config = GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False, **size)
torch.manual_seed(0)
model = GPTNeoXForCausalLM(config)
n = sum(p.numel() for p in model.parameters())
model.to(torch.bfloat16).save_pretrained(f"{work}/model")
tok.save_pretrained(f"{work}/model")
# 6N counts the weights that multiply: all but the input embedding (a lookup)
json.dump({"params": n, "matmul_params": n - model.gpt_neox.embed_in.weight.numel()}, open(f"{work}/params.json", "w"))
rng = random.Random(0)
text = lambda n_chars: "".join(rng.choice("abcdefghij klmnop") for _ in range(n_chars))  # noqa: E731
with open(f"{work}/pairs.jsonl", "w") as fh:
    for _ in range(1344):  # 21 steps of 64 pairs; bytes: query 240 + response 240 (+ p ~257 in the p view)
        fh.write(json.dumps({"prompt": text(240), "chosen": text(240), "rejected": text(240)}) + "\n")
print(f"model: {n / 1e6:,.1f}M parameters, {config.num_hidden_layers} layers of {config.hidden_size}, "
      f"vocab {config.vocab_size}")
EOF

step "2. $STEPS Sr-DPO steps of train.py (FSDP2, bf16 on CUDA)"
python - "$WORK/train_peak.json" --model "$WORK/model" --data "$WORK/pairs.jsonl" --out_dir "$WORK/run" \
  --loss sr-dpo --max_steps "$STEPS" --epochs 100 --batch_size "$BATCH" --micro_batch_size "$MICRO" \
  --max_length 1024 --warmup_steps 1 --eval_every 0 --eval_pairs "$EVAL_PAIRS" --save_every 0 <<'EOF' || FAILED+=(train)
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

step "3. step cost on the same model"
# shellcheck disable=SC2086
python benchmarks/step_cost.py --model "$WORK/model" $STEP_COST_ARGS --json "$OUT/step_cost.json" || FAILED+=(step_cost)

step "4. summary"
python - "$WORK" "$OUT" "$PEAK_FLOPS" <<'EOF' || FAILED+=(summary)
import json, os, statistics, sys

work, out, peak_flops = sys.argv[1], sys.argv[2], float(sys.argv[3])
load = lambda path: json.load(open(path)) if os.path.exists(path) else None  # noqa: E731
params, run, cost = load(f"{work}/params.json"), load(f"{work}/train_peak.json"), load(f"{out}/step_cost.json")
s = {"peak_flops": peak_flops, "params": params and params["params"]}
lines = []
if params and os.path.exists(f"{out}/metrics.jsonl"):
    steps = [m for m in map(json.loads, open(f"{out}/metrics.jsonl")) if m["stage"] == "sr-dpo"]
    timed = steps[2:] or steps  # the first two steps warm up the allocator and kernels
    s["tokens_per_s"] = statistics.median(m["tokens_per_s"] for m in timed)
    s["mfu"] = 6 * params["matmul_params"] * s["tokens_per_s"] / peak_flops
    lines += [f"train.py, {len(steps)} Sr-DPO steps: {s['tokens_per_s']:,.0f} tokens/s (x view, median of steps "
              f"{steps.index(timed[0]) + 1}-{len(steps)}); MFU {100 * s['mfu']:.1f}% "
              f"(6 x {params['matmul_params']:,} params x tokens/s / {peak_flops:.3g}; the no-grad p and "
              f"reference passes are not counted)"]
if run:
    s.update(run)
    lines.append(f"train.py peak memory: {run['peak_bytes'] / 2**30:.2f} GiB "
                 + ("allocated" if run["reserved_bytes"] else "RSS")
                 + (f", {run['reserved_bytes'] / 2**30:.2f} GiB reserved" if run["reserved_bytes"] else "")
                 + f"; whole run {run['seconds']:.0f}s, exit code {run['code']}")
if cost:
    r = s["step_cost"] = cost["ratios"]
    lines.append(f"step cost ({cost['machine']}): Sr-DPO/DPO time live {r['sr-dpo/dpo time']:.2f}, cached "
                 f"{r['sr-dpo cached/dpo time']:.2f}; step memory live {r['sr-dpo/dpo step memory']:.2f}, peak "
                 f"{r['sr-dpo/dpo peak memory']:.2f}; loop/floor "
                 + ", ".join(f"{k.split(' ', 1)[1]} {v:.2f}" for k, v in r.items() if k.startswith("loop/floor")))
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

step "5. test suite"
LEFT=$((BUDGET_S - SECONDS))
if [ "${SMALL:-0}" = 1 ]; then
  echo "SMALL=1: test suite skipped (CI runs it on CPU)"
elif [ "$LEFT" -lt 30 ]; then
  echo "test suite skipped: ${LEFT}s left of BUDGET_S=$BUDGET_S"; FAILED+=(pytest-no-time)
else
  echo "python -m pytest $PYTEST_ARGS  (timeout ${LEFT}s)"
  # shellcheck disable=SC2086
  timeout -k 10 "$LEFT" python -m pytest $PYTEST_ARGS || FAILED+=(pytest)
fi

echo; echo "== done in ${SECONDS}s; output in $OUT; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
