"""TPU Pallas (Mosaic) kernels for DEEP Titans memory (depth L >= 2, bias-free MLP), inside jax.custom_vjp.

Titans (arXiv 2501.00663) §3.2 with the paper's default L_M >= 2 memory; the chunk algebra is
`xla._factored_chunk` (documented there and in triton_deep.py). Laid out the TPU way, as tpu.py:
- Grid (batch, chunk) with dimension semantics ("parallel", "arbitrary"): the chunk axis runs in order, the L
  weight matrices and L momenta live in VMEM scratch across it, and BlockSpecs bring one chunk of q/k/v and
  coefficients at a time (VMEM use does not grow with T).
- Forward: at chunk 0 load M0, S0 into scratch; every step applies `xla._factored_chunk` and (when
  differentiated) writes the chunk-start state to residual outputs [batch, T/b * d_in, d_out] per layer.
- Backward: the same grid with index maps that visit the chunks in reverse; the state cotangents live in
  scratch; each step applies `jax.vjp` of the chunk function, traced inside the kernel.
Block constraints: chunk_size and every memory width must be multiples of 8. Equal to the token loop in
interpret mode and lowered for TPU on CPU; never compiled or timed on a TPU, so api.py uses it only when asked
for (implementation='mosaic').
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_memory import xla
from pallas_kernels.chunked_memory.tpu import _params
from pallas_kernels.chunked_memory.triton_deep import N_COEF, _chunk_fn

Params = tuple[jax.Array, ...]
F32 = jnp.float32


def check_supported(q_shape, v_shape, dims: Sequence[int], chunk_size: int, interpret) -> None:
    """Raise NotImplementedError for what the deep Mosaic kernel does not cover. dims: [d_k, hidden.., d_v]."""
    if len(dims) < 3:
        raise NotImplementedError(f"mosaic deep chunked_memory: needs depth >= 2, got depth {len(dims) - 1}")
    if interpret:
        return
    if chunk_size % 8 or any(n % 8 for n in dims):
        raise NotImplementedError(f"mosaic deep chunked_memory: chunk_size and memory widths must be multiples "
                                  f"of 8, got {chunk_size}, {list(dims)}")


def _specs(b, nc, reverse: bool):
    """BlockSpecs by role: per-token [B, T, x] -> [b, x]; per-chunk scalar; per-sequence state; residual."""
    c_of = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    tok = lambda width: pl.BlockSpec((None, b, width), lambda i, c: (i, c_of(c), 0))
    scal = pl.BlockSpec((None, None, 1, 1), lambda i, c: (i, c_of(c), 0, 0))
    state = lambda din, dout: pl.BlockSpec((None, din, dout), lambda i, c: (i, 0, 0))
    res = lambda din, dout: pl.BlockSpec((None, din, dout), lambda i, c: (i, c_of(c), 0))
    return tok, scal, state, res


def _coef_specs(tok, scal, d, dv, b):
    """Specs of q, k, v, G, H, C, CW, CS, g, h, e."""
    return [tok(d), tok(d), tok(dv), tok(1), tok(1), tok(b), tok(1), tok(1), scal, scal, scal]


# ------------------------------------------------------------------------------------------- kernels
def _init_scratch(scratch, sources):
    """At the first grid step along the chunk axis, copy each source block into its scratch (float32)."""
    @pl.when(pl.program_id(1) == 0)
    def _init():
        for dst, src in zip(scratch, sources, strict=True):
            dst[...] = src[...].astype(F32)


def _fwd_kernel(*refs, L: int, activation: str, clip: float, save: bool):
    """Refs: 11 chunk inputs, M0 x L, S0 x L | y, Mf x L, Sf x L[, residuals 2L] | scratch M x L, S x L."""
    ins, rest = refs[:N_COEF + 2 * L], refs[N_COEF + 2 * L:]
    M0, S0 = ins[N_COEF:N_COEF + L], ins[N_COEF + L:]
    n_out = 1 + 2 * L + (2 * L if save else 0)
    outs, (M_scr, S_scr) = rest[:n_out], (rest[n_out:n_out + L], rest[n_out + L:])
    y_ref, Mf, Sf = outs[0], outs[1:1 + L], outs[1 + L:1 + 2 * L]

    _init_scratch(M_scr + S_scr, M0 + S0)

    Ms = tuple(r[...] for r in M_scr)
    Ss = tuple(r[...] for r in S_scr)
    if save:
        for l in range(L):
            outs[1 + 2 * L + l][...] = Ms[l]
            outs[1 + 3 * L + l][...] = Ss[l]
    y, Ms, Ss = _chunk_fn(activation, clip)(Ms, Ss, *(r[...].astype(F32) for r in ins[:N_COEF]))
    y_ref[...] = y.astype(y_ref.dtype)
    for l in range(L):
        M_scr[l][...] = Ms[l]
        S_scr[l][...] = Ss[l]
        # constant block index over chunks: written every step, flushed after the last
        Mf[l][...] = Ms[l]
        Sf[l][...] = Ss[l]


def _bwd_kernel(*refs, L: int, activation: str, clip: float):
    """Refs: 11 chunk inputs, M residuals x L, S residuals x L, dy, dMf x L, dSf x L | d of the 11 inputs,
    dM0 x L, dS0 x L | scratch dM x L, dS x L. program_id(1) == 0 is the LAST chunk."""
    n_in = N_COEF + 4 * L + 1
    ins, outs, scr = refs[:n_in], refs[n_in:n_in + N_COEF + 2 * L], refs[n_in + N_COEF + 2 * L:]
    Ms_res, Ss_res = ins[N_COEF:N_COEF + L], ins[N_COEF + L:N_COEF + 2 * L]
    dy_ref = ins[N_COEF + 2 * L]
    dMf, dSf = ins[N_COEF + 2 * L + 1:N_COEF + 3 * L + 1], ins[N_COEF + 3 * L + 1:]
    dM_scr, dS_scr = scr[:L], scr[L:]

    _init_scratch(dM_scr + dS_scr, dMf + dSf)

    Ms = tuple(r[...] for r in Ms_res)
    Ss = tuple(r[...] for r in Ss_res)
    _, vjp = jax.vjp(_chunk_fn(activation, clip), Ms, Ss, *(r[...].astype(F32) for r in ins[:N_COEF]))
    dMs, dSs, *d_in = vjp((dy_ref[...].astype(F32), tuple(r[...] for r in dM_scr), tuple(r[...] for r in dS_scr)))
    for ref, val in zip(outs[:N_COEF], d_in):
        ref[...] = val.astype(ref.dtype)
    for l in range(L):
        dM_scr[l][...] = dMs[l]
        dS_scr[l][...] = dSs[l]
        outs[N_COEF + l][...] = dMs[l]
        outs[N_COEF + L + l][...] = dSs[l]


# ------------------------------------------------------------------------------------------ wrappers
def _call(kernel, grid, M0, in_specs, out_shape, out_specs, which: str, interpret):
    """pallas_call over grid (batch, chunk) with 2L float32 VMEM scratch matrices shaped like the memory."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(w.shape[1:], F32) for w in M0] * 2,
        compiler_params=_params(),
        interpret=interpret,
        name=f"titans_deep_chunked_memory_{which}",
    )


