"""TemporalWiki (Jang et al., EMNLP 2022): TWiki-Diffsets and TWiki-Probes per period.

The hub repo `seonghyeonye/TemporalWiki` ships `TWiki_Diffsets.zip`, `TWiki_Probes.zip`
and `Wikipedia_Full.zip` (24.7 GB; fetched only with `download_base: true`). A
`local_dir` may hold the same zips or their unpacked files. We do not rely on one
folder layout: a file belongs to period `0801-0901` if its name carries the period (as
`0801-0901`, `0801_0901`, `20210801_20210901` or the short `0809`); it is a probe file if
it has columns subject, relation, object (the generator writes `objective`), and a diff
file if it has a `text` column. Its set (changed / unchanged, or new / updated) comes
from the file name.

Documents: each period's diff rows become `kind=diff` documents of snapshot k (1..n). A
base dump (a text file named for the first period's start, e.g. `wikipedia_0801.csv`),
when present, becomes snapshot 0 (`kind=full`); without it snapshot 0 is empty and the
manifest says `base_snapshot: missing`.

Probes: `unchanged` files give set `unchanged`; `changed` files do not tell new from
updated entities, so a changed triple is `new` when its subject is unknown before the
period (in no earlier period's probes, no unchanged probe of this period, no base
article title), else `updated`. Triples: an unchanged probe holds in snapshots k-1 and
k, a changed one in k only. Entities: the probes' subjects and entity-like objects,
entity_id = name (Wikidata ids are not in the CSVs).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tqdm import tqdm

from ..io import InputError, merge_defaults
from . import DOC_COLUMNS, PROBE_COLUMNS, TRIPLE_COLUMNS
from .sources import (Corpus, data_files, entities_from_triples, entity_like, existing, extract_zips,
                      frame, header, is_missing, read_rows)

log = logging.getLogger(__name__)

DEFAULTS = {"hub_id": "seonghyeonye/TemporalWiki", "revision": None, "local_dir": None,
            "periods": ["0801-0901", "0901-1001", "1001-1101", "1101-1201"],
            "max_docs_per_period": None, "download_base": False}
HUB_ZIPS = ["TWiki_Diffsets.zip", "TWiki_Probes.zip"]
HUB_BASE_ZIP = "Wikipedia_Full.zip"
PROBE_SETS = ("unchanged", "changed", "updated", "new")  # "unchanged" first: it contains "changed"
_PERIOD = re.compile(r"^(\d{4})-(\d{4})$")


def with_defaults(params: dict | None) -> dict:
    p = merge_defaults(params, DEFAULTS, "data.temporalwiki")
    if not p["periods"] or any(not isinstance(x, str) or not _PERIOD.match(x) for x in p["periods"]):
        raise InputError(f"data.temporalwiki.periods: expected a non-empty list like ['0801-0901'], got {p['periods']!r}")
    cap = p["max_docs_per_period"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise InputError(f"data.temporalwiki.max_docs_per_period: a positive integer or null, got {cap!r}")
    return p


# --- names ----------------------------------------------------------------------------------

def period_pattern(period: str) -> re.Pattern:
    """Names a file of `period` may carry: 0801-0901, 0801_0901, 08010901,
    20210801_20210901, or the short month pair 0809 of the original code."""
    a, b = _PERIOD.match(period).groups()
    return re.compile(rf"(?<!\d)(?:20\d\d)?{a}[-_]?(?:20\d\d)?{b}(?!\d)|(?<!\d){a[:2]}{b[:2]}(?!\d)")


def base_pattern(periods: list[str]) -> re.Pattern:
    """Names of a base snapshot file: the first period's start, e.g. 0801 or 20210801."""
    a = _PERIOD.match(periods[0]).group(1)
    return re.compile(rf"(?<!\d)(?:20\d\d)?{a}(?!\d)|wikipedia_{a[:2]}(?!\d)", re.IGNORECASE)


