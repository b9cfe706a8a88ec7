"""How each continual-pretraining method prepares the model and the optimizer.

A method is a combination of parts (config `train.methods.*`):
- `layers`, the trainable-parameter policy: which units train and at which learning-rate
  multiplier (`all` = DIFF, `tgl_fp`, `tgl_alr`, and the controls `random`/`first`/`last`);
- an adapter: `lora` (PEFT, merged before saving) or `k_adapter` (base frozen);
- `replay` (Mix-Review): data only, see `gradloc.train.build_epoch`;
- `recadam`: the optimizer (`RecAdam` below).

`prepare()` turns a loaded model and a method into a `Prepared` (model to train plus
optimizer param groups); `make_optimizer()` builds the optimizer; `save_checkpoint()` /
`load_checkpoint()` write and read what evaluation and the next period load.
A new localisation (e.g. a weight mask) is another policy returning {unit: multiplier}
or its own groups; a per-token loss weighting (CaMeLS) plugs into `Prepared.token_weights`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .io import InputError, read_json, write_json, merge_defaults
from .models import (checkpoint_dir, classify_child, find_blocks, is_block_unit, layer_units, load_model,
                     save_model)

log = logging.getLogger(__name__)

# Defaults of each part, as in workflow/schemas/config.schema.yaml.
PART_DEFAULTS = {
    "lora": {"r": 4, "alpha": 16, "dropout": 0.0, "targets": "attention"},
    "replay": {"ratio": 1.0},
    "recadam": {"anneal_k": 0.5, "anneal_t0": 250, "coeff": 5000},
    "k_adapter": {"layers": None, "scale": 0.1},
}
METHOD_KEYS = {"layers", "lr", "epochs", *PART_DEFAULTS}
K_ADAPTER_FILES = ("k_adapter.json", "k_adapter.safetensors")


def resolve_method(method: dict | None) -> dict:
    """A method entry with the defaults of its parts filled in; bad keys raise InputError."""
    method = dict(method or {})
    unknown = set(method) - METHOD_KEYS
    if unknown:
        raise InputError(f"method: unknown key(s) {sorted(unknown)}; expected {sorted(METHOD_KEYS)}")
    method.setdefault("layers", "all")
    if method["layers"] not in POLICIES:
        raise InputError(f"method.layers: {method['layers']!r} is not one of {list(POLICIES)}")
    for part, defaults in PART_DEFAULTS.items():
        if part in method:
            method[part] = merge_defaults(method[part], defaults, f"method.{part}")
    if "lora" in method and "k_adapter" in method:
        raise InputError("method: choose one adapter, lora or k_adapter")
    if "k_adapter" in method and method["layers"] != "all":
        raise InputError("method: k_adapter freezes the base model; use layers: all")
    return method


# --- trainable-parameter policies: which units train, at which lr multiplier -------------

def read_selection(selection) -> dict:
    """The selection JSON (a path or an already-read dict), its required keys checked."""
    if selection is None:
        return {}
    sel = read_json(selection) if isinstance(selection, (str, Path)) else dict(selection)
    for key in ("granularity", "units", "lr_multipliers"):
        if key not in sel:
            raise InputError(f"{selection if isinstance(selection, (str, Path)) else 'selection'}: missing key {key!r}")
    sel["_source"] = str(selection) if isinstance(selection, (str, Path)) else "selection"
    return sel


def _all(units, sel, seed):
    return {u: 1.0 for u in units}


def _tgl_fp(units, sel, seed):
    return {u: 1.0 for u in units if u in set(sel["units"])}


def _tgl_alr(units, sel, seed):
    # Embeddings and head keep the base rate: every input shares them, so their norm
    # says nothing about where a fact lives.
    return {u: 1.0 if u in ("embed", "lm_head") else float(sel["lr_multipliers"].get(u, 1.0)) for u in units}


def _control(pick):
    """A control policy: as many block units as TGL-FP selected, chosen by `pick(blocks,
    k, seed)`; TGL-FP's non-block units are kept, so only *which* blocks train differs."""
    def policy(units, sel, seed):
        blocks = [u for u in units if is_block_unit(u)]
        picked = set(pick(blocks, sum(is_block_unit(u) for u in sel["units"]), seed))
        keep = {u for u in sel["units"] if not is_block_unit(u)}
        return {u: 1.0 for u in units if u in picked or u in keep}
    return policy


