"""Writing and reading a trained model: the one way evaluation and the next period load
a checkpoint. LoRA is merged into the weights before saving; a K-Adapter saves its base
model (a plain model folder) plus its adapters beside it."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..io import read_json, write_json
from ..models import checkpoint_dir, load_model, save_model
from .kadapter import KAdapterModel

K_ADAPTER_FILES = ("k_adapter.json", "k_adapter.safetensors")


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
