"""Shared test helpers: the tiny tokenizers and models the tests train and score, the
token files a stage reads, and the one way tests run Snakemake."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, id 0 = <eos> (also pad)."""
    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace-split words; `words` must start with "<eos>", "<unk>"."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64, seed: int = 0,
              **config) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size,
                                      n_positions=n_positions, bos_token_id=0, eos_token_id=0, **config))


# --- one builder per stage folder: the columns each stage writes, defaults for the rest --

SEQUENCE_COLUMNS = ["seq_id", "period", "split", "doc_id", "origin", "text", "knowledge_type"]  # tagged/sequences
SEQUENCE_DEFAULTS = {"period": 1, "split": "train", "origin": "diff", "knowledge_type": "none"}


def write_tagged(folder, rows, mentions=None) -> Path:
    """A `tagged` folder: sequences.parquet from `rows` (dicts or a DataFrame; missing
    columns get seq_id s{i}, doc_id d{i} and SEQUENCE_DEFAULTS) and, given, mentions.parquet."""
    import pandas as pd

    df = pd.DataFrame(rows).copy()
    n = len(df)
    for column, value in {"seq_id": [f"s{i}" for i in range(n)], "doc_id": [f"d{i}" for i in range(n)],
                          **SEQUENCE_DEFAULTS}.items():
        if column not in df:
            df[column] = value
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    df[[*SEQUENCE_COLUMNS, *(c for c in df.columns if c not in SEQUENCE_COLUMNS)]].to_parquet(
        folder / "sequences.parquet")
    if mentions is not None:
        pd.DataFrame(mentions).to_parquet(folder / "mentions.parquet")
    return folder


def write_probes(folder, probes) -> Path:
    """A `probes` folder: probes.parquet from a DataFrame (or dicts)."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(probes).to_parquet(folder / "probes.parquet")
    return folder


def tokens_world(root, model_dir, rows, mentions=None) -> Path:
    """root/tagged from `rows` (write_tagged) and root/tokens made from it with the
    tokenizer of `model_dir` (the tokens stage)."""
    root = Path(root)
    write_tagged(root / "tagged", rows, mentions)
    return make_tokens(model_dir, root / "tagged", root / "tokens")


def make_tokens(model_dir, tagged_dir, out) -> Path:
    """Run the tokens stage (the base model's tokenizer over tagged/sequences.parquet)."""
    from gradloc import tokens

    tokens.run({}, model=model_dir, tagged=tagged_dir, out=out)
    return Path(out)


def snakemake(*args, cwd=ROOT, env: dict | None = None, timeout: int = 1200, check: bool = False):
    """`python -m snakemake ARGS` from the repository root (so profiles/default applies,
    as for a user); with `check`, a failure raises with the end of its output."""
    cmd = [sys.executable, "-m", "snakemake", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def make_subnet(model, out, densities: dict[int, float], period: int = 1, seeds=(0, 1)) -> Path:
    """A `gradloc subnet` folder for `model` with random weight masks of `outdated_P{period}`:
    block b's matrices masked at rate densities[b] (masks/*.npz and density.csv, as the stage writes)."""
    import numpy as np
    import pandas as pd

    from gradloc import subnet

    out = Path(out)
    (out / "masks").mkdir(parents=True)
    targets = subnet.mask_targets(model)
    name, tables = f"outdated_P{period}", []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        masks = {n: rng.random(shape) < densities[layer] for n, (_, layer, shape) in targets.items()}
        np.savez(out / "masks" / f"{name}_seed{seed}.npz", **subnet.pack(masks))
        tables.append(subnet.density_table(model, targets, masks).assign(knowledge_set=name, kind="outdated",
                                                                           period=period, seed=seed))
    pd.concat(tables).to_csv(out / "density.csv", index=False)
    return out


def job_counts(out: str) -> dict[str, int]:
    """{rule: count} from a Snakemake dry run's job-stats table."""
    table = out[out.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def tiny_train_world(root) -> Path:
    """root/base_model (a 2-block GPT-2, character tokenizer) and root/tokens over 12 base
    and 8 period-1 documents: the inputs of `gradloc train --period 1`."""

    from gradloc.models import save_model

    root = Path(root)
    save_model(tiny_gpt2(96, n_layer=2), char_tokenizer(), root / "base_model" / "model")
    rows = [("base", 0, f"Base {i}: river {i % 3} is long and wide.") for i in range(12)]
    rows += [("train", 1, f"New {i}: Alice {i} works at Acme now.") for i in range(8)]
    tokens_world(root, root / "base_model", [{"period": p, "split": s, "text": t} for s, p, t in rows])
    return root
