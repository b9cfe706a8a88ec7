"""K-Adapter (`method.k_adapter`, Wang et al. 2021): a frozen LM plus a chain of small
transformer adapters reading its hidden states. Saved and loaded by `checkpoint`."""

from __future__ import annotations

import torch
from torch import nn

from ..engine import lm_loss
from ..io import InputError
from ..models import find_blocks
from ..parts import Part, register


class AdapterBlock(nn.Module):
    """Down-projection, one pre-norm causal transformer layer, up-projection (K-Adapter's
    adapter layer). The up-projection starts at zero, so training starts from exactly
    the base model."""

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


def _check(entry, method):
    if method.get("layers", "all") != "all":
        raise InputError("method: k_adapter freezes the base model; use layers: all")


PART = register(Part("k_adapter", check=_check))
