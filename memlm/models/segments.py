"""Segment recurrence: one `lax.scan` over segments with the memory state as an explicit carry.

Used by every segment-recurrent memory model (RMT, HMT, LM2, Titans-MAC). Per segment i:

    carry_in  = stop_gradient(carry) if (k > 0 and i > 0 and i % k == 0) else carry    # truncated BPTT
    carry_in  = where(reset[i], init_carry, carry_in)                                 # new document
    out_i, carry = remat(segment_fn)(carry_in, x_i)

The cut is applied before the reset so the learned initial memory always receives gradient (a cut at i=0
would zero it). Truncation depth k = -1 (or 0) means full backpropagation through all segments.
The cut is in blocks of k segments: segment i's loss reaches back through the memory of i mod k earlier
segments (k = 1: none). Neither reference truncates this way: LM-RMT's mem_backprop_depth keeps a sliding window
of the last k memory states at every step of its stream, and the RMT code's k2 (babilong-release) detaches the
memory entering every segment except the last k2 - 1, so only the last k2 segments form a gradient chain. The
BABILong recipes train with full BPTT (k2 = -1), the default here.

`segments_lm_loss` adds the LM head and cross-entropy. Where they run is a memory/speed choice, not math:
with the per-segment checkpoint (model.segment_remat under a per-layer remat) inside each checkpointed segment,
so only one segment's logits are alive at a time and activation memory stays flat in the number of segments;
without it once over all segments after the scan (n_segments x larger matmuls; the logits then take the
full-sequence baseline's footprint, which is what that setting keeps anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from memlm.models.lm import token_loss

Carry = Any


def reset_carry(carry: Carry, init_carry: Carry, reset: jax.Array) -> Carry:
    """Replace batch rows where reset [batch] is True with the initial carry (leading dim = batch)."""

    def pick(c, c0):
        r = reset.reshape(reset.shape + (1,) * (c.ndim - 1))
        return jnp.where(r, jnp.broadcast_to(c0, c.shape).astype(c.dtype), c)

    return jax.tree.map(pick, carry, init_carry)


def run_segments(
    segment_fn: Callable[[Carry, Any], tuple[Any, Carry]],
    carry: Carry,
    init_carry: Carry,
    xs: Any,
    reset: jax.Array,
    bptt_depth: int = -1,
    remat: bool = True,
    unroll: bool = False,
) -> tuple[Any, Carry]:
    """Scan `segment_fn(carry, x_i) -> (out_i, carry)` over the leading (segment) axis of `xs`.

    xs: pytree with leading axis n_segments (segment-major); reset: bool [n_segments, batch].
    unroll: unroll the scan fully (model.segment_unroll; a while loop otherwise). Returns (stacked outputs
    [n_segments, ...], final carry).
    """
    # prevent_cse=False is only safe inside a loop: unrolled, XLA could merge the recomputation with the forward
    fn = jax.checkpoint(segment_fn, prevent_cse=not unroll) if remat else segment_fn
    n = reset.shape[0]

    def body(c, inp):
        i, x, r = inp
        if bptt_depth > 0:
            cut = (i > 0) & (i % bptt_depth == 0)
            c = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), c)
        c = reset_carry(c, init_carry, r)
        out, c = fn(c, x)
        return c, out

    carry, outs = jax.lax.scan(body, carry, (jnp.arange(n), xs, reset), unroll=max(n, 1) if unroll else 1)
    return outs, carry


def segment_major(x: jax.Array) -> jax.Array:
    """[batch, n_segments, ...] -> [n_segments, batch, ...]."""
    return jnp.swapaxes(x, 0, 1)


def segments_lm_loss(
    segment_hidden: Callable[[Carry, Any], tuple[tuple[jax.Array, dict], Carry]],
    head: Callable[[jax.Array], jax.Array],
    carry: Carry,
    init_carry: Carry,
    xs: Any,
    batch: dict,
    loss_mask: jax.Array,
    cfg,
    bptt_depth: int = -1,
) -> tuple[jax.Array, jax.Array, dict, Carry]:
    """run_segments plus the LM loss. segment_hidden(carry, x_i) -> ((final-normed text hidden [B, L, d], stats),
    carry); head: [B, T, d] -> logits [B, T, vocab]; xs: segment-major inputs; batch["targets"], loss_mask:
    [B, n_segments, L]; cfg: the model config (remat_segments, unroll_segments).

    Returns (summed CE, number of positions, stats stacked over segments [n_segments, ...], final carry).
    """
    reset = segment_major(batch["reset"])
    run = lambda fn, x: run_segments(fn, carry, init_carry, x, reset, bptt_depth, cfg.remat_segments,
                                     cfg.unroll_segments)
    if cfg.remat_segments:  # head + loss inside the checkpointed segment: one segment's logits at a time

        def seg_fn(c, x):
            x_i, targets, mask = x
            (h, stats), c = segment_hidden(c, x_i)
            return (token_loss(head(h), targets, mask), stats), c

        ((sums, counts), stats), carry = run(seg_fn, (xs, segment_major(batch["targets"]), segment_major(loss_mask)))
        return jnp.sum(sums), jnp.sum(counts), stats, carry
    (h, stats), carry = run(segment_hidden, xs)  # h [n, B, L, d]
    n, b, seg_len, d = h.shape
    logits = head(jnp.swapaxes(h, 0, 1).reshape(b, n * seg_len, d))  # batch stays the leading (split) axis
    loss_sum, count = token_loss(logits, batch["targets"].reshape(b, n * seg_len), loss_mask.reshape(b, n * seg_len))
    return loss_sum, count, stats, carry
