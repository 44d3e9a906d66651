"""Tests for pallas_kernels/pkm_lookup (product-key memory lookup, arXiv 2412.09764 §3).

Slow obvious references: a float64 NumPy brute force over all N products (top-k, output, dV), and
reference.py (dense over N, autodiff) for the query / sub-key gradients.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from memlm.errors import UserError
from pallas_kernels.pkm_lookup import api, tpu
from pallas_kernels.pkm_lookup.reference import pkm_lookup_reference
from pallas_kernels.pkm_lookup.sharded import pkm_lookup_sharded
from pallas_kernels.pkm_lookup.tpu import pkm_lookup_tpu
from pallas_kernels.pkm_lookup.triton import check_supported, pkm_lookup_triton
from pallas_kernels.pkm_lookup.xla import pkm_lookup_xla, pkm_select

pytestmark = pytest.mark.kernels

# float32: scores are sums of k_dim/2 = 16 products of O(1) numbers, so ~1e-6 relative error.
RTOL, ATOL = 1e-5, 1e-5


def _inputs(t=20, h=2, k_dim=32, sqrt_n=16, d_v=16, top_k=4, seed=0):
    """Random float32 (queries, sub_keys1, sub_keys2, values), (r_out, r_w): NumPy, so no compiles."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    args = (f(t, h, k_dim), f(h, sqrt_n, k_dim // 2), f(h, sqrt_n, k_dim // 2), f(sqrt_n * sqrt_n, d_v))
    return args, (f(t, d_v), f(t, h, top_k))


# The interpreted Pallas kernels are large HLO loops; XLA:CPU's backend optimisation is most of their
# compile time and none of their (tiny) run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fwd_and_grad(fn, args, cot, compiler_options=None):
    """jit(fn forward, grads of <out, r_out> + <weights, r_w> w.r.t. queries, sub-keys, values)."""
    r_out, r_w = cot

    def loss(*a):
        out, _, w = fn(*a)
        return jnp.sum(out * r_out) + jnp.sum(w * r_w)

    f = jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)), compiler_options=compiler_options)
    return f(*args)


def _numpy_lookup(q, k1, k2, v, top_k, r_out):
    """float64 brute force: all N product scores, top-k by sort, softmax, summed heads, and dV."""
    q, k1, k2, v, r_out = (np.asarray(x, np.float64) for x in (q, k1, k2, v, r_out))
    t, h, k_dim = q.shape
    half = k_dim // 2
    out = np.zeros((t, v.shape[1]))
    d_v = np.zeros_like(v)
    idx = np.zeros((t, h, top_k), np.int64)
    scores = np.zeros((t, h, top_k))
    for ti in range(t):
        for hi in range(h):
            s = (k1[hi] @ q[ti, hi, :half])[:, None] + (k2[hi] @ q[ti, hi, half:])[None, :]
            s = s.reshape(-1)
            order = np.argsort(-s, kind="stable")[:top_k]
            idx[ti, hi], scores[ti, hi] = order, s[order]
            w = np.exp(s[order] - s[order].max())
            w /= w.sum()
            out[ti] += w @ v[order]
            for wk, n in zip(w, order):
                d_v[n] += wk * r_out[ti]
    return out, idx, scores, d_v


@pytest.mark.parametrize("sqrt_n,top_k,seed", [(16, 4, 0), (10, 3, 1), (8, 8, 2)])
def test_top_k_equals_brute_force_over_all_products(sqrt_n, top_k, seed):
    (q, k1, k2, v), _ = _inputs(t=12, sqrt_n=sqrt_n, top_k=top_k, seed=seed)
    scores, idx = jax.jit(functools.partial(pkm_select, top_k=top_k))(q, k1, k2)
    _, want_idx, want_scores, _ = _numpy_lookup(q, k1, k2, v, top_k, np.zeros((12, v.shape[1])))
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(want_idx, -1))
    np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=ATOL)
    assert np.all(np.diff(np.asarray(scores), axis=-1) <= 0)  # descending, as lax.top_k


@pytest.fixture(scope="module")
def reference_run():
    # sqrt_n = 32 = 2 chunks of the Triton kernel's running sub-key top-k; 20 tokens pad to its block of 16
    args, cot = _inputs(sqrt_n=32)
    return args, cot, _fwd_and_grad(functools.partial(pkm_lookup_reference, top_k=4), args, cot)


@pytest.fixture(scope="module")
def xla_run(reference_run):
    args, cot, _ = reference_run
    return _fwd_and_grad(functools.partial(pkm_lookup_xla, top_k=4), args, cot)


