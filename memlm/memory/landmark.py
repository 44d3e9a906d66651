"""Landmark Attention (Mohtashami & Jaggi 2023, arXiv 2305.16300): blocks summarised by landmark tokens.

Layout (Sec. 3.1). The model, not the data, inserts a landmark after every block of b = landmark.block_size
regular tokens: the landmark's input is a learned embedding `landmark` [d_model] (no vocabulary id is taken).
A sequence of T regular tokens becomes T / b blocks of L = b + 1 positions, the landmark last in each block.

Training forward (stateless within a step, like the baseline): the whole [n_segments * segment_len] sequence
of a batch row goes through the backbone at once, every attention layer being the grouped softmax of
pallas_kernels/landmark_attention (Eq. 3; `model.attention_impl=xla` picks the Pallas kernel where it can and
the blockwise XLA one otherwise, e.g. on CPU; `reference` the dense spec). For a query in block n:
own block causally + the landmarks of blocks c < n in one softmax; a regular key of block c gets
p(landmark_c) * softmax_within_c. RoPE positions are the step-local index of the inserted sequence
(relative, so identical scores to document positions, and bounded by the training length).
Documents start at segment boundaries (hence block boundaries). When a row holds two documents, attention is
cut at the boundary by appending one-hot document features to q and k: q' = [q * scale, -BIG (1 - onehot(doc_q))],
k' = [k, onehot(doc_k)], so same-document scores are unchanged *exactly* (the added terms are exact zeros) and
cross-document scores drop by BIG = 2^15 (exp underflows to 0, in the landmark and the within-block softmax
alike). That branch (head_dim + n_segments) runs only for batches with a document start inside the step
(lax.cond), so the common case keeps the native head_dim the Pallas kernels want.

arch=gpt2 (learned absolute positions, GPT-2's wpe; not in the paper, which uses LLaMA). RoPE lets the paper
re-position retrieved keys at will; learned positions are added to the input and baked into every key, so
they cannot be remapped. memlm therefore gives learned positions *per segment*: in training each segment's
inserted tokens get positions 0 .. segment_len (b+1)/b - 1 (restarting at every segment), and a streamed chunk
(= one segment) gets the same, while attention across segments (training) and to retrieved blocks (inference)
carries no position at all (no RoPE). Training and retrieval then see identical positions, retrieving every
cached block reproduces the training forward exactly (tests/memory/test_landmark.py), and the table only
needs data.segment_len (b+1)/b rows (checked in config: model.max_seq_len). What is lost against RoPE: order
between blocks of different segments is known only from the causal structure, not from positions.

Loss. Regular positions predict the next regular token, as in the baseline. `include_landmark_in_loss=true`
also scores each landmark output against the target of the last regular token of its block, i.e. the next
regular token after the landmark (its loss_mask entry too); it adds n_blocks tokens to the count.
The default (false) matches the paper's flash path.

Retrieval inference (Sec. 3.2-3.3, the official `mem_cache.py`; pallas_kernels/landmark_attention/retrieval.py):
`segment_logits(carry, tokens [B, segment_len], positions)` streams one segment (= the paper's chunk; the
paper uses mid_length 250). Each layer keeps a cache of the last `cache_blocks` complete blocks, keys stored
BEFORE RoPE, values, landmark key = the block's last key. Queries score the cached landmark keys, take the
top-k blocks per (token, head) (`retrieval_mode`: per_token_and_head | max_over_heads | max_over_tokens),
and attend over [retrieved blocks ; current chunk] with the grouped softmax, RoPE applied after retrieval at
the paper's stingy positions: the k most recent cache entries keep slots 1..k, older ones share slot 0,
the chunk starts at (k + 1) L. Every position is < (k + 1) L + segment_len (b+1)/b, whatever the context.
max_over_tokens picks one block set per (chunk, head) from the max over the chunk's queries, as the paper's
code does, so a token's retrieved blocks depend on later tokens of its chunk (and, in LoadedModel.generate,
on the right-padding of the open chunk): only per_token_and_head and max_over_heads are causal.
The incomplete-block buffer of the paper is always empty here: segment_len is a multiple of b and
LoadedModel commits only full segments (a partial segment is re-run, right-padded, and its carry dropped).

Cache = a FIFO of the last cache_blocks blocks kept in chronological order, valid entries right-aligned
(num_blocks counts them): the layout retrieval.py takes. Appending is a concat-and-slice; LoadedModel does
not donate the carry, so the output buffer is a copy whatever the layout, and a ring buffer would add a
roll on every read. Memory is constant in the context length: 2 n_layers B kv_heads cache_blocks L hd.

Carry. Training is stateless, so `init_carry` is only {"num_blocks": zeros [batch]} (an empty cache: the
train loop, checkpoints and `memlm eval lm`, which runs `loss` at training shapes, carry just that). The first
`segment_logits` call allocates the K/V arrays; later calls carry {"num_blocks", "k", "v"} with
k, v: [n_layers, batch, kv_heads, cache_blocks, L, head_dim] (one extra jit trace for the first segment).

offload_kv (Sec. 3.3: the paper keeps the K/V cache on the CPU and only the landmark keys on the GPU).
Retrieval gathers blocks by data-dependent indices, which one jit cannot read from host memory, so with
offload_kv LoadedModel (step_segment / logits / generate, hence `memlm eval pg19` and BABILong) calls the
non-jitted `stream_segment` hook (`host_stream`) instead of a jitted segment_logits. Per layer: a jit
computes the chunk's q, k, v and the top-k entries from the device landmark keys (retrieval.chunk_select,
same stingy positions); the host copies each row's distinct chosen blocks (HostKV.gather_unique, U rounded
up to a power of two so the next jit compiles O(log cache_blocks) times) to the device; a second jit gathers
them per (query, head) and runs retrieval.attend_retrieved (the math of the on-device path) and the MLP.
After the last layer the chunk's blocks go to the host FIFO and their landmark keys to the device FIFO.
Carry: {"num_blocks", "landmark_k" [n_layers, batch, kv_heads, cache_blocks, head_dim] (device), "host_kv":
HostKV (numpy, never modified: appending shares the older chunk arrays, so an old carry stays valid)}. Device
memory per carry: 1/(2L) of the on-device cache. Same blocks and, up to float32 rounding across the jit
boundaries, the same logits as segment_logits (tests/memory/test_landmark_offload.py). The cost is one
device->host sync per layer and chunk (the chosen indices). Training and `memlm eval lm` (`loss` at training
shapes, no retrieval) ignore offload_kv; segment_logits itself always keeps the cache on the device.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm.errors import UserError
from memlm.layers.rope import apply_rope, rope_frequencies
from memlm.models.decoder import _REMAT_POLICIES, Decoder
from memlm.models.lm import register_model, token_loss
from memlm.sharding import constrain
from pallas_kernels.landmark_attention import landmark_attention, retrieval_attention
from pallas_kernels.landmark_attention.retrieval import attend_retrieved, chunk_select, gather_blocks

DOC_BIG = 2.0**15  # score penalty across documents: exp(-2^15) underflows to exactly 0 in float32


def rope_any(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE (rotate-half, as memlm.layers.rope.apply_rope) for any layout: x [..., D], positions broadcast to
    x.shape[:-1]. The `rope_fn` handed to retrieval.py, which rotates keys after retrieval."""
    hd = x.shape[-1]
    pos = jnp.broadcast_to(positions, x.shape[:-1]).astype(jnp.float32)
    ang = pos[..., None] * rope_frequencies(hd, theta)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attended_tokens(block_size: int, top_k: int, segment_len: int, context: int, cache_blocks: int) -> dict:
    """Keys one query touches per layer at the end of a `context`-token stream (Sec. 3.3 cost model):
    every cached landmark is scored, top_k blocks of b+1 keys are attended, plus the chunk so far (at most
    segment_len (b+1)/b keys). Full attention touches `context` keys."""
    L = block_size + 1
    cached = min(max(context - segment_len, 0) // block_size, cache_blocks)
    local = segment_len // block_size * L
    return {"landmarks_scored": cached, "retrieved": min(top_k, cached) * L, "local_max": local,
            "total_max": cached + min(top_k, cached) * L + local, "full_attention": context}


def _no_rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """arch=gpt2: keys and queries carry their learned positions from the input; retrieval adds none."""
    return x


class Landmark(nnx.Module):
    """The decoder (arch llama or gpt2) with landmark tokens and grouped-softmax attention (module docstring)."""

    stateless = False

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.b = cfg.landmark.block_size
        self.decoder = Decoder(cfg, rngs)
        self.landmark = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.d_model,), jnp.dtype(cfg.param_dtype)) * cfg.init_std,
            sharding=("embed",),
        )

    # ---- carry protocol ------------------------------------------------------------------------------------
    def init_carry(self, batch: int) -> dict:
        """An empty block cache: {"num_blocks": int32 [batch] zeros}; K/V arrays are allocated on first use."""
        return {"num_blocks": jnp.zeros((batch,), jnp.int32)}

    def carry_axes(self) -> dict:
        return {"num_blocks": ("batch",)}

    def _empty_cache(self, batch: int) -> dict:
        c = self.cfg
        shape = (c.n_layers, batch, c.kv_heads, c.landmark.cache_blocks, self.b + 1, c.hd)
        z = jnp.zeros(shape, self.decoder.compute_dtype)
        return {"num_blocks": jnp.zeros((batch,), jnp.int32), "k": z, "v": z}

    # ---- layout --------------------------------------------------------------------------------------------
    def insert_landmarks(self, x: jax.Array) -> jax.Array:
        """[B, T, d] regular embeddings -> [B, T/b * (b+1), d] with the landmark embedding after each block."""
        B, T, d = x.shape
        n = T // self.b
        lm = jnp.broadcast_to(self.landmark[...].astype(x.dtype), (B, n, 1, d))
        return jnp.concatenate([x.reshape(B, n, self.b, d), lm], axis=2).reshape(B, n * (self.b + 1), d)

    def split_landmarks(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, n (b+1), d] -> (regular [B, n b, d], landmark [B, n, d])."""
        B, Ti, d = h.shape
        n = Ti // (self.b + 1)
        hb = h.reshape(B, n, self.b + 1, d)
        return hb[:, :, : self.b].reshape(B, n * self.b, d), hb[:, :, self.b]

    def embed_chunk(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, Ls] of one segment / chunk -> [B, Ls/b (b+1), d] with landmarks (and, for arch=gpt2, the
        learned positions of the chunk: 0 .. Ls/b (b+1) - 1, as in training), in the compute dtype."""
        x = self.insert_landmarks(self.decoder.embed(tokens))
        if self.cfg.arch != "gpt2":
            return x.astype(self.decoder.compute_dtype)
        Ti = x.shape[1]
        self._check_positions(Ti)
        return self.decoder.add_positions(x, jnp.broadcast_to(jnp.arange(Ti), x.shape[:2]))

    def _check_positions(self, chunk_len: int) -> None:
        if chunk_len > self.cfg.max_seq_len:
            raise UserError(f"model.max_seq_len: arch=gpt2 gives the {chunk_len} positions of a landmark segment "
                            f"(segment_len (b+1)/b) learned positions, but the table has {self.cfg.max_seq_len}")

    def _qkv(self, attn, x: jax.Array):
        """x [B, T, d] -> q [B, H, T, hd], k, v [B, kv_heads, T, hd] (before RoPE)."""
        c = self.cfg
        B, T, _ = x.shape
        q = attn.wq(x).reshape(B, T, c.n_heads, c.hd)
        k = attn.wk(x).reshape(B, T, c.kv_heads, c.hd)
        v = attn.wv(x).reshape(B, T, c.kv_heads, c.hd)
        q = constrain(q, ("batch", "act_seq", "act_heads", None))
        return q, k, v

    def _heads(self, x: jax.Array) -> jax.Array:
        """[B, kv_heads, ...] -> [B, n_heads, ...] (grouped-query heads share their kv head)."""
        rep = self.cfg.n_heads // self.cfg.kv_heads
        return x if rep == 1 else jnp.repeat(x, rep, axis=1)

    def _scan_layers(self, fn, h: jax.Array, xs=None, remat: bool = False):
        """lax.scan of fn(block, h, x_l) -> (h, y_l) over the stacked decoder blocks (and per-layer xs)."""
        graphdef, stacked = nnx.split(self.decoder.blocks)

        def body(h, inp):
            layer_state, x = inp
            return fn(nnx.merge(graphdef, layer_state), h, x)

        if remat and self.cfg.remat in _REMAT_POLICIES:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        return jax.lax.scan(body, h, (stacked, xs))

    # ---- training forward ----------------------------------------------------------------------------------
    def _grouped(self, q, k, v, docs):
        """Grouped-softmax attention over [B, H, T, hd]. docs: None (one document per row) or
        (doc [B, T] int in [0, n_docs), mixed: bool scalar, n_docs): mixed is True when some row holds more
        than one document, and only then the one-hot document features are appended."""
        impl = "reference" if self.cfg.attention_impl == "reference" else None
        L = self.b + 1
        plain = lambda: landmark_attention(q, k, v, block_size=L, implementation=impl)
        if docs is None:
            return plain()
        doc, mixed, n_docs = docs
        hd = q.shape[-1]

        def masked():
            oh = jax.nn.one_hot(doc, n_docs, dtype=q.dtype)[:, None]  # [B, 1, T, n_docs]
            shape = q.shape[:3] + (n_docs,)
            qa = jnp.concatenate([(q * hd**-0.5).astype(q.dtype), jnp.broadcast_to(-DOC_BIG * (1 - oh), shape)], -1)
            ka = jnp.concatenate([k, jnp.broadcast_to(oh, shape)], -1)
            va = jnp.concatenate([v, jnp.zeros(shape, v.dtype)], -1)
            return landmark_attention(qa, ka, va, block_size=L, implementation=impl, scale=1.0)[..., :hd]

        return jax.lax.cond(mixed, masked, plain)

    def _train_layer(self, block, h, pos, docs):
        c = self.cfg
        B, T, _ = h.shape
        q, k, v = self._qkv(block.attn, block.attn_norm(h))
        if c.arch != "gpt2":  # gpt2: positions were added to the input (learned table), no RoPE
            q, k = apply_rope(q, pos, c.rope_theta), apply_rope(k, pos, c.rope_theta)
        q = q.transpose(0, 2, 1, 3)
        k = self._heads(k.transpose(0, 2, 1, 3))
        v = self._heads(v.transpose(0, 2, 1, 3))
        out = self._grouped(q, k, v, docs).transpose(0, 2, 1, 3).reshape(B, T, c.n_heads * c.hd)
        h = h + block.attn.wo(out)
        h = h + block.mlp(block.mlp_norm(h))
        return constrain(h, ("batch", "act_seq", "act_embed"))

    def forward(self, tokens: jax.Array, reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Training forward. tokens [B, S, Ls] (or [B, T] = one segment), reset bool [B, S] (document starts).

        Returns final-normed hidden states (regular [B, S*Ls, d], landmark [B, S*Ls/b, d]).
        """
        if tokens.ndim == 2:
            tokens = tokens[:, None]
        B, S, Ls = tokens.shape
        if Ls % self.b:
            raise UserError(f"model.landmark.block_size ({self.b}) does not divide the segment length {Ls}")
        n = S * Ls // self.b
        Ti = n * (self.b + 1)
        x = self.insert_landmarks(self.decoder.embed(tokens.reshape(B, S * Ls)))
        pos = jnp.broadcast_to(jnp.arange(Ti), (B, Ti))  # step-local: relative RoPE, bounded positions
        if self.cfg.arch == "gpt2":  # learned positions restart at every segment, as they do per streamed chunk
            seg_len = Ti // S
            self._check_positions(seg_len)
            x = self.decoder.add_positions(x, pos % seg_len)
        docs = None
        if S > 1 and reset is not None:
            seg_doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)
            seg_doc = seg_doc - seg_doc[:, :1]  # 0..S-1 within the row
            docs = (jnp.repeat(seg_doc, Ls // self.b * (self.b + 1), axis=1), jnp.any(reset[:, 1:]), S)
        h, _ = self._scan_layers(lambda blk, h, _: (self._train_layer(blk, h, pos, docs), None),
                                 x.astype(self.decoder.compute_dtype), remat=True)
        return self.split_landmarks(self.decoder.final_norm(h))

    def loss(self, carry, batch, bptt_depth: int = -1):
        tokens = batch["tokens"]
        B, S, Ls = tokens.shape
        reg, lm = self.forward(tokens, batch["reset"])
        targets = batch["targets"].reshape(B, S * Ls)
        mask = batch["loss_mask"].reshape(B, S * Ls)
        loss_sum, n = token_loss(self.decoder.head(reg), targets, mask)
        if self.cfg.landmark.include_landmark_in_loss:
            # a landmark predicts the next regular token: the target of its block's last regular token
            last = lambda a: a.reshape(B, -1, self.b)[:, :, -1]
            l2, n2 = token_loss(self.decoder.head(lm), last(targets), last(mask))
            loss_sum, n = loss_sum + l2, n + n2
        aux = {"landmark_norm": jnp.linalg.norm(self.landmark[...].astype(jnp.float32))}
        return loss_sum, n, carry, aux

    # ---- retrieval inference -------------------------------------------------------------------------------
    def _layer(self, l: jax.Array):
        """Decoder block l (a traced index) of the stacked blocks."""
        graphdef, stacked = nnx.split(self.decoder.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[l], stacked))

    def _stream_qkv(self, block, h):
        """h [B, Ti, d] -> q [B, H, Ti, hd], k, v [B, kv_heads, Ti, hd] (pre-RoPE)."""
        return tuple(x.transpose(0, 2, 1, 3) for x in self._qkv(block.attn, block.attn_norm(h)))

    def _stream_out(self, block, h, out):
        """Residual attention output out [B, H, Ti, hd] and the MLP: -> h [B, Ti, d]."""
        B, T, _ = h.shape
        h = h + block.attn.wo(out.transpose(0, 2, 1, 3).reshape(B, T, self.cfg.n_heads * self.cfg.hd))
        return h + block.mlp(block.mlp_norm(h))

    def _rope(self):
        if self.cfg.arch == "gpt2":
            return _no_rope
        return partial(rope_any, theta=self.cfg.rope_theta)

    def _stream_layer(self, block, h, kv, num_blocks):
        lc = self.cfg.landmark
        B, T, _ = h.shape
        ck, cv = kv
        q, k, v = self._stream_qkv(block, h)
        out, idx = retrieval_attention(
            q, self._heads(k), self._heads(v), self._heads(ck), self._heads(cv), top_k=lc.top_k,
            mode=lc.retrieval_mode, rope_fn=self._rope(), num_valid=num_blocks, return_indices=True,
        )
        h = self._stream_out(block, h, out)
        # append this chunk's complete blocks (pre-RoPE keys) to the FIFO, dropping the oldest
        nb = ck.shape[2]
        new_k = jnp.concatenate([ck, self._blocks(k).astype(ck.dtype)], axis=2)[:, :, -nb:]
        new_v = jnp.concatenate([cv, self._blocks(v).astype(cv.dtype)], axis=2)[:, :, -nb:]
        return h, (new_k, new_v, idx)

    def _blocks(self, x: jax.Array) -> jax.Array:
        """[..., Ti, hd] -> [..., Ti / L, L, hd]."""
        L = self.b + 1
        return x.reshape(*x.shape[:-2], x.shape[-2] // L, L, x.shape[-1])

    def _check_chunk(self, tokens):
        if tokens.shape[1] % self.b:
            raise UserError(f"model.landmark.block_size ({self.b}) does not divide the chunk length {tokens.shape[1]}")

    def segment_logits_and_indices(self, carry, tokens):
        """segment_logits, also returning the retrieved cache indices [n_layers, B, H, Ti, top_k]."""
        self._check_chunk(tokens)
        B, Ls = tokens.shape
        cache = carry if "k" in carry else self._empty_cache(B)
        nv = cache["num_blocks"]
        x = self.embed_chunk(tokens)
        h, (k, v, idx) = self._scan_layers(lambda blk, h, kv: self._stream_layer(blk, h, kv, nv), x,
                                           (cache["k"], cache["v"]))
        reg, _ = self.split_landmarks(self.decoder.final_norm(h))
        nv = jnp.minimum(nv + Ls // self.b, self.cfg.landmark.cache_blocks)
        return self.decoder.head(reg), {"num_blocks": nv, "k": k, "v": v}, idx

    def segment_logits(self, carry, tokens, positions=None, reset=None):
        """One chunk with retrieval: tokens [B, Ls] (Ls a multiple of b) -> (float32 logits [B, Ls, V], carry).

        `positions` is not needed: retrieval uses the bounded stingy positions (module docstring).
        """
        logits, carry, _ = self.segment_logits_and_indices(carry, tokens)
        return logits, carry

    # ---- retrieval inference, K/V in host memory (offload_kv) ------------------------------------------------
    @property
    def host_stream(self):
        """The non-jitted streaming hook LoadedModel calls instead of a jitted segment_logits (offload_kv)."""
        return self.stream_segment if self.cfg.landmark.offload_kv else None

    def stream_segment(self, carry, tokens, positions=None, reset=None, return_indices: bool = False):
        """segment_logits with the K/V cache in host memory: a Python loop over layers (module docstring).

        carry: {"num_blocks"} (fresh) or {"num_blocks" [B], "landmark_k" [n_layers, B, kv_heads, cache_blocks,
        hd] (device), "host_kv": HostKV}. The old carry is never modified, so a partial chunk may be run from
        it and dropped. Returns (float32 logits [B, Ls, V], carry) (+ indices [n_layers, B, H, Ti, top_k]).
        """
        self._check_chunk(tokens)
        c, lc = self.cfg, self.cfg.landmark
        B, Ls = tokens.shape
        gd, st = nnx.split(self)
        if "landmark_k" in carry:
            lk, host, nv = carry["landmark_k"], carry["host_kv"], carry["num_blocks"]
        else:  # made by a jit of the params, so placed (committed) like later carries: no second compilation
            lk, nv = _off_start(gd, st, carry["num_blocks"])
            host = HostKV(lc.cache_blocks, (c.kv_heads, self.b + 1, c.hd), np.dtype(lk.dtype))
        h = _off_embed(gd, st, jnp.asarray(tokens, jnp.int32))
        device = next(iter(lk.devices()))  # where the params and the carry live
        ks, vs, idxs = [], [], []
        for layer in range(c.n_layers):
            l = np.int32(layer)  # traced: one compilation for all layers
            q, k, v, idx = _off_select(gd, st, l, h, lk, nv)
            blocks_k, blocks_v, ridx = host.gather_unique(layer, np.asarray(idx), device)  # the only host->device copy
            h = _off_attend(gd, st, l, h, q, k, v, blocks_k, blocks_v, ridx, idx, nv)
            ks.append(k)
            vs.append(v)
            idxs.append(idx)
        logits, nv, lk, kb, vb = _off_finish(gd, st, h, nv, lk, ks, vs)
        new = {"num_blocks": nv, "landmark_k": lk, "host_kv": host.append(np.asarray(kb), np.asarray(vb))}
        return (logits, new, jnp.stack(idxs)) if return_indices else (logits, new)


class HostKV:
    """The offloaded K/V FIFO in host memory: the last `capacity` complete blocks of every layer.

    Persistent: `append` returns a new HostKV sharing the older chunk arrays (numpy
    [n_layers, B, kv_heads, n_i, L, hd], one per streamed chunk, never written after creation), so an old
    carry stays valid (LoadedModel re-runs a partial chunk from it) and appending copies only the new chunk.
    Cache entry s of the device layout (right-aligned, as in the on-device cache) is block number
    total - capacity + s of the stream; entries before the first block read as zeros, like the unfilled
    on-device cache. All batch rows advance together (one chunk length), as in segment_logits.
    """

    def __init__(self, capacity: int, tail: tuple, dtype, k=(), v=(), starts=(), total: int = 0):
        self.capacity, self.tail, self.dtype = capacity, tail, dtype
        self.k, self.v, self.starts, self.total = tuple(k), tuple(v), np.asarray(starts, np.int64), total

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def append(self, k_new: np.ndarray, v_new: np.ndarray) -> HostKV:
        """k_new, v_new [n_layers, B, kv_heads, n, L, hd] -> a new HostKV (chunks wholly evicted are dropped)."""
        total = self.total + k_new.shape[3]
        k, v, starts = self.k + (k_new,), self.v + (v_new,), np.append(self.starts, self.total)
        ends = np.append(starts[1:], total)
        keep = ends > total - self.capacity
        pick = lambda xs: tuple(x for x, y in zip(xs, keep) if y)
        return HostKV(self.capacity, self.tail, self.dtype, pick(k), pick(v), starts[keep], total)

    def gather(self, layer: int, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cache entries [B, U] (-1: padding) of one layer -> k, v [B, kv_heads, U, L, hd] (zeros if invalid)."""
        B, U = entries.shape
        out_k = np.zeros((B, self.tail[0], U, *self.tail[1:]), self.dtype)
        out_v = np.zeros_like(out_k)
        g = self.total - self.capacity + entries  # stream block number
        valid = (entries >= 0) & (g >= 0)
        chunk = np.searchsorted(self.starts, g, side="right") - 1
        for i in np.unique(chunk[valid]):
            bb, uu = np.nonzero(valid & (chunk == i))
            j = g[bb, uu] - self.starts[i]
            out_k[bb, :, uu] = self.k[i][layer, bb, :, j]
            out_v[bb, :, uu] = self.v[i][layer, bb, :, j]
        return out_k, out_v

    def gather_unique(self, layer: int, idx: np.ndarray, device=None):
        """Chosen entries idx [B, H, Ti, k] -> (k, v [B, kv_heads, U, L, hd] device, ridx [B, H, Ti, k] in [0, U)).

        Each row's distinct entries are copied once; U is rounded up to a power of two (capped at capacity)
        so the attend step compiles O(log capacity) times, not once per count.
        """
        B = idx.shape[0]
        flat = idx.reshape(B, -1)
        uniq = [np.unique(r) for r in flat]
        U = min(1 << (max(len(u) for u in uniq) - 1).bit_length(), max(self.capacity, 1))
        entries = np.full((B, U), -1, np.int64)
        ridx = np.empty_like(flat)
        for b, u in enumerate(uniq):
            entries[b, : len(u)] = u
            ridx[b] = np.searchsorted(u, flat[b])
        k, v = self.gather(layer, entries)
        return tuple(jax.device_put(x, device) for x in (k, v, ridx.reshape(idx.shape).astype(np.int32)))


# Jitted pieces of stream_segment (graphdef static: one compilation per model shape).
@partial(jax.jit, static_argnums=0)
def _off_start(gd, st, num_blocks):
    """An empty carry's device part: landmark keys [n_layers, B, kv_heads, cache_blocks, hd] zeros."""
    m = nnx.merge(gd, st)
    c = m.cfg
    B = num_blocks.shape[0]
    shape = (c.n_layers, B, c.kv_heads, c.landmark.cache_blocks, c.hd)
    first = jax.tree.leaves(st)[0].reshape(-1)[0]  # depend on the params: placed like them
    return jnp.zeros(shape, m.decoder.compute_dtype) + (0 * first).astype(m.decoder.compute_dtype), num_blocks + 0


@partial(jax.jit, static_argnums=0)
def _off_embed(gd, st, tokens):
    return nnx.merge(gd, st).embed_chunk(tokens)


@partial(jax.jit, static_argnums=0)
def _off_select(gd, st, l, h, lk, num_blocks):
    """Layer l: q, k, v of the chunk and the top-k cache entries from the device landmark keys only."""
    m = nnx.merge(gd, st)
    lc = m.cfg.landmark
    q, k, v = m._stream_qkv(m._layer(l), h)
    idx = chunk_select(q, m._heads(lk[l]), block_len=m.b + 1, t_local=k.shape[2], top_k=lc.top_k,
                       mode=lc.retrieval_mode, rope_fn=m._rope(), num_valid=num_blocks)
    return q, k, v, idx


@partial(jax.jit, static_argnums=0)
def _off_attend(gd, st, l, h, q, k, v, blocks_k, blocks_v, ridx, idx, num_blocks):
    """Layer l: attention over [retrieved ; chunk] from the host-gathered blocks, then the MLP."""
    m = nnx.merge(gd, st)
    ret_k, ret_v = (gather_blocks(m._heads(x), ridx) for x in (blocks_k, blocks_v))
    out = attend_retrieved(q, m._heads(k), m._heads(v), ret_k, ret_v, idx, n_blocks=m.cfg.landmark.cache_blocks,
                           rope_fn=m._rope(), num_valid=num_blocks)
    return m._stream_out(m._layer(l), h, out)


@partial(jax.jit, static_argnums=0)
def _off_finish(gd, st, h, num_blocks, lk, ks, vs):
    """Logits, the new num_blocks, the landmark-key FIFO update and the chunk's blocks
    [n_layers, B, kv_heads, n, L, hd] (for the host)."""
    m = nnx.merge(gd, st)
    num_blocks = jnp.minimum(num_blocks + ks[0].shape[2] // (m.b + 1), m.cfg.landmark.cache_blocks)
    reg, _ = m.split_landmarks(m.decoder.final_norm(h))
    kb, vb = (m._blocks(jnp.stack(x)).astype(lk.dtype) for x in (ks, vs))
    lk = jnp.concatenate([lk, kb[..., m.b, :]], axis=3)[:, :, :, -lk.shape[3] :]
    return m.decoder.head(reg), num_blocks, lk, kb, vb


register_model("landmark", Landmark)
