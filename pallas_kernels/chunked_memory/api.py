"""Public entry point for Titans chunked memory: validation and dispatch (a small tokamax-style api).

Titans neural long-term memory (arXiv 2501.00663 §3.1-3.2): per sequence,
    S_t = eta_t S_{t-1} - theta_t grad ||M_{t'}(k_t) - v_t||^2,   M_t = (1 - alpha_t) M_{t-1} + S_t,
with gradients inside a chunk of `chunk_size` tokens taken at the chunk-start weights M_{t'}
(t' = t - t mod chunk_size; chunk_size=1 is the fully sequential rule) and the retrieval
    y_t = M_t(q_t)      if retrieve_after_update
    y_t = M_{t-1}(q_t)  otherwise (default: read before writing token t, as memlm's MAG and MAL do; MAC's
                        output gate reads M_t(y_t) after the update, so it passes retrieve_after_update=True).
M is a bias-free MLP (depth 1: M(x) = x W; deeper: SiLU or GELU between layers), one per sequence.

Dispatch: implementation=None picks the Pallas kernel of `jax.default_backend()` (gpu -> 'triton',
tpu -> 'mosaic'), otherwise 'xla'. A Pallas path that cannot run (CPU without interpret, unsupported shapes)
falls back to 'xla' with one log line; on a GPU that includes shapes larger than the ones measured to fit
Triton's shared memory (`check_measured_fit` of triton.py / triton_deep.py: a Triton kernel over the limit
fails only at run time, after dispatch). Deep memory (depth >= 2): the kernels of triton_deep.py / tpu_deep.py run
only when asked for (implementation='triton' / 'mosaic'); the automatic choice stays 'xla' (on an H200 the
deep Triton kernel's forward + backward was only 1.10x XLA's where it fit, and it does not fit MAG's d 128
memory; BENCHMARKS.md "GPU (H200)", session 11; the Mosaic one is not measured on a TPU).
'reference' is the token loop (tests only).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from memlm.errors import UserError
from pallas_kernels.chunked_memory import reference, tpu, tpu_deep, triton, triton_deep, xla

logger = logging.getLogger(__name__)

Params = tuple[jax.Array, ...]
IMPLEMENTATIONS = (None, "xla", "triton", "mosaic", "reference")
_WHERE = "chunked_memory"


def _validate(q, k, v, theta, eta, alpha, params, momentum, chunk_size, activation, implementation, grad_clip,
              unroll):
    """UserError (one line, naming the argument) for anything the implementations would mis-handle."""
    if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 1:
        raise UserError(f"{_WHERE}.unroll: {unroll!r} must be an integer >= 1")
    if not isinstance(grad_clip, (int, float)) or not grad_clip >= 0:  # also rejects NaN
        raise UserError(f"{_WHERE}.grad_clip: {grad_clip!r} must be a number >= 0 (0 = no clipping)")
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"{_WHERE}.implementation: {implementation!r} is not one of {IMPLEMENTATIONS}")
    if activation not in ("silu", "gelu"):
        raise UserError(f"{_WHERE}.activation: {activation!r} is not 'silu' or 'gelu'")
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise UserError(f"{_WHERE}: q, k must be [batch, T, d_k] and v [batch, T, d_v], "
                        f"got {q.shape}, {k.shape}, {v.shape}")
    B, T, d = q.shape
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != (B, T):
            raise UserError(f"{_WHERE}.{name}: expected shape {(B, T)} [batch, T], got {g.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1 or T % chunk_size:
        raise UserError(f"{_WHERE}.chunk_size: {chunk_size!r} must be a positive integer dividing T={T}")
    if not params:
        raise UserError(f"{_WHERE}.init_params: needs at least one weight matrix (memory depth >= 1)")
    d_in = d
    for i, w in enumerate(params):
        if w.ndim != 3 or w.shape[0] != B or w.shape[1] != d_in:
            raise UserError(f"{_WHERE}.init_params[{i}]: expected [batch={B}, {d_in}, d_out], got {w.shape}")
        d_in = w.shape[2]
    if d_in != v.shape[2]:
        raise UserError(f"{_WHERE}.init_params[-1]: output dim {d_in} != d_v={v.shape[2]}")
    if momentum is not None:
        if len(momentum) != len(params) or any(m.shape != p.shape for m, p in zip(momentum, params)):
            raise UserError(f"{_WHERE}.momentum0: shapes {[m.shape for m in momentum]} do not match "
                            f"init_params {[p.shape for p in params]}")


# (implementation, deep memory) -> (module with check_supported, entry point)
_KERNELS = {
    ("triton", False): (triton, triton.chunked_memory_triton),
    ("mosaic", False): (tpu, tpu.chunked_memory_mosaic),
    ("triton", True): (triton_deep, triton_deep.chunked_memory_triton_deep),
    ("mosaic", True): (tpu_deep, tpu_deep.chunked_memory_mosaic_deep),
}


def _pallas_for_backend(backend: str) -> str | None:
    return {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}.get(backend)


def chunked_memory(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,
    eta: jax.Array,
    alpha: jax.Array,
    init_params: Sequence[jax.Array],
    momentum0: Sequence[jax.Array] | None = None,
    *,
    chunk_size: int,
    retrieve_after_update: bool = False,
    activation: str = "silu",
    implementation: str | None = None,
    interpret: bool = False,
    grad_clip: float = 0.0,
    unroll: int = 1,
    remat: bool = True,
    parallel_retrieval: bool = False,
) -> tuple[jax.Array, Params, Params]:
    """Titans memory update + retrieval over whole sequences.

    Args:
      q, k: [batch, T, d_k] (batch may be batch*heads); v: [batch, T, d_v].
      theta, eta, alpha: [batch, T] per-token inner lr, momentum decay, forget gate, all in [0, 1]
        (bound theta; per-chunk gates = repeat the value over the chunk's tokens).
      init_params: tuple of memory weights [batch, d_in, d_out] (per-sequence memory M_0).
      momentum0: like init_params, or None for zeros.
      chunk_size: b, must divide T. Gradients inside a chunk use the chunk-start weights.
      retrieve_after_update: y_t = M_t(q_t) if True, else M_{t-1}(q_t).
      activation: 'silu' or 'gelu' between layers of a deep memory.
      implementation: None (by backend), 'xla', 'triton', 'mosaic' or 'reference'.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
      grad_clip: if > 0, each token's inner gradient (all memory layers together) is rescaled to Frobenius
        norm <= grad_clip before the momentum update (not in the paper: a stability option); 0 = none.
      unroll: chunks per iteration of the XLA chunk loop (xla path only; the Pallas kernels loop inside).
      remat: checkpoint each chunk of the XLA chunk loop (xla path only): False saves every chunk's intermediates
        for the backward instead of recomputing them (more memory, one forward of the chunk fewer).
      parallel_retrieval: the XLA chunk loop carries only the memory state and the retrievals run after it, for all
        chunks at once (xla path only; the same values, fewer sequential kernels, more memory; xla.py).

    Returns:
      y [batch, T, d_v]; final params and final momentum (tuples like init_params). Passing them as
      init_params / momentum0 of the next call continues the sequence (streaming), if the split is at a
      multiple of chunk_size. Gradients flow through the inner updates to every input.
    """
    params = tuple(init_params)
    momentum = None if momentum0 is None else tuple(momentum0)
    _validate(q, k, v, theta, eta, alpha, params, momentum, chunk_size, activation, implementation, grad_clip,
              unroll)
    if momentum is None:
        momentum = tuple(jnp.zeros_like(p) for p in params)
    kw = dict(chunk_size=chunk_size, retrieve_after_update=retrieve_after_update, activation=activation,
              grad_clip=float(grad_clip))

    if implementation == "reference":
        return reference.chunked_memory_reference(q, k, v, theta, eta, alpha, params, momentum, **kw)
    impl = implementation or _pallas_for_backend(jax.default_backend()) or "xla"
    if impl in ("triton", "mosaic"):
        deep = len(params) > 1
        module, fn = _KERNELS[impl, deep]
        try:
            if not interpret and _pallas_for_backend(jax.default_backend()) != impl:
                raise NotImplementedError(f"{impl} needs backend "
                                          f"{'gpu' if impl == 'triton' else 'tpu'} or interpret=True, "
                                          f"running on {jax.default_backend()}")
            if deep:
                if implementation is None:
                    raise NotImplementedError(f"depth {len(params)}: the deep-memory {impl} kernel is not measured "
                                              f"on an accelerator yet, implementation='{impl}' selects it")
                dims = [params[0].shape[1]] + [w.shape[2] for w in params]
                module.check_supported(q.shape, v.shape, dims, chunk_size, interpret)
                if impl == "triton" and not interpret:
                    module.check_measured_fit(dims, chunk_size)
            else:
                module.check_supported(q.shape, v.shape, len(params), chunk_size, interpret)
                if impl == "triton" and not interpret:
                    module.check_measured_fit(q.shape, v.shape, chunk_size)
        except NotImplementedError as err:
            logger.info("chunked_memory: %s kernel unavailable (%s); falling back to xla", impl, err)
        else:
            y, M, S = fn(q, k, v, theta, eta, alpha, params, momentum, interpret=interpret, **kw)
            return y.astype(q.dtype), M, S
    y, M, S = xla.chunked_memory_xla(q, k, v, theta, eta, alpha, params, momentum, unroll=unroll, remat=remat,
                                     parallel_retrieval=parallel_retrieval, **kw)
    return y.astype(q.dtype), M, S
