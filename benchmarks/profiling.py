"""Figure 1, profiling cost: per-example per-unit gradient norms of B sequences in one
batched pass (`gradloc.pergrad.per_example_grad_norms`, what `gradloc profile` runs) and
the naive loop (one backward per sequence, norms from `.grad`), each divided by one plain
batched forward+backward of the same batch; and how far apart the two norms are."""

from __future__ import annotations

import torch

from .common import gpt2, interleaved, median, paired_ratio, random_batch, row


def plain_backward(model, ids, mask) -> None:
    """One ordinary batched forward + backward (weight gradients formed), the same loss as
    the profile's: sum over examples of each example's mean token loss."""
    from gradloc.pergrad import per_example_loss

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    per_example_loss(logits, ids, mask).sum().backward()


def naive_grad_norms(model, ids, mask, units: dict[str, list[str]]) -> torch.Tensor:
    """(B, n_units) per-example unit gradient norms, one backward per sequence."""
    params = dict(model.named_parameters())
    rows = []
    for b in range(ids.shape[0]):
        plain_backward(model, ids[b:b + 1], mask[b:b + 1])
        rows.append(torch.stack([sum(params[n].grad.pow(2).sum() for n in names if params[n].grad is not None)
                                 for names in units.values()]).sqrt())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def run(sizes, batches, seq_len: int, reps: int) -> list[dict]:
    from gradloc.models import layer_units
    from gradloc.pergrad import per_example_grad_norms

    rows = []
    for n_layer, n_embd in sizes:
        model = gpt2(n_layer, n_embd, seq_len).eval()
        units = layer_units(model, "block")
        for B in batches:
            ids, mask = random_batch(B, seq_len)
            ours = per_example_grad_norms(model, ids, mask, units)
            naive = naive_grad_norms(model, ids, mask, units)
            err = float(((ours - naive).abs() / naive.abs().clamp(min=1e-12)).max())
            t = interleaved({"plain": lambda: plain_backward(model, ids, mask),
                             "ours": lambda: per_example_grad_norms(model, ids, mask, units),
                             "naive": lambda: naive_grad_norms(model, ids, mask, units)}, reps)
            s = f"{n_layer}x{n_embd}, B={B}, T={seq_len}"
            rows.append(row(1, f"ours / plain fwd+bwd, {s}", paired_ratio(t, "ours", "plain"), op="<=", target=1.5))
            # ~B: what the naive loop would cost if one sequence left the device as idle as on a GPU
            rows.append(row(1, f"naive loop / plain fwd+bwd, {s}", paired_ratio(t, "naive", "plain"), op="~", target=B))
            rows.append(row(1, f"ours / naive loop, {s}", paired_ratio(t, "ours", "naive"), op="<=", target=1.0))
            rows.append(row(1, f"plain fwd+bwd time, {s}", median(t["plain"]), "s"))
            rows.append(row(1, f"ours vs naive max relative difference, {s}", err, "rel", op="<", target=1e-3))
    return rows
