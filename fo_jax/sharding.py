"""Device mesh over ('data', 'fsdp', 'tensor') and the one table of logical-axis rules.

Params carry logical axis names (``nn.with_logical_partitioning``); ``LOGICAL_RULES`` maps them to
mesh axes. The mesh uses ``AxisType.Auto`` (GSPMD propagation), passed explicitly because
``jax.make_mesh`` defaults to Explicit axes since jax 0.9.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None: replicated). One table for params, activations and caches.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations and caches
    ("act_batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("cache_len", None),
)


# (mesh, rules) while ``activation_rules`` is on (tracing a training step), else None.
_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, Sequence[tuple[str, Any]]] | None] = contextvars.ContextVar(
    "fo_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Iterator[None]:
    """While tracing, turns the models' ``constrain`` calls (no-ops otherwise) into sharding
    constraints on ``mesh``. Usable inside ``jax.jit``. (Not flax's global-mesh logical rules:
    under a global mesh flax also constrains the params it shape-checks, which breaks on
    ``DenseGeneral`` kernels.)"""
    token = _ACTIVATIONS.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``x`` constrained to the sharding of its logical axis ``names`` under ``activation_rules``; else ``x``."""
    active = _ACTIVATIONS.get()
    if active is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, *active))


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one entry may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh shape must have 3 entries, at most one -1: {shape}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} does not use the {len(devices)} devices")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_sharding(names: tuple[str | None, ...], mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> NamedSharding:
    """NamedSharding of an array with these logical axis names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def param_shardings(boxed_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """Tree of NamedShardings for a tree of boxed (``LogicallyPartitioned``) params or their shapes."""
    specs = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> tuple[Any, Any]:
    """Initialises params born sharded: ``jit(init_fn, out_shardings=...)``. Returns (params, shardings).

    ``init_fn(rng)`` returns boxed params (e.g. ``fo_jax.models.qwen2.init_params``).
    """
    shardings = param_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings


def shard_params(params: Any, boxed_shapes: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """Places host params (e.g. loaded from HF) on the mesh by the logical names of ``boxed_shapes``."""
    return jax.device_put(params, param_shardings(boxed_shapes, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))
