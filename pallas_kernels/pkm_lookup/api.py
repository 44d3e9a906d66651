"""Product-key memory lookup: argument checks and dispatch (architecture.md decision 5).

Memory Layers at Scale (arXiv 2412.09764, §3); product keys (Lample et al. 2019, §3.2).

`implementation`:
- None: on TPU the Mosaic kernel (tpu.py); on GPU and CPU the XLA version. The Triton kernel is NOT the
  GPU default because it was measured slower than XLA on an H200 (2026-11-26, `scripts/gpu_check.py`,
  8192 tokens, 4 heads, top-32, bf16: forward 0.56-0.65x, forward+backward 0.39-0.52x of XLA's speed;
  BENCHMARKS.md "GPU (H200)"); it stays selectable with implementation='triton'. When the kernel raises
  NotImplementedError for these shapes the XLA version runs, with one log line per distinct reason.
- 'xla': xla.py (production pure JAX, what CPU runs). 'reference': reference.py (dense over N; tests).
- 'triton' / 'mosaic': that kernel or a UserError saying why it cannot run (no silent fallback when the
  caller chose). `interpret=True` runs either kernel with the Pallas interpreter on any backend.
"""
from __future__ import annotations

import logging
import math

import jax
import numpy as np

from memlm.errors import UserError
from pallas_kernels.pkm_lookup.reference import pkm_lookup_reference
from pallas_kernels.pkm_lookup.xla import pkm_lookup_xla

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("xla", "triton", "mosaic", "reference")
_BACKEND_KERNEL = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}
# What implementation=None picks: the measured-faster path per backend (see the module docstring).
_AUTO_KERNEL = {"tpu": "mosaic"}
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def check_args(queries, sub_keys1, sub_keys2, values, top_k: int) -> int:
    """Validate shapes; return sqrt_n. Raises UserError (one line, naming the value) on bad input."""
    if queries.ndim != 3 or queries.shape[-1] % 2:
        raise UserError(f"pkm_lookup.queries: shape {tuple(queries.shape)} is not [tokens, heads, even k_dim]")
    t, h, k_dim = queries.shape
    n = values.shape[0] if values.ndim == 2 else -1
    if values.ndim != 2:
        raise UserError(f"pkm_lookup.values: shape {tuple(values.shape)} is not [N, d_v]")
    sqrt_n = math.isqrt(n)
    if sqrt_n * sqrt_n != n:
        raise UserError(f"pkm_lookup.values: N={n} rows is not a perfect square (product keys need N = sqrt_n**2)")
    want = (h, sqrt_n, k_dim // 2)
    for name, sk in (("sub_keys1", sub_keys1), ("sub_keys2", sub_keys2)):
        if tuple(sk.shape) != want:
            raise UserError(f"pkm_lookup.{name}: shape {tuple(sk.shape)} should be [heads, sqrt_n, k_dim/2] = {want}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= sqrt_n:
        raise UserError(f"pkm_lookup.top_k: {top_k!r} must be an int in [1, sqrt(N)={sqrt_n}]")
    return sqrt_n


def _run_kernel(name: str, args, top_k: int, interpret: bool):
    """Run the Pallas kernel `name`; NotImplementedError if it cannot take these shapes/backend."""
    queries, sub_keys1, _, values = args
    if name == "triton":
        from pallas_kernels.pkm_lookup import triton as impl

        if not interpret:
            impl.check_supported(queries.shape[-1], sub_keys1.shape[1], values.shape[1], top_k)
        return impl.pkm_lookup_triton(*args, top_k=top_k, interpret=interpret)
    from pallas_kernels.pkm_lookup import tpu as impl

    return impl.pkm_lookup_tpu(*args, top_k=top_k, interpret=interpret)


def pkm_lookup(
    queries: jax.Array,
    sub_keys1: jax.Array,
    sub_keys2: jax.Array,
    values: jax.Array,
    *,
    top_k: int,
    implementation: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Product-key memory lookup (per head: exact top-k of the N = sqrt_n² product keys, float32 softmax;
    the heads' weighted value rows are summed).

    queries [tokens, heads, k_dim] (tokens = batch·seq flattened); sub_keys1, sub_keys2
    [heads, sqrt_n, k_dim//2]; values [N, d_v] (one table) ->
    out [tokens, d_v] (values.dtype), indices [tokens, heads, top_k] int32 (index = i·sqrt_n + j, sorted
    by score descending), weights [tokens, heads, top_k] float32 (each head's weights sum to 1).
    """
    check_args(queries, sub_keys1, sub_keys2, values, top_k)
    top_k = int(top_k)
    args = (queries, sub_keys1, sub_keys2, values)
    if implementation == "reference":
        return pkm_lookup_reference(*args, top_k=top_k)
    if implementation == "xla":
        return pkm_lookup_xla(*args, top_k=top_k)
    backend = jax.default_backend()
    if implementation in ("triton", "mosaic"):
        native = "gpu" if implementation == "triton" else "tpu"
        if not interpret and _BACKEND_KERNEL.get(backend) != implementation:
            raise UserError(f"pkm_lookup.implementation: {implementation!r} needs a {native} backend "
                            f"(this one is {backend!r}); use interpret=True or 'xla'")
        try:
            return _run_kernel(implementation, args, top_k, interpret)
        except NotImplementedError as e:
            raise UserError(f"pkm_lookup.implementation: {implementation!r} cannot run these shapes: {e}") from e
    if implementation is not None:
        raise UserError(f"pkm_lookup.implementation: {implementation!r} is not one of {IMPLEMENTATIONS} or None")
    kernel = _AUTO_KERNEL.get(backend)
    if kernel is None:
        _log_once(f"pkm_lookup: no faster Pallas kernel for backend {backend!r}; using xla")
        return pkm_lookup_xla(*args, top_k=top_k)
    try:
        return _run_kernel(kernel, args, top_k, interpret)
    except NotImplementedError as e:
        _log_once(f"pkm_lookup: {kernel} kernel unavailable ({e}); falling back to xla")
        return pkm_lookup_xla(*args, top_k=top_k)
