"""Figure 3, throughput: tokens/s of `gradloc.train.run` (full fine-tuning, reading a
tokens folder made by `gradloc.tokens.run`) / tokens/s of Hugging Face `Trainer` on the
same blocks, model, batch, fp32 CPU, lr, weight decay, clip and linear schedule
(Trainer's defaults otherwise, i.e. its fused AdamW). Loop time only: `metrics.json`
`wall_time_s` against `train_runtime`; the two runs alternate (round robin)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from .common import gpt2, interleaved, median, row, silenced

TARGET = 1.0  # the issue's: at least as fast as Trainer (aim 1.1)


def char_tokenizer():
    """One token per printable character, id 0 = EOS = pad: a block of T characters is T tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def synthetic_world(root: Path, size, seq_len: int, n_blocks: int) -> tuple[Path, Path]:
    """(base_model folder, tokens folder): a GPT-2 with the character tokenizer, and the
    tokens of a tagged folder whose period-1 diff is `n_blocks` blocks of `seq_len`
    tokens (documents of 4 blocks with their EOS, none padded), made by `gradloc tokens`."""
    import numpy as np
    import pandas as pd

    from gradloc import tokens
    from gradloc.models import save_model

    save_model(gpt2(*size, seq_len), char_tokenizer(), root / "base_model" / "model")
    rng = np.random.default_rng(0)
    words = ["river", "alice", "works", "at", "acme", "moved", "to", "oslo", "born", "in", "the", "of"]
    doc_len = seq_len * 4 - 1  # + EOS: four blocks per document
    texts = [" ".join(rng.choice(words, doc_len))[:doc_len] for _ in range(math.ceil(n_blocks / 4))]
    rows = [{"seq_id": f"s{i}", "period": 1, "split": "train", "doc_id": f"d{i}", "origin": "diff",
             "text": t, "knowledge_type": "none"} for i, t in enumerate(texts)]
    rows.append({"seq_id": "b0", "period": 0, "split": "base", "doc_id": "b0", "origin": "base",
                 "text": "base text", "knowledge_type": "none"})
    (root / "tagged").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "tagged" / "sequences.parquet")
    with silenced():
        tokens.run({}, model=root / "base_model", tagged=root / "tagged", out=root / "tokens")
    return root / "base_model", root / "tokens"


def ours_throughput(init: Path, tokens: Path, out: Path, batch: int, seq_len: int) -> tuple[int, float]:
    """(tokens, seconds of the training loop) of `gradloc.train.run`, full fine-tuning."""
    from gradloc import train

    shutil.rmtree(out, ignore_errors=True)
    params = {"name": "full", "method": {},
              "common": {"lr": 1e-4, "epochs": 1, "batch_size": batch, "seq_len": seq_len, "precision": "no",
                         "grad_clip": 1.0, "weight_decay": 0.01, "warmup_ratio": 0.0, "schedule": "linear",
                         "log_every": 10**9}}
    with silenced():  # the progress bar
        metrics = train.run(params, init=init, tokens=tokens, period=1, seed=0, out=out)
    return int(metrics["tokens"]), float(metrics["wall_time_s"])


def trainer_blocks(init: Path, tokens: Path, seq_len: int):
    """(model, blocks as Trainer examples, scored tokens): the blocks `gradloc train` cuts."""
    from gradloc import engine, train
    from gradloc.models import load_model
    from gradloc.tokens import load

    model, tokenizer = load_model(init / "model", dtype=torch.float32)
    toks = load(tokens, tokenizer)
    diff, _ = train.period_docs(toks, 1)
    blocks = engine.cut_blocks(engine.with_eos(diff, toks.meta["eos_id"]), seq_len, toks.meta["pad_id"] or 0)
    data = [{"input_ids": x, "labels": y, "attention_mask": (y != -100).long()}
            for x, y in zip(blocks["input_ids"], blocks["labels"])]
    return model, data, int((blocks["labels"][:, 1:] != -100).sum())


def trainer_throughput(init: Path, tokens: Path, out: Path, batch: int, seq_len: int) -> tuple[int, float]:
    """(tokens, `train_runtime`) of transformers.Trainer on the same blocks, model, batch,
    fp32 CPU, AdamW lr 1e-4 wd 0.01, clip 1.0, linear schedule, one epoch."""
    from transformers import Trainer, TrainingArguments

    model, data, n_tokens = trainer_blocks(init, tokens, seq_len)
    shutil.rmtree(out, ignore_errors=True)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                             learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
                             warmup_steps=0, logging_strategy="no", save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    with silenced():  # Trainer prints its metrics
        result = Trainer(model=model, args=args, train_dataset=data).train()
    return n_tokens, float(result.metrics["train_runtime"])


def run(size, batch: int, seq_len: int, steps: int, reps: int, workdir: Path) -> list[dict]:
    init, tokens = synthetic_world(workdir / "world", size, seq_len, steps * batch)
    got = {"ours": [], "trainer": []}

    def ours():
        got["ours"].append(ours_throughput(init, tokens, workdir / "ours", batch, seq_len))

    def trainer():
        got["trainer"].append(trainer_throughput(init, tokens, workdir / "trainer", batch, seq_len))

    interleaved({"ours": ours, "trainer": trainer}, reps)
    rates = {k: [tok / sec for tok, sec in v[1:]] for k, v in got.items()}  # [0] is the warm-up
    if got["ours"][0][0] != got["trainer"][0][0]:
        raise RuntimeError(f"the two runs scored different token counts: {got['ours'][0][0]} vs {got['trainer'][0][0]}")
    ratio = median([a / b for a, b in zip(rates["ours"], rates["trainer"])])
    s = f"{size[0]}x{size[1]}, B={batch}, T={seq_len}, {steps} steps, full fine-tuning"
    return [row(3, f"gradloc train / HF Trainer tokens/s, {s}", ratio, op=">=", target=TARGET),
            row(3, f"gradloc train tokens/s, {s}", median(rates["ours"]), "tokens/s"),
            row(3, f"HF Trainer tokens/s, {s}", median(rates["trainer"]), "tokens/s")]
