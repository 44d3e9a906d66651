"""Chunked parallel Titans memory in plain JAX (what CPU runs; the Pallas kernels share its chunk math).

Paper: Titans (arXiv 2501.00663) §3.2, eq. 16-18. Tokens are split into chunks of b. Inside a chunk
every gradient is taken at the chunk-start weights M0 (and momentum S0), so with u_j = grad loss(M0; x_j)
for local tokens j = 1..b the recurrences

    S_j = eta_j S_{j-1} - theta_j u_j,        M_j = (1 - alpha_j) M_{j-1} + S_j

are linear with known inputs: two scans with the operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)
(momentum with a = eta, decay with a = 1 - alpha). `chunk_coefficients` runs them on scalar coefficient
vectors, as lax.associative_scan (GPU, TPU) or as one lax.scan over the chunk's b positions (CPU, where it
is 1.4-3.2x faster forward + backward at the bench and model shapes; BENCHMARKS.md "Kernels"); a closed
form by matrix doubling ('doubling', no loop) is kept for measuring on accelerators.

Linear memory (depth 1, M(x) = x W): u_j = k_j^T e_j with e_j = 2 (k_j W0 - v_j). Running the two scans
on coefficient vectors over the basis [W0, S0, u_1 .. u_b] gives, without materialising per-token
weights,
    M_j = G_j W0 + H_j S0 + sum_i C_ji k_i^T e_i,   S_b = e S0 + sum_i CS_i k_i^T e_i,
so the chunk is matmuls (the paper's Theta B (W0 X - X) X^T form):
    Y = G (Q W0) + H (Q S0) + (C o Q K^T) E,   W' = g W0 + h S0 + K^T (CW E),   S' = e S0 + K^T (CS E).
(G, H, C are the coefficients of the weights token j reads: M_j if retrieve_after_update, else M_{j-1};
C is lower-triangular, so causality is exact: later tokens enter with coefficient 0.)
Deep memory (depth >= 2, bias-free MLP): each layer's per-token gradient is again an outer product
a_j^T delta_j (layer input x backprop delta at the chunk-start weights, from one jax.grad per chunk), so
the same coefficients give every token's weights implicitly and the retrieval is matmuls layer by layer
(`_factored_chunk`). The literal form, vmap(grad) per chunk + both scans on b per-token copies of the
weights + y_j = M_j(q_j) (`_per_token_sequence`), is kept as path='per_token' for cross-checks.

Optional per-token gradient clipping (grad_clip = c > 0; not in the paper): u_j -> u_j min(1, c / ||u_j||).
The scans are linear in the gradients, so this is exact in the chunked form: token j's E_j (linear) or its
deltas (deep; ||u_j||^2 = sum over layers of |a_j|^2 |delta_j|^2) are multiplied by that factor.

The loop over chunks is a lax.scan with jax.checkpoint per chunk (activation memory ~ #chunks x |M|).
No stop_gradient anywhere: the outer loss differentiates through the inner updates.
Only W', S' (the state) feed the next chunk; Y does not. parallel_retrieval=True therefore splits the chunk the
way chunked linear attention does: the loop computes the state half (`linear_chunk_state`, `_factored_state`) and
stacks each chunk's start weights, and the retrievals (`linear_chunk_output`, `_factored_output`) run after it for
all chunks at once, leaving fewer and larger kernels in the sequential part (linear 3 of 7 matmuls, depth 2: 7 of 15).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Params = tuple[jax.Array, ...]


# ----------------------------------------------------------------------------------------------- memory
def mlp_apply(params: Sequence[jax.Array], x: jax.Array, activation: str = "silu") -> jax.Array:
    """Bias-free memory MLP. x [..., d_in] -> [..., d_out]; activation between layers only."""
    act = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}[activation]
    h = x
    for i, w in enumerate(params):
        h = h @ w
        if i + 1 < len(params):
            h = act(h)
    return h


def memory_loss(params: Params, k: jax.Array, v: jax.Array, activation: str = "silu") -> jax.Array:
    """Associative-memory loss ||M(k) - v||^2 (paper eq. 12). k [d_k], v [d_v] -> scalar."""
    return jnp.sum((mlp_apply(params, k, activation) - v) ** 2)


# ------------------------------------------------------------------------------------------------ scans
def scan_with_init(a: jax.Array, inc, init):
    """All x_j = a_j x_{j-1} + inc_j (j = 1..n) with x_0 = init, as one lax.associative_scan.

    a [n]; inc: pytree with leaves [n, ...]; init: pytree with matching leaves [...].
    """
    def bcast(s, leaf):
        return s.reshape(s.shape + (1,) * (leaf.ndim - s.ndim))

    # Fold the initial state into the first element: x_1 = a_1 x_0 + inc_1.
    inc = jax.tree.map(lambda i, x0: i.at[0].add(a[0] * x0), inc, init)

    def combine(e1, e2):
        a1, b1 = e1
        a2, b2 = e2
        return a1 * a2, jax.tree.map(lambda x1, x2: bcast(a2, x1) * x1 + x2, b1, b2)

    _, out = lax.associative_scan(combine, (a, inc))
    return out


def _basis_rows_associative(th, et, be):
    """S, M coefficient rows [nc, b, n] over the basis [W0, S0, u_1 .. u_b] (n = b + 2), for gates
    th, et, be [nc, b]: two lax.associative_scans per chunk (log-depth: what accelerators run)."""
    nc, b = th.shape
    n = b + 2
    m0 = jnp.zeros((n,), th.dtype).at[0].set(1.0)
    s0 = jnp.zeros((n,), th.dtype).at[1].set(1.0)

    def per_chunk(th, et, be):
        inc = -th[:, None] * jnp.eye(b, n, k=2, dtype=th.dtype)   # -theta_j e_{u_j}
        S = scan_with_init(et, inc, s0)
        return S, scan_with_init(be, S, m0)

    return jax.vmap(per_chunk)(th, et, be)


def _basis_rows_sequential(th, et, be):
    """Same rows as _basis_rows_associative, from one lax.scan over the b positions of every chunk at
    once (each step is a few [nc, n] multiply-adds; cheaper than the associative scans on CPU)."""
    nc, b = th.shape
    n = b + 2
    s0 = jnp.zeros((nc, n), th.dtype).at[:, 1].set(1.0)
    m0 = jnp.zeros((nc, n), th.dtype).at[:, 0].set(1.0)

    def step(carry, xs):
        s, m = carry
        th_j, et_j, be_j, unit_j = xs                              # [nc], [nc], [nc], [n]
        s = et_j[:, None] * s - th_j[:, None] * unit_j
        m = be_j[:, None] * m + s
        return (s, m), (s, m)

    xs = (th.T, et.T, be.T, jnp.eye(b, n, k=2, dtype=th.dtype))
    _, (S, M) = lax.scan(step, (s0, m0), xs)
    return jnp.swapaxes(S, 0, 1), jnp.swapaxes(M, 0, 1)


def _decay_matrix(a: jax.Array) -> jax.Array:
    """L[..., j, i] = a_{i+1} a_{i+2} ... a_j for i <= j (1 on the diagonal), 0 above. a [..., b] -> [..., b, b].

    L = (I - N)^-1 = sum_{m < b} N^m for the nilpotent N with a_j on the subdiagonal, summed by doubling:
    S <- S + P S, P <- P P, ceil(log2 b) times (2 ceil(log2 b) - 1 batched [b, b] matmuls at full float32
    precision). Products only, no logs or divisions: gates of exactly 0 or 1 are exact, values and gradients."""
    b = a.shape[-1]
    hi = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on GPU
    eye = jnp.eye(b, dtype=a.dtype)
    P = jnp.eye(b, k=-1, dtype=a.dtype) * a[..., :, None]     # N: row j holds a_j at column j - 1
    S = jnp.broadcast_to(eye, P.shape)
    steps = max(1, (b - 1).bit_length())
    for k in range(steps):
        S = S + jnp.matmul(P, S, precision=hi)
        if k + 1 < steps:
            P = jnp.matmul(P, P, precision=hi)
    return S


def _basis_rows_doubling(th, et, be):
    """Same rows as _basis_rows_associative in closed form: decay matrices by doubling (_decay_matrix), then
    S_j = P^eta_j S0 - sum_i L^eta_ji theta_i u_i and M_j = P^beta_j M0 + sum_l L^beta_jl S_l as one [b, b]
    matmul. No loop and no scan: a few dozen batched matmuls, for accelerators where every small kernel costs a
    launch (to be measured there: scripts/gpu_check.py --only coefficients_time)."""
    nc, b = th.shape
    hi = jax.lax.Precision.HIGHEST
    L_eta, L_beta = _decay_matrix(et), _decay_matrix(be)           # [nc, b, b]
    P_eta, P_beta = et[:, :1] * L_eta[:, :, 0], be[:, :1] * L_beta[:, :, 0]   # [nc, b]: a_1 ... a_j
    S_u = L_eta * (-th)[:, None, :]                                # coefficient of u_i in S_j
    M_u = jnp.matmul(L_beta, S_u, precision=hi)                    # coefficient of u_i in M_j
    M_s0 = jnp.einsum("cji,ci->cj", L_beta, P_eta, precision=hi)   # coefficient of S0 in M_j
    zeros = jnp.zeros_like(P_eta)[..., None]
    S = jnp.concatenate([zeros, P_eta[..., None], S_u], axis=-1)
    M = jnp.concatenate([P_beta[..., None], M_s0[..., None], M_u], axis=-1)
    return S, M


COEFFICIENT_SCANS = {"associative": _basis_rows_associative, "sequential": _basis_rows_sequential,
                     "doubling": _basis_rows_doubling}


def default_coefficient_scan() -> str:
    """'sequential' on CPU (measured faster there, forward and backward: BENCHMARKS.md "Kernels"),
    'associative' (log-depth, few kernel launches) on GPU and TPU: on an H200 it is the fastest of the three,
    forward + backward, 2.7-4.1x faster than 'sequential' and 2.7-5.7x faster than 'doubling' (session 11,
    `scripts/gpu_check.py --only coefficients_time`; TPU not measured)."""
    return "sequential" if jax.default_backend() == "cpu" else "associative"


def chunk_coefficients(theta: jax.Array, eta: jax.Array, alpha: jax.Array, chunk_size: int,
                       retrieve_after_update: bool, scan: str | None = None) -> dict[str, jax.Array]:
    """Scalar chunk coefficients of the linear-memory form, for ONE sequence.

    theta, eta, alpha [T] -> G, H, CW, CS [T, 1]; C [T, b] (row t: coefficients of its chunk's
    k_i^T e_i in the weights that y_t reads, zero for i later than that); g, h, e [T/b, 1, 1].
    The recurrences S_j = eta_j S_{j-1} - theta_j u_j, M_j = (1 - alpha_j) M_{j-1} + S_j run on basis
    vectors [W0, S0, u_1 .. u_b], so they are exact (no divisions by cumulative products, which underflow
    when a gate is 0). scan: 'associative' | 'sequential' | 'doubling' | None (default_coefficient_scan()); all
    give the same rows (tested), they differ in speed only.
    """
    b = chunk_size
    nc = theta.shape[0] // b
    rows = COEFFICIENT_SCANS[scan or default_coefficient_scan()]
    S, M = rows(theta.reshape(nc, b), eta.reshape(nc, b), 1.0 - alpha.reshape(nc, b))  # [nc, b, n]
    if retrieve_after_update:
        R = M
    else:  # token j reads M_{j-1}; the first token of a chunk reads M0 (basis vector 0)
        m0 = jnp.zeros((nc, 1, b + 2), theta.dtype).at[:, :, 0].set(1.0)
        R = jnp.concatenate([m0, M[:, :-1]], axis=1)
    flat = lambda x: x.reshape((nc * b,) + x.shape[2:])
    return dict(G=flat(R[:, :, 0:1]), H=flat(R[:, :, 1:2]), C=flat(R[:, :, 2:]),
                CW=flat(M[:, -1, 2:, None]), CS=flat(S[:, -1, 2:, None]),
                g=M[:, -1, 0].reshape(nc, 1, 1), h=M[:, -1, 1].reshape(nc, 1, 1),
                e=S[:, -1, 1].reshape(nc, 1, 1))


def coefficients_batched(theta, eta, alpha, chunk_size, retrieve_after_update,
                         scan: str | None = None) -> dict[str, jax.Array]:
    """chunk_coefficients over a batch: [batch, T] gates -> dict of [batch, ...] arrays."""
    fn = lambda th, et, al: chunk_coefficients(th, et, al, chunk_size, retrieve_after_update, scan)
    return jax.vmap(fn)(theta, eta, alpha)


def kernel_inputs(q, k, v, theta, eta, alpha, init_params, momentum0, chunk_size: int,
                  retrieve_after_update: bool):
    """What the Pallas kernels take: (q, k, v, G, H, C, CW, CS, g, h, e) in float32, with the coefficients of
    coefficients_batched (computed here, in XLA, so their gradients come from autodiff), and the float32
    tuples M0, S0. Shapes as chunked_memory_xla / linear_core."""
    f32 = lambda x: x.astype(jnp.float32)
    q, k, v, theta, eta, alpha = map(f32, (q, k, v, theta, eta, alpha))
    c = coefficients_batched(theta, eta, alpha, chunk_size, retrieve_after_update)
    coef_args = (q, k, v, c["G"], c["H"], c["C"], c["CW"], c["CS"], c["g"], c["h"], c["e"])
    return coef_args, tuple(map(f32, init_params)), tuple(map(f32, momentum0))


# ------------------------------------------------------------------------- linear chunk (shared math)
def _dot(a, b, ta: bool = False, tb: bool = False):
    """a @ b with optional transposes expressed as contraction dims (lowers on Triton and Mosaic)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims)


