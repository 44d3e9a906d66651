"""Titans: learning to memorize at test time (Behrouz et al. 2025, arXiv 2501.00663), `model.kind: titans`.

`model.titans.variant`: mac (memory as a context, §4.1), mag (memory as a gate, §4.2), mal (memory as a
layer, §4.3). The layers are in memlm/memory/titans_layers.py; this file holds the model: carry, segment
loop, streaming. Every layer listed in `titans.memory_layers` (default: all) owns a neural memory; the
others are the same layer without it.

Carry (per sequence, leading dim = batch; reinstated from init_carry at document starts):
    mem_w   {"w0", ...}: memory weights, float32 [B, n_mem_layers, H, d_in, d_out]; M_0 is learned (a
            parameter broadcast over the batch), so the outer loss reaches it through every segment
    mem_s   momentum S ("surprise"), same shapes, zero at a document start
            (with titans.persistent_write, MAG / MAL: all of the carry starts where each layer's persistent
            tokens left it, x~ = [P || x] of eq. 26 / 29; MAL's KV tail then ends with P's keys/values)
    conv    depthwise-conv tails of the q/k/v streams, [B, n_mem_layers, K-1, d] (K = titans.conv_kernel)
    kv_k, kv_v, seen   (MAG, MAL) pre-RoPE keys/values of the last W-1 tokens [B, n_layers, W-1, kvh, hd]
            and how many of them belong to the current document [B] (W = titans.window)
so streaming segment by segment equals one pass over the whole sequence. The state is per layer (no layer's
state reaches a lower layer), which `titans.pipeline_layers` uses to train the layers pipelined over segments
(memlm/memory/titans_pipeline.py: the same values, fewer sequential block calls).

Causality, the three variants (tested: logits of token t never change when tokens > t change):
  * MAC is segment-recurrent (models/segments.py::run_segments): h = M*_{t-1}(q) uses the memory at the
    segment start; inside the segment token j attends to h_{<=j} and tokens <= j only; the update uses the
    attention outputs y, and the output gate of token j reads M_j = memory written with y_1..y_j (the
    kernel's retrieve_after_update=True at token granularity: within a chunk the gradients are taken at the
    chunk-start weights, but the weights token j reads only contain tokens <= j).
  * MAG / MAL: token t reads M_{t-1}, the memory written with tokens < t (retrieve_after_update=False).
    At chunk granularity the per-token gradients inside a chunk use the chunk-start weights (§3.2), and
    token t's weights contain only the chunk's tokens before t: finer than reading the chunk-start memory
    and still causal. The sliding window sees the W-1 previous tokens (carried across segments) and itself.
Positions: RoPE with segment-local positions (relative, so equal to absolute ones up to rounding); the batch
`positions` are not used, so any stream length works. arch=gpt2 (an imported GPT-2 backbone): no RoPE; the
learned table wpe is added to the token embeddings at segment-local positions 0..L-1 (as RMT feeds GPT-2
segments), so streams are not limited to max_seq_len; LayerNorm with bias and the GELU FFN come with the arch.
For MAG / MAL that is an approximation at segment starts: the sliding window reaches into the previous segment,
whose carried keys hold positions up to L-1, so the first tokens of a segment see keys labelled with later
positions than their own (RoPE backbones have no such effect).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.errors import UserError
from memlm.memory.titans_layers import AttnContext, TitansBlock
from memlm.memory.titans_pipeline import pipelined_loss
from memlm.models.decoder import _REMAT_POLICIES, Decoder, make_stacked_blocks
from memlm.models.lm import register_model
from memlm.models.segments import segment_major, segments_lm_loss

CONV_STREAMS = {"mac": ("qx", "qy", "ky", "vy"), "mag": ("q", "k", "v"), "mal": ("q", "k", "v")}


def _check(cfg) -> list[int]:
    """UserErrors for settings Config cannot see; returns the sorted memory layers."""
    tc = cfg.titans
    if cfg.d_model % tc.memory_heads:
        raise UserError(f"model.titans.memory_heads ({tc.memory_heads}) does not divide model.d_model "
                        f"({cfg.d_model})")
    layers = list(range(cfg.n_layers)) if tc.memory_layers is None else sorted(set(tc.memory_layers))
    bad = [i for i in layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise UserError(f"model.titans.memory_layers {bad} out of range for model.n_layers={cfg.n_layers}")
    if tc.memory_layers is not None and len(layers) != len(tc.memory_layers):
        raise UserError(f"model.titans.memory_layers {tc.memory_layers} lists a layer twice")
    if tc.persistent_write and (tc.variant == "mac" or not tc.num_persistent):
        raise UserError("model.titans.persistent_write needs variant mag or mal (MAC's persistent tokens are part "
                        f"of every segment's attention, eq. 21) and num_persistent > 0; got variant={tc.variant}, "
                        f"num_persistent={tc.num_persistent}")
    if tc.pipeline_layers and 0 < len(layers) < cfg.n_layers:
        raise UserError(f"model.titans.pipeline_layers needs every layer to have a memory or none; "
                        f"memory_layers is {tc.memory_layers} of {cfg.n_layers} layers")
    return layers


def _slots(cfg) -> dict[int, tuple[str, int]]:
    """Layer i -> (its stack, its index there): memory layers in `blocks`, the others in `plain_blocks`."""
    mem = set(_check(cfg))
    return {i: ("blocks" if i in mem else "plain_blocks", sum(1 for g in range(i) if (g in mem) == (i in mem)))
            for i in range(cfg.n_layers)}


def from_plain_backbone(cfg, flat: dict) -> tuple[dict, list[str]]:
    """A plain decoder's flat tensors (an imported HF Llama / GPT-2: `decoder.blocks.{i}.*`) -> Titans names:
    memory layer i -> `decoder.blocks.{j}` (j = its index among the memory layers), the others ->
    `decoder.plain_blocks.{j}`. Attention, norms and FFN all carry over; nothing is dropped."""
    slots = _slots(cfg)
    out = {}
    for name, x in flat.items():
        parts = name.split(".")
        if parts[:2] == ["decoder", "blocks"] and parts[2].isdigit():
            stack, j = slots[int(parts[2])]
            name = ".".join(["decoder", stack, str(j), *parts[3:]])
        out[name] = x
    return out, []


def plain_layout(cfg) -> tuple[dict[tuple[str, int], int], list[int], str]:
    """For `memlm export --format hf` (the inverse of from_plain_backbone): (stack name, index in it) -> layer
    index of the plain decoder; no layer loses its FFN; and a note for the export's README."""
    layer = {slot: i for i, slot in _slots(cfg).items()}
    tc = cfg.titans
    note = (f"The Hugging Face model holds Titans-{tc.variant.upper()}'s attention, norms and FFN weights but runs "
            "them as a plain decoder with full causal attention: the neural memory, the persistent tokens, the "
            "gates and Titans' attention pattern (MAC: per segment; MAG: a sliding window of "
            f"{tc.window}) are not part of it.")
    return layer, [], note


