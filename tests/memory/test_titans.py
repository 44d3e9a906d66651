"""Titans (MAC / MAG / MAL): the memory module against a float64 loop of the paper's equations, causality,
memory reach across segments, streaming = full-sequence forward, resets, outer gradients (finite differences
and the token-loop kernel), config errors through the CLI."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memlm import sharding
from memlm.config import from_dict
from memlm.errors import UserError
from memlm.memory.titans_layers import NeuralMemory
from tests.core.cli_utils import run_memlm
from tests.memory.common import make, make_batch

pytestmark = pytest.mark.unit

SEG, NSEG = 8, 4
BASE = {"chunk_size": 4, "window": 6, "num_persistent": 2, "memory_heads": 2, "memory_depth": 2}


def perturb(tokens, sl):
    return tokens.at[:, sl].set((tokens[:, sl] + 7) % 250 + 3)


class Jitted:
    """A model with its jitted segment step and loss (one compile per shape, reused by every test)."""

    def __init__(self, variant: str, seg_len: int = SEG, **titans):
        self.cfg, self.model = make("titans", seg_len=seg_len, n_seg=NSEG,
                                    titans={**BASE, "variant": variant, **titans})
        self.gd, self.params = nnx.split(self.model)
        gd = self.gd
        self.seg = jax.jit(lambda p, c, t: nnx.merge(gd, p).segment_logits(c, t))
        self.loss = jax.jit(lambda p, c, b: nnx.merge(gd, p).loss(c, b)[:3])
        self.init = jax.jit(lambda p, b: nnx.merge(gd, p).init_carry(b), static_argnums=1)

    def stream(self, tokens, seg_len: int = SEG, params=None):
        """[B, T] tokens fed seg_len at a time with the carry -> (logits [B, T, V], final carry)."""
        p = self.params if params is None else params
        carry, out = self.init(p, tokens.shape[0]), []
        for s in range(0, tokens.shape[1], seg_len):
            logits, carry = self.seg(p, carry, tokens[:, s : s + seg_len])
            out.append(logits)
        return jnp.concatenate(out, axis=1), carry


@functools.cache
def model(variant: str, **kw) -> Jitted:
    return Jitted(variant, **kw)


# ---------------------------------------------------------------------------------------------------------
CLIP_MODULE = 0.5  # titans.inner_grad_clip in the module test: about the median per-token gradient norm there


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("after,clip", [(False, 0.0), (True, 0.0), (False, CLIP_MODULE)])
def test_memory_module_matches_the_paper_equations(after, clip):
    """q/k/v = SiLU(conv(x W)), l2 on q, k; theta <= max_lr; eq. 12-15 with depth-2 M, gradients at the
    chunk-start weights (chunk 2), token t reading M_{t-1} (or M_t), in float64 NumPy. With clip > 0
    (titans.inner_grad_clip, not the paper's rule) each token's gradient is first scaled by min(1, clip / norm)."""
    cfg = from_dict({"model": {"kind": "titans", "d_model": 8, "n_heads": 2, "dtype": "float32",
                               "titans": {"memory_heads": 2, "memory_depth": 2, "chunk_size": 2, "conv_kernel": 3,
                                          "max_lr": 0.7, "inner_grad_clip": clip}}}).model
    with sharding.activate(sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        mod = NeuralMemory(cfg, nnx.Rngs(3))
    rng = np.random.default_rng(0)
    B, T, d, H, dh = 2, 6, 8, 2, 4
    x = rng.normal(size=(B, T, d))
    for conv in (mod.conv_q, mod.conv_k, mod.conv_v):  # non-trivial taps
        conv.weight[...] = jnp.asarray(rng.normal(size=(3, d)), jnp.float32)

    @nnx.jit
    def run(mod, xj):
        q, _ = mod.project(xj, "q", jnp.zeros((B, 2, d)), True)
        k, _ = mod.project(xj, "k", jnp.zeros((B, 2, d)), True)
        v, _ = mod.project(xj, "v", jnp.zeros((B, 2, d)), False)
        th, et, al = mod.gate_values(xj)
        w0 = tuple(jnp.broadcast_to(m, (B,) + m.shape) for m in mod.m0())
        return th, *mod.write_read(w0, tuple(jnp.zeros_like(w) for w in w0), q, k, v, th, et, al, after)

    th, y, wT, sT = run(mod, jnp.asarray(x, jnp.float32))

    P = lambda a: np.asarray(a, np.float64)
    Wg, bg = P(mod.gates.kernel[...]), P(mod.gates.bias[...])
    M0 = [P(m) for m in mod.m0()]

    def proj(lin, conv, norm):
        z = x @ P(lin.kernel[...])
        w = P(conv.weight[...])
        zp = np.concatenate([np.zeros((B, 2, d)), z], 1)
        z = sum(w[i] * zp[:, 2 - i : 2 - i + T] for i in range(3))
        z = _silu(z).reshape(B, T, H, dh)
        return z / np.sqrt((z**2).sum(-1, keepdims=True) + 1e-6) if norm else z

    qn, kn, vn = proj(mod.wq, mod.conv_q, True), proj(mod.wk, mod.conv_k, True), proj(mod.wv, mod.conv_v, False)
    g = _sigmoid(x @ Wg + bg)
    theta, eta, alpha = 0.7 * g[..., :H], g[..., H : 2 * H], g[..., 2 * H :]
    mlp = lambda W, a: _silu(a @ W[0]) @ W[1]
    clipped = []
    for b in range(B):
        for h in range(H):
            M, S = [m[h].copy() for m in M0], [np.zeros_like(m[h]) for m in M0]
            for t in range(T):
                if t % 2 == 0:
                    Mc = [m.copy() for m in M]  # chunk-start weights
                kt, vt = kn[b, t, h], vn[b, t, h]
                z = kt @ Mc[0]
                e = 2 * (_silu(z) @ Mc[1] - vt)          # d/dM ||M(k) - v||^2
                dz = (e @ Mc[1].T) * _sigmoid(z) * (1 + z * (1 - _sigmoid(z)))
                grads = [np.outer(kt, dz), np.outer(_silu(z), e)]
                if clip:
                    norm = np.sqrt(sum((gr**2).sum() for gr in grads))
                    grads = [gr * min(1.0, clip / norm) for gr in grads]
                    clipped.append(norm)
                y_before = mlp(M, qn[b, t, h])
                S = [eta[b, t, h] * s - theta[b, t, h] * gr for s, gr in zip(S, grads)]
                M = [(1 - alpha[b, t, h]) * m + s for m, s in zip(M, S)]
                want = mlp(M, qn[b, t, h]) if after else y_before
                np.testing.assert_allclose(np.asarray(y[b, t, h]), want, rtol=2e-5, atol=2e-6)
            for got, want in ((wT, M), (sT, S)):
                for g_, w_ in zip(got, want):
                    np.testing.assert_allclose(np.asarray(g_[b, h]), w_, rtol=2e-5, atol=2e-6)
    assert float(jnp.max(th)) <= 0.7
    if clip:  # both branches of the clip are exercised
        assert 0.2 < np.mean(np.asarray(clipped) > clip) < 0.8, np.percentile(clipped, [10, 50, 90])


# ---------------------------------------------------------------------------------------------- causality
# MAL runs with per-chunk gates, and the MAC variant with 3 learned long-term queries, per-chunk gates and memory
# in layer 1 only (layer 0 is the same layer without memory). mag_clip: MAG with the two options that are not in
# the paper, inner gradient clipping and the chunk loop unrolled 2 chunks per iteration. mal_pw: P through the
# memory at the document start (eq. 29).
CASES = {"mac": {}, "mag": {}, "mal": {"gates": "per_chunk"},
         "mac_lt": {"num_longterm": 3, "gates": "per_chunk", "memory_layers": (1,)},
         "mag_clip": {"inner_grad_clip": 0.5, "scan_unroll": 2},
         # titans.persistent_write: the carry starts where P left it and the attention has no P prefix
         # (tests/memory/test_titans_persistent.py; under MAG only the starting carry would differ from "mag")
         "mal_pw": {"persistent_write": True, "gates": "per_chunk"}}


def case(name: str) -> Jitted:
    return model(name.split("_")[0], **CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_causal(name):
    """Logits at t never depend on tokens > t: inside a memory chunk, at chunk and segment boundaries."""
    m = case(name)
    tokens = make_batch(m.cfg)["tokens"].reshape(2, -1)
    ref, _ = m.stream(tokens)
    for t in (1, 3, 6, 8, 13, 22):
        out, _ = m.stream(perturb(tokens, slice(t + 1, None)))
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(ref[:, : t + 1]), err_msg=f"t={t}")
        assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(ref[:, t + 1 :]))


def _without_memory_output(m: Jitted):
    """The same parameters with every memory output zeroed: W_O = 0 (and for MAC the retrieved tokens' norm
    scale = 0, so h = 0 whatever the memory holds)."""
    def zero(kp, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
        return jnp.zeros_like(x) if "w_out" in names or "h_norm" in names else x

    return jax.tree_util.tree_map_with_path(zero, m.params)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("memory_on", [True, False])
def test_first_segment_reaches_last_segment_only_through_memory(name, memory_on):
    """MAC attends within the segment; MAG/MAL windows (6 tokens x 2 layers) cannot span 16 tokens. So
    segment 3 depends on segment 0 if and only if the memory output is used."""
    m = case(name)
    params = m.params if memory_on else _without_memory_output(m)
    tokens = make_batch(m.cfg)["tokens"].reshape(2, -1)
    ref, _ = m.stream(tokens, params=params)
    out, _ = m.stream(perturb(tokens, slice(0, SEG)), params=params)
    diff = float(jnp.max(jnp.abs(out[:, 3 * SEG :] - ref[:, 3 * SEG :])))
    assert (diff > 1e-4) if memory_on else (diff == 0.0), diff


# ---------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "mal_pw"])
def test_streaming_equals_training_forward(variant):
    m = case(variant)
    batch = make_batch(m.cfg, seed=3)
    loss_sum, n, carry = m.loss(m.params, m.init(m.params, 2), batch)
    logits, stream_carry = m.stream(batch["tokens"].reshape(2, -1))
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"].reshape(2, -1)).sum()
    np.testing.assert_allclose(float(loss_sum), float(ref), rtol=2e-6)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(stream_carry)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["mag", "mal", "mag_clip", "mal_pw"])
def test_streaming_carry_equals_one_pass_over_the_whole_sequence(variant):
    """8-token segments with the carried memory, conv tails and KV tail == one 32-token segment."""
    m = case(variant)
    tokens = make_batch(m.cfg, seed=5)["tokens"].reshape(2, -1)
    streamed, c1 = m.stream(tokens)
    whole, c2 = m.stream(tokens, seg_len=NSEG * SEG)
    np.testing.assert_allclose(np.asarray(streamed), np.asarray(whole), rtol=1e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_reset_restores_initial_memory():
    m = model("mag")
    batch = make_batch(m.cfg)
    init = m.init(m.params, 2)
    junk = jax.tree.map(lambda x: x + 3 if x.dtype != jnp.int32 else x + 2, init)
    # reset at segment 0 replaces any incoming carry by init_carry (M_0, zero momentum, empty tails)
    a = m.loss(m.params, init, batch)
    b = m.loss(m.params, junk, batch)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # a new document at segment 2: what came before it cannot reach the final carry
    batch["reset"] = batch["reset"].at[:, 2].set(True)
    other = dict(batch, tokens=perturb(batch["tokens"], slice(None)).at[:, 2:].set(batch["tokens"][:, 2:]))
    c1, c2 = m.loss(m.params, init, batch)[2], m.loss(m.params, junk, other)[2]
    for x, y in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(a[0]) != float(m.loss(m.params, init, batch)[0])  # the reset did change the loss



def test_a_diverging_padding_row_does_not_poison_the_loss():
    """End of an eval pass: one row is all padding (loss_mask 0). With a large inner step (max_lr 1) the memory
    of that row, fed 64 identical pad tokens, diverges to NaN; the loss must be that of the real row alone
    (memlm.models.lm.token_loss drops masked positions with `where`; NaN * 0 would be NaN)."""
    cfg, mdl = make("titans", seg_len=32, n_seg=2, batch=2,
                    titans={"variant": "mal", "chunk_size": 16, "max_lr": 1.0, "memory_depth": 2})
    batch = make_batch(cfg)
    batch["tokens"] = batch["tokens"].at[1].set(0)
    batch["loss_mask"] = batch["loss_mask"].at[1].set(0.0)
    carry = mdl.init_carry(2)
    logits = []
    for s in range(2):
        out, carry = mdl.segment_logits(carry, batch["tokens"][:, s])
        logits.append(np.asarray(out))
    logits = np.concatenate(logits, axis=1)
    assert np.isfinite(logits[0]).all() and not np.isfinite(logits[1]).all()  # the case this test is about
    both = mdl.loss(mdl.init_carry(2), batch)
    alone = mdl.loss(mdl.init_carry(1), jax.tree.map(lambda x: x[:1], batch))
    assert np.isfinite(float(both[0])) and float(both[1]) == float(alone[1]) == 2 * 32
    np.testing.assert_allclose(float(both[0]), float(alone[0]), rtol=1e-6)



def test_generate_stops_on_non_finite_logits():
    """Greedy decoding (what BABILong runs) from a memory that diverged: argmax of NaN logits would return token 0
    silently; LoadedModel.generate raises NonFiniteOutput instead (one line, exit 1 from the CLI)."""
    from memlm.api import LoadedModel
    from memlm.errors import NonFiniteOutput
    from memlm.train import setup as setup_lib

    cfg, _ = make("titans", seg_len=32, n_seg=2, batch=1,
                  titans={"variant": "mal", "chunk_size": 16, "max_lr": 0.3, "memory_depth": 2})
    setup = setup_lib.build_setup(cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]), batch_size=1)
    lm = LoadedModel(cfg, setup_lib.init_params(setup, 0), setup, 0)
    prompt = np.random.default_rng(0).integers(3, 259, size=200).tolist()
    assert len(lm.generate(prompt, 2)) >= 1  # random tokens: finite
    with pytest.raises(NonFiniteOutput, match="generate: the model's logits for token 70 are not finite"):
        lm.generate([0] * 70, 2)  # 70 identical pad tokens: the memory diverges (see the next test)


def test_repeated_tokens_diverge_under_the_chunked_rule_and_stay_bounded_with_the_inner_clip():
    """The paper's chunked rule takes every gradient of a chunk at the chunk-start weights, so b identical
    tokens move M by b gradient steps computed at one point: an overshoot that grows chunk after chunk.
    1,024 copies of one (k, v), depth-2 memory, chunk 64, theta 0.01, eta 0.9 (inside the paper configs'
    range): the token loop converges, the chunked rule reaches inf/NaN. With titans.inner_grad_clip = c every
    token's gradient has norm <= c, so ||S_t|| <= theta c / (1 - eta) and ||M_t|| <= max(||M_0||,
    theta c / ((1 - eta) alpha)) (Frobenius norms over all layers together) -- checked here."""
    from pallas_kernels.chunked_memory import chunked_memory

    rng = np.random.default_rng(0)
    d, T, theta, eta, alpha, clip = 32, 1024, 0.01, 0.9, 0.0025, 0.1
    k = rng.standard_normal(d)
    k /= np.linalg.norm(k)
    v = rng.standard_normal(d)
    K = jnp.asarray(np.broadcast_to(k, (1, T, d)), jnp.float32)
    V = jnp.asarray(np.broadcast_to(v, (1, T, d)), jnp.float32)
    M0 = (jnp.asarray(rng.standard_normal((1, d, 2 * d)) / d**0.5, jnp.float32),
          jnp.asarray(rng.standard_normal((1, 2 * d, d)) / (2 * d) ** 0.5, jnp.float32))
    S0 = tuple(jnp.zeros_like(m) for m in M0)
    gate = lambda x: jnp.full((1, T), x, jnp.float32)
    run = lambda chunk, c: chunked_memory(K, K, V, gate(theta), gate(eta), gate(alpha), M0, S0, chunk_size=chunk,
                                          implementation="xla", grad_clip=c)
    norm = lambda ws: float(np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in ws)))
    y, _, _ = run(1, 0.0)
    assert np.linalg.norm(np.asarray(y[0, -1]) - v) < 0.05 * np.linalg.norm(v)  # the token loop has learned v
    y, w, s = run(64, 0.0)
    assert not (np.isfinite(np.asarray(y)).all() and np.isfinite(norm(w)))
    y, w, s = run(64, clip)
    assert np.isfinite(np.asarray(y)).all()
    assert norm(s) <= theta * clip / (1 - eta) * (1 + 1e-5)
    assert norm(w) <= max(norm(M0), theta * clip / ((1 - eta) * alpha)) * (1 + 1e-5)


# ---------------------------------------------------------------------------------------------- gradients
MEMORY_PARAMS = {"W_Q": ("memory", "wq"), "W_K": ("memory", "wk"), "W_V": ("memory", "wv"),
                 "gates": ("memory", "gates"), "M_0": ("memory", "m0_0"), "M_0 (layer 2)": ("memory", "m0_1")}


def _block_direction(grads, path):
    """The gradient restricted to parameters under decoder.blocks.<path> (zero elsewhere), and its norm."""
    prefix = ["decoder", "blocks", *path]

    def keep(kp, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
        return x if names[: len(prefix)] == prefix else jnp.zeros_like(x)

    d = jax.tree_util.tree_map_with_path(keep, grads)
    return d, float(optax.tree.norm(d))


def test_outer_gradients_reach_the_memory_and_match_finite_differences():
    """MAC, loss on the last segment only (so M_0 and the projections act through 3 memory updates): non-zero
    gradients for W_Q, W_K, W_V, the gate net and both layers of M_0, and each block's directional derivative
    matches a central difference (a stop_gradient anywhere in the inner update would break that). W_O is
    scaled up so the memory path is O(1) in the loss and the difference quotient well above f32 round-off."""
    m = model("mac")
    batch = make_batch(m.cfg, seed=7)
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"]).at[:, -1].set(1.0)
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: x * 30.0 if "w_out" in str(kp) else x, m.params)
    init = m.init(params, 2)
    gd = m.gd

    def mean_loss(p):
        l, n = nnx.merge(gd, p).loss(nnx.merge(gd, p).init_carry(2), batch)[:2]
        return l / n

    g = jax.jit(jax.grad(mean_loss))(params)
    f = lambda p: float(m.loss(p, init, batch)[0]) / float(jnp.sum(batch["loss_mask"]))
    eps = 1e-2
    for name, path in MEMORY_PARAMS.items():
        d, norm = _block_direction(g, path)
        assert norm > 1e-3, (name, norm)
        d = jax.tree.map(lambda x, n=norm: x / n, d)

        def fd(e, d=d):
            return (f(jax.tree.map(lambda x, y: x + e * y, params, d))
                    - f(jax.tree.map(lambda x, y: x - e * y, params, d))) / (2 * e)

        # Richardson extrapolation of central differences: truncation O(eps^4). f32 round-off of the O(5) loss
        # (~1e-6 relative) divided by 2 eps is the absolute term of the tolerance.
        rich = (4 * fd(eps / 2) - fd(eps)) / 3
        assert abs(rich - norm) <= 2e-3 * norm + 1e-4, (name, rich, norm)


def test_scan_unroll_reaches_the_chunk_loop():
    """titans.scan_unroll=2 (= the chunks of a segment here) removes the chunk loop from the lowered step."""
    counts = {}
    for u in (1, 2):
        cfg, m = make("titans", seg_len=SEG, n_seg=NSEG, titans={**BASE, "variant": "mag", "scan_unroll": u})
        gd, params = nnx.split(m)
        batch = make_batch(cfg, seed=1)
        loss = jax.jit(lambda p, b, gd=gd: nnx.merge(gd, p).loss(nnx.merge(gd, p).init_carry(2), b)[0])
        counts[u] = loss.lower(params, batch).as_text().count("stablehlo.while")
    assert counts[2] < counts[1], counts


# ------------------------------------------------------------------------------------- layer pipelining
def _loss_and_grads(variant: str, pipeline: bool, remat: str, titans: dict, n_layers: int = 3, **model_kw):
    """(loss, final carry, stats, parameter gradients) of one batch with a document starting mid-batch (row 1,
    segment 2), truncated BPTT every 3 segments, and an incoming carry that is not init_carry."""
    cfg, m = make("titans", seg_len=SEG, n_seg=NSEG, n_layers=n_layers, remat=remat, **model_kw,
                  titans={**BASE, "variant": variant, "pipeline_layers": pipeline, **titans})
    gd, params = nnx.split(m)
    batch = make_batch(cfg, seed=1)
    batch["reset"] = batch["reset"].at[1, 2].set(True)
    carry = nnx.merge(gd, params).init_carry(2)
    carry = jax.tree.map(lambda x: x + 0.1 if x.dtype == jnp.float32 else x, carry)

    def loss(p):
        loss_sum, n, c, stats = nnx.merge(gd, p).loss(carry, batch, 3)
        return loss_sum / n, (c, stats)

    (value, (c, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, c, stats, grads


@pytest.mark.parametrize("variant,remat,titans,model_kw", [
    ("mag", "none", {}, {}), ("mal", "none", {"gates": "per_chunk"}, {}), ("mac", "none", {}, {}),
    # per-layer remat fenced behind the cotangent; segment_remat: the head and loss per segment, tied embeddings
    ("mag", "full", {}, {"tie_embeddings": True}),
    ("mac", "dots", {"num_longterm": 3}, {}),
    ("mag", "none", {"memory_layers": []}, {}),  # no memory at all: only the KV tails are carried
    ("mag", "full", {"pipeline_group": 2}, {}),  # waves split into calls of at most 2 layers
    ("mal", "none", {"persistent_write": True}, {}),  # every layer's document start from its P
])
def test_pipelined_layers_equal_the_segment_major_order(variant, remat, titans, model_kw):
    """titans.pipeline_layers runs the (layer, segment) grid by anti-diagonals: loss, final carry, memory stats
    and every parameter gradient equal the segment-by-segment order's (float32 round-off)."""
    schedule = {k: v for k, v in titans.items() if k != "pipeline_group"}  # pipeline_group needs the pipeline
    ref = _loss_and_grads(variant, False, remat, schedule, **model_kw)
    out = _loss_and_grads(variant, True, remat, titans, **model_kw)
    np.testing.assert_allclose(float(out[0]), float(ref[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert out[2].keys() == ref[2].keys()
    for k in ref[2]:
        np.testing.assert_allclose(float(out[2][k]), float(ref[2][k]), rtol=1e-5, atol=1e-7, err_msg=k)
    g_max = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref[3]))
    assert g_max > 0
    for a, b in zip(jax.tree.leaves(out[3]), jax.tree.leaves(ref[3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * g_max)


def _chunk_loop_runs(jaxpr, n_chunks: int) -> int:
    """How many times a scan of length n_chunks (the memory's chunk loop) runs in a jaxpr: scans multiply their
    body's count by their length; every other sub-jaxpr (pjit, remat, custom_vjp, ...) counts once."""
    total = 0
    for eqn in jaxpr.eqns:
        reps = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        if eqn.primitive.name == "scan" and reps == n_chunks:
            total += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    total += reps * _chunk_loop_runs(sub, n_chunks)
    return total


def test_pipelined_layers_run_the_chunk_loop_once_per_wave():
    """3 layers x 4 segments: the step runs the memory's chunk loop (2 chunks per 8-token segment) 12 times in
    the segment-major order (once per layer and segment) and n_segments + n_layers - 1 = 6 times pipelined
    (once per wave, the active layers batched)."""
    runs = {}
    for pipe in (False, True):
        cfg, m = make("titans", seg_len=SEG, n_seg=NSEG, n_layers=3,
                      titans={**BASE, "variant": "mag", "pipeline_layers": pipe})
        gd, params = nnx.split(m)
        batch = make_batch(cfg, seed=1)
        jaxpr = jax.make_jaxpr(lambda p, b, gd=gd: nnx.merge(gd, p).loss(nnx.merge(gd, p).init_carry(2), b)[0])
        runs[pipe] = _chunk_loop_runs(jaxpr(params, batch).jaxpr, SEG // BASE["chunk_size"])
    assert runs == {False: 12, True: 6}, runs


def test_pipeline_group_bounds_the_layers_per_call_and_the_memory():
    """titans.pipeline_group=2 splits the waves of widths 1, 2, 3, 3, 2, 1 (3 layers x 4 segments) into
    1 + 1 + 2 + 2 + 1 + 1 = 8 block calls and chunk-loop runs, and a group of 1 needs fewer temporaries than the
    whole wave in one call (XLA's own memory analysis of the compiled step, remat=full)."""
    runs, temps = {}, {}
    for group in (0, 1, 2):
        cfg, m = make("titans", seg_len=SEG, n_seg=NSEG, n_layers=3, remat="full",
                      titans={**BASE, "variant": "mag", "pipeline_layers": True, "pipeline_group": group})
        gd, params = nnx.split(m)
        batch = make_batch(cfg, seed=1)
        loss = lambda p, b, gd=gd: nnx.merge(gd, p).loss(nnx.merge(gd, p).init_carry(2), b)[0]
        runs[group] = _chunk_loop_runs(jax.make_jaxpr(loss)(params, batch).jaxpr, SEG // BASE["chunk_size"])
        if group != 2:
            compiled = jax.jit(jax.grad(loss)).lower(params, batch).compile()
            temps[group] = compiled.memory_analysis().temp_size_in_bytes
    assert runs == {0: 6, 1: 12, 2: 8}, runs
    assert temps[1] < temps[0], temps


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("override,key", [
    ("model.titans.chunk_size=7", "model.titans.chunk_size"),
    ("model.titans.memory_depth=0", "model.titans.memory_depth"),
    ("model.titans.inner_grad_clip=-1", "model.titans.inner_grad_clip"),
    ("data.segment_len=256", "model.max_seq_len (128)"),  # MAC attends within a segment
    ("model.titans.pipeline_group=2", "model.titans.pipeline_layers is false"),
])
def test_bad_config_exits_2_with_one_line(override, key, tmp_path):
    r = run_memlm("train", "configs/tiny/titans_mac.yaml", "data.source=synthetic", override,
                  f"run.dir={tmp_path}/run")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("memlm: error:") and key in lines[0], r.stderr


@pytest.mark.parametrize("titans,match", [
    ({"memory_heads": 3, "chunk_size": 4}, "model.titans.memory_heads"),
    ({"memory_layers": [2], "chunk_size": 4}, "model.titans.memory_layers"),
    ({"memory_layers": [0, 0], "chunk_size": 4}, "model.titans.memory_layers"),
    ({"memory_layers": [1], "pipeline_layers": True, "chunk_size": 4}, "model.titans.pipeline_layers"),
    ({"variant": "mac", "persistent_write": True, "chunk_size": 4}, "model.titans.persistent_write"),
    ({"variant": "mag", "num_persistent": 0, "persistent_write": True, "chunk_size": 4},
     "model.titans.persistent_write"),
])
def test_model_config_errors(titans, match):
    with pytest.raises(UserError, match=match):
        make("titans", titans=titans)
