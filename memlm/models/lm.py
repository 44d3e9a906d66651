"""Language-model kinds: the protocol every `model.kind` implements, the baseline, and the registry.

A model is an nnx.Module with:
  init_carry(batch) -> carry pytree          the memory state at a document start (batch rows)
  carry_axes() -> pytree of logical names     for sharding and checkpointing the carry
  loss(carry, batch, bptt_depth) -> (loss_sum, n_tokens, new_carry, aux)
      batch: tokens/targets/positions int32 [batch, n_segments, segment_len], loss_mask float32 (same),
             reset bool [batch, n_segments]. The carry flows across train steps (slot-stable data).
  segment_logits(carry, tokens, positions, reset) -> (logits, new_carry)
      streaming inference on one segment: tokens [batch, segment_len] -> logits [batch, segment_len, vocab]
  stateless: bool   True when the model has no memory (whole sequences run in one pass)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from memlm.layers.attention import causal_mask
from memlm.models.decoder import Decoder


def token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over masked positions and the number of positions. logits float32 [..., V].

    Masked-out positions are dropped with `where`, not multiplied by 0: padding rows (the end of an eval pass)
    may hold non-finite logits (a Titans memory fed hundreds of identical pad tokens can diverge), and
    NaN * 0 would poison the sum.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask != 0, ce * mask, 0.0)), jnp.sum(mask)


class BaselineLM(nnx.Module):
    """The decoder with no memory.

    model.segment_local=false: attention over the whole [n_segments * segment_len] sequence, restricted to
    the current document (documents start at segment boundaries). true: each segment is attended alone,
    the control that shows what memory adds.
    """

    stateless = True

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.decoder = Decoder(cfg, rngs)

    def init_carry(self, batch: int) -> dict:
        return {}

    def carry_axes(self) -> dict:
        return {}

    def loss(self, carry, batch, bptt_depth: int = -1):
        tokens, positions = batch["tokens"], batch["positions"]
        b, s, l = tokens.shape
        if self.cfg.segment_local:
            flat = lambda x: x.reshape((b * s, l) + x.shape[3:])
            pos = jnp.broadcast_to(jnp.arange(l), (b * s, l))
            logits = self.decoder(flat(tokens), pos, causal_mask(pos, pos))
        else:
            doc = jnp.cumsum(batch["reset"].astype(jnp.int32), axis=1)  # [b, s]: document id per segment
            doc = jnp.repeat(doc, l, axis=1)
            idx = jnp.broadcast_to(jnp.arange(s * l), (b, s * l))
            flat = lambda x: x.reshape((b, s * l) + x.shape[3:])
            # A document continuing from the previous step restarts at 0: the baseline has no memory of it,
            # and learned position tables (gpt2) stay within max_seq_len. (RoPE is relative: no change.)
            pos = flat(positions)
            pos = jnp.where(doc == doc[:, :1], pos - pos[:, :1], pos)
            logits = self.decoder(flat(tokens), pos, causal_mask(idx, idx, doc, doc))
        loss_sum, n = token_loss(logits, flat(batch["targets"]), flat(batch["loss_mask"]))
        return loss_sum, n, carry, {}

    def segment_logits(self, carry, tokens, positions, reset=None):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self.decoder(tokens, positions, causal_mask(pos, pos)), carry

    def full_logits(self, tokens: jax.Array) -> jax.Array:
        """Whole-sequence causal logits [batch, seq, vocab] (stateless models only)."""
        return self.decoder(tokens)


MODEL_REGISTRY: dict[str, Callable] = {"baseline": BaselineLM}


def register_model(kind: str, cls: Callable) -> None:
    MODEL_REGISTRY[kind] = cls


# model.kind -> the module under memlm/memory/ that registers it (imported only when that kind is used)
MEMORY_MODULES = {"rmt": "rmt", "hmt": "hmt", "lm2": "lm2", "titans": "titans", "landmark": "landmark",
                  "memory_layers": "pkm"}


def memory_module(kind: str):
    """The module implementing memory kind `kind` (imported on first use), or None (baseline / absent)."""
    if kind not in MEMORY_MODULES:
        return None
    import importlib

    name = f"memlm.memory.{MEMORY_MODULES[kind]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def build_model(cfg, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiate `model.kind`; a memory kind's module registers it when first imported."""
    if cfg.kind not in MODEL_REGISTRY:
        memory_module(cfg.kind)  # registers the kind
    if cfg.kind not in MODEL_REGISTRY:
        from memlm.errors import UserError

        raise UserError(f"model.kind: {cfg.kind!r} is not implemented yet (available: {sorted(MODEL_REGISTRY)})")
    return MODEL_REGISTRY[cfg.kind](cfg, rngs)