def _sum11(x):
    """Sum of a 2-D array as a [1, 1] array (two 1-axis reductions: friendly to Triton and Mosaic)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def clip_scale(norm_sq: jax.Array, clip: float) -> jax.Array:
    """Per-token factor min(1, clip / ||u||) from ||u||^2, written as clip * rsqrt(max(||u||^2, clip^2)) so that
    its gradient is exactly 0 where nothing is clipped (no rsqrt(0) in the backward)."""
    return clip * lax.rsqrt(jnp.maximum(norm_sq, clip * clip))


def _clipped_errors(k, E_raw, clip: float):
    """Linear memory: token j's gradient u_j = k_j^T E_j has ||u_j||_F = ||k_j|| ||E_j||; rescale E_j so that it
    is at most `clip` (0: no clipping). Returns (E, scale [b, 1] or None)."""
    if not clip:
        return E_raw, None
    n2 = jnp.sum(k * k, axis=1, keepdims=True) * jnp.sum(E_raw * E_raw, axis=1, keepdims=True)
    s = clip_scale(n2, clip)
    return s * E_raw, s


def linear_chunk_state(W, S, k, v, CW, CS, g, h, e, clip: float = 0.0):
    """Chunk-end state of linear memory. W, S [d_k, d_v]; k [b, d_k]; v [b, d_v]; CW, CS [b, 1];
    g, h, e [1, 1]. Returns E [b, d_v] (token gradients are k_j^T E_j, norm-clipped to `clip` if > 0), W', S'."""
    E, _ = _clipped_errors(k, 2.0 * (_dot(k, W) - v), clip)
    W1 = g * W + h * S + _dot(k, CW * E, ta=True)
    S1 = e * S + _dot(k, CS * E, ta=True)
    return E, W1, S1


def linear_chunk_output(W, S, q, k, E, G, H, C):
    """Retrievals of one chunk from its chunk-start W, S: Y = G (Q W) + H (Q S) + (C o Q K^T) E.
    q, k [b, d_k]; E [b, d_v]; G, H [b, 1]; C [b, b] -> y [b, d_v]."""
    A = _dot(q, k, tb=True)
    return G * _dot(q, W) + H * _dot(q, S) + _dot(C * A, E)


def linear_chunk_forward(W, S, q, k, v, G, H, C, CW, CS, g, h, e, clip: float = 0.0):
    """One chunk of linear memory. W, S [d_k, d_v]; q, k [b, d_k]; v [b, d_v]; G, H, CW, CS [b, 1];
    C [b, b]; g, h, e [1, 1]; clip: per-token gradient-norm bound (0: none). Returns y [b, d_v], chunk-end W, S."""
    E, W1, S1 = linear_chunk_state(W, S, k, v, CW, CS, g, h, e, clip)
    return linear_chunk_output(W, S, q, k, E, G, H, C), W1, S1


def linear_chunk_backward(W, S, q, k, v, G, H, C, CW, CS, g, h, e, dy, dW1, dS1, clip: float = 0.0):
    """Hand-written VJP of linear_chunk_forward (used by the Pallas backward kernels).

    Returns (dW, dS, dq, dk, dv, dG, dH, dC, dCW, dCS, dg, dh, de) with the shapes of the inputs.
    With clip > 0, E = s E_raw with s = clip / sqrt(max(n2, clip^2)), n2 = |k|^2 |E_raw|^2 (per token), so
    dE_raw = s dE + t 2|k|^2 E_raw and dk gains t 2|E_raw|^2 k, where t = <dE, E_raw> ds/dn2 and
    ds/dn2 = -s / (2 n2) where n2 > clip^2, else 0.
    """
    E_raw = 2.0 * (_dot(k, W) - v)
    E, s = _clipped_errors(k, E_raw, clip)
    A = _dot(q, k, tb=True)
    CA = C * A
    KdW = _dot(k, dW1)                                       # [b, d_v]
    KdS = _dot(k, dS1)
    dE = _dot(CA, dy, ta=True) + CW * KdW + CS * KdS
    dk_clip = 0.0
    if clip:
        kk = jnp.sum(k * k, axis=1, keepdims=True)
        ee = jnp.sum(E_raw * E_raw, axis=1, keepdims=True)
        n2 = kk * ee
        ds_dn2 = jnp.where(n2 > clip * clip, -0.5 * s / jnp.maximum(n2, clip * clip), 0.0)
        t = jnp.sum(dE * E_raw, axis=1, keepdims=True) * ds_dn2
        dE = s * dE + (2.0 * t * kk) * E_raw
        dk_clip = (2.0 * t * ee) * k
    dCA = _dot(dy, E, tb=True)                               # [b, b]
    dA = C * dCA
    dC = A * dCA
    QW = _dot(q, W)
    QS = _dot(q, S)
    dG = jnp.sum(dy * QW, axis=1, keepdims=True)
    dH = jnp.sum(dy * QS, axis=1, keepdims=True)
    dCW = jnp.sum(E * KdW, axis=1, keepdims=True)
    dCS = jnp.sum(E * KdS, axis=1, keepdims=True)
    GdY = G * dy
    HdY = H * dy
    dP = 2.0 * dE                                            # P = k W - v
    dq = _dot(GdY, W, tb=True) + _dot(HdY, S, tb=True) + _dot(dA, k)
    dk = (_dot(dA, q, ta=True) + _dot(CW * E, dW1, tb=True) + _dot(CS * E, dS1, tb=True)
          + _dot(dP, W, tb=True) + dk_clip)
    dv = -dP
    dW = _dot(q, GdY, ta=True) + _dot(k, dP, ta=True) + g * dW1
    dS = _dot(q, HdY, ta=True) + h * dW1 + e * dS1
    dg = _sum11(W * dW1)
    dh = _sum11(S * dW1)
    de = _sum11(S * dS1)
    return dW, dS, dq, dk, dv, dG, dH, dC, dCW, dCS, dg, dh, de


def linear_core(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0, *, chunk_size: int, remat: bool = True,
                clip: float = 0.0, unroll: int = 1, parallel_retrieval: bool = False):
    """Linear memory over whole sequences from precomputed coefficients (the layout the kernels take).

    q, k [B, T, d_k]; v [B, T, d_v]; G, H, CW, CS [B, T, 1]; C [B, T, b]; g, h, e [B, T/b, 1, 1];
    W0, S0 [B, d_k, d_v]; clip: per-token gradient-norm bound (0: none); unroll: chunks per loop iteration;
    parallel_retrieval: the loop runs linear_chunk_state only, the retrievals run after it for all chunks at once.
    Returns y [B, T, d_v], W_T, S_T.
    """
    b = chunk_size

    def one(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0):
        nc = q.shape[0] // b
        split = lambda x: x.reshape((nc, b) + x.shape[1:])

        if parallel_retrieval:
            def body(carry, xs):
                E, W, S = linear_chunk_state(*carry, *xs, clip=clip)
                return (W, S), (carry, E)

            body = jax.checkpoint(body) if remat else body
            xs = tuple(map(split, (k, v, CW, CS))) + (g, h, e)
            (W, S), ((Wc, Sc), E) = lax.scan(body, (W0, S0), xs, unroll=min(unroll, nc))
            y = jax.vmap(linear_chunk_output)(Wc, Sc, split(q), split(k), E, split(G), split(H), split(C))
            return y.reshape((nc * b,) + y.shape[2:]), W, S

        def body(carry, xs):
            W, S = carry
            y, W, S = linear_chunk_forward(W, S, *xs, clip=clip)
            return (W, S), y

        body = jax.checkpoint(body) if remat else body
        xs = tuple(map(split, (q, k, v, G, H, C, CW, CS))) + (g, h, e)
        (W, S), y = lax.scan(body, (W0, S0), xs, unroll=min(unroll, nc))
        return y.reshape((nc * b,) + y.shape[2:]), W, S

    return jax.vmap(one)(q, k, v, G, H, C, CW, CS, g, h, e, W0, S0)


# ------------------------------------------------------------------------------------------ deep memory
def _factored_state(Ms, Ss, k, v, CW, CS, g, h, e, activation, clip: float = 0.0):
    """The state half of _factored_chunk: (inputs a^l [b, d_in^l], deltas [b, d_out^l] per layer, chunk-end M, S).
    Token j's gradient of layer l is a_j^l^T delta_j^l, taken at the chunk-start weights Ms."""
    act = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}[activation]
    L = len(Ms)

    def keys_loss(offsets):
        a, inputs = k, []
        for l, W in enumerate(Ms):
            inputs.append(a)
            z = _dot(a, W) + offsets[l]
            a = act(z) if l + 1 < L else z
        return jnp.sum((a - v) ** 2), inputs

    zeros = [jnp.zeros((k.shape[0], W.shape[1]), k.dtype) for W in Ms]
    deltas, inputs = jax.grad(keys_loss, has_aux=True)(zeros)  # no stop_gradient: second order flows
    if clip:
        n2 = sum(jnp.sum(a * a, axis=1, keepdims=True) * jnp.sum(dl * dl, axis=1, keepdims=True)
                 for a, dl in zip(inputs, deltas))
        s = clip_scale(n2, clip)
        deltas = [s * dl for dl in deltas]
    M1 = tuple(g * W + h * S + _dot(a, CW * dl, ta=True) for W, S, a, dl in zip(Ms, Ss, inputs, deltas))
    S1 = tuple(e * S + _dot(a, CS * dl, ta=True) for S, a, dl in zip(Ss, inputs, deltas))
    return tuple(inputs), tuple(deltas), M1, S1


