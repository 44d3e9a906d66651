"""Landmark grouped-softmax attention (Mohtashami & Jaggi 2023, arXiv 2305.16300): kernels vs the spec.

The slow reference here is a plain Python loop over queries and groups in float64, written straight from
the paper's definition (Sec. 3.1, Eq. 3). Tolerances come from float32: eps = 1.2e-7, sums of <= 64 terms
of size O(1) -> forward 1e-5; gradients add one more such product -> 3e-5.
"""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm.errors import UserError
from pallas_kernels.landmark_attention import api, retrieval
from pallas_kernels.landmark_attention.reference import (
    landmark_attention_reference,
    landmark_weights_reference,
)
from pallas_kernels.landmark_attention.tpu import landmark_attention_tpu
from pallas_kernels.landmark_attention.triton import landmark_attention_triton
from pallas_kernels.landmark_attention.xla import landmark_attention_xla

pytestmark = pytest.mark.kernels

FWD_TOL = 1e-5
GRAD_TOL = 3e-5

# Jitted once per module: one compile per shape instead of op-by-op dispatch (the module must stay fast).
_ref = jax.jit(landmark_attention_reference, static_argnames=("block_size", "scale"))
_weights = jax.jit(landmark_weights_reference, static_argnums=2)
_retrieve = jax.jit(retrieval.retrieval_attention, static_argnames=("top_k", "mode", "rope_fn", "scale"))
_select = jax.jit(retrieval.select_blocks, static_argnames=("top_k", "mode", "rope_fn", "scale"))


def _qkvg(shape, seed=0):
    return [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(jax.random.PRNGKey(seed), 4)]


def _loop_weights(scores, key_block, key_pos, q_block, q_pos, L, key_valid=None):
    """Paper definition for ONE query, float64 Python loops. scores, key_block, key_pos: length-K lists."""
    K = len(scores)
    ok = [True] * K if key_valid is None else list(key_valid)
    group0 = [
        j for j in range(K) if ok[j] and (
            (key_block[j] == q_block and key_pos[j] < L - 1 and key_pos[j] <= q_pos)
            or (key_block[j] < q_block and key_pos[j] == L - 1)
        )
    ]
    mx = max(scores[j] for j in group0)
    z = sum(math.exp(scores[j] - mx) for j in group0)
    S = {j: math.exp(scores[j] - mx) / z for j in group0}
    w = [0.0] * K
    for j in group0:
        if key_block[j] == q_block:
            w[j] = S[j]
    for c in sorted({key_block[j] for j in group0 if key_block[j] < q_block}):
        lm = [j for j in group0 if key_block[j] == c][0]
        regs = [j for j in range(K) if ok[j] and key_block[j] == c and key_pos[j] < L - 1]
        m2 = max(scores[j] for j in regs)
        z2 = sum(math.exp(scores[j] - m2) for j in regs)
        for j in regs:
            w[j] = S[lm] * math.exp(scores[j] - m2) / z2
    return w


def _out_and_grads(fn, L):
    """One jitted function: (out, (dq, dk, dv)) of loss = sum(out * g)."""

    def loss(q, k, v, g):
        out = fn(q, k, v, block_size=L)
        return jnp.sum(out * g), out

    def run(q, k, v, g):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, g)
        return out, grads

    return jax.jit(run)


def _assert_matches_reference(fn, shape, L, seed=0):
    args = _qkvg(shape, seed)
    out, grads = _out_and_grads(fn, L)(*args)
    want_out, want_grads = _out_and_grads(landmark_attention_reference, L)(*args)
    np.testing.assert_allclose(out, want_out, rtol=FWD_TOL, atol=FWD_TOL)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=GRAD_TOL, atol=GRAD_TOL)


# ------------------------------------------------------------------------------------ the spec itself
def test_weights_are_a_distribution_zero_on_landmarks_and_causal():
    L, T = 5, 30
    q, k, _, _ = _qkvg((2, 3, T, 8))
    w = np.asarray(_weights(q, k, L))
    assert w.min() >= 0.0
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert np.all(w[..., L - 1 :: L] == 0.0), "landmark keys must get zero weight"
    assert np.all(np.triu(w, k=1) == 0.0), "no weight on future keys"
    # A query's own block landmark is excluded even for the landmark query itself.
    assert np.all(w[..., np.arange(L - 1, T, L), np.arange(L - 1, T, L)] == 0.0)


