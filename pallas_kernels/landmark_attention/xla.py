"""Blockwise (flash-style) landmark attention in plain JAX: what CPU runs; memory O(T * L), not O(T^2).

Landmark Attention (Mohtashami & Jaggi 2023, arXiv 2305.16300) Sec. 3.1 and the paper's fused Triton
kernel (``llama/ltriton/flash_landmark_attention.py``, read for the algorithm, not copied). The
definition is in ``reference.py``.

Algorithm (per query block n, all key blocks of length L = b + 1):
  forward: an online softmax over {landmark scores of the earlier blocks c < n} U {own block, causal,
    own landmark excluded}. Earlier block c contributes p_c * u_c with u_c = softmax_within_c(s) @ V_c;
    its landmark score a_c takes part in the running max/sum. Saved: out and lse (log-sum-exp of the
    query group G_0).
  backward (hand-written, flash style; no T x T tensor): with P_c = exp(a_c - lse), pi the within-block
    softmax, g = dO, delta = sum(g * o):
      d a_c      = P_c (g . u_c - delta)                 (landmark key of block c)
      d s_ij     = P_c pi_ij (g . v_j - g . u_c)          (regular key j of earlier block c)
      d s_ij     = P_ij (g . v_j - delta)                 (own block, P_ij = exp(s_ij - lse))
      dv_j      += w_ij g_i,   dq_i += ds_ij k_j,   dk_j += ds_ij q_i.

The tile functions below work on 2-D tiles ([L, L] scores, [L, D] values, [L, 1] row stats); the Pallas
kernels (``triton.py``, ``tpu.py``) call the same functions, and this file vmaps them over
(batch, heads, query blocks) and scans over key blocks. The scan does every (query block, key block)
pair and masks the future half: simple, and O(T * L) memory per step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")
_F32 = jnp.float32


# ----------------------------------------------------------------------------------- tile math (2-D)
def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] @ [K, N] -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def mm_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] @ [N, K]^T -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def mm_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """[K, M]^T @ [K, N] -> [M, N] float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _iota(L: int):
    return jnp.arange(L, dtype=jnp.int32)[:, None], jnp.arange(L, dtype=jnp.int32)[None, :]


def diag_mask(L: int) -> jax.Array:
    """[L, L] own-block group: regular keys up to the query; the landmark query stops at key L-2."""
    rows, cols = _iota(L)
    return (cols <= rows) & (cols < L - 1)


