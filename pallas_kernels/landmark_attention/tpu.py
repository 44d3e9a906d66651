"""Landmark attention as Pallas kernels for TPU (Mosaic), forward AND backward.

Landmark Attention (Mohtashami & Jaggi 2023, arXiv 2305.16300) Sec. 3.1; tile math shared with ``xla.py``,
definition in ``reference.py``.

TPU style: the key-block loop is the last grid axis ("arbitrary"), so Mosaic pipelines the [L, D] tile
DMAs; running statistics and accumulators live in VMEM scratch.
  forward  grid (batch, heads, query block n, key block c): c < n -> landmark-gated update with block c,
           c == n -> own block, then write out and lse. The k/v index map clamps c to n, so future blocks
           are never fetched (the clamped block index repeats, which Mosaic does not re-copy).
  dq       grid (batch, heads, n, c): same schedule, accumulates dq in scratch.
  dk, dv   grid (batch, heads, c, n): n == c diagonal, n > c landmark path; q-side tiles clamp n up to c.
The backward is real Pallas kernels (recomputation from lse, FlashAttention-2 style).

Tile = block (L = b + 1). Constraints when compiled for TPU: L a multiple of 8 (float32) or 16 (16-bit)
for the sublane tiling of the [L, D] blocks; head_dim any (the block spans the whole last axis), though
multiples of 128 use the MXU/lanes best. Checked in ``api.py``. Lowering is tested on CPU; running it
needs a TPU. ``interpret=True`` runs on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .xla import NEG_INF, bwd_diag, bwd_offdiag, fwd_diag, fwd_offdiag

_F32 = jnp.float32
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=_SEMANTICS)


def _spec(L: int, width: int, index_map) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, L, width), index_map)


def _row_map(b, h, i, j):  # the grid's own (outer) block
    return (b, h, i, 0)


def _lower_clamped(b, h, i, j):  # inner block j, never beyond the outer block i
    return (b, h, jnp.minimum(i, j), 0)


def _upper_clamped(b, h, i, j):  # inner block j, never before the outer block i
    return (b, h, jnp.maximum(i, j), 0)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc):
    n, c = pl.program_id(2), pl.program_id(3)

    @pl.when(c == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    def update(fn):
        m, l, acc = fn(m_sc[...], l_sc[...], acc_sc[...], q_ref[...], k_ref[...], v_ref[...])
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc
        return m, l, acc

    @pl.when(c < n)
    def _earlier():
        update(fwd_offdiag)

    @pl.when(c == n)
    def _own():
        m, l, acc = update(fwd_diag)
        o_ref[...] = (acc / l).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, g_ref, lse_ref, dl_ref, dq_ref, dq_sc):
    n, c = pl.program_id(2), pl.program_id(3)

    @pl.when(c == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    def args():
        return q_ref[...], k_ref[...], v_ref[...], g_ref[...], lse_ref[...], dl_ref[...]

    @pl.when(c < n)
    def _earlier():
        dq_sc[...] += bwd_offdiag(*args())[0]

    @pl.when(c == n)
    def _own():
        dq_ref[...] = (dq_sc[...] + bwd_diag(*args())[0]).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, g_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc):
    c, n = pl.program_id(2), pl.program_id(3)

    def args():
        return q_ref[...], k_ref[...], v_ref[...], g_ref[...], lse_ref[...], dl_ref[...]

    @pl.when(n == c)
    def _own():
        _, dk, dv = bwd_diag(*args())
        dk_sc[...], dv_sc[...] = dk, dv

    @pl.when(n > c)
    def _later():
        _, dk, dv = bwd_offdiag(*args())
        dk_sc[...] += dk
        dv_sc[...] += dv

    @pl.when(n == pl.num_programs(3) - 1)
    def _write():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _forward(q, k, v, L, interpret):
    B, H, T, D = q.shape
    nb = T // L
    return pl.pallas_call(
        _fwd_kernel,
        grid=(B, H, nb, nb),
        in_specs=[_spec(L, D, _row_map), _spec(L, D, _lower_clamped), _spec(L, D, _lower_clamped)],
        out_specs=[_spec(L, D, _row_map), _spec(L, 1, _row_map)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T, 1), _F32)],
        scratch_shapes=[pltpu.VMEM((L, 1), _F32), pltpu.VMEM((L, 1), _F32), pltpu.VMEM((L, D), _F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="landmark_fwd",
    )(q, k, v)


def _backward(q, k, v, out, lse, g, L, interpret):
    B, H, T, D = q.shape
    nb = T // L
    delta = jnp.sum(out.astype(_F32) * g.astype(_F32), axis=-1, keepdims=True)
    # dq: outer = query block, inner = key block (clamped down to the query block).
    dq = pl.pallas_call(
        _dq_kernel,
        grid=(B, H, nb, nb),
        in_specs=[
            _spec(L, D, _row_map), _spec(L, D, _lower_clamped), _spec(L, D, _lower_clamped),
            _spec(L, D, _row_map), _spec(L, 1, _row_map), _spec(L, 1, _row_map),
        ],
        out_specs=_spec(L, D, _row_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((L, D), _F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="landmark_dq",
    )(q, k, v, g, lse, delta)
    # dk, dv: outer = key block, inner = query block (clamped up to the key block).
    dk, dv = pl.pallas_call(
        _dkv_kernel,
        grid=(B, H, nb, nb),
        in_specs=[
            _spec(L, D, _upper_clamped), _spec(L, D, _row_map), _spec(L, D, _row_map),
            _spec(L, D, _upper_clamped), _spec(L, 1, _upper_clamped), _spec(L, 1, _upper_clamped),
        ],
        out_specs=[_spec(L, D, _row_map), _spec(L, D, _row_map)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((L, D), _F32), pltpu.VMEM((L, D), _F32)],
        compiler_params=_params(),
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


def landmark_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pallas/Mosaic-TPU landmark attention. q, k, v: [batch, heads, T, head_dim] -> same shape, q.dtype.

    block_size = L = b + 1; scale None = 1/sqrt(head_dim) (1.0 for a pre-scaled q). Shape checks are in
    ``api.py``. ``interpret``: False, True (HLO interpreter on CPU) or ``pltpu.InterpretParams()``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _landmark((q * scale).astype(q.dtype), k, v, block_size, interpret)
