"""Does tracking cost time? The training loop (`gradloc.engine.fit`) on the default
config's GPT-2 (6 layers, 128 wide, 128 positions, vocab 2048; batch 16, log every 10
steps as `train`), with tracking off and with TensorBoard, round robin over `--reps`
rounds (the order alternating). Prints each round's seconds, the medians, the median
per-round ratio, and the seconds spent inside the tracker's calls (timed around each:
robust on a shared machine, where whole-run times vary by more than the effect).

    python benchmarks/tracking.py [--steps 100 --reps 3 --log-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gradloc import engine, tracking

SPENT = [0.0]


def timed(f):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            SPENT[0] += time.perf_counter() - t
    return wrapper


for _name in ("begin", "steps", "row", "finish"):
    setattr(tracking.Run, _name, timed(getattr(tracking.Run, _name)))


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitems__(self, rows):
        x = self.ids[rows]
        return {"input_ids": x, "labels": x}


def one(steps: int, log_every: int, folder: str | None) -> float:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=128, n_head=4, n_positions=128, vocab_size=2048,
                                       bos_token_id=0, eos_token_id=0))
    data = Blocks(torch.randint(0, 2048, (16 * steps, 128), generator=torch.Generator().manual_seed(0)))
    acc = engine.make_accelerator("no")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = engine.make_scheduler(opt, "linear", steps, 0)
    batches = engine.StepBatches(lambda s: torch.arange(s * 16, (s + 1) * 16), steps, 1, 1)
    tracker = None
    if folder:
        tracker = tracking.Run("train", "bench", 0, 1, config={"steps": steps},
                               cfg={"backend": "tensorboard", "dir": folder})
    start = time.perf_counter()
    engine.fit(acc, model, opt, sched, data, batches, grad_clip=1.0, log_every=log_every, desc="bench",
               tracker=tracker)
    if tracker:
        tracker.finish({"steps": steps})
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    off, on, inside = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        one(5, a.log_every, None)  # warm-up
        for r in range(a.reps):
            for tracked in ((False, True) if r % 2 == 0 else (True, False)):
                SPENT[0] = 0.0
                (on if tracked else off).append(one(a.steps, a.log_every, tmp if tracked else None))
                if tracked:
                    inside.append(SPENT[0])
            print(f"round {r}: none {off[-1]:.2f} s, tensorboard {on[-1]:.2f} s "
                  f"(of which in tracker calls {inside[-1]:.3f} s)", flush=True)
    ratio = statistics.median(b / x for x, b in zip(off, on))
    print(f"{a.steps} steps: none median {statistics.median(off):.2f} s, tensorboard median "
          f"{statistics.median(on):.2f} s; median ratio tensorboard/none {ratio:.3f}; in tracker calls "
          f"median {statistics.median(inside):.3f} s = {statistics.median(i / x for i, x in zip(inside, on)):.2%} "
          "of the tracked run")


if __name__ == "__main__":
    main()
