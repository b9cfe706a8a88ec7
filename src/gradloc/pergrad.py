"""Per-example, per-unit gradient norms in one batched backward pass (the tracer
behind `gradloc profile`).

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
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean next-token loss of each example over its own (unpadded) tokens; with
    `loss_mask` (B, T), only over the target tokens it marks (a salient span)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = attention_mask[:, 1:].to(nll.dtype)
    if loss_mask is not None:
        valid = valid * loss_mask[:, 1:].to(nll.dtype)
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def per_example_param_sq_norms(model: nn.Module, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor,
                               loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Parameter name -> (B,) squared norm of each example's loss gradient (right
    padding; padded positions carry no loss; `loss_mask`: only the marked target tokens
    do). One batched forward and backward."""
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
            loss = per_example_loss(logits, input_ids, attention_mask, loss_mask).sum()
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