def test_weights_equal_python_loop_definition():
    L, T, D = 4, 20, 8
    q, k, _, _ = _qkvg((1, 2, T, D), seed=3)
    w = np.asarray(_weights(q, k, L))
    s = np.einsum("bhqd,bhkd->bhqk", np.float64(q), np.float64(k)) / math.sqrt(D)
    idx = list(range(T))
    for h in range(2):
        for i in range(T):
            blocks, posn = [j // L for j in idx], [j % L for j in idx]
            want = _loop_weights(list(s[0, h, i]), blocks, posn, i // L, i % L, L)
            np.testing.assert_allclose(w[0, h, i], want, atol=2e-6)


# ---------------------------------------------------------------------------------- implementations
@pytest.mark.parametrize("T,L", [(48, 8), (30, 3), (12, 2)])
def test_xla_blockwise_matches_reference_forward_and_grad(T, L):
    _assert_matches_reference(landmark_attention_xla, (2, 2, T, 16), L)


@pytest.mark.parametrize("kernel", [landmark_attention_triton, landmark_attention_tpu], ids=["triton", "tpu"])
def test_pallas_interpret_matches_reference_forward_and_grad(kernel):
    fn = lambda q, k, v, block_size: kernel(q, k, v, block_size=block_size, interpret=True)
    _assert_matches_reference(fn, (1, 2, 24, 8), 8, seed=1)


@pytest.mark.parametrize(
    "kernel,platform,marker",
    [
        (landmark_attention_triton, "cuda", "__gpu$xla.gpu.triton"),
        (landmark_attention_tpu, "tpu", "tpu_custom_call"),
    ],
    ids=["triton-cuda", "mosaic-tpu"],
)
def test_pallas_kernels_lower(kernel, platform, marker):
    L, T, D = 16, 64, 16
    q, k, v, g = _qkvg((1, 2, T, D))
    fwd = lambda q, k, v: kernel(q, k, v, block_size=L)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v) * g)
    text = jax.jit(fwd).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 1
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 3, "forward + dq + dkv kernels"


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_causality_and_landmark_values_unused(impl):
    L, T, t0 = 8, 40, 19  # t0 in the middle of block 2
    q, k, v, _ = _qkvg((1, 2, T, 16))
    f = jax.jit(lambda q, k, v: api.landmark_attention(q, k, v, block_size=L, implementation=impl))
    base = np.asarray(f(q, k, v))
    bump = jnp.arange(T)[:, None] > t0
    q2, k2, v2 = (jnp.where(bump, x + 3.0, x) for x in (q, k, v))
    out = np.asarray(f(q2, k2, v2))
    np.testing.assert_allclose(out[:, :, : t0 + 1], base[:, :, : t0 + 1], rtol=0, atol=1e-6)
    assert np.abs(out[:, :, t0 + 1 :] - base[:, :, t0 + 1 :]).max() > 1e-2  # the check can fail
    # Landmark values carry zero weight: changing them changes no output.
    v3 = jnp.where((jnp.arange(T) % L == L - 1)[:, None], v + 5.0, v)
    np.testing.assert_allclose(np.asarray(f(q, k, v3)), base, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- api
def test_api_errors_and_fallback(caplog):
    q, k, v, _ = _qkvg((1, 1, 24, 8))
    with pytest.raises(UserError, match="block_size"):
        api.landmark_attention(q, k, v, block_size=5)
    with pytest.raises(UserError, match="implementation"):
        api.landmark_attention(q, k, v, block_size=8, implementation="cuda")
    with pytest.raises(UserError, match="backend"):
        api.landmark_attention(q, k, v, block_size=8, implementation="triton")
    assert "power of two" in api.pallas_unsupported("triton", 51, 64, jnp.float32)
    assert "multiple of 16" in api.pallas_unsupported("mosaic", 8, 64, jnp.bfloat16)
    assert api.pallas_unsupported("triton", 64, 64, jnp.float32) is None
    api._logged.clear()
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        a = api.landmark_attention(q, k, v, block_size=8)
        api.landmark_attention(q, k, v, block_size=8)
    assert len([r for r in caplog.records if "falling back" in r.getMessage()]) == 1
    np.testing.assert_allclose(a, _ref(q, k, v, block_size=8), rtol=FWD_TOL, atol=FWD_TOL)
    b = api.landmark_attention(q, k, v, block_size=8, implementation="triton", interpret=True)
    np.testing.assert_allclose(a, b, rtol=FWD_TOL, atol=FWD_TOL)


# ------------------------------------------------------------------------------------- retrieval
def _np_rope(x, pos):
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-np.arange(half) / half)
    ang = np.asarray(pos, np.float64)[..., None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], -1)


