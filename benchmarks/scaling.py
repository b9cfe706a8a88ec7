"""Figure 5, scaling: profiling and full training-step time against the number of
sequences (at one model size) and against model size (at one batch; size = forward
matmul FLOPs per token), with the log-log growth exponent (1 = linear)."""

from __future__ import annotations

from .common import VOCAB, gpt2, interleaved, loglog_slope, median, random_batch, row, warm
from .targeted import step_flops, trainee

MAX_EXPONENT = 1.1


def series(label: str, points, seq_len: int, reps: int) -> list[dict]:
    """points: [(x, x label, model size, batch)]. Every point's models first, then all
    calls round robin: the growth compares points measured side by side."""
    from gradloc.models import layer_units
    from gradloc.pergrad import per_example_grad_norms

    fns, models = {}, {}
    for x, _, size, B in points:
        if size not in models:
            model = gpt2(*size, seq_len).eval()
            models[size] = (model, layer_units(model, "block"), trainee(*size, seq_len, None)[0])
        model, units, step = models[size]
        ids, mask = random_batch(B, seq_len)
        fns[("profile", x)] = warm(lambda model=model, ids=ids, mask=mask, units=units:
                                   per_example_grad_norms(model, ids, mask, units), 1)
        fns[("step", x)] = warm(lambda step=step, ids=ids: step(ids), 1)
    t = interleaved(fns, reps)
    xs = [p[0] for p in points]
    rows = []
    for kind, name in (("profile", "profile"), ("step", "train step")):
        ys = [median(t[(kind, x)]) for x in xs]
        rows.extend(row(5, f"{name} time, {label}={p[1]}", y, "s") for p, y in zip(points, ys))
        # the slope of each round's points, median over rounds (paired, like the ratios)
        slope = median([loglog_slope(xs, [t[(kind, x)][r] for x in xs]) for r in range(reps)])
        rows.append(row(5, f"{name} growth exponent vs {label}", slope, "exponent", op="<=", target=MAX_EXPONENT))
    return rows


def run(counts, count_size, sizes, size_batch: int, seq_len: int, reps: int) -> list[dict]:
    rows = series("sequences", [(n, f"{n} ({count_size[0]}x{count_size[1]}, T={seq_len})", count_size, n)
                                for n in counts], seq_len, reps)
    flops = [step_flops(L, d, seq_len, VOCAB, None) / 3 for L, d in sizes]
    rows += series("model FLOPs/token", [(f, f"{f / 1e6:.2f}M ({L}x{d}, B={size_batch})", (L, d), size_batch)
                                         for f, (L, d) in zip(flops, sizes)], seq_len, reps)
    return rows
