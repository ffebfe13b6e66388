"""Logical axis names -> mesh axes: the rules, PartitionSpecs from them, and the activation
constraints the model applies (`constrain`, active inside `use_mesh`).

The bottom of the sharding stack: lard_jax.model imports it (to constrain its hidden states), and
lard_jax.sharding (mesh construction, parameter shardings from the model's declared axes) builds
on it; it imports neither. See lard_jax.sharding's docstring for the mesh axes and the rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lard_jax.errors import UserError

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
    ("length", None),  # activations' sequence axis
    ("activation_embed", None),  # hidden states' feature axis between blocks: replicated, as Megatron's
)


def rules_from_config(mesh_config) -> tuple:
    """The rules of a config's `mesh` block: DEFAULT_RULES with each `mesh.rules` entry
    (logical name, mesh axis | mesh axes | None) replacing the default rule of that name; () or a
    missing key = DEFAULT_RULES. A mapping {name: axes} works too. Raises UserError (a ValueError)
    naming the bad entry and the known names."""
    given = mesh_config.get("rules") or ()
    pairs = list(given.items()) if hasattr(given, "items") else list(given)  # a mapping, or pairs
    overrides: dict = {}
    for entry in pairs:
        name, target = _rule_entry(entry)
        if name in overrides:
            raise UserError(f"config.mesh.rules: logical axis {name!r} is given twice; give each name once")
        overrides[name] = target
    return tuple((name, overrides.get(name, target)) for name, target in DEFAULT_RULES)


def _rule_entry(entry) -> tuple[str, str | tuple[str, ...] | None]:
    """One checked (logical name, target) pair; target normalized to None, a mesh axis or a tuple."""
    known = [name for name, _ in DEFAULT_RULES]
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
        raise UserError(
            f"config.mesh.rules: entry {entry!r} is not a (logical axis, mesh axes) pair; "
            f"e.g. --config.mesh.rules='((\"embed\", None),)' (logical axes: {', '.join(known)})"
        )
    name, target = entry
    if name not in known:
        raise UserError(f"config.mesh.rules: unknown logical axis {name!r}; known: {', '.join(known)}")
    if target is None:
        return name, None
    targets = tuple(target) if isinstance(target, Sequence) and not isinstance(target, str) else (target,)
    for axis in targets:
        if axis not in MESH_AXES:
            raise UserError(
                f"config.mesh.rules[{name!r}]: unknown mesh axis {axis!r}; mesh axes: {', '.join(MESH_AXES)}, "
                "a tuple of them, or None (replicated)"
            )
    if not targets or len(set(targets)) != len(targets):
        raise UserError(f"config.mesh.rules[{name!r}]: {target!r} must name each mesh axis once (or be None)")
    return name, targets[0] if len(targets) == 1 else targets


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` with logical `axes`. A mesh axis is used at most once,
    mesh axes of size 1 are dropped, and a dimension the mesh axes do not divide stays replicated.
    `mesh` may be an AbstractMesh (only its axis sizes are read)."""
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


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=None) -> Iterator[Mesh]:
    """Where the model's activation constraints take effect: `mesh` as jax's current mesh
    (jax.set_mesh) and `rules` (None = DEFAULT_RULES) as flax's logical-axis rules, which
    `constrain` reads. Wrap every call that traces the model (the step's first call included)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES if rules is None else rules):
        yield mesh


def constrain(x, axes: Sequence[str | None]):
    """`x` constrained to the PartitionSpec of its logical `axes` (logical_to_spec) under the mesh
    and rules of an enclosing `use_mesh`, when `x` is being traced (jit, scan, grad): a constraint
    only guides the compiler, so concrete values in eager code pass through, and so does everything
    outside use_mesh. The model thus runs the same with and without a mesh."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or not isinstance(x, jax.core.Tracer):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))
