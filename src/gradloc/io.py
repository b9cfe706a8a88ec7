"""Small I/O helpers shared by every stage: atomic outputs and readers whose errors
name the file, line or column at fault."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


class InputError(ValueError):
    """Bad user input: the message names the file, key, line or column."""


class NonFiniteError(RuntimeError):
    """A stage computed a non-finite number (a diverged loss, a NaN score): the message
    names where, so it never ends up in an output."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, is_dir: bool = True):
    """Yield a temporary path beside `path`; move it into place only if the block ends
    without error, so a crash never leaves something that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    # mkdtemp makes 0700 folders; give the output the usual umask-based mode instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nonfinite_keys(obj, prefix: str = "") -> list[str]:
    """Dotted keys (list items as [i]) of the non-finite floats in a JSON-like object."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "(top level)"]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in nonfinite_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in nonfinite_keys(v, f"{prefix}[{i}]")]
    return []


def as_list(x) -> list:
    """A command-line argument that takes one or several values, as a list."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def write_json(obj, path: str | os.PathLike) -> None:
    """Strict JSON: a non-finite number is an error naming the file and key (write null
    for "nothing measured")."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False)
    except ValueError:
        keys = nonfinite_keys(obj)
        raise NonFiniteError(f"{path}: refusing to write non-finite number(s) at {', '.join(keys) or '?'}") from None
    Path(path).write_text(text + "\n")


def _refuse_constant(name: str):
    raise ValueError(name)


def read_json(path: str | os.PathLike):
    """JSON as the pipeline writes it: strict, so NaN or Infinity is an error naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except ValueError as e:
        raise InputError(f"{path}: non-finite number {e} (not valid JSON; the stage that wrote it diverged)") from None


def read_jsonl(path: str | os.PathLike) -> pd.DataFrame:
    """Read json lines; a malformed line raises InputError naming file and line."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return pd.DataFrame(rows)


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a jsonl, json, csv, tsv or parquet table and check required columns."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    try:
        if suffix in (".jsonl", ".jsonl.gz", ".ndjson") or (suffix == ".json" and _looks_like_jsonl(path)):
            df = read_jsonl(path) if not suffix.endswith(".gz") else pd.read_json(path, lines=True)
        elif suffix == ".json":
            df = pd.read_json(path)
        elif suffix in (".csv", ".csv.gz"):
            df = pd.read_csv(path, keep_default_na=False)
        elif suffix in (".tsv", ".tsv.gz"):
            df = pd.read_csv(path, sep="\t", keep_default_na=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise InputError(f"{path}: unknown table format {suffix!r} (use jsonl, csv, tsv or parquet)")
    except InputError:
        raise
    except Exception as e:  # parser errors of pandas/pyarrow: name the file
        raise InputError(f"{path}: cannot read as {suffix[1:]}: {e}") from e
    if columns:
        require_columns(df, columns, path)
    return df


def _looks_like_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return first.startswith("{") and first.endswith("}")


def require_columns(df: pd.DataFrame, columns: list[str], where) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")


def require_finite(df: pd.DataFrame, columns: list[str], where) -> None:
    """Refuse a table whose numeric `columns` hold NaN or infinity, naming the file, column
    and first row (0-based, as data rows)."""
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"{where}: column {c!r} row {i}: non-finite or non-numeric value {df[c].iloc[i]!r} "
                             f"({int(bad.sum())} row(s) in all); the stage that wrote it diverged or was cut")


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    df.reset_index(drop=True).to_parquet(path, index=False)
