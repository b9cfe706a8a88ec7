"""Stage `gradloc tokens`: every tagged sequence tokenized once, with the base model's
tokenizer, into one flat token file with per-document offsets (nanoGPT's `train.bin`
plus an index). Training, profiling and evaluation read these instead of tokenizing
the text again in every job.

Outputs `tokens/`:
- `tokens.bin`: the token ids of all sequences, back to back, no separators
  (`meta.json` names the dtype: uint16 when the vocabulary fits, else uint32);
- `docs.parquet`: one row per sequence, in `sequences.parquet` order: `seq_id`,
  `period`, `split`, `knowledge_type`, `offset` and `length` (in tokens);
- `meta.json`: dtype, vocabulary size, EOS id, the leading special ids the tokenizer
  adds by default (BOS for Llama), and the tokenizer's fingerprint.

Ids are those of `tokenizer(text, add_special_tokens=False)`; readers add EOS between
documents (training) or the leading special ids (scoring) themselves.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .io import InputError, atomic_output, read_table, write_json
from .tokenfiles import Tokens, load, tokenizer_fingerprint  # noqa: F401  (gradloc.tokens.load reads them)

log = logging.getLogger(__name__)

CHUNK = 2048  # texts per tokenizer call


def run(params: dict, model, tagged, out) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from .models import checkpoint_dir
    from .scoring import leading_special_ids

    if params:
        raise InputError(f"tokens params: unknown key(s) {sorted(params)}; this stage has no settings")
    folder = checkpoint_dir(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: no usable tokenizer ({e})") from None
    path = Path(tagged) / "sequences.parquet"
    seqs = read_table(path, ["seq_id", "period", "split", "text"])
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    lengths = np.zeros(len(seqs), dtype=np.int64)
    texts = seqs["text"].astype(str).tolist()
    with atomic_output(out) as tmp, open(tmp / "tokens.bin", "wb") as f:
        for start in tqdm(range(0, len(texts), CHUNK), desc="tokenize", file=sys.stderr, mininterval=5):
            ids = tokenizer(texts[start:start + CHUNK], add_special_tokens=False, verbose=False)["input_ids"]
            for i, row in enumerate(ids):
                lengths[start + i] = len(row)
            flat = np.concatenate([np.asarray(row, dtype=np.int64) for row in ids]) if ids else np.zeros(0, np.int64)
            if flat.size and (flat.min() < 0 or flat.max() >= 2 ** (8 * np.dtype(dtype).itemsize)):
                raise InputError(f"{folder}: token id out of range for {np.dtype(dtype).name}")
            flat.astype(dtype).tofile(f)
        docs = pd.DataFrame({
            "seq_id": seqs["seq_id"].astype(str).to_numpy(), "period": seqs["period"].astype(int).to_numpy(),
            "split": seqs["split"].astype(str).to_numpy(),
            "knowledge_type": (seqs["knowledge_type"].astype(str) if "knowledge_type" in seqs
                               else pd.Series("none", index=seqs.index)).to_numpy(),
            "offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), "length": lengths})
        docs.to_parquet(tmp / "docs.parquet", index=False)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        write_json({"dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": eos,
                    "pad_id": tokenizer.pad_token_id, "leading_special_ids": leading_special_ids(tokenizer),
                    "n_tokens": int(lengths.sum()), "n_docs": len(docs),
                    "tokenizer": tokenizer_fingerprint(tokenizer)}, tmp / "meta.json")
    log.info("tokens: %d sequences, %d tokens (%s) with the tokenizer of %s", len(docs), int(lengths.sum()),
             np.dtype(dtype).name, folder)


