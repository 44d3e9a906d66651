"""Pallas Mosaic (TPU) product-key lookup, forward and backward inside `jax.custom_vjp`.

Memory Layers at Scale (arXiv 2412.09764, §3); product keys (Lample et al. 2019, §3.2). Same op as
reference.py. A TPU core cannot move a vector lane into a scalar register, and a row gather from HBM
needs a scalar row index, so the lookup is split where the data moves from vectors to scalars:

forward, two pallas_calls:
1. `_select_kernel` (fused, grid = token blocks): sub-key scores on the MXU (K1[h]·q1ᵀ as [sqrt_n, block_t]
   so each token's sub-key top-k lands in a column, q2·K2[h]ᵀ as [block_t, sqrt_n]), top-k of each half,
   then per token the [k, k] candidate sums (column + row broadcast), their exact top-k and the float32
   softmax. Writes indices and weights.
2. `_bag_kernel` (grid = tokens x heads·k): the indices are scalar-prefetched to SMEM and drive the
   values BlockSpec's index_map, so each grid step DMAs one [1, d_v] row and accumulates w·row into the
   token's output block (the standard scalar-prefetch gather; one row per step, not several in flight).

backward, three pallas_calls plus one XLA argsort:
1. `_row_dot_kernel`: dw = g·V[idx], rows gathered as in the bag.
2. `_scores_bwd_kernel` (grid = token blocks, sequential): the softmax backward, then the selected
   score gradients scattered into a dense [block_t, sqrt_n] matrix per half (one-hot over sqrt_n, never
   N), so dq = D·K[h] and dK[h] += Dᵀ·q are MXU matmuls; dK stays resident across the grid.
3. `_scatter_rows_kernel`: dV without atomics (TPU has none): the (token, slot) pairs are argsorted by
   row in XLA, so each row's contributions are consecutive grid steps on one resident output block,
   zeroed at the row's first visit; rows never selected keep the zeros of the aliased input.

Top-k inside the kernels is k rounds of (max, lowest index attaining it, mask): ties -> lower index, as
`lax.top_k`; fine for the paper's k = 32. Tokens are padded to a multiple of `block_t` (a multiple of 8;
128 fills the lanes of the [sqrt_n, block_t] score tile). The scalar-prefetched arrays live in SMEM, so
the gather/scatter calls take at most MAX_PREFETCH_ENTRIES (token, slot) pairs each and the wrapper loops
over token chunks (dV is chained through the aliased running sum). Status: tested on CPU in interpret mode
(forward and gradients against reference.py) and lowered for 'tpu'; never compiled or run on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_HI = lax.Precision.HIGHEST
_BIG = jnp.iinfo(jnp.int32).max
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a·bᵀ
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: aᵀ·b


def _top_k_axis(s, top_k: int, axis: int):
    """Top-k along `axis` of a 2-D f32 array by k rounds of max + mask.
    axis=0: [S, B] -> [k, B]; axis=1: [B, S] -> [B, k]; values f32 and indices i32, descending."""
    pos = lax.broadcasted_iota(jnp.int32, s.shape, axis)
    out_shape = (top_k, s.shape[1]) if axis == 0 else (s.shape[0], top_k)
    slot = lax.broadcasted_iota(jnp.int32, out_shape, axis)

    def step(k, carry):
        s, out_v, out_i = carry
        m = jnp.max(s, axis=axis, keepdims=True)
        sel = jnp.min(jnp.where(s == m, pos, _BIG), axis=axis, keepdims=True)
        s = jnp.where(pos == sel, -jnp.inf, s)
        return s, jnp.where(slot == k, m, out_v), jnp.where(slot == k, sel, out_i)

    init = (s, jnp.zeros(out_shape, jnp.float32), jnp.zeros(out_shape, jnp.int32))
    _, out_v, out_i = lax.fori_loop(0, top_k, step, init)
    return out_v, out_i


def _select_kernel(q1_ref, q2_ref, k1_ref, k2_ref, idx_ref, w_ref, *, heads, sqrt_n, top_k, block_t):
    sub = lax.broadcasted_iota(jnp.int32, (block_t, top_k), 0)
    lane = lax.broadcasted_iota(jnp.int32, (top_k, block_t), 1)
    slot = lax.broadcasted_iota(jnp.int32, (1, top_k), 1)
    for h in range(heads):
        q1 = q1_ref[h].astype(jnp.float32)  # [block_t, half]
        q2 = q2_ref[h].astype(jnp.float32)
        s1t = lax.dot_general(k1_ref[h].astype(jnp.float32), q1, _NT, precision=_HI,
                              preferred_element_type=jnp.float32)  # [sqrt_n, block_t]
        s2 = lax.dot_general(q2, k2_ref[h].astype(jnp.float32), _NT, precision=_HI,
                             preferred_element_type=jnp.float32)  # [block_t, sqrt_n]
        v1t, i1t = _top_k_axis(s1t, top_k, axis=0)  # [k, block_t]: token t's top-k in column t
        v2, i2 = _top_k_axis(s2, top_k, axis=1)  # [block_t, k]

        def token(t, carry, v1t=v1t, i1t=i1t, v2=v2, i2=i2):
            w_acc, i_acc = carry
            in_col, in_row = lane == t, sub == t
            v1c = jnp.sum(jnp.where(in_col, v1t, 0.0), axis=1, keepdims=True)  # [k, 1]
            i1c = jnp.sum(jnp.where(in_col, i1t, 0), axis=1, keepdims=True)
            v2r = jnp.sum(jnp.where(in_row, v2, 0.0), axis=0, keepdims=True)  # [1, k]
            i2r = jnp.sum(jnp.where(in_row, i2, 0), axis=0, keepdims=True)
            cand0, pid = v1c + v2r, i1c * sqrt_n + i2r  # [k, k] candidates, product indices

            def step(k, c):
                cand, sv, si = c
                m = jnp.max(jnp.max(cand, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
                hit = jnp.where(cand == m, pid, _BIG)
                sel = jnp.min(jnp.min(hit, axis=1, keepdims=True), axis=0, keepdims=True)
                cand = jnp.where(pid == sel, -jnp.inf, cand)
                return cand, jnp.where(slot == k, m, sv), jnp.where(slot == k, sel, si)

            init = (cand0, jnp.zeros((1, top_k), jnp.float32), jnp.zeros((1, top_k), jnp.int32))
            _, sv, si = lax.fori_loop(0, top_k, step, init)
            e = jnp.exp(sv - jnp.max(sv, axis=1, keepdims=True))
            w = e / jnp.sum(e, axis=1, keepdims=True)  # float32 softmax over this head's k slots
            return jnp.where(in_row, w, w_acc), jnp.where(in_row, si, i_acc)

        init = (jnp.zeros((block_t, top_k), jnp.float32), jnp.zeros((block_t, top_k), jnp.int32))
        w_blk, i_blk = lax.fori_loop(0, block_t, token, init)
        idx_ref[h] = i_blk
        w_ref[h] = w_blk


def _bag_kernel(idx_ref, w_ref, v_ref, o_ref, *, m):
    t, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    o_ref[...] += w_ref[t * m + j] * v_ref[...].astype(jnp.float32)


def _row_dot_kernel(idx_ref, g_ref, v_ref, o_ref):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    d = jnp.sum(g_ref[...] * v_ref[...].astype(jnp.float32), axis=1, keepdims=True)  # [1, 1]
    o_ref[...] = jnp.where(lax.broadcasted_iota(jnp.int32, o_ref.shape, 1) == j, d, o_ref[...])


def _scatter_rows_kernel(rows_ref, tok_ref, w_ref, g_ref, dv_in_ref, o_ref):
    e = pl.program_id(0)
    first = (e == 0) | (rows_ref[e] != rows_ref[jnp.maximum(e - 1, 0)])

    @pl.when(first)  # entries are sorted by row: a row's visits are consecutive grid steps
    def _():
        o_ref[...] = dv_in_ref[...]  # the aliased running sum (zeros, or earlier token chunks)

    o_ref[...] += w_ref[e] * g_ref[...]


def _scores_bwd_kernel(q1_ref, q2_ref, k1_ref, k2_ref, i1_ref, i2_ref, w_ref, dw_ref,
                       dq1_ref, dq2_ref, dk1_ref, dk2_ref, *, heads, sqrt_n, top_k, block_t):
    @pl.when(pl.program_id(0) == 0)
    def _():
        dk1_ref[...] = jnp.zeros_like(dk1_ref)
        dk2_ref[...] = jnp.zeros_like(dk2_ref)

    slot = lax.broadcasted_iota(jnp.int32, (block_t, top_k), 1)
    col = lax.broadcasted_iota(jnp.int32, (block_t, sqrt_n), 1)
    for h in range(heads):
        w, dw = w_ref[h], dw_ref[h]
        ds = w * (dw - jnp.sum(w * dw, axis=1, keepdims=True))  # softmax backward [block_t, k]
        i1, i2 = i1_ref[h], i2_ref[h]

        def scatter(k, acc, ds=ds, i1=i1, i2=i2):
            d1, d2 = acc
            hit = slot == k
            dk = jnp.sum(jnp.where(hit, ds, 0.0), axis=1, keepdims=True)  # [block_t, 1]
            c1 = jnp.sum(jnp.where(hit, i1, 0), axis=1, keepdims=True)
            c2 = jnp.sum(jnp.where(hit, i2, 0), axis=1, keepdims=True)
            return d1 + jnp.where(col == c1, dk, 0.0), d2 + jnp.where(col == c2, dk, 0.0)

        zero = jnp.zeros((block_t, sqrt_n), jnp.float32)
        d1, d2 = lax.fori_loop(0, top_k, scatter, (zero, zero))  # d s1, d s2 [block_t, sqrt_n]
        q1, q2 = q1_ref[h].astype(jnp.float32), q2_ref[h].astype(jnp.float32)
        k1, k2 = k1_ref[h].astype(jnp.float32), k2_ref[h].astype(jnp.float32)
        dq1_ref[h] = jnp.dot(d1, k1, precision=_HI, preferred_element_type=jnp.float32)
        dq2_ref[h] = jnp.dot(d2, k2, precision=_HI, preferred_element_type=jnp.float32)
        dk1_ref[h] += lax.dot_general(d1, q1, _TN, precision=_HI, preferred_element_type=jnp.float32)
        dk2_ref[h] += lax.dot_general(d2, q2, _TN, precision=_HI, preferred_element_type=jnp.float32)


# Entries (tokens·heads·k) per scalar-prefetch call: the prefetched arrays live in SMEM, which is small.
# A guess to tune on hardware; longer batches are split into token chunks.
MAX_PREFETCH_ENTRIES = 1 << 15


def _token_chunks(tp: int, m: int) -> list[tuple[int, int]]:
    step = max(1, MAX_PREFETCH_ENTRIES // m)
    return [(a, min(a + step, tp)) for a in range(0, tp, step)]


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _split_queries(q, tp):
    """[T, H, k_dim] -> two [H, Tp, k_dim/2] (head-major, tokens padded with zeros)."""
    half = q.shape[2] // 2
    qt = jnp.pad(q, [(0, tp - q.shape[0]), (0, 0), (0, 0)]).transpose(1, 0, 2)
    return qt[..., :half], qt[..., half:]


def _gather_call(kernel, name, n_scalars, d_v, tp, m, out_width, with_g, interpret):
    """Grid (tokens, heads·k); the values BlockSpec fetches row idx[t·m + j] of a [N, 1, d_v] table
    (idx is the first scalar-prefetch operand). With `with_g`, a [Tp, 1, d_v] input is blocked by token."""
    row = lambda t, j, idx, *_: (idx[t * m + j], 0, 0)
    tok = lambda t, j, *_: (t, 0, 0)
    in_specs = [pl.BlockSpec((None, 1, d_v), row)]
    if with_g:
        in_specs = [pl.BlockSpec((None, 1, d_v), tok)] + in_specs
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=n_scalars, grid=(tp, m), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, 1, out_width), tok)),
        out_shape=jax.ShapeDtypeStruct((tp, 1, out_width), jnp.float32),
        compiler_params=_params("parallel", "arbitrary"),
        interpret=interpret,
        name=name,
    )


def _forward(q, k1, k2, v, top_k, interpret, block_t):
    t, heads, k_dim = q.shape
    sqrt_n, half, (n, d_v) = k1.shape[1], k_dim // 2, v.shape
    tp = pl.cdiv(t, block_t) * block_t
    q1, q2 = _split_queries(q, tp)
    blk = lambda i: (0, i, 0)
    full = lambda i: (0, 0, 0)
    idx, w = pl.pallas_call(
        functools.partial(_select_kernel, heads=heads, sqrt_n=sqrt_n, top_k=top_k, block_t=block_t),
        grid=(tp // block_t,),
        in_specs=[pl.BlockSpec((heads, block_t, half), blk), pl.BlockSpec((heads, block_t, half), blk),
                  pl.BlockSpec((heads, sqrt_n, half), full), pl.BlockSpec((heads, sqrt_n, half), full)],
        out_specs=[pl.BlockSpec((heads, block_t, top_k), blk), pl.BlockSpec((heads, block_t, top_k), blk)],
        out_shape=(jax.ShapeDtypeStruct((heads, tp, top_k), jnp.int32),
                   jax.ShapeDtypeStruct((heads, tp, top_k), jnp.float32)),
        compiler_params=_params("parallel"),
        interpret=interpret,
        name="pkm_select_tpu",
    )(q1, q2, k1, k2)
    m = heads * top_k
    idx_flat = idx.transpose(1, 0, 2).reshape(-1)  # [Tp·H·k], token-major
    w_flat = w.transpose(1, 0, 2).reshape(-1)
    v3 = v.reshape(n, 1, d_v)
    out = jnp.concatenate([
        _gather_call(functools.partial(_bag_kernel, m=m), "pkm_bag_tpu", 2, d_v, b - a, m, d_v, False,
                     interpret)(idx_flat[a * m:b * m], w_flat[a * m:b * m], v3)
        for a, b in _token_chunks(tp, m)])
    return out.reshape(tp, d_v)[:t].astype(v.dtype), idx, w


def _backward(q, k1, k2, v, idx, w, g, gw, interpret, block_t):
    t, heads, k_dim = q.shape
    sqrt_n, half, (n, d_v) = k1.shape[1], k_dim // 2, v.shape
    _, tp, top_k = idx.shape
    m = heads * top_k
    g3 = jnp.pad(g.astype(jnp.float32), [(0, tp - t), (0, 0)]).reshape(tp, 1, d_v)
    idx_flat = idx.transpose(1, 0, 2).reshape(-1)
    w_flat = w.transpose(1, 0, 2).reshape(-1)
    v3 = v.reshape(n, 1, d_v)

    # 1. dw[t, m] = g[t]·V[idx[t, m]]
    dw = jnp.concatenate([
        _gather_call(_row_dot_kernel, "pkm_row_dot_tpu", 1, d_v, b - a, m, m, True, interpret)(
            idx_flat[a * m:b * m], g3[a:b], v3)
        for a, b in _token_chunks(tp, m)])
    dw = dw.reshape(tp, heads, top_k).transpose(1, 0, 2)
    gw_p = jnp.pad(gw.astype(jnp.float32), [(0, tp - t), (0, 0), (0, 0)]).transpose(1, 0, 2)

    # 2. softmax backward, dq, dK through the selected scores (dense over sqrt_n, not N)
    q1, q2 = _split_queries(q, tp)
    blk = lambda i: (0, i, 0)
    full = lambda i: (0, 0, 0)
    tok_spec = lambda width: pl.BlockSpec((heads, block_t, width), blk)
    key_spec = pl.BlockSpec((heads, sqrt_n, half), full)
    f32 = jnp.float32
    dq1, dq2, dk1, dk2 = pl.pallas_call(
        functools.partial(_scores_bwd_kernel, heads=heads, sqrt_n=sqrt_n, top_k=top_k, block_t=block_t),
        grid=(tp // block_t,),
        in_specs=[tok_spec(half), tok_spec(half), key_spec, key_spec] + [tok_spec(top_k)] * 4,
        out_specs=[tok_spec(half), tok_spec(half), key_spec, key_spec],
        out_shape=(jax.ShapeDtypeStruct((heads, tp, half), f32), jax.ShapeDtypeStruct((heads, tp, half), f32),
                   jax.ShapeDtypeStruct(k1.shape, f32), jax.ShapeDtypeStruct(k2.shape, f32)),
        compiler_params=_params("arbitrary"),  # dK accumulates across token blocks
        interpret=interpret,
        name="pkm_scores_bwd_tpu",
    )(q1, q2, k1, k2, idx // sqrt_n, idx % sqrt_n, w, dw + gw_p)
    dq = jnp.concatenate([dq1, dq2], axis=-1).transpose(1, 0, 2)[:t]

    # 3. dV: entries sorted by row, so each row's contributions are consecutive grid steps; token
    #    chunks (SMEM bound) are chained through the aliased running sum.
    dv = jnp.zeros((n, 1, d_v), f32)
    row_spec = pl.BlockSpec((None, 1, d_v), lambda e, r, tk, ws: (r[e], 0, 0))
    for a, b in _token_chunks(tp, m):
        order = jnp.argsort(idx_flat[a * m:b * m])
        rows_s = idx_flat[a * m:b * m][order]
        tok_s = (a + order // m).astype(jnp.int32)
        w_s = w_flat[a * m:b * m][order]
        dv = pl.pallas_call(
            _scatter_rows_kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3, grid=((b - a) * m,),
                in_specs=[pl.BlockSpec((None, 1, d_v), lambda e, r, tk, ws: (tk[e], 0, 0)), row_spec],
                out_specs=row_spec),
            out_shape=jax.ShapeDtypeStruct((n, 1, d_v), f32),
            input_output_aliases={4: 0},  # rows this chunk never selects keep their running sum
            compiler_params=_params("arbitrary"),
            interpret=interpret,
            name="pkm_scatter_rows_tpu",
        )(rows_s, tok_s, w_s, g3, dv)
    return dq, dk1, dk2, dv.reshape(n, d_v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lookup(q, k1, k2, v, top_k, interpret, block_t):
    return _lookup_fwd(q, k1, k2, v, top_k, interpret, block_t)[0]


def _lookup_fwd(q, k1, k2, v, top_k, interpret, block_t):
    t = q.shape[0]
    out, idx, w = _forward(q, k1, k2, v, top_k, interpret, block_t)
    primal = (out, idx.transpose(1, 0, 2)[:t], w.transpose(1, 0, 2)[:t])
    return primal, (q, k1, k2, v, idx, w)


def _lookup_bwd(top_k, interpret, block_t, res, cts):
    q, k1, k2, v, idx, w = res
    g_out, _, g_w = cts
    dq, dk1, dk2, dv = _backward(q, k1, k2, v, idx, w, g_out, g_w, interpret, block_t)
    return dq.astype(q.dtype), dk1.astype(k1.dtype), dk2.astype(k2.dtype), dv.astype(v.dtype)


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def pkm_lookup_tpu(
    queries: jax.Array,
    sub_keys1: jax.Array,
    sub_keys2: jax.Array,
    values: jax.Array,
    *,
    top_k: int,
    interpret: bool = False,
    block_t: int = 128,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mosaic TPU lookup. queries [T, H, k_dim], sub_keys [H, sqrt_n, k_dim//2], values [N, d_v]
    -> out [T, d_v] (values.dtype), indices [T, H, top_k] int32, weights [T, H, top_k] float32.
    `interpret=True` (or a `pltpu.InterpretParams`) runs the kernels with the Pallas interpreter."""
    if block_t % 8:
        raise NotImplementedError(f"tpu pkm_lookup: block_t={block_t} must be a multiple of 8")
    return _lookup(queries, sub_keys1, sub_keys2, values, top_k, interpret, block_t)