class TitansDecoder(Decoder):
    """The baseline Decoder's embedding / final norm / head; `blocks` = the memory layers (stacked), and
    `plain_blocks` = the layers without memory when titans.memory_layers is a strict subset."""

    def __init__(self, cfg, rngs: nnx.Rngs, mem_layers: list[int]):
        super().__init__(cfg, rngs)
        n_mem = len(mem_layers)
        self.blocks = None
        if n_mem:
            self.blocks = make_stacked_blocks(cfg, rngs, n_mem, functools.partial(TitansBlock, memory=True))
        if n_mem < cfg.n_layers:
            self.plain_blocks = make_stacked_blocks(cfg, rngs, cfg.n_layers - n_mem,
                                                    functools.partial(TitansBlock, memory=False))


class Titans(nnx.Module):
    stateless = False

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.mem_layers = _check(cfg)
        self.decoder = TitansDecoder(cfg, rngs, self.mem_layers)
        # runs of consecutive layers of one kind: (is_memory, global [g0, g1), stack [s0, s1))
        runs, counts = [], [0, 0]
        for i in range(cfg.n_layers):
            is_mem = i in self.mem_layers
            if runs and runs[-1][0] == is_mem:
                runs[-1][2] += 1
                runs[-1][4] += 1
            else:
                k = counts[is_mem]
                runs.append([is_mem, i, i + 1, k, k + 1])
            counts[is_mem] += 1
        self.runs = [tuple(r) for r in runs]

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def n_tail(self) -> int:
        """Carried KV-tail length: W-1 for MAG / MAL, 0 for MAC (segment-local attention)."""
        return 0 if self.cfg.titans.variant == "mac" else self.cfg.titans.window - 1

    def _conv_streams(self) -> tuple[str, ...]:
        tc = self.cfg.titans
        if tc.conv_kernel == 1:
            return ()
        streams = CONV_STREAMS[tc.variant]
        return streams[1:] if tc.variant == "mac" and tc.num_longterm else streams

    # ---- carry protocol ----------------------------------------------------------------------------------
    def init_carry(self, batch: int) -> dict:
        cfg, tc = self.cfg, self.cfg.titans
        cdt = jnp.dtype(cfg.dtype)
        carry = {}
        if self.n_tail:
            shape = (batch, cfg.n_layers, self.n_tail, cfg.kv_heads, cfg.hd)
            carry.update(kv_k=jnp.zeros(shape, cdt), kv_v=jnp.zeros(shape, cdt), seen=jnp.zeros((batch,), jnp.int32))
        if self.mem_layers:
            m0 = self.decoder.blocks.memory.m0()  # stacked: [n_mem, H, d_in, d_out]
            w = {f"w{i}": jnp.broadcast_to(m.astype(jnp.float32), (batch,) + m.shape) for i, m in enumerate(m0)}
            carry["mem_w"] = w
            carry["mem_s"] = {k: jnp.zeros(v.shape, jnp.float32) for k, v in w.items()}
            n_mem, K = len(self.mem_layers), tc.conv_kernel
            carry["conv"] = {s: jnp.zeros((batch, n_mem, K - 1, cfg.d_model), cdt) for s in self._conv_streams()}
        if tc.persistent_write:
            carry.update(self._persistent_carry(batch, carry))
        return carry

    def _persistent_carry(self, batch: int, carry: dict) -> dict:
        """titans.persistent_write: the carry entries after every layer's persistent tokens (eq. 26 / 29), from
        TitansBlock.persistent_state of each stack (vmapped over its layers), broadcast over the batch."""
        def per_layer(blocks) -> dict:  # leaves [n_stack, 1, ...]
            graphdef, stacked = nnx.split(blocks)
            return jax.vmap(lambda st: nnx.merge(graphdef, st).persistent_state())(stacked)

        rows = lambda a, dt: jnp.broadcast_to(jnp.swapaxes(a, 0, 1), (batch,) + a.shape[:1] + a.shape[2:]).astype(dt)
        stacks = {"blocks": per_layer(self.decoder.blocks) if self.mem_layers else None,
                  "plain_blocks": per_layer(self.decoder.plain_blocks) if len(self.mem_layers) < self.cfg.n_layers
                  else None}
        new = {}
        if self.mem_layers:
            mem = stacks["blocks"]["mem"]
            new["mem_w"] = {f"w{i}": rows(w, jnp.float32) for i, w in enumerate(mem["w"])}
            new["mem_s"] = {f"w{i}": rows(s, jnp.float32) for i, s in enumerate(mem["s"])}
            new["conv"] = {n: rows(mem["conv"][n], c.dtype) for n, c in carry["conv"].items()}
        if self.cfg.titans.variant == "mal" and self.n_tail:  # P's keys/values end the KV tail (the first window)
            n_p, n = self.cfg.titans.num_persistent, self.n_tail
            m = min(n_p, n)
            for i, name in enumerate(("kv_k", "kv_v")):
                kv = jnp.stack([stacks[stack]["kv"][i][j] for stack, j in _slots(self.cfg).values()])
                tail = jnp.zeros(kv.shape[:2] + (n,) + kv.shape[3:], kv.dtype)
                tail = tail.at[:, :, n - m :].set(kv[:, :, n_p - m :])
                new[name] = rows(tail, carry[name].dtype)
            new["seen"] = jnp.full((batch,), m, jnp.int32)
        return new

    def carry_axes(self) -> dict:
        axes = {}
        if self.n_tail:
            kv = ("batch", "layers", "act_seq", None, None)
            axes.update(kv_k=kv, kv_v=kv, seen=("batch",))
        if self.mem_layers:
            mem = ("batch", "layers", "titans_mem", None, None)
            n = self.cfg.titans.memory_depth
            axes["mem_w"] = {f"w{i}": mem for i in range(n)}
            axes["mem_s"] = {f"w{i}": mem for i in range(n)}
            axes["conv"] = {s: ("batch", "layers", None, "act_embed") for s in self._conv_streams()}
        return axes

    # ---- attention layouts -------------------------------------------------------------------------------
    def _contexts(self, carry: dict, b: int, L: int) -> dict:
        tc = self.cfg.titans
        bc = lambda x: jnp.broadcast_to(x, (b,) + x.shape[-1:]) if x.ndim == 1 else x
        j = jnp.arange(L)
        if tc.variant == "mac":
            causal = j[None, :] <= j[:, None]
            ctx = {"attn": AttnContext(bc(j), bc(j), jnp.broadcast_to(causal, (b, 1, L, L)))}
            n_h = tc.num_longterm or L
            h_vis = jnp.ones((L, n_h), bool) if tc.num_longterm else causal
            mask = jnp.concatenate([h_vis, causal], axis=1)
            kv_pos = jnp.concatenate([jnp.arange(n_h), n_h + j])
            ctx["mac_mem"] = AttnContext(bc(n_h + j), bc(kv_pos), jnp.broadcast_to(mask, (b, 1, L, n_h + L)))
            return ctx
        n = self.n_tail
        qi, s = n + j, jnp.arange(n + L)
        band = (s[None, :] <= qi[:, None]) & (s[None, :] > qi[:, None] - tc.window)            # [L, n+L]
        valid = s[None, :] >= n - (carry["seen"][:, None] if n else 0)                          # [B, n+L]
        mask = (band[None] & valid[:, None, :])[:, None]
        return {"attn": AttnContext(bc(qi), bc(s), mask)}

    # ---- layers ------------------------------------------------------------------------------------------
    def _scan(self, blocks, s0: int, s1: int, n_stack: int, x, ctx, lc):
        graphdef, stacked = nnx.split(blocks)
        if (s0, s1) != (0, n_stack):
            stacked = jax.tree.map(lambda a: a[s0:s1], stacked)

        def body(h, xs):
            st, c = xs
            h, c, stats = nnx.merge(graphdef, st)(h, ctx, c)
            return h, (c, stats)

        if self.cfg.remat in _REMAT_POLICIES:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        return jax.lax.scan(body, x, (stacked, lc))

    def layer_carry(self, carry: dict, layers: slice, mem_layers: slice | None) -> dict:
        """A block's carry for a run of layers, layer-major: {"kv": (k, v) of `layers` (with a KV tail),
        "mem": {"w": (...), "s": (...), "conv": {...}} of `mem_layers` (indices among the memory layers; None: no
        memory)}; every array [n, B, ...] from the model carry's [B, n_layers or n_memory_layers, ...]."""
        lm = lambda a: jnp.swapaxes(a, 0, 1)
        lc = {}
        if self.n_tail:
            lc["kv"] = (lm(carry["kv_k"][:, layers]), lm(carry["kv_v"][:, layers]))
        if mem_layers is not None:
            sl = lambda d: {k: lm(v[:, mem_layers]) for k, v in d.items()}
            ws, ss = sl(carry["mem_w"]), sl(carry["mem_s"])
            lc["mem"] = {"w": tuple(ws[f"w{i}"] for i in range(len(ws))),
                         "s": tuple(ss[f"w{i}"] for i in range(len(ss))), "conv": sl(carry["conv"])}
        return lc

    def _layers(self, x, carry: dict, ctx: dict):
        """All layers in order; returns (h, new carry, stats). Carry slices are moved to layer-major."""
        cfg = self.cfg
        lm = lambda a: jnp.swapaxes(a, 0, 1)
        kv_out, mem_out, stats = [], [], []
        n_mem = len(self.mem_layers)
        for is_mem, g0, g1, s0, s1 in self.runs:
            lc = self.layer_carry(carry, slice(g0, g1), slice(s0, s1) if is_mem else None)
            if is_mem:
                blocks, n_stack = self.decoder.blocks, n_mem
            else:
                blocks, n_stack = self.decoder.plain_blocks, cfg.n_layers - n_mem
            x, (lc, st) = self._scan(blocks, s0, s1, n_stack, x, ctx, lc)
            if self.n_tail:
                kv_out.append(lc["kv"])
            if is_mem:
                mem_out.append(lc["mem"])
                stats.append(st)
        new = {}
        cat = lambda xs, dt: lm(jnp.concatenate(xs, axis=0)).astype(dt)
        if self.n_tail:
            cdt = carry["kv_k"].dtype
            new["kv_k"] = cat([k for k, _ in kv_out], cdt)
            new["kv_v"] = cat([v for _, v in kv_out], cdt)
            new["seen"] = jnp.minimum(carry["seen"] + x.shape[1], self.n_tail)
        if mem_out:
            depth = len(mem_out[0]["w"])
            new["mem_w"] = {f"w{i}": cat([m["w"][i] for m in mem_out], jnp.float32) for i in range(depth)}
            new["mem_s"] = {f"w{i}": cat([m["s"][i] for m in mem_out], jnp.float32) for i in range(depth)}
            new["conv"] = {k: cat([m["conv"][k] for m in mem_out], v.dtype) for k, v in carry["conv"].items()}
        stats = {k: jnp.mean(jnp.concatenate([s[k] for s in stats])) for k in stats[0]} if stats else {}
        return x, new, stats

    # ---- one segment -------------------------------------------------------------------------------------
    def segment_hidden(self, carry: dict, tokens: jax.Array) -> tuple[tuple[jax.Array, dict], dict]:
        """tokens [B, L] (L a multiple of titans.chunk_size) -> ((final-normed hidden [B, L, d], stats), carry)."""
        b, L = tokens.shape
        if L % self.cfg.titans.chunk_size:
            raise UserError(f"model.titans.chunk_size ({self.cfg.titans.chunk_size}) does not divide the "
                            f"segment length ({L})")
        dec = self.decoder
        x = dec.add_positions(dec.embed(tokens), jnp.broadcast_to(jnp.arange(L), (b, L)))  # wpe: gpt2 only
        h, carry, stats = self._layers(x, carry, self._contexts(carry, b, L))
        return (dec.final_norm(h), stats), carry

    def segment(self, carry: dict, tokens: jax.Array) -> tuple[jax.Array, dict, dict]:
        """tokens [B, L] -> (logits f32 [B, L, vocab], new carry, stats)."""
        (h, stats), carry = self.segment_hidden(carry, tokens)
        return self.decoder.head(h), carry, stats

    # ---- training / inference ----------------------------------------------------------------------------
    def loss(self, carry, batch, bptt_depth: int = -1):
        if self.cfg.titans.pipeline_layers:  # the same values, the layers run by anti-diagonals (titans_pipeline.py)
            return pipelined_loss(self, carry, batch, bptt_depth)
        init = self.init_carry(batch["tokens"].shape[0])
        loss_sum, count, stats, carry = segments_lm_loss(self.segment_hidden, self.decoder.head, carry, init,
                                                         segment_major(batch["tokens"]), batch, batch["loss_mask"],
                                                         self.cfg, bptt_depth)
        return loss_sum, count, carry, jax.tree.map(jnp.mean, stats)

    def segment_logits(self, carry, tokens, positions=None, reset=None):
        logits, carry, _ = self.segment(carry, tokens)
        return logits, carry


register_model("titans", Titans)
