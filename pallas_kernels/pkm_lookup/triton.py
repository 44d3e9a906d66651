"""Pallas Triton (GPU) product-key lookup: one fused forward kernel, one fused backward kernel.

Memory Layers at Scale (arXiv 2412.09764, §3); product keys (Lample et al. 2019, §3.2). Same op as
reference.py. Both kernels are wrapped in `jax.custom_vjp` (pallas_call is not differentiable,
stack-notes P5) and pass `pltriton.CompilerParams`: the default cuda lowering in jax 0.10 is Mosaic GPU,
which this kernel is not written for (stack-notes §3).

What is fused (grid = token blocks of `block_t` tokens, heads unrolled inside a program):
- forward, one pallas_call: sub-key scores q1·K1ᵀ, q2·K2ᵀ (tl.dot over `block_s`-row chunks of the
  sub-key table), top-k of each half, the k² candidate sums, their exact top-k, the float32 softmax, and
  the weighted gather-sum of value rows (a [block_t, d_v] row gather per selected slot), summed over heads.
  No score array larger than [block_t, block_s], [block_t, kp, 2] or [block_t, kp, kp] exists.
- backward, one pallas_call: dw = g·V[idx] (re-gathered rows), the softmax backward, dq (gathered
  sub-key rows), and scatter-adds into dV, dK1, dK2 with `pltriton.atomic_add`, one row per (token, slot):
  float atomics, so the summation order (and the last bits) of dV/dK is not deterministic. The
  `reverse_indices` (sort, no atomics) backward of the paper's kernels is not implemented.

Top-k inside the kernel is k iterations of (row max, lowest index attaining it, mask it out): O(k·width)
per row, fine for the paper's k = 32, not for large k. Ties go to the lower index, as `lax.top_k`. The
sub-key top-k is a running merge: each chunk of `block_s` = kp scores is joined with the current top-kp
and re-selected, so the sub-key table is never held whole.

Triton needs power-of-two tensors: the per-row top-k state is padded to kp = max(next_pow2(k), 16) (the
tl.dot minimum); sqrt_n, k_dim/2 and d_v must be powers of two >= 16 and sqrt_n a multiple of kp (else
NotImplementedError, and the api falls back to XLA; interpret mode has the same limits). Tokens are
padded to a multiple of `block_t`. Status: tested on CPU in interpret mode (forward and gradients against
reference.py) and lowered for cuda. On an H200 (jax 0.11.2, 2026-11-26, `scripts/gpu_check.py`) it is
correct (same top-k slots as the reference on every token, output and gradients within 3e-7 relative) but
SLOWER than xla.py: 0.56-0.65x of its speed forward and 0.39-0.52x forward+backward at 8192 tokens, 4 heads,
top-32, N = 262k-1M, bf16 (the [block_t, kp, kp] candidate tile and num_warps=4 are untuned). So api.py's
automatic choice on GPU is XLA; this kernel runs only when asked for (implementation='triton').
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_HI = lax.Precision.HIGHEST
_BIG = jnp.iinfo(jnp.int32).max


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _layout(top_k: int, sqrt_n: int) -> tuple[int, int]:
    """(kp, block_s): padded top-k width and sub-key chunk rows (equal, so a chunk and the running
    top-k join into [R, kp, 2]: Triton has no general concatenate)."""
    kp = max(_next_pow2(top_k), 16)
    if sqrt_n % kp:
        raise NotImplementedError(f"triton pkm_lookup: sqrt_n={sqrt_n} must be a multiple of kp={kp}")
    return kp, kp


def check_supported(k_dim: int, sqrt_n: int, d_v: int, top_k: int) -> None:
    """Raise NotImplementedError for shapes the compiled Triton kernel cannot take."""
    half = k_dim // 2
    for name, val in (("sqrt_n", sqrt_n), ("k_dim/2", half), ("d_v", d_v)):
        if not _is_pow2(val) or val < 16:
            raise NotImplementedError(f"triton pkm_lookup: {name}={val} must be a power of two >= 16")
    _layout(top_k, sqrt_n)


def _select(vals, ids, top_k: int, kp: int):
    """Top-k per leading row by k rounds of (max, lowest index attaining it, mask it out).

    vals f32 / ids i32 [R, ...] -> ([R, kp] f32, [R, kp] i32), sorted descending; slots >= top_k stay
    (-inf, 0). Ties go to the lower id, as `lax.top_k`. Ids must be unique among finite values.
    """
    rows = vals.shape[0]
    axes = tuple(range(1, vals.ndim))
    bcast = (slice(None),) + (None,) * len(axes)
    col = lax.broadcasted_iota(jnp.int32, (rows, kp), 1)

    def step(s, carry):
        vals, out_v, out_i = carry
        m = jnp.max(vals, axis=axes)
        sel = jnp.min(jnp.where(vals == m[bcast], ids, _BIG), axis=axes)
        vals = jnp.where(ids == sel[bcast], -jnp.inf, vals)
        out_v = jnp.where(col == s, m[:, None], out_v)
        out_i = jnp.where(col == s, sel[:, None], out_i)
        return vals, out_v, out_i

    init = (vals, jnp.full((rows, kp), -jnp.inf, jnp.float32), jnp.zeros((rows, kp), jnp.int32))
    _, out_v, out_i = lax.fori_loop(0, top_k, step, init)
    return out_v, out_i


def _sub_top_k(q, k_ref, h: int, sqrt_n: int, top_k: int, kp: int, block_s: int):
    """Running top-k of q·K[h]ᵀ over chunks of block_s sub-keys. q [R, half] -> [R, kp] x2."""
    rows = q.shape[0]

    def chunk(c, carry):
        top_v, top_i = carry
        kc = k_ref[h, pl.ds(c * block_s, block_s), :].astype(jnp.float32)  # [block_s, half]
        s = lax.dot_general(q, kc, (((1,), (1,)), ((), ())), precision=_HI,
                            preferred_element_type=jnp.float32)  # [R, block_s]
        si = c * block_s + lax.broadcasted_iota(jnp.int32, (rows, block_s), 1)
        # merge: the running top-kp and this chunk, joined on a new minor axis -> [R, kp, 2]
        return _select(jnp.stack([top_v, s], axis=-1), jnp.stack([top_i, si], axis=-1), top_k, kp)

    init = (jnp.full((rows, kp), -jnp.inf, jnp.float32), jnp.zeros((rows, kp), jnp.int32))
    return lax.fori_loop(0, sqrt_n // block_s, chunk, init)


def _candidate_top_k(v1, i1, v2, i2, sqrt_n: int, top_k: int, kp: int):
    """Exact top-k of the kp x kp candidate sums (padding is -inf). -> scores, product index [R, kp]."""
    cand = v1[:, :, None] + v2[:, None, :]  # [R, kp, kp]
    pid = i1[:, :, None] * sqrt_n + i2[:, None, :]  # unique among the finite (real) candidates
    return _select(cand, pid, top_k, kp)


def _fwd_kernel(q_ref, k1_ref, k2_ref, v_ref, out_ref, idx_ref, w_ref, *,
                heads, half, sqrt_n, top_k, kp, block_t, block_s):
    rows = pl.ds(pl.program_id(0) * block_t, block_t)
    d_v = v_ref.shape[1]
    col = lax.broadcasted_iota(jnp.int32, (block_t, kp), 1)
    acc = jnp.zeros((block_t, d_v), jnp.float32)
    for h in range(heads):  # heads are few (4): unrolled
        q1 = q_ref[rows, h, pl.ds(0, half)].astype(jnp.float32)
        q2 = q_ref[rows, h, pl.ds(half, half)].astype(jnp.float32)
        v1, i1 = _sub_top_k(q1, k1_ref, h, sqrt_n, top_k, kp, block_s)
        v2, i2 = _sub_top_k(q2, k2_ref, h, sqrt_n, top_k, kp, block_s)
        scores, idx = _candidate_top_k(v1, i1, v2, i2, sqrt_n, top_k, kp)
        e = jnp.where(col < top_k, jnp.exp(scores - jnp.max(scores, axis=1)[:, None]), 0.0)
        w = e / jnp.sum(e, axis=1)[:, None]  # float32 softmax over the k slots of this head
        idx_ref[rows, h, :] = idx
        w_ref[rows, h, :] = w

        def bag(kk, acc, idx=idx, w=w):
            hit = col == kk
            row_id = jnp.sum(jnp.where(hit, idx, 0), axis=1)  # [block_t]
            wk = jnp.sum(jnp.where(hit, w, 0.0), axis=1)
            vals = v_ref[row_id, :].astype(jnp.float32)  # row gather [block_t, d_v]
            return acc + wk[:, None] * vals

        acc = lax.fori_loop(0, top_k, bag, acc)
    out_ref[rows, :] = acc.astype(out_ref.dtype)


def _bwd_kernel(q_ref, k1_ref, k2_ref, v_ref, idx_ref, w_ref, g_ref, gw_ref,
                _dk1_in, _dk2_in, _dv_in, dq_ref, dk1_ref, dk2_ref, dv_ref, *,
                heads, half, sqrt_n, top_k, kp, block_t):
    t0 = pl.program_id(0) * block_t
    rows = pl.ds(t0, block_t)
    d_v = v_ref.shape[1]
    row_i = lax.broadcasted_iota(jnp.int32, (block_t, kp), 0)
    col = lax.broadcasted_iota(jnp.int32, (block_t, kp), 1)
    lane = lax.iota(jnp.int32, kp)
    for h in range(heads):
        w = w_ref[rows, h, :]

        # dw[t, s] = g[t]·V[idx[t, s]], and dV[idx[t, s]] += w[t, s]·g[t] (one atomic row each).
        def tok(t, dw, h=h):
            g_t = g_ref[t0 + t, pl.ds(0, d_v)].astype(jnp.float32)

            def slot(s, dw):
                r = idx_ref[t0 + t, h, s]
                v_r = v_ref[r, pl.ds(0, d_v)].astype(jnp.float32)
                pltriton.atomic_add(dv_ref, (r, pl.ds(0, d_v)), w_ref[t0 + t, h, s] * g_t)
                return jnp.where((row_i == t) & (col == s), jnp.sum(g_t * v_r), dw)

            return lax.fori_loop(0, top_k, slot, dw)

        dw = lax.fori_loop(0, block_t, tok, jnp.zeros((block_t, kp), jnp.float32))
        dw = dw + gw_ref[rows, h, :]
        ds = w * (dw - jnp.sum(w * dw, axis=1)[:, None])  # softmax backward; padded slots have w = 0

        # ds flows to s(i, j) = q1·K1[h, i] + q2·K2[h, j] of the selected products only.
        def tok2(t, carry, h=h, ds=ds):
            q1 = q_ref[t0 + t, h, pl.ds(0, half)].astype(jnp.float32)
            q2 = q_ref[t0 + t, h, pl.ds(half, half)].astype(jnp.float32)
            ds_t = jnp.sum(jnp.where(row_i == t, ds, 0.0), axis=0)  # [kp]

            def slot(s, acc):
                a1, a2 = acc
                r = idx_ref[t0 + t, h, s]
                i, j = r // sqrt_n, r % sqrt_n
                d = jnp.sum(jnp.where(lane == s, ds_t, 0.0))
                hh = jnp.int32(h)  # the atomic's interpreter rule wants array-typed scalar indices
                pltriton.atomic_add(dk1_ref, (hh, i, pl.ds(0, half)), d * q1)
                pltriton.atomic_add(dk2_ref, (hh, j, pl.ds(0, half)), d * q2)
                a1 = a1 + d * k1_ref[h, i, pl.ds(0, half)].astype(jnp.float32)
                a2 = a2 + d * k2_ref[h, j, pl.ds(0, half)].astype(jnp.float32)
                return a1, a2

            zero = jnp.zeros((half,), jnp.float32)
            a1, a2 = lax.fori_loop(0, top_k, slot, (zero, zero))
            dq_ref[t0 + t, h, pl.ds(0, half)] = a1
            dq_ref[t0 + t, h, pl.ds(half, half)] = a2
            return carry

        lax.fori_loop(0, block_t, tok2, 0)


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _pad_tokens(x, tp):
    return jnp.pad(x, [(0, tp - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _forward(q, k1, k2, v, top_k, interpret, block_t):
    t, heads, k_dim = q.shape
    sqrt_n, half, d_v = k1.shape[1], k_dim // 2, v.shape[1]
    if not interpret:
        check_supported(k_dim, sqrt_n, d_v, top_k)
    kp, block_s = _layout(top_k, sqrt_n)
    tp = pl.cdiv(t, block_t) * block_t
    kern = functools.partial(_fwd_kernel, heads=heads, half=half, sqrt_n=sqrt_n, top_k=top_k, kp=kp,
                             block_t=block_t, block_s=block_s)
    out, idx, w = pl.pallas_call(
        kern,
        out_shape=(jax.ShapeDtypeStruct((tp, d_v), v.dtype),
                   jax.ShapeDtypeStruct((tp, heads, kp), jnp.int32),
                   jax.ShapeDtypeStruct((tp, heads, kp), jnp.float32)),
        grid=(tp // block_t,),
        interpret=interpret,
        compiler_params=_params(),
        name="pkm_lookup_fwd_triton",
    )(_pad_tokens(q, tp), k1, k2, v)
    return out, idx, w


def _backward(q, k1, k2, v, idx, w, g, gw, top_k, interpret, block_t):
    tp, heads, kp = idx.shape
    k_dim, sqrt_n, half = q.shape[2], k1.shape[1], q.shape[2] // 2
    kern = functools.partial(_bwd_kernel, heads=heads, half=half, sqrt_n=sqrt_n, top_k=top_k, kp=kp,
                             block_t=block_t)
    f32 = jnp.float32
    zeros = (jnp.zeros(k1.shape, f32), jnp.zeros(k2.shape, f32), jnp.zeros(v.shape, f32))
    dq, dk1, dk2, dv = pl.pallas_call(
        kern,
        out_shape=(jax.ShapeDtypeStruct((tp, heads, k_dim), f32),
                   jax.ShapeDtypeStruct(k1.shape, f32),
                   jax.ShapeDtypeStruct(k2.shape, f32),
                   jax.ShapeDtypeStruct(v.shape, f32)),
        grid=(tp // block_t,),
        input_output_aliases={8: 1, 9: 2, 10: 3},  # zero-initialised atomic accumulators
        interpret=interpret,
        compiler_params=_params(),
        name="pkm_lookup_bwd_triton",
    )(_pad_tokens(q, tp), k1, k2, v, idx, w, g, gw, *zeros)
    return dq, dk1, dk2, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lookup(q, k1, k2, v, top_k, interpret, block_t):
    return _lookup_fwd(q, k1, k2, v, top_k, interpret, block_t)[0]


def _lookup_fwd(q, k1, k2, v, top_k, interpret, block_t):
    t = q.shape[0]
    out, idx, w = _forward(q, k1, k2, v, top_k, interpret, block_t)
    primal = (out[:t], idx[:t, :, :top_k], w[:t, :, :top_k])
    return primal, (q, k1, k2, v, idx, w)


def _lookup_bwd(top_k, interpret, block_t, res, cts):
    q, k1, k2, v, idx, w = res
    g_out, _, g_w = cts
    tp, _, kp = idx.shape
    t = q.shape[0]
    g = _pad_tokens(g_out.astype(jnp.float32), tp)
    gw = jnp.pad(g_w.astype(jnp.float32), [(0, tp - t), (0, 0), (0, kp - top_k)])
    dq, dk1, dk2, dv = _backward(q, k1, k2, v, idx, w, g, gw, top_k, interpret, block_t)
    return (dq[:t].astype(q.dtype), dk1.astype(k1.dtype), dk2.astype(k2.dtype), dv.astype(v.dtype))


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def pkm_lookup_triton(
    queries: jax.Array,
    sub_keys1: jax.Array,
    sub_keys2: jax.Array,
    values: jax.Array,
    *,
    top_k: int,
    interpret: bool = False,
    block_t: int = 16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fused Triton lookup. queries [T, H, k_dim], sub_keys [H, sqrt_n, k_dim//2], values [N, d_v]
    -> out [T, d_v] (values.dtype), indices [T, H, top_k] int32, weights [T, H, top_k] float32.
    `interpret=True` runs the kernels with the Pallas interpreter (any backend)."""
    return _lookup(queries, sub_keys1, sub_keys2, values, top_k, interpret, block_t)
