"""`model.attention_q_block`: attention computed a block of queries at a time is the same attention (values and
gradients), for the shared attention and Titans' persistent-prefix attention, and holds less memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm.layers.attention import attend, over_query_blocks, reference_attention
from memlm.memory.titans_layers import prefix_attention
from tests.memory.common import assert_same_loss_and_grads, make, make_batch, model_loss

pytestmark = pytest.mark.unit

B, T, S, H, KVH, D = 2, 13, 20, 4, 2, 8


def _inputs(seed: int = 0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, T, H, D), (B, S, KVH, D), (B, S, KVH, D)))
    mask = jnp.asarray(r.uniform(size=(B, 1, T, S)) > 0.4).at[0, 0, 3].set(False)  # row 3 of sequence 0 sees nothing
    return q, k, v, mask


def _value_and_grads(fn, args):
    return jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), tuple(range(len(args))))(*args)


def _assert_same(got, want):
    """Rows of attention are computed independently, so values agree to float32 round-off; the key/value
    gradients sum over query rows, which blocks add up in another order."""
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        assert np.max(np.abs(np.asarray(g) - np.asarray(w))) <= 1e-5 * np.max(np.abs(np.asarray(w))), (g, w)


@pytest.mark.parametrize("q_block", [1, 4, 5, 12, 13, 32])
@pytest.mark.parametrize("masked", [True, False])
def test_query_blocks_are_the_same_attention(q_block, masked):
    q, k, v, mask = _inputs()
    mask = mask if masked else None
    want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), (q, k, v))
    got = _value_and_grads(lambda q, k, v: attend(q, k, v, mask, "xla", q_block), (q, k, v))
    _assert_same(got, want)
    out = attend(q, k, v, mask, "xla", q_block)
    assert out.shape == q.shape
    if masked:  # the row that sees no key stays zero in every block layout
        assert float(jnp.max(jnp.abs(out[0, 3]))) == 0.0


@pytest.mark.parametrize("q_block", [4, 6])
def test_query_blocks_of_the_persistent_prefix_attention(q_block):
    q, k, v, mask = _inputs(1)
    r = np.random.default_rng(2)
    kp, vp = (jnp.asarray(r.normal(size=(3, KVH, D)), jnp.float32) for _ in range(2))
    q_raw = q * 0.5

    def blocked(qb):
        return lambda q, q_raw, k, v, kp: over_query_blocks(
            lambda a, b, m: prefix_attention(a, b, k, v, kp, vp, m), (q, q_raw), mask, qb)

    _assert_same(_value_and_grads(blocked(q_block), (q, q_raw, k, v, kp)),
                 _value_and_grads(blocked(0), (q, q_raw, k, v, kp)))


def test_query_blocks_hold_less_memory():
    """XLA's own analysis of the compiled forward + backward at 512 x 512 scores: blocks of 64 queries need less
    than half the temporaries."""
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(2, 512, 4, 16)), jnp.float32)
    k = v = jnp.asarray(r.normal(size=(2, 512, 2, 16)), jnp.float32)
    mask = jnp.tril(jnp.ones((512, 512), bool))[None, None]
    temp = {}
    for qb in (0, 64):
        grad = jax.jit(jax.grad(lambda q, k, v, qb=qb: jnp.sum(attend(q, k, v, mask, "xla", qb) ** 2), (0, 1, 2)))
        temp[qb] = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert temp[64] < temp[0] / 2, temp


@pytest.mark.parametrize("kind,model_kw", [
    ("baseline", {}),
    ("titans", {"titans": {"variant": "mac", "chunk_size": 4, "num_persistent": 2, "memory_heads": 2,
                           "pipeline_layers": True}}),
])
def test_model_loss_and_gradients_do_not_depend_on_the_query_block(kind, model_kw):
    vals = {}
    for q_block in (0, 3):  # 3 does not divide the 8-token segments: padded rows
        cfg, model = make(kind, attention_q_block=q_block, **model_kw)
        gd, params = nnx.split(model)
        vals[q_block] = jax.jit(jax.value_and_grad(model_loss(gd, make_batch(cfg, seed=4))))(params)
    assert_same_loss_and_grads(vals[3], vals[0], kind)
