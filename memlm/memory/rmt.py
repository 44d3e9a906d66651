"""Recurrent Memory Transformer, decoder form (Bulatov et al. 2022, arXiv 2207.06881; 2023, arXiv 2304.11062).

Each segment H_n (L tokens) is processed by the unchanged backbone with m memory tokens on both sides:

    [M_{n-1} (read) ; E(H_n) ; M_{n-1} (write)]  --causal backbone-->  hidden states h
    logits_n = head(h[m : m+L])               (only text positions produce logits)
    M_n      = h[m+L : 2m+L]                  (final-layer, final-norm hidden states at the write positions)

M_0 is a learned [m, d_model] parameter (init N(0,1) * std of the word embeddings, as the official code: from
scratch that std is model.init_std, and `memlm import hf` rescales M_0 to the imported embedding's std) and
is reinstated at every document start. Gradients flow through M across segments (full BPTT) or are cut every
k segments (`train.bptt_depth`, handled by models/segments.py). With m = 0 the model is exactly the
segment-local baseline.

Positions: read tokens 0..m-1, text m..m+L-1. Write tokens are *pinned* to the last m positions of
`model.max_seq_len` by default, so they never move when the segment length changes (a curriculum over segment
lengths, or a short final segment); `rmt.write_positions=after_segment` reproduces the official code, where
write positions follow the segment (models.md §1(g)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.layers.attention import causal_mask
from memlm.models.decoder import Decoder
from memlm.models.lm import register_model
from memlm.models.segments import segment_major, segments_lm_loss

# Drawn as N(0,1) * std(word embeddings): `memlm import hf` rescales them to the imported backbone's embedding.
EMBEDDING_STD_PARAMS = ("mem_init",)


class RMT(nnx.Module):
    stateless = False

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.m = cfg.rmt.num_mem_tokens
        self.decoder = Decoder(cfg, rngs)
        self.mem_init = nnx.Param(
            jax.random.normal(rngs.params(), (self.m, cfg.d_model), jnp.dtype(cfg.param_dtype)) * cfg.init_std,
            sharding=("mem_slots", "embed"),
        )

    # ---- carry protocol ------------------------------------------------------------------------------------
    def init_carry(self, batch: int) -> dict:
        """{"memory": float32 [batch, m, d_model]} = M_0 for every row."""
        mem = jnp.broadcast_to(self.mem_init[...].astype(jnp.float32), (batch, self.m, self.cfg.d_model))
        return {"memory": mem}

    def carry_axes(self) -> dict:
        return {"memory": ("batch", "mem_slots", "act_embed")}

    # ---- one segment ---------------------------------------------------------------------------------------
    def _positions(self, seg_len: int) -> jax.Array:
        m = self.m
        write_start = self.cfg.max_seq_len - m if self.cfg.rmt.write_positions == "pinned" else m + seg_len
        return jnp.concatenate([jnp.arange(m), m + jnp.arange(seg_len), write_start + jnp.arange(m)])

    def segment_hidden(self, carry: dict, tokens: jax.Array) -> tuple[tuple[jax.Array, dict], dict]:
        """tokens [batch, L] -> ((final-normed text hidden states [batch, L, d], {}), {"memory": [batch, m, d]})."""
        b, seg_len = tokens.shape
        m = self.m
        mem = carry["memory"].astype(self.decoder.compute_dtype)
        x = jnp.concatenate([mem, self.decoder.embed(tokens), mem], axis=1)
        pos = jnp.broadcast_to(self._positions(seg_len), (b, seg_len + 2 * m))
        order = jnp.broadcast_to(jnp.arange(seg_len + 2 * m), (b, seg_len + 2 * m))
        h = self.decoder.backbone(x, pos, causal_mask(order, order))
        return (h[:, m : m + seg_len], {}), {"memory": h[:, m + seg_len :].astype(jnp.float32)}

    def segment(self, carry: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
        """tokens [batch, L] -> (logits float32 [batch, L, vocab], {"memory": [batch, m, d]})."""
        (h, _), carry = self.segment_hidden(carry, tokens)
        return self.decoder.head(h), carry

    # ---- training / inference ------------------------------------------------------------------------------
    def loss(self, carry, batch, bptt_depth: int = -1):
        init = self.init_carry(batch["tokens"].shape[0])
        loss_sum, count, _, carry = segments_lm_loss(self.segment_hidden, self.decoder.head, carry, init,
                                                     segment_major(batch["tokens"]), batch, batch["loss_mask"],
                                                     self.cfg, bptt_depth)
        mem_norm = jnp.mean(jnp.linalg.norm(carry["memory"], axis=-1))
        return loss_sum, count, carry, {"memory_norm": mem_norm}

    def segment_logits(self, carry, tokens, positions=None, reset=None):
        return self.segment(carry, tokens)


register_model("rmt", RMT)
