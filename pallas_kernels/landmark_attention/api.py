"""Landmark grouped-softmax attention for training: one entry point that picks an implementation.

Landmark Attention, Mohtashami & Jaggi 2023 (arXiv 2305.16300), Sec. 3.1. Definition in ``reference.py``.

implementation:
  None        the Pallas kernel for ``jax.default_backend()`` ('gpu' -> 'triton', 'tpu' -> 'mosaic') when
              the shapes suit it, otherwise 'xla' with ONE log line per reason (CPU always lands here).
  'xla'       blockwise flash-style JAX (``xla.py``); any block size >= 2.
  'triton'    Pallas kernels lowered through Triton (``triton.py``); needs a GPU or ``interpret=True``.
  'mosaic'    Pallas kernels for TPU (Mosaic, ``tpu.py``); needs a TPU or ``interpret=True``.
  'reference' dense T x T (``reference.py``); tests and small inputs only.
An explicitly requested kernel that cannot run (wrong backend, unsupported shape) raises UserError;
with ``interpret=True`` the Pallas kernels take any block size >= 2 and any head_dim.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from memlm.errors import UserError

from .reference import landmark_attention_reference
from .tpu import landmark_attention_tpu
from .triton import landmark_attention_triton
from .xla import landmark_attention_xla

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("xla", "triton", "mosaic", "reference")
_BACKEND_KERNEL = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}
_KERNEL_BACKEND = {"triton": "gpu", "mosaic": "tpu"}
_logged: set[str] = set()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pallas_unsupported(kind: str, block_size: int, head_dim: int, dtype) -> str | None:
    """Why the compiled Pallas kernel ``kind`` cannot take these shapes (None if it can).

    The kernel tile is one landmark block of L = block_size rows (see the kernel files for why).
    """
    if kind == "triton":
        if not (_pow2(block_size) and block_size >= 16):
            return f"block_size={block_size} must be a power of two >= 16 for the Triton kernel (e.g. 64)"
        if not (_pow2(head_dim) and head_dim >= 16):
            return f"head_dim={head_dim} must be a power of two >= 16 for the Triton kernel"
    elif kind == "mosaic":
        dtype = jnp.dtype(dtype)
        sub = 8 if dtype.itemsize >= 4 else 16
        if block_size % sub:
            return f"block_size={block_size} must be a multiple of {sub} for the TPU kernel ({dtype})"
    return None


def _fallback(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("landmark_attention: %s; falling back to implementation='xla'", reason)


def _validate(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise UserError(
            f"landmark_attention.q/k/v: expected equal shapes [batch, heads, T, head_dim], got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    T = q.shape[2]
    if not isinstance(block_size, int) or block_size < 2 or T % block_size:
        raise UserError(
            f"landmark_attention.block_size: {block_size!r} (b + 1, landmark included) must be an int >= 2 "
            f"that divides the sequence length {T}"
        )


def resolve_implementation(
    implementation: str | None, block_size: int, head_dim: int, dtype, interpret: bool = False
) -> str:
    """The implementation that will run: validates explicit choices, applies the auto fallback."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise UserError(
            f"landmark_attention.implementation: {implementation!r} is not one of {IMPLEMENTATIONS} or None"
        )
    if implementation in ("xla", "reference"):
        return implementation
    backend = jax.default_backend()
    if implementation is None:
        kind = _BACKEND_KERNEL.get(backend)
        if kind is None:
            _fallback(f"no Pallas kernel for backend '{backend}'")
            return "xla"
        reason = pallas_unsupported(kind, block_size, head_dim, dtype)
        if reason is not None:
            _fallback(reason)
            return "xla"
        return kind
    if not interpret:
        if _BACKEND_KERNEL.get(backend) != implementation:
            raise UserError(
                f"landmark_attention.implementation: {implementation!r} needs a "
                f"{_KERNEL_BACKEND[implementation]} backend (this is '{backend}'); use interpret=True on CPU"
            )
        reason = pallas_unsupported(implementation, block_size, head_dim, dtype)
        if reason is not None:
            raise UserError(f"landmark_attention.block_size: {reason}")
    return implementation


def landmark_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    implementation: str | None = None,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Landmark grouped-softmax attention (training form, causal, whole sequence).

    Args:
      q, k, v: [batch, heads, T, head_dim], laid out as T / block_size blocks of b regular tokens and one
        landmark token (the last token of every block). RoPE, if any, is already applied.
      block_size: L = b + 1 (the paper's mem_freq + 1; b = 50 -> 51, the Triton setting b = 63 -> 64).
      implementation: None | 'xla' | 'triton' | 'mosaic' | 'reference' (module docstring).
      scale: score scale; None = 1/sqrt(head_dim). Pass 1.0 when q is already scaled.
      interpret: run an explicitly chosen Pallas kernel in interpret mode (CPU tests).
    Returns:
      [batch, heads, T, head_dim] in q.dtype. Outputs at landmark positions are defined (the landmark
      query attends to its block's regular tokens and earlier landmarks, as in the paper's code).
    Raises:
      UserError: bad shapes, a block size that does not divide T, an unknown or unavailable kernel.
    """
    _validate(q, k, v, block_size)
    impl = resolve_implementation(implementation, block_size, q.shape[-1], q.dtype, interpret)
    if impl == "reference":
        return landmark_attention_reference(q, k, v, block_size=block_size, scale=scale)
    if impl == "xla":
        return landmark_attention_xla(q, k, v, block_size=block_size, scale=scale)
    if impl == "triton":
        return landmark_attention_triton(q, k, v, block_size=block_size, scale=scale, interpret=interpret)
    return landmark_attention_tpu(q, k, v, block_size=block_size, scale=scale, interpret=interpret)
