"""The registry of method parts.

A continual-pretraining method (config `train.methods.<name>`) is a combination of
parts; a part is switched on by its key in the method entry. Each part declares, in its
own file, one `Part`: its key and schema, the upstream outputs it reads, and its hooks
into the training stage. The workflow (`gradloc.workflow`), the `gradloc train` command
line and the training stage loop over the registry and name no part.

A new part is one file that calls `register(Part(...))`. The workflow finds it through
the config's `parts:` list (paths of such files) or, for an installed package, the
`gradloc.parts` entry point group (`[project.entry-points."gradloc.parts"]`, each entry
a module that registers its parts when imported). See the README, "Adding a method".

Hooks (all optional; `entry` is the part's own config, the method entry's value under
`key`; `job` is the training stage's `gradloc.train.Job` state of the one training run:
its `cfg`, `tokenizer`, `toks`, `rows`, `period`, `seed`, `inputs` (the paths in
`INPUTS`), `docs`, `types`, `marked`, `base_docs`, `extra` (metrics.json), `files`
(extra output files) and `state` (what a part's hooks share, never written)):
- `documents(entry, job)`: change the period's training documents (job.docs, with
  job.types and job.marked kept one per document); runs in registry order;
- `weights(entry, job, docs)`: per-token loss weights, one array per document;
- `mix(entry, job)`: (n, draw): n more blocks per epoch, `draw(rng)` gives them;
- `prepare(entry, prepared, job)`: after the trainable parameters are chosen
  (`gradloc.methods.Prepared`);
- `optimizer(entry, groups, lr)`: the optimizer over the param groups (default AdamW);
- `loss(entry, model, batch, job)`: an extra loss term added to the LM loss;
- `after_step(entry, model, job)`: after each optimizer step.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from .io import InputError

# The upstream outputs a part can read: `gradloc train --<name>` and the workflow's path
# of it (under `results`; {period} is the trained period), in the command's order.
INPUTS = {
    "selection": ("select/selection.json", "selection JSON file (layers: tgl_*)"),
    "attention": ("attention/P{period}", "attention folder of this period (augment methods)"),
    "subnet": ("subnet", "subnet folder (layers: subnet, mask: subnet)"),
    "tagged": ("tagged", "tagged folder (token_weighting, permute_objects: entity mentions and texts)"),
    "corpus": ("corpus", "corpus folder (its triples: token_weighting's fact objects, permute_objects' facts; "
               "its documents: replay source current)"),
    "weighting_model": ("weighting_model", "weighting model folder (token_weighting camels)"),
}


def _nothing(entry, method):
    return ()


@dataclass(frozen=True)
class Part:
    key: str                                  # the method entry's key that switches the part on
    schema: dict | None = None                # its JSON schema; None: the shipped schema has it
    needs: Callable = _nothing                # (entry, method) -> names in INPUTS
    check: Callable | None = None             # (entry, method): raise InputError on a bad combination
    documents: Callable | None = None
    weights: Callable | None = None
    mix: Callable | None = None
    prepare: Callable | None = None
    optimizer: Callable | None = None
    loss: Callable | None = None
    after_step: Callable | None = None


_PARTS: dict[str, Part] = {}
# The built-in parts (key: module), in hook order: permute_objects changes the text that
# token_weighting marks and augment copies.
BUILTIN = {"layers": "layers", "mask": "masking", "lora": "lora", "k_adapter": "kadapter", "recadam": "recadam",
           "replay": "replay", "permute_objects": "permute", "token_weighting": "weighting", "augment": "augment"}
_loaded: set[str] = set()


def register(part: Part) -> Part:
    """Add `part` and its schema to the method schema; returns it (`PART = register(...)`)."""
    from . import schema

    if part.key in _PARTS and _PARTS[part.key] != part:
        raise InputError(f"method part {part.key!r} is registered twice")
    props = schema.schema()["$defs"]["method"]["properties"]
    if part.schema is not None:
        props[part.key] = part.schema
    elif part.key not in props:
        raise InputError(f"method part {part.key!r}: no schema given and none shipped")
    _PARTS[part.key] = part
    return part


def registered() -> list[Part]:
    """Every registered part: the built-in ones in hook order, then those of the
    `gradloc.parts` entry points and of `load()`, in registration order."""
    if "builtin" not in _loaded:
        _loaded.add("builtin")
        for module in BUILTIN.values():
            importlib.import_module(f"gradloc.methods.{module}")
        for ep in entry_points(group="gradloc.parts"):
            ep.load()
    order = list(BUILTIN)
    return sorted(_PARTS.values(), key=lambda p: order.index(p.key) if p.key in order else len(order))


def load(files) -> None:
    """Import each part file (a path, as the config's `parts:` lists them); its
    `register` calls add its parts."""
    registered()
    for f in files or []:
        path = Path(f)
        if str(path.resolve()) in _loaded:
            continue
        if not path.is_file():
            raise InputError(f"parts: {f}: no such file")
        name = f"gradloc_part_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _loaded.add(str(path.resolve()))


def active(method: dict) -> list[tuple[Part, object]]:
    """(part, entry) of each part the method switches on, in registry order."""
    return [(p, method[p.key]) for p in registered() if p.key in method]


def needs(method: dict) -> list[str]:
    """The names in INPUTS that `method` reads, in INPUTS order."""
    wanted = {n for p, entry in active(method) for n in p.needs(entry, method)}
    unknown = wanted - set(INPUTS)
    if unknown:
        raise InputError(f"method parts need unknown input(s) {sorted(unknown)}; known: {list(INPUTS)}")
    return [n for n in INPUTS if n in wanted]


def check(method: dict) -> None:
    for p, entry in active(method):
        if p.check is not None:
            p.check(entry, method)


def hooks(method: dict, name: str) -> list[tuple[Callable, object]]:
    """(hook, entry) for each active part that has hook `name`."""
    return [(getattr(p, name), entry) for p, entry in active(method) if getattr(p, name) is not None]
