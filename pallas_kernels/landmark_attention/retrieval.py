"""Landmark retrieval for inference: top-k blocks by landmark score, then grouped-softmax attention.

Landmark Attention, Mohtashami & Jaggi 2023 (arXiv 2305.16300) Sec. 3.2-3.3 and the paper's
``models/caches/mem_cache.py`` (read, not copied); models.md Sec. 4(c).

Inputs per layer (the model owns the ring buffer and passes it in chronological order):
  cache_k, cache_v   [batch, heads, n_blocks, L, head_dim]: complete blocks (L = b + 1, landmark last),
                     oldest first, keys stored BEFORE RoPE. With ``num_valid`` the valid blocks are the
                     LAST num_valid entries (an unfilled ring buffer is right-aligned).
  landmark_keys      [batch, heads, n_blocks, head_dim], default cache_k[..., -1, :] (pre-RoPE).
  k_local, v_local   [batch, heads, T_local, head_dim] pre-RoPE: [incomplete block ; current chunk].
                     Local index 0 starts a block (cached blocks are complete), landmarks sit at local
                     indices t % L == L - 1, and the queries are the last T_q local tokens.
  q                  [batch, heads, T_q, head_dim] pre-RoPE.

Steps:
 1. Score every cached landmark for every (query, head): softmax over blocks of q.lk (both rotated at
    their stingy positions); granularity ``per_token_and_head`` (default), ``max_over_heads`` (max of the
    probabilities over heads) or ``max_over_tokens`` (max over the chunk). Take the top-k blocks and sort
    them chronologically.
 2. Attend over [retrieved blocks ; local tokens] with the grouped softmax of ``reference.py``: each
    retrieved block is an "earlier block" (its landmark joins the query group, its regular tokens form a
    group), local blocks follow the training rule (causal, own landmark excluded).
``retrieval_attention`` = ``chunk_select`` (step 1, reads only the landmark keys) + ``gather_blocks`` from the
device cache + ``attend_retrieved`` (step 2, takes the gathered blocks). The host-offloaded cache of
memlm/memory/landmark.py (offload_kv) runs the same two functions with a host-side gather in between.

Stingy positions (paper Sec. 3.3, bounded no matter how long the context):
  * landmark key of cache entry s for scoring: slot(s) * L + L - 1, where the k most recent entries get
    slots 1..k and every older entry shares slot 0;
  * the r-th retrieved block (chronological rank r) token j: (r + [block is among the k most recent]) * L + j;
  * local token t: (k + 1) * L + t; a query sits at its local index.
  So every position is < (k + 1) * L + T_local. One deliberate difference from the paper's code: it starts
  the local tokens at min(#blocks seen, k + 1) * L, which overlaps the last retrieved block while
  #blocks <= k; here top_k <= n_blocks is required and the local start is always (k + 1) * L.
  ``rope_fn(x, positions)`` (positions broadcast to x.shape[:-1]) is applied AFTER retrieval.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from memlm.errors import UserError

from .reference import grouped_softmax_weights

RETRIEVAL_MODES = ("per_token_and_head", "max_over_heads", "max_over_tokens")
RopeFn = Callable[[jax.Array, jax.Array], jax.Array]


def _identity_rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    return x


def stingy_positions(n_blocks: int, top_k: int, block_len: int, local_len: int) -> dict[str, jax.Array]:
    """Position tables: 'landmark' [n_blocks] (scoring position of each cache entry's landmark key),
    'recent' [n_blocks] bool (entry is among the top_k most recent), 'local' [local_len]."""
    s = jnp.arange(n_blocks)
    first_recent = n_blocks - top_k
    recent = s >= first_recent
    slot = jnp.where(recent, s - first_recent + 1, 0)
    return {
        "landmark": slot * block_len + block_len - 1,
        "recent": recent,
        "local": (top_k + 1) * block_len + jnp.arange(local_len),
    }


def _check(q, k_local, v_local, cache_k, cache_v, top_k, mode):
    if mode not in RETRIEVAL_MODES:
        raise UserError(f"landmark retrieval.mode: {mode!r} is not one of {RETRIEVAL_MODES}")
    if cache_k.ndim != 5 or cache_v.shape != cache_k.shape:
        raise UserError(
            f"landmark retrieval.cache_k/cache_v: expected [batch, heads, n_blocks, L, head_dim], got "
            f"{cache_k.shape} and {cache_v.shape}"
        )
    B, H, n_blocks, L, D = cache_k.shape
    if q.shape[:2] != (B, H) or q.shape[-1] != D or k_local.shape != v_local.shape:
        raise UserError(f"landmark retrieval.q/k_local: {q.shape}, {k_local.shape} do not match the cache")
    if k_local.shape[:2] != (B, H) or k_local.shape[-1] != D or k_local.shape[2] < q.shape[2]:
        raise UserError(
            f"landmark retrieval.k_local: {k_local.shape} must be [batch, heads, T_local >= T_q, head_dim]"
        )
    if not 1 <= top_k <= n_blocks:
        raise UserError(f"landmark retrieval.top_k: {top_k} must be in [1, n_blocks={n_blocks}] (cache size)")


def select_blocks(
    q: jax.Array,
    landmark_keys: jax.Array,
    *,
    top_k: int,
    mode: str = "per_token_and_head",
    rope_fn: RopeFn | None = None,
    q_positions: jax.Array | None = None,
    landmark_positions: jax.Array | None = None,
    num_valid: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Top-k cache entries per (query, head) by landmark score -> [batch, heads, T_q, top_k], ascending.

    q [batch, heads, T_q, D], landmark_keys [batch, heads, n_blocks, D] (both pre-RoPE; ``rope_fn`` rotates
    them at ``q_positions`` [T_q] and ``landmark_positions`` [n_blocks]). ``num_valid`` [batch]: only the
    last num_valid entries may be chosen (if fewer than top_k exist, invalid ones fill up and are masked
    by the caller).
    """
    if mode not in RETRIEVAL_MODES:
        raise UserError(f"landmark retrieval.mode: {mode!r} is not one of {RETRIEVAL_MODES}")
    rope_fn = rope_fn or _identity_rope
    n_blocks, D = landmark_keys.shape[-2:]
    scale = D**-0.5 if scale is None else scale
    if q_positions is not None:
        q = rope_fn(q, q_positions)
    if landmark_positions is not None:
        landmark_keys = rope_fn(landmark_keys, landmark_positions)
    s = jnp.einsum("bhqd,bhnd->bhqn", q.astype(jnp.float32), landmark_keys.astype(jnp.float32)) * scale
    valid = jnp.ones((1, 1, 1, n_blocks), bool)
    if num_valid is not None:
        nv = jnp.broadcast_to(jnp.asarray(num_valid), (q.shape[0],))
        valid = (jnp.arange(n_blocks)[None, :] >= n_blocks - nv[:, None])[:, None, None, :]  # [B,1,1,nb]
        s = jnp.where(valid, s, -jnp.inf)
    if mode != "per_token_and_head":  # the paper compares probabilities across heads / tokens
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.max(p, axis=1 if mode == "max_over_heads" else 2, keepdims=True)
        s = jnp.where(valid, jnp.broadcast_to(p, s.shape), -jnp.inf)  # invalid never beats an underflow
    _, idx = jax.lax.top_k(s, top_k)
    return jnp.sort(idx, axis=-1)


def chunk_select(
    q: jax.Array,
    landmark_keys: jax.Array,
    *,
    block_len: int,
    t_local: int,
    top_k: int,
    mode: str = "per_token_and_head",
    rope_fn: RopeFn | None = None,
    num_valid: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Step 1 at the stingy positions: the top-k cache entries of the last T_q of ``t_local`` local queries.

    q [batch, heads, T_q, D], landmark_keys [batch, heads, n_blocks, D] (pre-RoPE) -> ascending cache
    indices [batch, heads, T_q, top_k]. Only the landmark keys are read, so a caller that keeps the blocks
    elsewhere (host memory, the model's offload_kv) selects here, gathers the blocks itself and finishes
    with ``attend_retrieved``.
    """
    n_blocks = landmark_keys.shape[-2]
    pos = stingy_positions(n_blocks, top_k, block_len, t_local)
    return select_blocks(
        q, landmark_keys, top_k=top_k, mode=mode, rope_fn=rope_fn, q_positions=pos["local"][t_local - q.shape[2] :],
        landmark_positions=pos["landmark"], num_valid=num_valid, scale=scale,
    )


def attend_retrieved(
    q: jax.Array,
    k_local: jax.Array,
    v_local: jax.Array,
    ret_k: jax.Array,
    ret_v: jax.Array,
    idx: jax.Array,
    *,
    n_blocks: int,
    rope_fn: RopeFn | None = None,
    num_valid: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Step 2: grouped-softmax attention over [retrieved blocks ; local tokens] (module docstring).

    ret_k, ret_v [batch, heads, T_q, top_k, L, D]: the pre-RoPE cache entries ``idx`` [batch, heads, T_q,
    top_k] (ascending, from ``chunk_select``) of a cache of ``n_blocks`` entries, already gathered (on the
    device by ``retrieval_attention``, or from host memory). ``idx`` sets the stingy positions and, with
    ``num_valid``, which retrieved blocks are real. Returns out [batch, heads, T_q, D] (q.dtype).
    """
    rope_fn = rope_fn or _identity_rope
    B, H, Tq, top_k, L, D = ret_k.shape
    Tl = k_local.shape[2]
    scale = D**-0.5 if scale is None else scale
    pos = stingy_positions(n_blocks, top_k, L, Tl)
    q_pos = pos["local"][Tl - Tq :]
    ret_pos = (jnp.arange(top_k) + pos["recent"][idx]) * L  # [B, H, Tq, k]
    ret_pos = ret_pos[..., None] + jnp.arange(L)  # [B, H, Tq, k, L]
    qr = rope_fn(q, q_pos).astype(jnp.float32)
    ret_k = rope_fn(ret_k, ret_pos).astype(jnp.float32)
    k_loc = rope_fn(k_local, pos["local"]).astype(jnp.float32)

    # Block-shaped scores over [retrieved blocks ; local blocks (padded to whole blocks)].
    n_loc = -(-Tl // L)
    pad = n_loc * L - Tl
    s_ret = jnp.einsum("bhqd,bhqkld->bhqkl", qr, ret_k) * scale
    s_loc = jnp.einsum("bhqd,bhtd->bhqt", qr, k_loc) * scale
    s_loc = jnp.pad(s_loc, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(B, H, Tq, n_loc, L)
    s = jnp.concatenate([s_ret, s_loc], axis=3)
    if num_valid is None:
        ret_valid = jnp.ones((B, H, Tq, top_k), bool)
    else:
        nv = jnp.broadcast_to(jnp.asarray(num_valid), (B,))
        ret_valid = idx >= n_blocks - nv[:, None, None, None]
    loc_valid = jnp.broadcast_to((jnp.arange(n_loc * L) < Tl).reshape(n_loc, L), (B, H, Tq, n_loc, L))
    key_valid = jnp.concatenate([jnp.broadcast_to(ret_valid[..., None], s_ret.shape), loc_valid], axis=3)
    q_local = jnp.arange(Tl - Tq, Tl)
    w = grouped_softmax_weights(s, top_k + q_local // L, q_local % L, key_valid)

    out = jnp.einsum("bhqkl,bhqkld->bhqd", w[:, :, :, :top_k], ret_v.astype(jnp.float32))
    w_loc = w[:, :, :, top_k:].reshape(B, H, Tq, n_loc * L)[..., :Tl]
    return (out + jnp.einsum("bhqt,bhtd->bhqd", w_loc, v_local.astype(jnp.float32))).astype(q.dtype)


def gather_blocks(blocks: jax.Array, idx: jax.Array) -> jax.Array:
    """blocks [batch, heads, n, L, D], idx [batch, heads, T_q, k] -> [batch, heads, T_q, k, L, D]."""
    return jax.vmap(jax.vmap(lambda c, i: c[i]))(blocks, idx)


def retrieval_attention(
    q: jax.Array,
    k_local: jax.Array,
    v_local: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    *,
    top_k: int,
    mode: str = "per_token_and_head",
    rope_fn: RopeFn | None = None,
    landmark_keys: jax.Array | None = None,
    num_valid: jax.Array | None = None,
    scale: float | None = None,
    return_indices: bool = False,
):
    """Retrieve top-k cached blocks per (query, head) and attend over [retrieved ; local] (module doc):
    ``chunk_select``, a gather from the device cache, ``attend_retrieved``.

    Returns out [batch, heads, T_q, head_dim] (q.dtype), and the chosen cache indices
    [batch, heads, T_q, top_k] if ``return_indices``. Memory is T_q * top_k * L * head_dim per head.
    Raises UserError for bad shapes, an unknown mode, or top_k outside [1, n_blocks].
    """
    _check(q, k_local, v_local, cache_k, cache_v, top_k, mode)
    n_blocks, L = cache_k.shape[2:4]
    lk = cache_k[:, :, :, L - 1] if landmark_keys is None else landmark_keys
    idx = chunk_select(q, lk, block_len=L, t_local=k_local.shape[2], top_k=top_k, mode=mode, rope_fn=rope_fn,
                       num_valid=num_valid, scale=scale)
    out = attend_retrieved(q, k_local, v_local, gather_blocks(cache_k, idx), gather_blocks(cache_v, idx), idx,
                           n_blocks=n_blocks, rope_fn=rope_fn, num_valid=num_valid, scale=scale)
    return (out, idx) if return_indices else out
