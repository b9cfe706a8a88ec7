"""Stage 2, `gradloc split`: the corpus cut into training sequences per period.

TemporalWiki's sense of a split: T0 (snapshot 0) is the base text; each update period k
trains on the *difference* between snapshot k-1 and k: articles new in k, plus only the
sentences added (or rewritten) in articles present in both. Sources that ship diffs
already (`kind=diff`, TWiki-Diffsets) pass through unchanged. A deterministic share of
each period's diff sequences is held out for perplexity.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from . import schema
from .core import stable_unit
from .io import InputError, atomic_output, read_json, read_table, write_json, write_parquet

log = logging.getLogger(__name__)

# Sequences stay below this many characters (a few hundred tokens), so the model's
# context and the tagger's spans see whole sentences rather than truncated ones.
MAX_SEQ_CHARS = 1500
DOC_COLUMNS = ["doc_id", "snapshot", "title", "text", "kind"]
SEQ_COLUMNS = ["seq_id", "period", "split", "doc_id", "origin", "text"]

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and the
# next one starts with a capital, digit or opening quote; this keeps "e.g. the" and
# "3.5 m" intact without a language model.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_PARAGRAPH = re.compile(r"\n\s*\n|\n")


def with_defaults(params: dict | None) -> dict:
    return schema.fill("split", params, where="split")


# --- reading the corpus -----------------------------------------------------------------

def load_documents(corpus: str | Path) -> pd.DataFrame:
    path = Path(corpus) / "documents.parquet"
    docs = read_table(path, DOC_COLUMNS)
    bad = sorted(set(docs["kind"]) - {"full", "diff"})
    if bad:
        raise InputError(f"{path}: column 'kind' has values {bad}; expected 'full' or 'diff'")
    try:
        docs["snapshot"] = docs["snapshot"].astype(int)
    except (TypeError, ValueError):
        raise InputError(f"{path}: column 'snapshot' must hold integers") from None
    docs["doc_id"] = docs["doc_id"].astype(str)
    docs["text"] = docs["text"].fillna("").astype(str)
    dup = docs[docs["kind"] == "full"].duplicated(["doc_id", "snapshot"])
    if dup.any():
        row = docs[docs["kind"] == "full"][dup].iloc[0]
        raise InputError(f"{path}: doc_id {row['doc_id']!r} appears twice as kind=full in snapshot {row['snapshot']}")
    return docs


def snapshot_labels(corpus: str | Path, docs: pd.DataFrame) -> dict[int, str]:
    """{index: label} from the corpus manifest; every document's snapshot must be listed."""
    path = Path(corpus) / "manifest.json"
    manifest = read_json(path)
    if not isinstance(manifest, dict) or "snapshots" not in manifest:
        raise InputError(f"{path}: missing key 'snapshots'")
    try:
        labels = {int(s["index"]): str(s["label"]) for s in manifest["snapshots"]}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: 'snapshots' must be a list of {{index, label}}") from None
    if 0 not in labels or len(labels) < 2:
        raise InputError(f"{path}: 'snapshots' needs index 0 (T0) and at least one update period")
    if sorted(labels) != list(range(len(labels))):
        raise InputError(f"{path}: snapshot indices must be 0..n, got {sorted(labels)}")
    unknown = sorted(set(docs["snapshot"]) - set(labels))
    if unknown:
        raise InputError(f"{Path(corpus) / 'documents.parquet'}: snapshot(s) {unknown} not listed in {path}")
    return labels


# --- text helpers ------------------------------------------------------------------------

def split_sentences(text: str) -> list[str]:
    """Sentences of a text, paragraph breaks always ending a sentence."""
    out = []
    for para in _PARAGRAPH.split(text):
        out.extend(s.strip() for s in _SENTENCE_END.split(para) if s.strip())
    return out


def _pack(pieces: list[str], sep: str, max_chars: int) -> list[str]:
    """Greedily join consecutive pieces while the result stays within max_chars."""
    chunks, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + len(sep) + len(piece) > max_chars:
            chunks.append(cur)
            cur = piece
        else:
            cur = f"{cur}{sep}{piece}" if cur else piece
    if cur:
        chunks.append(cur)
    return chunks


def _hard_wrap(text: str, max_chars: int) -> list[str]:
    """Last resort for one overlong sentence: cut at spaces (or anywhere, if none)."""
    pieces = []
    for word in text.split(" "):
        pieces.extend(word[i:i + max_chars] for i in range(0, len(word), max_chars))
    return _pack(pieces, " ", max_chars)


