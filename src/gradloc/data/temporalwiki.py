"""TemporalWiki (Jang et al., EMNLP 2022): TWiki-Diffsets, TWiki-Probes and the 0801 base
snapshot, read as the release lays them out (docs/formats.md, "TemporalWiki").

The hub repo `seonghyeonye/TemporalWiki` holds three zips: `TWiki_Diffsets.zip`
(`TWiki_Diffsets/wikipedia_{0809,0910,1011,1112}_gpt2.csv`, one column `text`),
`TWiki_Probes.zip` (`twiki_probes/{0801-0901,...}_{changed,unchanged}.csv`, header
`subject,relation,object`) and `Wikipedia_Full.zip` (24.7 GB; the base text is
`Wikipedia_Full/wikipedia_08_gpt2/part*.csv`, column `text`). A `local_dir` may hold the
zips, their unpacked folders, or both; `resolve` finds the files the same way for a hub
download and a local folder, and reads zip members as streams (nothing is unpacked).

Rows are GPT-2 chunks of at most 512 tokens in page order: a page's first chunk starts
"Title. ", later chunks start mid-sentence. Titles come from first chunks only, and a
continuation chunk carries its page's title. Duplicate rows are dropped and counted.
Files are streamed (csv module, one row at a time); `max_docs_per_period` keeps a
uniform sample (reservoir sampling, seeded), not the first rows.

Probes: `unchanged` files give set `unchanged`. TemporalWiki's `changed` files merge new
and updated facts; `new_vs_updated` says whether to split them: `auto` splits only with
evidence (base titles: a subject whose page existed before the period is `updated`,
else `new`), `split` requires that evidence, `changed` keeps one set `changed`.
Triples: an unchanged probe holds in snapshots k-1 and k, a changed one in k only.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..io import InputError
from ..schema import fill
from . import DOC_COLUMNS, PROBE_COLUMNS, TRIPLE_COLUMNS
from .sources import Corpus, entities_from_triples, entity_like, existing, frame

log = logging.getLogger(__name__)

HUB_ZIPS = ["TWiki_Diffsets.zip", "TWiki_Probes.zip"]
HUB_BASE_ZIP = "Wikipedia_Full.zip"
PROBE_SETS = ("unchanged", "changed", "updated", "new")  # "unchanged" first: it contains "changed"
_PERIOD = re.compile(r"^(\d{4})-(\d{4})$")
_PART = re.compile(r"part(\d+)", re.IGNORECASE)
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a chunk is ~2-3 kB, but never fail on a long cell


def with_defaults(params: dict | None) -> dict:
    return fill("data.temporalwiki", params, where="data.temporalwiki")


# --- what needs the base snapshot -------------------------------------------------------------

def base_needed_by(config: dict) -> list[str]:
    """The settings of a whole config that need the T0 base text (empty: none). Checked
    when the workflow reads its config, so a missing base fails before any job runs."""
    tw = config.get("data", {}).get("temporalwiki", {}) or {}
    model = config.get("model", {}) or {}
    methods = (config.get("train", {}) or {}).get("methods", {}) or {}
    needs = []
    if model.get("source", "scratch") == "scratch":
        needs.append("model.source: scratch (trains the base model on T0 text)")
    elif model.get("teach_t0"):
        needs.append("model.teach_t0: true")
    replay = sorted(m for m, v in methods.items() if (v or {}).get("replay"))
    if replay:
        needs.append(f"replay in train.methods {replay}")
    localised = sorted(m for m, v in methods.items() if (v or {}).get("layers", "all") != "all")
    if localised:
        needs.append(f"layer selection in train.methods {localised} (the profile's control text is T0 text)")
    if tw.get("new_vs_updated") == "split":
        needs.append("data.temporalwiki.new_vs_updated: split (base titles tell new from updated)")
    return needs


def check_base(config: dict) -> None:
    if config.get("data", {}).get("source") != "temporalwiki":
        return
    tw = config["data"].get("temporalwiki", {}) or {}
    needs = base_needed_by(config)
    if needs and not tw.get("download_base"):
        raise InputError(
            "data.temporalwiki.download_base is false, but these settings need TemporalWiki's base "
            "snapshot (Wikipedia_Full/wikipedia_08_gpt2/part*.csv): " + "; ".join(needs) + ". Fix: set "
            "data.temporalwiki.download_base: true (from the hub: Wikipedia_Full.zip, 24.7 GB; with "
            "local_dir: put Wikipedia_Full.zip or its unpacked folder there), or drop those settings.")


# --- files: plain or inside a zip -------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """A data file: a plain file (archive None) or a member of a zip, read as a stream."""
    path: str                   # the file's path, or the member's name inside the archive
    archive: Path | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self.path.replace("\\", "/")).parts

    def open(self) -> io.TextIOBase:
        if self.archive is None:
            return open(self.path, encoding="utf-8", newline="")
        z = zipfile.ZipFile(self.archive)
        return io.TextIOWrapper(z.open(self.path), encoding="utf-8", newline="")

    def header(self) -> list[str]:
        try:
            with self.open() as f:
                return next(csv.reader(f), [])
        except (UnicodeDecodeError, csv.Error, OSError) as e:
            raise InputError(f"{self}: cannot read the header: {e}") from e

    def __str__(self) -> str:
        return f"{self.archive.name}:{self.path}" if self.archive else self.path


def _skip(name: str) -> bool:
    base = PurePosixPath(name).name
    return ("__MACOSX" in name or base.startswith(".") or not base.lower().endswith(".csv"))


def list_files(root: Path) -> list[Member]:
    """Every csv under root, plain or inside a zip (a member whose name is also a plain
    file is read once, from the plain file); .DS_Store, __MACOSX and hidden files skipped."""
    plain = sorted(p for p in root.rglob("*") if p.is_file() and not _skip(str(p)))
    names = {p.name for p in plain}
    out = [Member(str(p)) for p in plain]
    for archive in sorted(root.rglob("*.zip")):
        try:
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if not m.endswith("/") and not _skip(m)]
        except zipfile.BadZipFile:
            raise InputError(f"{archive}: not a valid zip file") from None
        out.extend(Member(m, archive) for m in sorted(members) if PurePosixPath(m).name not in names)
    return out


def period_pattern(period: str) -> re.Pattern:
    """Names a file of `period` may carry: the release's 0809 (diffsets) and 0801-0901
    (probes), or 0801_0901, 08010901, 20210801_20210901."""
    a, b = _PERIOD.match(period).groups()
    return re.compile(rf"(?<!\d)(?:20\d\d)?{a}[-_]?(?:20\d\d)?{b}(?!\d)|(?<!\d){a[:2]}{b[:2]}(?!\d)")


def base_pattern(periods: list[str]) -> re.Pattern:
    """The base snapshot's folder: wikipedia_08_gpt2 for periods starting in 0801."""
    month = _PERIOD.match(periods[0]).group(1)[:2]
    return re.compile(rf"^wikipedia_{month}(_gpt2)?$", re.IGNORECASE)


