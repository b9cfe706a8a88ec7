"""Stage `gradloc model-cards`: every checkpoint's model card again, with its evaluation
results as model-index entries (the cards themselves: `gradloc.modelcard`)."""

from __future__ import annotations

import logging
from pathlib import Path

from .io import InputError, as_list, atomic_output, read_json
from .modelcard import CARD, write

log = logging.getLogger(__name__)

def run(params: dict, trains, evals, out) -> None:
    """A card with results per training folder: its own card plus the evaluation of the
    same method, seed and period (from summary.json), under out/<method>/seed<s>/P<k>/."""
    from huggingface_hub import ModelCard

    if params:
        raise InputError(f"model-cards takes no --params; unknown key(s) {sorted(params)}")
    by_id = {}
    for e in as_list(evals):
        s = read_json(Path(e) / "summary.json")
        by_id[(s.get("method"), s.get("seed"), s.get("period"))] = s
    with atomic_output(out) as tmp:
        for t in as_list(trains):
            card_path = Path(t) / "model" / CARD
            metrics = read_json(Path(t) / "metrics.json")
            if not card_path.exists():
                raise InputError(f"{card_path}: missing (a checkpoint trained before model cards existed: rerun "
                                 f"its train job, e.g. with --forcerun train)")
            card = ModelCard.load(card_path)
            key = (metrics["method"], metrics["seed"], metrics["period"])
            if key not in by_id:
                raise InputError(f"no evaluation among --evals of method {key[0]}, seed {key[1]}, period {key[2]}")
            meta = card.data.to_dict()
            folder = tmp / metrics["method"] / f"seed{metrics['seed']}" / f"P{metrics['period']}"
            folder.mkdir(parents=True)
            write(folder, {"title": meta.get("model_name") or f"gradloc {metrics['method']}",
                           "summary": card.text.split("\n\n")[1] if "\n\n" in card.text else "",
                           "base_model": meta.get("base_model"), "tags": [x for x in meta.get("tags", []) if x != "gradloc"],
                           "facts": _facts(card.text), "command": meta["gradloc"]["command"],
                           "gradloc": {**meta["gradloc"], "checkpoint": str(Path(t) / "model")}}, by_id[key])
    log.info("model cards: %d checkpoints -> %s", len(as_list(trains)), out)


def _facts(text: str) -> dict:
    """The facts table of a card's text, back as {label: value}."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] and set(cells[0]) - {"-"} and cells[0] != "set":
            out[cells[0]] = cells[1]
    return out
