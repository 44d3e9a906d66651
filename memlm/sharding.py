"""Device mesh from config and the ONE logical-axis rules table.

Mesh axes are ("data", "fsdp", "tensor"). Every parameter, optimizer slot, memory carry and batch names its
dimensions with logical names; `RULES` decides which mesh axes each logical name is split over. nnx resolves
names by plain lookup and passes unknown names through as mesh-axis names, so every name used anywhere must
be listed here (tests check that every parameter resolves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memlm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (tuple = split over several, None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("mem_slots", None),
    ("mem_embed", "fsdp"),
    ("pkm_values", None),
    ("pkm_value_dim", "tensor"),
    ("pkm_keys", None),
    ("titans_mem", None),
    # activations and carries
    ("batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("segments", None),
)


def rules(overrides: dict | None = None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rules table with config overrides (`mesh.rules: {embed: null}`) applied."""
    if not overrides:
        return RULES
    known = {name for name, _ in RULES}
    out = dict(RULES)
    for name, axes in overrides.items():
        if name not in known:
            raise UserError(f"mesh.rules.{name}: unknown logical axis (known: {sorted(known)})")
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            if a not in MESH_AXES:
                raise UserError(f"mesh.rules.{name}: unknown mesh axis {a!r} (mesh axes: {MESH_AXES})")
        out[name] = axes
    return tuple(out.items())


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (stack-notes P1). data=-1 takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % (fsdp * tensor):
            raise UserError(f"mesh: {n} devices are not divisible by fsdp*tensor = {fsdp * tensor}")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise UserError(f"mesh: data*fsdp*tensor = {data * fsdp * tensor} but {n} devices are available")
    arr = np.array(devices).reshape(data, fsdp, tensor)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)


@contextlib.contextmanager
def activate(mesh: Mesh, rule_table=RULES) -> Iterator[None]:
    """Mesh + logical rules context for building models and tracing steps."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
        yield


def logical_to_spec(names: Sequence[str | None], rule_table=RULES) -> P:
    table = dict(rule_table)
    out = []
    for n in names:
        if n is None:
            out.append(None)
            continue
        if n not in table:
            raise KeyError(f"logical axis {n!r} is not in the rules table")
        out.append(table[n])
    return P(*out)


def named(mesh: Mesh, names: Sequence[str | None], rule_table=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rule_table))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rule_table=RULES) -> NamedSharding:
    """Batch arrays are split on their leading dim over ("data", "fsdp")."""
    return named(mesh, ("batch",) + (None,) * (ndim - 1), rule_table)


def current_rules():
    """The rules of the innermost `activate` context (config overrides included), else RULES."""
    return flax_spmd.get_logical_axis_rules() or RULES


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, current_rules()))
