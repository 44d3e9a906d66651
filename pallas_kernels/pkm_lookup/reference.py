"""Naive product-key memory lookup: the specification (tests only).

Memory Layers at Scale (Berges et al. 2024, arXiv 2412.09764, §3) with product keys (Lample et al.
2019, "Large Memory Layers with Product Keys", §3.2). Per head h, with the query split in halves
q = [q1; q2] and sub-key tables K1[h], K2[h] of sqrt(N) rows each:

    s(i, j) = q1 · K1[h, i] + q2 · K2[h, j]          (score of product key n = i·sqrt(N) + j)
    I_h     = top_k over all N products of s         (exact)
    w_h     = softmax(s[I_h])                        (float32)
    out     = Σ_h Σ_{n in I_h} w_h[n] · V[n]         (heads are summed, not averaged)

This file materialises all N scores per token and head ([tokens, heads, N]) and differentiates through
`lax.top_k` and a plain gather, so its gradients are dense in N. It exists only to check the fast paths.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def product_scores(queries: jax.Array, sub_keys1: jax.Array, sub_keys2: jax.Array) -> jax.Array:
    """Dense scores over every product key.

    queries [tokens, heads, k_dim], sub_keys{1,2} [heads, sqrt_n, k_dim//2] -> [tokens, heads, N] (f32).
    """
    half = queries.shape[-1] // 2
    q = queries.astype(jnp.float32)
    s1 = jnp.einsum("thd,hsd->ths", q[..., :half], sub_keys1.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)
    s2 = jnp.einsum("thd,hsd->ths", q[..., half:], sub_keys2.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)
    t, h, sqrt_n = s1.shape
    return (s1[..., :, None] + s2[..., None, :]).reshape(t, h, sqrt_n * sqrt_n)


def pkm_lookup_reference(
    queries: jax.Array,
    sub_keys1: jax.Array,
    sub_keys2: jax.Array,
    values: jax.Array,
    *,
    top_k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reference lookup.

    queries [tokens, heads, k_dim]; sub_keys{1,2} [heads, sqrt_n, k_dim//2]; values [N, d_v].
    Returns out [tokens, d_v] (values.dtype), indices [tokens, heads, top_k] int32 (sorted by score,
    descending; ties -> lower index, as `lax.top_k`), weights [tokens, heads, top_k] float32.
    """
    scores = product_scores(queries, sub_keys1, sub_keys2)
    top_scores, indices = lax.top_k(scores, top_k)
    weights = jax.nn.softmax(top_scores, axis=-1)
    rows = values[indices].astype(jnp.float32)  # [tokens, heads, top_k, d_v]
    out = jnp.einsum("thk,thkd->td", weights, rows, precision=lax.Precision.HIGHEST)
    return out.astype(values.dtype), indices.astype(jnp.int32), weights