def probe_set(name: str) -> str | None:
    name = name.lower().replace("_", " ").replace("-", " ")
    for s in PROBE_SETS:
        if re.search(rf"(?<![a-z]){s}(?![a-z])", name):
            return s
    return None


@dataclass
class Layout:
    diffs: dict[str, list[Member]]
    probes: dict[str, dict[str, list[Member]]]
    base: list[Member]
    files: list[Member]


def resolve(root: Path, periods: list[str]) -> Layout:
    """Which files are each period's diffset and probes, and which are the base text, by
    name (period in the file name; base in a wikipedia_MM_gpt2 folder) and by header
    (subject, relation, object: probes; text: chunks). The same for a hub download and
    a local_dir, zipped or unpacked."""
    files = list_files(root)
    patterns = {x: period_pattern(x) for x in periods}
    base_re = base_pattern(periods)
    diffs = {x: [] for x in periods}
    probes = {x: {} for x in periods}
    base = []
    for f in files:
        if any(base_re.match(part) for part in f.parts[:-1]):
            if "text" in f.header():
                base.append(f)
            continue
        hits = [x for x in periods if patterns[x].search(f.name)]
        if not hits:
            continue
        cols = set(f.header())
        if {"subject", "relation"} <= cols and ({"object", "objective"} & cols):
            s = probe_set(f.name)
            if s is None:
                raise InputError(f"{f}: a probe file of period {hits[0]} whose name says none of {PROBE_SETS}")
            probes[hits[0]].setdefault(s, []).append(f)
        elif "text" in cols:
            diffs[hits[0]].append(f)
    base.sort(key=lambda f: (int(m.group(1)) if (m := _PART.search(f.name)) else 0, f.name))
    return Layout(diffs, probes, base, files)


def _snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=allow_patterns)


