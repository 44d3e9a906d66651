"""titans.persistent_write (the paper's x~ = [P || x], eq. 26 / 29): the document-start carry against the token
loop run on each layer's persistent tokens, and MAL's attention reaching P only inside the first window.
Causality, memory reach and streaming with the option run in tests/memory/test_titans.py (CASES mal_pw)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.chunked_memory.reference import chunked_memory_reference
from tests.memory.common import make, stacked_layer

pytestmark = pytest.mark.unit

N_P = 3


def _conv_tail_and_out(z: jax.Array, w: jax.Array) -> jax.Array:
    """Causal depthwise conv from a zero tail, written out: y_t = sum_i w_i z_{t-i}. z [T, C], w [K, C]."""
    K, T = w.shape[0], z.shape[0]
    zp = jnp.concatenate([jnp.zeros((K - 1, z.shape[1]), z.dtype), z])
    return sum(w[i] * zp[K - 1 - i : K - 1 - i + T] for i in range(K))


def _expected(block, cfg) -> dict:
    """What a layer's carry should hold after its persistent tokens, computed piece by piece: projections, conv
    and gates written out, the memory updated by the token-by-token reference (eq. 13-14) from M_0."""
    tc = cfg.titans
    p = block.persistent[...]
    out, x = {}, p
    if block.has_memory:
        nm = block.memory
        e_m = block.mem_norm(p[None])[0] if tc.variant == "mal" else p
        H, dh = nm.H, nm.dh

        def proj(lin, conv, normalize):
            z = e_m @ lin.kernel[...]
            y = jax.nn.silu(_conv_tail_and_out(z, conv.weight[...])).reshape(N_P, H, dh)
            y = y / jnp.sqrt(jnp.sum(y * y, -1, keepdims=True) + 1e-6) if normalize else y
            return jnp.swapaxes(y, 0, 1), z[-(tc.conv_kernel - 1):]          # [H, N_p, dh], lin tail

        (q, tq), (k, tk), (v, tv) = (proj(nm.wq, nm.conv_q, True), proj(nm.wk, nm.conv_k, True),
                                     proj(nm.wv, nm.conv_v, False))
        g = jax.nn.sigmoid(e_m @ nm.gates.kernel[...] + nm.gates.bias[...]).T  # [3H, N_p]: every token its own
        y, w, s = chunked_memory_reference(q, k, v, tc.max_lr * g[:H], g[H : 2 * H], g[2 * H :], nm.m0(),
                                           chunk_size=1)
        out["mem"] = {"w": w, "s": s, "conv": {"q": tq, "k": tk, "v": tv}}
        if tc.variant == "mal":
            m = jnp.swapaxes(y, 0, 1).reshape(N_P, -1)
            x = p + block.w_out(block.norm_m(m[None])[0] * jax.nn.sigmoid(block.w_gate(e_m)))
    if tc.variant == "mal":
        e = block.attn_norm(x[None])[0]
        out["kv"] = (block.attn.wk(e), block.attn.wv(e))                   # [N_p, kvh * hd]
    return out


@pytest.mark.parametrize("variant,titans", [
    ("mag", {"window": 6}),
    # MAL, window 3: only the last 2 of P's 3 positions fit the KV tail; layer 0 without memory (its P goes
    # straight to the attention); per-chunk gates (P's tokens are chunks of 1)
    ("mal", {"window": 3, "memory_layers": (1,), "gates": "per_chunk"}),
    ("mal", {"window": 6}),  # P's 3 positions end a 5-position tail
])
def test_document_start_carry_is_p_through_the_token_loop(variant, titans):
    cfg, model = make("titans", titans={"variant": variant, "chunk_size": 4, "num_persistent": N_P, "memory_heads": 2,
                                        "memory_depth": 2, "persistent_write": True, **titans})
    tc, B = cfg.model.titans, 2
    carry = model.init_carry(B)
    mem_layers = list(range(cfg.model.n_layers)) if tc.memory_layers is None else list(tc.memory_layers)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    w_changed = False
    for layer in range(cfg.model.n_layers):
        j = mem_layers.index(layer) if layer in mem_layers else sum(1 for i in range(layer) if i not in mem_layers)
        block = stacked_layer(model.decoder.blocks if layer in mem_layers else model.decoder.plain_blocks, j)
        want = _expected(block, cfg.model)
        for b in range(B):
            if "mem" in want:
                for i in range(tc.memory_depth):
                    close(carry["mem_w"][f"w{i}"][b, j], want["mem"]["w"][i])
                    close(carry["mem_s"][f"w{i}"][b, j], want["mem"]["s"][i])
                    w_changed |= not np.allclose(np.asarray(want["mem"]["w"][i]), np.asarray(block.memory.m0()[i]))
                for name in ("q", "k", "v"):
                    close(carry["conv"][name][b, j], want["mem"]["conv"][name])
            if "kv" in want:
                n = tc.window - 1
                m = min(N_P, n)
                for key, kv in zip(("kv_k", "kv_v"), want["kv"]):
                    got = carry[key][b, layer].reshape(n, -1)
                    close(got[n - m :], kv[N_P - m :])
                    assert not np.any(np.asarray(got[: n - m]))
    assert w_changed  # P did move the memory away from M_0
    if variant == "mal":
        np.testing.assert_array_equal(np.asarray(carry["seen"]), min(N_P, tc.window - 1))
    else:  # MAG keeps P as the attention prefix: its KV tail starts empty
        np.testing.assert_array_equal(np.asarray(carry["seen"]), 0)
        assert not np.any(np.asarray(carry["kv_k"]))


@pytest.mark.parametrize("write,reach", [(True, 4), (False, 16)])
def test_mal_sees_p_only_inside_the_first_window(write, reach):
    """With the memory's output zeroed (W_O = 0), P reaches MAL's tokens only through the attention: with
    persistent_write only the first window's tokens (2 layers x (W - 1) = 4 positions) depend on P; with the
    default prefix every token does."""
    cfg, model = make("titans", titans={"variant": "mal", "chunk_size": 4, "num_persistent": N_P, "window": 3,
                                        "memory_heads": 2, "persistent_write": write})
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, 259)

    def logits(scale_p: float) -> jax.Array:
        def edit(kp, x):
            names = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
            if "w_out" in names:
                return jnp.zeros_like(x)
            return x * scale_p if "persistent" in names else x

        m = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(edit, params))
        return m.segment_logits(m.init_carry(2), tokens)[0]

    diff = np.max(np.abs(np.asarray(logits(1.0) - logits(-2.0))), axis=(0, 2))  # per position
    assert np.all(diff[:reach] > 1e-4), diff
    assert np.all(diff[reach:] == 0.0), diff
