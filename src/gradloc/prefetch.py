"""Stage `gradloc prefetch`: download, once and on a host with network, everything the
jobs would fetch from the Hugging Face hub (the TemporalWiki release, hub models), so
that cluster jobs run offline (HF_HUB_OFFLINE=1) from the cache.

`params`: {"data": the data section, "models": [model settings, ...]}. The cache is
huggingface_hub's (HF_HUB_CACHE; the workflow points it at $GRADLOC_CACHE or
<results>/hf_cache). Writes `out` (JSON): what is cached, with the commit each resolved to.
"""

from __future__ import annotations

import logging
import os

from .hub import hub_models
from .io import InputError, atomic_output, write_json

log = logging.getLogger(__name__)

def run(params: dict, out) -> None:
    from huggingface_hub import snapshot_download

    from .data import temporalwiki

    unknown = set(params) - {"data", "models"}
    if unknown:
        raise InputError(f"prefetch params: unknown key(s) {sorted(unknown)}; expected data, models")
    data, models = params.get("data") or {}, params.get("models") or []
    fetched = []
    if data.get("source") == "temporalwiki":
        p = temporalwiki.with_defaults(data.get("temporalwiki"))
        if not p["local_dir"]:
            root = temporalwiki.fetch(p)
            fetched.append({"repo": p["hub_id"], "type": "dataset", "revision": p["revision"], "path": str(root)})
    for m in hub_models(models):
        kwargs = {"revision": m.get("revision")}
        if m.get("gguf_file"):
            kwargs["allow_patterns"] = [m["gguf_file"], "*.json", "*.model", "*.txt"]
        log.info("prefetching model %s (revision %s)", m["name_or_path"], m.get("revision") or "main")
        path = snapshot_download(m["name_or_path"], **kwargs)
        fetched.append({"repo": m["name_or_path"], "type": "model", "revision": m.get("revision"), "path": path})
    if not fetched:
        log.info("prefetch: nothing to fetch (local data and models)")
    with atomic_output(out, is_dir=False) as tmp:
        write_json({"cache": os.environ.get("HF_HUB_CACHE"), "fetched": fetched}, tmp)
