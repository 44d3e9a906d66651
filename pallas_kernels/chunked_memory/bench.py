"""CPU benchmark: sequential token loop (reference.py) vs chunked parallel form (xla.py).

Both sides use the same chunk semantics (gradients at the chunk-start weights, paper §3.2), so their
outputs must agree to float32 round-off. Compile time is excluded; each time is the min of `repeats`.
Timed twice: the forward alone, and forward + backward (gradients of a fixed random linear function of
y and the final state w.r.t. every input: what training runs, the case paper §3.2 parallelises).

    .venv/bin/python -m pallas_kernels.chunked_memory.bench --T 4096 --d 64 --batch 4 --chunk 64
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from memlm.errors import OneLineArgumentParser, positive_int
from pallas_kernels.chunked_memory.reference import chunked_memory_reference
from pallas_kernels.chunked_memory.xla import chunked_memory_xla, default_coefficient_scan


def make_inputs(T: int, d: int, batch: int, depth: int, hidden: int | None = None, seed: int = 0):
    """Unit-norm q, k (as Titans normalises them), MLP weights, and gates in a stable range:
    theta <= 0.02, eta in [0.5, 0.9], alpha <= 0.002 (larger steps make a deep memory with 64-token
    stale gradients and momentum diverge to inf at 4k tokens; a larger forget rate decays a deep
    memory to its zero fixed point, where its gradients vanish). NumPy RNG: nothing to compile."""
    hidden = hidden or d
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(r.normal(size=(batch, T, d)))
    k = unit(r.normal(size=(batch, T, d)))
    v = r.normal(size=(batch, T, d))
    theta = 0.02 * r.uniform(size=(batch, T))
    eta = r.uniform(0.5, 0.9, size=(batch, T))
    alpha = 0.002 * r.uniform(size=(batch, T))
    dims = [d] + [hidden] * (depth - 1) + [d]
    params = tuple(r.normal(size=(batch, dims[i], dims[i + 1])) / np.sqrt(dims[i]) for i in range(depth))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    params = tuple(map(f32, params))
    momentum = tuple(jnp.zeros_like(p) for p in params)
    return (*map(f32, (q, k, v, theta, eta, alpha)), params, momentum)


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up, excluded
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _with_backward(fn, args):
    """jit(grad) of sum(y * Ry) + sum(M * RM) + sum(S * RS) w.r.t. all inputs, fixed random R."""
    y, M, S = jax.eval_shape(fn, *args)
    r = np.random.default_rng(1)
    weights = [jnp.asarray(r.normal(size=x.shape), jnp.float32) for x in jax.tree.leaves((y, M, S))]

    def loss(*a):
        return sum(jnp.sum(x * w) for x, w in zip(jax.tree.leaves(fn(*a)), weights))

    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))


def run(T: int = 4096, d: int = 64, batch: int = 4, chunk_size: int = 64, depth: int = 1,
        repeats: int = 5, retrieve_after_update: bool = False, path: str = "auto",
        backward: bool = True, coefficient_scan: str | None = None) -> dict:
    """Time both forms (seconds, min over repeats) and compare outputs and final states; with backward,
    also forward + backward and the gradients.

    path: xla.chunked_memory_xla's path ('auto', 'linear', 'factored', 'per_token');
    coefficient_scan: its coefficient_scan ('associative', 'sequential', 'doubling', None = the backend's default)."""
    args = make_inputs(T, d, batch, depth)
    kw = dict(chunk_size=chunk_size, retrieve_after_update=retrieve_after_update)
    seq = jax.jit(lambda *a: chunked_memory_reference(*a, **kw))
    par = jax.jit(lambda *a: chunked_memory_xla(*a, path=path, coefficient_scan=coefficient_scan, **kw))
    t_seq = _time(seq, args, repeats)
    t_par = _time(par, args, repeats)
    ref, out = seq(*args), par(*args)
    diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                                             jax.tree.leaves(b)))
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((ref, out)))
    res = dict(T=T, d=d, batch=batch, chunk_size=chunk_size, depth=depth, path=path, finite=finite,
               coefficient_scan=coefficient_scan or default_coefficient_scan(),
               backend=jax.default_backend(),
               sequential_s=t_seq, chunked_s=t_par, speedup=t_seq / t_par,
               max_abs_diff_y=diff(ref[0], out[0]), max_abs_diff_state=diff(ref[1:], out[1:]),
               max_abs_y=float(jnp.max(jnp.abs(ref[0]))),
               max_abs_state=max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref[1:])))
    if backward:
        seq_g, par_g = _with_backward(seq, args), _with_backward(par, args)
        t_seq_g, t_par_g = _time(seq_g, args, repeats), _time(par_g, args, repeats)
        g_ref, g_out = seq_g(*args), par_g(*args)
        res.update(sequential_fwd_bwd_s=t_seq_g, chunked_fwd_bwd_s=t_par_g, speedup_fwd_bwd=t_seq_g / t_par_g,
                   max_abs_diff_grad=diff(g_ref, g_out),
                   max_abs_grad=max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref)),
                   finite_grad=all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((g_ref, g_out))))
    return res


def main() -> None:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=positive_int, default=4096)
    p.add_argument("--d", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--chunk", type=positive_int, default=64)
    p.add_argument("--depth", type=positive_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--path", default="auto", choices=["auto", "linear", "factored", "per_token"])
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--coefficient-scan", choices=["associative", "sequential", "doubling"], default=None,
                   help="how the chunk coefficients are computed (default: sequential on CPU)")
    a = p.parse_args()
    if a.T % a.chunk:
        p.error(f"--chunk {a.chunk} does not divide --T {a.T}")
    print(json.dumps(run(a.T, a.d, a.batch, a.chunk, a.depth, a.repeats, path=a.path,
                         backward=not a.no_backward, coefficient_scan=a.coefficient_scan)))


if __name__ == "__main__":
    main()
