"""GPU Pallas (Triton) kernels for DEEP Titans memory (depth L >= 2, bias-free MLP), inside jax.custom_vjp.

Titans (arXiv 2501.00663) §3.2 with the paper's default L_M >= 2 memory. The chunk algebra is
`xla._factored_chunk`: inside a chunk every token's gradient is taken at the chunk-start weights, and each
layer's per-token gradient is an outer product a_i^T delta_i, so the weights token j reads,
    M_j = G_j M0 + H_j S0 + sum_i C_ji a_i^T delta_i        (every layer),
are never materialised: the retrieval is z = G (x W0) + H (x S0) + (C o x A^T) Delta, layer by layer.

Layout as in triton.py: grid (batch,), one program per sequence holds the L weight matrices and L momenta
and loops over the chunks (fori_loop), so a whole sequence is one kernel launch instead of one XLA while-loop
iteration (tens of small kernels) per chunk.
- Forward kernel: per chunk, `xla._factored_chunk` (keys through the MLP at the chunk-start weights, their
  deltas, the retrieval, the chunk-end state). When differentiated it also writes every chunk-start state as
  residuals ([T/b * d_in, d_out] per layer).
- Backward kernel: the chunks in reverse; per chunk, `jax.vjp` of the same function, traced inside the kernel,
  so the second-order terms (how the deltas move with the weights) come from JAX's own rules rather than a
  hand derivation; the state cotangents are carried backwards.

Scalar chunk coefficients (G, H, C, CW, CS, g, h, e) come from `xla.coefficients_batched`, outside the kernels,
and get their gradients from XLA autodiff, as for the linear kernel.
Real GPUs need every dimension a power of 2 and >= 16 (tl.dot).
Measured on an H200 (jax 0.11.2, 2026-11-26, session 11; BENCHMARKS.md "GPU (H200)"): at d 64 -> 128 -> 64,
chunks of 16, output / state / gradients within 4.3e-4 / 5.2e-4 / 5.4e-4 of the float64 token loop (XLA: the
same to two digits); 128 sequences x 512 tokens: forward 0.64 ms at 8 warps vs 2.82 ms for XLA (4.4x), but
forward + backward 7.58 vs 8.36 ms (1.10x; 0.84x at 4 warps): the backward kernel (jax.vjp of the chunk traced
inside it) gains little. Larger shapes overflow Triton's shared memory (MEASURED_FIT below), including MAG's
tiny config at d_model 512 (d 128 -> 256 -> 128). So api.py's automatic choice keeps XLA for deep memory;
`implementation='triton'` (config `model.titans.implementation: triton`) selects this kernel for shapes
within MEASURED_FIT, and `scripts/gpu_check.py` checks and times both.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.chunked_memory import xla
from pallas_kernels.chunked_memory.triton import _params, _pow2, _spec

Params = tuple[jax.Array, ...]
F32 = jnp.float32
N_COEF = 11  # q, k, v, G, H, C, CW, CS, g, h, e


def check_supported(q_shape, v_shape, dims: Sequence[int], chunk_size: int, interpret: bool) -> None:
    """Raise NotImplementedError for what the deep Triton kernel does not cover. dims: [d_k, hidden.., d_v]."""
    if len(dims) < 3:
        raise NotImplementedError(f"triton deep chunked_memory: needs depth >= 2, got depth {len(dims) - 1}")
    if interpret:
        return
    T = q_shape[1]
    if not all(_pow2(n) for n in (T, chunk_size, *dims)):
        raise NotImplementedError(f"triton deep chunked_memory: T, chunk_size and the memory widths must be "
                                  f"powers of 2, got T={T}, chunk_size={chunk_size}, widths={list(dims)}")
    if min(chunk_size, *dims) < 16:
        raise NotImplementedError("triton deep chunked_memory: chunk_size and memory widths must be >= 16 (tl.dot)")


# Per-program shapes (chunk_size, widest input/output width, widest hidden width, depth) that compiled and ran on
# an H200 (Triton of jax 0.11.2, 2026-11-26): chunks of 16 with d 64 -> 128 -> 64. Chunks of 64 at those widths,
# and chunks of 16 at d 128 -> 256 -> 128 (MAG's tiny config at d_model 512), asked Triton for 270,336 bytes of
# shared memory, over the 232,448 available (BENCHMARKS.md "GPU (H200)", session 11).
MEASURED_FIT = ((16, 64, 128, 2),)


def check_measured_fit(dims: Sequence[int], chunk_size: int) -> None:
    """Raise NotImplementedError unless the shape is within one that ran on a GPU (MEASURED_FIT); api.py then
    runs XLA. dims: [d_k, hidden.., d_v]. Direct calls of chunked_memory_triton_deep skip this check."""
    shape = (chunk_size, max(dims[0], dims[-1]), max(dims[1:-1]), len(dims) - 1)
    if not any(all(n <= m for n, m in zip(shape, fit)) for fit in MEASURED_FIT):
        raise NotImplementedError(f"triton deep chunked_memory: (chunk_size, max(d_k, d_v), hidden, depth) = {shape} "
                                  f"is larger than every shape measured to fit a GPU's shared memory {MEASURED_FIT}")


def _chunk_fn(activation, clip):
    def f(Ms, Ss, q, k, v, G, H, C, CW, CS, g, h, e):
        return xla._factored_chunk(Ms, Ss, q, k, v, G, H, C, CW, CS, g, h, e, activation, clip)
    return f


def _load(refs, c, b):
    """This chunk's blocks of q, k, v, G, H, C, CW, CS ([b, .]) and g, h, e ([1, 1]), as float32."""
    tok, one = pl.ds(c * b, b), pl.ds(c, 1)
    per_token = tuple(r[tok, :].astype(F32) for r in refs[:8])
    return per_token + tuple(r[one, :] for r in refs[8:11])


