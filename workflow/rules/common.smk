import json
import os
import sys

from snakemake.utils import validate


def check_config(config, schema_path):
    """Fail before any job runs, one line per problem, each naming its config key."""
    import jsonschema
    import yaml

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.path)) or '(top level)'}: {e.message}" for e in errors]
        raise ValueError("invalid configuration:\n" + "\n".join(lines))


SCHEMA = os.path.join(workflow.basedir, "src", "gradloc", "config.schema.yaml")
check_config(config, SCHEMA)
validate(config, schema=SCHEMA, set_default=True)

# Settings that need data the config does not ask for (TemporalWiki's base snapshot for
# T0 text) fail here, before any job, naming the setting and the fix.
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from gradloc.data.temporalwiki import check_base

check_base(config)

R = config["results"]

# Tracking (gradloc.tracking) reaches every job in the environment, not in a rule's params
# or command: switching the tracker reruns nothing, and it changes no number.
from gradloc.tracking import settings as _tracking

TRACKING = _tracking(config.get("tracking") or {})
TRACKING["dir"] = TRACKING["dir"] or f"{R}/tracking"
os.environ.update(GRADLOC_TRACKING=json.dumps(TRACKING))

METHODS = list(config["train"]["methods"])
SEEDS = [int(s) for s in config["train"]["seeds"]]


def periods(wildcards=None):
    """Update periods 1..n. Known from the config for synthetic and TemporalWiki data;
    for local and ECBD data they are read from the split's manifest (a checkpoint)."""
    d = config["data"]
    if d["source"] == "synthetic":
        return list(range(1, d["synthetic"]["n_snapshots"]))
    if d["source"] == "temporalwiki":
        return list(range(1, len(d["temporalwiki"]["periods"]) + 1))
    manifest = os.path.join(checkpoints.split.get().output[0], "manifest.json")
    with open(manifest) as f:
        return [p["index"] for p in json.load(f)["periods"]]


def cfg(*keys):
    """The config slice a rule depends on, as compact JSON for `--params`."""
    node = config
    for k in keys:
        node = node[k]
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def train_params(method):
    """Train-wide settings plus one method's entry: editing a method reruns only it."""
    common = {k: v for k, v in config["train"].items() if k not in ("methods", "seeds", "group_seeds")}
    return json.dumps({"name": method, "common": common, "method": config["train"]["methods"][method]},
                      sort_keys=True, separators=(",", ":"))


def launcher(gpus):
    gpus = int(gpus)
    if gpus <= 1:
        return "python -m gradloc"
    return f"accelerate launch --multi_gpu --num_processes {gpus} -m gradloc"


def data_params():
    """Only the active source's settings: a default added for another source must not
    rerun this one's whole pipeline."""
    d = config["data"]
    return json.dumps({"source": d["source"], d["source"]: d[d["source"]]}, sort_keys=True, separators=(",", ":"))


def needs_selection(method):
    return config["train"]["methods"][method].get("layers", "all") != "all"


def uses_subnet(method):
    """layers: subnet and mask: subnet read the subnet stage's masks of the trained period."""
    m = config["train"]["methods"][method]
    return m.get("layers") == "subnet" or m.get("mask") == "subnet"


def subnet_input(w):
    return [f"{R}/subnet"] if uses_subnet(w.method) else []


def check_subnet_periods():
    """Each trained period needs its own masks (outdated_P{k}); say so before any job."""
    users = [m for m in METHODS if uses_subnet(m)]
    if users and config["data"]["source"] in ("synthetic", "temporalwiki"):
        missing = sorted(set(periods()) - set(config["subnet"]["periods"]))
        if missing:
            raise ValueError(f"invalid configuration:\n  subnet.periods: methods {users} train where each period's "
                             f"subnetwork points; add period(s) {missing}")


def needs_attention(method):
    return "augment" in config["train"]["methods"][method]


def attention_input(w):
    return [f"{R}/attention/P{w.period}"] if needs_attention(w.method) else []


def weighting_kind(method):
    return (config["train"]["methods"][method].get("token_weighting") or {}).get("kind")


def uses_camels():
    return any(weighting_kind(m) == "camels" for m in METHODS)


def weighting_inputs(w):
    """Token-weighting methods read the tagged mentions and the corpus' triples (salient
    tokens and the weights' summary; never the evaluation probes); camels also the
    meta-trained weighting model. permute_objects (the negative control) reads the tagged
    texts and mentions and the corpus' triples."""
    method = config["train"]["methods"][w.method]
    out = {}
    if "token_weighting" in method:
        out = {"tagged": f"{R}/tagged", "corpus": f"{R}/corpus"}
    if weighting_kind(w.method) == "camels":
        out["weighting_model"] = f"{R}/weighting_model"
    if "permute_objects" in method:
        out.update(tagged=f"{R}/tagged", corpus=f"{R}/corpus")
    return out


def weighting_args(w, input):
    return " ".join(f"--{k.replace('_', '-')} {input[k]}" for k in ("tagged", "corpus", "weighting_model")
                    if k in input.keys())