def fetch(p: dict) -> Path:
    """The folder holding TemporalWiki's files: local_dir, or a hub snapshot of the zips
    (cached by huggingface_hub, so a rerun does not download again)."""
    if p["local_dir"]:
        root = existing(p["local_dir"], "data.temporalwiki.local_dir")
        if not root.is_dir():
            raise InputError(f"{root}: data.temporalwiki.local_dir must be a folder")
        return root
    patterns = HUB_ZIPS + ([HUB_BASE_ZIP] if p["download_base"] else [])
    log.info("downloading %s (revision %s) from the Hugging Face hub: %s", p["hub_id"], p["revision"] or "main",
             patterns)
    try:
        return Path(_snapshot_download(p["hub_id"], p["revision"], patterns))
    except OSError as e:
        from ..hub import offline, offline_error
        if offline():
            raise offline_error(f"dataset {p['hub_id']}", p["revision"], e) from None
        raise


# --- reading chunks -----------------------------------------------------------------------------

def _ends_page(prev: str | None) -> bool:
    """Whether the previous row can be a page's last chunk: a 512-token chunk is cut
    anywhere (mid-sentence), a page's end is a sentence end or a short chunk."""
    if prev is None:
        return True
    tail = prev.rstrip()
    return len(tail) < 1000 or tail.endswith((".", "!", "?", '"', "'", ")", "]"))


def page_title(text: str, prev: str | None) -> str | None:
    """The page title if `text` is a page's first chunk ("Title. Lead ..."), else None."""
    if not _ends_page(prev):
        return None
    head, sep, _ = text.partition(". ")
    head = head.strip()
    if not sep or not head or len(head) > 100 or len(head.split()) > 12 or "\n" in head:
        return None
    return head if (head[0].isupper() or head[0].isdigit()) else None


def read_chunks(files: list[Member]) -> Iterator[tuple[int, str, str, bool]]:
    """(row number, page title, text, is first chunk) of every non-empty row, in order.
    A continuation chunk before any first chunk (a file starting mid-page) has title ''."""
    row = 0
    for f in files:
        prev, title = None, ""
        with f.open() as fh:
            reader = csv.reader(fh)
            head = next(reader, [])
            if "text" not in head:
                raise InputError(f"{f}: no column 'text'; found {head}")
            col = head.index("text")
            try:
                for rec in reader:
                    text = rec[col] if col < len(rec) else ""
                    if text.strip():
                        t = page_title(text, prev)
                        if t is not None:
                            title = t
                        yield row, title, text, t is not None
                        row += 1
                    prev = text
            except (csv.Error, UnicodeDecodeError) as e:
                raise InputError(f"{f}: row {row + 1}: {e}") from e


@dataclass
class Chunks:
    rows: list[tuple[int, str, str]]   # (row number, title, text), in file order
    titles: set[str]                   # every first chunk's title, sample or not
    read: int
    duplicates: int


def sample_chunks(files: list[Member], cap: int | None, seed: int) -> Chunks:
    """Stream `files`, drop duplicate rows, and keep all rows or a uniform sample of
    `cap` (reservoir sampling: memory holds the sample, not the file)."""
    rng = random.Random(seed)
    seen: set[int] = set()
    keep: list[tuple[int, str, str]] = []
    titles: set[str] = set()
    read = dup = n = 0
    for row, title, text, first in read_chunks(files):
        read += 1
        h = hash(text)
        if h in seen:
            dup += 1
            continue
        seen.add(h)
        if first:
            titles.add(title)
        if cap is None or n < cap:
            keep.append((row, title, text))
        else:
            j = rng.randrange(n + 1)
            if j < cap:
                keep[j] = (row, title, text)
        n += 1
    keep.sort()
    return Chunks(keep, titles, read, dup)


# --- probes -------------------------------------------------------------------------------------

def probe_rows(files: list[Member]) -> list[tuple[str, str, str]]:
    out = []
    for f in files:
        with f.open() as fh:
            reader = csv.DictReader(fh)
            obj = "object" if "object" in (reader.fieldnames or []) else "objective"
            for rec in reader:
                s, r, o = (str(rec.get(k) or "").strip() for k in ("subject", "relation", obj))
                if s and r and o:
                    out.append((s, r, o))
    return out


def _missing_error(root: Path, period: str, what: str, files: list[Member]) -> InputError:
    listing = ", ".join(str(f) for f in files[:30])
    more = f" (and {len(files) - 30} more)" if len(files) > 30 else ""
    return InputError(f"{root}: no {what} file for period {period}; data files found: [{listing}]{more}")