def probe_set(path: Path) -> str | None:
    name = path.name.lower()
    for s in PROBE_SETS:
        if re.search(rf"(?<![a-z]){s}(?![a-z])", name.replace("_", " ").replace("-", " ")):
            return s
    return None


def hub_patterns(p: dict) -> list[str]:
    """allow_patterns for the hub: the two small zips (never the 24.7 GB full dump unless
    asked), plus any unpacked files named for a requested period."""
    patterns = list(HUB_ZIPS) + [f"*{x}*" for x in p["periods"]] + [f"*{x.replace('-', '_')}*" for x in p["periods"]]
    if p["download_base"]:
        patterns.append(HUB_BASE_ZIP)
    return patterns


def _snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=allow_patterns)


def fetch(p: dict) -> Path:
    """The folder holding TemporalWiki's files: local_dir, or a hub snapshot (cached by
    huggingface_hub, so a rerun does not download again)."""
    if p["local_dir"]:
        root = existing(p["local_dir"], "data.temporalwiki.local_dir")
        if not root.is_dir():
            raise InputError(f"{root}: data.temporalwiki.local_dir must be a folder")
        return root
    log.info("downloading %s (revision %s) from the Hugging Face hub", p["hub_id"], p["revision"] or "main")
    return Path(_snapshot_download(p["hub_id"], p["revision"], hub_patterns(p)))


# --- files of each period ---------------------------------------------------------------------

def classify(files: list[Path], periods: list[str]) -> tuple[dict, list[Path]]:
    """{period: {"diff": [files], "probes": {set: [files]}}} and the base-file candidates."""
    found = {x: {"diff": [], "probes": {}} for x in periods}
    base = []
    patterns = {x: period_pattern(x) for x in periods}
    base_re = base_pattern(periods)
    for path in files:
        cols = set(header(path))
        is_probe = {"subject", "relation"} <= cols and ({"object", "objective"} & cols)
        hits = [x for x in periods if patterns[x].search(path.name)]
        if not hits:
            if not is_probe and "text" in cols and base_re.search(path.name):
                base.append(path)
            continue
        period = hits[0]
        if is_probe:
            s = probe_set(path)
            if s is None:
                raise InputError(f"{path}: a probe file of period {period} whose name says none of {PROBE_SETS}")
            found[period]["probes"].setdefault(s, []).append(path)
        elif "text" in cols:
            found[period]["diff"].append(path)
    return found, base


def _missing_error(root: Path, unpacked: Path, period: str, what: str, files: list[Path]) -> InputError:
    def show(f: Path) -> str:  # unpacked members as archive.zip:member
        if f.is_relative_to(unpacked):
            archive, *member = f.relative_to(unpacked).parts
            return f"{archive}.zip:{'/'.join(member)}"
        return str(f.relative_to(root)) if f.is_relative_to(root) else str(f)
    listing = ", ".join(show(f) for f in files[:30])
    more = f" (and {len(files) - 30} more)" if len(files) > 30 else ""
    return InputError(f"{root}: no {what} file for period {period}; data files found: [{listing}]{more}")


def _prefer_articles(paths: list[Path]) -> list[Path]:
    """Diffsets may come both as articles (id, url, title, text) and as GPT-2 chunks
    (text only) of the same diff: keep the articles, which have stable ids."""
    with_ids = [p for p in paths if {"id", "title"} & set(header(p))]
    return with_ids or paths


# --- tables -----------------------------------------------------------------------------------

def doc_rows(paths: list[Path], snapshot: int, kind: str, cap: int | None, key: str) -> list[tuple]:
    rows, seen = [], {}
    for path in paths:
        df = read_rows(path, None if cap is None else cap - len(rows))
        cols = set(df.columns)
        records = df.to_dict("records")
        for i, rec in enumerate(tqdm(records, desc=f"{key} {path.name}", leave=False, mininterval=2)):
            text = "" if is_missing(rec.get("text")) else str(rec["text"])
            if not text.strip():
                continue
            title = "" if is_missing(rec.get("title")) else str(rec["title"])
            if "id" in cols and not is_missing(rec.get("id")):
                doc_id = str(rec["id"])
            else:
                doc_id = title or f"{key}:{path.stem}:{i}"
            n = seen.get(doc_id, 0)
            seen[doc_id] = n + 1
            rows.append((doc_id if n == 0 else f"{doc_id}#{n}", snapshot, title or _title_of(text), text, kind))
        if cap is not None and len(rows) >= cap:
            break
    return rows[:cap] if cap is not None else rows


