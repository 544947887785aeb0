#!/usr/bin/env bash
# 2 ranks against 1 process on the same cores, for docs/distributed.md.
#
#   MODEL=/path/to/random-t5-small GLUE=../shared/glue WORK=/tmp/measure examples/measure_distributed.sh
#
# Both sides get the same CPU cores: one process with OMP_NUM_THREADS=$CORES (and --threads for training),
# or $CORES ranks with one thread each. The script holds /tmp/read-cache-measure.lock throughout, so no
# other measurement on a shared machine overlaps it, and prints the load average beside every number.
set -euo pipefail
MODEL=${MODEL:?a model folder, e.g. from make_random_t5.py --size t5-small}
GLUE=${GLUE:?a GLUE folder}
WORK=${WORK:-/tmp/read-cache-measure}
LIMIT=${LIMIT:-400}
CORES=${CORES:-2}
PY=${PY:-python}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 READ_CACHE_HOME="$WORK/home"
TORCHRUN=("$PY" -m torch.distributed.run --nproc-per-node "$CORES" --master-addr 127.0.0.1 --master-port 29611)

# One lock for the whole script: the ratios come from runs taken back to back, interleaved, with nothing
# else measuring in between (other jobs may still run: the load average is printed beside every number).
if [[ -z "${MEASURE_LOCKED:-}" ]]; then
  exec env MEASURE_LOCKED=1 flock /tmp/read-cache-measure.lock "$0" "$@"
fi

timed() {  # timed LABEL CMD...: wall seconds of the whole command (start-up included), load average before and after
  local label=$1; shift
  local before start end
  before=$(cut -d" " -f1-3 /proc/loadavg); start=$(date +%s.%N)
  "$@" > "$WORK/$label.log" 2>&1 || { tail -20 "$WORK/$label.log"; exit 1; }
  end=$(date +%s.%N)
  printf "%-34s %7.1f s   (load %s -> %s)\n" "$label" "$(echo "$end - $start" | bc)" "$before" "$(cut -d" " -f1-3 /proc/loadavg)"
}

build=(build --model "$MODEL" --task sst2 --data-dir "$GLUE" --limit "$LIMIT" --dtype fp32 --no-progress)
for round in 1 2; do
  rm -rf "$WORK/one" "$WORK/two"
  OMP_NUM_THREADS=$CORES timed "build-1-process-round$round" "$PY" -m read_cache "${build[@]}" --out "$WORK/one"
  OMP_NUM_THREADS=1 timed "build-$CORES-ranks-round$round" "${TORCHRUN[@]}" -m read_cache "${build[@]}" --out "$WORK/two"
  grep -h "wall" "$WORK/build-1-process-round$round.log" "$WORK/build-$CORES-ranks-round$round.log" | sed 's/^/    /'
done
rm -rf "$WORK/one1" "$WORK/two3"
OMP_NUM_THREADS=1 timed "build-1-process-threads1" "$PY" -m read_cache "${build[@]}" --out "$WORK/one1"
OMP_NUM_THREADS=1 timed "build-$CORES-ranks-round3" "${TORCHRUN[@]}" -m read_cache "${build[@]}" --out "$WORK/two3"
grep -h "wall" "$WORK/build-1-process-threads1.log" "$WORK/build-$CORES-ranks-round3.log" | sed 's/^/    /'

sweep=(sweep --cache "$WORK/one" --rnn gru,lstm --dim 64,128 --epochs 3 --batch-size 32 --no-progress --overwrite)
for round in 1; do
  OMP_NUM_THREADS=$CORES timed "sweep-1-process-threads$CORES-r$round" "$PY" -m read_cache "${sweep[@]}" --threads "$CORES" --out "$WORK/sweep-one"
  OMP_NUM_THREADS=1 timed "sweep-1-process-threads1-r$round" "$PY" -m read_cache "${sweep[@]}" --threads 1 --out "$WORK/sweep-one1"
  OMP_NUM_THREADS=1 timed "sweep-$CORES-ranks-threads1-r$round" "${TORCHRUN[@]}" -m read_cache "${sweep[@]}" --threads 1 --out "$WORK/sweep-two"
done

train=(train --cache "$WORK/one" --rnn gru --dim 128 --epochs 2 --batch-size 32 --no-progress --overwrite)
OMP_NUM_THREADS=1 timed "train-1-process-threads1" "$PY" -m read_cache "${train[@]}" --threads 1 --out "$WORK/single"
OMP_NUM_THREADS=1 timed "train-$CORES-ranks-ddp" "${TORCHRUN[@]}" -m read_cache "${train[@]}" --threads 1 --out "$WORK/ddp"
"$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print('    train examples per rank, per epoch:', s['train_examples_per_rank'], 'of', sum(s['train_examples_per_rank'][0]))" "$WORK/ddp/summary.json"
