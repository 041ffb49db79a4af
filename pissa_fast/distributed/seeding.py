"""Per-weight seeds derived from (seed, weight name), the same in every process and every Python run.

A weight's random test matrix must not depend on which rank decomposes it, on how many ranks there
are, or on which other weights share its batch: then 1 process and N processes give bitwise-identical
factors. Python's hash() is salted per process (PYTHONHASHSEED), so the derivation is a keyed BLAKE2b
digest instead.
"""
from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping

_DOMAIN = b"pissa_fast.weight_seed.v1"  # changing the derivation must change this tag


def weight_seed(seed: int, name: str) -> int:
    """The seed of the test matrix of weight `name` under the run's `seed`: a 63-bit int (fits
    torch.Generator.manual_seed and int64 everywhere), stable across processes, runs and platforms."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    h = hashlib.blake2b(digest_size=8, person=b"pissa_fast")
    h.update(_DOMAIN)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(name.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def key_name(key) -> str:
    """The name a decompose_many key stands for: the key itself when it is a str (a parameter name),
    else its repr (ints, tuples)."""
    return key if isinstance(key, str) else repr(key)


def weight_seeds(seed: int, keys) -> dict:
    """{key: weight_seed(seed, name of key)} for decompose_many's mapping form of `seed` (keys: a dict
    of weights or its keys), so each weight's test matrix depends on its name alone, the same in one
    process and sharded over any number of ranks: decompose_many(ws, r, seed=weight_seeds(0, ws))."""
    return {k: weight_seed(seed, key_name(k)) for k in keys}


def seed_for(seed, key) -> int:
    """Seed of one weight of a decompose_many call, exactly as pissa_fast.core draws it for unsharded
    weights: seed[key] when seed is a mapping of per-weight seeds, else `seed` itself (every weight's
    test matrix from a generator of its own seeded with it). So a dict or list gives the same factors
    sharded or not; per-name seeds are the mapping, e.g. weight_seeds(seed, weights)."""
    if isinstance(seed, Mapping):
        return int(seed[key])
    return int(seed)
