"""Attention: the grouped-query attention module and the ONE dispatch point for attention kernels.

`attend(q, k, v, mask, impl)` is where every attention computation goes; kernels (landmark attention, ...)
register themselves here. Scores and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.layers.rope import apply_rope
from memlm.sharding import constrain

NEG_INF = -1e30

_IMPLS: dict[str, Callable] = {}


def register_attention(name: str, fn: Callable) -> None:
    """Register an attention implementation `fn(q, k, v, mask) -> out` under `model.attention_impl`."""
    _IMPLS[name] = fn


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: bool, broadcastable to [batch, 1, q_len, kv_len] (True = may attend). Returns q's shape.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # [b,1,1,t,s] over (k, g)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:  # rows with no visible key give zeros, not a uniform average
        probs = jnp.where(mask[:, :, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


register_attention("xla", reference_attention)
register_attention("reference", reference_attention)


def over_query_blocks(fn: Callable, q_args: tuple, mask: jax.Array | None, q_block: int) -> jax.Array:
    """fn(*q_args, mask) computed q_block queries at a time (`model.attention_q_block`).

    Queries are independent rows of attention, so this is the same function; what changes is memory: each
    block's [.., q_block, kv_len] float32 scores and probabilities exist one block at a time (lax.map), and the
    backward recomputes them per block (jax.checkpoint) instead of keeping all of them. q_args: arrays
    [batch, q_len, ...] (the queries; keys and values are closed over by fn); mask: [batch or 1, 1, q_len, kv_len]
    or None. q_len not a multiple of q_block is padded with fully masked rows, which are dropped.
    Returns fn's output [batch, q_len, ...]. q_block = 0 or >= q_len: one call.
    """
    t = q_args[0].shape[1]
    if not q_block or t <= q_block:
        return fn(*q_args, mask)
    nb = -(-t // q_block)
    pad = nb * q_block - t
    pad_rows = lambda x, axis: jnp.pad(x, [(0, pad) if i == axis else (0, 0) for i in range(x.ndim)])
    split = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (nb, q_block) + x.shape[axis + 1:]), axis, 0)
    qs = tuple(split(pad_rows(x, 1), 1) for x in q_args)
    ms = None if mask is None else split(pad_rows(jnp.broadcast_to(mask, mask.shape[:2] + (t,) + mask.shape[3:]), 2), 2)
    block = jax.checkpoint(lambda xs: fn(*xs[0], xs[1]))
    out = jax.lax.map(block, (qs, ms))                              # [nb, batch, q_block, ...]
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[:1] + (nb * q_block,) + out.shape[3:])[:, :t]


def attend(q, k, v, mask, impl: str = "xla", q_block: int = 0) -> jax.Array:
    """Dispatch to the configured attention implementation (see `register_attention`); q_block > 0 runs it
    over blocks of that many queries (`over_query_blocks`)."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {sorted(_IMPLS)}")
    fn = _IMPLS[impl]
    return over_query_blocks(lambda q, m: fn(q, k, v, m), (q,), mask, q_block)


def causal_mask(q_pos: jax.Array, kv_pos: jax.Array, q_doc=None, kv_doc=None) -> jax.Array:
    """Causal (and same-document) mask. *_pos: [batch, len] absolute indices; *_doc: [batch, len] ids.

    Returns bool [batch, 1, q_len, kv_len].
    """
    m = kv_pos[:, None, :] <= q_pos[:, :, None]
    if q_doc is not None:
        m = m & (q_doc[:, :, None] == kv_doc[:, None, :])
    return m[:, None]


def _linear(din: int, dout: int, names: tuple[str, str], cfg, rngs: nnx.Rngs, std: float,
            bias: bool = False) -> nnx.Linear:
    """x W (+ b). The bias (GPT-2 backbone only) starts at zero and is split like the output dim."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with RoPE (Llama), or with biases and no RoPE (GPT-2, whose
    positions are learned embeddings added at the input; Radford et al. 2019)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd
        std = cfg.init_std
        bias = cfg.arch == "gpt2"
        self.wq = _linear(d, h * hd, ("embed", "heads"), cfg, rngs, std, bias)
        self.wk = _linear(d, kvh * hd, ("embed", "kv_heads"), cfg, rngs, std, bias)
        self.wv = _linear(d, kvh * hd, ("embed", "kv_heads"), cfg, rngs, std, bias)
        # scaled init of the residual output projection (GPT-2 / Llama practice)
        self.wo = _linear(h * hd, d, ("heads", "embed"), cfg, rngs, std / (2 * cfg.n_layers) ** 0.5, bias)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [batch, seq, d_model]; positions: [batch, seq] (RoPE); mask: [batch, 1, seq, seq]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, cfg.n_heads, cfg.hd)
        k = self.wk(x).reshape(b, t, cfg.kv_heads, cfg.hd)
        v = self.wv(x).reshape(b, t, cfg.kv_heads, cfg.hd)
        if cfg.arch == "llama":
            q = apply_rope(q, positions, cfg.rope_theta)
            k = apply_rope(k, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "act_seq", "act_heads", None))
        out = attend(q, k, v, mask, cfg.attention_impl, cfg.attention_q_block)
        return self.wo(out.reshape(b, t, cfg.n_heads * cfg.hd))