def check_layout(p: dict, root, layout) -> tuple[str, bool]:
    """(the base snapshot's month, whether it is read); a missing diffset, probe file or
    needed base snapshot is named with its fix."""
    periods = p["periods"]
    for period in periods:
        if not layout.diffs[period]:
            raise _missing_error(root, period, "diffset (wikipedia_MMMM_gpt2.csv, column 'text')", layout.files)
        if not layout.probes[period]:
            raise _missing_error(root, period, "probe ({period}_changed.csv: subject,relation,object)",
                                 layout.files)
    start = _PERIOD.match(periods[0]).group(1)
    if p["download_base"] and not layout.base:
        raise InputError(
            f"{root}: data.temporalwiki.download_base is true but the base snapshot is not there: expected "
            f"Wikipedia_Full/wikipedia_{start[:2]}_gpt2/part*.csv (column 'text'), unpacked or inside "
            f"{HUB_BASE_ZIP}. Fix: put {HUB_BASE_ZIP} (or its unpacked folder) in the folder, or set "
            f"download_base: false if nothing needs T0 text")
    use_base = p["download_base"] and bool(layout.base)
    if p["new_vs_updated"] == "split" and not use_base:
        raise InputError("data.temporalwiki.new_vs_updated is 'split' but there is no base snapshot to tell new "
                         "from updated entities. Fix: set download_base: true (and provide Wikipedia_Full), "
                         "or new_vs_updated: auto / changed to keep TemporalWiki's single 'changed' set")
    return start, use_base


def load(p: dict, work: Path) -> Corpus:
    p = with_defaults(p)
    periods, cap, seed = p["periods"], p["max_docs_per_period"], p["seed"]
    root = fetch(p)
    layout = resolve(root, periods)
    start, use_base = check_layout(p, root, layout)

    docs, counts, base_titles = [], {}, set()
    if use_base:
        ch = sample_chunks(layout.base, p["max_base_docs"], seed)
        docs.extend((f"T0:{r}", 0, t, x, "full") for r, t, x in ch.rows)
        base_titles = ch.titles
        counts["0"] = {"rows": ch.read, "duplicates": ch.duplicates, "kept": len(ch.rows), "titles": len(ch.titles)}
    split_changed = use_base and p["new_vs_updated"] in ("auto", "split")

    probes, triples = [], []
    known = set(base_titles)  # pages that existed before the period being read
    for k, period in enumerate(periods, 1):
        ch = sample_chunks(layout.diffs[period], cap, seed + k)
        docs.extend((f"{period}:{r}", k, t, x, "diff") for r, t, x in ch.rows)
        counts[str(k)] = {"rows": ch.read, "duplicates": ch.duplicates, "kept": len(ch.rows),
                          "titles": len(ch.titles)}
        sets = layout.probes[period]
        unchanged = probe_rows(sets.get("unchanged", []))
        before = known | {s for s, _, _ in unchanged}
        for set_name in ("unchanged", "changed", "updated", "new"):
            rows = unchanged if set_name == "unchanged" else probe_rows(sets.get(set_name, []))
            for s, r, o in rows:
                label = set_name
                if set_name == "changed" and split_changed:
                    label = "updated" if s in before else "new"
                probes.append((k, label, s, r, o, ""))
                triples.extend([(k - 1, s, s, r, o), (k, s, s, r, o)] if label == "unchanged" else [(k, s, s, r, o)])
        known |= ch.titles | {row[2] for row in probes if row[0] == k}

    subjects = {t[1] for t in triples}
    triples = sorted(set(triples))
    triple_rows = [(*t, t[4] if entity_like(t[4], subjects) else None) for t in triples]
    entities = entities_from_triples([t[1] for t in triples], [t[4] for t in triples], type_="item")
    how = ("split into new/updated by base titles" if split_changed
           else "kept as TemporalWiki's single 'changed' set" + ("" if use_base else " (no base snapshot)"))
    log.info("temporalwiki: changed probes %s; rows read/duplicates/kept per snapshot %s", how, counts)
    return Corpus(
        source="temporalwiki",
        labels=[start] + list(periods),
        documents=frame(docs, DOC_COLUMNS),
        triples=frame(triple_rows, TRIPLE_COLUMNS),
        entities=entities,
        probes=frame(probes, PROBE_COLUMNS),
        base_missing=not use_base,
        notes={"base_snapshot": "present" if use_base else "missing",
               "changed_probes": "split" if split_changed else "changed",
               "changed_probes_how": how,
               "chunks": counts,
               "files": {period: {"diff": [str(f) for f in layout.diffs[period]],
                                  "probes": {s: [str(f) for f in fs] for s, fs in layout.probes[period].items()}}
                         for period in periods},
               "base_files": [str(f) for f in layout.base] if use_base else []},
    )
