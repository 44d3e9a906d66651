"""Hierarchical Memory Transformer (He et al. 2024, arXiv 2405.06067; official code OswaldHe/HMT-pytorch).

Per segment H_n (L tokens) on the unchanged backbone (models.md §3(a)):

 1. Representation extraction (§3.2): S_n = backbone([T ; j tokens ; T])[-1], T a learned [1, d] prompt,
    j = round(sum_fraction * L).
 2. Memory search (§3.3): P_n = softmax((S_n W_q)(C W_k)^T / sqrt(d_h)) C over the ring cache C of the last N
    memory embeddings; softmax only over filled slots, no value projection. An empty cache (first segment
    of a document) gives the learned memory vector instead. Stage 1 (`hmt.stage: 1`) has no recall:
    P_n = m_{n-1} (RMT with one memory token + sensory memory).
 3. Segment pass (§3.1): [P_n ; E(last k tokens of H_{n-1}) ; E(H_n) ; P_n] -> logits for H_n only;
    m_n = final hidden state at the last position (the write copy of P_n), pushed into C.

CAUSALITY. The paper and the official code summarise the *first* j tokens of the *current* segment
(`extract_from: current_segment`): P_n, which every token of H_n attends to, then depends on tokens up to
j-1 of H_n, so the logits at positions i < j-1 see later tokens through the recall weights (a leak of
log-N-ish bandwidth; `tests/memory/test_hmt.py` demonstrates it). The default `previous_segment` summarises
the *last* j tokens of H_{n-1} instead, computed at the end of segment n-1 and carried as `summary`; the
recall then uses only the past.

Layout and positions (segment-local, like RMT with `write_positions: after_segment`): P_n at 0, sensory
tokens 1..k, text k+1..k+L, write P_n at k+L+1. At a document start there is no previous segment: the k
sensory slots stay in place with their keys masked (the official code drops them, shifting positions by k;
with RoPE only relative offsets matter, and the text-to-text offsets are the same).

Carry (all rows independent, reset to `init_carry` at document starts):
  cache [B, N, d] f32, valid [B, N] f32 (1 = filled), index [B] int32 (next ring slot),
  last_mem [B, d] f32 (m_{n-1}; the learned memory at a document start),
  sensory [B, k] int32 + sensory_valid [B, k] f32 (if k > 0),
  summary [B, d] f32 (stage 2 with extract_from=previous_segment).

Reductions: stage 1 with num_sensory=0 is exactly RMT with one memory token (`write_positions:
after_segment`), whose zero-token form is the segment-local baseline; stage 2 with cache_size=1 is exactly
stage 1 (recall over one cached vector returns it). Both are tested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.errors import UserError
from memlm.layers.attention import NEG_INF, _linear, causal_mask
from memlm.models.decoder import Decoder
from memlm.models.lm import register_model
from memlm.models.segments import segment_major, segments_lm_loss

# Drawn as N(0,1) * std(word embeddings): `memlm import hf` rescales them to the imported backbone's embedding.
EMBEDDING_STD_PARAMS = ("mem_init", "prompt")


class HMT(nnx.Module):
    stateless = False

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        hc = cfg.hmt
        self.k = hc.num_sensory
        self.n_cache = hc.cache_size
        self.stage = hc.stage
        self.carry_summary = hc.stage == 2 and hc.extract_from == "previous_segment"
        d, pd = cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.decoder = Decoder(cfg, rngs)
        # N(0,1) * std(word embeddings), as the official code's MemoryCell.memory and RecurrentWrapper.mem
        self.mem_init = nnx.Param(jax.random.normal(rngs.params(), (1, d), pd) * cfg.init_std,
                                  sharding=("mem_slots", "embed"))
        self.prompt = nnx.Param(jax.random.normal(rngs.params(), (1, d), pd) * cfg.init_std,
                                sharding=("mem_slots", "embed"))
        # W_q, W_k: d -> d_h, no bias; std d^-1/2 so the initial recall scores are O(1), not uniform
        self.recall_q = _linear(d, hc.recall_dim, ("embed", "mlp"), cfg, rngs, d**-0.5)
        self.recall_k = _linear(d, hc.recall_dim, ("embed", "mlp"), cfg, rngs, d**-0.5)

    # ---- carry protocol ------------------------------------------------------------------------------------
    def init_carry(self, batch: int) -> dict:
        d = self.cfg.d_model
        c = {
            "cache": jnp.zeros((batch, self.n_cache, d), jnp.float32),
            "valid": jnp.zeros((batch, self.n_cache), jnp.float32),
            "index": jnp.zeros((batch,), jnp.int32),
            "last_mem": jnp.broadcast_to(self.mem_init[...].astype(jnp.float32), (batch, d)),
        }
        if self.k:
            c["sensory"] = jnp.zeros((batch, self.k), jnp.int32)
            c["sensory_valid"] = jnp.zeros((batch, self.k), jnp.float32)
        if self.carry_summary:
            c["summary"] = jnp.zeros((batch, d), jnp.float32)
        return c

    def carry_axes(self) -> dict:
        axes = {
            "cache": ("batch", "mem_slots", "act_embed"),
            "valid": ("batch", "mem_slots"),
            "index": ("batch",),
            "last_mem": ("batch", "act_embed"),
        }
        if self.k:
            axes["sensory"] = ("batch", "act_seq")
            axes["sensory_valid"] = ("batch", "act_seq")
        if self.carry_summary:
            axes["summary"] = ("batch", "act_embed")
        return axes

    # ---- pieces --------------------------------------------------------------------------------------------
    def _check(self, seg_len: int) -> int:
        """Static checks against the data shape (the config cannot see data.segment_len); returns j."""
        cfg = self.cfg
        if self.k > seg_len:
            raise UserError(f"model.hmt.num_sensory ({self.k}) exceeds data.segment_len ({seg_len}): sensory "
                            "memory holds the last k tokens of the previous segment")
        if seg_len + self.k + 2 > cfg.max_seq_len:
            raise UserError(f"data.segment_len ({seg_len}) + model.hmt.num_sensory ({self.k}) + 2 memory tokens "
                            f"does not fit model.max_seq_len ({cfg.max_seq_len})")
        return max(1, int(cfg.hmt.sum_fraction * seg_len + 0.5))

    def summarise(self, tokens: jax.Array) -> jax.Array:
        """Representation extraction (§3.2): tokens [B, j] -> S = backbone([T; E(tokens); T])[-1], f32 [B, d]."""
        b, j = tokens.shape
        dec = self.decoder
        t = jnp.broadcast_to(self.prompt[...].astype(dec.compute_dtype), (b, 1, self.cfg.d_model))
        x = jnp.concatenate([t, dec.embed(tokens), t], axis=1)
        pos = jnp.broadcast_to(jnp.arange(j + 2), (b, j + 2))
        return dec.backbone(x, pos, causal_mask(pos, pos))[:, -1].astype(jnp.float32)

    def recall(self, s: jax.Array, cache: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Memory search (§3.3, eq. 3). s [B, d], cache [B, N, d], valid [B, N] -> (P [B, d] f32, weights [B, N]).

        softmax over filled slots only; rows with an empty cache get the learned memory vector.
        """
        dt = self.decoder.compute_dtype
        q = self.recall_q(s.astype(dt))  # [B, d_h]
        k = self.recall_k(cache.astype(dt))  # [B, N, d_h]
        scores = jnp.einsum("bh,bnh->bn", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
        filled = valid > 0
        w = jax.nn.softmax(jnp.where(filled, scores, NEG_INF), axis=-1)
        w = jnp.where(filled, w, 0.0)
        p = jnp.einsum("bn,bnd->bd", w, cache.astype(jnp.float32))
        p = jnp.where(filled.any(-1, keepdims=True), p, self.mem_init[...].astype(jnp.float32))
        return p, w

    def segment(self, carry: dict, tokens: jax.Array) -> tuple[jax.Array, dict, dict]:
        """Streaming form: tokens [B, L] -> (logits f32 [B, L, vocab], new carry, stats of scalars)."""
        (h, stats), carry = self.segment_hidden(carry, (tokens, *self._summaries(carry, tokens)))
        return self.decoder.head(h), carry, stats

    def _summaries(self, carry: dict, tokens: jax.Array):
        """One segment's (query S_n or None, next_summary or None) for segment_hidden; tokens [B, L]."""
        seg_len = tokens.shape[1]
        j = self._check(seg_len)
        query = next_summary = None
        if self.stage == 2:
            query = carry["summary"] if self.carry_summary else self.summarise(tokens[:, :j])
        if self.carry_summary:  # causal: the next segment's query summarises the end of this one
            next_summary = self.summarise(tokens[:, seg_len - j :])
        return query, next_summary

    def segment_hidden(self, carry: dict, x) -> tuple[tuple[jax.Array, dict], dict]:
        """One segment given its summaries. x = (tokens [B, L], query S_n [B, d] or None (stage 1),
        next_summary [B, d] or None (carried for the next segment)) -> ((final-normed text hidden [B, L, d],
        stats), new carry). The summaries depend on the tokens and parameters only, never on the memory, so
        `loss` can compute every segment's at once outside the sequential scan (without the per-segment
        checkpoint; with it they stay inside, so memory stays flat in the number of segments)."""
        tokens, query, next_summary = x
        b, seg_len = tokens.shape
        k, dec = self.k, self.decoder
        dt = dec.compute_dtype
        stats = {}
        if self.stage == 1:
            p = carry["last_mem"]
        else:
            p, w = self.recall(query, carry["cache"], carry["valid"])
            stats["recall_entropy"] = jnp.mean(-jnp.sum(w * jnp.log(jnp.maximum(w, 1e-30)), axis=-1))
            stats["recall_max_weight"] = jnp.mean(jnp.max(w, axis=-1))
        pe = p.astype(dt)[:, None]
        parts, key_ok = [pe], [jnp.ones((b, 1), bool)]
        if k:
            parts.append(dec.embed(carry["sensory"]))
            key_ok.append(carry["sensory_valid"] > 0)
        parts += [dec.embed(tokens), pe]
        key_ok.append(jnp.ones((b, seg_len + 1), bool))
        x = jnp.concatenate(parts, axis=1)
        n = seg_len + k + 2
        pos = jnp.broadcast_to(jnp.arange(n), (b, n))
        mask = causal_mask(pos, pos) & jnp.concatenate(key_ok, axis=1)[:, None, None, :]
        h = dec.backbone(x, pos, mask)
        m = h[:, -1].astype(jnp.float32)  # m_n: the write copy of P_n at the final position

        # push m_n into the ring cache (a one-hot blend keeps it differentiable and shape-static)
        slot = jax.nn.one_hot(carry["index"], self.n_cache, dtype=jnp.float32)  # [B, N]
        new = {
            "cache": carry["cache"] * (1.0 - slot[..., None]) + slot[..., None] * m[:, None],
            "valid": jnp.maximum(carry["valid"], slot),
            "index": (carry["index"] + 1) % self.n_cache,
            "last_mem": m,
        }
        if k:
            new["sensory"] = tokens[:, seg_len - k :]
            new["sensory_valid"] = jnp.ones((b, k), jnp.float32)
        if self.carry_summary:
            new["summary"] = next_summary
        return (h[:, 1 + k : 1 + k + seg_len], stats), new

    def _all_summaries(self, tokens: jax.Array, carry: dict):
        """tokens [B, S, L] -> (queries [S, B, d] or None, next summaries [S, B, d] or None), segment-major.

        One backbone pass over all B*S summary windows at once. previous_segment: segment i's query is the
        summary of segment i-1's last j tokens (segment 0's is the incoming carry's; at a document start the
        cache is empty, so recall ignores the query and returns the learned memory vector)."""
        if self.stage == 1:
            return None, None
        b, n_seg, seg_len = tokens.shape
        j = self._check(seg_len)
        window = tokens[:, :, seg_len - j :] if self.carry_summary else tokens[:, :, :j]
        summaries = segment_major(self.summarise(window.reshape(b * n_seg, j)).reshape(b, n_seg, -1))
        if not self.carry_summary:
            return summaries, None
        return jnp.concatenate([carry["summary"][None], summaries[:-1]], axis=0), summaries

    # ---- training / inference ------------------------------------------------------------------------------
    def loss(self, carry, batch, bptt_depth: int = -1):
        init = self.init_carry(batch["tokens"].shape[0])
        mask = batch["loss_mask"]
        if self.cfg.hmt.loss_segments == "last":  # the official code: CE on the final segment only
            mask = jnp.zeros_like(mask).at[:, -1].set(mask[:, -1])
        tokens = segment_major(batch["tokens"])
        if self.cfg.remat_segments:  # summaries inside each checkpointed segment

            def fn(c, toks):
                return self.segment_hidden(c, (toks, *self._summaries(c, toks)))

            xs = tokens
        else:  # every segment's summary in one batched pass before the scan
            fn, xs = self.segment_hidden, (tokens, *self._all_summaries(batch["tokens"], carry))
        loss_sum, count, stats, carry = segments_lm_loss(fn, self.decoder.head, carry, init, xs, batch, mask,
                                                         self.cfg, bptt_depth)
        aux = {k: jnp.mean(v) for k, v in stats.items()}
        aux["memory_norm"] = jnp.mean(jnp.linalg.norm(carry["last_mem"], axis=-1))
        aux["cache_fill"] = jnp.mean(carry["valid"])
        return loss_sum, count, carry, aux

    def segment_logits(self, carry, tokens, positions=None, reset=None):
        logits, carry, _ = self.segment(carry, tokens)
        return logits, carry


register_model("hmt", HMT)
