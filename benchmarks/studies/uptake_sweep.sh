#!/bin/bash
# Issue 11 part 4 / issue 24 item 1: how much continual training does `full` need before the
# period-1 facts are learned? Trains `full` (or METHOD_JSON) on period 1, seed $SEED (0),
# from a finished default run's base model and token files, then evaluates.
#   benchmarks/studies/uptake_sweep.sh RESULTS NAME EPOCHS LR [METHOD_JSON]
# COMMON='"batch_size": 4' (a JSON fragment) adds to the common training settings.
# WORLD='{"new_docs_per_entity": 6, "change_restatements": 3}' trains and evaluates on that
# variant of config/config.yaml's synthetic world instead (built once under SWEEP_DIR: corpus,
# split, tag, probes, tokens); its T0 must equal the run's, so the run's base model fits.
# e.g. for a grid:  for e in 2 8 16; do benchmarks/studies/uptake_sweep.sh results e$e $e 1e-3; done
# Prints one line: fact-level hits@1 among the candidates (%) of new, updated, unchanged,
# efficacy (%), then top-1 / object ppl per probe set (new, updated, unchanged, outdated).
set -euo pipefail
R=$1; name=$2; epochs=$3; lr=$4; method=${5:-"{}"}
out=${SWEEP_DIR:-/tmp/uptake_sweep}/$name
rm -rf "$out"; mkdir -p "$out"
data=$R
if [ -n "${WORLD:-}" ]; then
    data=${SWEEP_DIR:-/tmp/uptake_sweep}/world_$(echo "$WORLD" | md5sum | cut -c1-8)
    if [ ! -d "$data/tokens" ]; then
        slice() { python -c 'import json, sys, yaml
c = yaml.safe_load(open("config/config.yaml")); key, world = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps({"source": "synthetic", "synthetic": {**c["data"]["synthetic"], **world}} if key == "data" else c[key]))' "$1" "$WORLD"; }
        rm -rf "$data"; mkdir -p "$data"
        python -m gradloc download --params "$(slice data)" --out "$data/corpus" > "$data/log" 2>&1
        python - "$R/corpus" "$data/corpus" <<'PY'
import sys, pandas as pd
a, b = (pd.read_parquet(f"{d}/documents.parquet") for d in sys.argv[1:])
if not a[a.snapshot == 0].reset_index(drop=True).equals(b[b.snapshot == 0].reset_index(drop=True)):
    sys.exit(f"WORLD changes T0: the run's base model does not fit {sys.argv[2]}")
PY
        python -m gradloc split --params "$(slice split)" --corpus "$data/corpus" --out "$data/split" >> "$data/log" 2>&1
        python -m gradloc tag --params "$(slice tagging)" --corpus "$data/corpus" --split "$data/split" \
            --out "$data/tagged" >> "$data/log" 2>&1
        python -m gradloc probes --params "$(slice probes)" --corpus "$data/corpus" --tagged "$data/tagged" \
            --out "$data/probes" >> "$data/log" 2>&1
        python -m gradloc tokens --model "$R/base_model" --tagged "$data/tagged" --out "$data/tokens" >> "$data/log" 2>&1
    fi
fi
params="{\"name\":\"$name\",\"common\":{\"lr\":$lr,\"epochs\":$epochs${COMMON:+,$COMMON}},\"method\":$method}"
# --corpus and --tagged: what replay source current, token weighting and permute_objects read
OMP_NUM_THREADS=1 python -m gradloc train --params "$params" --init "$R/base_model" --tokens "$data/tokens" \
    --corpus "$data/corpus" --tagged "$data/tagged" --period 1 --seed "${SEED:-0}" --out "$out/train" > "$out/train.log" 2>&1
OMP_NUM_THREADS=1 python -m gradloc evaluate --params '{"batch_size": 32}' --model "$out/train" \
    --probes "$data/probes" --tokens "$data/tokens" --period 1 --out "$out/eval" > "$out/eval.log" 2>&1
python - "$out" "$name" <<'PY'
import json, sys
out, name = sys.argv[1:]
d, m = json.load(open(f"{out}/eval/summary.json")), json.load(open(f"{out}/train/metrics.json"))
f = d["facts"]
hits = " ".join(f"{k} {100 * f['sets'][k]['hits1']:.1f}" for k in ("new", "updated", "unchanged"))
print(name, "steps", m["steps"], "hits@1", hits, f"efficacy {100 * f['efficacy']['share']:.1f} |",
      " ".join(f"{k} {d[k]['top1']:.3f}/{d[k]['object_ppl']:.1f}" for k in ("new", "updated", "unchanged", "outdated")))
PY
