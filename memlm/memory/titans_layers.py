"""Titans building blocks (Behrouz et al. 2025, arXiv 2501.00663): the neural long-term memory and the
MAC / MAG / MAL decoder layers. The model (carry, segments, registration) is in memlm/memory/titans.py.

NeuralMemory (§3.1, §4.4), per layer, H = titans.memory_heads heads of width d_h = d_model / H:
    q, k, v = SiLU(DepthwiseCausalConv(x W_{Q,K,V}))           (projection, conv, SiLU; §4.4's depthwise-
                                                                separable conv: W is the pointwise part)
    q, k    = q / ||q||, k / ||k||                             (l2 per head; §4.4)
    theta_t = max_lr * sigmoid(x_t w_theta), eta_t = sigmoid(x_t w_eta), alpha_t = sigmoid(x_t w_alpha)
    loss(M; x_t) = ||M(k_t) - v_t||^2                           (eq. 12)
    S_t = eta_t S_{t-1} - theta_t grad loss(M_{t'}; x_t),  M_t = (1 - alpha_t) M_{t-1} + S_t   (eq. 13-14)
M is a bias-free MLP of titans.memory_depth layers (SiLU between layers, hidden = expansion * d_h). The
update and retrieval run in pallas_kernels.chunked_memory (gradients inside a chunk of titans.chunk_size
tokens at the chunk-start weights M_{t'}, §3.2); outer gradients flow through the inner updates.
titans.inner_grad_clip > 0 (not in the paper; default 0) rescales each token's gradient to at most that norm.

Gates: `per_token` (default) or `per_chunk`. A chunk-constant gate computed from a pool over the whole chunk
would let token j's read depend on later tokens of its chunk (its read weights use the gates of the tokens
before it), so `per_chunk` uses the gates of the chunk's FIRST token for the whole chunk: causal and
constant per chunk (the paper's LTI case).

Persistent memory (§3.3): N_p learned vectors per layer, in the space of the attention input, prepended as
keys/values visible to every query. They are position-free (no RoPE on the persistent scores: q . k_p with
the un-rotated q), so a token sees them the same way whatever its position, which keeps streaming equal to
the full-sequence forward. The paper also feeds P through the memory at the sequence start (x~ = [P || x],
eq. 26 / 29), and MAL (eq. 29-31) attends with plain sliding-window attention, so there P reaches attention only
through the memory layer's outputs inside the first window. `titans.persistent_write: true` does both for MAG /
MAL (TitansBlock.persistent_state, run by Titans.init_carry at every document start); the default (false, the
form every benchmark used) keeps P out of the memory (its write is learnable through M_0, but momentum and conv
tails start at zero) and gives MAL the same persistent prefix as MAG. P stays per layer either way (the paper
prepends it once, to the sequence).

Every block is residual; each memory output passes a learnable norm and a gate before an output projection
(§4.4 "normalization and gating with a linear layer before the final output projection").
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.layers.attention import NEG_INF, Attention, _linear, over_query_blocks
from memlm.layers.mlp import make_mlp, make_norm, rms_norm
from memlm.layers.rope import apply_rope
from memlm.sharding import constrain
from pallas_kernels.chunked_memory import chunked_memory

# Gate-bias inits (the paper gives none): theta = max_lr / 2, eta = 0.5, alpha = sigmoid(-6) ~ 0.0025 per token
# (the memory keeps ~half of M after ~280 tokens; the gate nets learn to forget faster where that helps).
GATE_BIAS = {"theta": 0.0, "eta": 0.0, "alpha": -6.0}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class CausalConv(nnx.Module):
    """Depthwise causal conv over time: y_t = sum_{i<K} w_i * x_{t-i} (per channel), with the last K-1
    inputs of the previous call carried as `tail` so that segment-by-segment equals one pass."""

    def __init__(self, channels: int, kernel: int, cfg, rngs: nnx.Rngs):
        self.kernel = kernel
        # identity at init (tap 0 = 1) plus small taps: the projection is unchanged until training uses the conv
        w = jnp.zeros((kernel, channels)).at[0].set(1.0)
        w = w + cfg.init_std * jax.random.normal(rngs.params(), (kernel, channels)) * (jnp.arange(kernel) > 0)[:, None]
        self.weight = nnx.Param(w.astype(jnp.dtype(cfg.param_dtype)), sharding=(None, "heads"))

    def __call__(self, x: jax.Array, tail: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, C], tail [B, K-1, C] (None when K = 1) -> (y [B, T, C], new tail)."""
        K, T = self.kernel, x.shape[1]
        w = self.weight[...].astype(x.dtype)
        if K == 1:
            return x * w[0], None
        xx = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
        y = sum(w[i] * xx[:, K - 1 - i : K - 1 - i + T] for i in range(K))
        return y, xx[:, T:]


