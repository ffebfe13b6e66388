"""Device mesh and logical-axis sharding rules (MaxText style).

Every parameter declares logical axis names where lard_jax.model creates it
(`model.param_logical_axes` reads them), and the model's hidden states between decoder blocks are
named ("batch", "length", "activation_embed") (`model.HIDDEN_AXES`). One table of rules maps each
logical name to mesh axes: DEFAULT_RULES, with a config's `mesh.rules` replacing single entries
(`rules_from_config`). The mesh has three named axes:
  data   - pure data parallelism (parameters replicated),
  fsdp   - data parallelism with parameters and optimizer state sharded over the embed axis,
  tensor - tensor (model) parallelism over heads / mlp / vocab.
A dimension that a mesh axis does not divide stays replicated along that axis (e.g. 8 KV heads on
a tensor axis of 16), so any mesh is valid for any model; only the batch must divide exactly.

Parameters are placed by `param_shardings(params, mesh, rules)`. Activations are constrained inside
the model (`constrain`) only where the caller has entered `use_mesh(mesh, rules)`: that sets jax's
current mesh (jax.set_mesh) and flax's logical-axis rules; the constraints are taken when a step is
traced, so the step's first call (and every retrace) must happen inside it. Outside, they are no-ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lard_jax.model import param_logical_axes
from lard_jax.partitioning import (  # noqa: F401  (re-exported: lard_jax.sharding is the public name)
    DEFAULT_RULES,
    MESH_AXES,
    constrain,
    logical_to_spec,
    rules_from_config,
    use_mesh,
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


def param_shardings(params_or_shapes, mesh: Mesh, rules=None):
    """NamedSharding for every parameter (arrays or ShapeDtypeStructs, either layout, LoRA factors
    included), from the logical axes the model declares for it; rules None = DEFAULT_RULES."""
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
