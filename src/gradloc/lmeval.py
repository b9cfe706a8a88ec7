"""Stage `gradloc lm-eval`: general-ability forgetting with lm-evaluation-harness.

`lm_eval.simple_evaluate` with `HFLM` wrapping the loaded checkpoint (no second load,
so a LoRA checkpoint is its merged weights as elsewhere) on the config's `lm_eval.tasks`.
Tasks are lm-eval's registry names (they download their datasets from the hub unless
cached) or tasks of a folder of task YAMLs: `include_path`, and always the shipped
`lmeval_tasks/` with `gradloc_cloze` (a 4-way multiple-choice cloze on facts of the
synthetic world that never change, a json file in the package: no network).

Writes lm-eval's own results JSON (`results.json`, samples left out) per checkpoint;
`general_table` turns several into the report's "general ability" table: per method
and task metric, the change from the base model with lm-eval's stderr.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path

import pandas as pd

from . import schema
from .io import InputError, as_list, atomic_output, read_json, write_json

log = logging.getLogger(__name__)

DEFAULTS = {"include_path": None, "limit": None, "num_fewshot": None, "batch_size": 8, "seed": 0}


def tasks_dir() -> Path:
    return Path(str(resources.files("gradloc").joinpath("lmeval_tasks")))


def settings(params: dict | None) -> dict:
    if not params:
        raise InputError("lm_eval params: give at least {tasks: [...]} (the config's lm_eval section)")
    return {**DEFAULTS, **schema.fill("lm_eval", params, where="lm_eval")}


def local_tasks(paths: list[Path]) -> set[str]:
    """Task names defined by the YAMLs under `paths`."""
    import yaml

    names = set()
    for folder in paths:
        for f in Path(folder).rglob("*.yaml"):
            try:
                doc = yaml.load(f.read_text(), Loader=_Loader)
            except yaml.YAMLError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("task"), str):
                names.add(doc["task"])
    return names


class _Loader:  # a SafeLoader that accepts lm-eval's `!function` tags
    def __new__(cls, stream):
        import yaml

        loader = yaml.SafeLoader(stream)
        loader.add_constructor("!function", lambda l, node: l.construct_scalar(node))
        return loader


def evaluate(model, tokenizer, cfg: dict) -> dict:
    """lm-eval's results dict for one loaded model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    paths = [tasks_dir()] + ([Path(cfg["include_path"])] if cfg["include_path"] else [])
    # The registry's own task index is only built when a task is not one of ours (it scans
    # thousands of YAMLs).
    defaults = bool(set(cfg["tasks"]) - local_tasks(paths))
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=defaults)
    missing = [t for t in cfg["tasks"] if t not in manager.all_tasks]
    if missing:
        raise InputError(f"lm_eval.tasks: unknown task(s) {missing} (not in lm-eval's registry nor in "
                         f"{', '.join(map(str, paths))})")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg["batch_size"],
              max_length=getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None))
    seed = cfg["seed"]
    out = simple_evaluate(model=lm, tasks=list(cfg["tasks"]), num_fewshot=cfg["num_fewshot"], limit=cfg["limit"],
                          task_manager=manager, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    return out


def run(params: dict, model, out, method=None, seed=None, period=None) -> None:
    """One results.json (+ identity in summary.json) per checkpoint folder of `model`."""
    import torch
    from lm_eval.utils import handle_non_serializable

    from .methods import load_checkpoint
    from .models import device

    cfg = settings(params)
    models, outs = as_list(model), as_list(out)
    if len(models) != len(outs):
        raise InputError(f"lm-eval: {len(models)} --model folder(s) but {len(outs)} --out folder(s)")
    for m, o in zip(models, outs):
        metrics_path = Path(m) / "metrics.json"
        info = read_json(metrics_path) if metrics_path.exists() else {}
        ident = {"method": method or info.get("method", "base"), "seed": info.get("seed") if seed is None else seed,
                 "period": info.get("period", 0) if period is None else int(period)}
        lm, tokenizer = load_checkpoint(m, dtype=torch.float32)
        if not hasattr(lm, "config"):
            raise InputError(f"{m}: a K-Adapter checkpoint is not a transformers model; lm-eval's HFLM cannot run it")
        lm.to(device()).eval()
        results = evaluate(lm, tokenizer, cfg)
        results.pop("samples", None)
        with atomic_output(o) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
            write_json({**ident, "tasks": list(cfg["tasks"]), "limit": cfg["limit"]}, tmp / "summary.json")
        log.info("lm-eval %s seed %s P%s: %s", ident["method"], ident["seed"], ident["period"],
                 {t: {k: v for k, v in r.items() if isinstance(v, float)} for t, r in results["results"].items()})


# --- the report's table ------------------------------------------------------------------

def scores(folder) -> pd.DataFrame:
    """task, metric, value, stderr of one lm-eval folder (lm-eval's results JSON)."""
    ident = read_json(Path(folder) / "summary.json")
    res = read_json(Path(folder) / "results.json")["results"]
    rows = []
    for task, values in res.items():
        for key, value in values.items():
            if "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool) or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            err = values.get(f"{metric}_stderr,{filt}")
            rows.append({**{k: ident.get(k) for k in ("method", "seed", "period")}, "task": task, "metric": metric,
                         "value": float(value), "stderr": float(err) if isinstance(err, (int, float)) else math.nan})
    return pd.DataFrame(rows)


def general_table(folders: list) -> pd.DataFrame:
    """Per method (config order of `folders`) and task metric: the method's mean over seeds,
    the base model's value, delta = method - base, and lm-eval's stderr (the method's, as a
    root-mean-square over seeds; the base model's beside it)."""
    df = pd.concat([scores(f) for f in folders], ignore_index=True)
    base = df[df["method"] == "base"].set_index(["task", "metric"])
    if base.empty:
        raise InputError("general ability: no lm-eval folder of the base model (method base) among the inputs")
    rows = []
    for method in dict.fromkeys(df["method"]):
        if method == "base":
            continue
        sub = df[df["method"] == method]
        for (task, metric), g in sub.groupby(["task", "metric"], sort=False):
            if (task, metric) not in base.index:
                continue
            b = base.loc[(task, metric)]
            value = g["value"].mean()
            rows.append({"method": method, "period": int(g["period"].max()), "n_seeds": len(g), "task": task,
                         "metric": metric, "value": value, "base": float(b["value"]), "delta": value - float(b["value"]),
                         "stderr": float((g["stderr"] ** 2).mean() ** 0.5), "base_stderr": float(b["stderr"])})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    lines = ["## General ability (lm-evaluation-harness)", "",
             "Change from the base model after the last period (method - base; mean over seeds), "
             "± lm-eval's stderr of the method's score.", "",
             "| method | task | metric | base | method | delta | n seeds |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.task} | {r.metric} | {r.base:.4f} ± {r.base_stderr:.4f} | "
                     f"{r.value:.4f} ± {r.stderr:.4f} | {r.delta:+.4f} | {r.n_seeds} |")
    return "\n".join(lines) + "\n"


def report(params: dict, evals, out) -> None:
    """Stage `gradloc general-ability`: general_ability.csv and .md in `out`."""
    if params:
        raise InputError(f"general-ability takes no --params; unknown key(s) {sorted(params)}")
    table = general_table(as_list(evals))
    Path(out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(out) / "general_ability.csv", index=False)
    (Path(out) / "general_ability.md").write_text(markdown(table))
    log.info("general ability: %d rows -> %s", len(table), out)


# --- the shipped task's data ---------------------------------------------------------------

def make_cloze(probes_parquet, out_json, n: int = 100, seed: int = 0) -> int:
    """The shipped `gradloc_cloze` data: facts of the synthetic world that no period changes
    (the same statement in the `unchanged` set of every period), each with three other
    objects of its relation as wrong choices. Returns the number of items."""
    import numpy as np

    df = pd.read_parquet(probes_parquet)
    per = df[df["set"] == "unchanged"].groupby("statement")["period"].nunique()
    stable = df[(df["set"] == "unchanged") & df["statement"].isin(per[per == df["period"].nunique()].index)]
    stable = stable.drop_duplicates("statement").sort_values("probe_id")
    rng = np.random.default_rng(seed)
    items = []
    for r in stable.itertuples():
        others = sorted(set(df.loc[df["relation"] == r.relation, "object"]) - {r.object})
        if len(others) < 3:
            continue
        choices = [r.object, *rng.choice(others, 3, replace=False).tolist()]
        order = rng.permutation(4)
        items.append({"prefix": r.prefix, "choices": [choices[i] for i in order],
                      "label": int(np.where(order == 0)[0][0]), "relation": r.relation})
    items = [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]
    Path(out_json).write_text("".join(json.dumps(x) + "\n" for x in items))
    return len(items)
