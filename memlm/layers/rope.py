"""Rotary position embedding (Su et al. 2021, RoFormer §3.4.2), rotate-half layout as in Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/d), i = 0..d/2-1. [head_dim // 2] float32."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x by its positions.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Computed in float32, returned in x.dtype.
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of head_dim.
    """
    hd = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(hd, theta)  # [b, s, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