def _random_blocks(blocks, k, seed):
    return [blocks[i] for i in np.random.default_rng(seed).choice(len(blocks), size=k, replace=False)]


# layers policy -> f(units bottom to top, selection, seed) -> {trainable unit: lr multiplier}.
# Another localisation (e.g. knowledge-critical subnetworks' layers) is one more entry.
POLICIES = {
    "all": _all,
    "tgl_fp": _tgl_fp,
    "tgl_alr": _tgl_alr,
    "random": _control(_random_blocks),
    "first": _control(lambda blocks, k, seed: blocks[:k]),
    "last": _control(lambda blocks, k, seed: blocks[len(blocks) - k:]),
}


def unit_multipliers(policy: str, units: list[str], sel: dict, seed: int) -> dict[str, float]:
    """{trainable unit: lr multiplier} for a layer policy; units not listed are frozen."""
    if policy != "all":
        if not sel:
            raise InputError(f"method layers={policy} needs a selection file (--selection)")
        for u in list(sel["units"]) + list(sel["lr_multipliers"]):
            if u not in units:
                raise InputError(f"{sel['_source']}: unit {u!r} is not a unit of this model at granularity "
                                 f"{sel['granularity']!r} (units: {units})")
    mults = POLICIES[policy](units, sel, seed)
    if not mults:
        raise InputError(f"{sel.get('_source', 'selection')}: layers={policy} leaves no unit to train")
    return mults


# --- LoRA -----------------------------------------------------------------------------------

# Leaf names of separate query/value projections, and of fused q/k/v projections.
QV_LEAVES = {"q_proj", "v_proj", "query", "value", "q", "v", "wq", "wv", "q_lin", "v_lin"}
FUSED_QKV_LEAVES = {"c_attn", "query_key_value", "qkv_proj", "wqkv", "qkv", "w_pack", "in_proj", "Wqkv"}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def lora_targets(model: nn.Module, targets: str, allowed: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Full names of the linear modules LoRA wraps, found inside the transformer blocks:
    `attention` = every linear of the attention module; `attention_qv` = query and value
    projections where they are separate, else the fused q/k/v projection (GPT-2 c_attn);
    `all_linear` = every linear of every block. `allowed(module_name)` restricts them to
    the units a layer policy trains."""
    blocks_name, blocks = find_blocks(model)
    attn, qv, fused, every = [], [], [], []
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = f"{blocks_name}.{i}.{sub}"
            if not sub or not _is_linear(module) or not allowed(name):
                continue
            every.append(name)
            if classify_child(sub.split(".")[0]) != "attn":
                continue
            attn.append(name)
            leaf = sub.rsplit(".", 1)[-1]
            if leaf.lower() in QV_LEAVES:
                qv.append(name)
            elif leaf in FUSED_QKV_LEAVES:
                fused.append(name)
    chosen = {"attention": attn, "attention_qv": qv or fused, "all_linear": every}[targets]
    if not chosen:
        raise InputError(f"method.lora.targets={targets}: no matching linear module in {type(model).__name__}")
    return chosen


def add_lora(model: nn.Module, cfg: dict, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    modules = dict(model.named_modules())
    config = LoraConfig(r=int(cfg["r"]), lora_alpha=cfg["alpha"], lora_dropout=float(cfg["dropout"]),
                        target_modules=targets, bias="none",
                        fan_in_fan_out=type(modules[targets[0]]).__name__ == "Conv1D")
    return get_peft_model(model, config)


# --- K-Adapter --------------------------------------------------------------------------------

class AdapterBlock(nn.Module):
    """Down-projection, one pre-norm causal transformer layer, up-projection (K-Adapter's
    adapter layer, Wang et al. 2021). The up-projection starts at zero, so training
    starts from exactly the base model."""

    def __init__(self, d_model: int, d_adapter: int, n_head: int):
        super().__init__()
        self.down = nn.Linear(d_model, d_adapter)
        self.ln_1 = nn.LayerNorm(d_adapter)
        self.attn = nn.MultiheadAttention(d_adapter, n_head, batch_first=True)
        self.ln_2 = nn.LayerNorm(d_adapter)
        self.mlp = nn.Sequential(nn.Linear(d_adapter, 4 * d_adapter), nn.GELU(), nn.Linear(4 * d_adapter, d_adapter))
        self.up = nn.Linear(d_adapter, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        T = h.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=h.device), diagonal=1)
        a = self.ln_1(h)
        h = h + self.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
        h = h + self.mlp(self.ln_2(h))
        return self.up(h)


class KAdapterModel(nn.Module):
    """A frozen causal LM plus adapters fed from the hidden states of blocks `layers`.

    Adapter i reads block layers[i]'s output plus adapter i-1's output (the K-Adapter
    chain); the last adapter's output x `scale` is added to the final hidden state
    before the LM head. Inputs must be right-padded (the adapters are only causal).
    """

    def __init__(self, base: nn.Module, layers: list[int] | None = None, scale: float = 0.1,
                 d_adapter: int | None = None, n_head: int | None = None):
        super().__init__()
        n = len(find_blocks(base)[1])
        layers = sorted({1, n - 2}) if layers is None else [int(l) for l in layers]
        if not layers or any(not 0 <= l < n for l in layers):
            raise InputError(f"method.k_adapter.layers: {layers} must be block indices in 0..{n - 1}")
        d_model = base.get_output_embeddings().in_features
        d_adapter = d_adapter or max(16, d_model // 4)
        n_head = n_head or max(1, d_adapter // 64)
        self.base = base
        self.settings = {"layers": layers, "scale": float(scale), "d_model": d_model, "d_adapter": d_adapter,
                         "n_head": n_head}
        self.adapters = nn.ModuleList(AdapterBlock(d_model, d_adapter, n_head) for _ in layers)

    @property
    def config(self):
        return self.base.config

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        a = 0
        for layer, adapter in zip(self.settings["layers"], self.adapters):
            a = adapter(out.hidden_states[layer + 1] + a)  # hidden_states[0] is the embedding output
        hidden = out.last_hidden_state + self.settings["scale"] * a
        logits = self.base.get_output_embeddings()(hidden)
        loss = lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token loss mean_t(w_t * CE_t) over positions whose label is not -100; w = 1
    without `weights` (per-token weights, e.g. CaMeLS, are indexed like `labels`)."""
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                         reduction="none").view_as(target)
    mask = (target != -100).to(ce.dtype)
    w = mask if weights is None else weights[:, 1:].to(ce.dtype) * mask
    return (ce * w).sum() / mask.sum().clamp(min=1)


