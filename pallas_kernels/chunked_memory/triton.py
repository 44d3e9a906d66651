"""GPU Pallas (Triton) kernels for linear Titans memory (depth 1), inside jax.custom_vjp.

Titans (arXiv 2501.00663) §3.2, eq. 16-18; the chunk algebra is documented in xla.py.

Split of work:
- XLA computes the scalar chunk coefficients from theta/eta/alpha (recurrences on [T, b+2] basis vectors,
  `xla.chunk_coefficients`: associative scans on GPU, one sequential scan in interpret mode on CPU); their
  gradients come from XLA autodiff of that function.
- Forward kernel, grid (batch, v_blocks): one program per sequence and block of d_v / v_blocks value columns
  keeps its columns of W and S [d_k, d_v / v_blocks] in registers and loops over chunks (fori_loop), doing the
  matmul work of each chunk (E = 2(KW - V), Y = G QW + H QS + (C o QK^T) E, W' = gW + hS + K^T(CW E),
  S' = eS + K^T(CS E)). Linear memory is separable over value columns (column c of E, Y, W', S' reads only
  column c of W, S, V), so the blocks are independent; more blocks = less state per program (registers) and
  more programs. Inner gradient clipping couples the columns (||E_j|| is over all of them): v_blocks = 1 then.
  When differentiated it also stores every chunk-start W, S as residuals ([T/b * d_k, d_v] each).
- Backward kernel (a real Pallas kernel, not autodiff of XLA): same grid, loops over chunks in reverse, reads
  the saved chunk-start states and applies the hand-written chunk VJP (`xla.linear_chunk_backward`), carrying
  dW, dS backwards. Cotangents of v, W0, S0 are per column block; those of q, k and the coefficients are sums
  over the columns, so each block writes its partial sum ([v_blocks, ...]) and XLA adds them.

Compiler params are Triton's (`pallas.triton.CompilerParams(num_warps=...)`): the default cuda backend of
Pallas in jax 0.10 is Mosaic GPU, which does not lower these kernels. Real GPUs need every dimension a
power of 2 and chunk_size, d_k, d_v >= 16 (tl.dot); other shapes raise NotImplementedError (api.py then
falls back to XLA). `interpret=True` runs the same kernels on CPU for tests.
Measured on an H200 (jax 0.11.2, 2026-11-26, `scripts/gpu_check.py`; BENCHMARKS.md "GPU (H200)"): output,
final state and gradients within 3.5e-4 / 4.5e-4 relative of the float32 token loop at precision 'highest'
(the XLA path: the same, both at TF32 matmul precision); at 4096-8192 tokens, d 64, chunk 64: 24-30x
faster than the sequential token loop and 1.3-2.0x faster than the XLA chunked path. Chunks of 64 at d 128
overflow Triton's shared memory (session 11): api.py runs XLA for shapes outside MEASURED_FIT.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunked_memory import xla

Params = tuple[jax.Array, ...]
F32 = jnp.float32


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def check_supported(q_shape, v_shape, depth: int, chunk_size: int, interpret: bool, v_blocks: int = 1,
                    grad_clip: float = 0.0) -> None:
    """Raise NotImplementedError for what the Triton kernel does not cover."""
    if depth != 1:
        raise NotImplementedError(f"triton chunked_memory: only linear memory (depth 1), got depth {depth} "
                                  "(deep memory: triton_deep.py)")
    B, T, d = q_shape
    dv = v_shape[-1]
    if v_blocks < 1 or dv % v_blocks:
        raise NotImplementedError(f"triton chunked_memory: v_blocks={v_blocks} does not divide d_v={dv}")
    if v_blocks > 1 and grad_clip:
        raise NotImplementedError("triton chunked_memory: inner gradient clipping needs v_blocks=1 (the gradient "
                                  "norm couples all value columns)")
    if interpret:
        return
    dv //= v_blocks  # the kernel's blocks
    if not all(_pow2(n) for n in (T, d, dv, chunk_size)):
        raise NotImplementedError(f"triton chunked_memory: T, d_k, d_v, chunk_size must be powers of 2, "
                                  f"got {(T, d, dv, chunk_size)}")
    if min(d, dv, chunk_size) < 16:
        raise NotImplementedError("triton chunked_memory: d_k, d_v / v_blocks, chunk_size must be >= 16 (tl.dot)")


# Per-program shapes (chunk_size, d_k, d_v / v_blocks) that compiled and ran on an H200 (Triton of jax 0.11.2,
# default num_warps, 2026-11-26): chunks of 64 at d 64 and chunks of 32 at d 128 (and all smaller shapes).
# Chunks of 64 at d 128 asked Triton for 262,144 bytes of shared memory, over the 232,448 available
# (BENCHMARKS.md "GPU (H200)", session 11), and the failure only shows when XLA runs the compiled kernel.
MEASURED_FIT = ((64, 64, 64), (32, 128, 128))


def check_measured_fit(q_shape, v_shape, chunk_size: int, v_blocks: int = 1) -> None:
    """Raise NotImplementedError unless one program's shape is within one that ran on a GPU (MEASURED_FIT).

    api.py calls this before choosing the compiled kernel, so a shape Triton may not fit in shared memory runs
    on XLA (with a log line) instead of failing at run time; calling chunked_memory_triton directly skips it
    (scripts/gpu_check.py uses that to measure new shapes)."""
    shape = (chunk_size, q_shape[-1], v_shape[-1] // v_blocks)
    if not any(all(n <= m for n, m in zip(shape, fit)) for fit in MEASURED_FIT):
        raise NotImplementedError(f"triton chunked_memory: (chunk_size, d_k, d_v / v_blocks) = {shape} is larger "
                                  f"than every shape measured to fit a GPU's shared memory {MEASURED_FIT}")


# ------------------------------------------------------------------------------------------- kernels
def _fwd_kernel(q_ref, k_ref, v_ref, G_ref, H_ref, C_ref, CW_ref, CS_ref, g_ref, h_ref, e_ref, W0_ref,
                S0_ref, y_ref, Wf_ref, Sf_ref, *res_refs, b: int, nc: int, d: int, clip: float):
    """Per sequence: q_ref [T, d_k] ... C_ref [T, b], g_ref [nc, 1]; optional residuals [nc*d_k, d_v]."""

    def body(c, carry):
        W, S = carry
        tok = pl.ds(c * b, b)
        if res_refs:
            res_refs[0][pl.ds(c * d, d), :] = W
            res_refs[1][pl.ds(c * d, d), :] = S
        ld = lambda r: r[tok, :].astype(F32)
        one = pl.ds(c, 1)
        y, W, S = xla.linear_chunk_forward(
            W, S, ld(q_ref), ld(k_ref), ld(v_ref), ld(G_ref), ld(H_ref), ld(C_ref), ld(CW_ref),
            ld(CS_ref), g_ref[one, :], h_ref[one, :], e_ref[one, :], clip=clip)
        y_ref[tok, :] = y.astype(y_ref.dtype)
        return W, S

    W, S = lax.fori_loop(0, nc, body, (W0_ref[...].astype(F32), S0_ref[...].astype(F32)))
    Wf_ref[...] = W
    Sf_ref[...] = S


def _bwd_kernel(q_ref, k_ref, v_ref, G_ref, H_ref, C_ref, CW_ref, CS_ref, g_ref, h_ref, e_ref, Ws_ref,
                Ss_ref, dy_ref, dWf_ref, dSf_ref,
                dq_ref, dk_ref, dv_ref, dG_ref, dH_ref, dC_ref, dCW_ref, dCS_ref, dg_ref, dh_ref, de_ref,
                dW0_ref, dS0_ref, *, b: int, nc: int, d: int, clip: float):
    """Reverse loop over chunks; carries dW, dS [d_k, d_v] of the chunk-end state."""

    def body(i, carry):
        dW1, dS1 = carry
        c = nc - 1 - i
        tok = pl.ds(c * b, b)
        one = pl.ds(c, 1)
        ld = lambda r: r[tok, :].astype(F32)
        W = Ws_ref[pl.ds(c * d, d), :]
        S = Ss_ref[pl.ds(c * d, d), :]
        (dW, dS, dq, dk, dv, dG, dH, dC, dCW, dCS, dg, dh, de) = xla.linear_chunk_backward(
            W, S, ld(q_ref), ld(k_ref), ld(v_ref), ld(G_ref), ld(H_ref), ld(C_ref), ld(CW_ref),
            ld(CS_ref), g_ref[one, :], h_ref[one, :], e_ref[one, :], ld(dy_ref), dW1, dS1, clip=clip)
        for ref, val in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dG_ref, dG), (dH_ref, dH),
                         (dC_ref, dC), (dCW_ref, dCW), (dCS_ref, dCS)):
            ref[tok, :] = val.astype(ref.dtype)
        dg_ref[one, :] = dg
        dh_ref[one, :] = dh
        de_ref[one, :] = de
        return dW, dS

    dW, dS = lax.fori_loop(0, nc, body, (dWf_ref[...].astype(F32), dSf_ref[...].astype(F32)))
    dW0_ref[...] = dW
    dS0_ref[...] = dS


# ------------------------------------------------------------------------------------------ wrappers
def _spec(shape):
    """Whole-sequence block for batch element i (grid (batch,) or (batch, v_blocks)): leading batch dim squeezed."""
    return pl.BlockSpec((None,) + tuple(shape[1:]), lambda i, *_: (i,) + (0,) * (len(shape) - 1))


def _cols(shape, v_blocks: int):
    """[B, rows, d_v] -> block j of d_v / v_blocks columns of batch element i."""
    return pl.BlockSpec((None, shape[1], shape[2] // v_blocks), lambda i, j: (i, 0, j))


def _input_specs(coef_args, v_blocks: int) -> list:
    """Specs of (q, k, v, G, H, C, CW, CS, g, h, e): whole sequences, v by column block."""
    return [_cols(x.shape, v_blocks) if i == 2 else _spec(x.shape) for i, x in enumerate(coef_args)]


def _partial(shape):
    """[v_blocks, B, ...] partial sums -> the block of (i, j), both leading dims squeezed."""
    return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda i, j: (j, i) + (0,) * (len(shape) - 2))


def _params(num_warps: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _forward(args, *, b, interpret, num_warps, save, clip, v_blocks):
    q, k, v, G, H, C, CW, CS, g, h, e, W0, S0 = args
    B, T, d = q.shape
    dv = v.shape[-1]
    nc = T // b
    g, h, e = (x.reshape(B, nc, 1) for x in (g, h, e))
    state = jax.ShapeDtypeStruct((B, d, dv), F32)
    out_shape = [jax.ShapeDtypeStruct((B, T, dv), q.dtype), state, state]
    if save:
        out_shape += [jax.ShapeDtypeStruct((B, nc * d, dv), F32)] * 2
    ins = (q, k, v, G, H, C, CW, CS, g, h, e, W0, S0)
    cols = lambda x: _cols(x.shape, v_blocks)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, b=b, nc=nc, d=d, clip=clip),
        out_shape=out_shape,
        grid=(B, v_blocks),
        in_specs=_input_specs(ins[:11], v_blocks) + [cols(W0), cols(S0)],
        out_specs=[cols(s) for s in out_shape],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="titans_chunked_memory_fwd",
    )(*ins)
    return outs


def _backward(args, Ws, Ss, dy, dWf, dSf, *, b, interpret, num_warps, clip, v_blocks):
    q, k, v, G, H, C, CW, CS, g, h, e, W0, S0 = args
    B, T, d = q.shape
    nc = T // b
    g3, h3, e3 = (x.reshape(B, nc, 1) for x in (g, h, e))
    ins = (q, k, v, G, H, C, CW, CS, g3, h3, e3, Ws, Ss, dy, dWf.astype(F32), dSf.astype(F32))
    cols = lambda x: _cols(x.shape, v_blocks)
    # partial sums over the column blocks for everything but v, W0, S0 (float32: they are added up below)
    part = lambda x: jax.ShapeDtypeStruct((v_blocks,) + x.shape, F32)
    out_shape = [part(q), part(k), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_shape += [part(x) for x in (G, H, C, CW, CS, g3, h3, e3)]
    out_shape += [jax.ShapeDtypeStruct(W0.shape, F32), jax.ShapeDtypeStruct(S0.shape, F32)]
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, b=b, nc=nc, d=d, clip=clip),
        out_shape=out_shape,
        grid=(B, v_blocks),
        in_specs=_input_specs(ins[:11], v_blocks) + [cols(x) for x in ins[11:]],
        out_specs=[_partial(s.shape) for s in out_shape[:2]] + [cols(v)]
        + [_partial(s.shape) for s in out_shape[3:11]] + [cols(W0), cols(S0)],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="titans_chunked_memory_bwd",
    )(*ins)
    dq, dk, dv, dG, dH, dC, dCW, dCS, dg, dh, de, dW0, dS0 = outs
    total = lambda x, like: jnp.sum(x, axis=0).astype(like.dtype)
    dq, dk = total(dq, q), total(dk, k)
    dG, dH, dC, dCW, dCS = (total(x, like) for x, like in zip((dG, dH, dC, dCW, dCS), (G, H, C, CW, CS)))
    dg, dh, de = (total(x, like).reshape(B, nc, 1, 1) for x, like in zip((dg, dh, de), (g, h, e)))
    return (dq, dk, dv, dG, dH, dC, dCW, dCS, dg, dh, de, dW0.astype(W0.dtype), dS0.astype(S0.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(13, 14, 15, 16, 17))
def linear_core_triton(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0, b, interpret, num_warps, clip=0.0, v_blocks=1):
    """Same contract as xla.linear_core (shapes there), computed by the Triton kernels."""
    args = (q, k, v, G, H, C, CW, CS, g, h, e, W0, S0)
    y, Wf, Sf = _forward(args, b=b, interpret=interpret, num_warps=num_warps, save=False, clip=clip,
                         v_blocks=v_blocks)
    return y, Wf, Sf


def _core_fwd(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0, b, interpret, num_warps, clip, v_blocks):
    args = (q, k, v, G, H, C, CW, CS, g, h, e, W0, S0)
    y, Wf, Sf, Ws, Ss = _forward(args, b=b, interpret=interpret, num_warps=num_warps, save=True, clip=clip,
                                 v_blocks=v_blocks)
    return (y, Wf, Sf), (args, Ws, Ss)


def _core_bwd(b, interpret, num_warps, clip, v_blocks, res, cts):
    args, Ws, Ss = res
    dy, dWf, dSf = cts
    return _backward(args, Ws, Ss, dy, dWf, dSf, b=b, interpret=interpret, num_warps=num_warps, clip=clip,
                     v_blocks=v_blocks)


linear_core_triton.defvjp(_core_fwd, _core_bwd)


def chunked_memory_triton(
    q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, eta: jax.Array, alpha: jax.Array,
    init_params: Sequence[jax.Array], momentum0: Sequence[jax.Array], *, chunk_size: int,
    retrieve_after_update: bool = False, activation: str = "silu", interpret: bool = False,
    num_warps: int = 4, grad_clip: float = 0.0, v_blocks: int = 1,
) -> tuple[jax.Array, Params, Params]:
    """Linear Titans memory with the Triton kernels. Shapes and grad_clip as xla.chunked_memory_xla; depth 1.
    v_blocks: programs per sequence, each owning d_v / v_blocks value columns of the state (1 = the whole state;
    needs grad_clip = 0 when > 1)."""
    del activation  # linear memory has no activation
    check_supported(q.shape, v.shape, len(init_params), chunk_size, interpret, v_blocks, grad_clip)
    coef_args, (W0,), (S0,) = xla.kernel_inputs(q, k, v, theta, eta, alpha, init_params, momentum0, chunk_size,
                                                retrieve_after_update)
    y, W, S = linear_core_triton(*coef_args, W0, S0, chunk_size, interpret, num_warps, float(grad_clip), v_blocks)
    return y, (W,), (S,)
