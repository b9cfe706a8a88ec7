"""ECBD, Entity Cloze By Date (Onoe et al., NAACL 2022 Findings): cloze sentences about
entities indexed by the year they first appeared in Wikipedia.

Records are json lines: `ex_id` ({wiki title}_{page id}_{paragraph}_{sentence}),
`masked_sentence` (the span replaced by `<extra_id_0>` or `<MASK>`), `answer_str` (T5
style: `<extra_id_0> span <extra_id_1>`; `answer_d` holds the bare span), `span_type`,
`definition` (the first paragraph's sentences, entity mentions inside
`[ENT_START]..[ENT_END]`), `year`, `entity_span_str`, `entity_span_loc`.

The release is one file per subset and split: `{2017,...,2021,popular}/
{np,random}_spans_{dev,test}.json`; `path` takes a file, a folder, a glob or a list of
them. A record's year is its `year` field, else its subset folder (2017..2021); records
of the `popular` subset (long-known entities) belong to T0. Records written by ECBD's
construction scripts may lack `year`, `entity_span_str` and `entity_span_loc`: the
entity's name then comes from `ex_id`. A record with no usable year is an error naming
its file.

Years <= base_year form snapshot 0; each later year is one period. Default base_year:
the earliest year when several years and no `popular` records are read (as before);
otherwise the year before the earliest, so that every dated entity is new (with no
`popular` records snapshot 0 then has no text: manifest `base_snapshot: missing`). Each entity's definition is its article (kind full) from its year's snapshot
on. Probes: the masked sentence up to the mask is the prefix and the span the object;
set `new` in the entity's period, `unchanged` for entities of the base years (known at
T0). ECBD has no triples.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from ..io import InputError, read_table
from ..schema import fill
from . import DOC_COLUMNS, ENTITY_COLUMNS, PROBE_COLUMNS
from .sources import Corpus, empty_triples, fetch_url, frame, is_missing, is_url

log = logging.getLogger(__name__)

REQUIRED = ["ex_id", "masked_sentence", "definition"]
SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".csv")
POPULAR = "popular"  # the release's subset of long-known entities: T0
_YEAR_DIR = re.compile(r"^(19|20)\d\d$")
_MASK = re.compile(r"<extra_id_0>|<MASK>|\[MASK\]")
_SENTINEL = re.compile(r"<extra_id_\d+>")
_ENT = re.compile(r"\[ENT_START\](.*?)\[ENT_END\]")
_EX_ID = re.compile(r"^(.+)_(\d+)_(\d+)_(\d+)$")


def with_defaults(params: dict | None) -> dict:
    return fill("data.ecbd", params, where="data.ecbd")


def fetch(p: dict, work: Path) -> list[Path]:
    """Every ECBD file that `path` names: files, folders (searched recursively, hidden
    files skipped), globs, http(s) URLs, or a list of these; in a stable order."""
    if not p["path"]:
        raise InputError("data.ecbd.path: ECBD json lines are required (a file, folder, glob, list or URL)")
    items = p["path"] if isinstance(p["path"], list) else [p["path"]]
    out: list[Path] = []
    for i, item in enumerate(items):
        if is_url(item):
            log.info("downloading %s", item)
            out.append(fetch_url(item, work / "ecbd" / str(i)))
            continue
        path = Path(item).expanduser()
        if any(c in item for c in "*?["):
            found = [Path(f) for f in sorted(glob.glob(str(path), recursive=True)) if Path(f).is_file()]
        elif path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.name.lower().endswith(SUFFIXES))
        elif path.exists():
            found = [path]
        else:
            raise InputError(f"{path}: file not found (data.ecbd.path)")
        if not found:
            raise InputError(f"{item}: no ECBD files there (data.ecbd.path; looked for {', '.join(SUFFIXES)})")
        out.extend(found)
    return list(dict.fromkeys(out))


def subset_year(path: Path) -> int | str | None:
    """The release's subset folder a file sits in: a year (2017..2021), 'popular', or None."""
    for part in reversed(path.parent.parts):
        if _YEAR_DIR.match(part):
            return int(part)
        if part.lower() == POPULAR:
            return POPULAR
    return None


