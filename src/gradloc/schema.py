"""The config schema, shipped inside the package: the only place defaults live.

`fill(section, params)` validates a stage's slice of the config against its part of the
schema and returns it with every default filled in, so a stage run by hand (`gradloc
<stage> --params ...`) and a Snakemake run behave the same. Errors name the key.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources

import yaml

from .io import InputError


@functools.cache
def schema() -> dict:
    return yaml.safe_load(resources.files("gradloc").joinpath("config.schema.yaml").read_text())


@functools.cache
def _validator_class(ref_defaults: bool = True):
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema_):
        # Fill a missing key's default before validating, so nested defaults fill too.
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if ref_defaults and isinstance(sub, dict) and "default" not in sub and \
                        str(sub.get("$ref", "")).startswith("#/$defs/"):
                    sub = schema()["$defs"].get(sub["$ref"].rsplit("/", 1)[1], {})  # {$ref: path_or_null}
                if key not in instance and isinstance(sub, dict) and "default" in sub:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(base, {"properties": properties_with_defaults})


def section(name: str | None) -> dict:
    """The sub-schema of a dotted config key ("train", "data.synthetic"), of a named
    definition ("$defs.method") or, for None, the whole config; references resolve
    against the whole schema."""
    node = schema()
    if name is None:
        pass
    elif name.startswith("$defs."):
        node = node["$defs"][name.split(".", 1)[1]]
    else:
        for key in name.split("."):
            node = node["properties"][key]
    return {**node, "$defs": schema()["$defs"]}


def fill(name: str, params: dict | None, where: str | None = None, ignore_required: bool = False) -> dict:
    """`params` validated against section `name`, defaults filled in (a new dict).
    One InputError lists every problem, each naming its key (`where.key.sub`)."""
    instance = copy.deepcopy(params) if params is not None else {}
    lines = errors(name, instance, where=where, ignore_required=ignore_required)
    if lines:
        raise InputError("invalid parameters:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0])
    return instance


def errors(name: str | None, instance: dict, where: str | None = None, ignore_required: bool = False,
           ref_defaults: bool = True) -> list[str]:
    """Validate `instance` against section `name`, filling its defaults in place; one
    line per problem, `key.sub: message`. `ref_defaults=False` leaves keys whose only
    default is that of a referenced definition unset (the workflow's config, as before)."""
    sub = section(name)
    if ignore_required:
        sub.pop("required", None)
    validator = _validator_class(ref_defaults)(sub)
    found = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    prefix = [where or name] if (where or name) else []
    return [f"{'.'.join([*prefix, *map(str, e.path)]) or '(top level)'}: {_message(e)}" for e in found]


def _message(error) -> str:
    """jsonschema's message, except that a typo'd key says which keys exist."""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in known)
        if known and unknown:
            return f"unknown key(s) {unknown}; expected one of {known}"
    return error.message