# ------------------------------------------------------------------------------------------- kernels
def _loop_over_chunks(nc: int, body, init_refs, out_refs):
    """fori_loop(0, nc, body) over a carry of two tuples (the L weights-like and the L momentum-like
    matrices), started from init_refs (2L refs, read as float32) and written to out_refs (2L refs)."""
    L = len(init_refs) // 2
    init = tuple(r[...].astype(F32) for r in init_refs)
    first, second = lax.fori_loop(0, nc, body, (init[:L], init[L:]))
    for ref, val in zip(out_refs, first + second, strict=True):
        ref[...] = val


def _fwd_kernel(*refs, L: int, b: int, nc: int, dims: tuple[int, ...], activation: str, clip: float, save: bool):
    """Refs: 11 per-sequence inputs, M0 x L, S0 x L | y, Mf x L, Sf x L[, M residuals x L, S residuals x L]."""
    ins, outs = refs[:N_COEF + 2 * L], refs[N_COEF + 2 * L:]
    M0_refs, S0_refs = ins[N_COEF:N_COEF + L], ins[N_COEF + L:]
    y_ref, Mf_refs, Sf_refs = outs[0], outs[1:1 + L], outs[1 + L:1 + 2 * L]
    Ms_res, Ss_res = (outs[1 + 2 * L:1 + 3 * L], outs[1 + 3 * L:]) if save else ((), ())
    chunk = _chunk_fn(activation, clip)

    def body(c, carry):
        Ms, Ss = carry
        for l in range(L):
            if save:
                Ms_res[l][pl.ds(c * dims[l], dims[l]), :] = Ms[l]
                Ss_res[l][pl.ds(c * dims[l], dims[l]), :] = Ss[l]
        y, Ms, Ss = chunk(Ms, Ss, *_load(ins, c, b))
        y_ref[pl.ds(c * b, b), :] = y.astype(y_ref.dtype)
        return tuple(Ms), tuple(Ss)

    _loop_over_chunks(nc, body, M0_refs + S0_refs, Mf_refs + Sf_refs)


