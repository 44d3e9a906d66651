"""Titans chunked memory (pallas_kernels/chunked_memory): chunked form, Pallas kernels, api.

Every fast path is compared with the token loop of reference.py, which is itself checked against a
NumPy float64 loop over the paper's equations (arXiv 2501.00663 eq. 12-15, §3.2 chunking).
Tolerances come from float32 round-off on O(1) values over T <= 32 tokens (~40 eps of 1.2e-7).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm.errors import UserError
from pallas_kernels.chunked_memory import api, bench, reference, tpu, tpu_deep, triton, triton_deep, xla
from tests.memory.common import dots_by_scan_depth

pytestmark = pytest.mark.kernels

B, T, D = 2, 32, 8
F32_TOL = 5e-6   # max |diff| relative to max(1, max |ref|): ~40 float32 eps; observed <= 6e-7
F64_TOL = 1e-12
CLIP = 5.0  # about the median per-token gradient norm of make()'s data: some tokens are clipped, some not


def make(depth=1, T=T, d=D, batch=B, seed=0, edge_gates=False, dtype=jnp.float32):
    """Unit-norm q, k; gates in [0, 1] (theta <= 0.3); optional exact 0/1 gates; random momentum."""
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(r.normal(size=(batch, T, d))), unit(r.normal(size=(batch, T, d)))
    v = r.normal(size=(batch, T, d))
    theta = 0.3 * r.uniform(size=(batch, T))
    eta = r.uniform(size=(batch, T))
    alpha = 0.2 * r.uniform(size=(batch, T))
    if edge_gates:  # gates at the ends of [0, 1] must not produce nan/inf (no divisions by products)
        eta[:, 5], alpha[:, 9], alpha[:, 3], eta[:, 12] = 0.0, 1.0, 0.0, 1.0
    params = tuple(r.normal(size=(batch, d, d)) / np.sqrt(d) for _ in range(depth))
    mom = tuple(0.1 * r.normal(size=(batch, d, d)) for _ in range(depth))
    c = lambda x: jnp.asarray(x, dtype)
    return (c(q), c(k), c(v), c(theta), c(eta), c(alpha), tuple(map(c, params)), tuple(map(c, mom)))


def assert_close(got, want, tol=F32_TOL, what=""):
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        assert np.all(np.isfinite(g)), (what, i)
        err, scale = np.max(np.abs(g - w)), max(1.0, np.max(np.abs(w)))
        assert err <= tol * scale, f"{what} leaf {i}: max|diff|={err:.3g} > {tol:.1e} * {scale:.3g}"


@functools.cache
def _jitted(fn, **kw):
    """One jit per (function, static options): eager dispatch of the scans would dominate run time."""
    return jax.jit(functools.partial(fn, **kw))


def ref(args, b, after, act="silu"):
    f = _jitted(reference.chunked_memory_reference, chunk_size=b, retrieve_after_update=after,
                activation=act)
    return f(*args)


def run_xla(args, b, after, act="silu", **kw):
    return _jitted(xla.chunked_memory_xla, chunk_size=b, retrieve_after_update=after, activation=act,
                   **kw)(*args)


def outer_loss(fn, seed=1):
    """Scalar with random cotangents on y and both final states: exercises every output."""
    def loss(*args):
        y, M, S = fn(*args)
        r = np.random.default_rng(seed)
        out = jnp.sum(y * jnp.asarray(r.normal(size=y.shape), y.dtype))
        for x in M + S:
            out = out + jnp.sum(x * jnp.asarray(r.normal(size=x.shape), x.dtype))
        return out
    return loss


ALL_ARGS = tuple(range(8))


@functools.cache
def ref_grad(b, after):
    """Jitted gradient of the reference (second order through jax.grad), shared between tests."""
    return jax.jit(jax.grad(outer_loss(lambda *a: ref(a, b, after)), ALL_ARGS))


# ------------------------------------------------------------------------------ the spec vs the paper
def numpy_linear_loop(q, k, v, theta, eta, alpha, W0, S0, b, after, clip=0.0, clipped=None):
    """Paper equations for linear memory in float64 NumPy: grad ||kW - v||^2 = 2 k^T (kW - v); with clip > 0
    each gradient is scaled by min(1, clip / ||u||_F) (and `clipped`, a list, collects whether it was)."""
    q, k, v, theta, eta, alpha, W, S = (np.asarray(x, np.float64) for x in
                                        (q, k, v, theta, eta, alpha, W0, S0))
    ys = np.zeros(v.shape)
    for n in range(q.shape[0]):
        M, Sn, Mstart = W[n].copy(), S[n].copy(), None
        for t in range(q.shape[1]):
            if t % b == 0:
                Mstart = M.copy()
            u = 2.0 * np.outer(k[n, t], k[n, t] @ Mstart - v[n, t])
            if clip:
                norm = np.linalg.norm(u)
                u = u * min(1.0, clip / norm)
                clipped.append(norm > clip)
            Sn = eta[n, t] * Sn - theta[n, t] * u
            M_new = (1.0 - alpha[n, t]) * M + Sn
            ys[n, t] = q[n, t] @ (M_new if after else M)
            M = M_new
        W[n], S[n] = M, Sn
    return ys, W, S


@pytest.mark.parametrize("b,after", [(1, False), (4, True), (8, False)])
def test_reference_matches_numpy_paper_loop(b, after):
    args = make(edge_gates=True)
    y, M, S = ref(args, b, after)
    y64, W64, S64 = numpy_linear_loop(*args[:6], args[6][0], args[7][0], b, after)
    assert_close((y, M[0], S[0]), (y64, W64, S64), what="reference vs numpy")


# ----------------------------------------------------------------------------------- chunked form
@pytest.mark.parametrize("depth,after", [(1, False), (2, True)])
def test_chunk_size_1_equals_sequential(depth, after):
    args = make(depth)
    assert_close(run_xla(args, 1, after), ref(args, 1, after), what="chunk 1")


@pytest.mark.parametrize("depth,b,after,act", [(1, 8, True, "silu"), (2, 8, False, "silu"),
                                               (2, 4, True, "gelu")])
def test_chunked_equals_direct_chunked_loop(depth, b, after, act):
    args = make(depth, edge_gates=True)
    want = ref(args, b, after, act)
    # every path of the chunked form: depth 1 matmul form (kernel math), outer-product factored form,
    # literal per-token weights (vmap(grad) + scans on weight copies)
    for path in (["linear"] if depth == 1 else []) + ["factored", "per_token"]:
        assert_close(run_xla(args, b, after, act, path=path), want, what=path)
    # and the chunk semantics matter: gradients at chunk-start weights differ from per-token ones
    assert np.max(np.abs(np.asarray(want[0] - ref(args, 1, after, act)[0]))) > 1e-3


@pytest.mark.parametrize("depth", [1, 2])
def test_float64_chunked_equals_loop(depth):
    with jax.enable_x64(True):
        args = make(depth, edge_gates=True, dtype=jnp.float64)
        got = run_xla(args, 8, False)
        assert got[0].dtype == jnp.float64
        assert_close(got, ref(args, 8, False), tol=F64_TOL, what="float64")


@pytest.mark.parametrize("depth,b,after", [(1, 8, False), (2, 4, True)])
def test_outer_gradients_match_reference(depth, b, after):
    args = make(depth, T=16, edge_gates=True)
    kw = dict(chunk_size=b, retrieve_after_update=after)
    g_ref = ref_grad(b, after)(*args)
    g_xla = jax.jit(jax.grad(outer_loss(lambda *a: xla.chunked_memory_xla(*a, **kw)), ALL_ARGS))(*args)
    assert_close(g_xla, g_ref, what="grad")
    # gradients reach the gates and M_0 through the inner updates (not cut by stop_gradient)
    for g in (g_xla[3], g_xla[4], g_xla[5], g_xla[6][0]):
        assert float(jnp.max(jnp.abs(g))) > 1e-3


@pytest.mark.parametrize("depth", [1, 2])
def test_unrolled_chunk_loop_is_the_same_function(depth):
    """unroll=k runs k chunks per iteration of the chunk loop: same values and gradients; unroll = #chunks leaves
    no loop at all (with the associative coefficients, which have none either)."""
    args = make(depth, T=32, edge_gates=True)  # 4 chunks of 8
    kw = dict(chunk_size=8, retrieve_after_update=False, coefficient_scan="associative")
    fn = lambda u: (lambda *a: xla.chunked_memory_xla(*a, unroll=u, **kw))
    want = jax.jit(fn(1))(*args)
    g_want = jax.jit(jax.grad(outer_loss(fn(1)), ALL_ARGS))(*args)
    for u in (2, 4, 7):  # 7 > 4 chunks: capped
        assert_close(jax.jit(fn(u))(*args), want, what=f"unroll {u}")
        assert_close(jax.jit(jax.grad(outer_loss(fn(u)), ALL_ARGS))(*args), g_want, what=f"unroll {u} grad")
    whiles = lambda u: jax.jit(fn(u)).lower(*args).as_text().count("stablehlo.while")
    assert whiles(1) >= 1 and whiles(2) >= 1 and whiles(4) == 0, (whiles(1), whiles(2), whiles(4))


@pytest.mark.parametrize("depth,after,clip,remat,unroll", [(1, False, 0.0, True, 1), (1, True, CLIP, False, 2),
                                                          (2, False, CLIP, True, 1), (2, True, 0.0, False, 4),
                                                          (3, False, 0.0, True, 2)])
def test_parallel_retrieval_equals_reference(depth, after, clip, remat, unroll):
    """parallel_retrieval=True: the chunk loop carries only the state, the retrievals run after it for all chunks.
    Values and outer gradients against the token loop, as the in-loop form is held to."""
    args = make(depth, T=32, edge_gates=True)  # 4 chunks of 8
    kw = dict(chunk_size=8, retrieve_after_update=after, grad_clip=clip)
    fn = lambda *a: xla.chunked_memory_xla(*a, remat=remat, unroll=unroll, parallel_retrieval=True, **kw)
    want_fn = lambda *a: reference.chunked_memory_reference(*a, **kw)
    assert_close(jax.jit(fn)(*args), jax.jit(want_fn)(*args), what="parallel retrieval forward")
    g_ref = jax.jit(jax.grad(outer_loss(want_fn), ALL_ARGS))(*args)
    assert_close(jax.jit(jax.grad(outer_loss(fn), ALL_ARGS))(*args), g_ref, what="parallel retrieval backward")


@pytest.mark.parametrize("depth,loop_dots", [(1, (7, 3)), (2, (15, 7))])
def test_parallel_retrieval_moves_the_retrieval_out_of_the_loop(depth, loop_dots):
    """The chunk loop body keeps only the state update: linear 7 -> 3 matmuls per chunk (k W, and k^T E into W and
    S), depth 2: 15 -> 7 (keys forward 2, their backward 1, 2 updates per layer); the retrieval's matmuls run outside
    the loop, once for all chunks."""
    args = make(depth, T=32)
    kw = dict(chunk_size=8, retrieve_after_update=False, coefficient_scan="associative")
    count = lambda parallel: dots_by_scan_depth(jax.make_jaxpr(
        lambda *a: xla.chunked_memory_xla(*a, parallel_retrieval=parallel, **kw))(*args).jaxpr)
    default, parallel = count(False), count(True)
    (out_default, in_default), (out_parallel, in_parallel) = ((d.get(0, 0), d.get(1, 0)) for d in (default, parallel))
    assert (in_default, in_parallel) == loop_dots, (default, parallel)
    assert out_parallel - out_default == in_default - in_parallel  # moved out of the loop, not dropped


@pytest.mark.parametrize("after,b", [(False, 8), (True, 8), (False, 5)])
def test_coefficient_scans_agree(after, b):
    """All ways of computing the chunk coefficients (CPU default 'sequential'; 'associative', the GPU/TPU
    default; 'doubling') give the same values and gradients, with gates of exactly 0 and 1, also for a chunk
    size that is not a power of 2; the tests above run the CPU default."""
    _, _, _, theta, eta, alpha, _, _ = make(T=40, edge_gates=True)
    scans = ("sequential", "associative", "doubling")
    coeffs = {scan: jax.jit(lambda *g, scan=scan: xla.coefficients_batched(*g, b, after, scan)) for scan in scans}
    want = coeffs["sequential"](theta, eta, alpha)
    assert xla.default_coefficient_scan() == "sequential"  # what the other tests on this CPU exercise
    r = np.random.default_rng(3)
    weights = {n: jnp.asarray(r.normal(size=x.shape), x.dtype) for n, x in want.items()}
    grads = {scan: jax.jit(jax.grad(lambda *g, f=f: sum(jnp.sum(f(*g)[n] * weights[n]) for n in weights),
                                    (0, 1, 2)))(theta, eta, alpha)
             for scan, f in coeffs.items()}
    assert min(float(jnp.max(jnp.abs(g))) for g in grads["sequential"]) > 1e-3
    for scan in scans[1:]:
        got = coeffs[scan](theta, eta, alpha)
        assert sorted(got) == sorted(want)
        assert_close([got[n] for n in sorted(got)], [want[n] for n in sorted(want)], what=f"{scan} coefficients")
        assert_close(grads[scan], grads["sequential"], what=f"{scan} coefficient gradients")


def test_decay_matrix_is_the_product_of_gates():
    """_decay_matrix (doubling) against the definition L_ji = a_{i+1} ... a_j, in float64, b = 1..9."""
    with jax.enable_x64(True):
        r = np.random.default_rng(0)
        for b in range(1, 10):
            a = r.uniform(size=(2, b))
            a[0, b // 2] = 0.0
            want = np.zeros((2, b, b))
            for n in range(2):
                for j in range(b):
                    for i in range(j + 1):
                        want[n, j, i] = np.prod(a[n, i + 1:j + 1])
            got = np.asarray(xla._decay_matrix(jnp.asarray(a)))
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15, err_msg=f"b={b}")


@pytest.mark.parametrize("depth,after", [(1, False), (1, True), (2, False)])
def test_causality(depth, after):
    args = make(depth)
    t = 13  # inside the second chunk of 8
    f = jax.jit(lambda *a: xla.chunked_memory_xla(*a, chunk_size=8, retrieve_after_update=after)[0])
    y = f(*args)
    r = np.random.default_rng(7)
    bumped = [x.at[:, t + 1:].add(jnp.asarray(r.uniform(0.1, 0.5, x[:, t + 1:].shape), x.dtype))
              for x in args[:6]]
    y2 = f(*bumped, args[6], args[7])
    np.testing.assert_array_equal(np.asarray(y2[:, :t + 1]), np.asarray(y[:, :t + 1]))
    assert np.max(np.abs(np.asarray(y2[:, t + 1:] - y[:, t + 1:]))) > 1e-3
    if not after:  # reading M_{t-1}: y_t does not see token t's own key, value or gates
        own = [x.at[:, t].add(0.3) for x in args[1:6]]
        y3 = f(args[0], *own, args[6], args[7])
        np.testing.assert_array_equal(np.asarray(y3[:, :t + 1]), np.asarray(y[:, :t + 1]))


@pytest.mark.parametrize("depth,impl", [(2, "xla"), (1, "triton"), (2, "triton"), (2, "mosaic")])
def test_streaming_two_halves_equal_one_pass(depth, impl):
    args = make(depth)
    f = _jitted(api.chunked_memory, chunk_size=8, retrieve_after_update=True, implementation=impl,
                interpret=True)
    y, M, S = f(*args)
    h = T // 2
    first = [x[:, :h] for x in args[:6]]
    second = [x[:, h:] for x in args[:6]]
    y1, M1, S1 = f(*first, args[6], args[7])
    y2, M2, S2 = f(*second, M1, S1)
    assert_close((jnp.concatenate([y1, y2], axis=1), M2, S2), (y, M, S), what="streaming")


# ------------------------------------------------------------------------------------ Pallas kernels
KERNELS = {
    "triton": lambda *a, **kw: triton.chunked_memory_triton(*a, interpret=True, **kw),
    "mosaic": lambda *a, **kw: tpu.chunked_memory_mosaic(*a, interpret=True, **kw),
    "triton_deep": lambda *a, **kw: triton_deep.chunked_memory_triton_deep(*a, interpret=True, **kw),
    "mosaic_deep": lambda *a, **kw: tpu_deep.chunked_memory_mosaic_deep(*a, interpret=True, **kw),
}


@pytest.mark.parametrize("impl,depth,after", [("triton", 1, False), ("mosaic", 1, True), ("triton_deep", 2, False),
                                              ("triton_deep", 2, True), ("mosaic_deep", 2, False),
                                              ("mosaic_deep", 2, True)])
def test_pallas_interpret_forward_and_backward(impl, depth, after):
    args = make(depth, T=16, edge_gates=True)
    kw = dict(chunk_size=8, retrieve_after_update=after)
    fn = lambda *a: KERNELS[impl](*a, **kw)
    assert_close(jax.jit(fn)(*args), ref(args, 8, after), what=f"{impl} forward")
    g_ref = ref_grad(8, after)(*args)
    g_ker = jax.jit(jax.grad(outer_loss(fn), ALL_ARGS))(*args)
    assert_close(g_ker, g_ref, what=f"{impl} backward")


@pytest.mark.parametrize("v_blocks,after", [(2, False), (4, True)])
def test_triton_value_column_blocks(v_blocks, after):
    """The linear Triton kernel split over value columns (grid (batch, v_blocks), partial sums for q, k and the
    coefficients' cotangents) equals the token loop, forward and backward, with uneven d_k != d_v."""
    r = np.random.default_rng(7)
    q, k, _, th, et, al, _, _ = make(1, T=16, edge_gates=True)
    dv = 2 * D
    v = jnp.asarray(r.normal(size=(B, 16, dv)), jnp.float32)
    W0 = jnp.asarray(r.normal(size=(B, D, dv)) / np.sqrt(D), jnp.float32)
    S0 = jnp.asarray(0.1 * r.normal(size=(B, D, dv)), jnp.float32)
    args = (q, k, v, th, et, al, (W0,), (S0,))
    kw = dict(chunk_size=8, retrieve_after_update=after)
    fn = lambda *a: triton.chunked_memory_triton(*a, interpret=True, v_blocks=v_blocks, **kw)
    want_fn = lambda *a: reference.chunked_memory_reference(*a, **kw)
    assert_close(jax.jit(fn)(*args), jax.jit(want_fn)(*args), what="v-blocked forward")
    g_ref = jax.jit(jax.grad(outer_loss(want_fn), ALL_ARGS))(*args)
    assert_close(jax.jit(jax.grad(outer_loss(fn), ALL_ARGS))(*args), g_ref, what="v-blocked backward")


def test_triton_value_column_blocks_limits():
    sd = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    with pytest.raises(NotImplementedError, match="does not divide"):
        triton.check_supported(sd.shape, sd.shape, 1, 8, True, v_blocks=3)
    with pytest.raises(NotImplementedError, match="clipping needs v_blocks=1"):
        triton.check_supported(sd.shape, sd.shape, 1, 8, True, v_blocks=2, grad_clip=1.0)
    with pytest.raises(NotImplementedError, match=">= 16"):
        triton.check_supported((B, 64, 32), (B, 64, 32), 1, 16, False, v_blocks=4)  # 8 columns per block


@pytest.mark.parametrize("impl", ["triton_deep", "mosaic_deep"])
def test_deep_kernels_interpret_three_layers_gelu_uneven_widths(impl):
    """Depth 3, GELU, hidden width != d (weights [d, 2d], [2d, 2d], [2d, d]): the kernel's per-layer residual
    slicing, forward and backward, against the token loop."""
    r = np.random.default_rng(4)
    q, k, v, th, et, al, _, _ = make(1, T=16, edge_gates=True)
    dims = [D, 2 * D, 2 * D, D]
    params = tuple(jnp.asarray(r.normal(size=(B, a, c)) / np.sqrt(a), jnp.float32) for a, c in zip(dims, dims[1:]))
    mom = tuple(0.1 * jnp.asarray(r.normal(size=p.shape), jnp.float32) for p in params)
    args = (q, k, v, th, et, al, params, mom)
    kw = dict(chunk_size=4, retrieve_after_update=True, activation="gelu")
    fn = lambda *a: KERNELS[impl](*a, **kw)
    want_fn = lambda *a: reference.chunked_memory_reference(*a, **kw)
    assert_close(jax.jit(fn)(*args), jax.jit(want_fn)(*args), what="deep forward")
    g_ref = jax.jit(jax.grad(outer_loss(want_fn), ALL_ARGS))(*args)
    assert_close(jax.jit(jax.grad(outer_loss(fn), ALL_ARGS))(*args), g_ref, what="deep backward")


@pytest.mark.parametrize("depth,clip", [(1, 0.0), (2, 0.0), (1, CLIP), (2, CLIP)])
def test_mosaic_tpu_simulator_forward(depth, clip):
    from jax.experimental.pallas import tpu as pltpu
    args = make(depth, T=16, batch=1)
    fn = tpu.chunked_memory_mosaic if depth == 1 else tpu_deep.chunked_memory_mosaic_deep
    kw = dict(chunk_size=8, grad_clip=clip)
    got = jax.jit(lambda *a: fn(*a, interpret=pltpu.InterpretParams(), **kw))(*args)
    want = jax.jit(lambda *a: reference.chunked_memory_reference(*a, **kw))(*args)
    assert_close(got, want, what="mosaic InterpretParams")


@pytest.mark.parametrize("impl,platform,call", [("triton", "cuda", "__gpu$xla.gpu.triton"),
                                                ("mosaic", "tpu", "tpu_custom_call"),
                                                ("triton_deep", "cuda", "__gpu$xla.gpu.triton"),
                                                ("mosaic_deep", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_kernels_lower_for_accelerators(impl, platform, call, clip):
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    Bl, Tl, d = 2, 64, 16
    params = (sd(Bl, d, 2 * d), sd(Bl, 2 * d, d)) if impl.endswith("_deep") else (sd(Bl, d, d),)
    args = (sd(Bl, Tl, d), sd(Bl, Tl, d), sd(Bl, Tl, d), sd(Bl, Tl), sd(Bl, Tl), sd(Bl, Tl), params, params)
    fn = {"triton": triton.chunked_memory_triton, "mosaic": tpu.chunked_memory_mosaic,
          "triton_deep": triton_deep.chunked_memory_triton_deep,
          "mosaic_deep": tpu_deep.chunked_memory_mosaic_deep}[impl]
    f = lambda *a: fn(*a, chunk_size=16, grad_clip=clip)
    fwd = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert fwd.count(call) == 1
    both = jax.jit(jax.grad(outer_loss(f), ALL_ARGS)).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
    assert both.count(call) == 2  # forward kernel + Pallas backward kernel


# ----------------------------------------------------------------------------- inner gradient clipping


def test_reference_clip_matches_numpy_loop():
    args = make(edge_gates=True)
    kw = dict(chunk_size=4, retrieve_after_update=False)
    got = jax.jit(lambda *a: reference.chunked_memory_reference(*a, grad_clip=CLIP, **kw))(*args)
    clipped = []
    want = numpy_linear_loop(*args[:6], args[6][0], args[7][0], 4, False, clip=CLIP, clipped=clipped)
    assert 0.2 < np.mean(clipped) < 0.8, np.mean(clipped)  # the test exercises both branches
    assert_close((got[0], got[1][0], got[2][0]), want, what="clipped reference vs numpy")
    assert np.max(np.abs(np.asarray(got[0]) - np.asarray(ref(args, 4, False)[0]))) > 1e-3  # clipping acts


@pytest.mark.parametrize("depth,b,after", [(1, 1, False), (1, 8, True), (2, 1, True), (2, 8, False)])
def test_clipped_chunked_equals_reference(depth, b, after):
    args = make(depth, edge_gates=True)
    kw = dict(chunk_size=b, retrieve_after_update=after, grad_clip=CLIP)
    want = jax.jit(lambda *a: reference.chunked_memory_reference(*a, **kw))(*args)
    for path in (["linear"] if depth == 1 else []) + ["factored", "per_token"]:
        assert_close(run_xla(args, b, after, path=path, grad_clip=CLIP), want, what=f"clipped {path}")
    assert np.max(np.abs(np.asarray(want[0] - ref(args, b, after)[0]))) > 1e-3


@pytest.mark.parametrize("impl,depth", [("xla", 1), ("xla", 2), ("triton", 1), ("mosaic", 1), ("triton_deep", 2),
                                        ("mosaic_deep", 2)])
def test_clipped_gradients_match_reference(impl, depth):
    """Outer gradients through the clipped inner updates (the linear kernels' hand-written backward included)
    against jax.grad of the token loop."""
    args = make(depth, T=16, edge_gates=True)
    kw = dict(chunk_size=8, retrieve_after_update=False, grad_clip=CLIP)
    fn = (lambda *a: xla.chunked_memory_xla(*a, **kw)) if impl == "xla" else (lambda *a: KERNELS[impl](*a, **kw))
    want_fn = lambda *a: reference.chunked_memory_reference(*a, **kw)
    assert_close(jax.jit(fn)(*args), jax.jit(want_fn)(*args), what=f"clipped {impl} forward")
    g_ref = jax.jit(jax.grad(outer_loss(want_fn), ALL_ARGS))(*args)
    assert_close(jax.jit(jax.grad(outer_loss(fn), ALL_ARGS))(*args), g_ref, what=f"clipped {impl} backward")


def test_triton_value_column_blocks_lower_for_cuda():
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    Bl, Tl, d = 2, 64, 32
    args = (sd(Bl, Tl, d), sd(Bl, Tl, d), sd(Bl, Tl, d), sd(Bl, Tl), sd(Bl, Tl), sd(Bl, Tl), (sd(Bl, d, d),),
            (sd(Bl, d, d),))
    f = lambda *a: triton.chunked_memory_triton(*a, chunk_size=16, v_blocks=2)
    both = jax.jit(jax.grad(outer_loss(f), ALL_ARGS)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert both.count("__gpu$xla.gpu.triton") == 2


# ----------------------------------------------------------------------------------------------- api
def test_api_dispatch_and_fallback(caplog, monkeypatch):
    args = make(2)
    want = ref(args, 8, False)
    assert_close(_jitted(api.chunked_memory, chunk_size=8)(*args), want, what="api default")  # cpu: xla
    for impl in ("triton", "mosaic"):  # asked for: the deep kernels run (interpreted)
        with caplog.at_level(logging.INFO, logger=api.__name__):
            got = _jitted(api.chunked_memory, chunk_size=8, implementation=impl, interpret=True)(*args)
        assert_close(got, want, what=f"deep {impl}")
        assert not [r for r in caplog.records if "falling back" in r.getMessage()]
        caplog.clear()
    # chosen automatically on an accelerator, deep memory stays on XLA (kernels not yet measured there)
    monkeypatch.setattr(api, "_pallas_for_backend", lambda backend: "triton")
    with caplog.at_level(logging.INFO, logger=api.__name__):
        got = jax.jit(functools.partial(api.chunked_memory, chunk_size=8))(*args)
    assert_close(got, want, what="auto deep")
    lines = [r for r in caplog.records if "falling back to xla" in r.getMessage()]
    assert len(lines) == 1 and "depth 2" in lines[0].getMessage()
    monkeypatch.undo()
    caplog.clear()
    lin = make(1)
    with caplog.at_level(logging.INFO, logger=api.__name__):
        got = _jitted(api.chunked_memory, chunk_size=8, implementation="mosaic")(*lin[:6], lin[6])  # no TPU
    assert len([r for r in caplog.records if "falling back" in r.getMessage()]) == 1
    assert_close(got, ref(lin[:7] + (tuple(jnp.zeros_like(p) for p in lin[6]),), 8, False), what="mom0")
    got = _jitted(api.chunked_memory, chunk_size=4, implementation="reference")(*lin)
    assert_close(got, ref(lin, 4, False))


@pytest.mark.parametrize("change,match", [
    (dict(chunk_size=5), "chunk_size"),
    (dict(implementation="cuda"), "implementation"),
    (dict(activation="relu"), "activation"),
    (dict(theta_shape=(B, T - 1)), "theta"),
    (dict(param_shape=(B, D + 1, D)), r"init_params\[0\]"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(unroll=0), "unroll"),
    (dict(grad_clip=float("nan")), "grad_clip"),
])
def test_user_errors(change, match):
    q, k, v, th, et, al, params, mom = make(1)
    if "theta_shape" in change:
        th = jnp.zeros(change.pop("theta_shape"))
    if "param_shape" in change:
        params = (jnp.zeros(change.pop("param_shape")),)
        mom = None
    kw = dict(chunk_size=8) | change
    with pytest.raises(UserError, match=match):
        api.chunked_memory(q, k, v, th, et, al, params, mom, **kw)


def test_bench_runs_and_agrees():
    res = bench.run(T=32, d=8, batch=2, chunk_size=8, depth=1, repeats=1)
    assert res["sequential_s"] > 0 and res["chunked_s"] > 0
    assert res["max_abs_diff_y"] <= F32_TOL * max(1.0, res["max_abs_y"])
    assert res["max_abs_diff_state"] <= F32_TOL * max(1.0, res["max_abs_state"])
    assert res["finite_grad"] and res["sequential_fwd_bwd_s"] > 0 and res["chunked_fwd_bwd_s"] > 0
    assert res["max_abs_diff_grad"] <= F32_TOL * max(1.0, res["max_abs_grad"])


@pytest.mark.parametrize("depth, d, chunk, fits", [
    (1, 64, 64, True), (1, 128, 32, True), (1, 128, 64, False),  # linear: d 128 x chunk 64 overflowed on an H200
    (2, 64, 16, True), (2, 64, 64, False), (2, 128, 16, False),  # deep: only d 64 / hidden 128 / chunk 16 ran
])
def test_api_gpu_dispatch_keeps_shapes_triton_did_not_fit(depth, d, chunk, fits, caplog, monkeypatch):
    """On a GPU, api.chunked_memory sends a shape to Triton only if one at least as large in every dimension ran
    there (Triton's shared-memory overflow shows only when the compiled kernel runs, too late to fall back).
    Traced with eval_shape (no GPU here): the chosen path shows in the log."""
    monkeypatch.setattr(api, "_pallas_for_backend", lambda backend: "triton")
    args = make(depth, T=2 * chunk, d=d, batch=1)
    with caplog.at_level(logging.INFO, logger=api.__name__):
        jax.eval_shape(functools.partial(api.chunked_memory, chunk_size=chunk, implementation="triton"), *args)
    fell_back = [r.getMessage() for r in caplog.records if "falling back to xla" in r.getMessage()]
    if fits:
        assert not fell_back
    else:
        assert len(fell_back) == 1 and "measured to fit" in fell_back[0]
    caplog.clear()  # calling the kernel directly (how gpu_check measures new shapes) skips the check
    kernel = triton.chunked_memory_triton if depth == 1 else triton_deep.chunked_memory_triton_deep
    jax.eval_shape(functools.partial(kernel, chunk_size=chunk), *args)
    assert not caplog.records