def test_reference_and_xla_match_float64_brute_force_forward_and_dvalues(reference_run, xla_run):
    args, (r_out, _), ref = reference_run
    out_np, idx_np, _, dv_np = _numpy_lookup(*args, 4, r_out)
    for (out, idx, w), grads in (ref, xla_run):
        np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(idx_np, -1))
        np.testing.assert_allclose(out, out_np, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-6)
        # the weights term of the loss does not reach V: dV = Σ w·r_out over the selected rows
        np.testing.assert_allclose(grads[3], dv_np, rtol=RTOL, atol=ATOL)


def _check_against(reference_run, got):
    _, _, ((ref_out, ref_idx, ref_w), ref_g) = reference_run
    (out, idx, w), g = got
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(w, ref_w, rtol=RTOL, atol=1e-6)
    for name, a, b in zip(("queries", "sub_keys1", "sub_keys2", "values"), g, ref_g):
        assert float(jnp.max(jnp.abs(b))) > 0.1, name  # the gradient is not trivially zero
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


def test_xla_forward_and_gradients_equal_reference(reference_run, xla_run):
    _check_against(reference_run, xla_run)


def _avals(jaxpr):
    """Every array shape in a jaxpr, sub-jaxprs (custom_vjp, scan, cond, pjit) included."""
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(getattr(var, "aval", None), "shape"):
                yield tuple(var.aval.shape)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def _dense_in_n(shapes, t, n):
    return [s for s in shapes if int(np.prod(s)) >= t * n or t * n in s or (t in s and n in s)]


def test_xla_backward_has_no_tokens_by_n_array():
    t, sqrt_n = 24, 16
    n = sqrt_n * sqrt_n
    args, (r_out, r_w) = _inputs(t=t, sqrt_n=sqrt_n)

    def grad_jaxpr(fn):
        def loss(*a):
            out, _, w = fn(*a, top_k=4)
            return jnp.sum(out * r_out) + jnp.sum(w * r_w)

        return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args).jaxpr

    # The checker catches the dense reference ([tokens, heads, N] scores and their gradient) ...
    assert _dense_in_n(list(_avals(grad_jaxpr(pkm_lookup_reference))), t, n)
    # ... and the XLA path holds nothing of that size, forward or backward.
    shapes = list(_avals(grad_jaxpr(pkm_lookup_xla)))
    assert (n, 16) in shapes  # the values gradient itself
    assert not _dense_in_n(shapes, t, n)


def test_triton_kernel_interpret_equals_reference(reference_run):
    args, cot, _ = reference_run
    fn = functools.partial(pkm_lookup_triton, top_k=4, interpret=True)
    _check_against(reference_run, _fwd_and_grad(fn, args, cot, FAST_COMPILE))


def test_mosaic_kernel_interpret_equals_reference(reference_run, monkeypatch):
    # 3 token chunks of 8 (m = heads·k = 8): the SMEM chunking and the chained dV scatter are exercised.
    monkeypatch.setattr(tpu, "MAX_PREFETCH_ENTRIES", 64)
    args, cot, _ = reference_run
    fn = functools.partial(pkm_lookup_tpu, top_k=4, interpret=True, block_t=8)
    _check_against(reference_run, _fwd_and_grad(fn, args, cot, FAST_COMPILE))


