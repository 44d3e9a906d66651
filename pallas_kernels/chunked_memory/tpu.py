"""TPU Pallas (Mosaic) kernels for linear Titans memory (depth 1), inside jax.custom_vjp.

Titans (arXiv 2501.00663) §3.2, eq. 16-18; the chunk algebra is documented in xla.py. Same split of work
as triton.py (XLA computes the scalar chunk coefficients; the kernels do the d-dimensional matmuls), but
laid out the TPU way:
- Grid (batch, chunk) with dimension semantics ("parallel", "arbitrary"): TPU runs the grid in order, so
  the chunk axis is sequential and W, S live in VMEM scratch across it; BlockSpecs pipeline one chunk of
  q/k/v/coefficients at a time (HBM -> VMEM), so VMEM use does not grow with T.
- Forward: at chunk 0 load W0, S0 into scratch; every step applies `xla.linear_chunk_forward` and (when
  differentiated) writes the chunk-start W, S to a residual output [batch, T/b * d_k, d_v].
- Backward (a real Pallas kernel): the same grid, with index maps that visit chunks in reverse; dW, dS
  of the chunk-end state live in scratch; each step applies the hand-written `xla.linear_chunk_backward`.
Block constraints: chunk_size and d_k must be multiples of 8 (second-minor block dims); per-chunk
scalars use [batch, T/b, 1, 1] arrays so their blocks equal the full trailing dims. Lowering is tested
on CPU; the kernels have not been compiled or timed on a TPU.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_memory import xla

Params = tuple[jax.Array, ...]
F32 = jnp.float32


def check_supported(q_shape, v_shape, depth: int, chunk_size: int, interpret) -> None:
    """Raise NotImplementedError for what the Mosaic kernel does not cover."""
    if depth != 1:
        raise NotImplementedError(f"mosaic chunked_memory: only linear memory (depth 1), got depth {depth} "
                                  "(deep memory: tpu_deep.py)")
    if interpret:
        return
    d = q_shape[-1]
    if chunk_size % 8 or d % 8:
        raise NotImplementedError(f"mosaic chunked_memory: chunk_size and d_k must be multiples of 8, "
                                  f"got {chunk_size}, {d}")


def _fwd_kernel(q_ref, k_ref, v_ref, G_ref, H_ref, C_ref, CW_ref, CS_ref, g_ref, h_ref, e_ref, W0_ref,
                S0_ref, y_ref, Wf_ref, Sf_ref, *rest, save: bool, clip: float):
    """One (sequence, chunk) step. Blocks: q [b, d_k], C [b, b], G [b, 1], g [1, 1], W0 [d_k, d_v]."""
    if save:
        Ws_ref, Ss_ref, W_scr, S_scr = rest
    else:
        W_scr, S_scr = rest

    @pl.when(pl.program_id(1) == 0)
    def _init():
        W_scr[...] = W0_ref[...].astype(F32)
        S_scr[...] = S0_ref[...].astype(F32)

    W, S = W_scr[...], S_scr[...]
    if save:
        Ws_ref[...] = W
        Ss_ref[...] = S
    ld = lambda r: r[...].astype(F32)
    y, W, S = xla.linear_chunk_forward(
        W, S, ld(q_ref), ld(k_ref), ld(v_ref), ld(G_ref), ld(H_ref), ld(C_ref), ld(CW_ref), ld(CS_ref),
        ld(g_ref), ld(h_ref), ld(e_ref), clip=clip)
    y_ref[...] = y.astype(y_ref.dtype)
    W_scr[...] = W
    S_scr[...] = S
    # The final-state block index is constant over chunks: written every step, flushed after the last.
    Wf_ref[...] = W
    Sf_ref[...] = S


def _bwd_kernel(q_ref, k_ref, v_ref, G_ref, H_ref, C_ref, CW_ref, CS_ref, g_ref, h_ref, e_ref, Ws_ref,
                Ss_ref, dy_ref, dWf_ref, dSf_ref,
                dq_ref, dk_ref, dv_ref, dG_ref, dH_ref, dC_ref, dCW_ref, dCS_ref, dg_ref, dh_ref, de_ref,
                dW0_ref, dS0_ref, dW_scr, dS_scr, *, clip: float):
    """One (sequence, chunk) step of the reverse sweep; program_id(1) == 0 is the LAST chunk."""

    @pl.when(pl.program_id(1) == 0)
    def _init():
        dW_scr[...] = dWf_ref[...].astype(F32)
        dS_scr[...] = dSf_ref[...].astype(F32)

    ld = lambda r: r[...].astype(F32)
    (dW, dS, dq, dk, dv, dG, dH, dC, dCW, dCS, dg, dh, de) = xla.linear_chunk_backward(
        ld(Ws_ref), ld(Ss_ref), ld(q_ref), ld(k_ref), ld(v_ref), ld(G_ref), ld(H_ref), ld(C_ref),
        ld(CW_ref), ld(CS_ref), ld(g_ref), ld(h_ref), ld(e_ref), ld(dy_ref), dW_scr[...], dS_scr[...], clip=clip)
    for ref, val in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dG_ref, dG), (dH_ref, dH), (dC_ref, dC),
                     (dCW_ref, dCW), (dCS_ref, dCS), (dg_ref, dg), (dh_ref, dh), (de_ref, de)):
        ref[...] = val.astype(ref.dtype)
    dW_scr[...] = dW
    dS_scr[...] = dS
    dW0_ref[...] = dW
    dS0_ref[...] = dS


def _specs(b, d, nc, reverse: bool):
    """BlockSpecs by role: per-token [B, T, x] -> [b, x]; per-chunk scalar; per-sequence state; residual."""
    c_of = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    tok = lambda width: pl.BlockSpec((None, b, width), lambda i, c: (i, c_of(c), 0))
    scal = pl.BlockSpec((None, None, 1, 1), lambda i, c: (i, c_of(c), 0, 0))
    state = lambda dv: pl.BlockSpec((None, d, dv), lambda i, c: (i, 0, 0))
    res = lambda dv: pl.BlockSpec((None, d, dv), lambda i, c: (i, c_of(c), 0))
    return tok, scal, state, res


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _forward(args, *, b, interpret, save, clip):
    q, k, v, G, H, C, CW, CS, g, h, e, W0, S0 = args
    B, T, d = q.shape
    dv = v.shape[-1]
    nc = T // b
    tok, scal, state, res = _specs(b, d, nc, reverse=False)
    in_specs = [tok(d), tok(d), tok(dv), tok(1), tok(1), tok(b), tok(1), tok(1), scal, scal, scal,
                state(dv), state(dv)]
    st = jax.ShapeDtypeStruct((B, d, dv), F32)
    out_shape = [jax.ShapeDtypeStruct((B, T, dv), q.dtype), st, st]
    out_specs = [tok(dv), state(dv), state(dv)]
    if save:
        out_shape += [jax.ShapeDtypeStruct((B, nc * d, dv), F32)] * 2
        out_specs += [res(dv), res(dv)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, save=save, clip=clip),
        out_shape=out_shape,
        grid=(B, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((d, dv), F32), pltpu.VMEM((d, dv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="titans_chunked_memory_fwd",
    )(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0)


def _backward(args, Ws, Ss, dy, dWf, dSf, *, b, interpret, clip):
    q, k, v, G, H, C, CW, CS, g, h, e, W0, S0 = args
    B, T, d = q.shape
    dv = v.shape[-1]
    nc = T // b
    tok, scal, state, res = _specs(b, d, nc, reverse=True)
    in_specs = [tok(d), tok(d), tok(dv), tok(1), tok(1), tok(b), tok(1), tok(1), scal, scal, scal,
                res(dv), res(dv), tok(dv), state(dv), state(dv)]
    out_specs = [tok(d), tok(d), tok(dv), tok(1), tok(1), tok(b), tok(1), tok(1), scal, scal, scal,
                 state(dv), state(dv)]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, G, H, C, CW, CS, g, h, e)]
    out_shape += [jax.ShapeDtypeStruct((B, d, dv), F32)] * 2
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, clip=clip),
        out_shape=out_shape,
        grid=(B, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((d, dv), F32), pltpu.VMEM((d, dv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="titans_chunked_memory_bwd",
    )(q, k, v, G, H, C, CW, CS, g, h, e, Ws, Ss, dy, dWf.astype(F32), dSf.astype(F32))
    *rest, dW0, dS0 = outs
    return (*rest, dW0.astype(W0.dtype), dS0.astype(S0.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(13, 14, 15))
def linear_core_mosaic(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0, b, interpret, clip=0.0):
    """Same contract as xla.linear_core (shapes there), computed by the Mosaic TPU kernels."""
    y, Wf, Sf = _forward((q, k, v, G, H, C, CW, CS, g, h, e, W0, S0), b=b, interpret=interpret, save=False,
                         clip=clip)
    return y, Wf, Sf


def _core_fwd(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0, b, interpret, clip):
    args = (q, k, v, G, H, C, CW, CS, g, h, e, W0, S0)
    y, Wf, Sf, Ws, Ss = _forward(args, b=b, interpret=interpret, save=True, clip=clip)
    return (y, Wf, Sf), (args, Ws, Ss)


def _core_bwd(b, interpret, clip, res, cts):
    args, Ws, Ss = res
    dy, dWf, dSf = cts
    return _backward(args, Ws, Ss, dy, dWf, dSf, b=b, interpret=interpret, clip=clip)


linear_core_mosaic.defvjp(_core_fwd, _core_bwd)


def chunked_memory_mosaic(
    q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, eta: jax.Array, alpha: jax.Array,
    init_params: Sequence[jax.Array], momentum0: Sequence[jax.Array], *, chunk_size: int,
    retrieve_after_update: bool = False, activation: str = "silu", interpret=False, grad_clip: float = 0.0,
) -> tuple[jax.Array, Params, Params]:
    """Linear Titans memory with the Mosaic TPU kernels. Shapes and grad_clip as xla.chunked_memory_xla; depth 1.

    interpret: False, True (HLO interpreter) or a pltpu.InterpretParams() (TPU simulator on CPU).
    """
    del activation  # linear memory has no activation
    check_supported(q.shape, v.shape, len(init_params), chunk_size, interpret)
    coef_args, (W0,), (S0,) = xla.kernel_inputs(q, k, v, theta, eta, alpha, init_params, momentum0, chunk_size,
                                                retrieve_after_update)
    y, W, S = linear_core_mosaic(*coef_args, W0, S0, chunk_size, interpret, float(grad_clip))
    return y, (W,), (S,)
