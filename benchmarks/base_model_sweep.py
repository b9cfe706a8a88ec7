#!/usr/bin/env python
"""How well does the embedded base model know the T0 facts? A sweep over the synthetic
world's mixed-training settings and the model's size and steps.

    python benchmarks/base_model_sweep.py GRID.json [--procs N] [--out results.jsonl]

GRID.json is a list of settings, each overriding the defaults below: `steps`, `dpe`
(docs_per_entity), `share` (probe_worded_share), `infobox` (probe templates in the
infoboxes), `arch` (GPT-2 sizes), `lr`, `bs`, `wseed` (the world's seed). Each setting
builds the default-sized world, trains the base model as `gradloc base-model` does
(on a GPU when there is one) and prints one JSON line with top-1 on three probe sets:
`held` the held-out T0 probes (what `gradloc base-model` reports: facts never seen in
probe wording), `docwording` the same facts asked in the documents' possessive wording,
`worded` the probe-worded entities' facts (seen in probe wording). Runs go in parallel
processes; on CPU use --procs 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORLD = {"seed": 0, "n_entities": 240, "n_snapshots": 3, "update_rate": 0.25, "new_rate": 0.12}  # T0 ignores the rates
ARCH = {"n_layer": 6, "n_embd": 128, "n_head": 4, "n_positions": 128}
PROBES = {"subject_cap": 0.05, "relation_cap": 0.25, "seed": 0}  # config/config.yaml's


def run(setting: dict) -> dict:
    import torch
    from gradloc import basemodel, probes, scoring, split
    from gradloc.data import synthetic

    synthetic.INFOBOX_TEMPLATES = tuple(setting.get("infobox", synthetic.INFOBOX_TEMPLATES))
    world = synthetic.generate({**WORLD, "seed": setting.get("wseed", 0), "docs_per_entity": setting.get("dpe", 3),
                                "probe_worded_share": setting.get("share", 0.5)})
    docs, triples = world["documents"], world["triples"]
    texts = [r["text"] for r in split.base_sequences(docs)]
    articles = probes.subject_articles(docs, world["entities"], triples)
    held = probes.build_probes(PROBES, [], triples, articles, synthetic.probe_prefix)
    t0 = triples[triples["snapshot"] == 0]
    worded = t0[~t0["subject_id"].isin(set(held["subject_id"]))].head(400)
    facts = probes.FACT_COLUMNS  # without `prefix`, so assemble words them anew
    sets = {"held": held, "docwording": probes.assemble(0, "docwording", held[facts], synthetic.document_prefix)}
    if len(worded):
        sets["worded"] = probes.assemble(0, "worded", worded[facts], synthetic.probe_prefix)
    params = {"architecture": setting.get("arch", ARCH), "tokenizer": {"vocab_size": 2048},
              "pretrain": {"steps": setting.get("steps", 1200), "batch_size": setting.get("bs", 32),
                           "lr": setting.get("lr", 3e-3), "seq_len": 128, "seed": 0}}
    dev = basemodel.device()
    started = time.time()
    model, tokenizer, rows = basemodel.build_base_model(params, texts, dev)
    seconds = time.time() - started
    top1 = {name: round(next(iter(scoring.summarize(scoring.score_probes(model, tokenizer, df, 64, progress=False))
                                   .values()))["top1"], 3) for name, df in sets.items()}
    tail = [r["loss"] for r in rows[-20:]]
    return {**setting, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "n_held": len(held), "t0_tokens": len(basemodel.token_stream(tokenizer, texts)),
            "final_loss": round(sum(tail) / len(tail), 3), "train_s": round(seconds, 1), **top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = ap.parse_args()
    grid = json.loads(args.grid.read_text())
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for result in pool.imap_unordered(run, grid):
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