def _bwd_kernel(*refs, L: int, b: int, nc: int, dims: tuple[int, ...], activation: str, clip: float):
    """Refs: 11 inputs, M residuals x L, S residuals x L, dy, dMf x L, dSf x L | d of the 11 inputs,
    dM0 x L, dS0 x L. Reverse loop over chunks carrying the cotangents of the chunk-end state."""
    n_in = N_COEF + 2 * L + 1 + 2 * L
    ins, outs = refs[:n_in], refs[n_in:]
    Ms_res, Ss_res = ins[N_COEF:N_COEF + L], ins[N_COEF + L:N_COEF + 2 * L]
    dy_ref = ins[N_COEF + 2 * L]
    dMf_refs, dSf_refs = ins[N_COEF + 2 * L + 1:N_COEF + 3 * L + 1], ins[N_COEF + 3 * L + 1:]
    d_in_refs, dM0_refs, dS0_refs = outs[:N_COEF], outs[N_COEF:N_COEF + L], outs[N_COEF + L:]
    chunk = _chunk_fn(activation, clip)

    def body(i, carry):
        dM1, dS1 = carry
        c = nc - 1 - i
        Ms = tuple(Ms_res[l][pl.ds(c * dims[l], dims[l]), :] for l in range(L))
        Ss = tuple(Ss_res[l][pl.ds(c * dims[l], dims[l]), :] for l in range(L))
        _, vjp = jax.vjp(chunk, Ms, Ss, *_load(ins, c, b))
        dMs, dSs, *d_in = vjp((dy_ref[pl.ds(c * b, b), :].astype(F32), dM1, dS1))
        tok, one = pl.ds(c * b, b), pl.ds(c, 1)
        for ref, val in zip(d_in_refs[:8], d_in[:8]):
            ref[tok, :] = val.astype(ref.dtype)
        for ref, val in zip(d_in_refs[8:], d_in[8:]):
            ref[one, :] = val
        return tuple(dMs), tuple(dSs)

    _loop_over_chunks(nc, body, dMf_refs + dSf_refs, dM0_refs + dS0_refs)


# ------------------------------------------------------------------------------------------ wrappers
def _inputs(coef_args, b):
    """Per-token arrays as they are; g, h, e [B, nc, 1, 1] -> [B, nc, 1] (one row per chunk)."""
    q, k, v, G, H, C, CW, CS, g, h, e = coef_args
    B, nc = q.shape[0], q.shape[1] // b
    return (q, k, v, G, H, C, CW, CS) + tuple(x.reshape(B, nc, 1) for x in (g, h, e))


def _geometry(coef_args, M0, b):
    """(batch, T, chunks, depth, memory widths [d_k, hidden.., d_v])."""
    B, T, _ = coef_args[0].shape
    return B, T, T // b, len(M0), tuple(w.shape[1] for w in M0) + (M0[-1].shape[2],)


