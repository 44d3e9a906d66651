#!/usr/bin/env python
"""Streaming-inference memory and speed of any model kind: is memory flat in the context length?

    python scripts/bench_streaming.py configs/tiny/titans_mag.yaml --tokens 16384,262144
    python scripts/bench_streaming.py configs/tiny/rmt.yaml model.rmt.num_mem_tokens=8 --tokens 16384,65536 --out F

Builds the model of CONFIG (plus `key=value` overrides) with random parameters on one device and streams
N random token ids through `segment_logits` one segment (data.segment_len) at a time with the carry, as
memlm.api.LoadedModel does, after one untimed segment that fixes the carry's structure (landmark's K/V cache
appears there). Each length runs in a fresh subprocess so that its peak RSS is its own.
Reported per length:
  peak_rss_mib     the process's peak resident memory (ru_maxrss; includes the compile)
  warm_rss_mib     RSS after compiling and streaming the first 4 segments
  growth_mib       max RSS while streaming - warm_rss_mib: what the stream length itself costs
  ms_per_segment, us_per_token   median of the timed segments (the compile excluded)
  step_temp_mib, step_arg_mib    compiled.memory_analysis() of the jitted segment step (constant by construction)
Stateless models (the baseline) stream segment-local windows (no carry).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm.errors import OneLineArgumentParser, positive_int, run_script  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stream(config: str, overrides: list[str], n_tokens: int, batch: int, seed: int) -> dict:
    """Stream n_tokens random ids through the model of `config`; returns the measurements (see module doc)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from memlm.config import load_config
    from memlm.sharding import make_mesh
    from memlm.train import setup as setup_lib

    cfg = load_config(config, overrides + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "distributed.enabled=false"])
    L = cfg.data.segment_len
    n_seg = -(-n_tokens // L)
    setup = setup_lib.build_setup(cfg, make_mesh(1, 1, 1, jax.local_devices()[:1]), batch_size=batch)
    params = setup_lib.init_params(setup, seed)
    carry = setup_lib.init_carry(setup, params, batch)
    gd = setup.graphdef

    def seg(p, c, t, pos):
        return nnx.merge(gd, p).segment_logits(c, t, pos)

    fn = jax.jit(seg, donate_argnums=(1,))
    rng = np.random.default_rng(seed)
    tok0 = jnp.zeros((batch, L), jnp.int32)
    pos0 = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (batch, L))
    with setup.activate():
        # one segment first: a carry may gain entries there (landmark's K/V cache), then keeps its structure
        _, carry = fn(params, carry, tok0, pos0)
        compiled = fn.lower(params, carry, tok0, pos0 + L).compile()
        mem = compiled.memory_analysis()
        times, warm, peak = [], None, 0.0
        for s in range(n_seg):
            toks = jnp.asarray(rng.integers(0, cfg.model.vocab_size, size=(batch, L)), jnp.int32)
            pos = pos0 + (s + 1) * L
            t0 = time.perf_counter()
            logits, carry = compiled(params, carry, toks, pos)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t0)
            if s == 3:
                warm = _rss_mib()
            if s >= 3 and (s % 16 == 0 or s == n_seg - 1):
                peak = max(peak, _rss_mib())
    step_s = statistics.median(times[1:] or times)
    out = {
        "config": config, "overrides": overrides, "kind": cfg.model.kind, "tokens": n_seg * L, "batch": batch,
        "segment_len": L, "segments": n_seg,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "warm_rss_mib": round(warm or _rss_mib(), 1),
        "growth_mib": round(max(peak - (warm or peak), 0.0), 1),
        "ms_per_segment": round(step_s * 1e3, 3),
        "us_per_token": round(step_s / (batch * L) * 1e6, 3),
        "wall_s": round(sum(times), 2),
        "device": jax.devices()[0].device_kind,
    }
    if mem is not None:
        out["step_temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 3)
        out["step_arg_mib"] = round(mem.argument_size_in_bytes / 2**20, 3)
    return out


def _lengths(text: str) -> list[int]:
    """argparse type: comma-separated token counts, each >= 1."""
    return [positive_int(x) for x in text.split(",")]


def main() -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--tokens", type=_lengths, default="16384,262144", help="stream lengths, comma-separated")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = args.tokens
    if args.child:  # one length, this process: print one JSON line
        print(json.dumps(stream(args.config, args.overrides, lengths[0], args.batch, args.seed)))
        return 0
    rows = []
    for n in lengths:
        cmd = [sys.executable, os.path.abspath(__file__), args.config, *args.overrides, "--tokens", str(n),
               "--batch", str(args.batch), "--seed", str(args.seed), "--child"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-3000:])
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["kind", "tokens", "peak_rss_mib", "warm_rss_mib", "growth_mib", "us_per_token", "step_temp_mib"]
    print("  ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r.get(c, '')):>13}" for c in cols))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "bench_streaming.py"))