def _jax_rope(x, pos):
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half) / half)
    ang = jnp.broadcast_to(jnp.asarray(pos, jnp.float32), x.shape[:-1])[..., None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x1 * jnp.sin(ang) + x2 * jnp.cos(ang)], -1)


def _split_cache(x, n_cache, L):
    B, H, _, D = x.shape
    return x[:, :, : n_cache * L].reshape(B, H, n_cache, L, D), x[:, :, n_cache * L :]


@pytest.mark.parametrize("mode", retrieval.RETRIEVAL_MODES)
def test_retrieval_of_all_blocks_equals_full_grouped_attention(mode):
    L, n_cache, Tl, Tq = 6, 4, 12, 10  # local = 2 incomplete tokens + a 10-token chunk
    q, k, v, _ = _qkvg((2, 2, n_cache * L + Tl, 8), seed=4)
    full = _ref(q, k, v, block_size=L)[:, :, -Tq:]
    (ck, kl), (cv, vl) = _split_cache(k, n_cache, L), _split_cache(v, n_cache, L)
    out = _retrieve(q[:, :, -Tq:], kl, vl, ck, cv, top_k=n_cache, mode=mode)
    np.testing.assert_allclose(out, full, rtol=FWD_TOL, atol=FWD_TOL)


def test_retrieval_masks_invalid_cache_entries():
    L, n_cache, Tl, Tq = 6, 3, 6, 6
    q, k, v, _ = _qkvg((1, 2, n_cache * L + Tl, 8), seed=5)
    full = _ref(q, k, v, block_size=L)[:, :, -Tq:]
    (ck, kl), (cv, vl) = _split_cache(k, n_cache, L), _split_cache(v, n_cache, L)
    junk = jnp.full((1, 2, 2, L, 8), 7.0)  # two unfilled ring-buffer entries in front
    ck, cv = jnp.concatenate([junk, ck], 2), jnp.concatenate([junk, cv], 2)
    for top_k in (3, 5):  # exactly the valid ones / more than the valid ones (junk must be masked)
        out = _retrieve(q[:, :, -Tq:], kl, vl, ck, cv, top_k=top_k, num_valid=jnp.array([3]))
        np.testing.assert_allclose(out, full, rtol=FWD_TOL, atol=FWD_TOL)


def test_retrieval_rejects_bad_arguments():
    ck = jnp.zeros((1, 1, 3, 4, 8))
    kl = jnp.zeros((1, 1, 5, 8))
    with pytest.raises(UserError, match="top_k"):
        retrieval.retrieval_attention(kl, kl, kl, ck, ck, top_k=4)
    with pytest.raises(UserError, match="top_k"):
        retrieval.retrieval_attention(kl, kl, kl, ck, ck, top_k=0)
    with pytest.raises(UserError, match="mode"):
        retrieval.retrieval_attention(kl, kl, kl, ck, ck, top_k=2, mode="max")


