"""Llama-style decoder backbone: RMSNorm, RoPE, SwiGLU, grouped-query attention, scanned layers, remat.

`model.arch=gpt2` swaps in the GPT-2 pieces (LayerNorm with bias, tanh-GELU MLP, attention biases, no RoPE,
learned absolute position embeddings added to the backbone input) so GPT-2 checkpoints can be imported.

The decoder is split into `embed` -> `backbone` -> `head` so memory mechanisms can splice memory tokens or
embeddings between the steps (RMT, HMT) and read the final hidden states (the new memory). Parameters are
float32; compute runs in `model.dtype` (bfloat16 by default); logits and losses are float32.
Layers are stacked on a leading "layers" axis and run with `lax.scan` (compile time independent of depth).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.layers.attention import Attention, _linear
from memlm.layers.mlp import make_mlp, make_norm
from memlm.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """Pre-norm transformer block: h = x + Attn(norm(x)); out = h + FFN(norm(h))."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = make_mlp(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "act_seq", "act_embed"))


def make_stacked_blocks(cfg, rngs: nnx.Rngs, n_layers: int, block_cls=Block) -> nnx.Module:
    """n_layers blocks with parameters stacked on a leading axis named "layers"."""

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs):
        return block_cls(cfg, r)

    return make(rngs)


def run_stacked_blocks(blocks: nnx.Module, x: jax.Array, remat: str, *args) -> jax.Array:
    """Apply stacked blocks in order with lax.scan; `args` are passed to every block unchanged."""
    graphdef, stacked = nnx.split(blocks)

    def body(h, layer_state):
        return nnx.merge(graphdef, layer_state)(h, *args), None

    if remat in _REMAT_POLICIES:
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    out, _ = jax.lax.scan(body, x, stacked)
    return out


class Decoder(nnx.Module):
    """Token embedding -> n_layers scanned blocks -> final RMSNorm -> LM head (optionally tied).

    arch=gpt2 adds `pos_embedding` [max_seq_len, d_model] (GPT-2's wpe), added to every backbone input
    (memory tokens included, as when a GPT-2 gets `inputs_embeds`); positions past the table use its last row.
    """

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (cfg.padded_vocab, cfg.d_model), jnp.dtype(cfg.param_dtype))
            * cfg.init_std,
            sharding=("vocab", "embed"),
        )
        self.blocks = make_stacked_blocks(cfg, rngs, cfg.n_layers)
        self.final_norm = make_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.d_model, cfg.padded_vocab, ("embed", "vocab"), cfg, rngs, cfg.init_std)
        self.init_positions(cfg, rngs)

    def init_positions(self, cfg, rngs: nnx.Rngs) -> None:
        """arch=gpt2: the learned absolute position table `pos_embedding` [max_seq_len, d_model] (wpe)."""
        if cfg.arch == "gpt2":
            self.pos_embedding = nnx.Param(
                nnx.initializers.normal(1.0)(rngs.params(), (cfg.max_seq_len, cfg.d_model),
                                             jnp.dtype(cfg.param_dtype)) * cfg.init_std,
                sharding=(None, "embed"),
            )

    def add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [batch, seq, d_model] (+ wpe[positions] for arch=gpt2; RoPE archs: unchanged), compute dtype."""
        x = x.astype(self.compute_dtype)
        if self.cfg.arch == "gpt2":  # learned absolute positions (GPT-2's wpe); past the table: its last row
            table = constrain(self.pos_embedding[...], (None, "act_embed"))
            x = x + jnp.take(table, positions, axis=0, mode="clip").astype(self.compute_dtype)
        return x

    @property
    def compute_dtype(self):
        return jnp.dtype(self.cfg.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [batch, seq] -> [batch, seq, d_model] in the compute dtype."""
        # Constrain the table so the gather does not inherit the fsdp split (spike-notes §3).
        table = constrain(self.embedding[...], ("vocab", "act_embed"))
        x = jnp.take(table, tokens, axis=0).astype(self.compute_dtype)
        return constrain(x, ("batch", "act_seq", "act_embed"))

    def backbone(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [batch, seq, d_model]; positions: [batch, seq]; mask: bool [batch, 1, seq, seq].

        Returns the final-normed hidden states [batch, seq, d_model].
        """
        x = self.add_positions(x, positions)
        h = run_stacked_blocks(self.blocks, x, self.cfg.remat, positions, mask)
        return self.final_norm(h)

    def head(self, h: jax.Array) -> jax.Array:
        """h: [batch, seq, d_model] -> float32 logits [batch, seq, vocab]."""
        if self.cfg.tie_embeddings:
            w = self.embedding[...].T
        else:
            w = self.lm_head.kernel[...]
        logits = jnp.einsum("btd,dv->btv", h, w.astype(self.compute_dtype), preferred_element_type=jnp.float32)
        if self.cfg.padded_vocab != self.cfg.vocab_size:  # padding rows are never predicted
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.cfg.vocab_size, logits, -1e30)
        return constrain(logits, ("batch", "act_seq", "act_vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, mask=None) -> jax.Array:
        """Plain causal LM over [batch, seq] tokens -> float32 logits [batch, seq, vocab]."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if mask is None:
            idx = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = idx[:, None, None, :] <= idx[:, None, :, None]
        return self.head(self.backbone(self.embed(tokens), positions, mask))
