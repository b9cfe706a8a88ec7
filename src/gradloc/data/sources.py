"""What every corpus source produces (`Corpus`), and the small helpers the loaders of
real data share: finding data files, reading headers, aliases, entity-like objects,
fetching URLs. The loaders themselves: `temporalwiki.py`, `ecbd.py`, `local.py`."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..io import InputError
from . import ENTITY_COLUMNS, TRIPLE_COLUMNS

DATA_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".jsonl", ".jsonl.gz", ".json")


@dataclass
class Corpus:
    """One source's tables before they are checked and written (docs/formats.md)."""
    source: str
    labels: list[str]                     # snapshot labels; index = snapshot number
    documents: pd.DataFrame
    triples: pd.DataFrame
    entities: pd.DataFrame
    probes: pd.DataFrame | None = None    # probes_raw, for sources that ship probes
    base_missing: bool = False            # snapshot 0 empty by design (TemporalWiki without a base dump)
    notes: dict = field(default_factory=dict)  # extra manifest entries


def empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in columns})


def empty_triples() -> pd.DataFrame:
    return empty(TRIPLE_COLUMNS)


def frame(rows: list, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns) if rows else empty(columns)


# --- cells ------------------------------------------------------------------------------------

def is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def parse_aliases(value) -> list[str]:
    """Aliases as a list: parquet/json give lists (or numpy arrays), csv gives a
    '|'-separated string; empty cells give []."""
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [str(a) for a in value if not is_missing(a)]
    elif is_missing(value):
        items = []
    else:
        items = str(value).split("|")
    return [a.strip() for a in items if a.strip()]


def entity_like(obj: str, subjects: set[str]) -> bool:
    """Whether a triple's object names an entity (so it gets an object_id and joins the
    entity inventory): it is some triple's subject, or it looks like a proper name
    (capitalised, no digits). Literals such as years, numbers and common nouns are not."""
    if obj in subjects:
        return True
    return bool(obj) and obj[0].isupper() and not any(c.isdigit() for c in obj)


def entities_from_triples(subjects: list[str], objects: list[str], type_: str = "entity") -> pd.DataFrame:
    """An inventory when a source has none: subjects and entity-like objects, entity_id =
    name (Wikidata items are not in TemporalWiki's CSVs), no aliases."""
    subject_set = set(subjects)
    names = sorted(subject_set | {o for o in objects if entity_like(o, subject_set)})
    return frame([(n, n, [], type_) for n in names], ENTITY_COLUMNS)


# --- files ------------------------------------------------------------------------------------

def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def header(path: Path) -> list[str]:
    """Column names of a data file without reading all of it."""
    suffix = suffix_of(path)
    try:
        if suffix in (".csv", ".csv.gz"):
            return list(pd.read_csv(path, nrows=0).columns)
        if suffix == ".tsv":
            return list(pd.read_csv(path, sep="\t", nrows=0).columns)
        if suffix == ".parquet":
            return list(pq.read_schema(path).names)
        if suffix in (".jsonl", ".json"):
            return _jsonl_keys(path)
        return list(pd.read_json(path, lines=True, nrows=1).columns)
    except InputError:
        raise
    except Exception as e:  # a parser error: name the file
        raise InputError(f"{path}: cannot read the header: {e}") from e


def _jsonl_keys(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                return list(obj) if isinstance(obj, dict) else []
    return []


def is_url(path: str) -> bool:
    return urllib.parse.urlparse(str(path)).scheme in ("http", "https")


def fetch_url(url: str, dest_dir: Path) -> Path:
    """Download url into dest_dir (the stage's temporary folder) and return the file."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / name
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as e:  # URLError, HTTPError and timeouts are OSErrors
        raise InputError(f"{url}: download failed: {e}") from e
    return target


def existing(path: str | None, key: str) -> Path:
    """A required input path that must exist; the error names the config key."""
    if not path:
        raise InputError(f"{key}: a path is required for this source")
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: file not found ({key})")
    return p

