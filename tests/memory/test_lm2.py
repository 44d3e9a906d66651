"""LM2: the memory module against a float64 reference of the paper's equations, reduction to the baseline,
causality (and the official-code gate's leak), memory reach, truncated BPTT, streaming, resets, config errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memlm import sharding
from memlm.config import from_dict
from memlm.errors import UserError
from memlm.layers.attention import causal_mask
from memlm.memory.lm2 import LM2Memory
from tests.core.cli_utils import run_memlm
from tests.memory.common import make, make_batch, stacked_layer, stream_logits

pytestmark = pytest.mark.unit

LM2 = {"num_slots": 16, "num_heads": 4}


def lm2(**kw):
    return make("lm2", lm2={**LM2, **kw})


def perturb(tokens, sl):
    return tokens.at[:, sl].set((tokens[:, sl] + 7) % 250 + 3)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _slot_tokens(n: int, num_tokens: int, num_slots: int) -> list[int]:
    """The tokens whose updates slot n averages under `write_routing: position`, spelled out."""
    if num_tokens >= num_slots:  # contiguous buckets, as adaptive average pooling
        return [t for t in range(num_tokens) if int(t * num_slots / num_tokens) == n]
    return [int(n * num_tokens / num_slots)]  # nearest-neighbour upsampling


@pytest.mark.parametrize("top_k,routing,tokens", [(0, "read_weights", 5), (3, "read_weights", 5),
                                                  (0, "position", 5), (3, "position", 7), (0, "position", 12)])
def test_memory_module_matches_the_paper_equations(top_k, routing, tokens):
    cfg = from_dict({"model": {"kind": "lm2", "d_model": 8, "n_heads": 2, "dtype": "float32",
                               "lm2": {"num_slots": 6, "num_heads": 2, "top_k": top_k,
                                       "write_routing": routing}}}).model
    with sharding.activate(sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        mod = LM2Memory(cfg, nnx.Rngs(1))
    rng = np.random.default_rng(0)
    e, mem = rng.normal(size=(2, tokens, 8)), rng.normal(size=(2, 6, 8))
    gated, new, _ = mod(jnp.asarray(e, jnp.float32), jnp.asarray(mem, jnp.float32))
    W = {n: np.asarray(getattr(mod, n).kernel[...], np.float64)
         for n in ("wq", "wk", "wv", "w_out", "w_in", "w_forget")}
    for b in range(2):
        # read (§2.1): per head softmax(Q K^T / sqrt(d_h)) V over the slots (top-k slots only if set)
        e_mem, wsum = np.zeros((tokens, 8)), np.zeros((tokens, 6))
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            q, k, v = e[b] @ W["wq"][:, sl], mem[b] @ W["wk"][:, sl], mem[b] @ W["wv"][:, sl]
            for t in range(tokens):
                s = q[t] @ k.T / 2.0
                keep = np.argsort(-s)[:top_k] if top_k else np.arange(6)
                a = np.zeros(6)
                a[keep] = np.exp(s[keep] - s[keep].max()) / np.exp(s[keep] - s[keep].max()).sum()
                e_mem[t, sl] = a @ v
                wsum[t] += a / 2
        g_out, g_in, g_f = _sigmoid(e_mem @ W["w_out"]), _sigmoid(e[b] @ W["w_in"]), _sigmoid(e_mem @ W["w_forget"])
        np.testing.assert_allclose(np.asarray(gated[b]), g_out * e_mem, rtol=1e-4, atol=1e-6)
        for n in range(6):
            # the paper's M' = g_in * tanh(E_mem) + g_forget * M, for each token t, into slot n
            update = [g_in[t] * np.tanh(e_mem[t]) + g_f[t] * mem[b, n] for t in range(tokens)]
            if routing == "position":  # slot n <- the mean update of its tokens
                ref = np.mean([update[t] for t in _slot_tokens(n, tokens, 6)], axis=0)
            else:  # routed by the read weights: alpha_t = w[t,n] / max(sum_t w[t,n], 1)
                alpha = wsum[:, n] / max(wsum[:, n].sum(), 1.0)
                ref = sum(alpha[t] * update[t] for t in range(tokens)) + (1 - alpha.sum()) * mem[b, n]
            np.testing.assert_allclose(np.asarray(new[b, n]), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_value_projection_is_the_segment_local_baseline(arch):
    # W^V = 0 makes E_mem = 0, so every block adds exactly nothing: the baseline decoder with the same params
    cfg, model = make("lm2", arch=arch, lm2=LM2)
    _, base = make("baseline", arch=arch, segment_local=True)
    nnx.update(model.decoder, nnx.state(base.decoder))
    batch = make_batch(cfg)
    l_base, n_base, _, _ = base.loss({}, batch)
    l_mem = float(model.loss(model.init_carry(2), batch)[0])
    assert abs(l_mem - float(l_base)) > 1e-4  # the memory does contribute...
    wv = model.decoder.blocks.memory.wv.kernel
    wv.value = jnp.zeros_like(wv[...])
    l_lm2, n_lm2, _, _ = model.loss(model.init_carry(2), batch)
    np.testing.assert_allclose(float(l_lm2), float(l_base), rtol=1e-6)  # ...and nothing else differs
    assert float(n_lm2) == float(n_base)


@pytest.mark.parametrize("gate_mode,routing,bank,leaks", [
    ("causal", "position", "per_block", False), ("causal", "read_weights", "per_block", False),
    ("sequence_mean_leaky", "position", "per_block", True),
    ("causal", "position", "shared", False), ("sequence_mean_leaky", "position", "shared", True)])
def test_causality_and_the_leaky_official_gate(gate_mode, routing, bank, leaks):
    cfg, model = lm2(gate_mode=gate_mode, write_routing=routing, bank=bank)
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    ref = stream_logits(model, tokens, 8)
    for t in (2, 7, 8, 13, 21):  # inside a segment and at boundaries
        out = stream_logits(model, perturb(tokens, slice(t + 1, None)), 8)
        past = float(jnp.max(jnp.abs(out[:, : t + 1] - ref[:, : t + 1])))
        if not leaks:
            assert past == 0.0, (t, past)
        elif t % 8 != 7:  # the leak: a later token of the same segment changes earlier logits
            assert past > 1e-6, (t, past)
        assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(ref[:, t + 1 :]))


@pytest.mark.parametrize("kind,extra,expect_change", [
    ("lm2", {"lm2": LM2}, True),
    ("lm2", {"lm2": {**LM2, "top_k": 4}}, True),
    ("lm2", {"lm2": {**LM2, "write_routing": "read_weights"}}, True),
    ("lm2", {"lm2": {**LM2, "bank": "shared"}}, True),
    ("baseline", {"segment_local": True}, False),
])
def test_segment_one_reaches_segment_three(kind, extra, expect_change):
    cfg, model = make(kind, **extra)
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    ref = stream_logits(model, tokens, 8)
    out = stream_logits(model, perturb(tokens, slice(0, 8)), 8)
    diff = float(jnp.max(jnp.abs(out[:, 16:24] - ref[:, 16:24])))
    # at init the memory path is weak (read weights ~uniform, values ~init_std): ~4e-5, vs exactly 0
    assert (diff > 1e-6) if expect_change else (diff == 0.0), diff


@pytest.mark.parametrize("depth,zero", [(1, True), (-1, False)])
def test_truncated_bptt(depth, zero):
    cfg, model = lm2()
    # segment 0 uses token ids 3..49 only, later segments 50..258; the loss is on the last segment only, so
    # embedding rows 3..49 get gradient only through the carried memory banks.
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
    assert np.all(g_seg0 == 0.0) if zero else np.abs(g_seg0).max() > 1e-9
    # the write gates act only through the next segment's read: a cut at every boundary leaves them untrained
    g_in = np.abs(np.asarray(g["decoder"]["blocks"]["memory"]["w_in"]["kernel"][...])).max()
    assert (g_in == 0.0) if zero else g_in > 0
    assert np.abs(np.asarray(g["decoder"]["blocks"]["memory"]["wq"]["kernel"][...])).max() > 0  # the read is


@pytest.mark.parametrize("bank,shape", [("per_block", (2, 2, 16, 32)), ("shared", (2, 16, 32))])
def test_streaming_equals_training_forward(bank, shape):
    cfg, model = lm2(bank=bank)
    batch = make_batch(cfg, seed=3)
    loss_sum, n, carry, aux = model.loss(model.init_carry(2), batch)
    logits = stream_logits(model, batch["tokens"].reshape(2, -1), 8)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"].reshape(2, -1)).sum()
    np.testing.assert_allclose(float(loss_sum), float(ref), rtol=2e-6)
    assert carry["memory"].shape == shape
    assert {"gate_in", "gate_forget", "gate_out", "memory_norm"} <= set(aux)


@pytest.mark.parametrize("gate_mode", ["causal", "sequence_mean_leaky"])
def test_shared_bank_chains_the_writes_block_to_block(gate_mode):
    """`bank: shared`, spelled out as a loop over the blocks with each block's own read and write: every block
    reads the segment-start bank M (the chain's M_t under the leaky gate) and writes M_{t+1} = write_t(M_t);
    the next segment starts from M_L. With one block it is the per-block model with the same parameters."""
    cfg, model = lm2(bank="shared", gate_mode=gate_mode)
    dec = model.decoder
    tokens = make_batch(cfg, seed=5)["tokens"].reshape(2, -1)
    carry = model.init_carry(2)
    bank = carry["memory"]
    for start in (0, 8, 16):
        seg = tokens[:, start:start + 8]
        pos = jnp.broadcast_to(jnp.arange(8), seg.shape)
        x = dec.add_positions(dec.embed(seg), pos)
        chain = bank
        for i in range(cfg.model.n_layers):
            block = stacked_layer(model.decoder.blocks, i)
            e = block.attn_norm(x)
            read_from = chain if gate_mode == "sequence_mean_leaky" else bank
            e_mem, w = block.memory.read(e, read_from)
            new, _, _ = block.memory.write(e, e_mem, w, chain)
            if gate_mode == "sequence_mean_leaky":
                e_mem, _ = block.memory.read(e, new)
            g_out = jax.nn.sigmoid(block.memory.w_out(e_mem.astype(e.dtype)).astype(jnp.float32))
            h = x + block.attn(e, pos, causal_mask(pos, pos)) + (g_out * e_mem).astype(e.dtype)
            x = h + block.mlp(block.mlp_norm(h))
            chain = new
        want = dec.head(dec.final_norm(x))
        logits, carry = model.segment_logits(carry, seg)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(carry["memory"]), np.asarray(chain), rtol=2e-5, atol=2e-6)
        bank = chain
    assert float(jnp.max(jnp.abs(bank - model.init_carry(2)["memory"]))) > 1e-3  # the bank did move
    # one block: the shared bank is the per-block model's only bank
    cfg1, one = make("lm2", n_layers=1, lm2={**LM2, "bank": "shared", "gate_mode": gate_mode})
    _, per_block = make("lm2", n_layers=1, lm2={**LM2, "gate_mode": gate_mode})
    nnx.update(per_block, nnx.state(one))
    np.testing.assert_allclose(np.asarray(stream_logits(one, tokens, 8)),
                               np.asarray(stream_logits(per_block, tokens, 8)), rtol=1e-6, atol=1e-6)


def test_reset_restores_initial_memory():
    cfg, model = lm2()
    batch = make_batch(cfg)
    batch["reset"] = batch["reset"].at[:, 2].set(True)  # a new document at segment 2
    full = model.loss(model.init_carry(2), batch)[0]
    first = {k: v[:, :2] for k, v in batch.items()}
    second = {k: v[:, 2:] for k, v in batch.items()}
    a = model.loss(model.init_carry(2), first)[0]
    junk = {"memory": model.init_carry(2)["memory"] * 3.0 + 0.5}
    b = model.loss(junk, second)[0]
    np.testing.assert_allclose(float(full), float(a + b), rtol=2e-6)
    no_reset = {**second, "reset": jnp.zeros_like(second["reset"])}
    assert abs(float(model.loss(junk, no_reset)[0]) - float(b)) > 1e-4


def test_config_errors():
    with pytest.raises(UserError, match="model.lm2.num_slots"):
        from_dict({"model": {"kind": "lm2", "lm2": {"num_slots": 0}}})
    with pytest.raises(UserError, match="model.lm2.gate_mode"):
        from_dict({"model": {"kind": "lm2", "lm2": {"gate_mode": "mean"}}})
    with pytest.raises(UserError, match="model.lm2.write_routing"):
        from_dict({"model": {"kind": "lm2", "lm2": {"write_routing": "content"}}})
    with pytest.raises(UserError, match="model.lm2 is set"):
        from_dict({"model": {"kind": "hmt", "lm2": {"num_slots": 4}}})
    # keys that contradict the model are checked when it is built
    with pytest.raises(UserError, match=r"model.lm2.num_slots \(64\) exceeds model.d_model \(32\)"):
        lm2(num_slots=64)
    with pytest.raises(UserError, match="model.lm2.num_heads"):
        lm2(num_heads=3)
    with pytest.raises(UserError, match="model.lm2.top_k"):
        lm2(top_k=17)
    cfg, model = make("lm2", seg_len=16, max_seq_len=8, lm2=LM2)
    with pytest.raises(UserError, match="data.segment_len"):
        model.loss(model.init_carry(2), make_batch(cfg))


@pytest.mark.integration
def test_cli_smoke_tiny_config(tmp_path):
    r = run_memlm("train", "configs/tiny/lm2.yaml", "data.source=synthetic", "train.steps=3", "train.log_every=1",
                  "train.eval_every=0", f"run.dir={tmp_path}/run", "train.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = open(os.path.join(tmp_path, "run", "metrics.jsonl")).read()
    assert "gate_forget" in metrics and "memory_norm" in metrics
