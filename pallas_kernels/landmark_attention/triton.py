"""Landmark attention as Pallas kernels for GPU, lowered through Triton (forward AND backward).

Landmark Attention (Mohtashami & Jaggi 2023, arXiv 2305.16300) Sec. 3.1; the algorithm and the tile
math are in ``xla.py`` (shared functions), the definition in ``reference.py``.

Kernels (all wrapped in one ``jax.custom_vjp``; stack-notes P5: pallas_call is not differentiable):
  forward  grid (batch, heads, query blocks): one landmark block of L = b + 1 queries per program;
           a ``fori_loop`` over the earlier key blocks (online softmax over their landmark scores, each
           adding p_landmark * softmax_within(block) @ V), then the own block. Writes out and lse.
  dq       grid (batch, heads, query blocks): recomputes scores, loops over key blocks <= own block.
  dk, dv   grid (batch, heads, key blocks): own block (diagonal), then loops over later query blocks.
  The backward is real Pallas kernels (FlashAttention-2 style recomputation from lse; no atomics).

Tile = block: the kernel tile is exactly one landmark block, so a block's landmark is the last row/column
of the tile and the within-block softmax is local. Constraints when compiled (not in interpret mode):
L and head_dim powers of two and >= 16 (Triton tensor sizes are powers of two; ``tl.dot`` needs >= 16).
The paper's Triton setting is L = 64 (b = 63); b = 50 (L = 51) must use the XLA path. ``api.py``
checks this and raises UserError.

Compiler params: ``pallas.triton.CompilerParams``; without them jax 0.10's default cuda lowering is Mosaic
GPU, which rejects these kernels (stack-notes P6 and Sec. 3).

Measured on an H200 (jax 0.11.2, 2026-11-26, `scripts/gpu_check.py`; BENCHMARKS.md "GPU (H200)"): output
and gradients equal the dense float32 reference to 3.7e-4 / 5.2e-4 relative (float32 inputs, TF32 dots;
the XLA path gives the same) and 2.0e-3 / 3.4e-3 (bf16); 6-12x faster than the blockwise XLA path,
forward and forward+backward, at T = 4096-16384 (113-141 TFLOP/s forward, bf16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .xla import NEG_INF, bwd_diag, bwd_offdiag, fwd_diag, fwd_offdiag

_F32 = jnp.float32


def _params(head_dim: int) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _tile(b, h, n):
    return (b, h, n, 0)


def _whole(b, h, n):
    return (b, h, 0, 0)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, L: int):
    n = pl.program_id(2)
    q = q_ref[...]
    D = q.shape[-1]

    def body(c, carry):
        start = pl.multiple_of(c * L, L)
        return fwd_offdiag(*carry, q, k_ref[pl.ds(start, L), :], v_ref[pl.ds(start, L), :])

    init = (jnp.full((L, 1), NEG_INF, _F32), jnp.zeros((L, 1), _F32), jnp.zeros((L, D), _F32))
    m, l, acc = lax.fori_loop(0, n, body, init)
    start = pl.multiple_of(n * L, L)
    m, l, acc = fwd_diag(m, l, acc, q, k_ref[pl.ds(start, L), :], v_ref[pl.ds(start, L), :])
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, g_ref, lse_ref, dl_ref, dq_ref, *, L: int):
    n = pl.program_id(2)
    q, g, lse, delta = q_ref[...], g_ref[...], lse_ref[...], dl_ref[...]

    def body(c, dq):
        start = pl.multiple_of(c * L, L)
        return dq + bwd_offdiag(q, k_ref[pl.ds(start, L), :], v_ref[pl.ds(start, L), :], g, lse, delta)[0]

    dq = lax.fori_loop(0, n, body, jnp.zeros(q.shape, _F32))
    start = pl.multiple_of(n * L, L)
    dq = dq + bwd_diag(q, k_ref[pl.ds(start, L), :], v_ref[pl.ds(start, L), :], g, lse, delta)[0]
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, g_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, L: int, nb: int):
    c = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def rows(ref, n):
        return ref[pl.ds(pl.multiple_of(n * L, L), L), :]

    def tile_args(n):
        return rows(q_ref, n), k, v, rows(g_ref, n), rows(lse_ref, n), rows(dl_ref, n)

    _, dk, dv = bwd_diag(*tile_args(c))

    def body(n, carry):
        _, dk_n, dv_n = bwd_offdiag(*tile_args(n))
        return carry[0] + dk_n, carry[1] + dv_n

    dk, dv = lax.fori_loop(c + 1, nb, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(L: int, T: int, D: int, kinds: str) -> list[pl.BlockSpec]:
    """'t' = this program's [L, D] tile, 'w' = the whole [T, D] sequence, 's' = an [L, 1] stat tile,
    'S' = the whole [T, 1] stat column."""
    table = {
        "t": pl.BlockSpec((None, None, L, D), _tile),
        "w": pl.BlockSpec((None, None, T, D), _whole),
        "s": pl.BlockSpec((None, None, L, 1), _tile),
        "S": pl.BlockSpec((None, None, T, 1), _whole),
    }
    return [table[c] for c in kinds]


def _forward(q, k, v, L, interpret):
    B, H, T, D = q.shape
    return pl.pallas_call(
        functools.partial(_fwd_kernel, L=L),
        grid=(B, H, T // L),
        in_specs=_specs(L, T, D, "tww"),
        out_specs=_specs(L, T, D, "ts"),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T, 1), _F32)],
        compiler_params=_params(D),
        interpret=interpret,
        name="landmark_fwd",
    )(q, k, v)


def _backward(q, k, v, out, lse, g, L, interpret):
    B, H, T, D = q.shape
    delta = jnp.sum(out.astype(_F32) * g.astype(_F32), axis=-1, keepdims=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, L=L),
        grid=(B, H, T // L),
        in_specs=_specs(L, T, D, "twwtss"),
        out_specs=_specs(L, T, D, "t")[0],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(D),
        interpret=interpret,
        name="landmark_dq",
    )(q, k, v, g, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, L=L, nb=T // L),
        grid=(B, H, T // L),
        in_specs=_specs(L, T, D, "wttwSS"),
        out_specs=_specs(L, T, D, "tt"),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(D),
        interpret=interpret,
        name="landmark_dkv",
    )(q, k, v, g, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _landmark(q, k, v, block_size, interpret):
    return _forward(q, k, v, block_size, interpret)[0]


def _landmark_fwd(q, k, v, block_size, interpret):
    out, lse = _forward(q, k, v, block_size, interpret)
    return out, (q, k, v, out, lse)


def _landmark_bwd(block_size, interpret, res, g):
    q, k, v, out, lse = res
    return _backward(q, k, v, out, lse, g, block_size, interpret)


_landmark.defvjp(_landmark_fwd, _landmark_bwd)


def landmark_attention_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pallas/Triton landmark attention. q, k, v: [batch, heads, T, head_dim] -> same shape, q.dtype.

    block_size = L = b + 1; scale None = 1/sqrt(head_dim) (1.0 for a pre-scaled q). Shape checks are in
    ``api.py``; ``interpret=True`` runs the kernels on CPU (any L >= 2, any head_dim).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _landmark((q * scale).astype(q.dtype), k, v, block_size, interpret)
