"""Production pure-JAX product-key lookup (what CPU and CI run).

Memory Layers at Scale (arXiv 2412.09764, §3) / product keys (Lample et al. 2019, §3.2):
per head, top-k of each sub-key half, the k² candidate sums, the exact top-k of those (an element of the
top-k of the N = sqrt_n² products must be in the top-k of each half), a float32 softmax, and an
embedding bag that SUMS the heads' weighted rows.

Memory: nothing here is [tokens, N]. The forward holds [tokens, heads, sqrt_n] sub-key scores and
[tokens, heads, k²] candidates. The backward reaches queries and sub-keys only through the k selected
scores (autodiff of two `lax.top_k`s: gathers whose transposes scatter into [tokens, heads, sqrt_n]),
and the values through `pkm_bag`, a `jax.custom_vjp` whose values-gradient is a `segment_sum` over the
selected rows: its only N-sized array is the [N, d_v] gradient of the parameter itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def sub_key_scores(queries: jax.Array, sub_keys1: jax.Array, sub_keys2: jax.Array):
    """q1·K1 and q2·K2 per head: queries [T, H, k_dim] -> two [T, H, sqrt_n] float32 arrays."""
    half = queries.shape[-1] // 2
    q = queries.astype(jnp.float32)
    s1 = jnp.einsum("thd,hsd->ths", q[..., :half], sub_keys1.astype(jnp.float32), precision=_HI)
    s2 = jnp.einsum("thd,hsd->ths", q[..., half:], sub_keys2.astype(jnp.float32), precision=_HI)
    return s1, s2


def pkm_select(
    queries: jax.Array, sub_keys1: jax.Array, sub_keys2: jax.Array, *, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k over the product keys without forming all N scores.

    queries [T, H, k_dim]; sub_keys{1,2} [H, sqrt_n, k_dim//2] ->
    scores [T, H, top_k] float32 (descending, differentiable w.r.t. queries and sub-keys),
    indices [T, H, top_k] int32, index = i·sqrt_n + j.
    """
    t, h, _ = queries.shape
    sqrt_n = sub_keys1.shape[1]
    s1, s2 = sub_key_scores(queries, sub_keys1, sub_keys2)
    v1, i1 = lax.top_k(s1, top_k)  # [T, H, k]
    v2, i2 = lax.top_k(s2, top_k)
    cand = (v1[..., :, None] + v2[..., None, :]).reshape(t, h, top_k * top_k)
    scores, pos = lax.top_k(cand, top_k)
    ii = jnp.take_along_axis(i1, pos // top_k, axis=-1)
    jj = jnp.take_along_axis(i2, pos % top_k, axis=-1)
    return scores, (ii * sqrt_n + jj).astype(jnp.int32)


@jax.custom_vjp
def pkm_bag(values: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """Embedding bag (sum mode): out[t] = Σ_m weights[t, m] · values[indices[t, m]].

    values [N, d_v]; indices [T, M] int32 (M = heads·top_k, every head's selection); weights [T, M] f32
    -> [T, d_v] float32 (callers cast; partial bags of a row-sharded table are summed in float32).
    """
    return _bag_fwd(values, indices, weights)[0]


def _bag_fwd(values, indices, weights):
    rows = jnp.take(values, indices, axis=0).astype(jnp.float32)  # [T, M, d_v]: grows with T, not N
    out = jnp.einsum("tm,tmd->td", weights.astype(jnp.float32), rows, precision=_HI)
    return out, (values, indices, weights)


def _bag_bwd(res, g):
    values, indices, weights = res
    n, d_v = values.shape
    g32 = g.astype(jnp.float32)
    # dV[n] = Σ_{(t,m): idx[t,m] = n} w[t,m] g[t]: a scatter-add over the selected rows only.
    contrib = (weights.astype(jnp.float32)[..., None] * g32[:, None, :]).reshape(-1, d_v)
    d_values = jax.ops.segment_sum(contrib, indices.reshape(-1), num_segments=n)
    rows = jnp.take(values, indices, axis=0).astype(jnp.float32)
    d_weights = jnp.einsum("td,tmd->tm", g32, rows, precision=_HI).astype(weights.dtype)
    d_indices = jnp.zeros(indices.shape, dtype=jax.dtypes.float0)
    return d_values.astype(values.dtype), d_indices, d_weights


pkm_bag.defvjp(_bag_fwd, _bag_bwd)


def pkm_lookup_xla(
    queries: jax.Array,
    sub_keys1: jax.Array,
    sub_keys2: jax.Array,
    values: jax.Array,
    *,
    top_k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Product-key lookup. queries [T, H, k_dim], sub_keys [H, sqrt_n, k_dim//2], values [N, d_v]
    -> out [T, d_v] (values.dtype), indices [T, H, top_k] int32, weights [T, H, top_k] float32."""
    t, h, _ = queries.shape
    scores, indices = pkm_select(queries, sub_keys1, sub_keys2, top_k=top_k)
    weights = jax.nn.softmax(scores, axis=-1)  # float32, per head (the heads are then summed)
    out = pkm_bag(values, indices.reshape(t, h * top_k), weights.reshape(t, h * top_k))
    return out.astype(values.dtype), indices, weights