def record_year(rec: dict, folder, path: Path) -> int | str:
    value = rec.get("year")
    if not is_missing(value):
        try:
            return int(str(value).strip()[:4])
        except ValueError:
            raise InputError(f"{path}: record {rec.get('ex_id')!r}: 'year' is not a year: {value!r}") from None
    if folder is not None:
        return folder
    raise InputError(f"{path}: record {rec.get('ex_id')!r} has no usable year: no 'year' field, and the file is "
                     f"not in a year folder (2017..2021) or the '{POPULAR}' folder of the ECBD release; put it "
                     f"in its subset's folder or add 'year'")


def _answer(rec: dict) -> str:
    d = rec.get("answer_d")
    if isinstance(d, dict) and isinstance(d.get("<extra_id_0>"), str):
        return d["<extra_id_0>"].strip()
    value = rec.get("answer_str")
    return "" if is_missing(value) else _SENTINEL.sub(" ", str(value)).strip()


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
    name = "" if is_missing(rec.get("entity_span_str")) else str(rec["entity_span_str"])
    return name, name


def _name(rec: dict, title: str) -> str:
    span = rec.get("entity_span_str")
    return title if is_missing(span) else str(span).strip()


def read_entities(paths) -> tuple[dict[str, dict], int, bool]:
    """({entity id: title, name, year, definition, aliases, records}, records read, whether
    the `popular` subset was among them)."""
    entities: dict[str, dict] = {}
    n_records, popular = 0, False
    for path in paths:
        if path.stat().st_size == 0:  # an empty subset file
            continue
        df = read_table(path, REQUIRED)
        if "answer_str" not in df.columns and "answer_d" not in df.columns:
            raise InputError(f"{path}: missing column 'answer_str' (or 'answer_d'); found {list(df.columns)}")
        folder = subset_year(path)
        for rec in df.to_dict("records"):
            n_records += 1
            year = record_year(rec, folder, path)
            popular |= year == POPULAR
            eid, title = _entity_key(rec)
            if not eid:
                raise InputError(f"{path}: record without ex_id or entity_span_str: {str(rec)[:200]}")
            e = entities.setdefault(eid, {"title": title, "name": _name(rec, title), "year": year,
                                          "definition": "", "aliases": set(), "records": []})
            if year == POPULAR or e["year"] == POPULAR:
                e["year"] = POPULAR
            else:
                e["year"] = min(e["year"], year)
            if not is_missing(rec["definition"]) and not e["definition"]:
                e["definition"], spans = _definition(rec["definition"])
                e["aliases"].update(spans)
            e["records"].append(rec)
    return entities, n_records, popular


def base_year_of(p: dict, entities: dict, popular: bool) -> int:
    """The base snapshot's year (`base_year`, else the first year, or the year before it when
    there is one year only or the popular subset); popular entities are set to it."""
    dated = sorted({e["year"] for e in entities.values() if e["year"] != POPULAR})
    if p["base_year"] is not None:
        base_year = int(p["base_year"])
    elif not dated:
        base_year = 0
    else:
        base_year = dated[0] if (len(dated) > 1 and not popular) else dated[0] - 1
    for e in entities.values():
        if e["year"] == POPULAR:
            e["year"] = base_year
    return base_year


def load(p: dict, work: Path) -> Corpus:
    p = with_defaults(p)
    paths = fetch(p, work)
    entities, n_records, popular = read_entities(paths)
    if not n_records:
        raise InputError(f"{', '.join(map(str, paths))}: no records")
    path = paths[0] if len(paths) == 1 else f"{len(paths)} ECBD files"
    base_year = base_year_of(p, entities, popular)
    years = sorted({e["year"] for e in entities.values()})
    records = range(n_records)
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
        base_missing=not any(d[1] == 0 for d in docs),
        notes={"base_year": base_year, "records": len(records), "records_skipped": skipped,
               "files": [str(f) for f in paths]},
    )
