"""ECBD, Entity Cloze By Date (Onoe et al., NAACL 2022 Findings): cloze sentences about
entities indexed by the year they first appeared in Wikipedia.

Records are json lines: `ex_id` ({wiki title}_{page id}_{paragraph}_{sentence}),
`masked_sentence` (the span replaced by `<extra_id_0>` or `<MASK>`), `answer_str` (T5
style: `<extra_id_0> span <extra_id_1>`; `answer_d` holds the bare span), `span_type`,
`definition` (the first paragraph's sentences, entity mentions inside
`[ENT_START]..[ENT_END]`), `year`, `entity_span_str`, `entity_span_loc`.

Years <= base_year (default: the earliest) form snapshot 0; each later year is one
period. Each entity's definition is its article (kind full) from its year's snapshot
on. Probes: the masked sentence up to the mask is the prefix and the span the object;
set `new` in the entity's period, `unchanged` for entities of the base years (known at
T0). ECBD has no triples.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..io import InputError, read_table, merge_defaults
from . import DOC_COLUMNS, ENTITY_COLUMNS, PROBE_COLUMNS
from .sources import Corpus, empty_triples, existing, fetch_url, frame, is_missing, is_url

log = logging.getLogger(__name__)

DEFAULTS = {"path": None, "base_year": None}
REQUIRED = ["ex_id", "masked_sentence", "answer_str", "definition", "year", "entity_span_str"]
_MASK = re.compile(r"<extra_id_0>|<MASK>|\[MASK\]")
_SENTINEL = re.compile(r"<extra_id_\d+>")
_ENT = re.compile(r"\[ENT_START\](.*?)\[ENT_END\]")
_EX_ID = re.compile(r"^(.+)_(\d+)_(\d+)_(\d+)$")


def with_defaults(params: dict | None) -> dict:
    p = merge_defaults(params, DEFAULTS, "data.ecbd")
    return p


def fetch(p: dict, work: Path) -> Path:
    if not p["path"]:
        raise InputError("data.ecbd.path: a local path or http(s) URL of ECBD json lines is required")
    if is_url(p["path"]):
        log.info("downloading %s", p["path"])
        return fetch_url(p["path"], work / "ecbd")
    return existing(p["path"], "data.ecbd.path")


def _answer(rec: dict) -> str:
    d = rec.get("answer_d")
    if isinstance(d, dict) and isinstance(d.get("<extra_id_0>"), str):
        return d["<extra_id_0>"].strip()
    return _SENTINEL.sub(" ", str(rec["answer_str"])).strip()


def _definition(value) -> tuple[str, list[str]]:
    """The definition as plain text, and the entity mentions its markers enclose."""
    # json gives a list of sentences, parquet a numpy array, a hand-made file a string.
    text = value if isinstance(value, str) else " ".join(str(x) for x in list(value))
    spans = [m.strip() for m in _ENT.findall(text)]
    return _ENT.sub(lambda m: m.group(1), text).strip(), spans


def _entity_key(rec: dict) -> tuple[str, str]:
    """(entity id, article title): {title}_{page id} from ex_id when it has that shape."""
    m = _EX_ID.match(str(rec["ex_id"]))
    if m:
        return f"{m.group(1)}_{m.group(2)}", m.group(1).replace("_", " ")
    name = str(rec["entity_span_str"])
    return name, name


def load(p: dict, work: Path) -> Corpus:
    p = with_defaults(p)
    path = fetch(p, work)
    df = read_table(path, REQUIRED)
    records = df.to_dict("records")
    if not records:
        raise InputError(f"{path}: no records")

    entities: dict[str, dict] = {}
    for rec in records:
        try:
            year = int(str(rec["year"]).strip()[:4])
        except ValueError:
            raise InputError(f"{path}: record {rec['ex_id']!r}: column 'year' is not a year: {rec['year']!r}") from None
        eid, title = _entity_key(rec)
        e = entities.setdefault(eid, {"title": title, "name": str(rec["entity_span_str"]).strip(), "year": year,
                                      "definition": "", "aliases": set(), "records": []})
        e["year"] = min(e["year"], year)
        if not is_missing(rec["definition"]) and not e["definition"]:
            e["definition"], spans = _definition(rec["definition"])
            e["aliases"].update(spans)
        e["records"].append(rec)

    years = sorted({e["year"] for e in entities.values()})
    base_year = years[0] if p["base_year"] is None else int(p["base_year"])
    later = [y for y in years if y > base_year]
    if not later:
        raise InputError(f"{path}: no entity is newer than base_year {base_year} (years found: {years}); "
                         f"ECBD needs at least one update year")
    snapshot_of = {y: (later.index(y) + 1 if y > base_year else 0) for y in years}
    n = len(later)

    docs, probes, inventory, skipped = [], [], [], 0
    for eid in sorted(entities):
        e = entities[eid]
        k = snapshot_of[e["year"]]
        if e["definition"]:
            docs.extend((eid, s, e["title"], e["definition"], "full") for s in range(k, n + 1))
        inventory.append((eid, e["name"], sorted(e["aliases"] - {e["name"]}), "entity"))
        for rec in e["records"]:
            sentence = str(rec["masked_sentence"])
            m = _MASK.search(sentence)
            obj = _answer(rec)
            if not m or not obj:
                skipped += 1
                continue
            relation = "cloze" if is_missing(rec.get("span_type")) else str(rec["span_type"])
            probes.append((k, "new" if k > 0 else "unchanged", e["name"], relation, obj, sentence[:m.start()].rstrip()))
    if skipped:
        log.warning("%s: %d records without a mask or answer skipped", path, skipped)
    return Corpus(
        source="ecbd",
        labels=[f"<={base_year}"] + [str(y) for y in later],
        documents=frame(docs, DOC_COLUMNS),
        triples=empty_triples(),
        entities=frame(inventory, ENTITY_COLUMNS),
        probes=frame(probes, PROBE_COLUMNS),
        notes={"base_year": base_year, "records": len(records), "records_skipped": skipped},
    )