def _factored_output(Ms, Ss, q, inputs, deltas, G, H, C, activation):
    """The retrieval half of _factored_chunk: y [b, d_out] from the chunk-start Ms, Ss and the chunk's
    inputs / deltas (_factored_state), layer by layer z = G (x W0) + H (x S0) + (C o x A^T) Delta."""
    act = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}[activation]
    x, L = q, len(Ms)
    for l, (W, S, a, dl) in enumerate(zip(Ms, Ss, inputs, deltas)):
        z = G * _dot(x, W) + H * _dot(x, S) + _dot(C * _dot(x, a, tb=True), dl)
        x = act(z) if l + 1 < L else z
    return x


def _factored_chunk(Ms, Ss, q, k, v, G, H, C, CW, CS, g, h, e, activation, clip: float = 0.0):
    """One chunk of an L-layer bias-free MLP memory without per-token weights.

    Each layer's per-token gradient at the chunk-start weights is an outer product a_j^T delta_j
    (a_j: the layer's input for key k_j, delta_j: d loss_j / d pre-activation), taken with jax.grad
    w.r.t. zero offsets on the pre-activations (one batched backward for the chunk). The weights that
    token j reads are M_j = G_j M0 + H_j S0 + sum_i C_ji a_i^T delta_i for every layer, so the
    retrieval is, layer by layer, z = G (x W0) + H (x S0) + (C o x A^T) Delta: attention-like matmuls.
    Ms, Ss: tuples of [d_in, d_out]; other shapes as linear_chunk_forward. clip > 0 rescales token j's
    gradient (all layers together, ||u_j||^2 = sum_l |a_j^l|^2 |delta_j^l|^2) to norm <= clip: every delta_j^l
    is multiplied by the same clip_scale.
    """
    inputs, deltas, M1, S1 = _factored_state(Ms, Ss, k, v, CW, CS, g, h, e, activation, clip)
    return _factored_output(Ms, Ss, q, inputs, deltas, G, H, C, activation), M1, S1


