"""Model cards: each checkpoint folder (`<stage folder>/model`) gets a README.md in
Hugging Face's model-card format (YAML metadata + text), which `huggingface_hub.ModelCard.load`
reads: the base model, method and its parts, period, seed, training tokens and the command
that made it.

Evaluation results cannot go into the checkpoint folder: it is another rule's output,
and changing it would make Snakemake rerun everything downstream. The `model-cards` stage
(`gradloc model-cards`) writes each checkpoint's card again with its evaluation (the probe
sets' perplexity and top-1, held-out perplexity) as model-index results, under
`model_cards/<method>/seed<s>/P<k>/README.md`; copy it over the checkpoint's README.md
before publishing the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CARD = "README.md"

TEXT = """
# {title}

{summary}

| | |
|---|---|
{facts}

Made by gradloc (gradient-localized lifelong pretraining) with:

```
{command}
```

Load it with `transformers.AutoModelForCausalLM.from_pretrained("<this folder>")`{k_adapter}.
{results}"""


def command() -> str:
    """The command line of this process as `gradloc <stage> ...` (what the rule log's first
    line shows), or the Python call's script and arguments."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if argv0.name in ("__main__.py", "gradloc") or argv0.parent.name == "gradloc":
        return shlex.join(["gradloc", *sys.argv[1:]])
    return shlex.join(["python", str(argv0.name), *sys.argv[1:]]) + "  # (called from Python)"


def origin(init) -> tuple[str | None, str | None]:
    """(HF base_model, the model it all started from as words) of the checkpoint a run
    started from, from its card; (None, None) without one or for a model from scratch."""
    card = Path(init) / "model" / CARD if (Path(init) / "model").is_dir() else Path(init) / CARD
    if not card.exists():
        return None, None
    from huggingface_hub import ModelCard

    data = ModelCard.load(card).data
    return data.base_model, (data.to_dict().get("gradloc") or {}).get("origin")


