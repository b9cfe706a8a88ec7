"""Training where a knowledge-critical subnetwork points (`gradloc subnet`, issue 15).

Both parts read the subnet stage's masks for the knowledge set `outdated_P{period}`: the
base model's weights whose removal forgets the T0 facts that period k changes, i.e. the
weights an update of those facts has to rewrite.
- `layers: subnet`: a layer policy (methods/layers.py) training the blocks with the
  highest mask density (mean over the mask seeds), as many as TGL-FP trains.
- `mask: subnet`: a sparse update. Only weights inside the mask (the union over the mask
  seeds) train; every other parameter, and every entry of a masked matrix outside the
  mask, keeps its initial value bit for bit. Gradients of frozen entries are zeroed as
  they are computed (so clipping and Adam's moments see only the trainable entries), and
  after each optimizer step the frozen entries are copied back (weight decay and RecAdam
  move every entry of a tensor they see).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..io import InputError, read_table
from ..parts import Part, register


def knowledge_set(period: int) -> str:
    return f"outdated_P{int(period)}"


def _check_set(subnet, period: int, available) -> str:
    name = knowledge_set(period)
    if name not in set(available):
        raise InputError(f"{subnet}: no subnetwork for {name} (sets: {sorted(set(available))}); "
                         f"add {int(period)} to subnet.periods")
    return name


def block_density(subnet, period: int) -> dict[str, float]:
    """{unit: mask density of `outdated_P{period}`, mean over seeds}, for block units
    (`block.3`) and module units (`block.3.attn`, `block.3.mlp`)."""
    path = Path(subnet) / "density.csv"
    df = read_table(path, ["knowledge_set", "seed", "granularity", "unit", "density"])
    name = _check_set(subnet, period, df["knowledge_set"])
    rows = df[df["knowledge_set"] == name]
    return {u: float(d) for u, d in rows.groupby("unit", sort=False)["density"].mean().items()}


def load_masks(subnet, period: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask of the parameter's shape}, the union over mask seeds."""
    from ..core import unpack

    folder = Path(subnet) / "masks"
    name = _check_set(subnet, period, [f.name.rsplit("_seed", 1)[0] for f in folder.glob("*_seed*.npz")])
    params = dict(model.named_parameters())
    union: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob(f"{name}_seed*.npz")):
        try:
            with np.load(f) as arrays:
                masks = unpack(arrays)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{f}: not a readable subnet mask ({e})") from None
        for n, m in masks.items():
            if n not in params:
                raise InputError(f"{f}: mask for {n!r}, which is not a parameter of the model")
            full = np.broadcast_to(m, tuple(params[n].shape))  # neuron masks cover their rows/columns
            union[n] = full | union[n] if n in union else full.copy()
    return {n: torch.from_numpy(np.ascontiguousarray(m)) for n, m in union.items()}


class SparseUpdate:
    """Keeps every entry outside `masks` at its value at construction (see module doc)."""

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.items = [(params[n], m, params[n].detach().clone()) for n, m in masks.items()]
        for p, m, _ in self.items:
            p.register_hook(self._grad_hook(m))

    @staticmethod
    def _grad_hook(mask: torch.Tensor):
        on = {}

        def hook(grad):
            if grad.device not in on:
                on[grad.device] = mask.to(grad.device)
            return grad.masked_fill(~on[grad.device], 0)
        return hook

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: self.restore())

    @torch.no_grad()
    def restore(self) -> None:
        for i, (p, m, frozen) in enumerate(self.items):
            if m.device != p.device:  # accelerate moved the model after construction
                m, frozen = m.to(p.device), frozen.to(p.device)
                self.items[i] = (p, m, frozen)
            p.copy_(torch.where(m, p, frozen))

    def trainable(self) -> int:
        return sum(int(m.sum()) for _, m, _ in self.items)


def _check(entry, method):
    if "lora" in method or "k_adapter" in method:
        raise InputError("method: mask trains base weights; it does not combine with lora or k_adapter")


PART = register(Part("mask", needs=lambda entry, method: ["subnet"], check=_check))
