#!/usr/bin/env bash
# Build a cache and train two side networks from it, offline, with a random-init T5-small.
#   bash examples/quickstart.sh            (run from the repository root, ../shared beside it)
# A random backbone shows the pipeline and its speed, never accuracy.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL=${MODEL:-t5-small-random}
[ -d "$MODEL" ] || python ../shared/tools/make_random_t5.py --size t5-small --out "$MODEL"
read-cache build --model "$MODEL" --task mrpc --data-dir ../shared/glue --out caches/mrpc-t5-small --limit 500
read-cache inspect caches/mrpc-t5-small
# Any number of side networks from the same cache, no rebuild:
read-cache train --cache caches/mrpc-t5-small --rnn gru --dim 256 --epochs 5 --out runs/mrpc-gru256 --overwrite
read-cache train --cache caches/mrpc-t5-small --rnn lstm --dim 128 --head linear --epochs 5 --out runs/mrpc-lstm128 --overwrite
read-cache predict --run runs/mrpc-gru256 "The cat sat on the mat. ||| A cat was sitting on the mat."