def write(folder, meta: dict, results: dict | None = None) -> Path:
    """`folder`/README.md from `meta` (title, summary, base_model, tags, facts: {label:
    value}, command, gradloc: machine-readable fields) and optional evaluation `results`
    (an evaluate summary.json)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    evals = []
    for key, value in (results or {}).items():
        if key == "facts" and isinstance(value, dict):  # fact-level: hits@1 among the candidates
            for name, entry in (value.get("sets") or {}).items():
                if entry.get("hits1") is not None:
                    evals.append(EvalResult(task_type="text-generation", dataset_type="gradloc-probes",
                                            dataset_name=f"period {results.get('period')} probes",
                                            dataset_split=name, metric_type="hits@1",
                                            metric_name=f"{name} hits@1 among {value.get('candidates')} candidates",
                                            metric_value=float(entry["hits1"])))
        elif isinstance(value, dict):  # one probe set
            for metric in ("object_ppl", "statement_ppl", "top1"):
                if value.get(metric) is not None:
                    evals.append(EvalResult(task_type="text-generation", dataset_type="gradloc-probes",
                                            dataset_name=f"period {results.get('period')} probes",
                                            dataset_split=key, metric_type=metric, metric_name=f"{key} {metric}",
                                            metric_value=float(value[metric])))
        elif key == "heldout_ppl" and value is not None:
            evals.append(EvalResult(task_type="text-generation", dataset_type="gradloc-heldout",
                                    dataset_name=f"period {results.get('period')} held-out text",
                                    metric_type="perplexity", metric_name="held-out perplexity",
                                    metric_value=float(value)))
    data = ModelCardData(base_model=meta.get("base_model"), library_name="transformers",
                         pipeline_tag="text-generation", tags=["gradloc", *meta.get("tags", [])],
                         model_name=meta["title"], eval_results=evals or None, gradloc=meta["gradloc"])
    facts = "\n".join(f"| {k} | {v} |" for k, v in meta["facts"].items())
    text = TEXT.format(title=meta["title"], summary=meta["summary"], facts=facts, command=meta["command"],
                       k_adapter=meta.get("load_note", ""), results=results_text(results))
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n" + text)
    path = Path(folder) / CARD
    card.save(path)
    return path


def results_text(results: dict | None) -> str:
    if not results:
        return "\n## Evaluation\n\nNot evaluated yet: the `model-cards` stage writes this card again with results.\n"
    facts = (results.get("facts") or {}).get("sets") or {}
    rows = ["| set | hits@1 (chance) | object ppl | statement ppl | top-1 | n |", "|---|---|---|---|---|---|"]
    for key, v in results.items():
        if isinstance(v, dict) and "n" in v:
            f = facts.get(key) or {}
            rows.append(f"| {key} | {_num(f.get('hits1'))} ({_num(f.get('chance_hits1'))}) | "
                        f"{_num(v.get('object_ppl'))} | {_num(v.get('statement_ppl'))} | {_num(v.get('top1'))} | "
                        f"{v['n']} |")
    held = results.get("heldout_ppl")
    return (f"\n## Evaluation (period {results.get('period')})\n\n" + "\n".join(rows) +
            f"\n\nHeld-out perplexity: {_num(held)}\n")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def train_meta(cfg: dict, metrics: dict, init) -> dict:
    method = cfg["method"]
    parts = ", ".join(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in method.items()) or "layers: all"
    base, first = origin(init)
    return {
        "title": f"gradloc {cfg['name']} (period {metrics['period']}, seed {metrics['seed']})",
        "summary": f"Continual pretraining of `{init}` on update period {metrics['period']}'s diff documents "
                   f"with method `{cfg['name']}`.",
        "base_model": base, "tags": ["continual-pretraining", cfg["name"]],
        "facts": {"base model": first or "(trained from scratch by gradloc)", "started from": f"`{init}`",
                  "method": f"`{cfg['name']}`", "parts": parts, "period": metrics["period"], "seed": metrics["seed"],
                  "training tokens": metrics["tokens"], "steps": metrics["steps"],
                  "trainable parameters": f"{metrics['trainable_params']} of {metrics['total_params']}"},
        "command": command(),
        "load_note": " (K-Adapter: `gradloc.methods.load_checkpoint`, which adds the adapters)"
        if "k_adapter" in method else "",
        "gradloc": {"stage": "train", "method": cfg["name"], "parts": method, "period": metrics["period"],
                    "seed": metrics["seed"], "training_tokens": metrics["tokens"], "init": str(init), "origin": first,
                    "command": command()},
    }


def base_meta(stage: str, params: dict, metrics: dict, tokens: int | None) -> dict:
    source = params["source"]
    base = None if source == "scratch" else params.get("name_or_path")  # a hub id or a folder
    package = (params.get("package") or {}).get("files")
    shown = base or (" + ".join(package) if package else params.get("gguf_file"))  # a model file shipped in a package
    pre = params["pretrain"]
    trained = source == "scratch" or params["teach_t0"]
    summary = (f"A GPT-2 trained from scratch on the T0 snapshot ({metrics['steps']} steps)." if source == "scratch"
               else f"`{shown}`" + (f", taught the T0 snapshot ({metrics['steps']} steps)." if trained else
                                   ", as loaded (not trained)."))
    return {
        "title": f"gradloc {stage}", "summary": summary, "base_model": base, "tags": [stage],
        "facts": {"base model": shown or "(none: from scratch)", "stage": stage, "period": 0, "seed": pre["seed"],
                  "training tokens": tokens if trained else 0, "steps": metrics["steps"],
                  "parameters": metrics["n_params"]},
        "command": command(),
        "gradloc": {"stage": stage, "method": None, "parts": None, "period": 0, "seed": pre["seed"],
                    "training_tokens": tokens if trained else 0, "origin": shown, "command": command()},
    }


# --- the `model-cards` stage ------------------------------------------------------------

