#!/bin/bash
# The paper's protocol on a GPU, pipeline and speed only (issue 12): a RANDOM T5-base and T5-large
# (no hub here, so no pretrained T5: these scores mean nothing), LST's splits, the Bayesian search,
# 3 seeds, and READ-large's truncation (T5-large without its last 4 layers). It checks that the CUDA
# path runs end to end in bf16 (never fp16 for T5), that no batch trips the inf/NaN check, and how long
# each stage takes. Run from the repository root on the GPU machine:
#     bash examples/gpu_glue_pipeline.sh            # ~10 minutes on one H100
# It prints, per model, the build and total seconds (glue.json) and nvidia-smi's view of the GPU.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-glue}
SHARED=${SHARED:-../shared}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 READ_CACHE_HOME="$OUT/home"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for size in t5-base t5-large; do
  [ -d "$OUT/$size" ] || python "$SHARED/tools/make_random_t5.py" --size $size --out "$OUT/$size"
done
run() {  # name, model, extra flags
  /usr/bin/time -v read-cache glue --model "$2" --data-dir "$SHARED/glue" --tasks sst2,mrpc,stsb --protocol lst \
    --limit 5000 --epochs 3 --rounds 4 --seeds 3 --device cuda --no-progress --out "$OUT/$1" "${@:3}" \
    2> "$OUT/$1.log" || { tail -20 "$OUT/$1.log"; exit 1; }
  python - "$OUT/$1/glue.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: build {r['build_seconds']:.0f} s, total {r['wall_seconds']:.0f} s, "
      f"layers {r['n_encoder_layers']}, selected {r['selected_architecture']} (random weights: scores are meaningless)")
PY
  grep -E "Elapsed|Maximum resident" "$OUT/$1.log"
}
run read "$OUT/t5-base"
run read-large "$OUT/t5-large" --drop-last-layers 4
grep -l "fp16" "$OUT"/*.log && echo "WARNING: fp16 was mentioned above" || echo "no fp16 compute chosen"
