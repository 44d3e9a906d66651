#!/usr/bin/env python
"""Landmark retrieval inference at a long context vs full attention: cost per token, memory, keys attended.

    python scripts/bench_landmark.py [--config configs/tiny/landmark.yaml] [--context 32768] [--top-k 4]
                                     [--chunks 4] [--out F] [overrides ...]

Both models have the config's backbone (random init, batch 1) and stream `data.segment_len`-token chunks:
  landmark   segment_logits with a cache of ceil(context / b) blocks (model.landmark.cache_blocks is set to
             that), top-k retrieval per (token, head) (memlm/memory/landmark.py);
  full       the same backbone with a KV cache of `context` tokens (post-RoPE), every chunk attending
             causally over the whole cache (what full attention costs per token at that context);
  one-pass   full attention over the whole context in one forward (the baseline's path): compiled only, for
             its memory (the T x T scores), not run.
Array shapes are fixed, so every chunk costs what the last chunk of a `context`-token stream costs; the
time is the median over `--chunks` timed chunks after a warm-up (the caches hold random values). Memory is
compiled.memory_analysis() of one jitted chunk step: arguments (params + cache) + temporaries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm.errors import OneLineArgumentParser, UserError, positive_int, run_script  # noqa: E402

MIB = 2**20


def _mem(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"argument_mib": m.argument_size_in_bytes / MIB, "temp_mib": m.temp_size_in_bytes / MIB,
            "output_mib": m.output_size_in_bytes / MIB,
            "peak_mib": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                         - m.alias_size_in_bytes) / MIB}


def _time(fn, carry, make_tokens, n: int) -> tuple[float, object]:
    import jax

    logits, carry = fn(carry, make_tokens(0))  # warm-up
    jax.block_until_ready(logits)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        logits, carry = fn(carry, make_tokens(i + 1))
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), carry


def full_attention_step(model, carry: dict, tokens):
    """One chunk of full attention with a KV cache: carry {"k", "v": [layers, B, T_max, kv_heads, hd]
    post-RoPE, "n": int32 tokens so far}; tokens [B, C] -> (logits [B, C, V], carry)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from memlm.layers.attention import reference_attention
    from memlm.layers.rope import apply_rope

    dec, c = model.decoder, model.cfg
    B, C = tokens.shape
    n = carry["n"]
    pos = n + jnp.arange(C)
    T_max = carry["k"].shape[2]
    mask = (jnp.arange(T_max)[None, :] <= pos[:, None])[None, None]  # [1, 1, C, T_max]
    graphdef, stacked = nnx.split(dec.blocks)

    def body(h, inp):
        state, ck, cv = inp
        blk = nnx.merge(graphdef, state)
        a = blk.attn_norm(h)
        q = apply_rope(blk.attn.wq(a).reshape(B, C, c.n_heads, c.hd), pos[None], c.rope_theta)
        k = apply_rope(blk.attn.wk(a).reshape(B, C, c.kv_heads, c.hd), pos[None], c.rope_theta)
        v = blk.attn.wv(a).reshape(B, C, c.kv_heads, c.hd)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, n, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, n, 0, 0))
        out = reference_attention(q, ck, cv, mask)
        h = h + blk.attn.wo(out.reshape(B, C, c.n_heads * c.hd))
        h = h + blk.mlp(blk.mlp_norm(h))
        return h, (ck, cv)

    h, (k, v) = jax.lax.scan(body, dec.embed(tokens), (stacked, carry["k"], carry["v"]))
    logits = dec.head(dec.final_norm(h))
    return logits, {"k": k, "v": v, "n": jnp.minimum(n + C, T_max - C)}