def factored_core(q, k, v, c, M0, S0, *, chunk_size, activation, remat=True, clip: float = 0.0, unroll: int = 1,
                  parallel_retrieval: bool = False):
    """Any depth via _factored_chunk. q, k [B, T, d_k]; v [B, T, d_v]; c = coefficients_batched(...);
    M0, S0: tuples of [B, d_in, d_out]. Returns y [B, T, d_v], final M, final S (tuples).
    parallel_retrieval: the chunk loop runs only _factored_state and returns every chunk's start weights; the
    retrievals (_factored_output) then run for all chunks at once (see chunked_memory_xla)."""
    b = chunk_size

    def one(q, k, v, c, M0, S0):
        nc = q.shape[0] // b
        split = lambda x: x.reshape((nc, b) + x.shape[1:])
        per_tok = {n: split(c[n]) for n in ("G", "H", "C", "CW", "CS")}
        if parallel_retrieval:
            def body(carry, xs):
                kc, vc, cc = xs
                a, dl, M, S = _factored_state(*carry, kc, vc, cc["CW"], cc["CS"], cc["g"], cc["h"], cc["e"],
                                              activation, clip)
                return (M, S), (carry, a, dl)

            body = jax.checkpoint(body) if remat else body
            xs = (split(k), split(v), {n: per_tok[n] for n in ("CW", "CS")} | {n: c[n] for n in ("g", "h", "e")})
            (M, S), ((Mc, Sc), a, dl) = lax.scan(body, (M0, S0), xs, unroll=min(unroll, nc))
            out = lambda *xs: _factored_output(*xs, activation)
            y = jax.vmap(out)(Mc, Sc, split(q), a, dl, per_tok["G"], per_tok["H"], per_tok["C"])
            return y.reshape((nc * b,) + y.shape[2:]), M, S

        def body(carry, xs):
            qc, kc, vc, cc = xs
            y, M, S = _factored_chunk(*carry, qc, kc, vc, cc["G"], cc["H"], cc["C"], cc["CW"], cc["CS"],
                                      cc["g"], cc["h"], cc["e"], activation, clip)
            return (M, S), y

        body = jax.checkpoint(body) if remat else body
        xs = (split(q), split(k), split(v), per_tok | {n: c[n] for n in ("g", "h", "e")})
        (M, S), y = lax.scan(body, (M0, S0), xs, unroll=min(unroll, nc))
        return y.reshape((nc * b,) + y.shape[2:]), M, S

    return jax.vmap(one)(q, k, v, c, M0, S0)


