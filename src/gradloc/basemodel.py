"""The base model: the language model that "knows" T0 before continual pretraining.

`source: scratch` (the embedded default) trains a byte-level BPE tokenizer and a small
GPT-2 on the T0 text (split `base`), so that the T0 facts are known and a later
update has an old value to overwrite. `source: pretrained` loads a hub id or local
folder, `source: gguf` a GGUF file; with `teach_t0` either one is fine-tuned on T0
text the same way.

Outputs `base_model/`: `model/` (save_pretrained), `metrics.json` (T0 probe accuracy
and perplexity, training loss, parameter count, time), `train_log.csv` (step, loss, lr).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from . import modelcard, schema, tracking
from .io import InputError, atomic_output, read_table, write_json
from .models import device, load_configured, max_positions, save_model
from .scoring import fmt_ppl, score_probes, summarize

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"



def with_defaults(params: dict | None) -> dict:
    out = schema.fill("model", params, where="model")
    if out["source"] != "scratch" and not out["name_or_path"] and not out["package"]:
        raise InputError(f"model: source {out['source']!r} needs name_or_path or package")
    if out["source"] == "gguf" and not out["gguf_file"] and not out["package"]:
        raise InputError("model: source 'gguf' needs gguf_file")
    return out


def heldout_base_ids(seq_ids, fraction: float, seed: int) -> list[str]:
    """T0 sequences held out from base-model training (the profile's `heldout_base`
    control): round(fraction * n) of them (at least one when fraction > 0, never all),
    ranked by a stable hash of seq_id and seed, so the choice does not depend on row order."""
    from .core import stable_unit

    ids = sorted(map(str, seq_ids))
    if fraction <= 0 or len(ids) < 2:
        return []
    n_out = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    return sorted(sorted(ids, key=lambda s: (stable_unit(f"{s}|heldout_base|{seed}"), s))[:n_out])


def t0_texts(split_dir, exclude=()) -> list[str]:
    path = Path(split_dir) / "sequences.parquet"
    df = read_table(path, ["seq_id", "split", "text"])
    df = df[df["split"] == "base"]
    if df.empty:
        raise InputError(f"{path}: no T0 text (rows with split == 'base')")
    df = df[~df["seq_id"].astype(str).isin(set(exclude))]
    return df["text"].astype(str).tolist()


def t0_ids(split_dir) -> list[str]:
    df = read_table(Path(split_dir) / "sequences.parquet", ["seq_id", "split"])
    return df.loc[df["split"] == "base", "seq_id"].astype(str).tolist()


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style: no unknown tokens) wrapped as a fast HF tokenizer
    whose BOS, EOS and pad are one `<|endoftext|>` token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def build_gpt2(arch: dict, tokenizer):
    """A GPT-2 without dropout: the small model has to memorise the T0 facts in few steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=arch["n_positions"], n_embd=arch["n_embd"],
                        n_layer=arch["n_layer"], n_head=arch["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and joined, each followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class Windows:
    """Training rows of base-model pretraining: row i is the `seq_len` window of the T0
    token stream at `starts[i]` (nanoGPT's get_batch: windows drawn with a seeded
    generator, so every fact is seen at many offsets and with its preceding context)."""

    def __init__(self, stream: torch.Tensor, starts: torch.Tensor, seq_len: int):
        self.stream, self.starts, self.seq_len = stream, starts, seq_len

    def __getitems__(self, rows: list[int]) -> dict:
        x = torch.stack([self.stream[s:s + self.seq_len] for s in self.starts[rows].tolist()])
        return {"input_ids": x, "labels": x}


def pretrain(model, tokenizer, texts: list[str], pre: dict, state=None, accelerator=None, tracker=None):
    """Train `model` on random windows of the T0 token stream with the shared engine
    (AdamW, betas 0.9/0.95, weight decay on matrices only, linear warm-up then cosine
    decay to `min_lr_ratio` x lr). Returns (trained model, log rows: step, loss, lr)."""
    from . import engine

    stream = token_stream(tokenizer, texts)
    max_pos = max_positions(model)
    seq_len = min(pre["seq_len"], len(stream) - 1, max_pos or pre["seq_len"])
    if seq_len < 2:
        raise InputError(f"T0 text too short to train on ({len(stream)} tokens)")
    steps, B = pre["steps"], pre["batch_size"]
    gen = torch.Generator().manual_seed(pre["seed"])
    accelerator = accelerator or engine.make_accelerator(pre["precision"])
    W = accelerator.num_processes  # batch_size windows per process and step
    starts = torch.cat([torch.randint(0, len(stream) - seq_len, (B * W,), generator=gen) for _ in range(steps)])
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pre["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=pre["lr"], betas=(0.9, 0.95))
    sched = engine.make_scheduler(opt, "cosine_with_min_lr", steps, max(1, int(pre["warmup_ratio"] * steps)), W,
                                  min_lr_rate=pre["min_lr_ratio"])
    batches = engine.StepBatches(lambda s: torch.arange(s * B * W, (s + 1) * B * W), steps, 1, W)
    fp = engine.fingerprint(pre, [], hashlib.sha256(stream.numpy().tobytes()).hexdigest(), model.config.to_json_string(), W)
    trained, _, progress = engine.fit(accelerator, model, opt, sched, Windows(stream, starts, seq_len), batches,
                                      grad_clip=pre["grad_clip"], log_every=1, desc="pretrain T0", state=state,
                                      fp=fp, save_every=pre["save_every"], tracker=tracker,
                                      save_every_minutes=pre["save_every_minutes"])
    rows = [{"step": r["step"] - 1, "loss": r["loss"], "lr": r["lr"]} for r in progress["log"]]
    if rows:
        rows[-1]["tokens"] = progress["tokens"]  # the run's training tokens (for the model card)
    return accelerator.unwrap_model(trained), rows


def t0_probes(probes_dir) -> pd.DataFrame:
    path = Path(probes_dir) / "probes.parquet"
    df = read_table(path, ["probe_id", "period", "set", "prefix", "object", "statement"])
    return df[df["period"] == 0].reset_index(drop=True)


def build_base_model(params: dict, texts: list[str], dev: torch.device | None = None, state=None, tokenizer=None,
                     tracker=None):
    """(model, tokenizer, log rows): a new GPT-2 trained on `texts`, or a loaded model,
    fine-tuned on them when `teach_t0`. `tokenizer` (a model folder): a new GPT-2 uses
    that model's tokenizer instead of training one (the small model of an attention pair)."""
    params = with_defaults(params)
    pre = params["pretrain"]
    torch.manual_seed(pre["seed"])
    if params["source"] == "scratch":
        if tokenizer is not None:
            from transformers import AutoTokenizer

            from .models import checkpoint_dir
            tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(tokenizer))
        else:
            tokenizer = train_tokenizer(texts, params["tokenizer"]["vocab_size"])
        tokenizer.model_max_length = params["architecture"]["n_positions"]
        model = build_gpt2(params["architecture"], tokenizer)
        steps = pre["steps"]
    else:
        model, tokenizer = load_configured(params)
        steps = pre["steps"] if params["teach_t0"] else 0
    rows = []
    if steps:
        model, rows = pretrain(model, tokenizer, texts, pre, state=state, tracker=tracker)
    model.to(dev or device())
    model.eval()
    return model, tokenizer, rows


def _deterministic(dev: torch.device) -> None:
    # Only on CPU: on CUDA it needs CUBLAS_WORKSPACE_CONFIG set before start-up.
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)