def _forward(coef_args, M0, S0, *, b, activation, clip, interpret, save):
    q, v = coef_args[0], coef_args[2]
    B, T, d = q.shape
    dv, nc, L = v.shape[-1], T // b, len(M0)
    tok, scal, state, res = _specs(b, nc, reverse=False)
    st = [state(w.shape[1], w.shape[2]) for w in M0]
    in_specs = _coef_specs(tok, scal, d, dv, b) + st + st
    states = [jax.ShapeDtypeStruct(w.shape, F32) for w in M0]
    out_shape = [jax.ShapeDtypeStruct((B, T, dv), q.dtype)] + states + states
    out_specs = [tok(dv)] + st + st
    if save:
        out_shape += [jax.ShapeDtypeStruct((B, nc * w.shape[1], w.shape[2]), F32) for w in M0] * 2
        out_specs += [res(w.shape[1], w.shape[2]) for w in M0] * 2
    outs = _call(functools.partial(_fwd_kernel, L=L, activation=activation, clip=clip, save=save), (B, nc), M0,
                 in_specs, out_shape, out_specs, "fwd", interpret)(*coef_args, *M0, *S0)
    y, Mf, Sf = outs[0], tuple(outs[1:1 + L]), tuple(outs[1 + L:1 + 2 * L])
    if not save:
        return y, Mf, Sf
    return y, Mf, Sf, tuple(outs[1 + 2 * L:1 + 3 * L]), tuple(outs[1 + 3 * L:])


