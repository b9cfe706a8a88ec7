#!/usr/bin/env python
"""gradloc benchmarks: every figure measured side by side in one run (README.md).

    python benchmarks/run.py [--preset quick|full|tiny] [--out benchmarks/measured/results.csv]

One module per figure: 1 `profiling`, 2 `targeted`, 3 `throughput`, 4 `pipeline`,
5 `scaling`; `common` holds the timing, the rows (numeric targets) and the CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the benchmarks package from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import pipeline, profiling, scaling, targeted, throughput  # noqa: E402
from benchmarks.common import ROOT, format_table, machine, write_csv  # noqa: E402

# Sizes of each preset: (n_layer, n_embd) pairs, batch sizes, repetitions.
PRESETS = {
    "full": {
        "seq_len": 128, "reps": 3,
        "profile_sizes": [(4, 128), (8, 256)], "profile_batches": [8, 32],
        "train_size": (8, 256), "train_batch": 8, "train_reps": 6,
        "tput_size": (4, 128), "tput_batch": 8, "tput_steps": 24, "tput_reps": 5,
        "scale_counts": [8, 16, 32], "scale_count_size": (4, 128),
        "scale_sizes": [(2, 128), (4, 192), (8, 256)], "scale_size_batch": 8, "scale_reps": 4,
        "dry_reps": 3, "pipeline": True,
    },
    "quick": {
        "seq_len": 64, "reps": 2,
        "profile_sizes": [(4, 128), (8, 256)], "profile_batches": [8, 32],
        "train_size": (8, 128), "train_batch": 8, "train_reps": 4,
        "tput_size": (4, 128), "tput_batch": 8, "tput_steps": 12, "tput_reps": 3,
        "scale_counts": [8, 16, 32], "scale_count_size": (4, 128),
        "scale_sizes": [(2, 64), (4, 128), (8, 192)], "scale_size_batch": 8, "scale_reps": 3,
        "dry_reps": 2, "pipeline": True,
    },
    # the smoke test: every code path, seconds
    "tiny": {
        "seq_len": 16, "reps": 1,
        "profile_sizes": [(2, 32)], "profile_batches": [2, 4],
        "train_size": (4, 32), "train_batch": 2, "train_reps": 1,
        "tput_size": (2, 32), "tput_batch": 2, "tput_steps": 2, "tput_reps": 1,
        "scale_counts": [2, 4, 8], "scale_count_size": (2, 32),
        "scale_sizes": [(1, 32), (2, 32), (4, 32)], "scale_size_batch": 2, "scale_reps": 1,
        "dry_reps": 1, "pipeline": False, "slurm_probe": False,
    },
}


def run_all(preset: dict, workdir: Path, figures=(1, 2, 3, 4, 5), pipeline_config: str | None = None) -> list[dict]:
    p, T = preset, preset["seq_len"]
    steps = {
        1: lambda: profiling.run(p["profile_sizes"], p["profile_batches"], T, p["reps"]),
        2: lambda: targeted.run(p["train_size"], p["train_batch"], T, p["train_reps"]),
        3: lambda: throughput.run(p["tput_size"], p["tput_batch"], T, p["tput_steps"], p["tput_reps"],
                                  workdir / "throughput"),
        4: lambda: pipeline.run(workdir / "pipeline", p["dry_reps"], pipeline_config if p["pipeline"] else None,
                                p.get("slurm_probe", True)),
        5: lambda: scaling.run(p["scale_counts"], p["scale_count_size"], p["scale_sizes"], p["scale_size_batch"],
                               T, p["scale_reps"]),
    }
    rows = []
    for fig in figures:
        t = time.perf_counter()
        print(f"figure {fig} ...", file=sys.stderr, flush=True)
        rows += steps[fig]()
        print(f"figure {fig} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return rows


def quiet_libraries() -> None:
    """No progress bars or advice from the libraries between the figures (the pipeline
    run of figure 4 gets the original environment)."""
    pipeline.PIPELINE_ENV = dict(os.environ)
    os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full",
                    help="sizes and repetitions (full ~10 min on 2 CPU cores plus the pipeline run; quick ~3 min; "
                         "tiny: the smoke test)")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "measured" / "results.csv")
    ap.add_argument("--figures", default="1,2,3,4,5", help="comma-separated figures to run (default all)")
    ap.add_argument("--pipeline-config", default="config/test.yaml",
                    help="config of the timed pipeline run of figure 4 (the default config takes hours on a "
                         "CPU); 'none' skips the run, keeping the dry-run timing")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: stable ratios on a shared machine; 0 = torch's default)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    preset = PRESETS["quick" if args.quick else args.preset]
    figures = [int(f) for f in args.figures.split(",") if f.strip()]
    run_config = None if args.pipeline_config.lower() == "none" else args.pipeline_config
    desc = machine()
    print(f"machine: {desc}", file=sys.stderr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradloc-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows = run_all(preset, workdir, figures, run_config)
    write_csv(rows, args.out, desc)
    print(format_table(rows))
    print(f"\n{len(rows)} figures in {time.perf_counter() - t0:.0f} s on {desc}; written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
