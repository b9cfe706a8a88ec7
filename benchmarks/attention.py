"""Speed of the attention-scoring stage (`gradloc attention`) against a plain forward.

Prints tokens/s of, on the same batches of one GPT-2:
- `score`: `gradloc.attention.score_docs` (eager attention, one hook per layer reducing
  its weights to received attention, batching and windowing included);
- `eager`: a plain forward with eager attention (the target: score / eager <= 1.5);
- `sdpa`: a plain forward with the default (SDPA) attention, for reference.
Round robin over `--reps` rounds; ratios are medians of per-round time ratios.

    python benchmarks/attention.py [--n-layer 6 --n-embd 128 --batch 16 --seq-len 128 --docs 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gradloc import attention


def model(n_layer, n_embd, n_head, seq_len, vocab, impl):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=seq_len, vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                     attn_implementation=impl)
    return GPT2LMHeadModel(cfg).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, a.vocab, a.seq_len) for _ in range(a.docs)]  # full windows: no padding
    n_tok = sum(len(d) for d in docs)
    batches = [torch.as_tensor(np.stack(docs[i:i + a.batch])).to(dev) for i in range(0, len(docs), a.batch)]
    eager = model(a.n_layer, a.n_embd, a.n_head, a.seq_len, a.vocab, "eager").to(dev)
    sdpa = model(a.n_layer, a.n_embd, a.n_head, a.seq_len, a.vocab, "sdpa").to(dev)
    scorer = model(a.n_layer, a.n_embd, a.n_head, a.seq_len, a.vocab, "eager").to(dev)

    def plain(m):
        @torch.inference_mode()
        def fn():
            for ids in batches:
                m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return fn

    def score():
        attention.score_docs(scorer, docs, a.seq_len, a.batch, [], 0, dev)

    fns = {"score": score, "eager": plain(eager), "sdpa": plain(sdpa)}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(a.reps):
        for k, fn in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    print(f"device {dev}, {torch.get_num_threads()} thread(s); GPT-2 {a.n_layer}x{a.n_embd}, {a.n_head} heads, "
          f"{len(docs)} x {a.seq_len} tokens, batch {a.batch}, {a.reps} rounds")
    for k, ts in times.items():
        print(f"  {k:6s} {n_tok / statistics.median(ts):12,.0f} tokens/s")
    for base in ("eager", "sdpa"):
        r = statistics.median(s / b for s, b in zip(times["score"], times[base]))
        print(f"  score / {base} forward time: {r:.2f}" + ("   (target <= 1.5)" if base == "eager" else ""))


if __name__ == "__main__":
    main()
