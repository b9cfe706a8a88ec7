"""Small TemporalWiki releases in the real layouts (issue 10), written by the tests.

As released: `TWiki_Diffsets/wikipedia_{0809,0910,1011,1112}_gpt2.csv` with one column
`text` (GPT-2 chunks in page order: a page's first chunk starts "Title. ", later chunks
start mid-sentence; some rows repeated), `twiki_probes/` in lower case with a
`.DS_Store` and `{period}_{changed,unchanged}.csv` headed exactly
`subject,relation,object`, and `Wikipedia_Full/wikipedia_08_gpt2/part1.csv` (column
`text`). `write_release(root, zipped=True)` lays them out as the hub ships them
(`TWiki_Diffsets.zip`, `TWiki_Probes.zip`, `Wikipedia_Full.zip`).
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

PERIODS = ["0801-0901", "0901-1001", "1001-1101", "1101-1201"]
SHORT = {"0801-0901": "0809", "0901-1001": "0910", "1001-1101": "1011", "1101-1201": "1112"}
FILLER = ("the council reported that the project continued through the season while "
          "local partners reviewed the plans and the budget in several public meetings").split()

# Pages in the base snapshot (0801) and in each period's diffset.
BASE_PAGES = ["Mara Keller", "Osterby", "Acme Works", "Valdoria"]
DIFF_PAGES = {
    "0801-0901": ["Mara Keller", "Nova Labs"],
    "0901-1001": ["Lumo Air", "Osterby"],
    "1001-1101": ["Mara Keller", "Quill Press"],
    "1101-1201": ["Nova Labs", "Rhea Station"],
}
# (subject, relation, object): changed facts of each period (new and updated together, as
# TemporalWiki ships them) and unchanged ones.
CHANGED = {
    "0801-0901": [("Mara Keller", "employer", "Nova Labs"), ("Nova Labs", "instance of", "company")],
    "0901-1001": [("Lumo Air", "manufacturer", "Nova Labs"), ("Osterby", "head of government", "Ines Roth")],
    "1001-1101": [("Quill Press", "country", "Valdoria"), ("Mara Keller", "residence", "Osterby")],
    "1101-1201": [("Rhea Station", "operator", "Nova Labs"), ("Nova Labs", "headquarters", "Osterby")],
}
UNCHANGED = {p: [("Osterby", "country", "Valdoria"), ("Acme Works", "instance of", "company")] for p in PERIODS}
# Truth for the new/updated split with base titles: new = no page before the period.
NEW_SUBJECTS = {"0801-0901": {"Nova Labs"}, "0901-1001": {"Lumo Air"}, "1001-1101": {"Quill Press"},
                "1101-1201": {"Rhea Station"}}


def page_chunks(title: str, n_chunks: int = 3, words_per_chunk: int = 200) -> list[str]:
    """A page as GPT-2-like chunks: "Title. Title is ..." then cuts mid-sentence (a
    continuation starts with a lower-case word, a full chunk is > 1000 characters and
    does not end a sentence); the last chunk ends the page with a full stop."""
    words = f"{title}. {title} is a subject of this article and".split()
    i = sum(map(ord, title))  # each page its own filler, so only real repeats are duplicates
    while len(words) < n_chunks * words_per_chunk - 5:
        words.append(FILLER[i % len(FILLER)] if i % 7 else f"{FILLER[i % len(FILLER)]}{i}")
        i += 1
    chunks = [" ".join(words[k:k + words_per_chunk]) for k in range(0, len(words), words_per_chunk)]
    chunks[-1] += " and it ended."
    return chunks


def rows_of(pages: list[str], duplicate_every: int = 3, chunks: int = 3) -> list[str]:
    """Rows of a chunk file in page order, every `duplicate_every`-th row repeated right
    after itself (the release has ~35k duplicate rows per file)."""
    rows = []
    for title in pages:
        for text in page_chunks(title, chunks):
            rows.append(text)
            if duplicate_every and len(rows) % duplicate_every == 0:
                rows.append(text)
    return rows


def text_csv(rows: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text"])
    w.writerows([r] for r in rows)
    return buf.getvalue()


def probe_csv(triples) -> str:
    return "subject,relation,object\n" + "".join(f"{s},{r},{o}\n" for s, r, o in triples)


def release_files(base: bool = True) -> dict[str, str | bytes]:
    """{path in the release: content}."""
    files: dict[str, str | bytes] = {}
    for p in PERIODS:
        files[f"TWiki_Diffsets/wikipedia_{SHORT[p]}_gpt2.csv"] = text_csv(rows_of(DIFF_PAGES[p]))
        files[f"twiki_probes/{p}_changed.csv"] = probe_csv(CHANGED[p])
        files[f"twiki_probes/{p}_unchanged.csv"] = probe_csv(UNCHANGED[p])
    files["twiki_probes/.DS_Store"] = b"\x00\x00\x00\x01Bud1\x00"
    if base:
        files["Wikipedia_Full/wikipedia_08_gpt2/part1.csv"] = text_csv(rows_of(BASE_PAGES))
        files["Wikipedia_Full/wikipedia_09_gpt2/part1.csv"] = text_csv(rows_of(["Not The Base"]))
    return files


ZIPS = {"TWiki_Diffsets": "TWiki_Diffsets.zip", "twiki_probes": "TWiki_Probes.zip",
        "Wikipedia_Full": "Wikipedia_Full.zip"}


def write_release(root: Path, zipped: bool = False, base: bool = True) -> Path:
    """The release under root: unpacked folders, or the hub's three zips."""
    root.mkdir(parents=True, exist_ok=True)
    files = release_files(base)
    if not zipped:
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return root
    archives: dict[str, zipfile.ZipFile] = {}
    for rel, content in files.items():
        top = rel.split("/", 1)[0]
        z = archives.get(top) or archives.setdefault(top, zipfile.ZipFile(root / ZIPS[top], "w", zipfile.ZIP_DEFLATED))
        z.writestr(rel, content)
        if top == "twiki_probes" and rel.endswith(".csv"):
            z.writestr(f"__MACOSX/{rel.rsplit('/', 1)[0]}/._{rel.rsplit('/', 1)[1]}", b"\x00\x05\x16\x07")
    for z in archives.values():
        z.close()
    return root
