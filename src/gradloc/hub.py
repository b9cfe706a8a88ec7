"""The Hugging Face hub and offline compute nodes: which settings fetch from the hub, and
the error a job gives when it would need the network (the `prefetch` stage fills the cache)."""

from __future__ import annotations

import os
from pathlib import Path

from .io import InputError

OFFLINE_HINT = ("run the workflow's `prefetch` rule first, on a host with network "
                "(`snakemake prefetch --configfile ...`), or point the setting at a local folder")

def hub_models(models: list[dict]) -> list[dict]:
    """The model settings that name a hub repo (not a local folder, not scratch)."""
    return [m for m in models if m.get("source", "scratch") != "scratch" and m.get("name_or_path")
            and not Path(str(m["name_or_path"])).exists()]


def needs_prefetch(data: dict, models: list[dict]) -> bool:
    twiki = data.get("source") == "temporalwiki" and not (data.get("temporalwiki") or {}).get("local_dir")
    return bool(twiki or hub_models(models))


def offline_error(what: str, revision, error: Exception) -> InputError:
    """One line for a hub file missing from the cache of an offline job."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return InputError(f"{what} (revision {revision or 'main'}) is not in the Hugging Face cache ({cache}) and "
                      f"this job runs offline (HF_HUB_OFFLINE=1): {OFFLINE_HINT} "
                      f"[{type(error).__name__}]")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
