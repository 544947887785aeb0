#!/usr/bin/env bash
# A first run in about a minute, offline: build a small MRPC cache with a random-init T5-small, train two
# side networks from it, and label a sentence pair online.
#   bash examples/quickstart.sh      (from the repository root, with the venv active and ../shared beside the repo)
# A random backbone shows the pipeline and its speed, never accuracy. Drop --limit for the whole task.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL=${MODEL:-t5-small-random}
GLUE=${GLUE:-../shared/glue}
[ -d "$MODEL" ] || python ../shared/tools/make_random_t5.py --size t5-small --out "$MODEL"
read-cache build --model "$MODEL" --task mrpc --data-dir "$GLUE" --out caches/mrpc-t5-small --limit 200
read-cache inspect caches/mrpc-t5-small
# Any number of side networks from the same cache, no rebuild:
read-cache train --cache caches/mrpc-t5-small --rnn gru --dim 256 --epochs 3 --out runs/mrpc-gru256 --overwrite
read-cache train --cache caches/mrpc-t5-small --rnn lstm --dim 128 --head linear --epochs 3 --out runs/mrpc-lstm128 --overwrite
read-cache predict --run runs/mrpc-gru256 "The cat sat on the mat. ||| A cat was sitting on the mat."
