"""What the Snakemake rules compute, in plain Python (no snakemake import; tested in
tests/test_workflow.py). `workflow/rules/common.smk` builds one `Plan` from the config
and the rules read their paths, inputs, params and targets from it.

- `check(config)`: the one config check: the method parts' files (`parts:`) are
  registered, the config is validated against the packaged schema with its defaults
  filled in (in place), and settings that need data or outputs the config does not ask
  for fail before any job, naming the key;
- `Plan`: the periods, each rule's config slice (`slice`, `train_params`, ...), each
  method's inputs (from the registry of method parts, `gradloc.parts`), the paths of
  training jobs, and the targets.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from . import parts, schema
from .io import InputError


def compact(node) -> str:
    """A config slice as compact JSON (a rule's `--params`)."""
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def check(config: dict) -> dict:
    """Validate `config` (defaults filled in, in place); one line per problem, each
    naming its key. Returns it."""
    from .data.temporalwiki import check_base

    parts.load(config.get("parts"))
    errors = schema.errors(None, config, ref_defaults=False)
    if errors:
        raise InputError("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))
    check_base(config)
    nulls = null_methods(config)
    clash = sorted(set(nulls) & set(config["train"]["methods"]))
    if clash:
        raise InputError(f"invalid configuration:\n  train.methods: {clash} are the names of train.null_layers' "
                         "methods; rename them")
    for name, method in {**config["train"]["methods"], **nulls}.items():
        try:
            parts.check(method)
        except InputError as e:
            raise InputError(f"invalid configuration:\n  train.methods.{name}: {e}") from None
    plan = Plan(config)
    users = [m for m in plan.methods if "subnet" in plan.needs(m)]
    if users and config["data"]["source"] in ("synthetic", "temporalwiki"):
        missing = sorted(set(plan.periods()) - set(config["subnet"]["periods"]))
        if missing:  # each trained period needs its own masks (outdated_P{k})
            raise InputError(f"invalid configuration:\n  subnet.periods: methods {users} train where each period's "
                             f"subnetwork points; add period(s) {missing}")
    return config


def null_methods(config: dict) -> dict[str, dict]:
    """`train.null_layers` as methods {null_i: {layers: subset, subset: ...}}, i < n:
    n = min(count, C(L, size)) when the config gives the number of blocks L (a scratch
    model's n_layer) and the size, else count (C(L, k) with k from the selection is known
    only after the select stage; the subset policy then repeats a subset, which the report
    drops). Absent, null or count 0: none."""
    from math import comb

    spec = config["train"].get("null_layers")
    if not spec:
        return {}
    spec = {"count": 20, "seed": 0, "size": None, **spec}
    if not isinstance(spec["count"], int) or spec["count"] < 0:
        raise InputError(f"train.null_layers.count: expected an integer >= 0, got {spec['count']!r}")
    n, model = spec["count"], config.get("model") or {}
    layers = (model.get("architecture") or {}).get("n_layer", 6) if model.get("source", "scratch") == "scratch" \
        else None
    if layers is not None and spec["size"] is not None:
        if spec["size"] > layers:
            raise InputError(f"train.null_layers.size: {spec['size']} blocks, but model.architecture.n_layer "
                             f"is {layers}")
        n = min(n, comb(layers, spec["size"]))
    return {f"null_{i}": {"layers": "subset", "subset": {"index": i, "count": spec["count"], "seed": spec["seed"],
                                                         "size": spec["size"]}} for i in range(n)}


class Plan:
    """The workflow of one (checked) config. `manifest`: a function giving the split's
    manifest.json path (Snakemake's checkpoint), for sources whose periods the data decide."""

    def __init__(self, config: dict, manifest: Callable[[], str] | None = None):
        self.config, self.manifest = config, manifest
        self.R = config["results"]
        # the layer null's methods (train.null_layers) come after the configured ones
        self.entries = {**config["train"]["methods"], **null_methods(config)}
        self.methods = list(self.entries)
        self.seeds = [int(s) for s in config["train"]["seeds"]]
        # train.group_seeds: one train job per (method, period) trains every seed in turn;
        # otherwise one job per (method, seed, period). Same outputs, same numbers.
        self.group_seeds = bool(config["train"].get("group_seeds", False))

    # --- periods and config slices --------------------------------------------------------

    def periods(self, wildcards=None) -> list[int]:
        """Update periods 1..n. Known from the config for synthetic and TemporalWiki data;
        for local and ECBD data they are read from the split's manifest."""
        d = self.config["data"]
        if d["source"] == "synthetic":
            return list(range(1, d["synthetic"]["n_snapshots"]))
        if d["source"] == "temporalwiki":
            return list(range(1, len(d["temporalwiki"]["periods"]) + 1))
        if self.manifest is None:
            raise InputError(f"data.source {d['source']}: the periods come from the split's manifest")
        with open(self.manifest()) as f:
            return [p["index"] for p in json.load(f)["periods"]]

    def slice(self, *keys) -> str:
        """The config slice a rule depends on, as compact JSON for `--params`."""
        node = self.config
        for k in keys:
            node = node[k]
        return compact(node)

    def data_params(self) -> str:
        """Only the active source's settings: a default added for another source must not
        rerun this one's whole pipeline."""
        d = self.config["data"]
        return compact({"source": d["source"], d["source"]: d[d["source"]]})

    def train_params(self, method: str) -> str:
        """Train-wide settings plus one method's entry: editing a method reruns only it."""
        t = self.config["train"]
        # null_layers only adds methods: the others' params (and so their jobs) stay as they were
        common = {k: v for k, v in t.items() if k not in ("methods", "seeds", "group_seeds", "null_layers")}
        out = {"name": method, "common": common, "method": self.entries[method]}
        if self.config.get("parts"):
            out["parts"] = self.config["parts"]
        return compact(out)

    def attention_params(self) -> str:
        """The scoring settings only: the small model's settings rerun it, and it reruns this."""
        return compact({k: v for k, v in self.config.get("attention", {}).items() if k != "small_model"})

    def small_model_params(self) -> str:
        """The base model's settings with `attention.small_model` on top (a smaller GPT-2 by default)."""
        m, s = self.config.get("model", {}), self.config.get("attention", {}).get("small_model", {})
        scratch = s.get("source", "scratch") == "scratch"
        return compact({**m, "source": s.get("source", "scratch"), "name_or_path": s.get("name_or_path"),
                        "gguf_file": s.get("gguf_file"), "revision": m.get("revision") if scratch else None,
                        "architecture": {**m.get("architecture", {}), **s.get("architecture", {})},
                        "pretrain": {**m.get("pretrain", {}), "steps": s.get("steps", 600)}})

    # --- methods and their inputs ---------------------------------------------------------

    def needs(self, method: str) -> list[str]:
        """The upstream outputs a method's parts read (names in `parts.INPUTS`)."""
        return parts.needs(self.entries[method])

    def uses(self, name: str) -> bool:
        """Whether some method reads upstream output `name` (e.g. weighting_model)."""
        return any(name in self.needs(m) for m in self.methods)

    def method_inputs(self, method: str, period) -> dict[str, str]:
        """{input name: path} of a method's train job, in the command's order."""
        paths = {name: f"{self.R}/{path}" for name, (path, _) in parts.INPUTS.items()}
        return {n: paths[n].format(period=period) for n in self.needs(method)}

    @staticmethod
    def input_args(inputs, names=None) -> str:
        """`--name path` for each of a train job's part inputs (of `names`, default all)."""
        names = list(parts.INPUTS) if names is None else names
        unknown = set(names) - set(parts.INPUTS)
        if unknown:
            raise InputError(f"train inputs: {sorted(unknown)} are not in gradloc.parts.INPUTS")
        return " ".join(f"--{k.replace('_', '-')} {inputs[k]}" for k in names if k in inputs.keys())

    @staticmethod
    def launcher(gpus) -> str:
        gpus = int(gpus)
        if gpus <= 1:
            return "python -m gradloc"
        return f"accelerate launch --multi_gpu --num_processes {gpus} -m gradloc"

    # --- training jobs ----------------------------------------------------------------------

    def train_pattern(self, folder: str) -> list[str]:
        """A train job's per-seed paths under `folder` (train, logs/train, .train_state, ...):
        a pattern with the {seed} wildcard, or one path per seed when seeds are grouped."""
        if not self.group_seeds:
            return [f"{self.R}/{folder}/{{method}}/seed{{seed}}/P{{period}}"]
        return [f"{self.R}/{folder}/{{method}}/seed{s}/P{{period}}" for s in self.seeds]

    def train_job_path(self, folder: str, suffix: str) -> str:
        """One path per train job (its log, its benchmark)."""
        seed = "" if self.group_seeds else "seed{seed}/"
        return f"{self.R}/{folder}/{{method}}/{seed}P{{period}}{suffix}"

    def job_seeds(self, w) -> list[int]:
        return self.seeds if self.group_seeds else [int(w.seed)]

    def train_dir(self, method: str, seed, period) -> str:
        return f"{self.R}/train/{method}/seed{seed}/P{period}"

    def previous_checkpoint(self, w):
        p = int(w.period)
        if p == 1:
            return f"{self.R}/base_model"
        return [self.train_dir(w.method, s, p - 1) for s in self.job_seeds(w)]

    def method_checkpoints(self, w) -> list[str]:
        """A method's training folders of one period, seed by seed (the evaluate rule's outputs' order)."""
        return [self.train_dir(w.method, s, w.period) for s in self.seeds]

    def final_checkpoints(self, w) -> list[str]:
        """A method's checkpoints after the last period, seed by seed (lm_eval's inputs)."""
        return [self.train_dir(w.method, s, max(self.periods())) for s in self.seeds]

    # --- targets ------------------------------------------------------------------------------

    def report_evals(self, w=None) -> list[str]:
        ps = self.periods()
        return [f"{self.R}/eval/base/P{p}" for p in ps] + [
            f"{self.R}/eval/{m}/seed{s}/P{p}" for m in self.methods for s in self.seeds for p in ps]

    def report_trains(self, w=None) -> list[str]:
        return [self.train_dir(m, s, p) for m in self.methods for s in self.seeds for p in self.periods()]

    def tracked_inputs(self, w=None) -> list[str]:
        """Every training stage's output: its tracker runs are complete once these exist."""
        out = [f"{self.R}/base_model", f"{self.R}/subnet"]
        if self.uses("weighting_model"):
            out.append(f"{self.R}/weighting_model")
        if self.uses("weighting_model") or self.uses("attention"):
            out.append(f"{self.R}/small_model")
        return out

    def data_targets(self) -> list[str]:
        return [f"{self.R}/corpus", f"{self.R}/split", f"{self.R}/tagged", f"{self.R}/probes"]

    def all_targets(self) -> list[str]:
        return self.data_targets() + [f"{self.R}/report/table.md"]

    def extra_targets(self, tracking_backend: str) -> list[str]:
        out = [f"{self.R}/model_cards"]
        if tracking_backend == "tensorboard":
            out.append(f"{self.R}/extras/tracked_train.png")
        if self.config.get("lm_eval"):
            out.append(f"{self.R}/extras/general_ability.md")
        return out


def environment(config: dict, src: str) -> dict[str, str]:
    """What every job gets in its environment: the library of this checkout (`src`) on
    PYTHONPATH, whether or not it is pip-installed; the tracker settings (gradloc.tracking:
    switching trackers reruns nothing); and, when the config fetches from the hub (the
    prefetch rule), the cache and the offline mode."""
    from .tracking import settings

    tracking = settings(config.get("tracking") or {})
    tracking["dir"] = tracking["dir"] or f"{config['results']}/tracking"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")])),
           "GRADLOC_TRACKING": json.dumps(tracking)}
    if fetches(config):
        env.update(HF_HUB_CACHE=os.getenv("GRADLOC_CACHE") or os.path.abspath(f"{config['results']}/hf_cache"),
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def fetches(config: dict) -> bool:
    """Whether the config fetches from the hub (then the prefetch rule runs first)."""
    from .hub import needs_prefetch

    return needs_prefetch(config["data"], prefetch_models(config))


def prefetch_models(config: dict) -> list[dict]:
    """The model settings the prefetch rule fetches: the base model and the small model."""
    return [config["model"], {**config["model"], **config["attention"]["small_model"]}]
