"""Trainable / frozen split of a param tree by path regexes, and fingerprints of frozen weights.

Paths are '/'-joined param names (``llm/layers_0/self_attn/q_proj/kernel``). A stage names what
trains; everything else is frozen: kept out of the optimizer, under ``stop_gradient`` in the loss,
never donated, and not written into training checkpoints (a fingerprint is stored instead).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from fo_jax.errors import ConfigError


def flatten(tree: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def split_trainable(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen): leaves whose path matches any regex (re.search) vs the rest.

    Raises ConfigError when a pattern matches no param (a typo would silently freeze everything).
    """
    flat = flatten(params)
    compiled = [re.compile(p) for p in patterns]
    for pattern in compiled:
        if not any(pattern.search(path) for path in flat):
            raise ConfigError(f"trainable pattern {pattern.pattern!r} matches no param")
    trainable = {k: v for k, v in flat.items() if any(p.search(k) for p in compiled)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten(trainable), unflatten(frozen)


def merge(*trees: dict) -> dict:
    """Union of disjoint param trees (inverse of ``split_trainable``)."""
    flat: dict[str, Any] = {}
    for tree in trees:
        for k, v in flatten(tree).items():
            if k in flat:
                raise ValueError(f"param {k!r} is in two trees")
            flat[k] = v
    return unflatten(flat)


def fingerprint(tree: dict) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal iff bitwise equal."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{path}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
