"""Memory layers: product-key memory (Lample et al. 2019) and Memory+ (Berges et al. 2024, arXiv 2412.09764).

A memory layer replaces the FFN of the blocks listed in `memory_layers.layers` (models.md §6):

    q      = W_q x + b                           [T, H, k_dim]   (x = the block's pre-FFN RMSNorm output)
    s(i,j) = q1 · K1[h, i] + q2 · K2[h, j]       product keys n = i·sqrt(N) + j    (Lample §3.2)
    I_h    = exact top-k of s over all N keys;  w_h = softmax(s[I_h]) (float32, per head)
    y      = Σ_h Σ_{n in I_h} w_h[n] V[n]        the heads are SUMMED (models.md §6(g))       [T, v_dim]
    out    = y                                   PKM (memory_plus=false; needs v_dim = d_model)
    out    = W2 (y ⊙ SiLU(W1 x))                 Memory+ "swilu" [Berges eq. 2]

Memory+ (`memory_plus: true`) has ONE value table V [N, v_dim] shared by every memory layer: it is a single
top-level `nnx.Param` of the model (`MemoryLayersLM.values`), passed into each memory block at call time; the
PKM variant gives each memory layer its own `values`. Queries, sub-keys, W1, W2 belong to each layer.
qk-norm (Berges Fig. 3, "when needed"; not in the released code): RMS-normalise each query half and each
sub-key row, scale the query half by a learned per-head gain / sqrt(k_dim/2) (so scores start at unit scale).

Layer layout: memory blocks have different parameters from plain blocks. The plain blocks are stacked in
`decoder.blocks` [n_layers - M] (as `Decoder.blocks`), the memory blocks in `decoder.memory_blocks` [M]
(attention + norms + `memory.{query, keys1, keys2, w1, w2[, q_scale][, values]}`), and ONE `lax.scan` runs
the n_layers steps in depth order; step i is `lax.cond(layer i has memory, memory block, plain block)` on the
i-th block of its kind (a dynamic index into the stacked parameters), under the configured remat. Compile time
is independent of depth and of M. Why not an unrolled loop over runs of scanned plain blocks: outside a
`while` loop XLA merges the rematerialised forward with the original one (CPU memory_analysis of the 373M
config: every unrolled block kept its [heads, seq, seq] attention probabilities until its backward, +3 GB per
block per 4096 tokens), and a run of one block is a trip-count-1 loop that XLA removes, with the same effect.
Cost of the cond: with remat=none both branches' residuals are kept for every layer (use remat on real runs).

Lookup: `pallas_kernels/pkm_lookup` (exact top-k without forming all N scores; segment_sum gradient for V).
Sharding: V is split over the mesh axis that RULES give the logical name `pkm_value_dim` (default "tensor"):
`value_sharding: columns` annotates V as ("pkm_values", "pkm_value_dim"), i.e. its embedding columns are split
(the paper's memory-parallel group); `rows` swaps the two names, so its rows are split. When that mesh axis has
more than one device the lookup runs under `jax.shard_map` (`pkm_lookup_sharded`), tokens sharded like the
batch; otherwise the plain `pkm_lookup` (Mosaic kernel on TPU, XLA on GPU and CPU: the Triton kernel measured
slower than XLA on an H200, see pallas_kernels/pkm_lookup/api.py) under GSPMD.

Memory health (aux -> metrics.jsonl, per memory layer l and averaged): `pkm_l{l}_used_frac` = fraction of the
N slots selected by at least one (token, head) of the batch; `pkm_l{l}_usage_entropy` = entropy (nats) of the
slot distribution Σ_{t,h} w over the batch (ln N = perfectly uniform).

The model is stateless (no carry): it scores whole sequences like `BaselineLM`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm.errors import UserError
from memlm.layers.attention import Attention, _linear, causal_mask
from memlm.layers.mlp import make_norm
from memlm.models.decoder import _REMAT_POLICIES, Decoder, make_stacked_blocks
from memlm.models.lm import register_model, token_loss
from memlm.sharding import constrain, current_rules
from pallas_kernels.pkm_lookup import pkm_lookup, pkm_lookup_sharded

# ---- sizes -------------------------------------------------------------------------------------------------


def value_dim(cfg) -> int:
    return cfg.memory_layers.value_dim or cfg.d_model


def value_names(layout: str) -> tuple[str, str]:
    """Logical names of V [N, v_dim]; `pkm_value_dim` marks the dim split over the memory-parallel axis."""
    return ("pkm_values", "pkm_value_dim") if layout == "columns" else ("pkm_value_dim", "pkm_values")


def memory_flops_per_token(cfg) -> int:
    """Forward FLOPs per token of one memory layer (multiply-add = 2): query projection, sub-key scores,
    k² candidate sums, the bag of H·k rows, and (Memory+) W1, W2."""
    ml = cfg.memory_layers
    d, v, h, k = cfg.d_model, value_dim(cfg), ml.heads, ml.top_k
    sqrt_n = math.isqrt(ml.num_values)
    flops = 2 * d * h * ml.k_dim + 2 * h * sqrt_n * ml.k_dim + h * k * k + 2 * h * k * v
    if ml.memory_plus:
        flops += 4 * d * v
    return flops


def equal_flops_d_ff(cfg) -> int:
    """d_ff of a dense (all-SwiGLU, 6·d·d_ff FLOPs/token per FFN) model with the same FFN FLOPs per token as
    this memory-layer model (n_layers - M SwiGLUs of width cfg.ff plus M memory layers)."""
    m = len(set(cfg.memory_layers.layers))
    total = (cfg.n_layers - m) * 6 * cfg.d_model * cfg.ff + m * memory_flops_per_token(cfg)
    return max(1, round(total / (6 * cfg.d_model * cfg.n_layers)))


def layer_schedule(n_layers: int, memory: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: has memory (bool [n_layers]) and its index among the layers of its kind (int32 [n_layers])."""
    is_mem = np.isin(np.arange(n_layers), np.asarray(memory, np.int64))
    index = np.where(is_mem, np.cumsum(is_mem) - 1, np.cumsum(~is_mem) - 1).astype(np.int32)
    return is_mem, index