def offdiag_parts(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores [L, L] of a query tile against an EARLIER block -> (a [L, 1] landmark scores,
    pi [L, L] within-block softmax over the regular keys; 0 in the landmark column)."""
    L = s.shape[-1]
    _, cols = _iota(L)
    is_lm = cols == L - 1
    a = jnp.max(jnp.where(is_lm, s, NEG_INF), axis=-1, keepdims=True)
    reg = jnp.where(is_lm, NEG_INF, s)
    e = jnp.exp(reg - jnp.max(reg, axis=-1, keepdims=True))
    return a, e / jnp.sum(e, axis=-1, keepdims=True)


def fwd_offdiag(
    m: jax.Array, l: jax.Array, acc: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax update with an earlier block (k, v [L, D]); m, l [L, 1], acc [L, D] float32."""
    a, pi = offdiag_parts(mm_nt(q, k))
    u = mm(pi.astype(v.dtype), v)
    m_new = jnp.maximum(m, a)
    alpha, p = jnp.exp(m - m_new), jnp.exp(a - m_new)
    return m_new, alpha * l + p, alpha * acc + p * u


def fwd_diag(
    m: jax.Array, l: jax.Array, acc: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax update with the query's own block (causal, own landmark excluded)."""
    s = jnp.where(diag_mask(q.shape[0]), mm_nt(q, k), NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
    return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + mm(p.astype(v.dtype), v)


def bwd_offdiag(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, lse: jax.Array, delta: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradient pieces of one (query tile, earlier key block) pair -> (dq, dk, dv), each [L, D] f32."""
    L = q.shape[0]
    a, pi = offdiag_parts(mm_nt(q, k))
    u = mm(pi.astype(v.dtype), v)
    P = jnp.exp(a - lse)  # [L, 1]: group probability of this block's landmark
    gu = jnp.sum(g.astype(_F32) * u, axis=-1, keepdims=True)
    gv = mm_nt(g, v)
    w = P * pi
    _, cols = _iota(L)
    ds = w * (gv - gu) + jnp.where(cols == L - 1, P * (gu - delta), 0.0)
    return mm(ds.astype(k.dtype), k), mm_tn(ds.astype(q.dtype), q), mm_tn(w.astype(g.dtype), g)


def bwd_diag(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, lse: jax.Array, delta: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradient pieces of the query tile with its own block -> (dq, dk, dv), each [L, D] f32."""
    s = jnp.where(diag_mask(q.shape[0]), mm_nt(q, k), NEG_INF)
    p = jnp.exp(s - lse)
    ds = p * (mm_nt(g, v) - delta)
    return mm(ds.astype(k.dtype), k), mm_tn(ds.astype(q.dtype), q), mm_tn(p.astype(g.dtype), g)


# --------------------------------------------------------------------------------- blockwise XLA
def _blocks(x: jax.Array, L: int) -> jax.Array:
    """[B, H, T, D] -> [B, H, nb, L, D]."""
    B, H, T, D = x.shape
    return x.reshape(B, H, T // L, L, D)


def _vmap3(f, block_axes=0):
    """vmap a tile function over query blocks (``block_axes``), then over batch and heads (all axis 0)."""
    return jax.vmap(jax.vmap(jax.vmap(f, in_axes=block_axes)))


def _forward(q, k, v, L):
    """Returns out [B, H, T, D] (q.dtype) and lse [B, H, nb, L, 1] float32."""
    qb, kb, vb = _blocks(q, L), _blocks(k, L), _blocks(v, L)
    B, H, nb, _, D = qb.shape
    m = jnp.full((B, H, nb, L, 1), NEG_INF, _F32)
    l = jnp.zeros((B, H, nb, L, 1), _F32)
    acc = jnp.zeros((B, H, nb, L, D), _F32)
    off = _vmap3(fwd_offdiag, (0, 0, 0, 0, None, None))  # one key block for all query blocks
    qblock = jnp.arange(nb)[:, None, None]

    def step(carry, c):
        m, l, acc = carry
        kc = lax.dynamic_index_in_dim(kb, c, axis=2, keepdims=False)
        vc = lax.dynamic_index_in_dim(vb, c, axis=2, keepdims=False)
        new = off(m, l, acc, qb, kc, vc)
        valid = c < qblock  # only earlier blocks; later key blocks are skipped
        return tuple(jnp.where(valid, n_, o_) for n_, o_ in zip(new, (m, l, acc), strict=True)), None

    (m, l, acc), _ = lax.scan(step, (m, l, acc), jnp.arange(nb))
    m, l, acc = _vmap3(fwd_diag)(m, l, acc, qb, kb, vb)
    out = (acc / l).reshape(q.shape).astype(q.dtype)
    return out, m + jnp.log(l)


def _backward(q, k, v, out, lse, g, L):
    qb, kb, vb, gb = _blocks(q, L), _blocks(k, L), _blocks(v, L), _blocks(g, L)
    B, H, nb, _, D = qb.shape
    delta = jnp.sum(_blocks(out, L).astype(_F32) * gb.astype(_F32), axis=-1, keepdims=True)
    off = _vmap3(bwd_offdiag, (0, None, None, 0, 0, 0))
    qblock = jnp.arange(nb)[:, None, None]

    def step(dq, c):
        kc = lax.dynamic_index_in_dim(kb, c, axis=2, keepdims=False)
        vc = lax.dynamic_index_in_dim(vb, c, axis=2, keepdims=False)
        dq_c, dk_c, dv_c = off(qb, kc, vc, gb, lse, delta)
        valid = c < qblock
        dq_c, dk_c, dv_c = (jnp.where(valid, x, 0.0) for x in (dq_c, dk_c, dv_c))
        return dq + dq_c, (jnp.sum(dk_c, axis=2), jnp.sum(dv_c, axis=2))  # reduce over query blocks

    dq, (dk, dv) = lax.scan(step, jnp.zeros(qb.shape, _F32), jnp.arange(nb))
    dq_d, dk_d, dv_d = _vmap3(bwd_diag)(qb, kb, vb, gb, lse, delta)
    dk = jnp.moveaxis(dk, 0, 2) + dk_d  # scan stacks key blocks first
    dv = jnp.moveaxis(dv, 0, 2) + dv_d
    return tuple(x.reshape(y.shape).astype(y.dtype) for x, y in ((dq + dq_d, q), (dk, k), (dv, v)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _landmark(q, k, v, block_size):
    return _forward(q, k, v, block_size)[0]


def _landmark_fwd(q, k, v, block_size):
    out, lse = _forward(q, k, v, block_size)
    return out, (q, k, v, out, lse)


def _landmark_bwd(block_size, res, g):
    q, k, v, out, lse = res
    return _backward(q, k, v, out, lse, g, block_size)


_landmark.defvjp(_landmark_fwd, _landmark_bwd)


def landmark_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, scale: float | None = None
) -> jax.Array:
    """Blockwise landmark attention with a flash-style custom VJP.

    Args:
      q, k, v: [batch, heads, T, head_dim]; T a multiple of block_size (checked in ``api.py``).
      block_size: L = b + 1 (block length including its landmark, the last token of each block).
      scale: score scale; None = 1/sqrt(head_dim); pass 1.0 when q is already scaled.
    Returns:
      [batch, heads, T, head_dim] in q.dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _landmark((q * scale).astype(q.dtype), k, v, block_size)
