"""The token files of the `tokens` stage (`docs.parquet` and a flat id file with per-
document offsets): one reader for every stage that reads them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .io import InputError, read_json, read_table


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and merges: token files made with another
    tokenizer are refused instead of silently mis-read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Tokens:
    """A token folder, memory-mapped: `docs` (the index) and `ids` (all tokens)."""
    path: Path
    docs: pd.DataFrame
    ids: np.ndarray
    meta: dict

    def select(self, **where) -> pd.DataFrame:
        """Index rows whose columns equal the given values, e.g. select(period=1, split="train")."""
        mask = np.ones(len(self.docs), dtype=bool)
        for key, value in where.items():
            mask &= (self.docs[key] == value).to_numpy()
        return self.docs[mask]

    def doc(self, offset: int, length: int) -> np.ndarray:
        return np.asarray(self.ids[offset:offset + length], dtype=np.int64)

    def docs_of(self, rows: pd.DataFrame) -> list[np.ndarray]:
        return [self.doc(o, n) for o, n in zip(rows["offset"].to_numpy(), rows["length"].to_numpy())]


def load(path, tokenizer=None) -> Tokens:
    """Open a token folder; with `tokenizer`, check it is the one the tokens were made with."""
    path = Path(path)
    meta = read_json(path / "meta.json")
    docs = read_table(path / "docs.parquet", ["seq_id", "period", "split", "offset", "length"])
    ids = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r") if meta["n_tokens"] else \
        np.zeros(0, dtype=meta["dtype"])
    if len(ids) != meta["n_tokens"]:
        raise InputError(f"{path / 'tokens.bin'}: {len(ids)} tokens, meta.json says {meta['n_tokens']} "
                         "(a truncated file: rerun `gradloc tokens`)")
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != meta["tokenizer"]:
        raise InputError(f"{path}: made with another tokenizer than the model's; rerun `gradloc tokens` "
                         "with this model")
    return Tokens(path, docs, ids, meta)
