"""Product-key lookup with the value table sharded over a mesh axis, under `jax.shard_map`.

Memory Layers at Scale (arXiv 2412.09764, §3 "parallelism"; models.md §6). Each device selects the top-k
for its own tokens (sub-keys are small and replicated), then the embedding bag runs against its shard of
V. Two layouts of V [N, d_v] over `value_axis` (P devices):

- 'columns' (the paper's memory-parallel group): each device holds all N rows, d_v/P columns. Indices
  and weights are all-gathered over the group, each device bags its columns for every token of the
  group, and an all_to_all hands each device full rows for its own tokens.
- 'rows': each device holds N/P rows, all columns. It bags only the selected rows it owns (weights of
  other rows masked to 0) into a float32 partial sum, combined by psum_scatter (tokens sharded over
  `value_axis`) or psum (tokens replicated over it).

When `value_axis` is not among `token_axes`, every device of the value axis already holds the same
tokens: no gather; columns are joined with all_gather. The bag is xla.pkm_bag (segment_sum backward);
gradients of the replicated sub-keys and of V over axes it is replicated on are summed by shard_map's
transpose. The local bag always uses the XLA version, on every backend.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from memlm.errors import UserError
from pallas_kernels.pkm_lookup.api import check_args
from pallas_kernels.pkm_lookup.xla import pkm_bag, pkm_select


def _axes(token_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    if token_axes is None:
        return ()
    return (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark x as varying over `axes` (shard_map types), so the custom_vjp bag sees one type for all its
    operands; the transpose of this cast is the psum that sums, e.g., dV over token shards."""
    aval = jax.typeof(x)
    varying = aval.vma if hasattr(aval, "vma") else aval.mat.varying  # the field's name moved in jax 0.10
    missing = tuple(a for a in axes if a not in varying)
    return lax.pcast(x, missing, to="varying") if missing else x


def pkm_lookup_sharded(
    queries: jax.Array,
    sub_keys1: jax.Array,
    sub_keys2: jax.Array,
    values: jax.Array,
    *,
    top_k: int,
    mesh: Mesh,
    value_axis: str,
    layout: str,
    token_axes: str | Sequence[str] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sharded lookup; same result as api.pkm_lookup.

    queries [tokens, heads, k_dim] sharded over `token_axes` on dim 0; sub_keys [heads, sqrt_n, k_dim/2]
    replicated; values [N, d_v] sharded over `value_axis` on dim 1 ('columns') or dim 0 ('rows').
    Returns out [tokens, d_v], indices and weights [tokens, heads, top_k], sharded over `token_axes`.
    """
    check_args(queries, sub_keys1, sub_keys2, values, top_k)
    top_k = int(top_k)
    tok = _axes(token_axes)
    for name in tok + (value_axis,):
        if name not in mesh.axis_names:
            raise UserError(f"pkm_lookup_sharded.mesh: axis {name!r} not in mesh axes {mesh.axis_names}")
    if layout not in ("columns", "rows"):
        raise UserError(f"pkm_lookup_sharded.layout: {layout!r} is not 'columns' or 'rows'")
    p = mesh.shape[value_axis]
    n, d_v = values.shape
    dim, size = (1, d_v) if layout == "columns" else (0, n)
    if size % p:
        raise UserError(f"pkm_lookup_sharded.values: {layout} = {size} not divisible by {value_axis}={p}")
    n_tok = 1
    for a in tok:
        n_tok *= mesh.shape[a]
    if queries.shape[0] % n_tok:
        raise UserError(f"pkm_lookup_sharded.queries: {queries.shape[0]} tokens not divisible by {n_tok} shards")
    gather = value_axis in tok  # tokens differ along value_axis: bag the whole group's tokens
    tspec = tok if tok else None

    def body(q, k1, k2, v):
        t_loc, heads, _ = q.shape
        scores, idx = pkm_select(q, k1, k2, top_k=top_k)
        w = jax.nn.softmax(scores, axis=-1)
        idx_b, w_b = idx.reshape(t_loc, heads * top_k), w.reshape(t_loc, heads * top_k)
        if gather:
            idx_b = lax.all_gather(idx_b, value_axis, axis=0, tiled=True)  # [group tokens, M]
            w_b = lax.all_gather(w_b, value_axis, axis=0, tiled=True)
        every = tuple(dict.fromkeys(tok + (value_axis,)))
        v, idx_b, w_b = _vary(v, every), _vary(idx_b, every), _vary(w_b, every)
        if layout == "columns":
            part = pkm_bag(v, idx_b, w_b)  # [group tokens, d_v / P]
            if gather:
                out = lax.all_to_all(part, value_axis, split_axis=0, concat_axis=1, tiled=True)
            else:
                out = lax.all_gather(part, value_axis, axis=1, tiled=True, to="invarying")
        else:
            rows = v.shape[0]
            local = idx_b - lax.axis_index(value_axis) * rows
            own = (local >= 0) & (local < rows)
            part = pkm_bag(v, jnp.where(own, local, 0), jnp.where(own, w_b, 0.0))  # f32 partial
            if gather:
                out = lax.psum_scatter(part, value_axis, scatter_dimension=0, tiled=True)
            else:
                out = lax.psum(part, value_axis)
        return out.astype(v.dtype), idx, w

    v_spec = P(None, value_axis) if dim == 1 else P(value_axis, None)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(tspec, None, None), P(), P(), v_spec),
        out_specs=(P(tspec, None), P(tspec, None, None), P(tspec, None, None)),
    )
    return fn(queries, sub_keys1, sub_keys2, values)