# --- RecAdam ----------------------------------------------------------------------------------

def anneal_lambda(t: float, k: float, t0: float) -> float:
    """lambda(t) = 1 / (1 + exp(-k (t - t0))), written so large |k (t - t0)| never overflows."""
    z = -k * (t - t0)
    return 1.0 / (1.0 + math.exp(z)) if z < 0 else math.exp(-z) / (1.0 + math.exp(-z))


class RecAdam(torch.optim.Optimizer):
    """RecAdam (Chen et al. 2020, "Recall and Learn"): Adam on the objective

        lambda(t) * L_LM + (1 - lambda(t)) * (coeff / 2) * sum (theta - theta0)^2,
        lambda(t) = 1 / (1 + exp(-anneal_k * (t - anneal_t0))),

    theta0 being the weights at the start of training. As in the authors' code, Adam's
    moments see only the LM gradient and its step is scaled by lambda(t) (Adam is
    invariant to the scale of the gradient), while the quadratic penalty's gradient
    coeff * (theta - theta0) is applied directly, decoupled like AdamW's weight decay.
    The pull lr * (1 - lambda) * coeff is capped at 1 (a step onto theta0): the authors'
    update overshoots and diverges beyond it, e.g. at lr 1e-3 with coeff 5000.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 anneal_k=0.5, anneal_t0=250, coeff=5000.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, anneal_k=anneal_k,
                        anneal_t0=anneal_t0, coeff=coeff)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["theta0"] = p.detach().clone()
                state["step"] += 1
                t = state["step"]
                lam = anneal_lambda(t, g["anneal_k"], g["anneal_t0"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(g["eps"])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-g["lr"] / (1 - beta1 ** t) * lam)
                pull = min(1.0, g["lr"] * (1 - lam) * g["coeff"])
                p.add_(state["theta0"] - p, alpha=pull)
        return loss


# --- putting a method together ----------------------------------------------------------------

@dataclass
class Prepared:
    model: nn.Module                  # what the loop trains (maybe wrapped: PEFT, K-Adapter)
    groups: list[dict]                # {"name", "params", "lr_mult", "weight_decay"} per group
    trained_units: list[str]
    method: dict
    # Optional per-token loss weights (input_ids, labels) -> tensor like labels (CaMeLS).
    token_weights: Callable | None = None
    info: dict = field(default_factory=dict)


def prepare(model: nn.Module, method: dict, selection=None, seed: int = 0) -> Prepared:
    """Freeze, wrap and group `model`'s parameters for `method` (see the module doc)."""
    method = resolve_method(method)
    sel = read_selection(selection)
    if isinstance(model, KAdapterModel) and "k_adapter" not in method:
        raise InputError("init checkpoint has a K-Adapter but the method has no k_adapter part")
    base = model.base if isinstance(model, KAdapterModel) else model
    units = layer_units(base, sel.get("granularity", "block"))
    mults = unit_multipliers(method["layers"], list(units), sel, seed)
    unit_of = {name: unit for unit, names in units.items() for name in names}
    for name, p in base.named_parameters():
        p.requires_grad_(unit_of[name] in mults)

    if "lora" in method:
        targets = lora_targets(base, method["lora"]["targets"], lambda m: unit_of.get(m + ".weight") in mults)
        base.requires_grad_(False)
        model = add_lora(base, method["lora"], targets)
        # A LoRA parameter belongs to the unit of the module it wraps.
        prefix = "base_model.model."
        unit_of = {n: unit_of[n[len(prefix):].split(".lora_")[0] + ".weight"]
                   for n, p in model.named_parameters() if p.requires_grad}
    elif "k_adapter" in method:
        base.requires_grad_(False)
        if not isinstance(model, KAdapterModel):  # a K-Adapter checkpoint continues its adapters
            model = KAdapterModel(base, method["k_adapter"]["layers"], method["k_adapter"]["scale"])
        unit_of = {n: "k_adapter" for n, p in model.named_parameters() if p.requires_grad}
        mults = {"k_adapter": 1.0}

    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        unit = unit_of[name]
        decay = p.ndim >= 2  # no weight decay on biases and norms (as nanoGPT)
        g = groups.setdefault((unit, decay), {"name": unit if decay else f"{unit}/no_decay", "params": [],
                                              "lr_mult": mults[unit], "decay": decay})
        g["params"].append(p)
    trained = [u for u in mults if any(k[0] == u for k in groups)]
    return Prepared(model=model, groups=list(groups.values()), trained_units=trained, method=method,
                    info={"granularity": sel.get("granularity", "block"), "layers": method["layers"]})