class NeuralMemory(nnx.Module):
    """Projections, convs, gate nets and the learned initial weights M_0 of one layer's memory."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        tc = cfg.titans
        d, std = cfg.d_model, cfg.init_std
        self.cfg = cfg
        self.H, self.dh = tc.memory_heads, d // tc.memory_heads
        self.wq = _linear(d, d, ("embed", "heads"), cfg, rngs, std)
        self.wk = _linear(d, d, ("embed", "heads"), cfg, rngs, std)
        self.wv = _linear(d, d, ("embed", "heads"), cfg, rngs, std)
        self.conv_q = CausalConv(d, tc.conv_kernel, cfg, rngs)
        self.conv_k = CausalConv(d, tc.conv_kernel, cfg, rngs)
        self.conv_v = CausalConv(d, tc.conv_kernel, cfg, rngs)
        bias = jnp.repeat(jnp.asarray([GATE_BIAS["theta"], GATE_BIAS["eta"], GATE_BIAS["alpha"]]), self.H)
        self.gates = nnx.Linear(
            d, 3 * self.H, use_bias=True, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), ("embed", None)),
            bias_init=nnx.with_partitioning(lambda key, shape, dtype: bias.astype(dtype), (None,)), rngs=rngs)
        self.dims = [self.dh] + [tc.memory_expansion * self.dh] * (tc.memory_depth - 1) + [self.dh]
        for i, (din, dout) in enumerate(zip(self.dims[:-1], self.dims[1:])):
            w0 = jax.random.normal(rngs.params(), (self.H, din, dout)) / din**0.5  # M_0, learned (paper: unspecified)
            setattr(self, f"m0_{i}", nnx.Param(w0.astype(jnp.dtype(cfg.param_dtype)),
                                               sharding=("titans_mem", None, None)))

    # ---- pieces ------------------------------------------------------------------------------------------
    def m0(self) -> tuple[jax.Array, ...]:
        """M_0: tuple of [H, d_in, d_out]."""
        return tuple(getattr(self, f"m0_{i}")[...] for i in range(len(self.dims) - 1))

    def project(self, x: jax.Array, which: str, tail, normalize: bool):
        """x [B, T, d] -> (SiLU(conv(x W)) per head [B, T, H, d_h], l2-normalised if asked; new conv tail)."""
        lin, conv = {"q": (self.wq, self.conv_q), "k": (self.wk, self.conv_k), "v": (self.wv, self.conv_v)}[which]
        z, tail = conv(lin(x), tail)
        z = jax.nn.silu(z).reshape(x.shape[:2] + (self.H, self.dh))
        return (l2_normalize(z) if normalize else z), tail

    def gate_values(self, x: jax.Array, chunk_size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Data-dependent theta (<= max_lr), eta, alpha from x [B, T, d]: each float32 [B, T, H]. chunk_size:
        the chunks of per_chunk gates (default titans.chunk_size)."""
        tc = self.cfg.titans
        g = jax.nn.sigmoid(self.gates(x.astype(jnp.float32)))
        c = chunk_size or tc.chunk_size
        if tc.gates == "per_chunk" and c > 1:  # the chunk's first token decides for the chunk (see module doc)
            b, t, n = g.shape
            g = jnp.broadcast_to(g.reshape(b, t // c, c, n)[:, :, :1], (b, t // c, c, n)).reshape(b, t, n)
        H = self.H
        return tc.max_lr * g[..., :H], g[..., H : 2 * H], g[..., 2 * H :]

    def read(self, weights: tuple[jax.Array, ...], q: jax.Array) -> jax.Array:
        """M*(q) without update (eq. 15). weights: tuple of [B, H, d_in, d_out] (or [H, ...]); q [B, T, H, d_h]."""
        h = q.astype(jnp.float32)
        for i, w in enumerate(weights):
            spec = "bthd,hde->bthe" if w.ndim == 3 else "bthd,bhde->bthe"
            h = jnp.einsum(spec, h, w.astype(jnp.float32))
            if i + 1 < len(weights):
                h = jax.nn.silu(h)
        return h

    def write_read(self, weights, momentum, q, k, v, theta, eta, alpha, after: bool, chunk_size: int | None = None):
        """One segment of updates and reads with the chunked kernel (chunk_size: default titans.chunk_size; 1 =
        the token-by-token rule, on the XLA path).

        weights, momentum: tuples of [B, H, d_in, d_out]; q, k, v [B, T, H, d_h]; gates [B, T, H].
        Token t reads M_t (after=True) or M_{t-1} (after=False). Returns (y f32 [B, T, H, d_h], weights', momentum').
        """
        b, t, H, dh = q.shape
        seq = lambda x: jnp.swapaxes(x, 1, 2).reshape((b * H, t) + x.shape[3:])   # heads into the batch
        par = lambda ws: tuple(w.reshape((b * H,) + w.shape[2:]) for w in ws)
        impl = "xla" if chunk_size == 1 else self.cfg.titans.implementation
        y, w1, s1 = chunked_memory(seq(q), seq(k), seq(v), seq(theta), seq(eta), seq(alpha), par(weights),
                                   par(momentum), chunk_size=chunk_size or self.cfg.titans.chunk_size,
                                   retrieve_after_update=after, implementation=None if impl == "auto" else impl,
                                   grad_clip=self.cfg.titans.inner_grad_clip, unroll=self.cfg.titans.scan_unroll,
                                   remat=self.cfg.titans.chunk_remat,
                                   parallel_retrieval=self.cfg.titans.parallel_retrieval)
        unpar = lambda ws: tuple(w.reshape((b, H) + w.shape[1:]).astype(jnp.float32) for w in ws)
        y = jnp.swapaxes(y.reshape(b, H, t, dh), 1, 2).astype(jnp.float32)
        return y, unpar(w1), unpar(s1)


def memory_stats(theta, eta, alpha, weights, momentum) -> dict:
    """Memory-health scalars for metrics.jsonl: mean gates, |M| and |S| (surprise) per (sequence, head)."""
    norm = lambda ws: jnp.mean(jnp.sqrt(sum(jnp.sum(w * w, axis=(-2, -1)) for w in ws)))
    return {"titans_theta": jnp.mean(theta), "titans_eta": jnp.mean(eta), "titans_alpha": jnp.mean(alpha),
            "titans_memory_norm": norm(weights), "titans_surprise_norm": norm(momentum)}


# ------------------------------------------------------------------------------------------------ attention
@dataclass(frozen=True)
class AttnContext:
    """Per-segment attention layout shared by all layers: RoPE positions and the visibility mask.

    q_pos [B, Lq], kv_pos [B, Lk] (local positions; RoPE is relative), mask bool [B, 1, Lq, Lk].
    """

    q_pos: jax.Array
    kv_pos: jax.Array
    mask: jax.Array


jax.tree_util.register_dataclass(AttnContext, data_fields=["q_pos", "kv_pos", "mask"], meta_fields=[])


def prefix_attention(q, q_raw, k, v, kp, vp, mask) -> jax.Array:
    """softmax over [persistent ; sequence] keys, grouped-query heads, float32 scores.

    q (RoPE'd), q_raw (not): [B, T, H, hd]; k, v: [B, S, kvh, hd]; kp, vp: [N_p, kvh, hd] (no RoPE, visible
    to every query; N_p may be 0); mask bool [B, 1, T, S]. Returns [B, T, H, hd].
    """
    b, t, h, d = q.shape
    kvh, n_p = k.shape[2], kp.shape[0]
    group = lambda x: x.reshape(b, t, kvh, h // kvh, d)
    s_seq = jnp.einsum("btkgd,bskd->bkgts", group(q), k, preferred_element_type=jnp.float32)
    s_seq = jnp.where(mask[:, :, None], s_seq, NEG_INF)
    s_p = jnp.einsum("btkgd,pkd->bkgtp", group(q_raw), kp, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.concatenate([s_p, s_seq], axis=-1) / jnp.sqrt(d), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., n_p:].astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgtp,pkd->btkgd", probs[..., :n_p].astype(vp.dtype), vp,
                           preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------------------- block
class TitansBlock(nnx.Module):
    """One decoder layer of variant titans.variant; `memory=False` is the same layer without neural memory.

    MAC (§4.1), segment S (this call's tokens), memory weights M_{t-1} from the carry:
        e = norm(x);  h = M*_{t-1}(q(e))                                         (retrieve, no update)
        y = Attn over [P ; h ; e], queries e: token j sees P, h_{<=j} and e_{<=j} (h_i is computed from
            token i, so letting token j see h_{i>j} would leak the future; the paper's full attention over
            [P || h || S] does that). With num_longterm = N_l > 0, h = M*_{t-1}(N_l learned queries) instead,
            visible to every token.
        y = norm(y);  M_t = update with (k, v) = proj(y);  m_j = M_j(q(y_j)) (token j reads the memory
        written through j);  x += W_O(y * sigmoid(norm(m)));  x += FFN(norm(x))
    MAG (§4.2): y = SWA*([P ; e]) (window W, KV tail carried); m_j = M_{j-1}(q(e_j)) (read before writing j);
        x += W_O(norm(y) * sigmoid(norm(m))); FFN.
    MAL (§4.3): memory layer then SWA: m_j = M_{j-1}(q(e'_j)), e' = norm(x);
        x += W_O(norm(m) * sigmoid(e' W_g));  x += SWA*([P ; norm(x)]);  FFN. With titans.persistent_write the
        attention is plain SWA (no P prefix) and P sits in the KV tail at a document start (persistent_state).
    """

    def __init__(self, cfg, rngs: nnx.Rngs, memory: bool = True):
        tc = cfg.titans
        d = cfg.d_model
        self.cfg, self.variant, self.has_memory = cfg, tc.variant, memory
        self.attn_norm = make_norm(cfg, rngs)  # the backbone's norms (LayerNorm for gpt2)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = make_mlp(cfg, rngs)
        self.n_p, self.n_l = tc.num_persistent, tc.num_longterm
        # titans.persistent_write under MAL: P reaches attention through the KV tail at a document start only
        self.p_in_window = tc.persistent_write and self.variant == "mal"
        if self.n_p:
            self.persistent = nnx.Param(jax.random.normal(rngs.params(), (self.n_p, d)).astype(
                jnp.dtype(cfg.param_dtype)), sharding=("mem_slots", "embed"))
        if not memory:
            return
        self.memory = NeuralMemory(cfg, rngs)
        self.norm_m = rms_norm(cfg, rngs)
        self.w_out = _linear(d, d, ("heads", "embed"), cfg, rngs, cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        if self.variant in ("mac", "mag"):
            self.norm_y = rms_norm(cfg, rngs)
        if self.variant == "mac":
            self.h_norm = rms_norm(cfg, rngs)
            if tc.num_longterm:
                self.longterm = nnx.Param(jax.random.normal(rngs.params(), (tc.num_longterm, d)).astype(
                    jnp.dtype(cfg.param_dtype)), sharding=("mem_slots", "embed"))
        if self.variant == "mal":
            self.mem_norm = rms_norm(cfg, rngs)
            self.w_gate = _linear(d, d, ("embed", "heads"), cfg, rngs, cfg.init_std)

    # ---- attention ---------------------------------------------------------------------------------------
    def _attend(self, xq, xkv, ctx: AttnContext, tail=None):
        """Attention output (after W_o) [B, Lq, d] of queries xq over [P ; tail ; xkv]. tail: (k, v) pre-RoPE
        [B, W-1, kvh, hd] of the previous tokens or None. Returns (out, new tail = last W-1 keys/values)."""
        cfg, a = self.cfg, self.attn
        b, lq, _ = xq.shape
        lk = xkv.shape[1]
        q = a.wq(xq).reshape(b, lq, cfg.n_heads, cfg.hd)
        k = a.wk(xkv).reshape(b, lk, cfg.kv_heads, cfg.hd)
        v = a.wv(xkv).reshape(b, lk, cfg.kv_heads, cfg.hd)
        new_tail = None
        if tail is not None:
            n_tail = tail[0].shape[1]
            k = jnp.concatenate([tail[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([tail[1].astype(v.dtype), v], axis=1)
            new_tail = (k[:, k.shape[1] - n_tail :], v[:, v.shape[1] - n_tail :])
        if cfg.arch == "gpt2":  # learned absolute positions were added at the input
            qr, kr = q, k
        else:
            qr = apply_rope(q, ctx.q_pos, cfg.rope_theta)
            kr = apply_rope(k, ctx.kv_pos, cfg.rope_theta)
        qr = constrain(qr, ("batch", "act_seq", "act_heads", None))
        if self.n_p and not self.p_in_window:
            p = self.persistent[...].astype(xq.dtype)
            kp = a.wk(p).reshape(self.n_p, cfg.kv_heads, cfg.hd)
            vp = a.wv(p).reshape(self.n_p, cfg.kv_heads, cfg.hd)
        else:
            kp = vp = jnp.zeros((0, cfg.kv_heads, cfg.hd), q.dtype)
        out = over_query_blocks(lambda qr, q, m: prefix_attention(qr, q, kr, v, kp, vp, m), (qr, q), ctx.mask,
                                cfg.attention_q_block)
        return a.wo(out.reshape(b, lq, cfg.n_heads * cfg.hd)), new_tail

    # ---- memory ------------------------------------------------------------------------------------------
    def _memory(self, x_q, x_kv, mem: dict, streams: tuple[str, str, str], after: bool, chunk_size: int | None = None):
        """Project (queries from x_q, keys/values/gates from x_kv), update and read. streams: conv-tail names
        for q, k, v; chunk_size: default titans.chunk_size. Returns (m f32 [B, T, d], new mem dict, stats)."""
        nm, conv = self.memory, dict(mem["conv"])
        q, conv[streams[0]] = nm.project(x_q, "q", conv.get(streams[0]), True)
        k, conv[streams[1]] = nm.project(x_kv, "k", conv.get(streams[1]), True)
        v, conv[streams[2]] = nm.project(x_kv, "v", conv.get(streams[2]), self.cfg.titans.normalize_values)
        theta, eta, alpha = nm.gate_values(x_kv, chunk_size)
        m, w, s = nm.write_read(mem["w"], mem["s"], q, k, v, theta, eta, alpha, after, chunk_size)
        new = {"w": w, "s": s, "conv": {n: t for n, t in conv.items() if t is not None}}
        return m.reshape(x_q.shape[:2] + (-1,)), new, memory_stats(theta, eta, alpha, w, s)

    # ---- document start ----------------------------------------------------------------------------------
    def persistent_state(self) -> dict:
        """titans.persistent_write (the paper's x~ = [P || x], eq. 26 / 29): this layer's state after its N_p
        persistent tokens, batch 1, for Titans.init_carry.

        MAG: P (attention-input space, as in the prefix) goes through the memory from (M_0, S = 0, zero conv
        tails), token by token (P rarely fills whole chunks; chunk 1 is the update rule itself, eq. 13-14).
        MAL: P is the layer's input at N_p positions before the document: e_m = norm(P) goes through the memory
        the same way, x_P = P + W_O(norm(m_P) * sigmoid(e_m W_g)), and the keys/values of norm(x_P) are what
        the sliding window sees of P. Returns {"mem": {"w", "s", "conv"}} (memory layers) and, for MAL,
        {"kv": (k, v) pre-RoPE [1, N_p, kvh, hd]}.
        """
        cfg, tc = self.cfg, self.cfg.titans
        p = self.persistent[...].astype(jnp.dtype(cfg.dtype))[None]  # [1, N_p, d]
        out, x = {}, p
        if self.has_memory:
            e_m = self.mem_norm(p) if self.variant == "mal" else p
            w0 = tuple(m[None].astype(jnp.float32) for m in self.memory.m0())
            tail = jnp.zeros((1, tc.conv_kernel - 1, cfg.d_model), p.dtype)
            start = {"w": w0, "s": tuple(jnp.zeros_like(w) for w in w0),
                     "conv": {n: tail for n in ("q", "k", "v")} if tc.conv_kernel > 1 else {}}
            m, out["mem"], _ = self._memory(e_m, e_m, start, ("q", "k", "v"), False, chunk_size=1)
            if self.variant == "mal":
                x = p + self.w_out(self.norm_m(m.astype(p.dtype)) * jax.nn.sigmoid(self.w_gate(e_m)))
        if self.variant == "mal":
            e, a = self.attn_norm(x), self.attn
            out["kv"] = (a.wk(e).reshape(1, self.n_p, cfg.kv_heads, cfg.hd),
                         a.wv(e).reshape(1, self.n_p, cfg.kv_heads, cfg.hd))
        return out

    # ---- forward -----------------------------------------------------------------------------------------
    def __call__(self, x: jax.Array, ctx: dict, lc: dict) -> tuple[jax.Array, dict, dict]:
        """x [B, L, d]; ctx: {"attn": AttnContext, ...}; lc: this layer's carry. Returns (x, new lc, stats)."""
        out_lc, stats = dict(lc), {}
        cdt = x.dtype
        if self.variant == "mac":
            e = self.attn_norm(x)
            if self.has_memory:
                mem, nm = lc["mem"], self.memory
                conv = dict(mem["conv"])
                if self.n_l:  # N_l learned queries (no conv: not a token stream)
                    lt = self.longterm[...].astype(cdt)
                    q_h = l2_normalize(jax.nn.silu(nm.wq(lt)).reshape(1, -1, nm.H, nm.dh))
                    h = jnp.broadcast_to(nm.read(mem["w"], q_h), (x.shape[0],) + q_h.shape[1:])
                else:
                    q_h, conv["qx"] = nm.project(e, "q", conv.get("qx"), True)
                    h = nm.read(mem["w"], q_h)  # h_t = M*_{t-1}(q): memory at the segment start
                h = self.h_norm(h.reshape(h.shape[:2] + (-1,)).astype(cdt))
                y, _ = self._attend(e, jnp.concatenate([h, e], axis=1), ctx["mac_mem"])
                y = self.norm_y(y)  # the memory stores and gates the normalised attention output
                m, out_lc["mem"], stats = self._memory(y, y, {**mem, "conv": conv}, ("qy", "ky", "vy"), True)
                x = x + self.w_out(y * jax.nn.sigmoid(self.norm_m(m.astype(cdt))))
            else:
                x = x + self._attend(e, e, ctx["attn"])[0]
        else:
            if self.has_memory and self.variant == "mal":
                em = self.mem_norm(x)
                m, out_lc["mem"], stats = self._memory(em, em, lc["mem"], ("q", "k", "v"), False)
                x = x + self.w_out(self.norm_m(m.astype(cdt)) * jax.nn.sigmoid(self.w_gate(em)))
            e = self.attn_norm(x)
            y, tail = self._attend(e, e, ctx["attn"], lc.get("kv"))
            if tail is not None:
                out_lc["kv"] = tail
            if self.has_memory and self.variant == "mag":
                m, out_lc["mem"], stats = self._memory(e, e, lc["mem"], ("q", "k", "v"), False)
                x = x + self.w_out(self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m.astype(cdt))))
            else:
                x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "act_seq", "act_embed")), out_lc, stats
