"""model.arch=gpt2 against a slow, written-out GPT-2 forward (Radford et al. 2019): logits and gradients.

The reference loops over layers and heads with the textbook formulas (two-pass LayerNorm, tanh GELU, learned
absolute positions, tied head); it shares no code with memlm.layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm import distributed, sharding
from memlm.config import from_dict
from memlm.models.lm import build_model
from memlm.train import setup as setup_lib
from tests.core.helpers import random_batch, tiny_config

pytestmark = pytest.mark.unit

MODEL = {"arch": "gpt2", "vocab_size": 259, "d_model": 24, "n_layers": 2, "n_heads": 3, "d_ff": 40,
         "max_seq_len": 32, "dtype": "float32", "remat": "none", "tie_embeddings": True, "norm_eps": 1e-5}


def _layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * g + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(p, tokens, n_heads, eps, vocab):
    """p: the pure-dict params of a memlm gpt2 baseline; tokens [batch, t] -> logits [batch, t, vocab]."""
    d = p["decoder"]
    b, t = tokens.shape
    x = d["embedding"][tokens] + d["pos_embedding"][jnp.arange(t)][None]
    blk = d["blocks"]
    for layer in range(blk["attn"]["wq"]["kernel"].shape[0]):
        g = lambda *ks, layer=layer: _get(blk, ks)[layer]  # noqa: E731
        h = _layer_norm(x, g("attn_norm", "scale"), g("attn_norm", "bias"), eps)
        q = h @ g("attn", "wq", "kernel") + g("attn", "wq", "bias")
        k = h @ g("attn", "wk", "kernel") + g("attn", "wk", "bias")
        v = h @ g("attn", "wv", "kernel") + g("attn", "wv", "bias")
        hd = q.shape[-1] // n_heads
        heads = []
        for i in range(n_heads):
            sl = slice(i * hd, (i + 1) * hd)
            s = jnp.einsum("bqd,bkd->bqk", q[..., sl], k[..., sl]) / np.sqrt(hd)
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
            heads.append(jax.nn.softmax(s, axis=-1) @ v[..., sl])
        x = x + jnp.concatenate(heads, -1) @ g("attn", "wo", "kernel") + g("attn", "wo", "bias")
        h = _layer_norm(x, g("mlp_norm", "scale"), g("mlp_norm", "bias"), eps)
        f = _gelu_tanh(h @ g("mlp", "w1", "kernel") + g("mlp", "w1", "bias"))
        x = x + f @ g("mlp", "w2", "kernel") + g("mlp", "w2", "bias")
    x = _layer_norm(x, d["final_norm"]["scale"], d["final_norm"]["bias"], eps)
    return (x @ d["embedding"].T)[..., :vocab]


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _model():
    cfg = from_dict({"model": MODEL, "data": {"segment_len": 16, "n_segments": 1}})
    with sharding.activate(sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        model = build_model(cfg.model, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # random norm scales / biases: the defaults (ones / zeros) would hide a swapped or missing term
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return cfg, graphdef, state


def test_gpt2_forward_and_gradients_match_the_reference():
    cfg, graphdef, state = _model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 12)), jnp.int32)
    target = jax.nn.one_hot(jnp.asarray(np.random.default_rng(1).integers(0, 259, (2, 12))), 259)

    def ours(s):
        return nnx.merge(graphdef, s).full_logits(tokens)[..., :259]

    def ref(s):
        return reference_logits(nnx.to_pure_dict(s), tokens, MODEL["n_heads"], MODEL["norm_eps"], 259)

    def loss(fn):
        def f(s):
            logits = fn(s)
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * target, -1)), logits

        return jax.jit(jax.grad(f, has_aux=True))

    (ga, a), (gb, b) = loss(ours)(state), loss(ref)(state)
    assert a.shape == b.shape == (2, 12, 259)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
    flat_a, flat_b = nnx.to_flat_state(ga), dict(nnx.to_flat_state(gb))
    for path, v in flat_a:
        x, y = np.asarray(v[...]), np.asarray(flat_b[path][...])
        assert np.abs(y).max() > 0, path  # every parameter gets a gradient (pos table: first 12 rows)
        np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-4, err_msg=str(path))


def test_positions_past_the_table_use_the_last_row():
    cfg, graphdef, state = _model()
    model = nnx.merge(graphdef, state)
    x = jnp.zeros((1, 2, MODEL["d_model"]))
    mask = jnp.tril(jnp.ones((2, 2), bool))[None, None]
    far = model.decoder.backbone(x, jnp.asarray([[5, 1000]]), mask)
    last = model.decoder.backbone(x, jnp.asarray([[5, MODEL["max_seq_len"] - 1]]), mask)
    np.testing.assert_array_equal(np.asarray(far), np.asarray(last))


@pytest.mark.sharding
def test_gpt2_train_step_is_the_same_on_every_mesh():
    cfg = tiny_config(model={"arch": "gpt2", "tie_embeddings": True, "n_kv_heads": 0})
    losses, biases = {}, None
    for shape in [(1, 1, 1), (2, 2, 2)]:
        n = int(np.prod(shape))
        setup = setup_lib.build_setup(cfg, sharding.make_mesh(*shape, devices=jax.devices()[:n]))
        params = setup_lib.init_params(setup, 0)
        opt = setup_lib.init_opt_state(setup, params)
        carry = setup_lib.init_carry(setup, params)
        step = setup_lib.jit_train_step(setup)
        out = []
        with setup.activate():
            for i in range(2):
                batch = distributed.to_global(random_batch(cfg, i), setup.batch_sh)
                params, opt, carry, m = step(params, opt, carry, batch)
                out.append(float(m["loss"]))
        losses[shape] = out
        biases = params["decoder"]["blocks"]["attn"]["wq"]["bias"][...]
    assert tuple(biases.sharding.spec) == (None, "tensor")  # [layers, heads] bias split like its kernel
    assert np.abs(np.asarray(biases)).max() > 0  # biases were trained
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=2e-6)
    assert abs(losses[(1, 1, 1)][1] - losses[(1, 1, 1)][0]) > 1e-4