def make_optimizer(prepared: Prepared, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (or RecAdam) over the prepared groups only, so frozen parameters get no state."""
    groups = [{"params": g["params"], "name": g["name"], "lr": lr * g["lr_mult"], "lr_mult": g["lr_mult"],
               "weight_decay": weight_decay if g["decay"] else 0.0} for g in prepared.groups]
    if "recadam" in prepared.method:
        return RecAdam(groups, lr=lr, **prepared.method["recadam"])
    return torch.optim.AdamW(groups, lr=lr, foreach=False)


def save_checkpoint(model: nn.Module, tokenizer, path) -> None:
    """A folder `load_checkpoint` (and, except for K-Adapter, `load_model`) reads: LoRA is
    merged into the weights; a K-Adapter saves its base model plus k_adapter.* beside it."""
    from peft import PeftModel
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if isinstance(model, KAdapterModel):
        save_model(model.base, tokenizer, path)
        save_file({k: v.contiguous() for k, v in model.adapters.state_dict().items()}, path / K_ADAPTER_FILES[1])
        write_json(model.settings, path / K_ADAPTER_FILES[0])
    else:
        save_model(model, tokenizer, path)


def load_checkpoint(path, dtype=None):
    """(model, tokenizer) of a stage folder or save_pretrained folder; a K-Adapter
    checkpoint comes back as a KAdapterModel whose forward returns `.logits` like an HF
    causal LM."""
    from safetensors.torch import load_file

    folder = checkpoint_dir(path)
    model, tokenizer = load_model(folder, dtype=dtype)
    if (folder / K_ADAPTER_FILES[0]).exists():
        s = read_json(folder / K_ADAPTER_FILES[0])
        model = KAdapterModel(model, s["layers"], s["scale"], s["d_adapter"], s["n_head"])
        model.adapters.load_state_dict(load_file(folder / K_ADAPTER_FILES[1]))
        model.adapters.to(next(model.base.parameters()).dtype)
    return model, tokenizer
