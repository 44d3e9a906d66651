"""Titans training loss with the layers pipelined over segments (`model.titans.pipeline_layers: true`).

Every Titans variant keeps its recurrent state per layer: layer l's memory (and MAG / MAL's KV tail) after
segment s depends only on layer l's own state after segment s-1 and on layer l-1's output for segment s. No
state flows from a higher layer back to a lower one across segments (unlike RMT, whose memory tokens leave the
last layer and enter the first). So the (layer, segment) grid can run by anti-diagonals ("waves"): at wave w
every layer l with 0 <= w - l < n_segments processes segment s = w - l, all of them in ONE vmapped call of the
stacked block. That is n_segments + n_layers - 1 sequential block calls instead of n_segments x n_layers, and
the chunked-memory recurrence inside them runs once per wave for all active layers together (a batch of
up to n_layers times more sequences per chunk step). The arithmetic is exactly the segment-major order's
(tested equal, loss and gradients); only the schedule changes. The point is accelerators, where MAG's step is
dominated by many small per-chunk kernels (BENCHMARKS.md "GPU (H200)", session 11); on a CPU the tiny MAG step
measured 7-12% faster without remat and the same with remat=full.

The waves are traced as straight-line code (each wave slices the active layers' stacked parameters
statically), so no layer computes outside its segments. Document resets and truncated BPTT (`train.bptt_depth`)
apply per (layer, segment) exactly as run_segments applies them per segment. Needs every layer to be of one kind
(all memory layers, the default, or none).

Memory. A per-layer remat (`model.remat`) checkpoints each wave's vmapped block; plain jax.checkpoint did not hold
in straight-line code (XLA scheduled the recomputations early: the temporaries of remat=none), so the
recomputation runs inside a conditional fed by the cotangent (remat_after_cotangent). The layers' checkpoints of
every (layer, segment) are kept, i.e. `model.segment_remat` is not applied to the layers (the head and loss are
still checkpointed per segment under it), and a wave holds up to n_layers layers' activations at once: tiny MAG,
4 layers x 4 segments of 128, remat=full: 309 vs 116 MiB of temporaries; configs/paper/titans_170m.yaml MAG 37.0 vs
15.2 GiB per device (BENCHMARKS.md "Titans", session 12). Checkpointing whole waves as well (only carries and
layer-to-layer activations between waves) did not lower it (40.6 GiB): a wave's own recomputation holds its
active layers together. What those layers hold is mostly attention: in the tiny step's peak the largest buffers are
[active layers, batch, heads, queries, keys] float32 scores and their key/value concatenations.
Two options bound them: `model.attention_q_block` (attention a block of queries at a time) and
`model.titans.pipeline_group` = g (a wave of k layers runs as ceil(k / g) batched calls of consecutive layers).
Tiny MAG above, remat=full: temporaries 301 / 170 / 102 MiB at g = all / 2 / 1 (segment-major order 116). Paper MAG
per device: 170M 37.0 GiB, 28.0 with q_block 128, 20.4 with q_block 128 and g = 2 (segment-major 15.2); 760M 91.1
GiB (does not fit 80 GB), 64.6 with q_block 128 (segment-major 42.3). BENCHMARKS.md "Titans", session 13.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm.memory.titans_layers import AttnContext
from memlm.models.decoder import _REMAT_POLICIES
from memlm.models.lm import token_loss
from memlm.models.segments import reset_carry, segment_major


def _layer_carry(model, carry: dict, layer: int) -> dict:
    """Layer `layer`'s part of the model carry, as the block sees it: {"lc": {"kv": (k, v), "mem": {...}},
    "seen": [B]} (batch-major, no layer axis). Every layer is a memory layer or none is (pipelined_loss)."""
    one = slice(layer, layer + 1)
    lc = jax.tree.map(lambda a: a[0], model.layer_carry(carry, one, one if model.mem_layers else None))
    return {"lc": lc, "seen": carry["seen"] if model.n_tail else None}


def _model_carry(model, layers: list[dict]) -> dict:
    """Inverse of _layer_carry over all layers (stacked on axis 1)."""
    stack = lambda xs: jnp.stack(xs, axis=1)
    out = {}
    if model.n_tail:
        out["kv_k"] = stack([c["lc"]["kv"][0] for c in layers])
        out["kv_v"] = stack([c["lc"]["kv"][1] for c in layers])
        out["seen"] = layers[-1]["seen"]  # every layer has seen the same segments by now
    if model.mem_layers:
        depth = len(layers[0]["lc"]["mem"]["w"])
        out["mem_w"] = {f"w{i}": stack([c["lc"]["mem"]["w"][i] for c in layers]) for i in range(depth)}
        out["mem_s"] = {f"w{i}": stack([c["lc"]["mem"]["s"][i] for c in layers]) for i in range(depth)}
        out["conv"] = {k: stack([c["lc"]["mem"]["conv"][k] for c in layers]) for k in layers[0]["lc"]["mem"]["conv"]}
    return out


def _is_float0(x) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


def remat_after_cotangent(fn, policy):
    """jax.checkpoint(fn, policy) whose recomputation cannot start before the cotangent of fn's output exists.

    In straight-line code (the waves are not a loop) XLA may schedule every checkpoint's recomputation early,
    keeping all of them alive: with plain jax.checkpoint the pipelined tiny MAG step (4 layers x 4 segments,
    remat=full) needed the temporaries of remat=none, 865 vs 116 MiB. XLA:CPU drops optimization barriers before
    scheduling, so the backward runs as the branch of a conditional whose predicate XLA cannot fold and whose
    operands include the cotangent: the branch (recomputation + backward) runs as a unit once the cotangent exists.
    (On a GPU each such conditional reads its predicate on the host: one round trip per wave in the backward.)
    Integer inputs and outputs (float0 cotangents) stay outside the conditional."""
    checkpointed = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def f(*args):
        return fn(*args)

    def fwd(*args):
        return jax.vjp(checkpointed, *args)

    def bwd(vjp_fn, ct):
        ct_leaves, ct_tree = jax.tree.flatten(ct)
        keep = [i for i, x in enumerate(ct_leaves) if not _is_float0(x)]
        out_shapes = jax.eval_shape(vjp_fn, ct)
        out_leaves, out_tree = jax.tree.flatten(out_shapes)
        out_keep = [i for i, x in enumerate(out_leaves) if not _is_float0(x)]

        def backward(vjp_fn, kept):
            full = [np.zeros(x.shape, jax.dtypes.float0) for x in ct_leaves]
            for i, x in zip(keep, kept):
                full[i] = x
            grads = jax.tree.leaves(vjp_fn(jax.tree.unflatten(ct_tree, full)))
            return [grads[i] for i in out_keep]

        def skipped(vjp_fn, kept):  # never taken
            return [jnp.zeros(out_leaves[i].shape, out_leaves[i].dtype) for i in out_keep]

        kept = [ct_leaves[i] for i in keep]
        probe = kept[0].ravel()[0]
        always = jnp.isfinite(probe) | ~jnp.isfinite(probe)
        grads = jax.lax.cond(always, backward, skipped, vjp_fn, kept)
        full = [np.zeros(x.shape, jax.dtypes.float0) for x in out_leaves]
        for i, g in zip(out_keep, grads):
            full[i] = g
        return jax.tree.unflatten(out_tree, full)

    f.defvjp(fwd, bwd)
    return f


def pipelined_loss(model, carry: dict, batch: dict, bptt_depth: int = -1):
    """Same contract and values as Titans.loss: (summed CE, positions, final carry, mean stats)."""
    cfg = model.cfg
    if len(model.runs) != 1:
        raise ValueError("pipelined_loss needs every layer of one kind")  # Titans._check reports it to users
    is_mem = model.runs[0][0]
    blocks = model.decoder.blocks if is_mem else model.decoder.plain_blocks
    graphdef, stacked = nnx.split(blocks)
    n_layers = cfg.n_layers
    tokens = segment_major(batch["tokens"])                       # [n, B, L]
    targets, mask = segment_major(batch["targets"]), segment_major(batch["loss_mask"])
    reset = segment_major(batch["reset"])                         # [n, B]
    n, b, L = tokens.shape
    init = model.init_carry(b)
    inits = [_layer_carry(model, init, l) for l in range(n_layers)]  # what a document start resets each layer to
    dec = model.decoder
    lc_dtypes = jax.tree.map(lambda a: a.dtype, _layer_carry(model, carry, 0)["lc"])  # kept across waves

    def one_layer(st, h, ctx_arrays, lc):
        return nnx.merge(graphdef, st)(h, {k: AttnContext(*v) for k, v in ctx_arrays.items()}, lc)

    block = jax.vmap(one_layer)
    if cfg.remat in _REMAT_POLICIES:
        block = remat_after_cotangent(block, _REMAT_POLICIES[cfg.remat])

    def wave(w: int, layers: list[dict], below: dict, x_w):
        """One anti-diagonal: layers[l] = layer l's carry, below[l] = layer l-1's output for the segment layer l
        runs now. Returns (layers, below for the next wave, the last layer's output or None, stats)."""
        active = [l for l in range(n_layers) if 0 <= w - l < n]
        layers, below = list(layers), dict(below)
        ins, lcs, ctxs = [], [], []
        for l in active:
            s = w - l
            c = layers[l]
            if bptt_depth > 0 and s > 0 and s % bptt_depth == 0:  # run_segments' cut, per layer
                c = jax.tree.map(jax.lax.stop_gradient, c)
            c = reset_carry(c, inits[l], reset[s])
            layers[l] = c
            ctx = model._contexts({"seen": c["seen"]}, b, L)
            ctxs.append({k: (a.q_pos, a.kv_pos, a.mask) for k, a in ctx.items()})
            lcs.append(c["lc"])
            if l == 0:
                x = dec.add_positions(dec.embed(x_w), jnp.broadcast_to(jnp.arange(L), (b, L)))
            else:
                x = below[l]
            ins.append(x)
        stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
        group = cfg.titans.pipeline_group or len(active)
        top, stats = None, []
        for g0 in range(0, len(active), group):  # consecutive layers, one batched block call per group
            part = slice(g0, g0 + group)
            lo, hi = active[part][0], active[part][-1] + 1
            st = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], stacked)
            h, lc_new, st_stats = block(st, jnp.stack(ins[part]), stack(ctxs[part]), stack(lcs[part]))
            stats.append(st_stats)
            for i, l in enumerate(active[part]):
                new = jax.tree.map(lambda a, dt, i=i: a[i].astype(dt), lc_new, lc_dtypes)
                seen = jnp.minimum(layers[l]["seen"] + L, model.n_tail) if model.n_tail else None
                layers[l] = {"lc": new, "seen": seen}
                if l + 1 < n_layers:
                    below[l + 1] = h[i]
                elif l == n_layers - 1:
                    top = h[i]  # the last layer finished a segment
        return layers, below, top, stats

    # the final norm and the LM head's weights go in explicitly (a custom VJP cannot differentiate closed-over
    # values); the rest of the decoder (the blocks) is closed over and unused there
    head_params = nnx.Any(*(nnx.PathContains(name) for name in ("final_norm", "embedding", "lm_head")))
    dec_graph, dec_state, dec_rest = nnx.split(dec, head_params, ...)

    def head_loss(state, h, tgt, msk):
        d = nnx.merge(dec_graph, state, dec_rest)
        return token_loss(d.head(d.final_norm(h)), tgt, msk)

    if cfg.remat_segments:  # one segment's logits alive at a time, as segments_lm_loss under segment_remat
        head_loss = remat_after_cotangent(head_loss, jax.checkpoint_policies.nothing_saveable)
    layers = [_layer_carry(model, carry, l) for l in range(n_layers)]
    below, tops, stats = {}, [], []
    for w in range(n + n_layers - 1):
        x_w = tokens[min(w, n - 1)]
        layers, below, top, st = wave(w, layers, below, x_w)
        stats.extend(st)
        if top is not None:
            tops.append(top)
    if cfg.remat_segments:
        sums = [head_loss(dec_state, t, targets[s], mask[s]) for s, t in enumerate(tops)]
        loss_sum, count = sum(x[0] for x in sums), sum(x[1] for x in sums)
    else:  # one head call over all segments, as segments_lm_loss
        h = dec.final_norm(jnp.stack(tops))                       # [n, B, L, d]
        logits = dec.head(jnp.swapaxes(h, 0, 1).reshape(b, n * L, -1))
        loss_sum, count = token_loss(logits, batch["targets"].reshape(b, n * L), batch["loss_mask"].reshape(b, n * L))
    mean_stats = {k: jnp.mean(jnp.concatenate([s[k].reshape(-1) for s in stats])) for k in stats[0]} if is_mem else {}
    return loss_sum, count, _model_carry(model, layers), mean_stats
