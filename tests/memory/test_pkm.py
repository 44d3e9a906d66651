"""Memory layers / Memory+ (arXiv 2412.09764): model == slow dense reference (forward, gradients, usage stats),
one shared value pool, the values' optimizer group, sharded == single device, bad input via the CLI."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from memlm import distributed, sharding
from memlm.memory import pkm
from memlm.train import setup as setup_lib
from memlm.train.optimizer import lr_schedule, make_optimizer
from tests.core.cli_utils import run_memlm
from tests.core.helpers import random_batch, tiny_config
from tests.memory.common import make, make_batch

pytestmark = pytest.mark.unit

HI = lax.Precision.HIGHEST
# XLA:CPU backend optimisation is most of the compile time of these tiny models and none of their run time
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MEM = {"num_values": 64, "heads": 2, "top_k": 3, "k_dim": 8, "value_lr": 1e-2}


def _mem_model(layers=(1, 2), n_layers=5, **mem):
    return make("memory_layers", seg_len=8, n_seg=2, n_layers=n_layers,
                memory_layers={**MEM, "layers": list(layers), **mem})


# ---- the slow reference: every layer in a Python loop, the memory dense over all N product keys ----------------
def _rms(x, eps):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def dense_memory(mem: pkm.ProductKeyMemory, x, values, cfg):
    """x [B, S, d] -> (out [B, S, d], indices, weights [B·S, H, k]). Product key n = [K1[n // √N] ; K2[n % √N]]
    (Lample et al. 2019 §3.2): scores against all N concatenated keys, lax.top_k over N, softmax, heads summed."""
    ml = cfg.memory_layers
    b, s, d = x.shape
    h, kd, n = ml.heads, ml.k_dim, ml.num_values
    sqrt_n = math.isqrt(n)
    q = (jnp.einsum("bsd,de->bse", x, mem.query.kernel[...], precision=HI) + mem.query.bias[...]).reshape(b * s, h, kd)
    k1, k2 = mem.keys1[...], mem.keys2[...]
    if ml.qk_norm:
        q = (_rms(q.reshape(b * s, h, 2, kd // 2), cfg.norm_eps) * mem.q_scale[...]).reshape(b * s, h, kd)
        q = q / math.sqrt(kd // 2)
        k1, k2 = _rms(k1, cfg.norm_eps), _rms(k2, cfg.norm_eps)
    rows = jnp.arange(n)
    full_keys = jnp.concatenate([k1[:, rows // sqrt_n], k2[:, rows % sqrt_n]], axis=-1)  # [H, N, k_dim]
    scores = jnp.einsum("thd,hnd->thn", q, full_keys, precision=HI)
    top, idx = lax.top_k(scores, ml.top_k)
    w = jax.nn.softmax(top, axis=-1)
    y = jnp.einsum("thk,thkv->tv", w, values[idx], precision=HI).reshape(b, s, -1)
    if ml.memory_plus:
        gate = jax.nn.silu(jnp.einsum("bsd,dv->bsv", x, mem.w1.kernel[...], precision=HI))
        y = jnp.einsum("bsv,vd->bsd", y * gate, mem.w2.kernel[...], precision=HI)
    return y, idx, w


def reference_logits(model: pkm.MemoryLayersLM, tokens):
    """Layer by layer in a Python loop: plain layer = the next slice of `blocks`, memory layer = the next slice
    of `memory_blocks` with dense_memory in place of the lookup."""
    cfg, dec = model.cfg, model.decoder
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = pos[:, None, None, :] <= pos[:, None, :, None]
    h = dec.embedding[...][tokens]
    mem_layers = set(cfg.memory_layers.layers)
    n_plain = n_mem = 0
    picks = []
    for layer in range(cfg.n_layers):
        if layer not in mem_layers:
            graphdef, stacked = nnx.split(dec.blocks)
            h = nnx.merge(graphdef, jax.tree.map(lambda a, j=n_plain: a[j], stacked))(h, pos, mask)
            n_plain += 1
            continue
        graphdef, stacked = nnx.split(dec.memory_blocks)
        blk = nnx.merge(graphdef, jax.tree.map(lambda a, j=n_mem: a[j], stacked))
        values = model.values[...] if cfg.memory_layers.memory_plus else blk.memory.values[...]
        h = h + blk.attn(blk.attn_norm(h), pos, mask)
        y, idx, w = dense_memory(blk.memory, blk.mlp_norm(h), values, cfg)
        h = h + y
        picks.append((layer, idx, w))
        n_mem += 1
    return jnp.einsum("btd,dv->btv", dec.final_norm(h), dec.lm_head.kernel[...], precision=HI), picks


def _numpy_usage(idx, w, n):
    idx, w = np.asarray(idx).reshape(-1), np.asarray(w, np.float64).reshape(-1)
    mass = np.bincount(idx, weights=w, minlength=n)
    p = mass / mass.sum()
    return np.mean(np.bincount(idx, minlength=n) > 0), -np.sum(p[p > 0] * np.log(p[p > 0]))


@pytest.mark.parametrize("layers,n_layers,extra", [
    ((0, 3), 4, {}),  # Memory+ (shared pool, swilu): memory first and last, two plain layers between
    # PKM (own values per layer, output = value sum), adjacent memory layers, qk-norm, and the lookup in
    # chunks: 16 positions -> 4 chunks of 5, the last one padded
    ((1, 2), 4, {"memory_plus": False, "qk_norm": True, "chunk_len": 5}),
])
def test_forward_and_gradients_equal_the_dense_reference(layers, n_layers, extra):
    cfg, model = _mem_model(layers, n_layers, **extra)
    tokens = make_batch(cfg)["tokens"].reshape(2, -1)
    graphdef, params = nnx.split(model)
    v = cfg.model.vocab_size  # padded vocab rows are masked to -1e30 (no gradient) in the model only
    r = jax.random.normal(jax.random.PRNGKey(1), (2, tokens.shape[1], v))

    def fast(p):
        logits = nnx.merge(graphdef, p).full_logits(tokens)[..., :v]
        return jnp.sum(logits * r), logits

    def slow(p):
        logits, picks = reference_logits(nnx.merge(graphdef, p), tokens)
        return jnp.sum(logits[..., :v] * r), (logits[..., :v], picks)

    (_, out_fast), g_fast = jax.jit(jax.value_and_grad(fast, has_aux=True), compiler_options=FAST)(params)
    (_, (out_slow, picks)), g_slow = jax.jit(jax.value_and_grad(slow, has_aux=True), compiler_options=FAST)(params)
    np.testing.assert_allclose(out_fast, out_slow, rtol=1e-4, atol=1e-5)
    flat_s = dict(jax.tree_util.tree_flatten_with_path(g_slow)[0])
    n_values = 0
    for path, a in jax.tree_util.tree_flatten_with_path(g_fast)[0]:
        b = flat_s[path]
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5, err_msg=jax.tree_util.keystr(path))
        if "values" in jax.tree_util.keystr(path):
            n_values += 1
            assert float(jnp.max(jnp.abs(a))) > 0  # the values get gradient
    assert n_values == 1  # Memory+: the pool; PKM: one stacked [M, N, v] table

    if extra:
        return
    # usage stats in aux equal a NumPy count over the reference's selections (one document per row)
    batch = make_batch(cfg)
    aux = jax.jit(lambda p: nnx.merge(graphdef, p).loss({}, batch)[3], compiler_options=FAST)(params)
    for layer, idx, w in picks:
        used, ent = _numpy_usage(idx, w, cfg.model.memory_layers.num_values)
        np.testing.assert_allclose(float(aux[f"pkm_l{layer}_used_frac"]), used, rtol=1e-6)
        np.testing.assert_allclose(float(aux[f"pkm_l{layer}_usage_entropy"]), ent, rtol=1e-5)
    assert 0 < float(aux["pkm_used_frac"]) <= 1


def test_shared_pool_is_one_parameter():
    cfg, model = _mem_model(layers=(0, 2, 4), n_layers=5)
    ml = cfg.model.memory_layers
    params = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    pools = [jax.tree_util.keystr(p) for p, x in flat if x.shape == (ml.num_values, cfg.model.d_model)]
    assert pools == ["['values'].value"], pools
    # ... and every memory layer reads it: cutting one layer's output (w2 = 0) changes the pool's gradient
    graphdef, state = nnx.split(model)
    batch = make_batch(cfg)

    @functools.partial(jax.jit, compiler_options=FAST)
    def pool_grad(st):
        return jax.grad(lambda s: nnx.merge(graphdef, s).loss({}, batch)[0])(st)["values"][...]

    full = pool_grad(state)
    for m in range(3):
        cut = nnx.clone(model)
        w2 = cut.decoder.memory_blocks.memory.w2.kernel  # stacked [M, v, d]
        w2[...] = w2[...].at[m].set(0.0)
        assert not np.allclose(np.asarray(pool_grad(nnx.state(cut))), np.asarray(full)), m
    # the PKM variant: one table per memory layer, no shared pool
    cfg2, model2 = _mem_model(layers=(0, 2, 4), n_layers=5, memory_plus=False)
    flat2 = jax.tree_util.tree_flatten_with_path(nnx.state(model2, nnx.Param))[0]
    tables = [x.shape for p, x in flat2 if "values" in jax.tree_util.keystr(p)]
    assert tables == [(3, ml.num_values, cfg.model.d_model)], tables  # stacked: one table per memory layer


def test_layer_schedule_and_equal_flops():
    is_mem, index = pkm.layer_schedule(8, [1, 2, 6])
    assert is_mem.tolist() == [False, True, True, False, False, False, True, False]
    assert index.tolist() == [0, 0, 1, 1, 2, 3, 2, 4]  # position among the layers of its own kind
    cfg, _ = _mem_model(layers=(1,), n_layers=2)
    m = cfg.model
    # d=32, H=2, k_dim=8, sqrt_n=8, k=3, v=32: query 1024 + scores 256 + cand 18 + bag 384 + swilu 4096
    assert pkm.memory_flops_per_token(m) == 2 * 32 * 16 + 2 * 2 * 8 * 8 + 2 * 9 + 2 * 2 * 3 * 32 + 4 * 32 * 32
    assert pkm.equal_flops_d_ff(m) == round((6 * 32 * 64 + pkm.memory_flops_per_token(m)) / (6 * 32 * 2))


# ---- optimizer ---------------------------------------------------------------------------------------------
def _optimizer_case(grad_clip, value_wd):
    cfg = tiny_config(
        train={"lr": 1e-3, "warmup_steps": 2, "steps": 10, "weight_decay": 0.1, "grad_clip": grad_clip},
        model={"kind": "memory_layers",
               "memory_layers": {**MEM, "layers": [1], "value_lr": 5e-2, "value_weight_decay": value_wd}})
    params = {"values": jnp.ones((4, 3)), "w": {"kernel": jnp.ones((3, 3)), "scale": jnp.ones((3,))}}
    return cfg, params


@pytest.mark.parametrize("grad_clip,value_wd", [(0.0, False), (0.5, True)])
def test_values_have_their_own_group(grad_clip, value_wd):
    cfg, params = _optimizer_case(grad_clip, value_wd)
    tx = make_optimizer(cfg.train, cfg.model)
    t = cfg.train
    sched = lr_schedule(t)
    clip = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    # reference: two independent AdamWs, values at value_lr * schedule shape, clipped on their own
    ref_v = optax.chain(*clip, optax.adamw(lambda c: sched(c) * 50.0, t.b1, t.b2, t.eps,
                                           weight_decay=t.weight_decay if value_wd else 0.0))
    ref_o = optax.chain(*clip, optax.adamw(sched, t.b1, t.b2, t.eps, weight_decay=t.weight_decay,
                                           mask={"kernel": True, "scale": False}))
    st, sv, so = tx.init(params), ref_v.init(params["values"]), ref_o.init(params["w"])
    p, pv, po = params, params["values"], params["w"]
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u, st = tx.update(g, st, p)
        p = optax.apply_updates(p, u)
        uv, sv = ref_v.update(g["values"], sv, pv)
        pv = optax.apply_updates(pv, uv)
        uo, so = ref_o.update(g["w"], so, po)
        po = optax.apply_updates(po, uo)
    np.testing.assert_allclose(p["values"], pv, rtol=1e-6)
    for k in po:
        np.testing.assert_allclose(p["w"][k], po[k], rtol=1e-6)
    assert not np.allclose(p["values"], params["values"])


def test_other_models_keep_the_plain_adamw():
    cfg = tiny_config()
    params = {"values": jnp.ones((4, 3)), "kernel": jnp.ones((3, 3))}
    g = jax.tree.map(lambda x: x * 0.3, params)
    for tx in (make_optimizer(cfg.train), make_optimizer(cfg.train, cfg.model)):
        ref = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip),
                          optax.adamw(lr_schedule(cfg.train), cfg.train.b1, cfg.train.b2, cfg.train.eps,
                                      weight_decay=cfg.train.weight_decay))
        s, sr = tx.init(params), ref.init(params)
        for _ in range(3):
            u, s = tx.update(g, s, params)
            ur, sr = ref.update(g, sr, params)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ur)):
                np.testing.assert_allclose(a, b, rtol=1e-6)


# ---- sharding ----------------------------------------------------------------------------------------------
# One jit_train_step per mesh. Adam with eps = 1 > |g| makes the first update -lr·g/(|g| + eps), a smooth
# monotone function of the gradient (not Adam's usual ~sign(g)): comparing the update compares gradients.
SHARD_TRAIN = {"lr": 1.0, "warmup_steps": 0, "eps": 1.0, "weight_decay": 0.0, "grad_clip": 0.0}


def _one_step(layout, mesh_shape, monkeypatch, rules=None, chunk_len=0):
    mem = {**MEM, "layers": [0, 2], "value_sharding": layout, "value_lr": 1.0, "chunk_len": chunk_len}
    cfg = tiny_config(train=SHARD_TRAIN, mesh={"rules": rules or {}},
                      model={"kind": "memory_layers", "n_layers": 3, "memory_layers": mem})
    calls = []
    real = pkm.pkm_lookup_sharded
    monkeypatch.setattr(pkm, "pkm_lookup_sharded", lambda *a, **k: calls.append(k["value_axis"]) or real(*a, **k))
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    setup = setup_lib.build_setup(cfg, mesh)
    params = setup_lib.init_params(setup, 0)
    before = jax.tree.map(np.asarray, params)
    opt = setup_lib.init_opt_state(setup, params)
    carry = setup_lib.init_carry(setup, params)
    spec = tuple(params["values"].value.sharding.spec)
    with setup.activate():
        batch = distributed.to_global(random_batch(cfg, 0), setup.batch_sh)
        step = setup_lib.jit_train_step(setup).lower(params, opt, carry, batch).compile(FAST)
        params, _, _, m = step(params, opt, carry, batch)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, params, before)
    # float32 params round the update: allow a few ulps of the parameter on top of the relative tolerance
    ulps = jax.tree.map(lambda b: 4 * np.finfo(np.float32).eps * float(np.max(np.abs(b))), before)
    metrics = [float(m[k]) for k in ("loss", "grad_norm", "pkm_used_frac", "pkm_usage_entropy")]
    return metrics, delta, spec, calls, ulps


@pytest.fixture(scope="module")
def single_device_step():
    mp = pytest.MonkeyPatch()
    try:
        return _one_step("columns", (1, 1, 1), mp)
    finally:
        mp.undo()


@pytest.mark.sharding
@pytest.mark.parametrize("layout,mesh_shape,rules,axis,chunk_len", [
    ("columns", (2, 2, 2), None, "tensor", 0),   # columns over tensor, tokens over data x fsdp
    ("rows", (1, 1, 8), None, "tensor", 0),      # rows over tensor=8, psum of partial bags
    ("columns", (1, 4, 2), {"pkm_value_dim": "fsdp"}, "fsdp", 8),  # the paper's group (tokens gathered), chunked
])
def test_sharded_equals_single_device(single_device_step, layout, mesh_shape, rules, axis, chunk_len, monkeypatch):
    ref_metrics, ref_delta, _, calls1, ulps = single_device_step
    assert calls1 == [] and ref_metrics[0] > 1.0  # one device: the plain lookup
    metrics, delta, spec, calls, _ = _one_step(layout, mesh_shape, monkeypatch, rules, chunk_len)
    assert spec == ((None, axis) if layout == "columns" else (axis, None)), spec
    assert calls and set(calls) == {axis}, calls  # the lookup ran under shard_map
    np.testing.assert_allclose(metrics, ref_metrics, rtol=2e-5)
    leaves = jax.tree_util.tree_flatten_with_path(delta)[0]
    for (path, a), b, ulp in zip(leaves, jax.tree.leaves(ref_delta), jax.tree.leaves(ulps)):
        scale = float(np.max(np.abs(b)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, atol=1e-4 * scale + ulp, err_msg=jax.tree_util.keystr(path))


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("override,needle", [
    ("model.memory_layers.num_values=1000", "not a perfect square"),
    ("model.memory_layers.top_k=300", "exceeds sqrt(num_values)"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    r = run_memlm("train", "configs/tiny/memory_layers.yaml", "data.source=synthetic", "train.steps=2",
                  f"run.dir={run_dir}", override)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("memlm: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in lines[0] and "model.memory_layers" in lines[0], lines[0]
    assert not run_dir.exists()
