"""Gradient profile: per-example, per-unit gradient norms of the LM loss (TGL, methods §1).

For each knowledge type (new / updated / unchanged) and for control text (the base
snapshot), we measure ||dL_x/dθ_u|| for every sequence x and unit u (a block, or a
block's attention / MLP / norms), then the relative norm r_u = mean norm(type) / mean
norm(control) with a bootstrap interval.

Per-example gradients in one batched backward pass (no backward per sequence):
forward hooks capture each parameterised module's input, a tensor hook its output
gradient G, and the per-example gradient of its parameters follows from those:
  * Linear / Conv1D weight: sum over positions t of the outer product G_t ⊗ A_t, whose
    squared norm is sum_{t,t'} (A_t·A_t')(G_t·G_t') ("ghost norm", Opacus ghost
    clipping) or, when T is large against in*out, the norm of the materialised A^T G;
    bias: sum_t G_t.
  * Embedding: row id_t of the gradient gets G_t, so the squared norm is
    sum_{t,t'} [id_t = id_t'] (G_t·G_t').
  * anything else with its own parameters (LayerNorm, RMSNorm...): the vector-Jacobian
    product of that small module, per example with torch.func.vmap.
A parameter used twice (the lm_head tied to the token embeddings) needs the cross
terms of its uses: inner products of the factored forms above, also without
materialising the (vocab x dim) gradient.
The loss is the *sum over examples* of each example's mean token loss, so each
example's gradient is its own. Only activation gradients are requested from autograd
(the weight gradients are never formed), so a pass costs about one ordinary backward.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .io import InputError, atomic_output, read_table, write_parquet, merge_defaults
from .models import checkpoint_dir, layer_units, load_model, n_blocks, unit_layer
from .scoring import pad_batch

log = logging.getLogger(__name__)

DEFAULTS = {"source": "diff", "period": 1, "n_sequences": 64, "batch_size": 16, "seq_len": 128,
            "bootstrap": 1000, "seed": 0}
KNOWLEDGE_TYPES = ("new", "updated", "unchanged")

try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


# ---------------------------------------------------------------------------------
# per-example gradient norms


@dataclass
class _Factored:
    """Per-example gradient sum_t left_t ⊗ right_t of a (a x b) weight; `left` is either
    dense (B, T, a) or token indices (B, T) (one-hot rows, as for an embedding)."""
    left: torch.Tensor
    right: torch.Tensor
    index: bool = False


def _gram(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u @ v.transpose(1, 2)


def _left_gram(u: _Factored, v: _Factored) -> torch.Tensor:
    """(B, Tu, Tv) inner products of the left factors."""
    if u.index and v.index:
        return (u.left[:, :, None] == v.left[:, None, :]).to(u.right.dtype)
    if u.index:  # onehot(id_t) · v.left_s = v.left[s, id_t]
        idx = u.left[:, None, :].expand(-1, v.left.shape[1], -1)
        return v.left.gather(2, idx).transpose(1, 2)
    if v.index:
        return _left_gram(v, u).transpose(1, 2)
    return _gram(u.left, v.left)


def _inner(u: _Factored, v: _Factored) -> torch.Tensor:
    return (_left_gram(u, v) * _gram(u.right, v.right)).sum((1, 2))


def _factored_sq(f: _Factored) -> torch.Tensor:
    """Per-example squared norm, by the cheaper of ghost norm and materialisation."""
    if f.index:
        return _inner(f, f)
    T, a, b = f.left.shape[1], f.left.shape[2], f.right.shape[2]
    if T * (a + b) <= a * b:  # ghost: B*T^2*(a+b) flops against B*T*a*b
        return _inner(f, f)
    return (f.left.transpose(1, 2) @ f.right).pow(2).sum((1, 2))


def _dense(f: _Factored, shape: torch.Size) -> torch.Tensor:
    """Materialise a factored gradient as (B, a, b)."""
    if f.index:
        B, T = f.left.shape
        out = torch.zeros((B, shape[0], f.right.shape[2]), dtype=f.right.dtype, device=f.right.device)
        return out.scatter_add_(1, f.left[:, :, None].expand(-1, -1, f.right.shape[2]), f.right)
    return f.left.transpose(1, 2) @ f.right


@dataclass
class _Call:
    module: nn.Module
    params: list  # [(local name, parameter)] owned directly by the module
    inputs: tuple
    grads: list = field(default_factory=list)


class _PerExampleTracer:
    """Hooks that turn one batched backward into per-example squared gradient norms."""

    def __init__(self, model: nn.Module, batch_size: int):
        self.B = batch_size
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.owners = [(m, list(m.named_parameters(recurse=False))) for m in model.modules()]
        self.owners = [(m, ps) for m, ps in self.owners if ps]
        self.uses: dict[int, int] = defaultdict(int)  # parameter id -> calls in this forward
        self.pending: dict[str, list] = defaultdict(list)  # multi-use parameter -> gradient parts
        self.sq: dict[str, torch.Tensor] = {}
        self.generic: list[_Call] = []
        self.leaves: list[torch.Tensor] = []  # tensors autograd differentiates towards
        self.active = False
        self.handles = []

    def __enter__(self):
        for module, params in self.owners:
            self.handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        for h in self.handles:
            h.remove()

    # -- hooks
    def _forward_hook(self, module, args, kwargs, output):
        if not self.active:
            return None
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(f"per-example gradients: {type(module).__name__} returns "
                                      f"{type(output).__name__}, not a tensor")
        params = [(n, p) for n, p in module.named_parameters(recurse=False)]
        for _, p in params:
            self.uses[id(p)] += 1
        x = args[0] if args else next(iter(kwargs.values()))
        if output.shape[0] != self.B or x.shape[0] != self.B:
            raise NotImplementedError(
                f"per-example gradients: {type(module).__name__} sees batch size {x.shape[0]} "
                f"(output {output.shape[0]}), expected {self.B}: an input is broadcast over the batch")
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq:
                raise NotImplementedError("per-example gradients: Embedding with max_norm/scale_grad_by_freq")
            if not output.requires_grad:  # frozen embedding: start the backward here
                output = output.detach().requires_grad_()
            self.leaves.append(output)
        elif not isinstance(module, (nn.Linear, Conv1D)) and (len(args) != 1 or kwargs):
            raise NotImplementedError(f"per-example gradients: {type(module).__name__} has its own "
                                      "parameters and takes more than one input")
        call = _Call(module, params, (x.detach(),))
        if output.requires_grad:
            output.register_hook(lambda g, call=call: self._on_grad(call, g))
        return output

    def _on_grad(self, call: _Call, g: torch.Tensor):
        call.grads.append(g.detach())
        m = call.module
        if isinstance(m, (nn.Linear, Conv1D, nn.Embedding)):
            self._record_linear_like(call)
        else:
            self.generic.append(call)

    # -- per-kind per-example gradients
    def _add(self, p: nn.Parameter, part) -> None:
        name = self.names.get(id(p))
        if name is None:
            return
        if self.uses[id(p)] == 1:
            self.sq[name] = self.sq.get(name, 0) + (
                _factored_sq(part) if isinstance(part, _Factored) else part.pow(2).flatten(1).sum(1))
        else:
            self.pending[name].append((p, part))

    def _record_linear_like(self, call: _Call):
        m, (x,), g = call.module, call.inputs, call.grads[0]
        B = self.B
        if isinstance(m, nn.Embedding):
            ids = x.reshape(B, -1)
            g = g.reshape(B, ids.shape[1], -1)
            if m.padding_idx is not None:  # F.embedding gives the padding row no gradient
                g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
            self._add(m.weight, _Factored(ids, g, index=True))
            return
        x = x.reshape(B, -1, x.shape[-1]).to(g.dtype)
        g = g.reshape(B, -1, g.shape[-1])
        if isinstance(m, nn.Linear):  # weight (out, in)
            self._add(m.weight, _Factored(g, x))
        else:  # Conv1D: weight (in, out)
            self._add(m.weight, _Factored(x, g))
        if m.bias is not None:
            self._add(m.bias, g.sum(1))

    def _record_generic(self, call: _Call):
        """Per-example vector-Jacobian product of a small module (norms...)."""
        from torch.func import functional_call, vjp, vmap

        m, (x,), g = call.module, call.inputs, call.grads[0]
        params = {n: p.detach() for n, p in call.params}

        def one(x_b, g_b):
            f = lambda prm: functional_call(m, prm, (x_b.unsqueeze(0),)).squeeze(0)  # noqa: E731
            return vjp(f, params)[1](g_b)[0]

        try:
            grads = vmap(one)(x, g)
        except Exception:  # an op vmap does not support: per example, still this module only
            grads = [one(x[b], g[b]) for b in range(self.B)]
            grads = {n: torch.stack([gr[n] for gr in grads]) for n in params}
        for n, p in call.params:
            self._add(p, grads[n])

    def finish(self) -> dict[str, torch.Tensor]:
        self.active = False  # functional_call below must not re-enter the hooks
        for call in self.generic:
            self._record_generic(call)
        for name, parts in self.pending.items():
            p = parts[0][0]
            parts = [part for _, part in parts]
            if all(isinstance(part, _Factored) for part in parts):
                total = sum(_inner(u, v) for u in parts for v in parts)
            else:
                dense = sum(_dense(part, p.shape) if isinstance(part, _Factored) else part for part in parts)
                total = dense.pow(2).flatten(1).sum(1)
            self.sq[name] = total
        return self.sq


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token loss of each example over its own (unpadded) tokens."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = attention_mask[:, 1:].to(nll.dtype)
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def per_example_param_sq_norms(model: nn.Module, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter name -> (B,) squared norm of each example's loss gradient (right
    padding; padded positions carry no loss). One batched forward and backward."""
    B, T = input_ids.shape
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts(model, "position_ids"):
        # explicit (B, T) positions: a (1, T) default would be broadcast over the batch and
        # merge the position-embedding gradients of all examples
        kwargs["position_ids"] = torch.arange(T, device=input_ids.device).expand(B, T)
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    try:
        with torch.enable_grad(), _PerExampleTracer(model, B) as tracer:
            logits = model(**kwargs).logits
            loss = per_example_loss(logits, input_ids, attention_mask).sum()
            leaves = [t for t in tracer.leaves if t.requires_grad]
            if not leaves:
                raise NotImplementedError("per-example gradients: no embedding output to differentiate")
            # activation gradients only: the hooks see every module's output gradient
            torch.autograd.grad(loss, leaves, allow_unused=True)
            sq = tracer.finish()
    finally:
        model.train(was_training)
    zero = torch.zeros(B, device=input_ids.device)
    return {n: sq.get(n, zero).detach() for n, _ in model.named_parameters()}