def from_plain_backbone(cfg, flat: dict) -> tuple[dict, list[str]]:
    """A plain decoder's flat tensors (an imported HF Llama / GPT-2: `decoder.blocks.{i}.*` for every layer i)
    -> this model's names. Layer i with memory maps to `decoder.memory_blocks.{j}` (its attention and both
    norms); its FFN is what the memory replaces, so those tensors are returned as dropped. Other layers map to
    `decoder.blocks.{j}` (j = index among the plain layers). Non-layer tensors pass through."""
    is_mem, index = layer_schedule(cfg.n_layers, cfg.memory_layers.layers)
    out, dropped = {}, []
    for name, x in flat.items():
        parts = name.split(".")
        if parts[:2] != ["decoder", "blocks"] or not parts[2].isdigit():
            out[name] = x
            continue
        i, rest = int(parts[2]), parts[3:]
        if is_mem[i] and rest[0] == "mlp":
            dropped.append(name)
            continue
        stack = "memory_blocks" if is_mem[i] else "blocks"
        out[".".join(["decoder", stack, str(index[i]), *rest])] = x
    return out, dropped


def plain_layout(cfg) -> tuple[dict[tuple[str, int], int], list[int], str]:
    """For `memlm export --format hf` (the inverse of from_plain_backbone): (stack name, index in it) -> layer
    index of the plain decoder (`decoder.memory_blocks.{j}` / `decoder.blocks.{j}` -> `decoder.blocks.{i}`);
    the layers whose FFN the memory replaced (their FFN is exported as zeros, so the HF model is the backbone
    with each memory layer adding nothing); and a note for the export's README."""
    is_mem, index = layer_schedule(cfg.n_layers, cfg.memory_layers.layers)
    layer = {("memory_blocks" if is_mem[i] else "blocks", int(index[i])): i for i in range(cfg.n_layers)}
    mem = [i for i in range(cfg.n_layers) if is_mem[i]]
    note = (f"Layers {mem} are memory layers: the product-key memory replaces their FFN, so their FFN weights "
            "in model.safetensors are zeros and the Hugging Face model is the backbone with those layers adding "
            "nothing after attention.")
    return layer, mem, note


# ---- lookup dispatch ---------------------------------------------------------------------------------------


def _rule_axes(name: str, mesh) -> tuple[str, ...]:
    axes = dict(current_rules()).get(name)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.axis_names)


