"""Token-by-token Titans memory: the specification of `chunked_memory` (used by tests and bench only).

Titans neural long-term memory (Behrouz et al. 2025, arXiv 2501.00663, §3.1-3.2), for one sequence of
T tokens with keys k_t, values v_t, queries q_t and data-dependent gates theta_t, eta_t, alpha_t:

    loss(M; x_t) = ||M(k_t) - v_t||^2                      (eq. 12; a sum over features, not a mean)
    S_t = eta_t S_{t-1} - theta_t grad loss(M_{t'}; x_t)    (eq. 13-14, surprise with momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t                      (eq. 13, forgetting)
    y_t = M_t(q_t)      if retrieve_after_update            (eq. 15)
    y_t = M_{t-1}(q_t)  otherwise (read the memory before writing token t: memlm's MAG and MAL; MAC's output
                        gate reads M_t(y_t) after the update (§4.1), so it passes retrieve_after_update)

Optional inner gradient clipping (not in the paper; models.md §2 pitfalls, "clamp gradient norms"): with
grad_clip = c > 0 the gradient above is replaced by u_t min(1, c / ||u_t||), ||u_t|| the Frobenius norm over
all memory layers together, before the momentum update.

t' is the start of t's chunk: with chunk size b, t' = t - (t mod b) (0-indexed tokens), i.e. the gradient
of every token of a chunk is taken at the weights M left by the previous chunk (paper §3.2). With b = 1
that is M_{t-1}, the fully sequential rule. M_t itself is still updated after every token.

The memory M is an MLP without biases: M(x) = x W_1 for depth 1; for depth L >= 2,
M(x) = act(... act(x W_1) W_2 ...) W_L with act = SiLU (default) or GELU between layers.

This file is written independently of xla.py (its own MLP and loss) so that tests compare two codes.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Params = tuple[jax.Array, ...]


def _act(name: str):
    return {"silu": jax.nn.silu, "gelu": jax.nn.gelu}[name]


def mlp(params: Sequence[jax.Array], x: jax.Array, activation: str = "silu") -> jax.Array:
    """Memory MLP forward for one sequence's weights. x [..., d_in] -> [..., d_out]."""
    h = x
    for i, w in enumerate(params):
        h = h @ w
        if i + 1 < len(params):
            h = _act(activation)(h)
    return h


def _token_loss(params: Params, k: jax.Array, v: jax.Array, activation: str) -> jax.Array:
    """loss(M; x_t) = ||M(k_t) - v_t||^2 for one token. k [d_k], v [d_v]."""
    return jnp.sum((mlp(params, k, activation) - v) ** 2)


def _clip(u: Params, c: float) -> Params:
    """u * min(1, c / ||u||) with ||u|| the global norm of the pytree (c = 0: u unchanged)."""
    if not c:
        return u
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in u))
    return tuple(g * jnp.minimum(1.0, c / jnp.maximum(norm, 1e-30)) for g in u)


def _one_sequence(q, k, v, theta, eta, alpha, params, momentum, chunk_size, retrieve_after_update,
                  activation, grad_clip=0.0):
    """q, k [T, d_k]; v [T, d_v]; theta/eta/alpha [T]; params, momentum: tuples of weights."""
    T = q.shape[0]

    def step(carry, xs):
        M, S, M_start = carry
        t, q_t, k_t, v_t, th, et, al = xs
        # Keep the chunk-start weights: refreshed at the first token of every chunk.
        at_start = (t % chunk_size) == 0
        M_start = jax.tree.map(lambda m, ms: jnp.where(at_start, m, ms), M, M_start)
        # Per-token gradient with jax.grad; no stop_gradient: outer gradients flow through it.
        u = _clip(jax.grad(_token_loss)(M_start, k_t, v_t, activation), grad_clip)
        S = jax.tree.map(lambda s, g: et * s - th * g, S, u)
        M_new = jax.tree.map(lambda m, s: (1.0 - al) * m + s, M, S)
        y_t = mlp(M_new if retrieve_after_update else M, q_t, activation)
        return (M_new, S, M_start), y_t

    xs = (jnp.arange(T), q, k, v, theta, eta, alpha)
    (M, S, _), y = lax.scan(step, (params, momentum, params), xs)
    return y, M, S


def chunked_memory_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,
    eta: jax.Array,
    alpha: jax.Array,
    init_params: Sequence[jax.Array],
    momentum0: Sequence[jax.Array] | None = None,
    *,
    chunk_size: int = 1,
    retrieve_after_update: bool = False,
    activation: str = "silu",
    grad_clip: float = 0.0,
) -> tuple[jax.Array, Params, Params]:
    """Sequential loop over tokens (lax.scan), vmapped over the batch.

    Shapes: q, k [batch, T, d_k]; v [batch, T, d_v]; theta, eta, alpha [batch, T];
    init_params / momentum0: tuples of [batch, d_in, d_out] (momentum0 None = zeros).
    Returns y [batch, T, d_v], final params, final momentum (same structure as init_params).
    """
    params = tuple(init_params)
    momentum = tuple(jnp.zeros_like(p) for p in params) if momentum0 is None else tuple(momentum0)
    fn = lambda *a: _one_sequence(*a, chunk_size, retrieve_after_update, activation, grad_clip)
    y, M, S = jax.vmap(fn)(q, k, v, theta, eta, alpha, params, momentum)
    return y, tuple(M), tuple(S)