def aggregate_units(sq: dict[str, torch.Tensor], units: dict[str, list[str]]) -> torch.Tensor:
    """(B, n_units) unit norms: sqrt of the summed squared parameter norms."""
    cols = [torch.stack([sq[n] for n in names]).sum(0) for names in units.values()]
    return torch.stack(cols, dim=1).clamp(min=0).sqrt()


def per_example_grad_norms(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           units: dict[str, list[str]]) -> torch.Tensor:
    """(B, n_units) per-example gradient norms, columns in the order of `units`
    (from `gradloc.models.layer_units`)."""
    return aggregate_units(per_example_param_sq_norms(model, input_ids, attention_mask), units)


# ---------------------------------------------------------------------------------
# the profile stage


def with_defaults(params: dict | None) -> dict:
    params = merge_defaults(params, DEFAULTS, "profile params")
    if params["source"] not in ("diff", "probes"):
        raise InputError(f"profile params: source must be 'diff' or 'probes', got {params['source']!r}")
    return params


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(df) > n:
        df = df.sample(n=n, random_state=seed)
    return df


def diagnostic_sequences(params: dict, tagged, probes) -> pd.DataFrame:
    """seq_id, knowledge_type (new/updated/unchanged/control), text."""
    seqs_path = Path(tagged) / "sequences.parquet"
    seqs = read_table(seqs_path, ["seq_id", "period", "split", "text", "knowledge_type"])
    n, seed, period = params["n_sequences"], params["seed"], int(params["period"])
    parts = []
    if params["source"] == "diff":
        train = seqs[(seqs["period"] == period) & (seqs["split"] == "train")]
        for kt in KNOWLEDGE_TYPES:
            part = _sample(train[train["knowledge_type"] == kt], n, seed)
            parts.append(part.assign(knowledge_type=kt)[["seq_id", "knowledge_type", "text"]])
    else:
        probe_path = Path(probes) / "probes.parquet"
        pr = read_table(probe_path, ["probe_id", "period", "set", "statement"])
        pr = pr[pr["period"] == period]
        for kt in KNOWLEDGE_TYPES:
            part = _sample(pr[pr["set"] == kt], n, seed)
            parts.append(pd.DataFrame({"seq_id": part["probe_id"].astype(str), "knowledge_type": kt,
                                       "text": part["statement"].astype(str)}))
    base = _sample(seqs[seqs["split"] == "base"], n, seed)
    parts.append(base.assign(knowledge_type="control")[["seq_id", "knowledge_type", "text"]])
    out = pd.concat(parts, ignore_index=True)
    for kt in (*KNOWLEDGE_TYPES, "control"):
        if not (out["knowledge_type"] == kt).any():
            log.warning("profile: no %s sequences (period %d, source %s)", kt, period, params["source"])
    if not (out["knowledge_type"] == "control").any():
        raise InputError(f"{seqs_path}: no base (split == 'base') sequences for the control")
    return out


