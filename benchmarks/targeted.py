"""Figure 2, targeted training: step time of TGL-FP training k of L blocks / full
fine-tuning step, next to the analytical FLOP limit (`step_flops`), and AdamW state bytes
/ full next to the trained-parameter share. The model is frozen by
`gradloc.methods.prepare`, the optimizer built by `methods.make_optimizer`, and a step is
the body of `gradloc.engine.fit`'s loop (loss, backward, clip, optimizer, scheduler)."""

from __future__ import annotations

from .common import VOCAB, gpt2, interleaved, median, paired_ratio, random_batch, row, warm

WITHIN = 0.10  # the target: within 10% of the FLOP limit

_ACCELERATOR = None


def accelerator():
    """One accelerator for every model here, as `gradloc.train.run` makes one per run."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from gradloc import engine

        _ACCELERATOR = engine.make_accelerator("no")
    return _ACCELERATOR


def trainee(n_layer, n_embd, seq_len, blocks: list[int] | None, steps: int = 10**6):
    """(step(x), optimizer, trained parameter count) set up by the pipeline's own code:
    `methods.prepare` freezes (`blocks` None = full fine-tuning, else TGL-FP training those
    blocks), `methods.make_optimizer` builds AdamW, `engine.make_scheduler` the linear
    schedule, and step(x) runs what one iteration of `engine.fit` runs on the (B, T) batch x
    (`engine.causal_lm_loss`, backward, clip 1.0, optimizer and scheduler step, zero_grad)."""
    from gradloc import engine, methods

    model = gpt2(n_layer, n_embd, seq_len)
    if blocks is None:
        prep = methods.prepare(model, {"layers": "all"})
    else:
        sel = {"granularity": "block", "units": [f"block.{i}" for i in blocks], "lr_multipliers": {}}
        prep = methods.prepare(model, {"layers": "tgl_fp"}, sel)
    optimizer = methods.make_optimizer(prep, lr=1e-4, weight_decay=0.01)
    scheduler = engine.make_scheduler(optimizer, "linear", steps, 0)
    acc = accelerator()
    model, optimizer, scheduler = acc.prepare(prep.model, optimizer, scheduler)
    model.train()
    trained = sum(p.numel() for g in prep.groups for p in g["params"])

    def step(x):
        batch = {"input_ids": x, "labels": x}
        with acc.accumulate(model):
            loss = engine.causal_lm_loss(model, batch)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    return step, optimizer, trained


def step_flops(n_layer: int, n_embd: int, seq_len: int, vocab: int, trainable: list[int] | None) -> float:
    """Matmul FLOPs per token of one training step (elementwise work is not counted).

    A block's forward is w + a: w = 24 d^2 for its weight matmuls (qkv 3d^2, out d^2, MLP
    8d^2 multiply-adds), a = 4 T d for attention (scores and weighted sum, no weights).
    The head is h = 2 d V; the embedding lookup costs nothing. Backward: the input-gradient
    of a block costs w + 2a (both operands of the attention matmuls), its weight-gradient w,
    so a fully trained block costs 3x its forward. Full training (`trainable` None): every
    input- and weight-gradient. TGL-FP training blocks `trainable` (embeddings and the tied
    head frozen): forward through all L blocks and the head; input-gradients of the head and
    of blocks m..L-1, m the lowest trainable one, whose own input-gradient autograd forms
    too (its ln_1 trains, and ln_1's gradient needs the one through the q/k/v matmul; only
    the blocks below m are skipped); weight-gradients of trainable blocks only.
    """
    d, T = n_embd, seq_len
    w, a, h = 24 * d * d, 4 * T * d, 2 * d * vocab
    forward = n_layer * (w + a) + h
    if trainable is None:
        return forward + (n_layer * (w + 2 * a) + h) + (n_layer * w + h)
    m = min(trainable)
    return forward + (h + (n_layer - m) * (w + 2 * a)) + len(trainable) * w


def placements(n_layer: int) -> list[tuple[str, list[int]]]:
    """k = L/4 and L/2 blocks, at the bottom and at the top."""
    out = []
    for k in sorted({max(1, n_layer // 4), max(1, n_layer // 2)}):
        out.append((f"k={k}/{n_layer} lower", list(range(k))))
        out.append((f"k={k}/{n_layer} upper", list(range(n_layer - k, n_layer))))
    return out


def run(size, batch: int, seq_len: int, reps: int) -> list[dict]:
    from gradloc.train import optimizer_state_bytes

    n_layer, n_embd = size
    configs = {"full": None, **dict(placements(n_layer))}
    trainees = {name: trainee(n_layer, n_embd, seq_len, blocks) for name, blocks in configs.items()}
    x, _ = random_batch(batch, seq_len)
    t = interleaved({name: warm(lambda step=step: step(x)) for name, (step, _, _) in trainees.items()}, reps)
    full_flops = step_flops(n_layer, n_embd, seq_len, VOCAB, None)
    full_state = optimizer_state_bytes(trainees["full"][1])
    full_params = trainees["full"][2]
    s0 = f"{n_layer}x{n_embd}, B={batch}, T={seq_len}"
    rows = [row(2, f"full step time, {s0}", median(t["full"]), "s"),
            row(2, f"full AdamW state, {s0}", full_state / 2**20, "MiB")]
    for name, blocks in configs.items():
        if blocks is None:
            continue
        _, opt, trained = trainees[name]
        limit = step_flops(n_layer, n_embd, seq_len, VOCAB, blocks) / full_flops
        rows.append(row(2, f"TGL-FP step / full step, {name}, {s0}", paired_ratio(t, name, "full"),
                        op="within", target=limit, tol=WITHIN))
        rows.append(row(2, f"analytical limit, {name}", limit))
        rows.append(row(2, f"AdamW state / full, {name}", optimizer_state_bytes(opt) / full_state,
                        op="=", target=trained / full_params, tol=0.01))
    return rows
