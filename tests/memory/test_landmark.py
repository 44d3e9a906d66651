"""Landmark attention model (Mohtashami & Jaggi 2023): training forward, retrieval streaming, configs.

References: the dense grouped-softmax spec (attention_impl=reference; itself checked against a float64 loop
in tests/pallas_kernels), running each document alone, and streaming with every block retrieved.
float32 tolerances: forward 2e-5 absolute on logits of size O(1), gradients 1e-5.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm import sharding
from memlm.cli import main as cli_main
from memlm.config import from_dict
from memlm.errors import UserError
from memlm.memory import landmark as landmark_mod
from tests.memory.common import SMALL, make, make_batch

pytestmark = pytest.mark.unit

V = SMALL["vocab_size"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_JIT: dict = {}


def jitted(model, name):
    """model.<name>(*args) as one jitted function of the arguments (one trace per model and method)."""
    if (id(model), name) not in _JIT:
        gd, st = nnx.split(model)
        f = jax.jit(lambda s, *a: getattr(nnx.merge(gd, s), name)(*a))
        _JIT[id(model), name] = (model, lambda *a: f(st, *a))  # keep the model alive: ids stay unique
    return _JIT[id(model), name][1]


def _regular_logits(model, tokens, reset):
    return model.decoder.head(model.forward(tokens, reset)[0])[..., :V]


def train_logits(model, tokens, reset=None):
    """Regular-token logits of the training forward: tokens [B, S, Ls] -> [B, S*Ls, V]."""
    if (id(model), "train_logits") not in _JIT:
        gd, st = nnx.split(model)
        f = jax.jit(lambda s, t, r: _regular_logits(nnx.merge(gd, s), t, r))
        _JIT[id(model), "train_logits"] = (model, lambda t, r: f(st, t, r))
    return _JIT[id(model), "train_logits"][1](tokens, reset)


def stream(model, tokens, seg_len):
    """Feed [B, T] tokens chunk by chunk through segment_logits (jitted) -> (logits [B, T, V], last carry)."""
    seg = jitted(model, "segment_logits")
    carry, out = model.init_carry(tokens.shape[0]), []
    for s in range(0, tokens.shape[1], seg_len):
        t = tokens[:, s : s + seg_len]
        logits, carry = seg(carry, t, jnp.broadcast_to(jnp.arange(s, s + seg_len), t.shape))
        out.append(logits[..., :V])
    return jnp.concatenate(out, axis=1), carry


LM = {"block_size": 4, "top_k": 8, "cache_blocks": 8}
GPT2 = {"gpt2": {"arch": "gpt2", "n_kv_heads": 4}}  # GPT-2: LayerNorm, biases, GELU, learned positions


def test_forward_and_gradients_match_dense_reference():
    cfg, fast = make("landmark", landmark=LM)
    _, ref = make("landmark", landmark=LM, attention_impl="reference")
    nnx.update(ref, nnx.state(fast))
    batch = make_batch(cfg, seed=1)
    batch["reset"] = batch["reset"].at[1, 2].set(True)  # row 1 holds two documents
    np.testing.assert_allclose(train_logits(fast, batch["tokens"], batch["reset"]),
                               train_logits(ref, batch["tokens"], batch["reset"]), atol=2e-5)

    def grads(model):
        gd, st = nnx.split(model)
        return jax.jit(jax.grad(lambda s: nnx.merge(gd, s).loss({}, batch)[0]))(st)

    ga, gb = grads(fast), grads(ref)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(ga["landmark"][...]).max()) > 1e-6  # the landmark embedding learns


def test_documents_are_isolated_within_a_step():
    cfg, model = make("landmark", landmark=LM)
    batch = make_batch(cfg, seed=3)
    reset = batch["reset"].at[:, 2].set(True)  # documents: segments 0-1 and 2-3 in every row
    mixed = train_logits(model, batch["tokens"], reset)
    alone = train_logits(model, batch["tokens"][:, 2:], batch["reset"][:, 2:])
    np.testing.assert_allclose(mixed[:, 16:], alone, atol=2e-5)
    leak = train_logits(model, batch["tokens"], batch["reset"])  # one document: segment 2 sees 0-1
    assert float(jnp.max(jnp.abs(leak[:, 16:] - alone))) > 1e-3
    # the loss (used for training and `memlm eval lm`) is the sum of the documents' losses
    b2 = dict(batch, reset=reset)
    first = {k: v[:, :2] for k, v in batch.items()}
    second = {k: v[:, 2:] for k, v in batch.items()}
    loss = jitted(model, "loss")
    np.testing.assert_allclose(loss({}, b2)[0], loss({}, first)[0] + loss({}, second)[0], rtol=2e-6)


@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_heads"])  # max_over_tokens: chunk-level
def test_causal_in_training_and_streaming(mode):
    cfg, model = make("landmark", landmark={**LM, "top_k": 2, "retrieval_mode": mode})
    tokens = make_batch(cfg)["tokens"]
    flat = tokens.reshape(2, -1)
    ref_t = train_logits(model, tokens)
    ref_s, _ = stream(model, flat, 8)
    for t in (3, 8, 13, 22):  # inside a block, at a segment boundary, in later segments
        pert = flat.at[:, t + 1 :].set((flat[:, t + 1 :] + 7) % 250 + 3)
        out_t = train_logits(model, pert.reshape(tokens.shape))
        out_s, _ = stream(model, pert, 8)
        for ref, out in ((ref_t, out_t), (ref_s, out_s)):
            np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(ref[:, : t + 1]))
            assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(ref[:, t + 1 :]))


@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_tokens"])
def test_retrieving_all_blocks_equals_training_forward(mode, arch="llama"):
    # 4 segments of 8 tokens, b = 4: at most 6 cached blocks before the last chunk; k = cache = 8 >= 6
    cfg, model = make("landmark", landmark={**LM, "retrieval_mode": mode}, **GPT2.get(arch, {}))
    batch = make_batch(cfg, seed=4)
    full = train_logits(model, batch["tokens"])
    streamed, carry = stream(model, batch["tokens"].reshape(2, -1), 8)
    np.testing.assert_allclose(streamed, full, atol=2e-5)
    assert carry["num_blocks"].tolist() == [8, 8]
    # with fewer retrieved blocks the later chunks differ (retrieval really restricts attention)
    _, small = make("landmark", landmark={**LM, "top_k": 1, "retrieval_mode": mode}, **GPT2.get(arch, {}))
    nnx.update(small, nnx.state(model))
    s1, _ = stream(small, batch["tokens"].reshape(2, -1), 8)
    np.testing.assert_allclose(s1[:, :8], full[:, :8], atol=2e-5)  # chunk 0: nothing cached yet
    assert float(jnp.max(jnp.abs(s1[:, 8:] - full[:, 8:]))) > 1e-4  # chunk 1 on: 2+ cached blocks, k = 1


def test_cache_is_a_fifo_of_the_last_blocks():
    """One layer: layer-0 keys/values depend only on their own tokens, so with a cache of one chunk's
    blocks, chunk 2 does not depend on chunk 0 at all (evicted), but does depend on chunk 1."""
    cfg, model = make("landmark", n_layers=1, landmark={"block_size": 4, "top_k": 2, "cache_blocks": 2})
    flat = make_batch(cfg, seed=5)["tokens"].reshape(2, -1)
    ref, carry = stream(model, flat, 8)
    assert carry["k"].shape == (1, 2, 2, 2, 5, 8)  # [layers, batch, kv_heads, cache_blocks, b+1, hd]
    for seg, expect_change in ((0, False), (1, True)):
        pert = flat.at[:, seg * 8 : seg * 8 + 8].set((flat[:, seg * 8 : seg * 8 + 8] + 5) % 250 + 3)
        out, _ = stream(model, pert, 8)
        diff = float(jnp.max(jnp.abs(out[:, 16:24] - ref[:, 16:24])))
        assert (diff > 1e-4) if expect_change else (diff == 0.0), (seg, diff)


def test_positions_stay_bounded_and_memory_is_constant(monkeypatch):
    cfg, model = make("landmark", landmark={"block_size": 4, "top_k": 2, "cache_blocks": 16})
    seen = []
    orig = landmark_mod.rope_any

    def spy(x, positions, theta):
        jax.debug.callback(lambda p: seen.append(int(np.max(p))), jnp.max(positions))
        return orig(x, positions, theta)

    monkeypatch.setattr(landmark_mod, "rope_any", spy)
    flat = jnp.asarray(np.random.default_rng(6).integers(3, V, size=(1, 8 * 40)), jnp.int32)  # 10x training
    seg = jitted(model, "segment_logits")
    carry, shapes = model.init_carry(1), []
    for s in range(0, flat.shape[1], 8):
        _, carry = seg(carry, flat[:, s : s + 8], jnp.arange(s, s + 8)[None])
        shapes.append(jax.tree.map(jnp.shape, carry))
    L, k, local = 5, 2, 8 // 4 * 5
    assert max(seen) == (k + 1) * L + local - 1 == 24  # the bound is reached, never exceeded
    assert max(seen) < cfg.seq_len // 4 * L  # inside the trained range (40 positions)
    assert all(s == shapes[1] for s in shapes[1:])  # cache shape constant after allocation
    assert int(carry["num_blocks"][0]) == 16


def _loaded(cfg, model):
    from memlm.api import LoadedModel
    from memlm.train import setup as setup_lib

    setup = setup_lib.build_setup(cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]), batch_size=1)
    return LoadedModel(cfg, nnx.state(model), setup, 0)


def test_generate_past_the_training_length():
    cfg, model = make("landmark", landmark={"block_size": 4, "top_k": 2, "cache_blocks": 64})
    lm = _loaded(cfg, model)
    prompt = np.random.default_rng(7).integers(3, V, size=8 * cfg.seq_len + 3).tolist()  # 8x training
    new = lm.generate(prompt, max_new_tokens=7, eos_id=-1)  # crosses a chunk boundary (259 -> 266)
    assert len(new) == 7
    logits = lm.logits(np.asarray([prompt + new[:-1]]))  # greedy decoding = argmax of the streamed logits
    assert np.argmax(logits[0, len(prompt) - 1 :], axis=-1).tolist() == new


def test_include_landmark_in_loss():
    cfg, model = make("landmark", landmark=LM)
    _, with_lm = make("landmark", landmark={**LM, "include_landmark_in_loss": True})
    nnx.update(with_lm, nnx.state(model))
    batch = make_batch(cfg, seed=8)
    batch["loss_mask"] = batch["loss_mask"].at[0, 0, 3].set(0.0)  # block 0's last target of row 0 is masked
    l0, n0 = jitted(model, "loss")({}, batch)[:2]
    l1, n1 = jitted(with_lm, "loss")({}, batch)[:2]
    assert float(n0) == 63 and float(n1) == 63 + 16 - 1
    # landmark c predicts the target of the last regular token of block c
    lm_h = jax.jit(lambda t: model.decoder.head(model.forward(t)[1]))(batch["tokens"])
    tgt = batch["targets"].reshape(2, 8, 4)[:, :, -1]
    logp = jax.nn.log_softmax(lm_h, axis=-1)
    ce = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    ce = ce * batch["loss_mask"].reshape(2, 8, 4)[:, :, -1]
    np.testing.assert_allclose(float(l1 - l0), float(ce.sum()), rtol=1e-5)


def test_config_errors(capsys):
    base = {"model": {"kind": "landmark"}, "data": {"segment_len": 100}}
    with pytest.raises(UserError, match=r"model\.landmark: top_k \(8\) exceeds cache_blocks \(4\)"):
        from_dict({**base, "model": {"kind": "landmark", "landmark": {"top_k": 8, "cache_blocks": 4}}})
    with pytest.raises(UserError, match=r"model\.landmark\.block_size \(30\) does not divide data\.segment_len"):
        from_dict({**base, "model": {"kind": "landmark", "landmark": {"block_size": 30}}})
    with pytest.raises(UserError, match=r"model\.max_seq_len \(32\) is smaller than a landmark segment \(40 "):
        from_dict({"model": {"kind": "landmark", "arch": "gpt2", "max_seq_len": 32, "landmark": LM},
                   "data": {"segment_len": 32}})
    code = cli_main(["train", os.path.join(ROOT, "configs/tiny/landmark.yaml"), "model.landmark.top_k=5000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "exceeds cache_blocks" in err, err


# ---- arch=gpt2: learned absolute positions, restarting at every segment (= streamed chunk) --------------------
@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_tokens"])
def test_gpt2_retrieving_all_blocks_equals_training_forward(mode):
    """GPT-2 has no RoPE to re-apply at retrieval, so its learned positions are segment-local in training and
    chunk-local when streaming; then retrieval of every cached block is exactly the training forward."""
    test_retrieving_all_blocks_equals_training_forward(mode, arch="gpt2")


def test_gpt2_positions_are_segment_local_and_used():
    cfg, model = make("landmark", landmark=LM, **GPT2["gpt2"])
    tokens = make_batch(cfg, seed=6)["tokens"]  # [2, 4 segments, 8]
    full = train_logits(model, tokens)
    # the first segment alone gives the same logits: positions restart per segment, and segment 0 sees nothing
    # earlier; perturbing the position table changes them (so the table is really used)
    np.testing.assert_allclose(train_logits(model, tokens[:, :1]), full[:, :8], atol=2e-5)
    pe = model.decoder.pos_embedding
    old = pe[...]
    # position 3 of each segment = token 3 of its segment (a random direction: LayerNorm removes a constant)
    pe[...] = old.at[3].add(jax.random.normal(jax.random.key(0), old.shape[1:]))
    _JIT.clear()
    moved = train_logits(model, tokens)
    pe[...] = old
    _JIT.clear()
    diff = np.abs(np.asarray(moved - full)).max(axis=-1)  # [2, 32]
    assert diff[:, :3].max() == 0 and diff[:, 3].min() > 1e-4 and diff[:, 11].min() > 1e-4


@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_heads"])
def test_gpt2_causal_in_training_and_streaming(mode):
    cfg, model = make("landmark", landmark={**LM, "top_k": 2, "retrieval_mode": mode}, **GPT2["gpt2"])
    tokens = make_batch(cfg)["tokens"]
    flat = tokens.reshape(2, -1)
    ref_t, (ref_s, _) = train_logits(model, tokens), stream(model, flat, 8)
    for t in (5, 8, 20):
        pert = flat.at[:, t + 1 :].set((flat[:, t + 1 :] + 7) % 250 + 3)
        out_t, (out_s, _) = train_logits(model, pert.reshape(tokens.shape)), stream(model, pert, 8)
        for ref, out in ((ref_t, out_t), (ref_s, out_s)):
            np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(ref[:, : t + 1]))
            assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(ref[:, t + 1 :]))
