#!/bin/bash
# Issue 11 part 4: how much continual training does `full` need before the period-1 facts
# become answerable in probe wording? Trains `full` (or METHOD_JSON) on period 1, seed 0,
# from a finished default run's base model and token files, then evaluates.
#   benchmarks/uptake_sweep.sh RESULTS NAME EPOCHS LR [METHOD_JSON]
# COMMON='"batch_size": 4' (a JSON fragment) adds to the common training settings.
# e.g. for a grid:  for e in 2 8 16; do benchmarks/uptake_sweep.sh results e$e $e 1e-3; done
# Prints one line: top-1 / object ppl per probe set (new, updated, unchanged, outdated).
set -euo pipefail
R=$1; name=$2; epochs=$3; lr=$4; method=${5:-"{}"}
out=${SWEEP_DIR:-/tmp/uptake_sweep}/$name
rm -rf "$out"; mkdir -p "$out"
params="{\"name\":\"$name\",\"common\":{\"lr\":$lr,\"epochs\":$epochs${COMMON:+,$COMMON}},\"method\":$method}"
OMP_NUM_THREADS=1 python -m gradloc train --params "$params" --init "$R/base_model" --tokens "$R/tokens" \
    --period 1 --seed 0 --out "$out/train" > "$out/train.log" 2>&1
OMP_NUM_THREADS=1 python -m gradloc evaluate --params '{"batch_size": 32}' --model "$out/train" \
    --probes "$R/probes" --tokens "$R/tokens" --period 1 --out "$out/eval" > "$out/eval.log" 2>&1
python - "$out" "$name" <<'PY'
import json, sys
out, name = sys.argv[1:]
d, m = json.load(open(f"{out}/eval/summary.json")), json.load(open(f"{out}/train/metrics.json"))
print(name, "steps", m["steps"], " ".join(f"{k} {d[k]['top1']:.3f}/{d[k]['object_ppl']:.1f}"
                                           for k in ("new", "updated", "unchanged", "outdated")))
PY