def profile_norms(model, tokenizer, seqs: pd.DataFrame, seq_len: int, batch_size: int) -> pd.DataFrame:
    """Long table: seq_id, knowledge_type, granularity, unit, layer, norm."""
    device = next(model.parameters()).device
    L = n_blocks(model)
    units = {g: layer_units(model, g) for g in ("block", "module")}
    encoded = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
               for t in seqs["text"]]
    keep = [i for i, ids in enumerate(encoded) if len(ids) >= 2]  # one token has no next-token loss
    if len(keep) < len(encoded):
        log.warning("profile: %d sequence(s) shorter than 2 tokens skipped", len(encoded) - len(keep))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = {g: [] for g in units}
    for start in tqdm(range(0, len(keep), batch_size), desc="profile"):
        idx = keep[start:start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in idx], pad_id, device)
        sq = per_example_param_sq_norms(model, ids, mask)
        for g, u in units.items():
            rows[g].append(aggregate_units(sq, u).double().cpu().numpy())
    frames = []
    meta = seqs.iloc[keep][["seq_id", "knowledge_type"]].reset_index(drop=True)
    for g, u in units.items():
        norms = np.concatenate(rows[g]) if rows[g] else np.zeros((0, len(u)))
        wide = pd.DataFrame(norms, columns=list(u))
        long = pd.concat([meta, wide], axis=1).melt(["seq_id", "knowledge_type"], var_name="unit",
                                                    value_name="norm")
        long.insert(2, "granularity", g)
        long.insert(4, "layer", [unit_layer(x, L) for x in long["unit"]])
        frames.append(long)
    return pd.concat(frames, ignore_index=True)


