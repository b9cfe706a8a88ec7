"""Per-token loss weights (`token_weighting` part): the training loop minimises
mean_t(w_t * CE_t) (`engine.lm_loss`). Weights are computed per document (EOS included)
before the documents are cut into blocks, and cut the same way (padding: weight 0).

- `uniform`: w = 1 (equals the method without the part);
- `salient_spans`: 1 on tokens inside a tagged entity mention or an object of a fact of
  the period (the corpus' triples) whose subject the sequence mentions (our tags stand in
  for the reference's spaCy NER; `attention.spans_of`), `other` elsewhere. The
  evaluation probes are never read;
- `tfidf`: tf-idf of the token id within its document over the period's documents
  (idf = ln(N / df)), scaled to mean 1 per document;
- `camels` (Hu et al. 2023): a meta-trained weighting model (`gradloc metatrain`) reads
  the document; a small causal LM with the head Linear(d, 128) -> GELU -> Linear(128, 1)
  and softplus(beta 3). The last layer starts at zero, so every weight is ln2 / 3.
  Weights are not normalised.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import InputError
from ..parts import Part, register

log = logging.getLogger(__name__)

KINDS = ("uniform", "salient_spans", "tfidf", "camels")


class WeightingModel(nn.Module):
    """A causal LM backbone plus the reference head; forward gives one weight per token."""

    def __init__(self, backbone, hidden: int = 128, beta: float = 3.0):
        super().__init__()
        self.backbone, self.beta = backbone, float(beta)
        d = backbone.config.hidden_size
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        h = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.softplus(self.head(h).squeeze(-1), beta=self.beta)

    def save(self, folder, tokenizer) -> None:
        from ..tokenfiles import tokenizer_fingerprint

        folder = Path(folder)
        self.backbone.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(self.head.state_dict(), folder / "head.pt")
        (folder / "weighting.json").write_text(json.dumps(
            {"hidden": self.head[0].out_features, "beta": self.beta, "tokenizer": tokenizer_fingerprint(tokenizer)}))

    @classmethod
    def load(cls, folder) -> tuple["WeightingModel", object]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "weighting.json").exists():
            raise InputError(f"{folder}: not a weighting model (no weighting.json); run `gradloc metatrain`")
        meta = json.loads((folder / "weighting.json").read_text())
        model = cls(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), meta["hidden"],
                    meta["beta"])
        model.head.load_state_dict(torch.load(folder / "head.pt", weights_only=True))
        return model.eval(), AutoTokenizer.from_pretrained(folder)


def check_same_tokenizer(tokenizer, other, what: str) -> None:
    from ..tokenfiles import tokenizer_fingerprint

    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other):
        raise InputError(f"{what}: the weighting model's tokenizer differs from the base model's; it must read "
                         "the same token ids the base model trains on (use a model with the same tokenizer)")


def model_weights(model: WeightingModel, docs: list[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
    """The weighting model's weights of each document (windows of its positions)."""
    from ..models import max_positions

    P = max_positions(model.backbone) or 1024
    win = [(d, s, min(s + P, len(doc))) for d, doc in enumerate(docs) for s in range(0, len(doc), P)]
    out = [np.zeros(len(d), dtype=np.float32) for d in docs]
    with torch.no_grad():
        for b in range(0, len(win), batch_size):
            batch = win[b:b + batch_size]
            T = max(e - s for _, s, e in batch)
            ids = torch.zeros((len(batch), T), dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for k, (d, s, e) in enumerate(batch):
                ids[k, :e - s] = torch.as_tensor(docs[d][s:e])
                mask[k, :e - s] = 1
            w = model(ids, mask).numpy()
            for k, (d, s, e) in enumerate(batch):
                out[d][s:e] = w[k, :e - s]
    return out


def tfidf(docs: list[np.ndarray]) -> list[np.ndarray]:
    n = len(docs)
    df: dict[int, int] = {}
    for doc in docs:
        for t in set(doc.tolist()):
            df[t] = df.get(t, 0) + 1
    out = []
    for doc in docs:
        ids, counts = np.unique(doc, return_counts=True)
        score = {int(t): c / len(doc) * math.log(n / df[int(t)]) for t, c in zip(ids, counts)}
        w = np.array([score[int(t)] for t in doc], dtype=np.float32)
        out.append(w / w.mean() if len(w) and w.mean() > 0 else np.ones(len(doc), dtype=np.float32))
    return out


def doc_weights(part: dict, docs: list[np.ndarray], marked: list[np.ndarray] | None = None,
                model: WeightingModel | None = None) -> list[np.ndarray]:
    """Weights of each document (float32, one per token); `marked`: 1 on entity/object
    tokens (salient_spans); `model`: the weighting model (camels)."""
    kind = part["kind"]
    if kind == "uniform":
        return [np.ones(len(d), dtype=np.float32) for d in docs]
    if kind == "salient_spans":
        if marked is None:
            raise InputError("token_weighting salient_spans: needs the tagged mentions and the corpus' triples (--tagged, --corpus)")
        return [np.where(m > 0, 1.0, part["other"]).astype(np.float32) for m in marked]
    if kind == "tfidf":
        return tfidf(docs)
    if kind == "camels":
        if model is None:
            raise InputError("token_weighting camels: needs --weighting-model (the `gradloc metatrain` folder)")
        return model_weights(model, docs)
    raise InputError(f"token_weighting.kind: {kind!r} is not one of {list(KINDS)}")


def summary(weights: list[np.ndarray], marked: list[np.ndarray] | None, types: list[str]) -> dict:
    """Mean weight on entity/object tokens vs other tokens, overall and per knowledge type."""
    w = np.concatenate(weights) if weights else np.zeros(0)
    out = {"mean_weight": float(w.mean()) if len(w) else None}
    if marked is None:
        return out

    def means(ws, ms):
        ws, ms = np.concatenate(ws), np.concatenate(ms) > 0
        fact = float(ws[ms].mean()) if ms.any() else float("nan")
        other = float(ws[~ms].mean()) if (~ms).any() else float("nan")
        return {"fact": round(fact, 5), "other": round(other, 5),
                "ratio": round(fact / other, 4) if other > 0 else None, "n_fact": int(ms.sum())}

    out["all"] = means(weights, marked)
    for t in sorted(set(types)):
        idx = [i for i, k in enumerate(types) if k == t]
        out[t] = means([weights[i] for i in idx], [marked[i] for i in idx])
    return out


def example(weights, marked, docs, tokenizer, min_len: int = 16) -> dict | None:
    """One document (the first with a marked token and >= min_len tokens) for the heat strip."""
    for w, m, d in zip(weights, marked if marked is not None else [None] * len(docs), docs):
        if len(d) >= min_len and (m is None or m.any()):
            return {"tokens": [tokenizer.decode([t]) for t in d.tolist()], "weights": [round(float(x), 5) for x in w],
                    "marked": [] if m is None else [int(x) for x in m]}
    return None


def _needs(entry, method):
    """The tagged mentions and the corpus' triples (salient tokens and the weights'
    summary; never the evaluation probes); camels also the meta-trained weighting model."""
    return ["tagged", "corpus"] + (["weighting_model"] if entry.get("kind") == "camels" else [])


def _marks(entry, job):
    """Entity and fact-object tokens of each document (salient_spans' weights, the summary)."""
    if job.inputs.get("tagged"):
        from ..core import marks, spans_of

        texts, spans = spans_of(job.rows, job.inputs["tagged"], job.inputs.get("corpus"), job.period)
        job.marked = marks(job.tokenizer, texts, job.docs, spans)


def _weights(entry, job, docs):
    """Per-token weights of each document with its EOS; the summary goes to metrics.json,
    it and one document's weights to weights.json (the report's figure)."""
    model, path = None, job.inputs.get("weighting_model")
    marked = None if job.marked is None else [np.append(m, 0) for m in job.marked]
    # Loading and running the weighting model must not move the RNG the training's dropout draws from.
    with torch.random.fork_rng(devices=[]):
        if entry["kind"] == "camels":
            if not path:
                raise InputError("token_weighting camels: needs --weighting-model (the `gradloc metatrain` folder)")
            model, wtok = WeightingModel.load(path)
            check_same_tokenizer(job.tokenizer, wtok, str(path))
        weights = doc_weights(entry, docs, marked, model)
    info = {"kind": entry["kind"], **summary(weights, marked, job.types)}
    log.info("token weighting %s: %s", entry["kind"], info)
    doc = example(weights, marked, docs, job.tokenizer)
    job.extra["token_weighting"] = info
    job.files["weights.json"] = json.dumps({**info, "example": doc})
    return weights


PART = register(Part("token_weighting", needs=_needs, documents=_marks, weights=_weights))
