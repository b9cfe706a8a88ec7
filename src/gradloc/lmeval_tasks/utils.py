"""Loader of the shipped gradloc_cloze data (lm-eval's `custom_dataset`): a local json
lines file read in memory, so the task needs no network and writes no cache."""

import json
from pathlib import Path


def load(**kwargs):
    import datasets

    lines = Path(__file__).with_name("gradloc_cloze.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])})
