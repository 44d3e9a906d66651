"""HMT: reductions to RMT/stage 1, causality (and the paper mode's leak), memory reach, truncated BPTT,
streaming, resets, the ring cache and recall against a float64 reference, config errors, a CLI smoke run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memlm.config import from_dict
from memlm.errors import UserError
from tests.core.cli_utils import run_memlm
from tests.memory.common import make, make_batch, stream_logits

pytestmark = pytest.mark.unit

HMT = {"num_sensory": 4, "cache_size": 3, "recall_dim": 16}


def hmt(**kw):
    return make("hmt", hmt={**HMT, **kw})


def perturb(tokens, sl):
    return tokens.at[:, sl].set((tokens[:, sl] + 7) % 250 + 3)


def test_stage1_without_sensory_is_rmt_with_one_memory_token():
    # RMT with m=1 and write tokens right after the segment has the same layout [P; H; P]; RMT's own test shows
    # that its m=0 form is the segment-local baseline.
    cfg, model = hmt(stage=1, num_sensory=0)
    _, rmt = make("rmt", rmt={"num_mem_tokens": 1, "write_positions": "after_segment"})
    nnx.update(rmt.decoder, nnx.state(model.decoder))
    rmt.mem_init.value = model.mem_init[...]
    batch = make_batch(cfg)
    batch["reset"] = batch["reset"].at[:, 2].set(True)
    l_h, n_h, _, _ = model.loss(model.init_carry(2), batch)
    l_r, n_r, _, _ = rmt.loss(rmt.init_carry(2), batch)
    np.testing.assert_allclose(float(l_h), float(l_r), rtol=1e-6)
    assert float(n_h) == float(n_r)


def test_stage2_with_one_cache_slot_is_stage1():
    # recall over a single cached embedding returns it: P_n = m_{n-1}, exactly stage 1's memory
    cfg, s2 = hmt(stage=2, cache_size=1)
    _, s1 = hmt(stage=1, cache_size=1)
    nnx.update(s1, nnx.state(s2))
    batch = make_batch(cfg, seed=2)
    l2, _, c2, aux = s2.loss(s2.init_carry(2), batch)
    l1, _, c1, _ = s1.loss(s1.init_carry(2), batch)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c2["last_mem"]), np.asarray(c1["last_mem"]), rtol=1e-5, atol=1e-6)
    assert float(aux["recall_max_weight"]) == pytest.approx(0.75)  # weight 1 in segments 1..3, none in 0
    # and it is not trivially so: with 3 slots the recalled mixture changes the memories
    _, s3 = hmt(stage=2, cache_size=3)
    nnx.update(s3, nnx.state(s2))
    c3 = s3.loss(s3.init_carry(2), batch)[2]
    assert float(jnp.max(jnp.abs(c3["last_mem"] - c2["last_mem"]))) > 1e-4


@pytest.mark.parametrize("stage,k", [(2, 4), (1, 4)])
def test_causal_across_segments(stage, k):
    cfg, model = hmt(stage=stage, num_sensory=k)
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    ref = stream_logits(model, tokens, 8)
    for t in (2, 7, 8, 17, 23, 26):  # inside segments (incl. the summarised first half) and at boundaries
        out = stream_logits(model, perturb(tokens, slice(t + 1, None)), 8)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(ref[:, : t + 1]))
        assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(ref[:, t + 1 :]))


@pytest.mark.parametrize("extract_from,leaks", [("current_segment", True), ("previous_segment", False)])
def test_paper_extraction_from_the_current_segment_leaks_the_future(extract_from, leaks):
    # a carry with two distinct cached memories: with the paper's extraction the query summarises tokens 0..3 of
    # this segment, so token 1 changes the recall weights, hence P_n, hence the logits at position 0.
    cfg, model = hmt(extract_from=extract_from)
    carry = model.init_carry(2)
    rng = np.random.default_rng(0)
    carry["cache"] = jnp.asarray(rng.normal(size=carry["cache"].shape), jnp.float32)
    carry["valid"] = jnp.asarray([[1, 1, 0]] * 2, jnp.float32)
    if "summary" in carry:
        carry["summary"] = jnp.asarray(rng.normal(size=carry["summary"].shape), jnp.float32)
    tokens = make_batch(cfg)["tokens"][:, 0]
    seg = model.segment_logits
    ref, _ = seg(carry, tokens)
    out, _ = seg(carry, perturb(tokens, slice(1, 2)))
    diff = float(jnp.max(jnp.abs(out[:, 0] - ref[:, 0])))
    assert (diff > 1e-4) if leaks else (diff == 0.0), diff


@pytest.mark.parametrize("kind,extra,expect_change", [
    ("hmt", {"hmt": HMT}, True),
    ("hmt", {"hmt": {**HMT, "stage": 1, "num_sensory": 0}}, True),
    ("baseline", {"segment_local": True}, False),
])
def test_segment_one_reaches_segment_three(kind, extra, expect_change):
    cfg, model = make(kind, **extra)
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    ref = stream_logits(model, tokens, 8)
    out = stream_logits(model, perturb(tokens, slice(0, 8)), 8)
    diff = float(jnp.max(jnp.abs(out[:, 16:24] - ref[:, 16:24])))
    assert (diff > 1e-4) if expect_change else (diff == 0.0), diff


@pytest.mark.parametrize("depth,zero", [(1, True), (-1, False)])
def test_truncated_bptt(depth, zero):
    cfg, model = hmt()
    # segment 0 uses token ids 3..49 only, later segments 50..258; the loss is on the last segment only, so
    # embedding rows 3..49 get gradient only through the memory (cache, last memory, summary, sensory tokens).
    batch = make_batch(cfg, lo=50)
    seg0 = np.random.default_rng(1).integers(3, 50, size=(2, 8)).astype(np.int32)
    batch["tokens"] = batch["tokens"].at[:, 0].set(seg0)
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"]).at[:, -1].set(1.0)
    gd, params = nnx.split(model)

    @jax.jit
    @jax.grad
    def grad(p, batch):
        return nnx.merge(gd, p).loss(nnx.merge(gd, p).init_carry(2), batch, depth)[0]

    g = grad(params, batch)
    g_seg0 = np.asarray(g["decoder"]["embedding"][...][3:50])
    assert np.all(g_seg0 == 0.0) if zero else np.abs(g_seg0).max() > 1e-7
    assert np.abs(np.asarray(g["recall_k"]["kernel"][...])).max() > 0  # recall is trained at any depth
    # the learned memory (used while the cache is empty) gets gradient from segment 0's loss at any depth
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"]).at[:, 0].set(1.0)
    assert np.abs(np.asarray(grad(params, batch)["mem_init"][...])).max() > 0


@pytest.mark.parametrize("loss_segments", ["all", "last"])
def test_streaming_equals_training_forward(loss_segments):
    cfg, model = hmt(loss_segments=loss_segments)
    batch = make_batch(cfg, seed=3)
    loss_sum, n, _, _ = model.loss(model.init_carry(2), batch)
    logits = stream_logits(model, batch["tokens"].reshape(2, -1), 8)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"].reshape(2, -1)).reshape(2, 4, 8)
    ref = ce.sum() if loss_segments == "all" else ce[:, -1].sum()
    np.testing.assert_allclose(float(loss_sum), float(ref), rtol=2e-6)
    assert float(n) == (64 if loss_segments == "all" else 16)


def test_reset_restores_initial_memory():
    cfg, model = hmt()
    batch = make_batch(cfg)
    batch["reset"] = batch["reset"].at[:, 2].set(True)  # a new document at segment 2
    full = model.loss(model.init_carry(2), batch)[0]
    first = {k: v[:, :2] for k, v in batch.items()}
    second = {k: v[:, 2:] for k, v in batch.items()}
    a = model.loss(model.init_carry(2), first)[0]
    junk = jax.tree.map(lambda x: x + 5, model.init_carry(2))
    junk["valid"] = jnp.ones_like(junk["valid"])
    b = model.loss(junk, second)[0]
    np.testing.assert_allclose(float(full), float(a + b), rtol=2e-6)
    assert abs(float(model.loss(junk, {**second, "reset": jnp.zeros_like(second["reset"])})[0]) - float(b)) > 1e-3


def test_ring_cache_and_recall_match_a_reference():
    cfg, model = hmt()
    tokens = make_batch(cfg, seed=4)["tokens"].reshape(2, -1)
    carry, mems = model.init_carry(2), []
    for s in range(4):  # 4 segments into a 3-slot ring
        _, carry = model.segment_logits(carry, tokens[:, 8 * s : 8 * s + 8])
        mems.append(np.asarray(carry["last_mem"]))
    np.testing.assert_array_equal(np.asarray(carry["cache"]), np.stack([mems[3], mems[1], mems[2]], axis=1))
    assert np.asarray(carry["index"]).tolist() == [1, 1] and np.all(np.asarray(carry["valid"]) == 1)

    # recall = softmax over filled slots of (s W_q)(C W_k)^T / sqrt(d_h), times C (float64 reference)
    rng = np.random.default_rng(0)
    s, cache = rng.normal(size=(3, 32)), rng.normal(size=(3, 3, 32))
    valid = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]], np.float32)
    p, w = model.recall(jnp.asarray(s, jnp.float32), jnp.asarray(cache, jnp.float32), jnp.asarray(valid))
    wq = np.asarray(model.recall_q.kernel[...], np.float64)
    wk = np.asarray(model.recall_k.kernel[...], np.float64)
    for b in range(3):
        idx = np.flatnonzero(valid[b])
        if len(idx) == 0:
            np.testing.assert_allclose(np.asarray(p[b]), np.asarray(model.mem_init[...][0]), rtol=1e-6)
            continue
        sc = np.array([(s[b] @ wq) @ (cache[b, i] @ wk) for i in idx]) / np.sqrt(16)
        ref_w = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
        np.testing.assert_allclose(np.asarray(w[b, idx]), ref_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(p[b]), ref_w @ cache[b, idx], rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(w[b])[valid[b] == 0] == 0)


def test_config_errors():
    with pytest.raises(UserError, match="model.hmt.cache_size"):
        from_dict({"model": {"kind": "hmt", "hmt": {"cache_size": 0}}})
    with pytest.raises(UserError, match="model.hmt.stage"):
        from_dict({"model": {"kind": "hmt", "hmt": {"stage": 3}}})
    with pytest.raises(UserError, match="model.hmt is set"):
        from_dict({"model": {"kind": "rmt", "hmt": {"num_sensory": 4}}})
    # keys checked against the data shape when the model first sees a segment
    cfg, model = hmt(num_sensory=9)
    with pytest.raises(UserError, match=r"model.hmt.num_sensory \(9\) exceeds data.segment_len \(8\)"):
        model.loss(model.init_carry(2), make_batch(cfg))
    cfg, model = make("hmt", seg_len=8, max_seq_len=12, hmt=HMT)
    with pytest.raises(UserError, match="model.max_seq_len"):
        model.loss(model.init_carry(2), make_batch(cfg))


@pytest.mark.integration
def test_cli_smoke_stage1_then_stage2_warm_start(tmp_path):
    common = ("data.source=synthetic", "train.steps=2", "train.log_every=1", "train.eval_every=0",
              "train.progress=false")
    r = run_memlm("train", "configs/tiny/hmt.yaml", *common, "model.hmt.stage=1", f"run.dir={tmp_path}/s1")
    assert r.returncode == 0, r.stderr[-3000:]
    # stage 2 adds recall; the parameter tree is the same in both stages, so the warm start is params-only
    r = run_memlm("train", "configs/tiny/hmt.yaml", *common, f"train.init_from={tmp_path}/s1",
                  f"run.dir={tmp_path}/s2")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = open(os.path.join(tmp_path, "s2", "metrics.jsonl")).read()
    assert "recall_entropy" in metrics and "cache_fill" in metrics
