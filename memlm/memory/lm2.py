"""LM2: Large Memory Models (Kang et al. 2025, arXiv 2502.06049), the paper's equations (§2), made causal.

For the input E of a decoder block (its pre-attention RMSNorm output) and a memory bank M in R^{N x d} per
sequence, with H = lm2.num_heads:

  read (§2.1):    Q = E W^Q, K = M W^K, V = M W^V (per head, d/H wide), A = softmax(QK^T / sqrt(d/H))
                  over the N slots (optionally only the top-k slots per token and head), E_mem = A V  [T, d].
  output (§2.1):  g_out = sigma(E_mem W_out); the block adds g_out * E_mem to the attention residual:
                      h = x + Attn(E) + g_out * E_mem;   out = h + FFN(norm(h)).
                  The paper writes "E_gated = g_out · M_t" and "E_attn + E_gated" (models.md §5(a)). M_t is
                  [N, d] and the residual stream is [T, d], so that sum only type-checks when T = N (the
                  official code's T = S constraint, which breaks incremental decoding). E_mem is M_t routed to
                  each token by its own read weights, so g_out * E_mem is the per-token form of
                  "g_out · M_t"; it is what we add.
  write (§2.2):   g_in = sigma(E W_in), g_forget = sigma(E_mem W_forget) per token, and
                  M_{t+1} = g_in * tanh(E_mem) + g_forget * M_t. Here too the token axis (T) must be mapped
                  onto the slot axis (N); the paper does not say how. With a routing matrix alpha [T, N] whose
                  columns sum to at most 1:
                      M'[n] = sum_t alpha[t, n] (g_in[t] * tanh(E_mem[t]) + g_forget[t] * M[n])
                              + (1 - sum_t alpha[t, n]) M[n]
                  `write_routing: position` (default) is the official code's mapping: the code resamples the
                  sequence in time onto the S slots (adaptive average pooling when T > S, interpolation when
                  T < S; T = S in its model, so token i updates slot i). We do the same without touching the
                  read: for T >= N slot n takes the mean update of the tokens t with floor(t N / T) = n (a
                  contiguous bucket; adaptive average pooling when N divides T), for T < N the update of token
                  floor(n T / N) (nearest-neighbour upsampling). It runs at the segment's end, so it is causal.
                  `write_routing: read_weights` (memlm's own choice, a flag) sends each token's update to the slots it
                  read, in proportion to its read weights (A averaged over heads, w[t, n]):
                  alpha[t, n] = w[t, n] / max(sum_t w[t, n], 1), so a slot nobody read is kept.
                  Measured (BENCHMARKS.md "Associative recall"): on the recall task, warm-started, position
                  routing learns the key/value binding and read-weight routing stays on the 75% plateau (with 1
                  or 4 memory heads): at the start every token reads the slots almost uniformly, so read-weight
                  routing writes the same segment average into every slot and no slot can specialise.

BANKS (`lm2.bank`). In the paper t indexes the decoder block (models.md §5(a)): block t reads M_t and writes
M_{t+1}, which the next block reads, and the official code threads one S x S bank through all layers. Read
literally inside one forward pass, that lets block t+1 read a bank written from every token of the segment,
later ones included. memlm keeps the memory causal in one of two ways:
  `bank: per_block` (default): every block t owns a bank M^(t), carried across segments ([B, n_layers, N, d]);
      block t reads its own bank as it was at the segment start and writes it at the segment's end. Memory
      does not pass between blocks. Every LM2 figure in BENCHMARKS.md but session 17's bank comparison is of it.
  `bank: shared`: one bank per sequence ([B, N, d], n_layers times smaller), the paper's chain: every block
      reads the segment-start bank M, and at the segment's end the writes run block after block,
      M_0 = M, M_{t+1} = write_t(M_t) (the write above, with its g_forget * M term applied to M_t); the next
      segment starts from M_L. With `gate_mode: sequence_mean_leaky` block t reads the chain's M_t itself
      (the official code's order, leaking as below).
With one block the two are the same model (tested).

CAUSALITY (`gate_mode: causal`, default): the memory is updated once per segment, from that segment's tokens,
after they were processed; every token of a segment reads the memory as it was at the segment start. So
token i never sees memory written by tokens >= its segment, and logits are causal across segments.
`gate_mode: sequence_mean_leaky` mimics the official code (models.md §5(a) "Code"): the gates are means over
the whole segment, the same update goes to every slot, and the segment's own output reads the *updated*
memory, so a token's output depends on later tokens (tested as a leak). It is a flag, never the default.

Initial memory ("M in R^{N×d×d}, each slot initialised to I_d" in the paper; the code has one S x S bank
initialised to I_S): we take M_0 = the first N rows of I_d, slot n = e_n, a fixed (not learned) init, reset
at every document start. With N = d = 2048 (the paper's model) this is the code's I_S. N > d would give
identical slots that can never diverge, so it is rejected.

Memory disabled: with W^V = 0, E_mem = 0, so the block adds exactly nothing and LM2 equals the segment-local
baseline Decoder with the same parameters (tested). Parameters: the baseline `decoder.*` layout plus
`decoder.blocks.memory.{wq,wk,wv,w_out,w_in,w_forget}` (6 d^2 per block: +0.40B at d=2048, 16 blocks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm.errors import UserError
from memlm.layers.attention import NEG_INF, _linear, causal_mask
from memlm.models.decoder import _REMAT_POLICIES, Block, Decoder, make_stacked_blocks
from memlm.models.lm import register_model
from memlm.models.segments import segment_major, segments_lm_loss
from memlm.sharding import constrain

MEM_AXES = ("batch", "mem_slots", "act_embed")


def position_routing(num_tokens: int, num_slots: int) -> np.ndarray:
    """float32 [num_tokens, num_slots] routing of `write_routing: position` (module docstring); column n sums to 1.

    num_tokens >= num_slots: token i updates slot floor(i N / T) and column n averages its bucket;
    num_tokens < num_slots: slot n takes token floor(n T / N)."""
    t, n = num_tokens, num_slots
    alpha = np.zeros((t, n), np.float32)
    if t >= n:
        alpha[np.arange(t), np.arange(t) * n // t] = 1.0
    else:
        alpha[np.arange(n) * t // n, np.arange(n)] = 1.0
    return alpha / alpha.sum(0, keepdims=True)


class LM2Memory(nnx.Module):
    """One block's memory read / gates / write. Memory arrays are float32 [B, N, d]."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        d, std = cfg.d_model, cfg.init_std
        self.heads = cfg.lm2.num_heads
        self.top_k = cfg.lm2.top_k
        self.leaky = cfg.lm2.gate_mode == "sequence_mean_leaky"
        self.by_position = cfg.lm2.write_routing == "position"
        self.wq = _linear(d, d, ("embed", "heads"), cfg, rngs, std)
        self.wk = _linear(d, d, ("embed", "heads"), cfg, rngs, std)
        self.wv = _linear(d, d, ("embed", "heads"), cfg, rngs, std)
        self.w_out = _linear(d, d, ("embed", "mlp"), cfg, rngs, std)
        self.w_in = _linear(d, d, ("embed", "mlp"), cfg, rngs, std)
        self.w_forget = _linear(d, d, ("embed", "mlp"), cfg, rngs, std)

    def read(self, e: jax.Array, mem: jax.Array) -> tuple[jax.Array, jax.Array]:
        """e [B, T, d] (compute dtype), mem [B, N, d] -> (E_mem f32 [B, T, d], head-mean weights f32 [B, T, N])."""
        b, t, d = e.shape
        n, h = mem.shape[1], self.heads
        m = constrain(mem.astype(e.dtype), MEM_AXES)
        q = constrain(self.wq(e).reshape(b, t, h, d // h), ("batch", "act_seq", "act_heads", None))
        k = constrain(self.wk(m).reshape(b, n, h, d // h), ("batch", "mem_slots", "act_heads", None))
        v = constrain(self.wv(m).reshape(b, n, h, d // h), ("batch", "mem_slots", "act_heads", None))
        s = jnp.einsum("bthc,bnhc->bhtn", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d // h)
        if 0 < self.top_k < n:  # keep the top-k slots per (token, head)
            kth = jax.lax.top_k(s, self.top_k)[0][..., -1:]
            s = jnp.where(s >= kth, s, NEG_INF)
        a = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("bhtn,bnhc->bthc", a.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.reshape(b, t, d), jnp.mean(a, axis=1)

    def write(self, e, e_mem, w, mem) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The §2.2 update, token t -> slot n routed by position or by the read weights w [B, T, N].
        Returns (M' [B, N, d], g_in, g_forget)."""
        g_in = jax.nn.sigmoid(self.w_in(e).astype(jnp.float32))
        g_f = jax.nn.sigmoid(self.w_forget(e_mem.astype(e.dtype)).astype(jnp.float32))
        if self.leaky:  # official-code style: one sequence-mean update for every slot (uses future tokens)
            cand = jnp.mean(g_in, axis=1) * jnp.mean(jnp.tanh(e_mem), axis=1)  # [B, d]
            return cand[:, None] + jnp.mean(g_f, axis=1)[:, None] * mem, g_in, g_f
        if self.by_position:
            alpha = jnp.broadcast_to(jnp.asarray(position_routing(w.shape[1], w.shape[2])), w.shape)
        else:
            alpha = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)  # [B, T, N]
        # the two T-contractions run in the compute dtype with float32 accumulation; M itself stays float32
        dt, f32 = e.dtype, jnp.float32
        cand = jnp.einsum("btn,btd->bnd", alpha.astype(dt), (g_in * jnp.tanh(e_mem)).astype(dt),
                          preferred_element_type=f32)
        keep = jnp.einsum("btn,btd->bnd", alpha.astype(dt), g_f.astype(dt), preferred_element_type=f32)
        keep = keep + (1.0 - jnp.sum(alpha, axis=1))[..., None]
        return cand + keep * mem, g_in, g_f

    def __call__(self, e: jax.Array, mem: jax.Array, chain: jax.Array | None = None) -> tuple[jax.Array, jax.Array,
                                                                                             dict]:
        """e [B, T, d], mem f32 [B, N, d] (the bank read) -> (g_out * E_mem in e.dtype [B, T, d], new memory, stats).

        chain f32 [B, N, d]: the bank the write updates (M_t of `bank: shared`); None = mem."""
        e_mem, w = self.read(e, mem)
        new, g_in, g_f = self.write(e, e_mem, w, mem if chain is None else chain)
        if self.leaky:  # the segment's own output reads the memory its (whole-segment) gates just wrote
            e_mem, w = self.read(e, new)
        g_out = jax.nn.sigmoid(self.w_out(e_mem.astype(e.dtype)).astype(jnp.float32))
        stats = {"gate_in": jnp.mean(g_in), "gate_forget": jnp.mean(g_f), "gate_out": jnp.mean(g_out),
                 "read_max_weight": jnp.mean(jnp.max(w, axis=-1))}
        return (g_out * e_mem).astype(e.dtype), constrain(new, MEM_AXES), stats


class LM2Block(Block):
    """Block with a memory pathway: h = x + Attn(E) + g_out*E_mem; out = h + FFN(norm(h)), E = norm(x)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.memory = LM2Memory(cfg, rngs)

    def __call__(self, x, positions, mask, mem, chain=None):
        e = self.attn_norm(x)
        gated, new_mem, stats = self.memory(e, mem, chain)
        h = x + self.attn(e, positions, mask) + gated
        out = h + self.mlp(self.mlp_norm(h))
        return constrain(out, ("batch", "act_seq", "act_embed")), new_mem, stats


class LM2Decoder(Decoder):
    """The baseline Decoder (same parameter names) with LM2 blocks; `backbone` threads the per-layer memory."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.blocks = make_stacked_blocks(cfg, rngs, cfg.n_layers, LM2Block)

    def backbone_mem(self, x, positions, mask, memory):
        """x [B, T, d], memory f32 [B, n_layers, N, d] (`bank: per_block`) or [B, N, d] (`bank: shared`) ->
        (final-normed h, new memory, per-layer-mean stats).

        lax.scan over the stacked layers: per_block scans each layer's bank with its parameters; shared carries
        the write chain M_t with h and gives every layer the segment-start bank to read (module docstring).
        """
        graphdef, stacked = nnx.split(self.blocks)
        x = self.add_positions(x, positions)

        def remat(f):
            if self.cfg.remat not in _REMAT_POLICIES:
                return f
            return jax.checkpoint(f, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)

        if self.cfg.lm2.bank == "shared":
            leaky = self.cfg.lm2.gate_mode == "sequence_mean_leaky"

            def chain_body(carry, layer_state):
                h, chain = carry
                h, chain, stats = nnx.merge(graphdef, layer_state)(h, positions, mask, chain if leaky else memory,
                                                                   chain)
                return (h, chain), stats

            (h, mem), stats = jax.lax.scan(remat(chain_body), (x, memory), stacked)
            return self.final_norm(h), mem, jax.tree.map(jnp.mean, stats)

        def body(h, xs):
            layer_state, mem = xs
            h, mem, stats = nnx.merge(graphdef, layer_state)(h, positions, mask, mem)
            return h, (mem, stats)

        h, (mems, stats) = jax.lax.scan(remat(body), x, (stacked, jnp.swapaxes(memory, 0, 1)))
        return self.final_norm(h), jnp.swapaxes(mems, 0, 1), jax.tree.map(jnp.mean, stats)


class LM2(nnx.Module):
    stateless = False

    def __init__(self, cfg, rngs: nnx.Rngs):
        lc = cfg.lm2
        if cfg.d_model % lc.num_heads:
            raise UserError(f"model.lm2.num_heads ({lc.num_heads}) does not divide model.d_model ({cfg.d_model})")
        if lc.num_slots > cfg.d_model:
            raise UserError(f"model.lm2.num_slots ({lc.num_slots}) exceeds model.d_model ({cfg.d_model}): the "
                            "identity init gives only d_model distinct slots (the rest could never diverge)")
        if lc.top_k > lc.num_slots:
            raise UserError(f"model.lm2.top_k ({lc.top_k}) exceeds model.lm2.num_slots ({lc.num_slots})")
        self.cfg = cfg
        self.decoder = LM2Decoder(cfg, rngs)

    # ---- carry protocol ------------------------------------------------------------------------------------
    def init_carry(self, batch: int) -> dict:
        """{"memory": f32 [batch, n_layers, N, d] (`bank: per_block`) or [batch, N, d] (`bank: shared`)}: every
        bank = the first N rows of I_d."""
        cfg = self.cfg
        m0 = jnp.eye(cfg.lm2.num_slots, cfg.d_model, dtype=jnp.float32)
        banks = () if cfg.lm2.bank == "shared" else (cfg.n_layers,)
        return {"memory": jnp.broadcast_to(m0, (batch,) + banks + m0.shape)}

    def carry_axes(self) -> dict:
        if self.cfg.lm2.bank == "shared":
            return {"memory": MEM_AXES}
        return {"memory": ("batch", "layers", "mem_slots", "act_embed")}

    # ---- one segment ---------------------------------------------------------------------------------------
    def segment_hidden(self, carry: dict, tokens: jax.Array) -> tuple[tuple[jax.Array, dict], dict]:
        """tokens [B, L] -> ((final-normed hidden [B, L, d], stats), {"memory": the new banks (init_carry)})."""
        b, seg_len = tokens.shape
        if seg_len > self.cfg.max_seq_len:
            raise UserError(f"data.segment_len ({seg_len}) exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        dec = self.decoder
        pos = jnp.broadcast_to(jnp.arange(seg_len), (b, seg_len))  # segment-local, as baseline segment_local
        h, mem, stats = dec.backbone_mem(dec.embed(tokens), pos, causal_mask(pos, pos), carry["memory"])
        return (h, stats), {"memory": mem}

    def segment(self, carry: dict, tokens: jax.Array) -> tuple[jax.Array, dict, dict]:
        """tokens [B, L] -> (logits f32 [B, L, vocab], {"memory": the new banks (init_carry)}, stats)."""
        (h, stats), carry = self.segment_hidden(carry, tokens)
        return self.decoder.head(h), carry, stats

    # ---- training / inference ------------------------------------------------------------------------------
    def loss(self, carry, batch, bptt_depth: int = -1):
        init = self.init_carry(batch["tokens"].shape[0])
        loss_sum, count, stats, carry = segments_lm_loss(self.segment_hidden, self.decoder.head, carry, init,
                                                         segment_major(batch["tokens"]), batch, batch["loss_mask"],
                                                         self.cfg, bptt_depth)
        aux = {k: jnp.mean(v) for k, v in stats.items()}
        aux["memory_norm"] = jnp.mean(jnp.linalg.norm(carry["memory"], axis=-1))
        return loss_sum, count, carry, aux

    def segment_logits(self, carry, tokens, positions=None, reset=None):
        logits, carry, _ = self.segment(carry, tokens)
        return logits, carry


register_model("lm2", LM2)
