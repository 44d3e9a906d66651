"""Segment recurrence: one `lax.scan` over segments with the memory state as an explicit carry.

Used by every segment-recurrent memory model (RMT, HMT, LM2, Titans-MAC). Per segment i:

    carry_in  = stop_gradient(carry) if (k > 0 and i > 0 and i % k == 0) else carry    # truncated BPTT
    carry_in  = where(reset[i], init_carry, carry_in)                                 # new document
    out_i, carry = remat(segment_fn)(carry_in, x_i)

The cut is applied before the reset so the learned initial memory always receives gradient (a cut at i=0
would zero it). Truncation depth k = -1 (or 0) means full backpropagation through all segments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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
    fn = jax.checkpoint(segment_fn, prevent_cse=False) if remat else segment_fn
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