def main() -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--config", default=os.path.join(root, "configs", "tiny", "landmark.yaml"))
    p.add_argument("--context", type=positive_int, default=32768)
    p.add_argument("--top-k", type=positive_int, default=4)
    p.add_argument("--chunks", type=positive_int, default=4, help="timed chunks per model")
    p.add_argument("--no-one-pass", action="store_true", help="skip compiling the one-pass full attention")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from memlm import sharding
    from memlm.config import load_config
    from memlm.memory.landmark import attended_tokens
    from memlm.models.lm import build_model

    base = load_config(args.config, args.overrides)
    b = base.model.landmark.block_size
    blocks = -(-args.context // b)
    cfg = load_config(args.config, args.overrides + [f"model.landmark.top_k={args.top_k}",
                                                     f"model.landmark.cache_blocks={blocks}",
                                                     "model.max_seq_len=1048576"])
    C = cfg.data.segment_len
    if args.context < C:
        raise UserError(f"--context {args.context}: shorter than one chunk (data.segment_len = {C})")
    V = cfg.model.vocab_size
    rng = np.random.default_rng(0)
    make_tokens = lambda i: jnp.asarray(rng.integers(3, V, size=(1, C)), jnp.int32)
    with sharding.activate(sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        lm = build_model(cfg.model, nnx.Rngs(0))
        base_model = build_model(cfg.model.model_copy(update={"kind": "baseline", "landmark": None}), nnx.Rngs(0))
    rows = {}

    # landmark: one chunk with a full cache (num_blocks = cache size)
    gd, st = nnx.split(lm)
    seg = jax.jit(lambda s, c, t: nnx.merge(gd, s).segment_logits(c, t, None), donate_argnums=(1,))
    carry = lm._empty_cache(1)
    carry = {**carry, "num_blocks": jnp.full((1,), blocks, jnp.int32),
             "k": jax.random.normal(jax.random.PRNGKey(1), carry["k"].shape, carry["k"].dtype),
             "v": jax.random.normal(jax.random.PRNGKey(2), carry["v"].shape, carry["v"].dtype)}
    compiled = seg.lower(st, carry, make_tokens(0)).compile()
    step_s, _ = _time(lambda c, t: compiled(st, c, t), carry, make_tokens, args.chunks)
    rows["landmark"] = {"sec_per_token": step_s / C, "chunk_s": step_s,
                        "cache_mib": 2 * carry["k"].size * carry["k"].dtype.itemsize / MIB, **_mem(compiled),
                        **attended_tokens(b, args.top_k, C, args.context, blocks)}

    # full attention with a KV cache of `context` tokens
    gd_b, st_b = nnx.split(base_model)
    m = cfg.model
    shape = (m.n_layers, 1, args.context, m.kv_heads, m.hd)
    fcarry = {"k": jnp.zeros(shape, jnp.dtype(m.dtype)), "v": jnp.zeros(shape, jnp.dtype(m.dtype)),
              "n": jnp.int32(args.context - C)}
    fstep = jax.jit(lambda s, c, t: full_attention_step(nnx.merge(gd_b, s), c, t), donate_argnums=(1,))
    fcompiled = fstep.lower(st_b, fcarry, make_tokens(0)).compile()
    fstep_s, _ = _time(lambda c, t: fcompiled(st_b, c, t), fcarry, make_tokens, args.chunks)
    rows["full_kv_cache"] = {"sec_per_token": fstep_s / C, "chunk_s": fstep_s,
                             "cache_mib": 2 * np.prod(shape) * jnp.dtype(m.dtype).itemsize / MIB,
                             **_mem(fcompiled), "keys_per_query": args.context}

    if not args.no_one_pass:  # the baseline's one-pass forward over the whole context: memory only
        one = jax.jit(lambda s, t: nnx.merge(gd_b, s).full_logits(t))
        ocompiled = one.lower(st_b, jax.ShapeDtypeStruct((1, args.context), jnp.int32)).compile()
        rows["full_one_pass"] = {**_mem(ocompiled), "keys_per_query_max": args.context}

    rows["ratios"] = {"time_per_token_landmark_over_full": rows["landmark"]["sec_per_token"]
                      / rows["full_kv_cache"]["sec_per_token"],
                      "peak_mem_landmark_over_full": rows["landmark"].get("peak_mib", 0)
                      / max(rows["full_kv_cache"].get("peak_mib", 1), 1e-9),
                      "temp_mem_landmark_over_full": rows["landmark"].get("temp_mib", 0)
                      / max(rows["full_kv_cache"].get("temp_mib", 1), 1e-9),
                      "keys_landmark_over_full": rows["landmark"]["total_max"] / args.context}
    info = {"config": args.config, "context": args.context, "chunk": C, "block_size": b, "top_k": args.top_k,
            "device": str(jax.devices()[0]), "rows": rows}
    print(json.dumps(info, indent=2, default=float))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "bench_landmark.py"))
