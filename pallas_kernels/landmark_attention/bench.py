"""Benchmark: blockwise XLA landmark attention vs the dense T x T reference (time and compiled memory).

Landmark Attention (Mohtashami & Jaggi 2023, arXiv 2305.16300). Meant for CPU: the dense reference
holds [batch, heads, T, T] scores and weights, the blockwise version [batch, heads, T, L] per step.

  .venv/bin/python -m pallas_kernels.landmark_attention.bench --T 2048 --block-size 64
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from memlm.errors import OneLineArgumentParser, positive_int

from .reference import landmark_attention_reference
from .xla import landmark_attention_xla

_IMPLS = {"xla": landmark_attention_xla, "reference": landmark_attention_reference}


def _measure(fn, args, iters: int) -> tuple[float, dict[str, int]]:
    """Median wall time in ms of a compiled call, and its compiled memory stats (bytes)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    mem = compiled.memory_analysis()
    # temp = XLA's scratch buffers (what grows with T^2 for the dense reference). The CPU client's
    # peak_memory_in_bytes only counts arguments + outputs, so the total is computed here.
    stats = {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }
    stats["total_bytes"] = sum(stats.values()) - int(mem.alias_size_in_bytes)
    return float(np.median(times)), stats


def run(
    T: int = 2048,
    block_size: int = 64,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    iters: int = 3,
    implementations: tuple[str, ...] = ("xla", "reference"),
) -> dict:
    """Forward and forward+backward time (median ms) and compiled memory for each implementation.

    Shapes: q, k, v [batch, heads, T, head_dim], float32, on ``jax.devices()[0]``. Returns a dict with the
    settings, the device, one entry per implementation, and the xla/reference temp-memory ratio.
    """
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, g = (jax.random.normal(kk, (batch, heads, T, head_dim), jnp.float32) for kk in keys)
    result: dict = {
        "T": T, "block_size": block_size, "batch": batch, "heads": heads, "head_dim": head_dim,
        "device": str(jax.devices()[0].platform), "iters": iters,
    }
    for name in implementations:
        impl = _IMPLS[name]

        def fwd(q, k, v, impl=impl):
            return impl(q, k, v, block_size=block_size)

        def fwd_bwd(q, k, v, g, fwd=fwd):
            return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)

        fwd_ms, fwd_mem = _measure(fwd, (q, k, v), iters)
        bwd_ms, bwd_mem = _measure(fwd_bwd, (q, k, v, g), iters)
        result[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms, "fwd_mem": fwd_mem, "fwd_bwd_mem": bwd_mem}
    if {"xla", "reference"} <= set(implementations):
        for key in ("fwd_mem", "fwd_bwd_mem"):
            ref = result["reference"][key]["temp_bytes"]
            result[f"{key}_temp_ratio_xla_over_reference"] = result["xla"][key]["temp_bytes"] / max(ref, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=positive_int, default=2048)
    p.add_argument("--block-size", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--iters", type=positive_int, default=3)
    a = p.parse_args(argv)
    if a.T % a.block_size:
        p.error(f"--block-size {a.block_size} does not divide --T {a.T}")
    print(json.dumps(run(a.T, a.block_size, a.batch, a.heads, a.head_dim, a.iters), indent=1))


if __name__ == "__main__":
    main()
