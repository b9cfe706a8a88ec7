# Glue only: what the rules compute lives in gradloc.workflow (plain Python, tested in
# tests/test_workflow.py); the rules read paths, params, inputs and targets from `P`.
import json
import os
import sys

# Jobs run the library from this checkout's src/ whether or not it is pip-installed, so
# the same rules work in a conda env built from envs/*.yaml on a cluster node.
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from gradloc import workflow as gw
from gradloc.io import InputError

# The one config check (schema, defaults filled in, settings that need data the config
# does not ask for): it fails before any job, one line per problem, naming the key.
try:
    gw.check(config)
except InputError as e:
    raise ValueError(str(e)) from None

R = config["results"]
# The split's manifest gives the periods of local and ECBD data (a checkpoint).
P = gw.Plan(config, manifest=lambda: os.path.join(checkpoints.split.get().output[0], "manifest.json"))
METHODS, SEEDS = P.methods, P.seeds
LM_EVAL = config.get("lm_eval")

# PYTHONPATH, the tracker settings (switching trackers reruns nothing) and, when the config
# fetches from the hub, the offline cache: every job's environment, not a rule's params.
ENV = gw.environment(config, os.path.join(workflow.basedir, "src"))
os.environ.update(ENV)
TRACKING = json.loads(ENV["GRADLOC_TRACKING"])
PREFETCH_MODELS, PREFETCH = gw.prefetch_models(config), gw.fetches(config)


def cfg(*keys):
    return P.slice(*keys)


def prefetch_input(wildcards):
    return [f"{R}/prefetch.json"] if PREFETCH else []


wildcard_constraints:
    method="[a-z0-9_+]+",
    seed=r"\d+",
    period=r"\d+",