def run(params: dict, corpus, split, probes, out, state=None, tokenizer=None) -> None:
    params = with_defaults(params)
    dev = device()
    _deterministic(dev)
    started = time.time()
    trains_on_t0 = params["source"] == "scratch" or params["teach_t0"]
    heldout = (heldout_base_ids(t0_ids(split), params["pretrain"]["heldout_fraction"], params["pretrain"]["seed"])
               if trains_on_t0 else [])
    texts = t0_texts(split, exclude=heldout)
    # the small model of an attention pair is this stage with the base model's tokenizer
    tokenizer_dir = tokenizer
    tracker = tracking.Run("small_model" if tokenizer else "base_model", seed=params["pretrain"]["seed"], config=params)
    model, tokenizer, rows = build_base_model(params, texts, dev, state=state, tokenizer=tokenizer, tracker=tracker)
    steps = len(rows)
    train_time = time.time() - started

    probe_df = t0_probes(probes)
    summary = summarize(score_probes(model, tokenizer, probe_df, batch_size=32))
    tail = [r["loss"] for r in rows[-max(1, len(rows) // 20):]]
    metrics = {
        "source": params["source"],
        "teach_t0": bool(params["teach_t0"]),
        "heldout_base": len(heldout),  # T0 sequences never trained on (heldout_base.txt)
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "t0_sequences": len(texts),
        "final_train_loss": sum(tail) / len(tail) if tail else None,  # mean of the last 5% of steps
        "train_time_s": round(train_time, 1),
        "device": str(dev),
        "t0_probes": summary,  # per set: object_ppl, statement_ppl, top1, n
    }
    with atomic_output(out) as tmp:
        save_model(model, tokenizer, tmp / "model")
        modelcard.write(tmp / "model", modelcard.base_meta("small_model" if tokenizer_dir else "base_model", params,
                                                           metrics, rows[-1].get("tokens", 0) if rows else 0))
        if state:
            shutil.rmtree(state, ignore_errors=True)  # finished: the resumable state is spent
        pd.DataFrame(rows, columns=["step", "loss", "lr"]).to_csv(tmp / "train_log.csv", index=False)
        write_json(metrics, tmp / "metrics.json")
        (tmp / "heldout_base.txt").write_text("".join(f"{i}\n" for i in heldout))
    tracker.finish(metrics)
    acc = ", ".join(f"{k} top1={v['top1']:.3f} obj_ppl={fmt_ppl(v['object_ppl'])} (n={v['n']})" for k, v in summary.items())
    log.info("base model (%s): %d params, %d steps in %.0f s, final loss %s; T0 probes: %s", params["source"],
             metrics["n_params"], steps, train_time,
             f"{metrics['final_train_loss']:.3f}" if tail else "-", acc or "none")