def _lower_grad_text(fn, platform):
    args, (r_out, r_w) = _inputs(t=32)

    def loss(*a):
        out, _, w = fn(*a)
        return jnp.sum(out * r_out) + jnp.sum(w * r_w)

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return f.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_triton_kernels_lower_for_cuda():
    text = _lower_grad_text(functools.partial(pkm_lookup_triton, top_k=4), "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 2  # fused forward + fused backward (not Mosaic GPU)
    assert "mosaic_gpu" not in text


def test_mosaic_kernels_lower_for_tpu():
    text = _lower_grad_text(functools.partial(pkm_lookup_tpu, top_k=4, block_t=8), "tpu")
    assert text.count("tpu_custom_call") == 5  # select, bag | row-dot, scores backward, row scatter


SHARD_CASES = [  # (mesh shape, names, value_axis, token_axes)
    # tokens differ along the value axis: gather indices over the group, all_to_all / psum_scatter back
    ((2, 4), ("data", "model"), "model", ("data", "model")),
    # tokens replicated along the value axis: no gather, all_gather columns / psum rows
    ((2, 4), ("data", "model"), "model", ("data",)),
]


@pytest.fixture(scope="module")
def shard_single():
    args, cot = _inputs(t=32, k_dim=16, sqrt_n=8, d_v=16)
    return args, cot, _fwd_and_grad(functools.partial(pkm_lookup_xla, top_k=4), args, cot)


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("case", SHARD_CASES, ids=lambda c: f"{c[2]}-{c[3]}")
def test_sharded_equals_single_device(shard_single, case, layout):
    shape, names, value_axis, token_axes = case
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), names)
    args, cot, ((out1, idx1, w1), g1) = shard_single
    fn = functools.partial(pkm_lookup_sharded, top_k=4, mesh=mesh, value_axis=value_axis,
                           layout=layout, token_axes=token_axes)
    (out, idx, w), g = _fwd_and_grad(fn, args, cot)
    np.testing.assert_array_equal(idx, idx1)
    np.testing.assert_allclose(out, out1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(w, w1, rtol=RTOL, atol=1e-6)
    for name, a, b in zip(("queries", "sub_keys1", "sub_keys2", "values"), g, g1):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("n,top_k,needle", [(200, 4, "N=200"), (256, 17, "top_k: 17"), (256, 0, "top_k: 0")])
def test_bad_n_or_top_k_is_a_user_error(n, top_k, needle):
    sqrt_n = int(np.sqrt(n))
    q = jnp.zeros((4, 2, 8))
    k = jnp.zeros((2, sqrt_n, 4))
    for call in (lambda: api.pkm_lookup(q, k, k, jnp.zeros((n, 4)), top_k=top_k),
                 lambda: pkm_lookup_sharded(q, k, k, jnp.zeros((n, 4)), top_k=top_k, layout="rows",
                                            mesh=Mesh(np.array(jax.devices()[:1]), ("x",)),
                                            value_axis="x", token_axes=None)):
        with pytest.raises(UserError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_api_dispatch_and_single_fallback_log(caplog, monkeypatch):
    jaxpr = lambda fn, *a, **kw: str(jax.make_jaxpr(functools.partial(fn, **kw))(*a))
    api._logged.clear()
    with caplog.at_level(logging.INFO, logger=api.__name__):
        for t in (8, 9):  # two traces on CPU: no Pallas kernel -> exactly the xla computation, logged once
            args, _ = _inputs(t=t)
            assert jaxpr(api.pkm_lookup, *args, top_k=4) == jaxpr(pkm_lookup_xla, *args, top_k=4)
    assert len([r for r in caplog.records if "using xla" in r.message]) == 1
    assert jaxpr(api.pkm_lookup, *args, top_k=4, implementation="reference") == jaxpr(
        pkm_lookup_reference, *args, top_k=4)
    for impl in ("triton", "mosaic", "bogus"):  # no kernel for CPU (without interpret), unknown name
        with pytest.raises(UserError, match="pkm_lookup.implementation"):
            api.pkm_lookup(*args, top_k=4, implementation=impl)
    assert "pallas_call" in jaxpr(api.pkm_lookup, *args, top_k=4, implementation="triton", interpret=True)
    # On a GPU backend the default is xla (the Triton kernel measured slower on an H200; api docstring).
    (q, k1, k2, v), _ = _inputs(t=8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert jaxpr(api.pkm_lookup, q, k1, k2, v, top_k=4) == jaxpr(pkm_lookup_xla, q, k1, k2, v, top_k=4)
    # On TPU the Mosaic kernel is the default; shapes it cannot take fall back to xla with a log line.
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(api, "_run_kernel", lambda *a: (_ for _ in ()).throw(NotImplementedError("shape")))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=api.__name__):
        assert jaxpr(api.pkm_lookup, q, k1, k2, v, top_k=4) == jaxpr(pkm_lookup_xla, q, k1, k2, v, top_k=4)
    assert [r.message for r in caplog.records if "mosaic kernel unavailable" in r.message]
    # The Triton kernel's own limits (k_dim/2 = 8 < 16) still raise for an explicit choice.
    with pytest.raises(NotImplementedError):
        check_supported(16, 16, 16, 4)


def test_bf16_values_keep_dtypes():
    (q, k1, k2, v), (r_out, _) = _inputs(t=8)

    @jax.jit
    def run(q, k1, k2, v):
        out, idx, w = pkm_lookup_xla(q, k1, k2, v.astype(jnp.bfloat16), top_k=4)
        g = jax.grad(lambda vb: jnp.sum(pkm_lookup_xla(q, k1, k2, vb, top_k=4)[0].astype(jnp.float32) * r_out))(
            v.astype(jnp.bfloat16))
        return out, idx, w, g, pkm_lookup_xla(q, k1, k2, v.astype(jnp.bfloat16).astype(jnp.float32), top_k=4)[0]

    out, idx, w, g, want = run(q, k1, k2, v)
    assert (out.dtype, idx.dtype, w.dtype, g.dtype) == (jnp.bfloat16, jnp.int32, jnp.float32, jnp.bfloat16)
    # bf16 keeps 8 mantissa bits: the f32 accumulation is rounded once, relative error <= 2^-8.
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2**-8, atol=1e-6)