def _call(kernel, ins, out_shape, which: str, interpret, num_warps):
    """pallas_call over grid (batch,), whole-sequence blocks."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(ins[0].shape[0],),
        in_specs=[_spec(x.shape) for x in ins],
        out_specs=[_spec(s.shape) for s in out_shape],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name=f"titans_deep_chunked_memory_{which}",
    )(*ins)


def _forward(coef_args, M0, S0, *, b, activation, clip, interpret, num_warps, save):
    q = coef_args[0]
    B, T, nc, L, dims = _geometry(coef_args, M0, b)
    ins = _inputs(coef_args, b) + tuple(M0) + tuple(S0)
    states = [jax.ShapeDtypeStruct(w.shape, F32) for w in M0]
    out_shape = [jax.ShapeDtypeStruct((B, T, dims[-1]), q.dtype)] + states + states
    if save:
        res = [jax.ShapeDtypeStruct((B, nc * w.shape[1], w.shape[2]), F32) for w in M0]
        out_shape += res + res
    kernel = functools.partial(_fwd_kernel, L=L, b=b, nc=nc, dims=dims, activation=activation, clip=clip, save=save)
    outs = _call(kernel, ins, out_shape, "fwd", interpret, num_warps)
    y, Mf, Sf = outs[0], tuple(outs[1:1 + L]), tuple(outs[1 + L:1 + 2 * L])
    if not save:
        return y, Mf, Sf
    return y, Mf, Sf, tuple(outs[1 + 2 * L:1 + 3 * L]), tuple(outs[1 + 3 * L:])


def _backward(coef_args, M0, S0, Ms, Ss, dy, dMf, dSf, *, b, activation, clip, interpret, num_warps):
    B, T, nc, L, dims = _geometry(coef_args, M0, b)
    ins = (_inputs(coef_args, b) + tuple(Ms) + tuple(Ss) + (dy,)
           + tuple(x.astype(F32) for x in dMf) + tuple(x.astype(F32) for x in dSf))
    per_input = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(coef_args, b)]
    states = [jax.ShapeDtypeStruct(w.shape, F32) for w in M0]
    out_shape = per_input + states + states
    kernel = functools.partial(_bwd_kernel, L=L, b=b, nc=nc, dims=dims, activation=activation, clip=clip)
    outs = _call(kernel, ins, out_shape, "bwd", interpret, num_warps)
    d_in = list(outs[:N_COEF])
    d_in[8:11] = [x.reshape(B, nc, 1, 1) for x in d_in[8:11]]
    dM0 = tuple(x.astype(w.dtype) for x, w in zip(outs[N_COEF:N_COEF + L], M0))
    dS0 = tuple(x.astype(w.dtype) for x, w in zip(outs[N_COEF + L:], S0))
    return tuple(d_in), dM0, dS0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def deep_core_triton(coef_args, M0, S0, b, activation, clip, interpret, num_warps):
    """coef_args = (q, k, v, G, H, C, CW, CS, g, h, e) as xla.linear_core takes them; M0, S0: tuples of
    [B, d_in, d_out]. Returns y [B, T, d_v], final M, final S (tuples)."""
    return _forward(coef_args, M0, S0, b=b, activation=activation, clip=clip, interpret=interpret, num_warps=num_warps,
                    save=False)


def _core_fwd(coef_args, M0, S0, b, activation, clip, interpret, num_warps):
    y, Mf, Sf, Ms, Ss = _forward(coef_args, M0, S0, b=b, activation=activation, clip=clip, interpret=interpret,
                                 num_warps=num_warps, save=True)
    return (y, Mf, Sf), (coef_args, M0, S0, Ms, Ss)


def _core_bwd(b, activation, clip, interpret, num_warps, res, cts):
    coef_args, M0, S0, Ms, Ss = res
    dy, dMf, dSf = cts
    return _backward(coef_args, M0, S0, Ms, Ss, dy, dMf, dSf, b=b, activation=activation, clip=clip,
                     interpret=interpret, num_warps=num_warps)


deep_core_triton.defvjp(_core_fwd, _core_bwd)


def chunked_memory_triton_deep(
    q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, eta: jax.Array, alpha: jax.Array,
    init_params: Sequence[jax.Array], momentum0: Sequence[jax.Array], *, chunk_size: int,
    retrieve_after_update: bool = False, activation: str = "silu", interpret: bool = False,
    num_warps: int = 4, grad_clip: float = 0.0,
) -> tuple[jax.Array, Params, Params]:
    """Deep Titans memory with the Triton kernels. Shapes and grad_clip as xla.chunked_memory_xla; depth >= 2."""
    dims = [init_params[0].shape[1]] + [w.shape[2] for w in init_params]
    check_supported(q.shape, v.shape, dims, chunk_size, interpret)
    coef_args, M0, S0 = xla.kernel_inputs(q, k, v, theta, eta, alpha, init_params, momentum0, chunk_size,
                                          retrieve_after_update)
    return deep_core_triton(coef_args, M0, S0, chunk_size, activation, float(grad_clip), interpret, num_warps)
