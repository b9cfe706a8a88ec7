"""What several stages share and no stage owns: stable hashing, word boundaries, spans to token marks,
the rule that no training input reads the evaluation probes, the subnetwork mask file
format, and which units are layer-selection candidates."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .io import InputError, read_json, read_table


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def on_word_boundary(text: str, start: int, end: int) -> bool:
    """A match may not cut a word: "Ann" in "Anna" or "Joanne" is no mention. Edges that
    are punctuation themselves (an alias like "U.S.") need no boundary."""
    left_ok = start == 0 or not (_is_word(text[start - 1]) and _is_word(text[start]))
    right_ok = end == len(text) or not (_is_word(text[end - 1]) and _is_word(text[end]))
    return left_ok and right_ok


def stable_unit(key: str) -> float:
    """A number in [0, 1) from a string, the same on every machine and Python run
    (Python's hash() is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64




# A subnetwork's mask target kind -> the profile's knowledge type (subnet masks vs TGL).
TGL_TYPE = {"outdated": "updated", "unchanged": "unchanged"}


def marks(tokenizer, texts: list[str], ids: list[np.ndarray], spans: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    """1 for each token overlapping one of its text's character spans."""
    out = []
    for text, doc, sp in zip(texts, ids, spans):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        m = np.zeros(len(doc), dtype=np.uint8)
        if list(enc["input_ids"]) == doc.tolist():  # else: unmarked (cannot align)
            for t, (a, b) in enumerate(enc["offset_mapping"]):
                m[t] = any(a < e and s < b for s, e in sp)
        out.append(m)
    return out


def spans_of(rows: pd.DataFrame, tagged, corpus, period: int) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """(text, [entity mention spans + fact object occurrences]) of each row's sequence.
    Fact objects are those of the corpus' triples of snapshot `period` whose subject the
    sequence mentions (`tagged/mentions.parquet`); every occurrence in the text counts.
    The evaluation probes are not read: no test answer marks a token. A corpus that ships
    its probes (`probes_raw.parquet`: TemporalWiki, ECBD) made its triples from them, so
    there only the mentions count."""
    from .facts import read_triples, subject_objects

    seqs = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "text"]).set_index("seq_id")["text"]
    mentions = read_table(Path(tagged) / "mentions.parquet", ["seq_id", "entity_id", "start", "end"])
    by_seq = mentions.groupby("seq_id")[["start", "end"]].apply(lambda g: list(zip(g["start"], g["end"])))
    subjects = mentions.groupby("seq_id")["entity_id"].apply(lambda g: sorted(set(g.astype(str))))
    shipped = corpus and (Path(corpus) / "probes_raw.parquet").exists()
    objects_of = subject_objects(read_triples(corpus), int(period)) if corpus and not shipped else {}
    texts, spans = [], []
    for sid in rows["seq_id"]:
        text = str(seqs.get(sid, ""))
        sp = list(by_seq.get(sid, []))
        for o in sorted({o for e in subjects.get(sid, []) for o in objects_of.get(e, [])}):
            start = text.find(o)
            while start >= 0:
                sp.append((start, start + len(o)))
                start = text.find(o, start + 1)
        texts.append(text)
        spans.append(sp)
    return texts, spans


def no_probes(probes, stage: str) -> None:
    """The old `--probes` input: refused, naming what replaced it."""
    if probes:
        raise InputError(f"{stage}: --probes is no longer read (the marks must not see the evaluation probes' "
                         "objects); pass --corpus (the corpus folder: its triples give the fact objects)")




def is_candidate(unit: str) -> bool:
    return re.match(r"^block\.\d+(\.\w+)?$", unit) is not None


def unpack(arrays) -> dict[str, np.ndarray]:
    """Inverse of `pack` (also reads an opened .npz)."""
    names = [k for k in arrays.keys() if not k.endswith(".shape")]
    out = {}
    for name in names:
        shape = tuple(int(x) for x in arrays[name + ".shape"])
        out[name] = np.unpackbits(arrays[name], count=int(np.prod(shape))).reshape(shape).astype(bool)
    return out


def attention_scores(folder, toks, period: int) -> dict[str, list[np.ndarray]]:
    """The `attention` stage's scores of `period`'s train documents, split per document
    (large, small, marked)."""
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    if meta["tokenizer"] != toks.meta["tokenizer"] or int(meta["period"]) != int(period):
        raise InputError(f"{folder}: scores of period {meta['period']} with tokenizer {meta['tokenizer']}, "
                         f"expected period {period} with {toks.meta['tokenizer']}; rerun `gradloc attention`")
    lengths = toks.select(period=period, split="train")["length"].to_numpy()
    cuts = np.cumsum(lengths)[:-1]
    out = {}
    for name in ("large", "small", "marked"):
        values = np.load(folder / f"{name}.npy")
        if len(values) != lengths.sum():
            raise InputError(f"{folder}/{name}.npy: {len(values)} values for {lengths.sum()} tokens")
        out[name] = np.split(values, cuts)
    return out
