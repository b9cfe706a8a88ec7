"""CaMeLS meta-training memory (issue 13, part 6): peak memory of one outer step (the
weighting model weights `k` sequential documents, the base model takes k differentiable
SGD steps, the outer loss backpropagates through all of them) against k and the base
model's size.

    python benchmarks/camels_memory.py                 # CPU: peak RSS per case, fresh process each
    python benchmarks/camels_memory.py --device cuda   # GPU: torch.cuda.max_memory_allocated

Each case runs in its own process so that one case's peak does not hide the next's. The
figure is the peak during the outer step minus the memory held before it (models,
optimizer, data), i.e. what the unrolled inner steps cost. Documents are `--tokens`
tokens (the default's `camels.max_tokens` is 128), 8 probes, 4 KL documents, fp32. The
last lines fit bytes = a + b * params * k over the cases and say how many inner steps
fit in a given GPU's memory for a given model size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SIZES = {"6x128": (6, 128), "6x256": (6, 256), "12x256": (12, 256), "12x512": (12, 512)}
STEPS = (1, 2, 4, 6)
GPT2_LARGE = 774_000_000


def case(size: str, k: int, device: str, tokens: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gradloc import metatrain
    from gradloc.methods.weighting import WeightingModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    n_layer, n_embd = SIZES[size]
    V = 2048
    base = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=V, n_positions=256))
    base = metatrain.twice_differentiable(base).to(device).eval()
    base.requires_grad_(False)
    backbone = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=V, n_positions=256))
    wmodel = WeightingModel(backbone).to(device)
    opt = torch.optim.Adam(wmodel.parameters(), lr=1e-5)
    params = {n: p.detach() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, V, (1, tokens), generator=g).to(device) for _ in range(k)]
    probes = metatrain.pad([torch.randint(0, V, (12,), generator=g).tolist() for _ in range(8)])
    kl = metatrain.pad([torch.randint(0, V, (tokens,), generator=g).tolist() for _ in range(4)])
    episode = {"docs": docs, "probes": tuple(t.to(device) for t in probes), "kl": tuple(t.to(device) for t in kl)}
    cfg = {"inner_lr": 5e-4, "kl_coef": 0.1}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss, *_ = metatrain.outer_loss(wmodel, base, params, episode, cfg)
    loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(p.numel() for p in base.parameters())
    return {"size": size, "params": n_params, "inner_steps": k, "step_bytes": peak - before}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of the GPU to extrapolate to")
    ap.add_argument("--case", nargs=2, metavar=("SIZE", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(case(args.case[0], int(args.case[1]), args.device, args.tokens)))
        return
    import numpy as np

    rows = []
    for size in SIZES:
        for k in STEPS:
            r = subprocess.run([sys.executable, __file__, "--device", args.device, "--tokens", str(args.tokens),
                                "--case", size, str(k)], capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{row['size']:>7} {row['params'] / 1e6:6.2f}M params  k={k}  "
                  f"outer-step memory {row['step_bytes'] / 2**20:8.1f} MiB  "
                  f"= {row['step_bytes'] / (row['params'] * 4 * k):5.2f} fp32 copies of the model per inner step",
                  flush=True)
    x = np.array([r["params"] * r["inner_steps"] for r in rows], dtype=float)
    y = np.array([r["step_bytes"] for r in rows], dtype=float)
    b, a = np.polyfit(x, y, 1)
    print(f"fit: bytes = {a / 2**20:.1f} MiB + {b:.2f} x params x inner steps "
          f"({b / 4:.2f} fp32 copies of the model per inner step)")
    # beside the step: the base weights and the checkpoint copy the base model is reset to
    k_max = (args.gpu_gb * 2**30 - 2 * 4 * GPT2_LARGE) / (b * GPT2_LARGE)
    print(f"extrapolated: GPT-2 large (774M, fp32) on a {args.gpu_gb:.0f} GB GPU: about {k_max:.1f} inner steps "
          f"of {args.tokens} tokens fit beside the model")


if __name__ == "__main__":
    main()
