"""Dense landmark grouped-softmax attention: the specification (tests and small inputs only).

Landmark Attention, Mohtashami & Jaggi 2023 (arXiv 2305.16300), Sec. 3.1, Eq. (1)-(4).

Layout. A sequence of T tokens is cut into blocks of L = b + 1 tokens (``block_size`` = L): b regular
tokens followed by one landmark token (the last token of every block). T must be a multiple of L.

Grouped softmax for a query i in block B(i) at in-block position r(i):

* The query's own group G_0(i) holds
  - the regular tokens j of its own block with r(j) <= r(i) (causal), and
  - the landmark tokens of all earlier blocks c < B(i).
  Its own block's landmark is never in G_0. For a landmark query (r(i) = b) this means it attends to
  the b regular tokens of its block and the earlier landmarks, exactly like the paper's code
  ("the landmark token for the current block should be ignored, even if we are processing the landmark
  token itself", ``models/landmark.py``; the Triton kernel shifts the landmark query one position back).
  So landmark tokens get zero weight everywhere; whether their outputs enter the loss is the model's
  choice (the paper's flash path drops them).
* S_ij = softmax over G_0(i) of the scores s_ij = scale * q_i . k_j.
* Each earlier block c forms its own group of regular tokens: pi_c(i, j) = softmax_{j in c, regular} s_ij.
* Final weights (Eq. 3): own block w_ij = S_ij; regular j in an earlier block c:
  w_ij = S_{i, landmark(c)} * pi_c(i, j); landmark tokens w_ij = 0. Rows are non-negative and sum to 1.
* Output o_i = sum_j w_ij v_j.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def _masked_softmax(s: jax.Array, mask: jax.Array, axis) -> jax.Array:
    """Softmax of ``s`` over ``axis`` restricted to ``mask``; all-masked rows give zeros (no NaN).

    The double ``where`` keeps gradients finite: masked entries never reach ``exp``.
    """
    m = jnp.max(jnp.where(mask, s, NEG_INF), axis=axis, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))  # softmax is shift-invariant
    e = jnp.where(mask, jnp.exp(jnp.where(mask, s, m) - m), 0.0)
    denom = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


def grouped_softmax_weights(
    s: jax.Array, q_block: jax.Array, q_pos: jax.Array, key_valid: jax.Array | None = None
) -> jax.Array:
    """Landmark grouped-softmax weights from block-shaped scores (Eq. 3 of the paper).

    Args:
      s: [..., Q, n_blocks, L] scores of each query against n_blocks blocks of L keys; key L-1 of each
        block is that block's landmark.
      q_block: [Q] int, the block (0..n_blocks-1) that holds each query.
      q_pos: [Q] int, the query's position inside its block (0..L-1; L-1 = a landmark query).
      key_valid: optional bool, broadcastable to s; invalid keys are left out of every group
        (padding, or a retrieved block that does not exist).
    Returns:
      w: [..., Q, n_blocks, L] float32 weights, >= 0, zero on landmarks, each query's weights sum to 1.
    """
    s = s.astype(jnp.float32)
    n_blocks, L = s.shape[-2], s.shape[-1]
    blk = jnp.arange(n_blocks)[None, :, None]  # [1, nb, 1]
    pos = jnp.arange(L)[None, None, :]  # [1, 1, L]
    qb = q_block[:, None, None]
    qp = q_pos[:, None, None]
    is_lm = pos == L - 1
    valid = True if key_valid is None else key_valid
    # Own block: regular keys up to the query (a landmark query stops at its block's last regular key).
    own = (blk == qb) & (~is_lm) & (pos <= qp) & valid
    earlier = blk < qb
    group0 = own | (earlier & is_lm & valid)
    flat = s.shape[:-2] + (n_blocks * L,)
    S = _masked_softmax(
        s.reshape(flat), jnp.broadcast_to(group0, s.shape).reshape(flat), axis=-1
    ).reshape(s.shape)
    # Within-block softmax of every block's regular tokens (used only for earlier blocks).
    pi = _masked_softmax(s, jnp.broadcast_to((~is_lm) & valid, s.shape), axis=-1)
    s_lm = S[..., L - 1 : L]  # [..., Q, nb, 1]: the query-group probability of each block's landmark
    w_earlier = jnp.where(earlier & (~is_lm), s_lm * pi, 0.0)
    return jnp.where(own, S, w_earlier)


def _check(q: jax.Array, block_size: int) -> tuple[int, int]:
    T = q.shape[-2]
    if block_size < 2 or T % block_size:
        raise ValueError(f"block_size={block_size} must be >= 2 and divide the sequence length {T}")
    return T // block_size, block_size


def landmark_weights_reference(
    q: jax.Array, k: jax.Array, block_size: int, *, scale: float | None = None
) -> jax.Array:
    """Dense grouped-softmax weights.

    Args:
      q, k: [batch, heads, T, head_dim]. ``scale`` defaults to 1/sqrt(head_dim); pass 1.0 if q is scaled.
      block_size: L = b + 1, the block length including the landmark.
    Returns:
      w: [batch, heads, T, T] float32 (query, key).
    """
    nb, L = _check(q, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    T = q.shape[-2]
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    idx = jnp.arange(T)
    w = grouped_softmax_weights(s.reshape(s.shape[:-1] + (nb, L)), idx // L, idx % L)
    return w.reshape(s.shape)


def landmark_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, scale: float | None = None
) -> jax.Array:
    """Dense landmark attention o = w @ v; q, k, v: [batch, heads, T, head_dim] -> same shape."""
    w = landmark_weights_reference(q, k, block_size, scale=scale)
    return jnp.einsum("bhqk,bhkd->bhqd", w, v.astype(jnp.float32)).astype(q.dtype)
