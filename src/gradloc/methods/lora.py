"""LoRA (`method.lora`, via PEFT): which linears it wraps, and which unit each LoRA
parameter belongs to.

A LoRA parameter belongs to the unit of the module it wraps. That is found through
module identity: the modules to wrap are recorded before `get_peft_model`, and each
PEFT LoRA layer afterwards is matched to one of them by its public `get_base_layer()`,
so nothing depends on how PEFT names its parameters.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..io import InputError
from ..models import classify_child, find_blocks
from ..parts import Part, register

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


def add_lora(model: nn.Module, cfg: dict, targets: dict[str, str]) -> tuple[nn.Module, dict[str, str]]:
    """`model` with LoRA on the modules `targets` ({module name: unit}), and {name of each
    trainable LoRA parameter in the wrapped model: unit of the module it wraps}."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    unit_of_module = {modules[name]: unit for name, unit in targets.items()}  # keyed by the module itself
    config = LoraConfig(r=int(cfg["r"]), lora_alpha=cfg["alpha"], lora_dropout=float(cfg["dropout"]),
                        target_modules=list(targets), bias="none",
                        fan_in_fan_out=type(modules[next(iter(targets))]).__name__ == "Conv1D")
    wrapped = get_peft_model(model, config)
    unit_of, seen = {}, set()
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if base not in unit_of_module:
            raise RuntimeError(f"PEFT wrapped {name}, which is not a LoRA target")
        seen.add(base)
        for pname, p in module.named_parameters(prefix=name):
            if p.requires_grad:
                unit_of[pname] = unit_of_module[base]
    stray = [n for n, p in wrapped.named_parameters() if p.requires_grad and n not in unit_of]
    if len(seen) != len(unit_of_module) or stray:
        raise RuntimeError(f"PEFT did not wrap exactly the LoRA targets (unmatched trainable parameters: {stray})")
    return wrapped, unit_of


def wrap(model: nn.Module, cfg: dict, unit_of: dict[str, str], trained) -> tuple[nn.Module, dict[str, str]]:
    """Freeze `model` and add LoRA (settings `cfg`) to its `cfg["targets"]` linears in the
    `trained` units (`unit_of`: {parameter name: unit}); returns what `add_lora` does."""
    targets = lora_targets(model, cfg["targets"], lambda m: unit_of.get(m + ".weight") in trained)
    model.requires_grad_(False)
    return add_lora(model, cfg, {m: unit_of[m + ".weight"] for m in targets})


def _check(entry, method):
    if "k_adapter" in method:
        raise InputError("method: choose one adapter, lora or k_adapter")


PART = register(Part("lora", check=_check))