def lookup(queries, keys1, keys2, values, *, top_k: int, layout: str, implementation: str):
    """queries [T, H, k_dim], keys [H, sqrt_n, k_dim/2], values [N, v] -> (out [T, v], idx, w [T, H, k]).

    Sharded (shard_map) when the mesh axis of `pkm_value_dim` has > 1 device, else the plain lookup."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        axes = [a for a in _rule_axes("pkm_value_dim", mesh) if mesh.shape[a] > 1]
        if len(axes) > 1:
            raise UserError(f"mesh.rules.pkm_value_dim: the values can be split over one mesh axis, not {axes}")
        if axes:
            tok = _rule_axes("batch", mesh)
            n_tok = math.prod(mesh.shape[a] for a in tok)
            if queries.shape[0] % n_tok:  # e.g. one sequence at inference: tokens replicated instead
                tok = ()
            return pkm_lookup_sharded(queries, keys1, keys2, values, top_k=top_k, mesh=mesh, value_axis=axes[0],
                                      layout=layout, token_axes=tok or None)
    impl = None if implementation == "auto" else implementation
    try:
        return pkm_lookup(queries, keys1, keys2, values, top_k=top_k, implementation=impl)
    except UserError as e:  # name the config key the user set, not the kernel's argument
        raise UserError(str(e).replace("pkm_lookup.implementation", "model.memory_layers.implementation")) from e


STATS = ("used_frac", "usage_entropy")


def usage_stats(indices: jax.Array, weights: jax.Array, n: int) -> dict[str, jax.Array]:
    """indices int [T, H, k], weights f32 [T, H, k] -> used fraction of the N slots and usage entropy (nats)."""
    idx = jax.lax.stop_gradient(indices).reshape(-1)
    w = jax.lax.stop_gradient(weights).astype(jnp.float32).reshape(-1)
    mass = jnp.zeros((n,), jnp.float32).at[idx].add(w)
    hits = jnp.zeros((n,), jnp.float32).at[idx].add(1.0)
    p = mass / jnp.maximum(jnp.sum(mass), 1e-30)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"used_frac": jnp.mean((hits > 0).astype(jnp.float32)), "usage_entropy": entropy}


# ---- modules -----------------------------------------------------------------------------------------------


class ProductKeyMemory(nnx.Module):
    """The FFN replacement. Init (models.md §6(a)): query xavier-uniform (bias 0), sub-keys U(±k_dim^-½),
    W1 and W2 normal with std d^-½, values (`init_values`) normal with std v_dim^-½."""

    def __init__(self, cfg, rngs: nnx.Rngs, own_values: bool):
        ml = cfg.memory_layers
        d, v, h, kd = cfg.d_model, value_dim(cfg), ml.heads, ml.k_dim
        self.heads, self.k_dim, self.top_k, self.n = h, kd, ml.top_k, ml.num_values
        self.layout, self.implementation, self.chunk_len = ml.value_sharding, ml.implementation, ml.chunk_len
        self.plus, self.qk_norm, self.eps = ml.memory_plus, ml.qk_norm, cfg.norm_eps
        self.compute_dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        sqrt_n = math.isqrt(ml.num_values)
        self.query = nnx.Linear(
            d, h * kd, use_bias=True, dtype=self.compute_dtype, param_dtype=pdt,
            kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), ("embed", "pkm_keys")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("pkm_keys",)), rngs=rngs)
        bound = kd**-0.5
        key_init = lambda: jax.random.uniform(rngs.params(), (h, sqrt_n, kd // 2), pdt, -bound, bound)
        self.keys1 = nnx.Param(key_init(), sharding=(None, "pkm_keys", None))
        self.keys2 = nnx.Param(key_init(), sharding=(None, "pkm_keys", None))
        if self.qk_norm:
            self.q_scale = nnx.Param(jnp.ones((h, 2, kd // 2), pdt), sharding=(None, None, "pkm_keys"))
        if self.plus:
            self.w1 = _linear(d, v, ("embed", "mlp"), cfg, rngs, d**-0.5)
            self.w2 = _linear(v, d, ("mlp", "embed"), cfg, rngs, d**-0.5)
        elif v != d:
            raise UserError(f"model.memory_layers.value_dim ({v}) must equal model.d_model ({d}) when "
                            "memory_plus=false (the PKM output is the value sum itself)")
        if own_values:
            self.values = nnx.Param(init_values(cfg, rngs), sharding=value_names(self.layout))

    def _rms(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x: jax.Array, values: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """x [B, S, d] (normed) -> (out [B, S, d] compute dtype, usage stats); values [N, v] (Memory+ pool)."""
        b, s, _ = x.shape
        h, kd = self.heads, self.k_dim
        values = self.values[...] if values is None else values
        q = self.query(x).reshape(b, s, h, kd)
        k1, k2 = self.keys1[...], self.keys2[...]
        if self.qk_norm:
            qh = self._rms(q.reshape(b, s, h, 2, kd // 2)) * self.q_scale[...].astype(jnp.float32)
            q = qh.reshape(b, s, h, kd) * (kd // 2) ** -0.5
            k1, k2 = self._rms(k1), self._rms(k2)
        # Chunks along the sequence: every chunk holds all batch rows, so the batch sharding is kept.
        c_len = self.chunk_len if 0 < self.chunk_len < s else s
        pad = -s % c_len
        n_chunks = (s + pad) // c_len
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
        q = q.reshape(b, n_chunks, c_len, h, kd).swapaxes(0, 1).reshape(n_chunks, b * c_len, h, kd)

        def one(qc):
            return lookup(qc, k1, k2, values, top_k=self.top_k, layout=self.layout,
                          implementation=self.implementation)

        y, idx, w = jax.lax.map(one, q) if n_chunks > 1 else jax.tree.map(lambda a: a[None], one(q[0]))
        unchunk = lambda a: a.reshape((n_chunks, b, c_len) + a.shape[2:]).swapaxes(0, 1).reshape(
            (b, n_chunks * c_len) + a.shape[2:])[:, :s]
        y = unchunk(y).astype(self.compute_dtype)
        if self.plus:
            y = self.w2(y * jax.nn.silu(self.w1(x)))
        return y, usage_stats(unchunk(idx), unchunk(w), self.n)


def init_values(cfg, rngs: nnx.Rngs) -> jax.Array:
    """V [N, v_dim] ~ N(0, v_dim^-½) in param_dtype."""
    v = value_dim(cfg)
    shape = (cfg.memory_layers.num_values, v)
    return jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype)) * v**-0.5


class MemoryBlock(nnx.Module):
    """Pre-norm block whose FFN is a product-key memory: h = x + Attn(norm(x)); out = h + PKM(norm(h))."""

    def __init__(self, cfg, rngs: nnx.Rngs, own_values: bool):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.memory = ProductKeyMemory(cfg, rngs, own_values)

    def __call__(self, x, positions, mask, values=None) -> tuple[jax.Array, dict]:
        x = x + self.attn(self.attn_norm(x), positions, mask)
        y, stats = self.memory(self.mlp_norm(x), values)
        return constrain(x + y, ("batch", "act_seq", "act_embed")), stats


class MemoryDecoder(Decoder):
    """Decoder whose n_layers blocks are one `lax.scan`; step i runs `lax.cond(layer i has memory, ...)` on the
    plain blocks `blocks` [n_layers - M] or the memory blocks `memory_blocks` [M], both stacked."""

    def __init__(self, cfg, rngs: nnx.Rngs, own_values: bool):
        self.cfg = cfg
        self.embedding = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (cfg.padded_vocab, cfg.d_model), jnp.dtype(cfg.param_dtype))
            * cfg.init_std,
            sharding=("vocab", "embed"),
        )
        is_mem, _ = layer_schedule(cfg.n_layers, cfg.memory_layers.layers)
        self.memory_layer_ids = [i for i in range(cfg.n_layers) if is_mem[i]]
        n_mem = len(self.memory_layer_ids)
        self.n_plain = cfg.n_layers - n_mem
        self.blocks = make_stacked_blocks(cfg, rngs, self.n_plain) if self.n_plain else None
        mem_block = functools.partial(MemoryBlock, own_values=own_values)
        self.memory_blocks = make_stacked_blocks(cfg, rngs, n_mem, mem_block)
        self.final_norm = make_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.d_model, cfg.padded_vocab, ("embed", "vocab"), cfg, rngs, cfg.init_std)
        self.init_positions(cfg, rngs)

    def backbone_stats(self, x, positions, mask, values=None) -> tuple[jax.Array, dict]:
        """x [B, S, d] -> (final-normed h [B, S, d], {"pkm_l{layer}_{stat}": scalar})."""
        cfg = self.cfg
        is_mem, index = (jnp.asarray(a) for a in layer_schedule(cfg.n_layers, cfg.memory_layers.layers))
        mem_gd, mem_state = nnx.split(self.memory_blocks)
        plain_gd, plain_state = nnx.split(self.blocks) if self.n_plain else (None, None)
        pick = lambda state, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)

        def memory(h, i):
            return nnx.merge(mem_gd, pick(mem_state, i))(h, positions, mask, values)

        def plain(h, i):
            zero = {k: jnp.zeros((), jnp.float32) for k in STATS}
            return nnx.merge(plain_gd, pick(plain_state, i))(h, positions, mask), zero

        def body(h, xs):
            mem, i = xs
            if not self.n_plain:
                return memory(h, i)
            return jax.lax.cond(mem, memory, plain, h, i)

        if cfg.remat in _REMAT_POLICIES:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        h, stats = jax.lax.scan(body, self.add_positions(x, positions), (is_mem, index))
        per_layer = {f"pkm_l{i}_{k}": v[i] for k, v in stats.items() for i in self.memory_layer_ids}
        return self.final_norm(h), per_layer

    def backbone(self, x, positions, mask, values=None) -> jax.Array:
        return self.backbone_stats(x, positions, mask, values)[0]


class MemoryLayersLM(nnx.Module):
    """Decoder with memory layers in place of the FFN of `memory_layers.layers`; stateless (no carry)."""

    stateless = True

    def __init__(self, cfg, rngs: nnx.Rngs):
        ml = cfg.memory_layers
        if not ml.layers:
            raise UserError("model.memory_layers.layers: empty (name at least one layer to hold a memory)")
        if ml.k_dim % 2:
            raise UserError(f"model.memory_layers.k_dim ({ml.k_dim}) must be even (two sub-key halves)")
        self.cfg = cfg
        self.decoder = MemoryDecoder(cfg, rngs, own_values=not ml.memory_plus)
        if ml.memory_plus:  # ONE pool for every memory layer (models.md §6(g))
            self.values = nnx.Param(init_values(cfg, rngs), sharding=value_names(ml.value_sharding))

    def init_carry(self, batch: int) -> dict:
        return {}

    def carry_axes(self) -> dict:
        return {}

    def forward(self, tokens, positions, mask) -> tuple[jax.Array, dict]:
        """tokens [B, T] -> (float32 logits [B, T, vocab], memory stats)."""
        values = self.values[...] if self.cfg.memory_layers.memory_plus else None
        dec = self.decoder
        h, stats = dec.backbone_stats(dec.embed(tokens), positions, mask, values)
        return dec.head(h), stats

    def loss(self, carry, batch, bptt_depth: int = -1):
        """Whole-sequence causal LM within documents (as BaselineLM); aux = memory usage stats."""
        tokens = batch["tokens"]
        b, s, l = tokens.shape
        if self.cfg.segment_local:
            flat = lambda x: x.reshape((b * s, l) + x.shape[3:])
            pos = jnp.broadcast_to(jnp.arange(l), (b * s, l))
            logits, stats = self.forward(flat(tokens), pos, causal_mask(pos, pos))
        else:
            doc = jnp.repeat(jnp.cumsum(batch["reset"].astype(jnp.int32), axis=1), l, axis=1)  # [b, s*l]
            idx = jnp.broadcast_to(jnp.arange(s * l), (b, s * l))
            flat = lambda x: x.reshape((b, s * l) + x.shape[3:])
            logits, stats = self.forward(flat(tokens), flat(batch["positions"]), causal_mask(idx, idx, doc, doc))
        loss_sum, n = token_loss(logits, flat(batch["targets"]), flat(batch["loss_mask"]))
        for stat in STATS:
            stats[f"pkm_{stat}"] = jnp.mean(jnp.stack([v for k, v in stats.items() if k.endswith(stat)]))
        return loss_sum, n, carry, stats

    def segment_logits(self, carry, tokens, positions, reset=None):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self.forward(tokens, positions, causal_mask(pos, pos))[0], carry

    def full_logits(self, tokens: jax.Array) -> jax.Array:
        """Whole-sequence causal logits [batch, seq, vocab]."""
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        return self.forward(tokens, pos, causal_mask(pos, pos))[0]


register_model("memory_layers", MemoryLayersLM)