def relative_norms(norms: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """rel = mean norm(type) / mean norm(control) per unit, with a bootstrap 95% interval
    (type and control sequences resampled independently, with replacement)."""
    rng = np.random.default_rng(seed)
    out = []
    for (g, unit), grp in norms.groupby(["granularity", "unit"], sort=False):
        control = grp.loc[grp["knowledge_type"] == "control", "norm"].to_numpy()
        layer = int(grp["layer"].iloc[0])
        for kt in KNOWLEDGE_TYPES:
            x = grp.loc[grp["knowledge_type"] == kt, "norm"].to_numpy()
            if len(x) == 0 or len(control) == 0:
                continue
            rel = x.mean() / control.mean()
            lo = hi = float("nan")
            if n_boot > 0:
                bx = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
                bc = control[rng.integers(0, len(control), (n_boot, len(control)))].mean(1)
                lo, hi = np.percentile(bx / bc, [2.5, 97.5])
            out.append({"knowledge_type": kt, "granularity": g, "unit": unit, "layer": layer,
                        "rel": float(rel), "lo": float(lo), "hi": float(hi)})
    return pd.DataFrame(out, columns=["knowledge_type", "granularity", "unit", "layer", "rel", "lo", "hi"])


def heatmap(relative: pd.DataFrame, path, title: str = "relative gradient norm") -> None:
    """Rows: block-granularity units, bottom (embed) to top; columns: knowledge types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = relative[relative["granularity"] == "block"]
    table = rel.pivot_table(index="unit", columns="knowledge_type", values="rel", sort=False)
    order = rel.drop_duplicates("unit").sort_values("layer", kind="stable")["unit"].tolist()
    cols = [k for k in KNOWLEDGE_TYPES if k in table.columns]
    table = table.reindex(index=order, columns=cols)
    fig, ax = plt.subplots(figsize=(1.4 * max(len(cols), 1) + 2.5, 0.38 * max(len(order), 1) + 1.5))
    data = table.to_numpy(dtype=float)
    im = ax.imshow(data, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(order)), order)
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if data[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, label="mean norm / mean control norm")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(params: dict, model, tagged, probes, out) -> None:
    params = with_defaults(params)
    torch.manual_seed(params["seed"])
    ckpt = checkpoint_dir(model)
    lm, tokenizer = load_model(ckpt)
    lm.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    seqs = diagnostic_sequences(params, tagged, probes)
    norms = profile_norms(lm, tokenizer, seqs, params["seq_len"], params["batch_size"])
    relative = relative_norms(norms, params["bootstrap"], params["seed"])
    with atomic_output(out) as tmp:
        write_parquet(norms, tmp / "norms.parquet")
        relative.to_csv(tmp / "relative.csv", index=False)
        heatmap(relative, tmp / "heatmap.png",
                title=f"relative gradient norm, period {params['period']} ({params['source']})")
    counts = seqs["knowledge_type"].value_counts().to_dict()
    log.info("profile: %s sequences profiled, %d units (block), %d units (module)", counts,
             norms.loc[norms["granularity"] == "block", "unit"].nunique(),
             norms.loc[norms["granularity"] == "module", "unit"].nunique())