def chunk_text(text: str, max_chars: int = MAX_SEQ_CHARS) -> list[str]:
    """Cut a text into pieces below max_chars at paragraph, then sentence boundaries."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces = []
    for para in (p.strip() for p in _PARAGRAPH.split(text)):
        if len(para) <= max_chars:
            pieces.extend([para] if para else [])
            continue
        # An overlong paragraph becomes several pieces of whole sentences.
        sents = []
        for sent in split_sentences(para):
            sents.extend([sent] if len(sent) <= max_chars else _hard_wrap(sent, max_chars))
        pieces.extend(_pack(sents, " ", max_chars))
    return _pack(pieces, "\n", max_chars)


def added_sentences(old: str, new: str, min_chars: int = 20) -> list[str]:
    """Sentences of `new` that are not in `old`: difflib over the two sentence lists,
    keeping inserted and replaced sentences (TWiki-Diffsets' rule), minus short ones."""
    a, b = split_sentences(old), split_sentences(new)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    out = []
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag in ("insert", "replace"):
            out.extend(s for s in b[j1:j2] if len(s) >= min_chars)
    return out


def _rows(period: int, doc_id: str, origin: str, text: str, split: str) -> list[dict]:
    return [
        {"seq_id": f"P{period}:{doc_id}:{i}", "period": period, "split": split,
         "doc_id": doc_id, "origin": origin, "text": chunk}
        for i, chunk in enumerate(chunk_text(text))
    ]


def base_sequences(docs: pd.DataFrame) -> list[dict]:
    t0 = docs[(docs["snapshot"] == 0) & (docs["kind"] == "full")]
    rows = []
    for doc_id, text in zip(t0["doc_id"], t0["text"]):
        rows.extend(_rows(0, doc_id, "base", text, "base"))
    return rows


def period_sequences(docs: pd.DataFrame, k: int, min_chars: int) -> list[dict]:
    """The diff of update period k (all rows split=train; held-out chosen later)."""
    prev = docs[(docs["snapshot"] == k - 1) & (docs["kind"] == "full")]
    prev_text = dict(zip(prev["doc_id"], prev["text"]))
    cur = docs[docs["snapshot"] == k]
    rows = []
    for doc_id, text, kind in tqdm(list(zip(cur["doc_id"], cur["text"], cur["kind"])),
                                   desc=f"diff P{k}", leave=False, mininterval=2):
        if kind == "diff":
            rows.extend(_rows(k, doc_id, "diff", text, "train"))
        elif doc_id not in prev_text:
            rows.extend(_rows(k, doc_id, "new_doc", text, "train"))
        elif text != prev_text[doc_id]:
            added = added_sentences(prev_text[doc_id], text, min_chars)
            if added:
                rows.extend(_rows(k, doc_id, "added_sentences", " ".join(added), "train"))
    # kind=diff and kind=full rows of one doc_id could both be in a period: keep ids unique.
    seen: dict[str, int] = {}
    for r in rows:
        n = seen.get(r["seq_id"], 0)
        seen[r["seq_id"]] = n + 1
        if n:
            r["seq_id"] = f"{r['seq_id']}.{r['origin']}{n}"
    return rows


def mark_heldout(rows: list[dict], fraction: float, seed: int) -> None:
    """Hold out round(fraction * n) of one period's sequences, chosen by a stable hash of
    seq_id and seed (so the choice does not depend on row order); at least one when
    fraction > 0 and the period has two or more sequences, never all of them."""
    n = len(rows)
    if fraction <= 0 or n < 2:
        return
    n_out = min(max(1, round(fraction * n)), n - 1)
    ranked = sorted(rows, key=lambda r: (stable_unit(f"{r['seq_id']}|{seed}"), r["seq_id"]))
    for r in ranked[:n_out]:
        r["split"] = "heldout"


def build_sequences(docs: pd.DataFrame, periods: list[int], params: dict,
                    base_missing: bool = False) -> pd.DataFrame:
    """All sequences: T0 base text, then each update period's diff. `base_missing`: the
    corpus says snapshot 0 is empty by design (TemporalWiki without its base dump)."""
    p = with_defaults(params)
    rows = base_sequences(docs)
    if not rows and not base_missing:
        raise InputError("documents.parquet: snapshot 0 has no kind=full documents (T0 base text)")
    if not rows:
        log.warning("split: the corpus has no T0 text (manifest: base_snapshot missing); no base "
                    "sequences for the base model, replay or the profile's control")
    for k in periods:
        period_rows = period_sequences(docs, k, int(p["min_sentence_chars"]))
        if not period_rows:
            raise InputError(f"update period {k}: empty diff (no new documents, added sentences "
                             f"or kind=diff documents relative to snapshot {k - 1})")
        mark_heldout(period_rows, float(p["heldout_fraction"]), int(p["seed"]))
        rows.extend(period_rows)
    return pd.DataFrame(rows, columns=SEQ_COLUMNS)


def count_table(seqs: pd.DataFrame) -> dict:
    """{period: {split: {origin: n}}} for the manifest and the log."""
    counts: dict = {}
    for (period, split, origin), n in seqs.groupby(["period", "split", "origin"]).size().items():
        counts.setdefault(str(period), {}).setdefault(split, {})[origin] = int(n)
    return counts


def run(params: dict, corpus: str, out: str) -> None:
    p = with_defaults(params)
    docs = load_documents(corpus)
    labels = snapshot_labels(corpus, docs)
    periods = [k for k in sorted(labels) if k > 0]
    base_missing = read_json(Path(corpus) / "manifest.json").get("base_snapshot") == "missing"
    seqs = build_sequences(docs, periods, p, base_missing)
    counts = count_table(seqs)
    manifest = {
        "base": {"index": 0, "label": labels[0]},
        "periods": [{"index": k, "label": labels[k]} for k in periods],
        "counts": counts,
        "n_sequences": int(len(seqs)),
        "base_missing": bool((seqs["period"] == 0).sum() == 0),
        "params": p,
    }
    with atomic_output(out) as tmp:
        write_parquet(seqs, tmp / "sequences.parquet")
        write_json(manifest, tmp / "manifest.json")
    summary = "; ".join(
        f"P{k}: " + ", ".join(f"{s}/{o}={n}" for s, by in sorted(counts[str(k)].items()) for o, n in sorted(by.items()))
        for k in [0, *periods] if str(k) in counts)
    log.info("split: %d sequences; %s", len(seqs), summary)
