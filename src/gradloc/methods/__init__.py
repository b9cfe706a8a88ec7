"""How each continual-pretraining method prepares the model and the optimizer.

A method is a combination of parts (config `train.methods.*`, defaults in the schema's
`$defs.method`), one file each:
- `layers`: the trainable-parameter policy, which units train at which lr multiplier
  (`all` = DIFF, `tgl_fp`, `tgl_alr`, the controls `random`/`first`/`last`, and `subnet`);
- `mask: subnet`: a sparse update inside the knowledge-critical subnetwork (`masking`);
- an adapter: `lora` (PEFT, merged before saving) or `kadapter` (base frozen);
- `recadam`: the optimizer;
- `replay` (Mix-Review): data only, the base blocks `gradloc.train` mixes into each epoch;
- `checkpoint`: save and load what evaluation and the next period read.

Each part registers itself (its `PART`, gradloc/parts.py), with its schema key, the
upstream outputs it reads and its hooks into the training stage. `prepare()` turns a
loaded model and a method into a `Prepared` (model to train plus optimizer param
groups): the built-in parts that decide which weights train (layers, mask, lora,
k_adapter) compose here; a new part adds its own `prepare` hook. `make_optimizer()`
builds the optimizer (a part's `optimizer` hook, else AdamW). A new localisation is
another layer policy returning {unit: multiplier}, or a part of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import parts
from ..engine import lm_loss
from ..io import InputError
from ..models import layer_units
from ..schema import fill
from . import lora, masking
from .checkpoint import K_ADAPTER_FILES, load_checkpoint, save_checkpoint
from .kadapter import AdapterBlock, KAdapterModel
from .layers import POLICIES, read_selection, unit_multipliers
from .lora import add_lora, lora_targets
from .recadam import RecAdam, anneal_lambda

__all__ = ["resolve_method", "uses_subnet", "Prepared", "prepare", "make_optimizer", "lm_loss", "save_checkpoint",
           "load_checkpoint", "K_ADAPTER_FILES", "AdapterBlock", "KAdapterModel", "POLICIES", "read_selection",
           "unit_multipliers", "lora_targets", "add_lora", "RecAdam", "anneal_lambda"]


def resolve_method(method: dict | None) -> dict:
    """A method entry validated against the schema with its defaults filled in (a part's
    presence switches it on), then checked across parts (each part's `check`); problems
    raise InputError."""
    parts.registered()  # the parts' schemas are in the method schema
    method = fill("$defs.method", method, where="method")
    parts.check(method)
    return method


def uses_subnet(method: dict) -> bool:
    return "subnet" in parts.needs(method)


@dataclass
class Prepared:
    model: nn.Module                  # what the loop trains (maybe wrapped: PEFT, K-Adapter)
    groups: list[dict]                # {"name", "params", "lr_mult", "decay"} per group
    trained_units: list[str]
    method: dict
    info: dict = field(default_factory=dict)
    sparse: masking.SparseUpdate | None = None  # mask: subnet; attach() it to the optimizer


def prepare(model: nn.Module, method: dict, selection=None, seed: int = 0, subnet=None, period: int = 1) -> Prepared:
    """Freeze, wrap and group `model`'s parameters for `method` (see the module doc);
    `subnet` is the subnet stage's folder (methods using it), `period` picks its masks."""
    method = resolve_method(method)
    sel = read_selection(selection)
    if uses_subnet(method) and not subnet:
        raise InputError("method uses the knowledge-critical subnetwork: needs --subnet (the `gradloc subnet` folder)")
    if method["layers"] == "subnet" and sel:
        sel["density"] = masking.block_density(subnet, period)
    if method["layers"] == "subset" and sel:
        sel["subset"] = method["subset"]
    if isinstance(model, KAdapterModel) and "k_adapter" not in method:
        raise InputError("init checkpoint has a K-Adapter but the method has no k_adapter part")
    base = model.base if isinstance(model, KAdapterModel) else model
    units = layer_units(base, sel.get("granularity", "block"))
    mults = unit_multipliers(method["layers"], list(units), sel, seed)
    unit_of = {name: unit for unit, names in units.items() for name in names}
    masks = masking.load_masks(subnet, period, base) if method.get("mask") == "subnet" else None
    for name, p in base.named_parameters():
        p.requires_grad_(unit_of[name] in mults and (masks is None or name in masks))
    sparse = None
    if masks is not None:
        masks = {n: m for n, m in masks.items() if unit_of[n] in mults}
        if not any(m.any() for m in masks.values()):
            raise InputError(f"{subnet}: mask: subnet leaves nothing to train (no masked weight in a trained unit)")
        sparse = masking.SparseUpdate(base, masks)

    if "lora" in method:
        model, unit_of = lora.wrap(base, method["lora"], unit_of, mults)
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
                    info={"granularity": sel.get("granularity", "block"), "layers": method["layers"]}, sparse=sparse)


def make_optimizer(prepared: Prepared, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (or RecAdam) over the prepared groups only, so frozen parameters get no state."""
    groups = [{"params": g["params"], "name": g["name"], "lr": lr * g["lr_mult"], "lr_mult": g["lr_mult"],
               "weight_decay": weight_decay if g["decay"] else 0.0} for g in prepared.groups]
    custom = parts.hooks(prepared.method, "optimizer")  # e.g. recadam
    if len(custom) > 1:
        raise InputError(f"method: {len(custom)} parts each bring an optimizer; choose one")
    if custom:
        hook, entry = custom[0]
        optimizer = hook(entry, groups, lr)
    else:  # the fused kernel (CPU and GPU), as Hugging Face's Trainer uses by default
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
    if prepared.sparse is not None:
        prepared.sparse.attach(optimizer)
    return optimizer
