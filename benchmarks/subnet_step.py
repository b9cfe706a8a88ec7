"""Mask-training step vs a plain training step on the same model and tokens (issue 15:
masks are one extra elementwise op per weight, so the target is at most 2x).

    python benchmarks/subnet_step.py [--threads 2] [--steps 20]

The model is the embedded default's architecture (6 x 128, vocab 2048); a batch is 96
facts of 16 tokens and 16 base-text sequences of 128 tokens, as in config/config.yaml.
"""

import argparse
import time

import numpy as np
import pandas as pd
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gradloc import schema, subnet


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V = 2048
    lm = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=128, n_head=4, n_positions=128, vocab_size=V)).eval()
    ids = torch.randint(0, V, (96, 16))
    lm_ids = torch.randint(0, V, (16, 128))
    obj = torch.zeros_like(ids)
    obj[:, -2:] = 1
    with torch.no_grad():
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "object": obj,
                 "is_target": (torch.arange(96) < 32).long(), "ref": subnet.reference_logprobs(lm, ids),
                 "lm_ids": lm_ids, "lm_ref": subnet.reference_logprobs(lm, lm_ids)}
    params = schema.fill("subnet", {})

    def timed(step):
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - start) / args.steps

    lm.requires_grad_(False)
    masked = subnet.MaskedLM(lm, subnet.mask_targets(lm), params, args.steps)
    opt_m = torch.optim.Adam(masked.parameters(), lr=0.2)

    def mask_step():
        loss = masked(batch)
        loss.backward()
        opt_m.step()
        opt_m.zero_grad()

    t_mask = timed(mask_step)
    plain = GPT2LMHeadModel(lm.config).train()
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-3)

    def plain_step():
        loss = plain(input_ids=ids, labels=ids).loss + plain(input_ids=lm_ids, labels=lm_ids).loss
        loss.backward()
        opt_p.step()
        opt_p.zero_grad()

    t_plain = timed(plain_step)
    print(pd.DataFrame([{"threads": args.threads, "mask_step_s": t_mask, "plain_step_s": t_plain,
                         "ratio": t_mask / t_plain,
                         "masked_weights": sum(int(np.prod(s)) for _, _, s in subnet.mask_targets(lm).values())}])
          .to_string(index=False))


if __name__ == "__main__":
    main()
