#!/usr/bin/env python
"""How well does the embedded base model know the T0 facts? A sweep over the synthetic
world's mixed-training settings and the model's size and steps.

    python benchmarks/studies/base_model_sweep.py GRID.json [--procs N] [--out results.jsonl]

GRID.json is a list of settings, each overriding the default config
(`config/config.yaml`, completed with the schema's defaults by `gradloc.schema.fill`;
no defaults live here): `steps`, `dpe` (docs_per_entity), `share` (probe_worded_share),
`infobox` (probe templates in the infoboxes), `arch` (GPT-2 sizes, over the config's),
`lr`, `bs`, `wseed` (the world's seed). Each setting builds the world, trains the base
model with `gradloc.basemodel.build_base_model` (the training engine, on a GPU when there
is one, bf16 there by the schema's `precision: auto`) and prints one JSON line with top-1
on three probe sets:
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

CONFIG = ROOT / "config" / "config.yaml"  # the default run's settings; the schema fills the rest


def default_config() -> dict[str, dict]:
    """The default config's world, probes and model slices with the schema's defaults filled."""
    import yaml

    from gradloc import schema

    cfg = yaml.safe_load(CONFIG.read_text())
    return {"world": schema.fill("data.synthetic", cfg["data"].get("synthetic"), where="data.synthetic"),
            "probes": schema.fill("probes", cfg.get("probes"), where="probes"),
            "model": schema.fill("model", cfg.get("model"), where="model")}


def settings_of(setting: dict, base: dict) -> tuple[dict, dict]:
    """(world params, model params): the default config with the setting's overrides."""
    world = {**base["world"], "seed": setting.get("wseed", base["world"]["seed"]),
             "docs_per_entity": setting.get("dpe", base["world"]["docs_per_entity"]),
             "probe_worded_share": setting.get("share", base["world"]["probe_worded_share"])}
    model = base["model"]
    pretrain = {**model["pretrain"], **{k: setting[s] for s, k in (("steps", "steps"), ("lr", "lr"), ("bs", "batch_size"))
                                        if s in setting}}
    model = {**model, "architecture": {**model["architecture"], **setting.get("arch", {})}, "pretrain": pretrain}
    return world, model


def run(setting: dict) -> dict:
    import torch

    from gradloc import basemodel, probes, scoring, split
    from gradloc.data import synthetic

    base = default_config()
    world_params, params = settings_of(setting, base)
    synthetic.INFOBOX_TEMPLATES = tuple(setting.get("infobox", synthetic.INFOBOX_TEMPLATES))
    world = synthetic.generate(world_params)
    docs, triples = world["documents"], world["triples"]
    texts = [r["text"] for r in split.base_sequences(docs)]
    articles = probes.subject_articles(docs, world["entities"], triples)
    held = probes.build_probes(base["probes"], [], triples, articles, synthetic.probe_prefix)
    t0 = triples[triples["snapshot"] == 0]
    worded = t0[~t0["subject_id"].isin(set(held["subject_id"]))].head(400)
    facts = probes.FACT_COLUMNS  # without `prefix`, so assemble words them anew
    sets = {"held": held, "docwording": probes.assemble(0, "docwording", held[facts], synthetic.document_prefix)}
    if len(worded):
        sets["worded"] = probes.assemble(0, "worded", worded[facts], synthetic.probe_prefix)
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