def test_block_selection_modes_match_numpy():
    q = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 5, 8))
    lk = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 7, 8))
    s = np.einsum("bhqd,bhnd->bhqn", np.float64(q), np.float64(lk)) / math.sqrt(8)
    idx = np.asarray(_select(q, lk, top_k=3))
    np.testing.assert_array_equal(idx, np.sort(np.argsort(-s, -1)[..., :3], -1))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.asarray(_select(q, lk, top_k=3, mode="max_over_heads"))
    want = np.sort(np.argsort(-p.max(1), -1)[..., :3], -1)
    np.testing.assert_array_equal(idx, np.broadcast_to(want[:, None], idx.shape))
    idx = np.asarray(_select(q, lk, top_k=3, mode="max_over_tokens"))
    want = np.sort(np.argsort(-p.max(2), -1)[..., :3], -1)
    np.testing.assert_array_equal(idx, np.broadcast_to(want[:, :, None], idx.shape))


def test_stingy_positions_stay_bounded():
    L, n_cache, top_k, Tl, Tq = 4, 12, 2, 7, 5
    pos = retrieval.stingy_positions(n_cache, top_k, L, Tl)
    np.testing.assert_array_equal(pos["landmark"], [3] * 10 + [7, 11])
    seen = []

    def recording_rope(x, p):  # runs under jit: report the positions through a host callback
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), p)
        return _jax_rope(x, p)

    q, k, v, _ = _qkvg((1, 2, n_cache * L + Tl, 8), seed=8)
    (ck, kl), (cv, vl) = _split_cache(k, n_cache, L), _split_cache(v, n_cache, L)
    out = _retrieve(q[:, :, -Tq:], kl, vl, ck, cv, top_k=top_k, rope_fn=recording_rope)
    jax.effects_barrier()
    assert np.isfinite(np.asarray(out)).all() and len(seen) == 5  # q twice, landmarks, retrieved, local
    allpos = np.concatenate([p.ravel() for p in seen])
    assert allpos.min() >= 0 and allpos.max() < (top_k + 1) * L + Tl  # independent of n_cache


def test_retrieval_with_rope_equals_python_loop():
    """Top-k < n_blocks with a real RoPE: compare with an explicit per-query construction (float64)."""
    L, n_cache, top_k, Tl, Tq, D = 4, 5, 2, 6, 4, 8
    q, k, v, _ = _qkvg((1, 2, n_cache * L + Tl, D), seed=9)
    (ck, kl), (cv, vl) = _split_cache(k, n_cache, L), _split_cache(v, n_cache, L)
    qc = q[:, :, -Tq:]
    out = np.asarray(_retrieve(qc, kl, vl, ck, cv, top_k=top_k, rope_fn=_jax_rope))
    ck, cv, kl, vl, qc = (np.float64(x) for x in (ck, cv, kl, vl, qc))
    start = (top_k + 1) * L
    for h in range(2):
        for i in range(Tq):
            t = Tl - Tq + i
            qi = _np_rope(qc[0, h, i], start + t)
            slots = [s - (n_cache - top_k) + 1 if s >= n_cache - top_k else 0 for s in range(n_cache)]
            lm_scores = [qi @ _np_rope(ck[0, h, s, L - 1], slots[s] * L + L - 1) for s in range(n_cache)]
            chosen = sorted(np.argsort(lm_scores)[::-1][:top_k])
            keys, vals, blocks, posn = [], [], [], []
            for r, s in enumerate(chosen):
                for j in range(L):
                    keys.append(_np_rope(ck[0, h, s, j], (r + (slots[s] > 0)) * L + j))
                    vals.append(cv[0, h, s, j])
                    blocks.append(r)
                    posn.append(j)
            for u in range(Tl):
                keys.append(_np_rope(kl[0, h, u], start + u))
                vals.append(vl[0, h, u])
                blocks.append(top_k + u // L)
                posn.append(u % L)
            scores = [qi @ kk / math.sqrt(D) for kk in keys]
            w = _loop_weights(scores, blocks, posn, top_k + t // L, t % L, L)
            want = np.asarray(w) @ np.asarray(vals)
            np.testing.assert_allclose(out[0, h, i], want, rtol=FWD_TOL, atol=FWD_TOL)
