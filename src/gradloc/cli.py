"""Command line: one subcommand per pipeline stage.

Every Snakemake rule calls one of these, and prints the exact command in its log so a
person can rerun the stage by hand. `--params` takes the rule's slice of the config as
JSON (or @file.json / @file.yaml).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import shlex
import sys
from pathlib import Path

import yaml

from .io import InputError, NonFiniteError
from .parts import INPUTS

# stage -> (module, [(argument, help)]); each module exposes run(params, **arguments).
# One declaration per argument: a name ends in `?` (optional), `+` (one or more, paired in
# order: several checkpoints evaluated or seeds trained in one process) or `*` (a list,
# maybe empty), and `:int` makes it an integer. `gradloc train` also takes every upstream
# output a method part can read (gradloc.parts.INPUTS).
STAGES = {
    "download": ("gradloc.data.download", [("out", "output folder (corpus)")]),
    "prefetch": ("gradloc.prefetch", [("out", "record of what was fetched (JSON file)")]),
    "split": ("gradloc.split", [("corpus", "corpus folder"), ("out", "output folder")]),
    "tag": ("gradloc.tagging", [("corpus", "corpus folder"), ("split", "split folder"), ("out", "output folder")]),
    "probes": ("gradloc.probes", [("corpus", "corpus folder"), ("tagged", "tagged folder"), ("out", "output folder")]),
    "base-model": ("gradloc.basemodel", [("corpus", "corpus folder"), ("split", "split folder"),
                                         ("probes", "probes folder"),
                                         ("state?", "folder for resumable training state"),
                                         ("tokenizer?", "model folder whose tokenizer a scratch model uses "
                                                        "(default: train one on T0)"),
                                         ("out", "output folder")]),
    "tokens": ("gradloc.tokens", [("model", "base model folder (its tokenizer)"), ("tagged", "tagged folder"),
                                  ("out", "output folder")]),
    "profile": ("gradloc.profile", [("model", "base model folder"), ("tokens", "tokens folder"),
                                    ("probes", "probes folder"), ("out", "output folder"),
                                    ("tagged?", "tagged folder (mentions, for the salient-span loss; the "
                                                "sequences' documents)"),
                                    ("corpus?", "corpus folder (titles: the sequences' entities; triples: the "
                                                "updated objects, with salient: object)")]),
    "attention": ("gradloc.attention", [("large", "the larger model (the base model)"),
                                        ("small", "the smaller model, same tokenizer"), ("tokens", "tokens folder"),
                                        ("tagged", "tagged folder (entity mentions, for the marks)"),
                                        ("corpus", "corpus folder (its triples' objects, for the marks)"),
                                        ("probes?", "no longer read: refused, use --corpus"),
                                        ("period:int", "update period index"), ("out", "output folder")]),
    "subnet": ("gradloc.subnet", [("model", "base model folder"),
                                  ("corpus?", "corpus folder (its triples: the facts, with subnet.facts: corpus)"),
                                  ("probes", "probes folder (subjects to leave out; the facts with subnet.facts: "
                                             "probes)"),
                                  ("tokens", "tokens folder"), ("out", "output folder")]),
    "select": ("gradloc.select", [("profile", "profile folder"), ("out", "selection JSON file")]),
    "train": ("gradloc.train", [("init+", "checkpoint(s) to start from (base model or previous period): one "
                                          "for all seeds or one per seed"),
                                ("tokens", "tokens folder"),
                                ("period:int", "update period index (1..n)"),
                                ("seed+:int", "random seed(s): several train one after another"),
                                ("state+?", "folder(s) for resumable training state, one per seed"),
                                ("gpus?:int", "GPUs the job asked for (0: any device); fail if fewer are visible"),
                                ("probes?", "no longer read: refused, use --corpus"),
                                *((f"{name}?", help_) for name, (_, help_) in INPUTS.items()),
                                ("out+", "output folder(s), one per seed")]),
    "metatrain": ("gradloc.metatrain", [("base", "base model folder"),
                                        ("backbone", "small model with the base model's tokenizer"),
                                        ("tokens", "tokens folder"), ("tagged", "tagged folder"),
                                        ("probes", "probes folder"), ("out", "output folder")]),
    "evaluate": ("gradloc.evaluate", [("model+", "checkpoint folder(s)"), ("probes", "probes folder"),
                                      ("tokens", "tokens folder"),
                                      ("period?:int", "update period index (default: each checkpoint's "
                                                      "metrics.json; needed for the base model)"),
                                      ("out+", "output folder(s), one per --model"),
                                      ("method?", "method name written into summary.json (default: the "
                                                  "checkpoint's metrics.json, else base)"),
                                      ("seed?:int", "training seed written into summary.json (default: the "
                                                    "checkpoint's metrics.json, else none)")]),
    "report": ("gradloc.report", [("evals*", "evaluation folders (list)"), ("trains*", "training folders (list)"),
                                  ("profile", "profile folder"), ("base_model", "base model folder"),
                                  ("out", "output folder"),
                                  ("subnet?", "subnet folder (knowledge-critical subnetworks; optional)"),
                                  ("weighting?", "weighting model folder (CaMeLS meta-training; optional)"),
                                  ("selection?", "selection JSON file (the TGL-ALR multipliers; optional)")]),
    "lm-eval": ("gradloc.lmeval", [("model+", "checkpoint folder(s)"), ("out+", "output folder(s), one per --model"),
                                   ("method?", "method name written into summary.json (default: metrics.json, "
                                               "else base)")]),
    "general-ability": ("gradloc.lmeval:report", [("evals*", "lm-eval folders (list)"), ("out", "output folder")]),
    "tracked-curves": ("gradloc.report.tracked", [("tracking", "tracking folder (TensorBoard runs)"),
                                                  ("out", "output folder"),
                                                  ("trains*", "training folders (list): the legend's method order")]),
    "model-cards": ("gradloc.modelcards", [("trains*", "training folders (list)"),
                                          ("evals*", "evaluation folders (list)"), ("out", "output folder")]),
}


def spec(text: str) -> tuple[str, dict]:
    """(name, argparse keywords) of one declaration (see STAGES)."""
    name, _, kind = text.partition(":")
    kw = {"type": int} if kind == "int" else {}
    if name.endswith("?"):
        name, kw["required"] = name[:-1], False
    else:
        kw["required"] = True
    if name.endswith("*"):
        name, kw = name[:-1], {**kw, "nargs": "*", "default": []}
        del kw["required"]
    elif name.endswith("+"):
        name, kw["nargs"] = name[:-1], "+"
    return name, kw


def parse_params(text: str) -> dict:
    if text.startswith("@"):
        path = Path(text[1:])
        loader = yaml.safe_load if path.suffix in (".yaml", ".yml") else json.loads
        return loader(path.read_text()) or {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--params: invalid JSON ({e.msg} at column {e.colno})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradloc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, (_, args) in STAGES.items():
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--params", default="{}", help="config slice as JSON, or @file.json/@file.yaml")
        for text, help_ in args:
            name, kw = spec(text)
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=help_, **kw)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # The exact command, so the rule's log tells a person how to rerun this stage by hand.
    print("command: " + shlex.join(["gradloc", *argv]), file=sys.stderr, flush=True)
    module_name, arg_spec = STAGES[args.stage]
    kwargs = {name: getattr(args, name) for name in (spec(text)[0] for text, _ in arg_spec)}
    try:
        params = parse_params(args.params)
        module_name, _, function = module_name.partition(":")  # module:function, else module.run
        getattr(importlib.import_module(module_name), function or "run")(params, **kwargs)
    except InputError as e:
        print(f"gradloc {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"gradloc {args.stage}: error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        if not disk_full(e):
            raise
        # atomic_output has removed the partial output on the way out
        out = kwargs.get("out")
        out = " ".join(map(str, out)) if isinstance(out, list) else out
        print(f"gradloc {args.stage}: error: no space left on device while writing {out}; "
              "nothing was written, free space and rerun", file=sys.stderr)
        return 4
    return 0


def disk_full(e: BaseException | None) -> bool:
    """Whether `e` (or an exception it was raised from) is a full disk: an OSError with
    ENOSPC, or a library's own error that says so (safetensors: `StorageFull`)."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
                s in str(e) for s in ("No space left on device", "StorageFull")):
            return True
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
