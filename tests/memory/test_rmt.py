"""RMT: reduces to the baseline without memory, is causal, carries information, truncated BPTT, streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memlm.config import from_dict
from memlm.errors import UserError
from tests.memory.common import make, make_batch, stream_logits

pytestmark = pytest.mark.unit


def test_zero_memory_tokens_is_the_segment_local_baseline():
    cfg, rmt = make("rmt", rmt={"num_mem_tokens": 0})
    _, base = make("baseline", segment_local=True)
    # same parameters: copy the baseline decoder into the RMT decoder
    nnx.update(rmt.decoder, nnx.state(base.decoder))
    batch = make_batch(cfg)
    l_rmt, n_rmt, _, _ = rmt.loss(rmt.init_carry(2), batch)
    l_base, n_base, _, _ = base.loss({}, batch)
    np.testing.assert_allclose(float(l_rmt), float(l_base), rtol=1e-6)
    assert float(n_rmt) == float(n_base)


def test_causal_across_segments():
    cfg, model = make("rmt", rmt={"num_mem_tokens": 4})
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    ref = stream_logits(model, tokens, 8)
    for t in (3, 8, 13, 20):  # inside a segment and at boundaries
        pert = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 250 + 3)
        out = stream_logits(model, pert, 8)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(ref[:, : t + 1]))
        assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(ref[:, t + 1 :]))


@pytest.mark.parametrize("kind,extra,expect_change", [
    ("rmt", {"rmt": {"num_mem_tokens": 4}}, True),
    ("baseline", {"segment_local": True}, False),
])
def test_segment_one_reaches_segment_three(kind, extra, expect_change):
    cfg, model = make(kind, **extra)
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    ref = stream_logits(model, tokens, 8)
    pert = tokens.at[:, :8].set((tokens[:, :8] + 11) % 250 + 3)
    out = stream_logits(model, pert, 8)
    seg3 = slice(16, 24)
    diff = float(jnp.max(jnp.abs(out[:, seg3] - ref[:, seg3])))
    assert (diff > 1e-4) if expect_change else (diff == 0.0), diff


@pytest.mark.parametrize("depth,zero", [(1, True), (-1, False), (2, True)])
def test_truncated_bptt(depth, zero):
    cfg, model = make("rmt", rmt={"num_mem_tokens": 4})
    # segment 1 uses token ids 3..49 only, later segments 50..258; the loss is on the last segment only,
    # so the gradient of embedding rows 3..49 is the gradient with respect to segment-1 embeddings.
    batch = make_batch(cfg, lo=50)
    seg1 = np.random.default_rng(1).integers(3, 50, size=(2, 8)).astype(np.int32)
    batch["tokens"] = batch["tokens"].at[:, 0].set(seg1)
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"]).at[:, -1].set(1.0)
    gd, params = nnx.split(model)

    def loss(p):
        return nnx.merge(gd, p).loss(nnx.merge(gd, p).init_carry(2), batch, depth)[0]

    g = jax.grad(loss)(params)
    g_seg1 = np.asarray(g["decoder"]["embedding"][...][3:50])
    if zero:
        assert np.all(g_seg1 == 0.0)
    else:
        assert np.abs(g_seg1).max() > 1e-7
    # the learned initial memory gets gradient from segment 0's loss at any depth (no cut at segment 0)
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"]).at[:, 0].set(1.0)
    g0 = jax.grad(loss)(params)
    assert np.abs(np.asarray(g0["mem_init"][...])).max() > 0


def test_streaming_equals_training_forward():
    cfg, model = make("rmt", rmt={"num_mem_tokens": 4})
    batch = make_batch(cfg, seed=3)
    loss_sum, n, carry, _ = model.loss(model.init_carry(2), batch)
    logits = stream_logits(model, batch["tokens"].reshape(2, -1), 8)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"].reshape(2, -1)).sum()
    np.testing.assert_allclose(float(loss_sum), float(ref), rtol=2e-6)


def test_reset_restores_initial_memory():
    cfg, model = make("rmt", rmt={"num_mem_tokens": 4})
    batch = make_batch(cfg)
    batch["reset"] = batch["reset"].at[:, 2].set(True)  # a new document at segment 2
    full = model.loss(model.init_carry(2), batch)[0]
    # the same loss as running segments 0-1 and 2-3 as independent documents
    first = {k: v[:, :2] for k, v in batch.items()}
    second = {k: v[:, 2:] for k, v in batch.items()}
    a = model.loss(model.init_carry(2), first)[0]
    junk = {"memory": model.init_carry(2)["memory"] + 5.0}
    b = model.loss(junk, second)[0]
    np.testing.assert_allclose(float(full), float(a + b), rtol=2e-6)


def test_config_errors():
    with pytest.raises(UserError, match="data.segment_len"):
        from_dict({"model": {"kind": "rmt", "max_seq_len": 32, "rmt": {"num_mem_tokens": 16}},
                   "data": {"segment_len": 16}})
    with pytest.raises(UserError, match="model.rmt is set"):
        from_dict({"model": {"kind": "baseline", "rmt": {"num_mem_tokens": 4}}})