def _title_of(text: str) -> str:
    """GPT-2 chunks start with "Title. ": the best title we have when there is none."""
    head = text.split(". ", 1)[0]
    return head if len(head) <= 100 else ""


def probe_rows(paths: list[Path]) -> list[tuple[str, str, str]]:
    out = []
    for path in paths:
        df = read_rows(path)
        obj = "object" if "object" in df.columns else "objective"
        for s, r, o in zip(df["subject"], df["relation"], df[obj]):
            if not (is_missing(s) or is_missing(r) or is_missing(o)):
                out.append((str(s).strip(), str(r).strip(), str(o).strip()))
    return out


def load(p: dict, work: Path) -> Corpus:
    p = with_defaults(p)
    periods = p["periods"]
    root = fetch(p)
    wanted = [period_pattern(x) for x in periods] + [base_pattern(periods)]
    unpacked = work / "temporalwiki"
    files = data_files(root)
    # A local_dir may hold both the zips and their unpacked files: read each file once.
    extract_zips(root, unpacked, wanted, skip={f.name for f in files})
    files += data_files(unpacked) if unpacked.exists() else []
    found, base_files = classify(files, periods)
    cap = p["max_docs_per_period"]

    if p["download_base"] and not base_files:
        log.warning("%s: no base snapshot file for %s found; snapshot 0 stays empty", root, periods[0])
    docs = doc_rows(base_files, 0, "full", cap, "base")
    base_titles = {d[2] for d in docs}
    probes, triples, known = [], [], set(base_titles)
    for k, period in enumerate(periods, 1):
        entry = found[period]
        if not entry["diff"]:
            raise _missing_error(root, unpacked, period, "diff (a file with a 'text' column)", files)
        if not entry["probes"]:
            raise _missing_error(root, unpacked, period, "probe (subject, relation, object)", files)
        docs.extend(doc_rows(_prefer_articles(entry["diff"]), k, "diff", cap, period))
        unchanged = probe_rows(entry["probes"].get("unchanged", []))
        known |= {s for s, _, _ in unchanged}
        for set_name in ("unchanged", "changed", "updated", "new"):
            for s, r, o in (unchanged if set_name == "unchanged" else probe_rows(entry["probes"].get(set_name, []))):
                label = set_name if set_name != "changed" else ("updated" if s in known else "new")
                probes.append((k, label, s, r, o, ""))
                triples.extend([(k - 1, s, s, r, o), (k, s, s, r, o)] if label == "unchanged" else [(k, s, s, r, o)])
        known |= {row[2] for row in probes if row[0] == k}

    subjects = {t[1] for t in triples}
    triples = sorted(set(triples))
    triple_rows = [(*t, t[4] if entity_like(t[4], subjects) else None) for t in triples]
    entities = entities_from_triples([t[1] for t in triples], [t[4] for t in triples], type_="item")
    return Corpus(
        source="temporalwiki",
        labels=[_PERIOD.match(periods[0]).group(1)] + list(periods),
        documents=frame(docs, DOC_COLUMNS),
        triples=frame(triple_rows, TRIPLE_COLUMNS),
        entities=entities,
        probes=frame(probes, PROBE_COLUMNS),
        base_missing=not base_files,
        notes={"base_snapshot": "present" if base_files else "missing",
               "files": {period: {"diff": [f.name for f in found[period]["diff"]],
                                  "probes": {s: [f.name for f in fs] for s, fs in found[period]["probes"].items()}}
                         for period in periods},
               "base_files": [f.name for f in base_files]},
    )
