"""Peak memory and speed of the TemporalWiki diffset reader on a full-size file.

Writes a ~1 GB `wikipedia_0809_gpt2.csv` in the release's format (one column `text`,
GPT-2-sized chunks of ~1,300 characters in page order: a first chunk "Title. ...",
continuation chunks mid-sentence, ~4% duplicate rows) in a temporary folder, then reads
it with `gradloc.data.temporalwiki.sample_chunks` in a fresh process per mode and prints
rows/s and the process's peak RSS:

  all      every row kept (max_docs_per_period: null)
  sample   max_docs_per_period: 10000 (reservoir sample)

    PYTHONPATH=src python benchmarks/diffset_reader.py [--gb 1.0] [--keep DIR]

Target (issue 10): peak RSS under 1.5 GB for a full file.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and in to a was is for on as by with he that at from his it an were are which this be "
         "also has or had first one their its new after who they two her she been other when time during "
         "there into school all may years more most only over city some world would where later up such "
         "used many can state about national out known university united then made").split()


def write_diffset(path: Path, target_bytes: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pool = [" ".join(rng.choices(WORDS, k=230)) for _ in range(2000)]  # ~1,300 characters each
    rows = dups = 0
    size = 0
    page = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text"])
        last = ""
        while size < target_bytes:
            page += 1
            n = rng.choice((1, 1, 2, 3, 5))
            for c in range(n):
                body = pool[rng.randrange(len(pool))]
                if c == 0:
                    text = f"Page {page}. Page {page} {body} {rows}"
                else:
                    text = f"{body} {rows}"
                if c == n - 1:
                    text += " end."
                if last and rng.random() < 0.04:  # a repeated row
                    text = last
                    dups += 1
                w.writerow([text])
                last = text
                rows += 1
                size += len(text) + 3
    return {"rows": rows, "duplicates_written": dups, "pages": page, "bytes": path.stat().st_size}


def read(path: str, cap: int | None) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gradloc.data.temporalwiki import Member, sample_chunks

    start = time.perf_counter()
    ch = sample_chunks([Member(path)], cap, seed=0)
    secs = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"rows": ch.read, "duplicates": ch.duplicates, "kept": len(ch.rows), "titles": len(ch.titles),
            "seconds": round(secs, 1), "rows_per_s": round(ch.read / secs), "peak_rss_mb": round(peak_mb)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--keep", help="write the file here instead of a temporary folder")
    ap.add_argument("--read", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.read:  # the child process: one measurement
        print(json.dumps(read(a.read, a.cap)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "wikipedia_0809_gpt2.csv"
        t = time.perf_counter()
        info = write_diffset(path, int(a.gb * 1e9))
        print(f"wrote {path.name}: {info['bytes'] / 1e9:.2f} GB, {info['rows']} rows, {info['pages']} pages, "
              f"{info['duplicates_written']} repeated rows ({time.perf_counter() - t:.0f} s)")
        for mode, cap in (("all", None), ("sample", 10000)):
            cmd = [sys.executable, __file__, "--read", str(path)] + ([] if cap is None else ["--cap", str(cap)])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"{mode:7s} kept {r['kept']:>7} of {r['rows']} rows ({r['duplicates']} duplicates, "
                  f"{r['titles']} titles): {r['rows_per_s']} rows/s, {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
