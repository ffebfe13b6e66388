"""Device mesh and logical-axis sharding rules (MaxText style).

Parameters carry logical axis names (lard_jax.model.PARAM_LOGICAL_AXES); one table of rules maps
each logical name to mesh axes. The mesh has three named axes:
  data   - pure data parallelism (parameters replicated),
  fsdp   - data parallelism with parameters and optimizer state sharded over the embed axis,
  tensor - tensor (model) parallelism over heads / mlp / vocab.
A dimension that a mesh axis does not divide stays replicated along that axis (e.g. 8 KV heads on
a tensor axis of 16), so any mesh is valid for any model; only the batch must divide exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lard_jax.model import param_logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the leading axis of stacked (scan_layers) parameters: never sharded
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one axis takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split over mesh axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}")
    total = int(np.prod(sizes))
    if total != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    rule_map = dict(rules)
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        target = rule_map.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        target = (target,) if isinstance(target, str) else tuple(target)
        target = tuple(a for a in target if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in target])) if target else 1
        if not target or dim % size:
            spec.append(None)
            continue
        used.update(target)
        spec.append(target[0] if len(target) == 1 else target)
    return P(*spec)


def param_shardings(params_or_shapes, mesh: Mesh, rules=None):
    """NamedSharding for every parameter, from its logical axes."""
    rules = DEFAULT_RULES if rules is None else rules
    axes = param_logical_axes(params_or_shapes)
    return jax.tree_util.tree_map(
        lambda a, x: NamedSharding(mesh, logical_to_spec(a, x.shape, mesh, rules)),
        axes,
        params_or_shapes,
        is_leaf=lambda a: isinstance(a, tuple),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows over data x fsdp, sequence replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
