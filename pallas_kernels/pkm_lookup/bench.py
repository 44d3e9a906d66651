"""Benchmark: XLA product-key lookup vs a dense FFN of equal FLOPs, and backward memory vs N.

Memory Layers at Scale (arXiv 2412.09764) claim: a memory layer adds N·d parameters at almost no compute,
so its step cost should track the dense FFN of equal FLOPs, and its backward working memory should grow
only with the table (the [N, d] values gradient), never with tokens·N.

For each N: forward+backward (value_and_grad of a linear loss over queries, sub-keys and values) of
xla.pkm_lookup_xla and of a 2-matmul GELU FFN whose forward FLOPs/token match the lookup's
(2·H·sqrt_n·k_dim score matmuls + H·k² candidate sums + 2·H·k·d bag). Times exclude compilation (min of
`repeats` runs); memory comes from `compiled.memory_analysis()` of the backward.

    python -m pallas_kernels.pkm_lookup.bench --n 65536 262144 1048576 --d 128 --tokens 1024
"""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp

from memlm.errors import OneLineArgumentParser, positive_int
from pallas_kernels.pkm_lookup.xla import pkm_lookup_xla


def _time(compiled, args, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"temp_bytes": int(m.temp_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes)}


def pkm_flops_per_token(sqrt_n: int, k_dim: int, heads: int, top_k: int, d: int) -> int:
    """Forward FLOPs per token of the lookup (multiply-add = 2)."""
    return 2 * heads * sqrt_n * k_dim + heads * top_k * top_k + 2 * heads * top_k * d


def run(
    n_values_list=(2**16, 2**18, 2**20),
    d: int = 128,
    tokens: int = 1024,
    heads: int = 4,
    top_k: int = 32,
    k_dim: int = 256,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    """Returns {"config": ..., "rows": [per-N dict]} with seconds and bytes (see module docstring)."""
    rows = []
    key = jax.random.PRNGKey(seed)
    for n in n_values_list:
        sqrt_n = math.isqrt(n)
        assert sqrt_n * sqrt_n == n, f"N={n} is not a perfect square"
        ks = jax.random.split(key, 8)
        q = jax.random.normal(ks[0], (tokens, heads, k_dim), jnp.float32)
        k1 = jax.random.uniform(ks[1], (heads, sqrt_n, k_dim // 2), jnp.float32, -1, 1) * k_dim**-0.5
        k2 = jax.random.uniform(ks[2], (heads, sqrt_n, k_dim // 2), jnp.float32, -1, 1) * k_dim**-0.5
        v = jax.random.normal(ks[3], (n, d), jnp.float32) * d**-0.5
        r = jax.random.normal(ks[4], (tokens, d), jnp.float32)

        def pkm_loss(q, k1, k2, v, r=r):
            return jnp.sum(pkm_lookup_xla(q, k1, k2, v, top_k=top_k)[0] * r)

        pkm_args = (q, k1, k2, v)
        t0 = time.perf_counter()
        pkm_c = jax.jit(jax.value_and_grad(pkm_loss, argnums=(0, 1, 2, 3))).lower(*pkm_args).compile()
        pkm_compile = time.perf_counter() - t0
        pkm_s = _time(pkm_c, pkm_args, repeats)

        flops = pkm_flops_per_token(sqrt_n, k_dim, heads, top_k, d)
        hidden = max(1, round(flops / (4 * d)))  # FFN forward: 2 matmuls = 4·d·hidden FLOPs/token
        x = jax.random.normal(ks[5], (tokens, d), jnp.float32)
        w1 = jax.random.normal(ks[6], (d, hidden), jnp.float32) * d**-0.5
        w2 = jax.random.normal(ks[7], (hidden, d), jnp.float32) * hidden**-0.5

        def ffn_loss(x, w1, w2, r=r):
            return jnp.sum(jax.nn.gelu(x @ w1) @ w2 * r)

        ffn_args = (x, w1, w2)
        ffn_c = jax.jit(jax.value_and_grad(ffn_loss, argnums=(0, 1, 2))).lower(*ffn_args).compile()
        ffn_s = _time(ffn_c, ffn_args, repeats)
        rows.append({
            "n_values": n, "sqrt_n": sqrt_n, "flops_per_token_fwd": flops, "ffn_hidden": hidden,
            "pkm_fwd_bwd_s": pkm_s, "ffn_fwd_bwd_s": ffn_s, "pkm_over_ffn": pkm_s / ffn_s,
            "pkm_compile_s": pkm_compile,
            "pkm_bwd_memory": _memory(pkm_c), "ffn_bwd_memory": _memory(ffn_c),
            "values_bytes": n * d * 4,
            "dense_scores_bytes_if_materialised": tokens * heads * n * 4,
        })
    return {"config": {"d": d, "tokens": tokens, "heads": heads, "top_k": top_k, "k_dim": k_dim,
                       "repeats": repeats, "backend": jax.default_backend(),
                       "device": jax.devices()[0].device_kind},
            "rows": rows}


def main(argv=None) -> None:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, nargs="+", default=[2**16, 2**18, 2**20])
    p.add_argument("--d", type=positive_int, default=128)
    p.add_argument("--tokens", type=positive_int, default=1024)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--top-k", type=positive_int, default=32)
    p.add_argument("--k-dim", type=positive_int, default=256)
    p.add_argument("--repeats", type=positive_int, default=5)
    a = p.parse_args(argv)
    for n in a.n:
        root = math.isqrt(n)
        if root * root != n:
            p.error(f"--n {n}: not a perfect square (product keys: sqrt(N) x sqrt(N))")
        if a.top_k > root:
            p.error(f"--top-k {a.top_k} exceeds sqrt(--n {n}) = {root}")
    print(json.dumps(run(tuple(a.n), d=a.d, tokens=a.tokens, heads=a.heads, top_k=a.top_k, k_dim=a.k_dim,
                         repeats=a.repeats), indent=1))


if __name__ == "__main__":
    main()