def _per_token_sequence(q, k, v, theta, eta, alpha, M0, S0, chunk_size, retrieve_after_update,
                        activation, remat, clip=0.0):
    """Any depth, one sequence, the literal form: vmap(grad) per chunk at the chunk-start weights,
    both scans on the weight pytrees (b copies per chunk), y_j = M_j(q_j) with each token's weights.
    Costs b x |M| memory and elementwise work per chunk; kept as an independent cross-check."""
    b = chunk_size
    nc = q.shape[0] // b
    split = lambda x: x.reshape((nc, b) + x.shape[1:])
    grad_fn = jax.vmap(jax.grad(memory_loss), in_axes=(None, 0, 0, None))

    def body(carry, xs):
        M, S = carry
        qc, kc, vc, th, et, al = xs
        u = grad_fn(M, kc, vc, activation)                  # leaves [b, ...]
        if clip:  # each token's gradient, all layers together, to norm <= clip
            n2 = sum(jnp.sum(x * x, axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(u))
            s = clip_scale(n2, clip)
            u = jax.tree.map(lambda x: s.reshape((b,) + (1,) * (x.ndim - 1)) * x, u)
        inc = jax.tree.map(lambda gr: -th.reshape((b,) + (1,) * (gr.ndim - 1)) * gr, u)
        S_tok = scan_with_init(et, inc, S)                  # S_j for j = 1..b
        M_tok = scan_with_init(1.0 - al, S_tok, M)          # M_j for j = 1..b
        if retrieve_after_update:
            M_read = M_tok
        else:
            M_read = jax.tree.map(lambda m0, mt: jnp.concatenate([m0[None], mt[:-1]], 0), M, M_tok)
        y = jax.vmap(lambda p, x: mlp_apply(p, x, activation))(M_read, qc)
        last = lambda t: jax.tree.map(lambda x: x[-1], t)
        return (last(M_tok), last(S_tok)), y

    body = jax.checkpoint(body) if remat else body
    xs = tuple(map(split, (q, k, v, theta, eta, alpha)))
    (M, S), y = lax.scan(body, (M0, S0), xs)
    return y.reshape((nc * b,) + y.shape[2:]), M, S


# ------------------------------------------------------------------------------------------- entry point
def chunked_memory_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,
    eta: jax.Array,
    alpha: jax.Array,
    init_params: Sequence[jax.Array],
    momentum0: Sequence[jax.Array],
    *,
    chunk_size: int,
    retrieve_after_update: bool = False,
    activation: str = "silu",
    remat: bool = True,
    path: str = "auto",
    coefficient_scan: str | None = None,
    grad_clip: float = 0.0,
    unroll: int = 1,
    parallel_retrieval: bool = False,
) -> tuple[jax.Array, Params, Params]:
    """Chunked parallel form. q, k [B, T, d_k]; v [B, T, d_v]; gates [B, T]; params and momentum0 tuples
    of [B, d_in, d_out]. Returns y [B, T, d_v], final params, final momentum (at least float32).

    path: 'auto' ('linear' for depth 1, else 'factored'); 'linear' (depth 1: the kernels' matmul form);
    'factored' (any depth, outer-product gradients, no per-token weights); 'per_token' (any depth,
    vmap(grad) + scans on per-token weight copies). All compute the same function.
    coefficient_scan: chunk_coefficients' scan ('associative' | 'sequential' | 'doubling' | None = by backend).
    grad_clip: if > 0, every token's inner gradient (all memory layers together) is rescaled to Frobenius norm
    <= grad_clip before the momentum update (reference.py's rule); 0 (default, the paper): no clipping.
    unroll: chunks per iteration of the chunk loop ('linear' and 'factored'; lax.scan's unroll). A GPU runs each
    iteration of an XLA loop with a host round trip, so unrolling trades compile time for fewer of them.
    parallel_retrieval ('linear' and 'factored'): the chunk loop carries only the state (the keys' gradients and
    the M, S update: the sequential part) and saves every chunk's start weights; the retrievals, which no later
    chunk reads, then run for all chunks at once as batched matmuls, as chunked linear attention computes its chunk
    states first and its outputs after. The same values; fewer sequential kernels (more than half of a deep chunk
    step's matmuls are retrieval) for one more copy of the per-chunk weights, [T/b, d_in, d_out] per layer.
    """
    dt = jnp.promote_types(q.dtype, jnp.float32)
    cast = lambda x: x.astype(dt)
    q, k, v, theta, eta, alpha = map(cast, (q, k, v, theta, eta, alpha))
    params = tuple(map(cast, init_params))
    momentum = tuple(map(cast, momentum0))
    if path == "auto":
        path = "linear" if len(params) == 1 else "factored"
    if path == "per_token":
        fn = lambda *a: _per_token_sequence(*a, chunk_size, retrieve_after_update, activation, remat, grad_clip)
        y, M, S = jax.vmap(fn)(q, k, v, theta, eta, alpha, params, momentum)
        return y, tuple(M), tuple(S)
    c = coefficients_batched(theta, eta, alpha, chunk_size, retrieve_after_update, coefficient_scan)
    if path == "linear":
        if len(params) != 1:
            raise ValueError(f"path='linear' needs depth 1, got {len(params)}")
        y, W, S = linear_core(q, k, v, c["G"], c["H"], c["C"], c["CW"], c["CS"], c["g"], c["h"], c["e"],
                              params[0], momentum[0], chunk_size=chunk_size, remat=remat, clip=grad_clip,
                              unroll=unroll, parallel_retrieval=parallel_retrieval)
        return y, (W,), (S,)
    if path != "factored":
        raise ValueError(f"unknown path {path!r}")
    y, M, S = factored_core(q, k, v, c, params, momentum, chunk_size=chunk_size, activation=activation,
                            remat=remat, clip=grad_clip, unroll=unroll, parallel_retrieval=parallel_retrieval)
    return y, tuple(M), tuple(S)
