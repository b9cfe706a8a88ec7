"""Trainable-parameter policies (`method.layers`): which units train, at which lr multiplier.

A policy maps (units bottom to top, selection, seed) to {trainable unit: lr multiplier};
units it leaves out are frozen. `all` is full fine-tuning (DIFF), `tgl_fp` / `tgl_alr`
read the selection, `random` / `first` / `last` are controls that train as many blocks
as TGL-FP selected; `subnet` trains as many, those with the highest density of the
knowledge-critical subnetwork (methods/masking.py; its densities come in `sel["density"]`);
`subset` is the layer null TGL-FP must beat: the `index`-th of `count` seeded distinct random
subsets of `size` blocks (default: as many as TGL-FP selected; every subset, in a fixed order,
when there are no more than `count`), the method's `subset` entry in `sel["subset"]`.
Another localisation is one more entry in `POLICIES`.
"""

from __future__ import annotations

import logging
from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np

from ..io import InputError, read_json
from ..models import is_block_unit
from ..parts import Part, register

log = logging.getLogger(__name__)

def read_selection(selection) -> dict:
    """The selection JSON (a path or an already-read dict), its required keys checked."""
    if selection is None:
        return {}
    sel = read_json(selection) if isinstance(selection, (str, Path)) else dict(selection)
    for key in ("granularity", "units", "lr_multipliers"):
        if key not in sel:
            raise InputError(f"{selection if isinstance(selection, (str, Path)) else 'selection'}: missing key {key!r}")
    sel["_source"] = str(selection) if isinstance(selection, (str, Path)) else "selection"
    return sel


def _all(units, sel, seed):
    return {u: 1.0 for u in units}


def _tgl_fp(units, sel, seed):
    return {u: 1.0 for u in units if u in set(sel["units"])}


def _tgl_alr(units, sel, seed):
    # Embeddings and head keep the base rate: every input shares them, so their norm
    # says nothing about where a fact lives.
    return {u: 1.0 if u in ("embed", "lm_head") else float(sel["lr_multipliers"].get(u, 1.0)) for u in units}


def _control(pick):
    """A control policy: as many block units as TGL-FP selected, chosen by `pick(blocks,
    k, seed, sel)`; TGL-FP's non-block units are kept, so only *which* blocks train differs."""
    def policy(units, sel, seed):
        blocks = [u for u in units if is_block_unit(u)]
        picked = set(pick(blocks, sum(is_block_unit(u) for u in sel["units"]), seed, sel))
        keep = {u for u in sel["units"] if not is_block_unit(u)}
        return {u: 1.0 for u in units if u in picked or u in keep}
    return policy


def _random_blocks(blocks, k, seed, sel):
    return [blocks[i] for i in np.random.default_rng(seed).choice(len(blocks), size=k, replace=False)]


def _densest_blocks(blocks, k, seed, sel):
    density = sel.get("density")
    if density is None:
        raise InputError("layers: subnet needs the subnet stage's masks (--subnet)")
    if not any(b in density for b in blocks):
        raise InputError(f"layers: subnet: the masks cover none of the units {blocks}")
    # units the masks do not cover (norms; blocks outside subnet.blocks) count as density 0;
    # the sort is stable, so ties go to the lower unit
    return sorted(blocks, key=lambda b: -density.get(b, 0.0))[:k]


def subsets(n_blocks: int, size: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """The layer null's subsets of block indices (each sorted): every one of the C(n, size),
    in lexicographic order, when C(n, size) <= count; else `count` distinct ones drawn with
    seed `seed` (the same list for the same arguments, whatever the caller)."""
    if not 1 <= size <= n_blocks:
        raise InputError(f"method.subset.size: {size} blocks, but the model has {n_blocks} (need 1..{n_blocks})")
    if comb(n_blocks, size) <= count:
        return list(combinations(range(n_blocks), size))
    rng, seen, out = np.random.default_rng(seed), set(), []
    while len(out) < count:
        s = tuple(sorted(int(i) for i in rng.choice(n_blocks, size=size, replace=False)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _subset_blocks(blocks, k, seed, sel):
    entry = sel.get("subset")
    if entry is None:
        raise InputError("layers: subset needs the method's subset entry ({index, count, seed, size})")
    size = entry.get("size") or k
    found = subsets(len(blocks), size, entry["count"], entry["seed"])
    index = entry["index"]
    if index >= len(found):
        # the workflow cannot always know C(L, k) before the selection: a repeat, which the report drops
        log.warning("layers: subset: index %d, but only %d distinct subsets of %d of %d blocks; training "
                    "subset %d again", index, len(found), size, len(blocks), index % len(found))
        index %= len(found)
    return [blocks[i] for i in found[index]]


POLICIES = {
    "all": _all,
    "tgl_fp": _tgl_fp,
    "tgl_alr": _tgl_alr,
    "random": _control(_random_blocks),
    "first": _control(lambda blocks, k, seed, sel: blocks[:k]),
    "last": _control(lambda blocks, k, seed, sel: blocks[len(blocks) - k:]),
    "subnet": _control(_densest_blocks),
    "subset": _control(_subset_blocks),
}


def unit_multipliers(policy: str, units: list[str], sel: dict, seed: int) -> dict[str, float]:
    """{trainable unit: lr multiplier} for a layer policy; units not listed are frozen."""
    if policy != "all":
        if not sel:
            raise InputError(f"method layers={policy} needs a selection file (--selection)")
        for u in list(sel["units"]) + list(sel["lr_multipliers"]):
            if u not in units:
                raise InputError(f"{sel['_source']}: unit {u!r} is not a unit of this model at granularity "
                                 f"{sel['granularity']!r} (units: {units})")
    mults = POLICIES[policy](units, sel, seed)
    if not mults:
        raise InputError(f"{sel.get('_source', 'selection')}: layers={policy} leaves no unit to train")
    return mults


def _needs(entry, method):
    """tgl_* read the selection; subnet also the subnet stage's densities (and the
    selection: it trains as many blocks as TGL-FP)."""
    return (["selection"] if entry != "all" else []) + (["subnet"] if entry == "subnet" else [])


def _check(entry, method):
    if entry not in POLICIES:
        raise InputError(f"method.layers: {entry!r} is not one of {list(POLICIES)}")
    if (entry == "subset") != ("subset" in method):
        raise InputError("method.subset: layers: subset needs a subset entry ({index, count, seed, size}) and "
                         "a subset entry needs layers: subset")


PART = register(Part("layers", needs=_needs, check=_check))