def _backward(coef_args, M0, S0, Ms, Ss, dy, dMf, dSf, *, b, activation, clip, interpret):
    q, v = coef_args[0], coef_args[2]
    B, T, d = q.shape
    dv, nc, L = v.shape[-1], T // b, len(M0)
    tok, scal, state, res = _specs(b, nc, reverse=True)
    st = [state(w.shape[1], w.shape[2]) for w in M0]
    rs = [res(w.shape[1], w.shape[2]) for w in M0]
    in_specs = _coef_specs(tok, scal, d, dv, b) + rs + rs + [tok(dv)] + st + st
    out_specs = _coef_specs(tok, scal, d, dv, b) + st + st
    states = [jax.ShapeDtypeStruct(w.shape, F32) for w in M0]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in coef_args] + states + states
    kernel = functools.partial(_bwd_kernel, L=L, activation=activation, clip=clip)
    outs = _call(kernel, (B, nc), M0, in_specs, out_shape, out_specs, "bwd", interpret)(
        *coef_args, *Ms, *Ss, dy, *(x.astype(F32) for x in dMf), *(x.astype(F32) for x in dSf))
    dM0 = tuple(x.astype(w.dtype) for x, w in zip(outs[N_COEF:N_COEF + L], M0))
    dS0 = tuple(x.astype(w.dtype) for x, w in zip(outs[N_COEF + L:], S0))
    return tuple(outs[:N_COEF]), dM0, dS0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def deep_core_mosaic(coef_args, M0, S0, b, activation, clip, interpret):
    """coef_args = (q, k, v, G, H, C, CW, CS, g, h, e) with g, h, e [B, T/b, 1, 1]; M0, S0 tuples of
    [B, d_in, d_out]. Returns y [B, T, d_v], final M, final S (tuples)."""
    return _forward(coef_args, M0, S0, b=b, activation=activation, clip=clip, interpret=interpret, save=False)


def _core_fwd(coef_args, M0, S0, b, activation, clip, interpret):
    y, Mf, Sf, Ms, Ss = _forward(coef_args, M0, S0, b=b, activation=activation, clip=clip, interpret=interpret,
                                 save=True)
    return (y, Mf, Sf), (coef_args, M0, S0, Ms, Ss)


def _core_bwd(b, activation, clip, interpret, res, cts):
    coef_args, M0, S0, Ms, Ss = res
    dy, dMf, dSf = cts
    return _backward(coef_args, M0, S0, Ms, Ss, dy, dMf, dSf, b=b, activation=activation, clip=clip,
                     interpret=interpret)


deep_core_mosaic.defvjp(_core_fwd, _core_bwd)


def chunked_memory_mosaic_deep(
    q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, eta: jax.Array, alpha: jax.Array,
    init_params: Sequence[jax.Array], momentum0: Sequence[jax.Array], *, chunk_size: int,
    retrieve_after_update: bool = False, activation: str = "silu", interpret=False, grad_clip: float = 0.0,
) -> tuple[jax.Array, Params, Params]:
    """Deep Titans memory with the Mosaic TPU kernels. Shapes and grad_clip as xla.chunked_memory_xla; depth >= 2.
    interpret: False, True (HLO interpreter) or a pltpu.InterpretParams() (TPU simulator on CPU)."""
    dims = [init_params[0].shape[1]] + [w.shape[2] for w in init_params]
    check_supported(q.shape, v.shape, dims, chunk_size, interpret)
    coef_args, M0, S0 = xla.kernel_inputs(q, k, v, theta, eta, alpha, init_params, momentum0, chunk_size,
                                          retrieve_after_update)
    return deep_core_mosaic(coef_args, M0, S0, chunk_size, activation, float(grad_clip), interpret)