def attention_params():
    """The scoring settings only: the small model's settings rerun it, and it reruns this."""
    a = config.get("attention", {})
    return json.dumps({k: v for k, v in a.items() if k != "small_model"}, sort_keys=True, separators=(",", ":"))


def small_model_params():
    """The base model's settings with `attention.small_model` on top (a smaller GPT-2 by default)."""
    m, s = config.get("model", {}), config.get("attention", {}).get("small_model", {})
    out = {**m, "source": s.get("source", "scratch"), "name_or_path": s.get("name_or_path"),
           "gguf_file": s.get("gguf_file"), "revision": None if s.get("source", "scratch") != "scratch" else m.get("revision"),
           "architecture": {**m.get("architecture", {}), **s.get("architecture", {})},
           "pretrain": {**m.get("pretrain", {}), "steps": s.get("steps", 600)}}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


# train.group_seeds: one train job per (method, period) trains every seed in turn;
# otherwise one job per (method, seed, period). Same outputs, same numbers.
GROUP_SEEDS = config["train"].get("group_seeds", False)


def train_pattern(folder):
    """A train job's per-seed paths under `folder` (train, logs/train, .train_state, ...):
    a pattern with the {seed} wildcard, or one path per seed when seeds are grouped."""
    if not GROUP_SEEDS:
        return [f"{R}/{folder}/{{method}}/seed{{seed}}/P{{period}}"]
    return [f"{R}/{folder}/{{method}}/seed{s}/P{{period}}" for s in SEEDS]


def train_job_path(folder, suffix):
    """One path per train job (its log, its benchmark)."""
    seed = "" if GROUP_SEEDS else "seed{seed}/"
    return f"{R}/{folder}/{{method}}/{seed}P{{period}}{suffix}"


def job_seeds(w):
    return SEEDS if GROUP_SEEDS else [int(w.seed)]


def train_dir(method, seed, period):
    return f"{R}/train/{method}/seed{seed}/P{period}"


def previous_checkpoint(w):
    p = int(w.period)
    if p == 1:
        return f"{R}/base_model"
    return [train_dir(w.method, s, p - 1) for s in job_seeds(w)]


def selection_input(w):
    return [rules.select.output[0]] if needs_selection(w.method) else []


def report_evals(w):
    ps = periods()
    return [f"{R}/eval/base/P{p}" for p in ps] + [
        f"{R}/eval/{m}/seed{s}/P{p}" for m in METHODS for s in SEEDS for p in ps
    ]


def method_checkpoints(w):
    """A method's training folders of one period, seed by seed (the order of the evaluate
    rule's outputs)."""
    return [train_dir(w.method, s, w.period) for s in SEEDS]


def report_trains(w):
    return [train_dir(m, s, p) for m in METHODS for s in SEEDS for p in periods()]


check_subnet_periods()


def data_targets():
    return [f"{R}/corpus", f"{R}/split", f"{R}/tagged", f"{R}/probes"]


def all_targets():
    return data_targets() + [f"{R}/report/table.md"]


wildcard_constraints:
    method="[a-z0-9_+]+",
    seed=r"\d+",
    period=r"\d+",


# Jobs run the library from this checkout's src/ whether or not it is pip-installed, so
# the same rules work in a conda env built from envs/*.yaml on a cluster node.
_src = os.path.join(workflow.basedir, "src")
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [_src, os.environ.get("PYTHONPATH", "")])))


# --- around the runs (issue 23; rules in extras.smk) -------------------------------------

LM_EVAL = config.get("lm_eval")


def final_checkpoints(w):
    """A method's checkpoints after the last period, seed by seed (lm_eval's inputs)."""
    return [train_dir(w.method, s, max(periods())) for s in SEEDS]


def tracked_inputs(w):
    """Every training stage's output: its tracker runs are complete once these exist."""
    out = [f"{R}/base_model", f"{R}/subnet"]
    if uses_camels():
        out.append(f"{R}/weighting_model")
    if uses_camels() or any(needs_attention(m) for m in METHODS):
        out.append(f"{R}/small_model")
    return out


def extra_targets():
    out = [f"{R}/model_cards"]
    if TRACKING["backend"] == "tensorboard":
        out.append(f"{R}/extras/tracked_train.png")
    if LM_EVAL:
        out.append(f"{R}/extras/general_ability.md")
    return out


# Offline compute nodes (the prefetch step of prefetch.smk) - the cache and the offline mode of the jobs,
# only when the config fetches something from the hub.
from gradloc.prefetch import needs_prefetch

PREFETCH_MODELS = [config["model"], {**config["model"], **config["attention"]["small_model"]}]
PREFETCH = needs_prefetch(config["data"], PREFETCH_MODELS)
if PREFETCH:
    os.environ.update(HF_HUB_CACHE=os.getenv("GRADLOC_CACHE") or os.path.abspath(f"{R}/hf_cache"),
                      HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def prefetch_input(wildcards):
    return [f"{R}/prefetch.json"] if PREFETCH else []
